"""The worker's working copy of a job folder that lives in a bucket.

On claim, `JobSync.fetch` takes the folder's head over for this attempt and downloads what a
resume needs (config, the newest states with their manifests, metrics, log) into a local
folder of this attempt's own; the trainer works there as on any folder. A thread uploads
what changed every few seconds: a state file first, its manifest after it, and the head
last, so the head never names a state that is not whole in the bucket. Transient errors are
retried within the outage budget; a refused head write means a newer attempt owns the job,
and nothing more is uploaded.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import filelock

from runner.bucket import s3
from runner.bucket.jobfolder import Fenced, Head, attempt_key, read_head, take_over, write_head
from trainer.files import LOCK_FILE, SNAPSHOT_DIR, STATE_DIR

log = logging.getLogger("runner.bucket")

UPLOAD_EVERY = 2.0  # seconds between upload passes while training
ATTEMPT_FOLDER = "attempt-"


def _is_state(relative: str) -> bool:
    return relative.startswith(STATE_DIR + "/")


def _step_of(relative: str) -> int:
    return int(relative.rsplit("-", 1)[1].split(".")[0])


class JobSync:
    """One attempt's working copy of the job folder `url` under `cache_dir`."""

    def __init__(self, url: str, attempt: int, cache_dir: Path, budget: float,
                 on_fenced: Callable[[str], None]):
        self.job = s3.S3Path.parse(url)
        self.attempt, self.budget, self.on_fenced = attempt, budget, on_fenced
        self.home = Path(cache_dir) / "jobs" / self.job.bucket / self.job.key
        self.local = self.home / f"{ATTEMPT_FOLDER}{attempt}"
        self.head = Head()
        self.sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) sent
        self.put_states: set[str] = set()  # this attempt's state keys in the bucket
        self.error: Exception | None = None
        self.fenced = False
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one upload pass at a time
        self._thread: threading.Thread | None = None

    # --- claim ---------------------------------------------------------------------------

    def fetch(self) -> Path:
        """Take the folder over and download it; the local folder to train in."""
        self._clear_old_copies()
        self.head = self._retry(lambda: take_over(self.job, self.attempt), self.job.url)
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        for relative, key in self.head.files.items():
            if relative.startswith(SNAPSHOT_DIR + "/"):
                continue  # kept in the bucket; a resume does not need them
            source = self.job.join(key)
            found = self._retry(lambda source=source: s3.get(source), source.url)
            if found is None:  # pruned by a newer head meanwhile: the manifest check decides
                continue
            target = self.local / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(found[0])
        # States came down whole and never change: not sent again. The rest (config, metrics,
        # log) goes up now under this attempt's keys, so the head names nothing that the
        # attempt before, if it still runs somewhere, could overwrite.
        self.sent = {rel: self._signature(rel) for rel in self._local_files() if _is_state(rel)}
        self.upload()
        return self.local

    def _clear_old_copies(self) -> None:
        """Remove this job's working copies left by earlier attempts on this host (a worker
        killed, say), except one still in use by a live process (its folder lock is held)."""
        if not self.home.is_dir():
            return
        for old in self.home.glob(f"{ATTEMPT_FOLDER}*"):
            lock = filelock.FileLock(str(old / LOCK_FILE))
            try:
                with lock.acquire(timeout=0):
                    shutil.rmtree(old, ignore_errors=True)
            except (filelock.Timeout, OSError):
                continue

    # --- uploads -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="upload", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(UPLOAD_EVERY):
            try:
                self.upload()
            except Fenced:
                return
            except s3.BucketError as e:  # budget spent: the final flush raises it
                self.error = e
                log.error("%s", e)
                return
            except Exception as e:  # a bug or a local disk error: the final flush says so
                self.error = s3.BucketError(f"{self.job.url}: uploads stopped: "
                                            f"{type(e).__name__}: {e}")
                log.exception("%s", self.error)
                return

    def upload(self) -> None:
        """Upload what changed, then point the head at it; Fenced if a newer attempt owns
        the folder."""
        with self._lock:
            if self.fenced:
                raise Fenced(f"{self.job.url}: a newer attempt owns the folder")
            files = self._files_now()
            changed = [rel for rel in files if self.sent.get(rel) != self._signature(rel)]
            for relative in sorted(changed, key=_upload_order):
                signature = self._signature(relative)
                try:
                    data = (self.local / relative).read_bytes()
                except FileNotFoundError:  # a state pruned meanwhile: superseded anyway
                    files.remove(relative)
                    continue
                target = self.job.join(attempt_key(self.attempt, relative))
                self._retry(lambda t=target, d=data: s3.put(t, d), target.url)
                self.sent[relative] = signature
                if _is_state(relative):
                    self.put_states.add(target.key)
            files = _whole_states(files)
            # Files not kept locally (snapshots of earlier attempts) stay as the head has them;
            # states are the ones the trainer keeps now.
            wanted = {rel: key for rel, key in self.head.files.items() if not _is_state(rel)}
            for rel in files:
                if rel in changed or rel not in self.head.files:
                    wanted[rel] = attempt_key(self.attempt, rel)
                else:
                    wanted[rel] = self.head.files[rel]
            if wanted != self.head.files:
                before = self.head  # what this attempt last named (a lost answer may change it)
                self.head = self._point_head(wanted)
                dropped = [self.job.join(key).key for rel, key in before.files.items()
                           if _is_state(rel) and key not in self.head.files.values()]
            else:
                dropped = []
            # A state that went up while the trainer pruned it (a slow pass: an outage, say)
            # lost its partner on the way and was never named: it never will be.
            named = {self.job.join(key).key for key in self.head.files.values()}
            unnamed = self.put_states - named
            if dropped or unnamed:  # superseded states, and those never named
                self._retry(lambda: s3.delete(self.job.bucket, sorted({*dropped, *unnamed})),
                            self.job.url)
                self.put_states -= unnamed
                for relative in [rel for rel in self.sent
                                 if self.job.join(attempt_key(self.attempt, rel)).key in unnamed]:
                    del self.sent[relative]  # up again, should it become whole once more

    def _point_head(self, wanted: dict[str, str]) -> Head:
        try:
            return self._retry(lambda: write_head(self.job, self.head, self.attempt, wanted),
                               self.job.url)
        except s3.Conflict:
            newer = self._retry(lambda: read_head(self.job), self.job.url)
            if newer.attempt == self.attempt:  # our own write, its answer lost on the way
                self.head = newer
                return self._retry(lambda: write_head(self.job, newer, self.attempt, wanted),
                                   self.job.url)
        self.fenced = True
        message = (f"attempt {newer.attempt} took the job folder over; attempt "
                   f"{self.attempt} uploads nothing more")
        log.error("%s: %s", self.job.url, message)
        self.on_fenced(message)
        raise Fenced(message)

    def _files_now(self) -> list[str]:
        """The local files to mirror: a state only once its manifest exists (it is whole)."""
        return _whole_states(self._local_files())

    def _local_files(self) -> list[str]:
        if not self.local.is_dir():
            return []
        return sorted(str(p.relative_to(self.local)) for p in self.local.rglob("*")
                      if p.is_file() and not p.name.startswith("."))

    def _signature(self, relative: str) -> tuple[int, int]:
        try:
            st = (self.local / relative).stat()
        except FileNotFoundError:
            return (-1, -1)
        return (st.st_size, st.st_mtime_ns)

    def flush(self) -> None:
        """Upload everything now and wait for it; BucketError (or Fenced) if it cannot be."""
        if self.error is not None:
            raise self.error
        self.upload()

    def close(self) -> None:
        """Stop the background uploads (waiting for a pass in flight)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def remove_local(self) -> None:
        shutil.rmtree(self.local, ignore_errors=True)

    def _retry(self, operation, where: str):
        return s3.with_retries(operation, where, self.budget, on_wait=lambda reason: log.warning(
            "%s; retrying for up to %gs", reason, self.budget))


def _whole_states(files: list[str]) -> list[str]:
    """`files` less any state file whose partner (the state's manifest, or the manifest's
    state) is not among them."""
    present = set(files)
    return [rel for rel in files if not _is_state(rel) or (
        rel.endswith(".pt") and rel[:-3] + ".json" in present) or (
        rel.endswith(".json") and rel[:-5] + ".pt" in present)]


def _upload_order(relative: str) -> tuple[int, str]:
    """A state before its manifest, older states first; the rest after."""
    if _is_state(relative):
        return (0, f"{_step_of(relative):012d}{relative.endswith('.json')}")
    return (1, relative)
