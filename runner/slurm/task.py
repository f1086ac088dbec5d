"""A worker inside a SLURM task: the ids, GPUs and CPUs SLURM gave it, and requeueing itself.

SLURM requeues a preempted job by itself, but not one stopped at its time limit: a worker
that handed its job back on the pre-time-limit signal asks for its own requeue
(`scontrol requeue`), so the array task comes back and claims again. Only a task SLURM still
counts as running is requeued: after `scancel` (or a preemption) SLURM is already ending it,
and `scontrol requeue` would undo a user's cancel.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class SlurmTask:
    job_id: str                 # this task's own job id ($SLURM_JOB_ID)
    launch_id: str              # the array's job id, as `sbatch` printed it (else job_id)
    array_task: str | None      # $SLURM_ARRAY_TASK_ID
    restarts: int               # $SLURM_RESTART_COUNT: how often SLURM requeued it
    cpus: int | None            # $SLURM_CPUS_PER_TASK
    gpus: str | None            # the GPUs SLURM allocated, as SLURM numbers them ("0", "1,3")

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> SlurmTask | None:
        """The task this process runs in, or None outside SLURM."""
        job_id = env.get("SLURM_JOB_ID")
        if not job_id:
            return None
        cpus = env.get("SLURM_CPUS_PER_TASK", "")
        # SLURM_JOB_GPUS names the allocated GPUs in a batch step; SLURM_STEP_GPUS in an
        # srun step; CUDA_VISIBLE_DEVICES is what SLURM exported for either.
        gpus = (env.get("SLURM_JOB_GPUS") or env.get("SLURM_STEP_GPUS")
                or env.get("CUDA_VISIBLE_DEVICES") or None)
        return cls(job_id=job_id, launch_id=env.get("SLURM_ARRAY_JOB_ID") or job_id,
                   array_task=env.get("SLURM_ARRAY_TASK_ID"),
                   restarts=int(env.get("SLURM_RESTART_COUNT") or 0),
                   cpus=int(cpus) if cpus.isdigit() else None, gpus=gpus)

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
