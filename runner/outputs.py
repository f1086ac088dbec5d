"""Checking, before any work, that a command's output folder can be written.

A runs folder, a figure, a report or a TensorBoard folder that cannot be made
(a file in the way, no permission, a read-only or pseudo file system) is then
refused in one line, with nothing written, instead of failing half-way. So is a URL
(s3://..., http://...): outputs are written on this machine, never as a folder named `s3:`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runner.jobfolders import local_output_problem


def folder_problem(folder: str | Path) -> str | None:
    """Why files could not be made in `folder` (created if missing); None when they can.

    Tries it: a probe folder made and removed in the nearest folder that exists, which
    answers for permissions and read-only and pseudo file systems at once (as root too).
    """
    path = Path(folder).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return ("it is a file" if existing == path
                else f"it is inside {existing}, which is a file")
    try:
        probe = Path(tempfile.mkdtemp(prefix=".write-probe-", dir=existing))
    except OSError as e:
        return f"cannot write in {existing}: {e.strerror or e}"
    probe.rmdir()
    return None


def file_problem(out: str | Path) -> str | None:
    """Why the file `out` could not be written (its folder created if missing); None when
    it can."""
    path = Path(out).expanduser().absolute()
    if path.is_dir():
        return "it is a folder"
    existing = next(p for p in path.parents if p.exists())
    if not existing.is_dir():
        return f"it is inside {existing}, which is a file"
    return folder_problem(existing)


class OutputError(Exception):
    """An output that cannot be written; the message names the option and why."""


def check_file(out: str | Path, option: str) -> None:
    problem = local_output_problem(str(out)) or file_problem(out)
    if problem:
        raise OutputError(f"{option} '{out}': {problem}")


def check_folder(folder: str | Path, option: str) -> None:
    problem = local_output_problem(str(folder)) or folder_problem(folder)
    if problem:
        raise OutputError(f"{option} '{folder}': {problem}")


@contextmanager
def writing(target: str | Path, option: str) -> Iterator[None]:
    """An OSError while writing `target` (a disk that fills up) as an OutputError naming it."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"{option} '{target}': cannot write it: {e.strerror or e}") from None

