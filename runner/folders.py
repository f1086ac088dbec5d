"""Job folders: moving an old run's folder aside, never deleting it, and finding it.

A folder in a bucket (s3://...) is moved by copying its objects under the new name and
deleting the originals, since S3 has no rename.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from runner.bucket import s3
from runner.bucket.jobfolder import HEAD

REPLACED = ".replaced-"  # <folder>.replaced-<UTC time>[-n]


def move_aside(out_dir: str) -> Path | str | None:
    """Rename `out_dir` to `<out_dir>.replaced-<UTC time>`; None when there is no folder."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    if s3.is_s3(out_dir):
        return _move_bucket_folder(s3.S3Path.parse(out_dir), stamp)
    folder = Path(out_dir)
    if not folder.exists():
        return None
    target = folder.with_name(f"{folder.name}{REPLACED}{stamp}")
    n = 1
    while target.exists():  # two replacements within a second
        n += 1
        target = folder.with_name(f"{folder.name}{REPLACED}{stamp}-{n}")
    os.rename(folder, target)  # same parent: atomic, and refuses to clobber a folder
    return target


def _move_bucket_folder(folder: s3.S3Path, stamp: str) -> str | None:
    try:
        if not s3.exists(folder):
            return None
        target, n = folder.with_name(f"{folder.name}{REPLACED}{stamp}"), 1
        while s3.exists(target):
            n += 1
            target = folder.with_name(f"{folder.name}{REPLACED}{stamp}-{n}")
        s3.move_folder(folder, target, delete_first=HEAD)
    except Exception as e:  # botocore's: an OSError for the callers, as a folder's would be
        raise OSError(s3.describe(e, folder.url)) from None
    return target.url


def replaced_folders(out_dir: str) -> list[Path] | list[s3.S3Path]:
    """The folders `move_aside` made of `out_dir`, by name."""
    if s3.is_s3(out_dir):
        folder = s3.S3Path.parse(out_dir)
        return sorted((p for p in s3.subfolders(folder.with_name(""))
                       if _is_replaced(folder.name, p.name)), key=lambda p: p.key)
    folder = Path(out_dir)
    if not folder.parent.is_dir():
        return []
    return sorted(p for p in folder.parent.iterdir()
                  if _is_replaced(folder.name, p.name) and p.is_dir() and not p.is_symlink())


def _is_replaced(name: str, candidate: str) -> bool:
    return re.fullmatch(re.escape(name + REPLACED) + r"\d{8}T\d{6}Z(-\d+)?",
                        candidate) is not None
