"""A worker inside a SLURM task: the ids, GPUs and CPUs SLURM gave it, the signals that make it
hand its job back, whether its launch was cancelled, and requeueing itself.

SLURM requeues a preempted job by itself, but not one stopped at its time limit: a worker
that handed its job back on the pre-time-limit signal asks for its own requeue
(`scontrol requeue`), so the array task comes back and claims again. Only a task SLURM still
counts as running is requeued: after `scancel` (or a preemption) SLURM is already ending it,
and `scontrol requeue` would undo a user's cancel.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from db import JobQueue

log = logging.getLogger("runner.slurm")

# Each asks a worker to checkpoint its job, hand it back and exit: clusters differ in what
# they send before a time limit or a preemption (`slurm submit --signal`).
HAND_BACK_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


@dataclass(frozen=True)
class SlurmTask:
    job_id: str                 # this task's own job id ($SLURM_JOB_ID)
    launch_id: str              # the array's job id, as `sbatch` printed it (else job_id)
    array_task: str | None      # $SLURM_ARRAY_TASK_ID
    restarts: int               # $SLURM_RESTART_COUNT: how often SLURM requeued it
    cpus: int | None            # the CPUs SLURM allocated to the task (cpu_allocation)
    gpus: str | None            # the GPUs SLURM allocated, as SLURM numbers them ("0", "1,3")
    cpus_from: str = ""         # where `cpus` came from, for the worker's log line

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> SlurmTask | None:
        """The task this process runs in, or None outside SLURM."""
        job_id = env.get("SLURM_JOB_ID")
        if not job_id:
            return None
        cpus, cpus_from = cpu_allocation(env)
        # SLURM_JOB_GPUS names the allocated GPUs in a batch step; SLURM_STEP_GPUS in an
        # srun step; CUDA_VISIBLE_DEVICES is what SLURM exported for either.
        gpus = (env.get("SLURM_JOB_GPUS") or env.get("SLURM_STEP_GPUS")
                or env.get("CUDA_VISIBLE_DEVICES") or None)
        return cls(job_id=job_id, launch_id=env.get("SLURM_ARRAY_JOB_ID") or job_id,
                   array_task=env.get("SLURM_ARRAY_TASK_ID"),
                   restarts=int(env.get("SLURM_RESTART_COUNT") or 0),
                   cpus=cpus, cpus_from=cpus_from, gpus=gpus)

    @property
    def array(self) -> str:
        """'ARRAYJOB_TASK' (how squeue names an array task), else the job id."""
        return f"{self.launch_id}_{self.array_task}" if self.array_task else self.job_id

    def columns(self) -> dict:
        """What the workers table records of this task."""
        return {"slurm_job_id": self.job_id, "slurm_array": self.array,
                "slurm_restarts": self.restarts, "gpus": self.gpus}

    def state(self) -> str | None:
        """This task's JobState as slurmctld sees it now (RUNNING, COMPLETING, ...)."""
        try:
            proc = subprocess.run(["scontrol", "show", "job", "-o", self.job_id],
                                  capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        for field in proc.stdout.split():
            if field.startswith("JobState="):
                return field.partition("=")[2]
        return None

    def requeue(self) -> str | None:
        """Ask SLURM to requeue this task; None when it accepted, else why not."""
        try:
            proc = subprocess.run(["scontrol", "requeue", self.job_id], capture_output=True,
                                  text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return str(e)
        if proc.returncode == 0:
            return None
        return (proc.stderr or proc.stdout).strip() or f"scontrol exited {proc.returncode}"


def cpu_allocation(env: Mapping[str, str]) -> tuple[int | None, str]:
    """The CPUs SLURM gave this task, and where that was read: $SLURM_CPUS_PER_TASK (set only
    with --cpus-per-task), else $SLURM_CPUS_ON_NODE shared by the tasks on the node, else
    the CPUs this process may run on (SLURM's cgroup or affinity). Without it torch would
    start a thread per core of the node while SLURM allocated one."""
    per_task = env.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0:
        return int(per_task), "SLURM_CPUS_PER_TASK"
    on_node = env.get("SLURM_CPUS_ON_NODE", "")
    # '2(x3)' or '2,1': the first number is this node's when the job is on one node.
    tasks = (env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
             or "1").split("(")[0].split(",")[0]
    if on_node.isdigit() and int(on_node) > 0:
        n = int(tasks) if tasks.isdigit() and int(tasks) > 0 else 1
        return max(1, int(on_node) // n), "SLURM_CPUS_ON_NODE" + (f"/{n} tasks" if n > 1 else "")
    try:
        return len(os.sched_getaffinity(0)), "CPU affinity"
    except (AttributeError, OSError):  # not on Linux
        return None, ""


def threads_line(given: int | None, task: SlurmTask | None) -> str:
    """', 4 threads (SLURM_CPUS_PER_TASK)' for the worker's first log line: the threads it
    trains with and where that number came from ('' for torch's default)."""
    if given:
        return f", {threads(given)} (--threads)"
    if task and task.cpus:
        return f", {threads(task.cpus)} ({task.cpus_from})"
    return ""


def threads(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def log_line(task: SlurmTask | None) -> str:
    """', SLURM job 123 (array 120_3, restart 1), GPUs 1' for the worker's first log line."""
    if task is None:
        return ""
    return (f", SLURM job {task.job_id} (array {task.array}, restart {task.restarts})"
            + (f", GPUs {task.gpus}" if task.gpus else ""))


def launch_cancelled(queue: JobQueue, task: SlurmTask | None) -> bool:
    """The task's launch was cancelled (`slurm cancel`) before its worker claimed: a task
    SLURM starts late (one pending between the cancel's steps, say) claims nothing."""
    if task and queue.launch_cancelled("slurm", task.launch_id):
        log.info("SLURM job %s was cancelled (python -m runner slurm cancel): not "
                 "claiming", task.launch_id)
        return True
    return False


def requeue_if_work_left(queue: JobQueue, task: SlurmTask | None) -> None:
    """A worker stopped by a signal under SLURM (a time limit near, a preemption) comes back
    while work is left. SLURM requeues a preempted task itself, but not one at its time limit;
    a task `slurm cancel` stopped stays stopped."""
    if task is None:
        return
    if queue.launch_cancelled("slurm", task.launch_id):
        log.info("SLURM job %s was cancelled: not requeueing task %s", task.launch_id,
                 task.array)
        return
    pending = queue.counts()["pending"]
    if not pending:
        log.info("no pending jobs left: not requeueing SLURM task %s", task.array)
        return
    state = task.state()
    if state != "RUNNING":  # cancelled (scancel) or preempted: SLURM decides
        log.info("SLURM task %s is %s: not requeueing it", task.array,
                 (state or "unknown").lower())
        return
    refused = task.requeue()
    if refused is None:
        log.info("%d job(s) pending: SLURM task %s requeued (it claims again when SLURM "
                 "restarts it)", pending, task.array)
    else:
        log.warning("scontrol requeue %s: %s", task.job_id, refused)
