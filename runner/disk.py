"""Disk use of the queue's job folders: what `gc` removes, and removing it.

While it trains, a job folder holds its two newest training states (the older one a
fallback in case the newer one is torn), every kept snapshot, its metrics, log and final
evaluation (trainer/checkpoint.py). Once the job is not running, only the newest *valid*
state counts: the one a resume loads, found by the trainer's own loader. Older states,
invalid ones and the temp files of unfinished writes are garbage; so, on request, are the
folders that `plan --replace` and `requeue --fresh` moved aside.

A job folder in a bucket has no lock and needs none: gc deletes only objects of attempts
older than the head's owner that the head does not name (runner.bucket.jobfolder.unreferenced),
which no attempt can name again; its workers delete superseded states themselves. Each kind of
folder collects its own garbage (runner.jobfolders: collect_garbage) into one Collection.

A running job's folders are never touched. A job's row is read before its folder is
looked at and read again while holding the folder's lock (the trainer's own, so no
training is in flight there): a job claimed meanwhile is seen running and left alone, and
its worker waits for the lock (up to its lease) before it trains.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import filelock

from db import JobQueue
from runner.jobfolders import open_folder
from trainer.files import LOCK_FILE

SUPERSEDED, INVALID, STRAY, UNFINISHED, REPLACED, UNREFERENCED = (
    "superseded state", "invalid state", "stray manifest", "unfinished write",
    "replaced folder", "unreferenced object")


@dataclass(frozen=True)
class Garbage:
    path: Path | str  # a file or folder on disk, or an s3:// address
    size: int       # bytes (a folder: every file in it)
    kind: str       # one of the kinds above
    detail: str = ""


@dataclass
class Collection:
    """What one gc pass found (and removed, unless a dry run)."""

    removed: list[Garbage] = field(default_factory=list)
    kept_states: int = 0                                  # jobs whose newest valid state stays
    left_alone: list[tuple[str, str]] = field(default_factory=list)   # (job, why)
    failed: list[tuple[Path | str, str]] = field(default_factory=list)  # (path, why)

    @property
    def freed(self) -> int:
        return sum(g.size for g in self.removed)


def collect(queue: JobQueue, dry_run: bool = False, replaced: bool = False) -> Collection:
    """Remove (or, with `dry_run`, only list) the garbage of every job of the queue."""
    found = Collection()
    for job in queue.jobs():
        collect_job(queue, job, found, dry_run=dry_run, replaced=replaced)
    return found


def collect_job(queue: JobQueue, job: dict, found: Collection, dry_run: bool = False,
                replaced: bool = False) -> None:
    """One job's garbage into `found`; `job` is its row as read earlier (it may be stale)."""
    if job["state"] == "running":
        found.left_alone.append((job["name"], "running"))
        return
    open_folder(job["out_dir"]).collect_garbage(queue, job, found, dry_run, replaced)


def collect_local_job(queue: JobQueue, job: dict, found: Collection, dry_run: bool,
                      replaced: list[Path]) -> None:
    """A folder on disk: its garbage under its lock, and the `replaced` folders moved aside."""
    for folder in [Path(job["out_dir"]), *replaced]:
        if not folder.is_dir():
            continue
        try:
            with folder_lock(folder, dry_run) as held:
                if not held:
                    found.left_alone.append((job["name"], f"{folder} is in use by another "
                                             "process"))
                    continue
                if job_state(queue, job["id"]) == "running":  # claimed since it was read
                    found.left_alone.append((job["name"], "started running"))
                    return
                if folder == Path(job["out_dir"]):
                    kept, garbage = job_folder_garbage(folder)
                    found.kept_states += kept is not None
                else:
                    garbage = [Garbage(folder, tree_size(folder), REPLACED)]
                for item in garbage:
                    if dry_run or remove(item, found):
                        found.removed.append(item)
        except OSError as e:  # no lock (e.g. a read-only folder), or a state unreadable now
            found.failed.append((folder, e.strerror or str(e)))


def job_state(queue: JobQueue, job_id: int) -> str | None:
    """The job's state as the database says now."""
    return next((j["state"] for j in queue.jobs() if j["id"] == job_id), None)


@contextlib.contextmanager
def folder_lock(folder: Path, dry_run: bool) -> Iterator[bool]:
    """Hold the folder's training lock if no one else does; yields whether it is held.

    A dry run never creates a lock file where none is (it changes nothing on disk).
    """
    path = folder / LOCK_FILE
    if dry_run and not path.exists():
        yield True
        return
    lock = filelock.FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def job_folder_garbage(folder: Path) -> tuple[Path | None, list[Garbage]]:
    """The state a resume loads (trainer.checkpoint's own check), and the garbage: every
    other state with its manifest, stray manifests, temp files.

    A state that cannot be read (an I/O or permission error, not bad contents) raises
    OSError: the folder is then left as it is. Call it only while holding the folder's lock.
    """
    from trainer import checkpoint as ckpt  # torch loads only when there are folders

    invalid: dict[Path, str] = {}

    def skipped(path: Path, error: Exception) -> None:
        if isinstance(error, OSError):  # unreadable now is not invalid: never delete on it
            raise OSError(error.errno, f"cannot read {path}: {error.strerror or error}")
        invalid[path] = (str(error).strip().splitlines() or [type(error).__name__])[0]

    found = ckpt.newest_valid_state(folder, skipped)
    kept = found[0] if found else None
    garbage = []
    for state in ckpt.list_states(folder):
        if state == kept:
            continue
        kind, detail = (INVALID, invalid[state]) if state in invalid else (SUPERSEDED, "")
        for path in (state, state.with_suffix(".json")):
            if path.is_file():
                garbage.append(Garbage(path, path.stat().st_size, kind, detail))
    garbage += [Garbage(p, p.stat().st_size, STRAY) for p in ckpt.stray_manifests(folder)]
    garbage += [Garbage(p, p.stat().st_size, UNFINISHED) for p in ckpt.temp_files(folder)]
    return kept, garbage


def tree_size(folder: Path) -> int:
    """Bytes of every file under `folder` (links not followed)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def remove(item: Garbage, found: Collection) -> bool:
    """Delete one file or replaced folder on disk; a failure goes into `found.failed`."""
    try:
        if item.kind == REPLACED:
            shutil.rmtree(item.path)
        else:
            item.path.unlink(missing_ok=True)
        return True
    except OSError as e:
        found.failed.append((item.path, e.strerror or str(e)))
        return False


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def describe(found: Collection, dry_run: bool) -> str:
    """The report: one line per removed path, the jobs left alone, then what was freed."""
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {g.path}  ({g.kind}{': ' + g.detail if g.detail else ''}, "
             f"{human_bytes(g.size)})" for g in found.removed]
    lines += [f"left alone: {name} ({why})" for name, why in found.left_alone]
    kinds = Counter(g.kind for g in found.removed)
    what = ", ".join(f"{n} {kind}{'' if kind in (REPLACED, UNREFERENCED) else ' file'}"
                     f"{'s' * (n > 1)}"
                     for kind, n in kinds.items())
    lines.append(f"{'would free' if dry_run else 'freed'} {human_bytes(found.freed)} "
                 f"({found.freed} bytes){': ' + what if what else ''}; kept the newest valid "
                 f"state of {found.kept_states} job(s) and every snapshot")
    return "\n".join(lines)
