"""Atomic file writes: temp file in the same folder, fsync, rename, fsync folder.

A reader (or a resumed run) therefore sees either the old file or the whole
new one, never a torn write.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml

# mkstemp makes its file 0600; the file gets the mode a plain open() would give it (0666 less
# the umask), so figures and reports stay readable by the group and others where the user's
# umask says so. Read once: os.umask can only be read by setting it, which is not thread-safe.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def write_atomic(path: Path, write: Callable[[IO[bytes]], None], parents: bool = True) -> None:
    """Call `write(fileobj)` on a temp file and move it over `path` when complete.

    parents=False creates the file's own folder only, never the ones above it: a background
    write into a job folder that was moved away must fail, not bring the folder back.
    """
    path = Path(path)
    path.parent.mkdir(parents=parents, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Never leave a half-written temp file behind, whatever stopped us.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes, parents: bool = True) -> None:
    write_atomic(path, lambda f: f.write(data), parents)


def write_json_atomic(path: Path, obj: Any, parents: bool = True) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), parents)


def write_yaml_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, yaml.safe_dump(obj, sort_keys=False).encode())
