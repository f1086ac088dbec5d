"""Readers' local copy of a job folder that lives in a bucket.

`local_folder(out_dir)` returns a folder to read as any job folder: a small cache holding the
bucket folder's current config, metrics, evaluation and log (as its head names them; states
and snapshots are left in the bucket).
A file is downloaded again only when the head names another object or the object changed.
"""

from __future__ import annotations

import json
import threading
import time
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


def local_folder(out_dir: str) -> Path:
    """A local folder holding `out_dir`'s readable files (BucketError if unreachable)."""
    job = s3.S3Path.parse(out_dir)
    local = s3.cache_root() / "view" / job.bucket / job.key
    with _lock:
        if time.monotonic() - _checked.get(out_dir, -FRESH_FOR) < FRESH_FOR:
            return local
        try:
            _refresh(job, local)
        except s3.BucketError:
            raise
        except Exception as e:  # botocore's, as one line
            raise s3.BucketError(s3.describe(e, job.url)) from None
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

