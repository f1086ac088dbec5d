"""Readers' local copy of a job folder that lives in a bucket.

`local_folder(out_dir)` returns a folder to read as any job folder: a small cache holding the
bucket folder's current config, metrics, evaluation and log (as its head names them; states
and snapshots are left in the bucket).
A file is downloaded again only when the head names another object or the object changed.

Within `cached_when_unreachable()` (the command-line readers), a folder whose bucket cannot be
read is served from the copy cached earlier on this machine, if it has one, and the fallback
says so; elsewhere (the dashboard) the error is raised.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runner.bucket import s3
from runner.bucket.jobfolder import read_head
from trainer.atomic import write_bytes_atomic, write_json_atomic
from trainer.files import CONFIG_FILE, EVAL_FILE, LOG_FILE, METRICS_FILE

READ_FILES = (CONFIG_FILE, METRICS_FILE, EVAL_FILE, LOG_FILE)
FRESH_FOR = 2.0  # seconds a copy is served without asking the bucket again (the dashboard)
INDEX = ".index.json"  # relative path -> [key, ETag] of what the copy holds

_checked: dict[str, float] = {}
_lock = threading.Lock()


class Fallback:
    """What was served from cached copies because the bucket could not be read."""

    def __init__(self):
        self.served = 0
        self.oldest: float | None = None  # when the oldest copy served was last refreshed
        self.reason: str | None = None    # the first error met
        self.unreachable = False          # the endpoint is away: the bucket is not asked again

    def serve(self, local: Path, error: str) -> Path:
        """`local`, the cached copy; the error if there is none."""
        try:
            refreshed = (local / INDEX).stat().st_mtime
        except FileNotFoundError:
            raise s3.BucketError(error) from None
        self.served += 1
        self.reason = self.reason or error
        self.oldest = refreshed if self.oldest is None else min(self.oldest, refreshed)
        return local

    def note(self) -> str:
        cached = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.oldest))
        return (f"note: {self.reason}; {self.served} job folder(s) shown as cached on this "
                f"machine (the oldest copy from {cached})")


_fallback: Fallback | None = None


@contextmanager
def cached_when_unreachable() -> Iterator[Fallback]:
    """Within it, a folder whose bucket cannot be read is served from its cached copy."""
    global _fallback
    _fallback = Fallback()
    try:
        yield _fallback
    finally:
        _fallback = None


def local_folder(out_dir: str) -> Path:
    """A local folder holding `out_dir`'s readable files (BucketError if unreachable and,
    within cached_when_unreachable(), no copy of it is cached)."""
    job = s3.S3Path.parse(out_dir)
    local = s3.cache_root() / "view" / job.bucket / job.key
    with _lock:
        if time.monotonic() - _checked.get(out_dir, -FRESH_FOR) < FRESH_FOR:
            return local
        fallback = _fallback
        if fallback is not None and fallback.unreachable:  # not asked again: it is away
            return fallback.serve(local, fallback.reason)
        try:
            _refresh(job, local)
        except Exception as e:  # botocore's, as one line
            error = str(e) if isinstance(e, s3.BucketError) else s3.describe(e, job.url)
            if fallback is None:
                raise s3.BucketError(error) from None
            fallback.unreachable = s3.transient(e)
            return fallback.serve(local, error)
        _checked[out_dir] = time.monotonic()
    return local


def _refresh(job: s3.S3Path, local: Path) -> None:
    head = read_head(job)
    tags = dict(s3.listing(job))
    index_path = local / INDEX
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    for relative in READ_FILES:
        key = head.files.get(relative)
        target = local / relative
        if key is None:
            target.unlink(missing_ok=True)
            index.pop(relative, None)
            continue
        wanted = [key, tags.get(job.join(key).key)]
        if index.get(relative) == wanted and target.exists():
            continue
        found = s3.get(job.join(key))
        if found is None:
            continue
        write_bytes_atomic(target, found[0])
        index[relative] = [key, found[1]]
    local.mkdir(parents=True, exist_ok=True)
    write_json_atomic(index_path, index)

