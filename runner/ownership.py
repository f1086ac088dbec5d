"""Which queue a job folder belongs to: its marker (runner.jobfolders.MARKER).

A worker writes the marker, {"queue": <queue id>, "job": <job name>}, when it prepares a
folder for a claim and none is there yet. A queue never takes another queue's folder over
unasked: the planner refuses new jobs whose folders hold another queue's marker, or a job's
files with no marker at all (a queue from before markers, a stray run), unless planned with
--adopt-folders; a worker that still meets such a folder fails the job with the reason.
"""

from __future__ import annotations

from runner.jobfolders import EMPTY, UNMARKED, JobFolder

WAYS_OUT = "plan into another --out-root, or plan --adopt-folders to take them over"


class ForeignFolder(Exception):
    """The job's folder belongs to another queue (or to no queue); the message is one line."""


def marker(queue_id: str, job: str) -> dict:
    return {"queue": queue_id, "job": job}


def is_foreign(found: dict | str, queue_id: str | None) -> bool:
    """Whether a folder as `survey` found it is not this queue's to use."""
    if found == EMPTY:
        return False
    if found == UNMARKED:
        return True
    return not isinstance(found, dict) or found.get("queue") != queue_id


def why_foreign(address: str, found: dict | str) -> str:
    if found == UNMARKED:
        return (f"job folder {address} holds a job's files but no queue marker (left by "
                f"another queue or run)")
    owner = found.get("queue") if isinstance(found, dict) else None
    return f"job folder {address} belongs to another queue (id {owner})"


def claim_folder(folder: JobFolder, queue_id: str | None, job: str, attempt: int,
                 step: int = 0, budget: float = 0.0) -> None:
    """Before an attempt uses the folder: ForeignFolder if it is another queue's, else its
    marker is written if it has none. A bucket's transient errors are retried for `budget`
    seconds (FolderUnavailable past it).

    A folder with a job's files but no marker is this queue's only once the queue knows the
    job ran (a later attempt, or progress recorded: a queue planned before markers, its
    folder made by an earlier attempt); on a first attempt from step 0 the files are someone
    else's: planned with --adopt-folders, the folder would carry this queue's marker."""
    if queue_id is None:  # a database from before queues had an identity: nothing to compare
        return
    for _ in range(2):  # a second look when another worker wrote the marker meanwhile
        found = folder.read_marker(budget)
        if found is None:
            if attempt <= 1 and step == 0 and folder.holds_job_files(budget):
                raise ForeignFolder(f"{why_foreign(folder.address, UNMARKED)}: {WAYS_OUT}")
            if folder.write_marker(marker(queue_id, job), budget=budget):
                return
            continue
        if is_foreign(found, queue_id):
            raise ForeignFolder(f"{why_foreign(folder.address, found)}: {WAYS_OUT}")
        return


def foreign_folders(root: JobFolder, addresses: list[str],
                    queue_id: str | None) -> dict[str, dict | str]:
    """The folders among `addresses` (new jobs' folders under the out-root `root`) that hold
    another queue's marker, or a job's files and no marker: address -> what was found."""
    if not addresses:
        return {}
    return {address: found for address, found in root.survey(addresses).items()
            if is_foreign(found, queue_id)}


def refusal(foreign: dict[str, dict | str]) -> str:
    """plan's one line for new jobs whose folders are not this queue's."""
    address, found = next(iter(foreign.items()))
    return (f"{len(foreign)} new job(s) have folders that are not this queue's, e.g. "
            f"{why_foreign(address, found)}; nothing planned: {WAYS_OUT} (workers then "
            "resume from their states where the config matches)")
