"""A job folder in a bucket: attempt-keyed objects and a fenced head.

Each attempt uploads under a prefix of its own (`a0007/state/state-0000100.pt`), so two
attempts never write the same object. `head.json` says which objects make up the folder now:
{"attempt": N, "files": {path in the folder: key under the job's prefix}}. Only the attempt
named there may change it, and only by a conditional write on the ETag it read; a new attempt
takes the head over when it claims the job, so a fenced-out worker (a zombie after a network
cut) finds its write refused and whatever it uploads late is never read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from runner.bucket.s3 import Conflict, S3Path, get, put, sizes
from runner.jobfolders import FolderFenced

HEAD = "head.json"


class Fenced(Conflict, FolderFenced):
    """A newer attempt owns the job folder: this one must not write it."""


@dataclass
class Head:
    attempt: int = 0
    files: dict[str, str] = field(default_factory=dict)
    etag: str | None = None  # None: no head yet


def read_head(job: S3Path) -> Head:
    found = get(job.join(HEAD))
    if found is None:
        return Head()
    data, etag = found
    body = json.loads(data)
    return Head(int(body["attempt"]), dict(body["files"]), etag)


def write_head(job: S3Path, head: Head, attempt: int, files: dict[str, str]) -> Head:
    """Replace `head` (as read) by this attempt's; Conflict when it changed meanwhile."""
    body = json.dumps({"attempt": attempt, "files": dict(sorted(files.items()))},
                      indent=1).encode()
    etag = put(job.join(HEAD), body, if_match=head.etag, if_absent=head.etag is None)
    return Head(attempt, dict(files), etag)


def take_over(job: S3Path, attempt: int) -> Head:
    """Make `attempt` the head's owner, keeping its files; Fenced if a newer one owns it."""
    head = read_head(job)
    if head.attempt == attempt:  # our own write, retried after its answer was lost
        return head
    if head.attempt > attempt:
        raise Fenced(f"{job.url}: attempt {head.attempt} owns the folder, not {attempt}")
    try:
        return write_head(job, head, attempt, head.files)
    except Conflict:
        newer = read_head(job)
        raise Fenced(f"{job.url}: attempt {newer.attempt} took the folder over, "
                     f"not {attempt}") from None


def attempt_key(attempt: int, relative: str) -> str:
    """Where `attempt` uploads the folder's file `relative`."""
    return f"a{attempt:04d}/{relative}"


def attempt_of(relative_key: str) -> int | None:
    """The attempt that uploaded `relative_key` ('a0007/...' -> 7); None for the head."""
    found = re.fullmatch(r"a(\d{4,})/.+", relative_key)
    return int(found.group(1)) if found else None


def unreferenced(job: S3Path) -> tuple[Head, dict[str, int]]:
    """The head, and the objects no head can name again (relative key -> bytes): those of
    attempts older than the head's owner that it does not name, i.e. a fenced-out attempt's
    late uploads, or uploads a killed attempt left without a head naming them; and the
    owner's own states that it does not name, older than the newest state it names (one
    that went up while the trainer pruned it, during an outage say, and lost its partner).

    Safe while workers run: a head's owner names only keys its head already names or keys
    of its own, and only newer attempts take a head over, so an older attempt's key that the
    head does not name now is never named again. The owner's trainer only moves forward and
    each head it writes names every whole state it holds, so an unnamed state of its own
    older than one it named is never named again; a newer one may be in flight. The objects
    are listed before the head is read: one uploaded after the listing is not judged."""
    objects = sizes(job)
    head = read_head(job)
    named = set(head.files.values())
    own_steps = [_state_step(key) for key in named if attempt_of(key) == head.attempt]
    newest_own = max((step for step in own_steps if step is not None), default=None)
    stale = {}
    for key, size in objects.items():
        relative = key[len(job.key) + 1:]
        attempt = attempt_of(relative)
        if attempt is None or relative in named:
            continue
        step = _state_step(relative)
        if attempt < head.attempt or (attempt == head.attempt and step is not None
                                      and newest_own is not None and step < newest_own):
            stale[relative] = size
    return head, stale


def _state_step(relative_key: str) -> int | None:
    """The step of an attempt's state file or manifest ('a0007/state/state-0000100.pt' ->
    100); None for any other object."""
    found = re.fullmatch(r"a\d{4,}/state/state-(\d+)\.(pt|json)", relative_key)
    return int(found.group(1)) if found else None
