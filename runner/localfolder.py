"""A job folder on disk (or on a shared file system every worker mounts): the trainer works
in it as it is, so an attempt has nothing to fetch, upload or remove."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from runner.jobfolders import (
    EMPTY,
    MARKER,
    UNMARKED,
    FolderUnavailable,
    JobFolder,
    aside_names,
    is_replaced,
)
from runner.outputs import folder_problem
from trainer.files import CONFIG_FILE, METRICS_FILE, STATE_DIR

JOB_FILES = (CONFIG_FILE, STATE_DIR, METRICS_FILE)


class LocalFolder(JobFolder):
    on_every_host = False  # only where the same file system is mounted

    def __init__(self, address: str):
        self.address = address
        self.path = Path(address)

    def prepare(self, attempt: int, cache_dir: str | None, budget: float,
                on_fenced: Callable[[str], None]) -> Path:
        return self.path  # the trainer's folder lock keeps two attempts apart

    def save(self) -> None:
        pass  # written in place

    def close(self, fenced: bool) -> None:
        pass

    def join(self, *parts: str) -> str:
        # Absolute (resolved against the planner's working directory), so workers and tools
        # started anywhere find the same files.
        return str(self.path.expanduser().resolve().joinpath(*parts))

    def check_root(self) -> None:
        if ".." in self.path.parts:
            raise FolderUnavailable(f"'{self.address}': '..' is not allowed")
        problem = folder_problem(self.address)
        if problem:
            raise FolderUnavailable(f"'{self.address}': {problem}"
                                    + ("; give a folder" if "is a file" in problem else ""))

    def move_aside(self) -> str | None:
        folder = self.path
        if not folder.exists():
            return None
        for name in aside_names(folder.name):  # two replacements within a second: -2, -3...
            target = folder.with_name(name)
            if not target.exists():
                break
        os.rename(folder, target)  # same parent: atomic, and refuses to clobber a folder
        return str(target)

    def replaced(self) -> list[str]:
        folder = self.path
        if not folder.parent.is_dir():
            return []
        return sorted(str(p) for p in folder.parent.iterdir()
                      if is_replaced(folder.name, p.name) and p.is_dir() and not p.is_symlink())

    def collect_garbage(self, queue, job: dict, found, dry_run: bool, replaced: bool) -> None:
        from runner.disk import collect_local_job

        collect_local_job(queue, job, found, dry_run=dry_run,
                          replaced=[Path(p) for p in self.replaced()] if replaced else [])

    def read_marker(self, budget: float = 0.0) -> dict | None:
        try:
            return json.loads((self.path / MARKER).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise FolderUnavailable(f"{self.path / MARKER}: cannot be read: "
                                    f"{getattr(e, 'strerror', None) or e}") from None

    def holds_job_files(self, budget: float = 0.0) -> bool:
        return any((self.path / name).exists() for name in JOB_FILES)

    def write_marker(self, marker: dict, replace: bool = False, budget: float = 0.0) -> bool:
        target = self.path / MARKER
        temp = self.path / f".{MARKER}.{os.getpid()}.tmp"  # gc's temp-file pattern
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            temp.write_text(json.dumps(marker) + "\n")
            if replace:
                os.replace(temp, target)
                return True
            try:
                os.link(temp, target)  # whole, and never over a marker already there
            except FileExistsError:
                return False
            return True
        except OSError as e:
            raise FolderUnavailable(f"{target}: cannot be written: {e.strerror or e}") from None
        finally:
            temp.unlink(missing_ok=True)

    def survey(self, addresses: list[str]) -> dict[str, dict | str]:
        found = {}
        for address in addresses:
            folder = LocalFolder(address)
            marker = folder.read_marker()
            found[address] = (marker if marker is not None
                              else UNMARKED if folder.holds_job_files() else EMPTY)
        return found

    def local_view(self) -> Path:
        return self.path
