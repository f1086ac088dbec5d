"""Job folders behind one interface, wherever they live: a folder on disk (runner.localfolder)
or one in a bucket, s3://BUCKET/PREFIX (runner.bucket.folder).

`open_folder(address)` is the one place an address is told apart: a job's folder as the queue
stores it, or an out-root. Anything else that names a scheme (gs://, http://, S3://, s3:/, ...)
is refused in one line, BadAddress, rather than taken for a local folder named `gs:`.

A worker's attempt: `prepare` gives the local path the trainer works in (in a bucket: a
working copy, fetched, and uploaded in the background), `save` waits until the folder holds
what was written (the job's end counts only then), `close` lets go of the working copy.
Operators and the planner: `move_aside` and `replaced` (plan --replace, requeue --fresh),
`collect_garbage` (gc), `check_root` and `join` (plan), `local_view` (the readers).
Which queue a folder belongs to: its marker (`read_marker`, `write_marker`, `adopt`,
`survey`); runner.ownership decides what a worker and the planner make of it.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPLACED = ".replaced-"
MARKER = "queue.json"  # {"queue": <queue id>, "job": <job name>}: whose folder this is
# What a folder holds, as `survey` reports it: nothing (or no folder), or a job's files but
# no marker (left by a queue from before markers, or a stray run); else its marker (a dict).
EMPTY, UNMARKED = "empty", "unmarked"  # <folder>.replaced-<UTC time>[-n]
ACCEPTED = "a local folder path or an s3://BUCKET/PREFIX address"
# A scheme followed by a slash (gs://x, http://x, s3:/x), or s3: in any case and form.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:/|s3:)", re.IGNORECASE)


class BadAddress(ValueError):
    """Neither a local path nor an s3://BUCKET/PREFIX address; the message is one line."""


class FolderUnavailable(Exception):
    """The folder cannot be used (a bucket unreachable past the outage budget, refused
    credentials, a working copy that cannot be made); the message is one line."""


class FolderFenced(Exception):
    """A newer attempt owns the folder: this attempt keeps nothing more in it."""


class JobFolder(ABC):
    """One job's folder (or an out-root holding job folders), named by `address`."""

    address: str
    on_every_host: bool  # every machine reaches it as it is (a bucket), whatever mounts it has

    # --- a worker's attempt ------------------------------------------------------------------

    @abstractmethod
    def prepare(self, attempt: int, cache_dir: str | None, budget: float,
                on_fenced: Callable[[str], None]) -> Path:
        """Ready the folder for `attempt`; the local path the trainer works in. Kept in sync
        while it trains; `on_fenced(message)` hears if a newer attempt takes it over.
        FolderFenced: a newer attempt owns it already; FolderUnavailable: it cannot be used."""

    @abstractmethod
    def save(self) -> None:
        """Wait until the folder holds everything written so far (FolderUnavailable, or
        FolderFenced when a newer attempt took it over)."""

    @abstractmethod
    def close(self, fenced: bool) -> None:
        """The attempt is over: what was written last is kept unless `fenced` (best effort:
        FolderUnavailable, and the working copy stays), then the working copy goes."""

    # --- the planner, operators and readers --------------------------------------------------

    @abstractmethod
    def join(self, *parts: str) -> str:
        """The address of a folder under this one (a job's folder under its out-root)."""

    @abstractmethod
    def check_root(self) -> None:
        """FolderUnavailable (naming the address) when jobs could not write under it."""

    @abstractmethod
    def move_aside(self) -> str | None:
        """Move the folder to `<folder>.replaced-<UTC time>` (never deleted); its new address,
        None when there is no folder. OSError when it cannot be moved."""

    @abstractmethod
    def replaced(self) -> list[str]:
        """The addresses of the folders `move_aside` made of this one, by name."""

    @abstractmethod
    def collect_garbage(self, queue, job: dict, found, dry_run: bool, replaced: bool) -> None:
        """gc of this (not running) job's folder: its garbage into `found` (runner.disk's
        Collection), removed unless `dry_run`; with `replaced`, its moved-aside folders too."""

    # --- whose folder it is (runner.ownership) ----------------------------------------------

    @abstractmethod
    def read_marker(self, budget: float = 0.0) -> dict | None:
        """The folder's marker, None when it has none (FolderUnavailable: it cannot be read,
        transient errors retried for `budget` seconds)."""

    @abstractmethod
    def holds_job_files(self, budget: float = 0.0) -> bool:
        """Whether the folder holds a job's files (config, states, metrics)."""

    @abstractmethod
    def write_marker(self, marker: dict, replace: bool = False, budget: float = 0.0) -> bool:
        """Write the marker whole, at once; unless `replace`, only where there is none yet:
        False when one was there already."""

    def adopt(self, marker: dict) -> None:
        """Make the folder this queue's (plan --adopt-folders): its marker replaced."""
        self.write_marker(marker, replace=True)

    @abstractmethod
    def survey(self, addresses: list[str]) -> dict[str, dict | str]:
        """For job folders under this out-root: address -> EMPTY, UNMARKED or the marker."""

    @abstractmethod
    def local_view(self) -> Path:
        """A local folder holding the job's readable files (config, metrics, evaluation,
        log) as they are now; FolderUnavailable when they cannot be read."""


def open_folder(address: str) -> JobFolder:
    """The job folder (or out-root) at `address`; BadAddress for anything but a local path
    or s3://BUCKET/PREFIX."""
    from runner.bucket.s3 import BucketError, is_s3

    if is_s3(address):
        from runner.bucket.folder import BucketFolder

        try:
            return BucketFolder(address)
        except BucketError as e:  # no bucket named, or '.' and '..' in the key
            raise BadAddress(f"{e}; expected {ACCEPTED}") from None
    if _URL.match(address):
        raise BadAddress(f"'{address}': not {ACCEPTED}")
    from runner.localfolder import LocalFolder

    return LocalFolder(address)


def local_output_problem(path: str) -> str | None:
    """Why `path` cannot be a command's local output (a report, a figure, a TensorBoard
    folder): a URL is never written as a local file named `s3:/...`."""
    if _URL.match(str(path)):
        return "a URL; give a path on this machine (outputs are written locally)"
    return None


# --- used by the commands as callbacks and by the readers -----------------------------------


def move_aside(address: str) -> str | None:
    return open_folder(address).move_aside()


def local_folder(address: str) -> Path:
    """A local folder holding the readable files of the job folder at `address`."""
    return open_folder(address).local_view()


@contextmanager
def cached_copies_when_unreachable(note: Callable[[str], None]) -> Iterator[None]:
    """For readers that would rather show what they read last than nothing: within it, a job
    folder in a bucket that cannot be read is read from the copy cached on this machine, if
    it has one, and `note` gets one line saying so (the reason, how many, how old)."""
    from runner.bucket.view import cached_when_unreachable

    with cached_when_unreachable() as fallback:
        try:
            yield
        finally:
            if fallback.served:
                note(fallback.note())


# --- names of moved-aside folders, the same in both kinds ------------------------------------


def aside_names(name: str) -> list[str]:
    """Names to try, in turn, for `name` moved aside now (two moves within a second)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    first = f"{name}{REPLACED}{stamp}"
    return [first] + [f"{first}-{n}" for n in range(2, 10_000)]


def is_replaced(name: str, candidate: str) -> bool:
    return re.fullmatch(re.escape(name + REPLACED) + r"\d{8}T\d{6}Z(-\d+)?",
                        candidate) is not None
