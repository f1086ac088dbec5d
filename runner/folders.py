"""Job folders on disk: moving an old run's folder aside, never deleting it, and finding it."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

REPLACED = ".replaced-"  # <folder>.replaced-<UTC time>[-n]


def move_aside(out_dir: str) -> Path | None:
    """Rename `out_dir` to `<out_dir>.replaced-<UTC time>`; None when there is no folder."""
    folder = Path(out_dir)
    if not folder.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = folder.with_name(f"{folder.name}{REPLACED}{stamp}")
    n = 1
    while target.exists():  # two replacements within a second
        n += 1
        target = folder.with_name(f"{folder.name}{REPLACED}{stamp}-{n}")
    os.rename(folder, target)  # same parent: atomic, and refuses to clobber a folder
    return target


def replaced_folders(out_dir: str) -> list[Path]:
    """The folders `move_aside` made of `out_dir`, by name."""
    folder = Path(out_dir)
    pattern = re.compile(re.escape(folder.name + REPLACED) + r"\d{8}T\d{6}Z(-\d+)?")
    if not folder.parent.is_dir():
        return []
    return sorted(p for p in folder.parent.iterdir()
                  if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink())
