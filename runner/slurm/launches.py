"""`slurm status` and `slurm cancel`: the launches the queue recorded, beside what squeue and
sacct say of their tasks and what the workers table says of their workers."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator

from db import JobQueue
from runner.slurm import array
from runner.slurm.array import Refused
from runner.status import judge_workers

NO_LAUNCHES = "no SLURM launches recorded for this queue (python -m runner slurm submit)"


def status(queue: JobQueue, note: Callable[[str], None]) -> list[str]:
    """The lines of `slurm status`; `note` hears that squeue or sacct could not be asked."""
    launches = queue.launches("slurm")
    if not launches:
        return [NO_LAUNCHES]
    try:
        found = array.tasks([la["job_id"] for la in launches])
    except array.SlurmError as e:
        found = {}
        note(f"({e}; showing the queue's records only)")
    # The liveness `status` judges by: a worker of this host whose process is gone is dead,
    # however recently it was seen.
    return describe(launches, found, judge_workers(queue.workers()))


def describe(launches: list[dict], found: dict[str, list[dict]],
             workers: list[dict]) -> list[str]:
    """Per launch: its record, then per task what SLURM says (`found`, as array.tasks gives
    it) and its newest worker (rows of the workers table, oldest first)."""
    by_task = collections.defaultdict(list)
    for w in workers:
        if w["slurm_array"]:
            by_task[w["slurm_array"]].append(w)
    lines = []
    for la in launches:
        cancelled = (f", cancelled {_clock(la['cancelled_at'])}" if la["cancelled_at"]
                     else "")
        lines.append(f"SLURM job {la['job_id']}: {la['tasks']} task(s), submitted "
                     f"{_clock(la['at'])}{cancelled}; {array.describe_detail(la['detail'])}")
        lines.append(f"  script {la['script']}")
        tasks = {t["task"]: t for t in found.get(la["job_id"], [])}
        names = sorted(set(tasks) | {a for a in by_task if a.split("_")[0] == la["job_id"]},
                       key=lambda a: int(a.rpartition("_")[2] or 0))
        for name in names:
            lines.append(f"  task {name}: {_where(tasks.get(name))}; "
                         f"{_who(by_task[name][-1] if by_task.get(name) else None)}")
    return lines


def _clock(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _where(task: dict | None) -> str:
    return f"{task['state'].lower()} {task['time']} ({task['reason']})" if task else \
        "in neither squeue nor sacct (SLURM forgot it)"


def _who(worker: dict | None) -> str:
    if worker is None:
        return "no worker yet"
    life = ("live" if worker["alive"] else f"dead: {worker['dead']}" if worker.get("dead")
            else worker["state"])
    return (f"worker {worker['name']} ({life}"
            f", GPUs {worker['gpus'] or '-'}, restarts {worker['slurm_restarts']}"
            + (f", job {worker['job']}" if worker["job"] else "") + ")")


def cancel(queue: JobQueue, job_ids: tuple[str, ...], sig: str, grace: float) -> Iterator[str]:
    """Stop the given launches (none given: every one not cancelled yet) without losing
    work, a line for each as it is done. Launch ids not of this queue are refused before
    anything is cancelled; a launch that has ended is only said to have; one SLURM cannot
    cancel raises array.SlurmError."""
    known = {la["job_id"]: la for la in queue.launches("slurm")}
    for job_id in job_ids:
        if job_id not in known:
            raise Refused(f"SLURM job {job_id} is not a launch of this queue "
                          f"(known: {', '.join(known) or 'none'})")
    chosen = list(job_ids) or [j for j, la in known.items() if not la["cancelled_at"]]
    if not chosen:
        yield "no SLURM launch left to cancel"
        return
    for job_id in chosen:
        if not array.live_tasks(job_id):  # left as it ended: not marked cancelled
            yield f"SLURM job {job_id} had ended already: nothing to cancel"
            continue
        queue.cancel_launch("slurm", job_id)  # first: a stopped worker must not requeue
        done = array.cancel(job_id, sig, grace)
        per_task = (known[job_id]["detail"] or {}).get("workers_per_task", 1)
        running = (f"{done['signalled']} running task(s) of {per_task} workers"
                   if per_task > 1 else f"{done['signalled']} running worker(s)")
        yield (f"SLURM job {job_id} cancelled: {running} "
               "signalled to hand their jobs back" + (
                   f", {done['killed']} still running after {grace:g}s and killed (their "
                   "jobs resume from their last checkpoints)" if done["killed"] else ""))
