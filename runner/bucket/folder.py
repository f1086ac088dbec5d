"""A job folder in a bucket (s3://BUCKET/PREFIX/...) as runner.jobfolders sees it.

An attempt trains in a local working copy (sync.JobSync): fetched on claim, uploaded in the
background, saved (every upload done) before the job's end is written to the queue, and
removed once the attempt is over. Readers get a small local copy (view). Moving a folder
aside copies its objects under the new name and deletes the originals, head first, since S3
has no rename; gc deletes only objects no head can name again (jobfolder.unreferenced).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from runner.bucket import s3
from runner.bucket.jobfolder import HEAD, read_head, unreferenced, write_head
from runner.bucket.sync import JobSync
from runner.bucket.view import local_folder
from runner.jobfolders import EMPTY, MARKER, UNMARKED, JobFolder, aside_names, is_replaced
from trainer.files import STATE_DIR

log = logging.getLogger("runner.bucket")


class BucketFolder(JobFolder):
    on_every_host = True

    def __init__(self, address: str):
        self.folder = s3.S3Path.parse(address)  # BucketError: no bucket, '.' or '..'
        self.address = address
        self.sync: JobSync | None = None  # the attempt's working copy, once prepared

    # --- a worker's attempt ------------------------------------------------------------------

    def prepare(self, attempt: int, cache_dir: str | None, budget: float,
                on_fenced: Callable[[str], None]) -> Path:
        self.sync = JobSync(self.address, attempt, cache_dir or str(s3.cache_root()), budget,
                            on_fenced=on_fenced)
        try:
            local = self.sync.fetch()
        except OSError as e:  # the working copy cannot be made (disk full, permissions)
            raise s3.BucketError(f"cannot make the working copy in {self.sync.local}: "
                                 f"{e.strerror or e}") from None
        self.sync.start()
        return local

    def save(self) -> None:
        self.sync.close()
        self.sync.flush()

    def close(self, fenced: bool) -> None:
        """The log lines written since the last upload go up too (best effort); then the
        working copy goes: the bucket holds the job."""
        self.sync.close()
        if not fenced:
            self.sync.flush()  # BucketError: the working copy stays
        self.sync.remove_local()

    # --- the planner, operators and readers --------------------------------------------------

    def join(self, *parts: str) -> str:
        return self.folder.join(*parts).url

    def check_root(self) -> None:
        s3.check_writable(self.folder)

    def move_aside(self) -> str | None:
        folder = self.folder
        try:
            if not s3.exists(folder):
                return None
            for name in aside_names(folder.name):
                target = folder.with_name(name)
                if not s3.exists(target):
                    break
            s3.move_folder(folder, target, delete_first=HEAD)
        except Exception as e:  # botocore's: an OSError for the callers, as a folder's would be
            raise OSError(s3.describe(e, folder.url)) from None
        return target.url

    def replaced(self) -> list[str]:
        return sorted(self._asides())

    def _asides(self) -> dict[str, int]:
        """address -> bytes of each folder moved aside from this one that still holds
        objects: a store may go on listing the prefix of a folder whose objects were all
        deleted (SeaweedFS keeps it as an empty directory), and that is no folder."""
        folder = self.folder
        names = [p for p in s3.subfolders(folder.with_name("")) if is_replaced(folder.name, p.name)]
        found = {p.url: sum(s3.sizes(p).values()) for p in names}
        return {url: size for url, size in found.items()
                if size or s3.exists(s3.S3Path.parse(url))}

    def collect_garbage(self, queue, job: dict, found, dry_run: bool, replaced: bool) -> None:
        """Objects no head can name again, and with `replaced` the folders moved aside. No lock
        is needed: a head's owner names only its own keys or keys already named."""
        from runner.disk import REPLACED, UNREFERENCED, Garbage

        folder = self.folder
        try:
            head, stale = unreferenced(folder)
            found.kept_states += any(rel.startswith(STATE_DIR + "/") for rel in head.files)
            garbage = [Garbage(folder.join(rel).url, size, UNREFERENCED)
                       for rel, size in sorted(stale.items())]
            if replaced:
                garbage += [Garbage(aside, size, REPLACED)
                            for aside, size in sorted(self._asides().items())]
        except Exception as e:  # botocore's, or a head that is not JSON
            failure(found, folder.url, e)
            return
        for item in garbage:
            if dry_run or remove(item, found):
                found.removed.append(item)

    # --- whose folder it is ------------------------------------------------------------------

    def read_marker(self, budget: float = 0.0) -> dict | None:
        where = self.folder.join(MARKER)
        found = self._retry(lambda: s3.get(where), budget)
        try:
            return None if found is None else json.loads(found[0])
        except ValueError as e:
            raise s3.BucketError(f"{where.url}: not a marker: {e}") from None

    def holds_job_files(self, budget: float = 0.0) -> bool:
        marker = self.folder.join(MARKER).key
        return any(key != marker for key in self._retry(lambda: s3.sizes(self.folder), budget))

    def write_marker(self, marker: dict, replace: bool = False, budget: float = 0.0) -> bool:
        where = self.folder.join(MARKER)
        try:
            self._retry(lambda: s3.put(where, json.dumps(marker).encode(),
                                       if_absent=not replace), budget)
            return True
        except s3.Conflict:
            return False

    def _retry(self, operation, budget: float):
        """Transient errors retried within `budget` seconds (a worker's outage budget);
        BucketError naming the folder past it."""
        return s3.with_retries(operation, self.folder.url, budget, on_wait=lambda reason:
                               log.warning("%s; retrying for up to %gs", reason, budget))

    def adopt(self, marker: dict) -> None:
        """The marker replaced, and the head's attempt set back to 0: the attempts of the queue
        that made the folder do not fence this queue's out (theirs are fenced out instead, as
        the head changed under them)."""
        self.write_marker(marker, replace=True)
        try:
            head = read_head(self.folder)
            if head.etag is not None:
                write_head(self.folder, head, 0, head.files)
        except Exception as e:  # botocore's, or a Conflict: a worker of that queue still writes
            raise s3.BucketError(s3.describe(e, self.folder.url)) from None

    def survey(self, addresses: list[str]) -> dict[str, dict | str]:
        """One listing per parent folder of the jobs' folders (one per model family), and
        one read per marker found."""
        jobs = {s3.S3Path.parse(a).key: a for a in addresses}
        parents = {s3.S3Path.parse(a).with_name("") for a in addresses}
        keys: dict[str, set[str]] = {}
        try:
            for parent in sorted(parents, key=lambda p: p.key):
                for key in s3.sizes(parent):
                    job, _, relative = key.rpartition("/")
                    while job and job not in jobs:  # the job folder holding this object
                        job, _, rest = job.rpartition("/")
                        relative = f"{rest}/{relative}"
                    if job:
                        keys.setdefault(job, set()).add(relative)
        except Exception as e:  # botocore's
            raise s3.BucketError(s3.describe(e, self.folder.url)) from None
        found: dict[str, dict | str] = {}
        for key, address in jobs.items():
            held = keys.get(key, set())
            found[address] = (BucketFolder(address).read_marker() if MARKER in held
                              else UNMARKED if held else EMPTY)
        return found

    def local_view(self) -> Path:
        return local_folder(self.address)


def collect_bucket_job(job: dict, found, dry_run: bool = False, replaced: bool = False) -> None:
    """gc of one job whose folder is in a bucket (its row as read earlier)."""
    BucketFolder(job["out_dir"]).collect_garbage(None, job, found, dry_run, replaced)


def remove(item, found) -> bool:
    """Delete one object or replaced folder; a failure goes into `found.failed`."""
    from runner.disk import REPLACED

    path = s3.S3Path.parse(str(item.path))
    try:
        if item.kind == REPLACED:
            s3.delete_folder(path)
        else:
            s3.delete(path.bucket, [path.key])
        return True
    except Exception as e:  # botocore's
        failure(found, path.url, e)
        return False


def failure(found, url: str, error: Exception) -> None:
    """`url` could not be cleaned: into `found.failed`, with the reason as one line."""
    found.failed.append((url, s3.describe(error, url).removeprefix(url + ": ")))
