"""Job folders on disk: moving an old run's folder aside, never deleting it."""

from __future__ import annotations

import os
import time
from pathlib import Path


def move_aside(out_dir: str) -> Path | None:
    """Rename `out_dir` to `<out_dir>.replaced-<UTC time>`; None when there is no folder."""
    folder = Path(out_dir)
    if not folder.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = folder.with_name(f"{folder.name}.replaced-{stamp}")
    n = 1
    while target.exists():  # two replacements within a second
        n += 1
        target = folder.with_name(f"{folder.name}.replaced-{stamp}-{n}")
    os.rename(folder, target)  # same parent: atomic, and refuses to clobber a folder
    return target
