"""What a job is to the runner: one call that trains it into its folder, and the few device
hooks a worker needs. No torch here: a worker imports it only when it runs a study job.

A worker (runner/worker.py) claims a job and hands it to a `Job`; it knows nothing of what
the job computes. The study's trainer, `StudyJob` (trainer.train.run), is the one real job;
tests and benchmarks pass a stand-in (`Worker(..., job=...)`), a subclass of `Job` that
implements `run` and keeps the CPU-only hooks.

What a job receives, `Job.run(JobSpec)`: the job's config as the queue holds it (a dict);
its local folder, where it keeps everything it needs to resume (a bucket's working copy is
local already); the device `use_device` named; `on_progress`, `stop` and `echo`; how long
to wait for another process to leave the folder (`lock_timeout`); a `header` line for the
folder's log (which attempt, which worker).

What it may report: `on_progress(Progress(...))` after a step (steps done, total, loss,
train accuracy, the newest test metrics or None); the worker writes the newest to the queue
about once a second and draws its progress bar from it. `echo(line)`: a line the worker logs
under the job's name.

How it is told to stop: `stop` is set (a signal, the lease lost, pause or cancel asked, the
database gone). The job saves its state at the next step boundary and returns "stopped";
called again on the same folder, in this process or another, it goes on from there.

What it returns: `RunResult("completed", step, metrics)`, whose metrics the queue records
(accuracy, balanced_accuracy and majority_rate in the row, all of them in the finish
event), or `RunResult("stopped", step)`, the step it resumes from.

What it raises: `FolderBusy` when another process holds the folder past `lock_timeout`:
the worker hands the job back untouched. Anything else: the job failed (the queue keeps the
message and traceback; the attempt counts).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from trainer.device import BadDevice


class FolderBusy(RuntimeError):
    """Another process is training into the same job folder."""


@dataclass
class Progress:
    step: int            # steps completed
    total_steps: int
    loss: float
    train_accuracy: float
    test: dict | None = None   # the newest evaluation's metrics, if any yet


@dataclass
class RunResult:
    outcome: str         # "completed" or "stopped"
    step: int            # steps completed
    metrics: dict = field(default_factory=dict)   # final evaluation when completed


@dataclass(frozen=True)
class JobSpec:
    """One attempt at a job, as a worker hands it over."""

    config: dict
    folder: str
    device: str = "cpu"
    on_progress: Callable[[Progress], None] | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    echo: Callable[[str], None] | None = None
    lock_timeout: float = 0
    header: str | None = None


class Job:
    """A kind of job a worker runs. Subclasses implement `run`; the hooks below fit a job
    that needs neither torch nor a GPU."""

    def prepare(self) -> None:
        """Slow imports, done once before the first claim: never on a held lease."""

    def use_device(self, device: str) -> str:
        """Make `device` ('cuda:N') this process's device; its canonical name. BadDevice
        when it cannot be used. Only called for a GPU: 'cpu' needs nothing."""
        raise BadDevice(f"device '{device}': this job runs on the CPU only")

    def set_threads(self, threads: int) -> None:
        """Use at most `threads` CPU threads."""

    def peak_memory_meter(self, device: str) -> Callable[[], float | None]:
        """A function giving the device's peak memory (bytes) since now; None on the CPU."""
        return lambda: None

    def free_memory(self, device: str) -> None:
        """Give back what the last job held, before the next one starts."""
        gc.collect()

    def run(self, spec: JobSpec) -> RunResult:
        raise NotImplementedError


class StudyJob(Job):
    """The study's trainer (trainer.train.run); torch loads in `prepare`."""

    def prepare(self) -> None:
        import trainer.train  # noqa: F401  (torch and transformers take seconds)

    def use_device(self, device: str) -> str:
        from trainer.device import check_device

        device = check_device(device)
        import torch

        torch.cuda.set_device(device)
        return device

    def set_threads(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)

    def peak_memory_meter(self, device: str) -> Callable[[], float | None]:
        if not device.startswith("cuda"):
            return lambda: None
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return lambda: float(torch.cuda.max_memory_allocated(device))

    def free_memory(self, device: str) -> None:
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def run(self, spec: JobSpec) -> RunResult:
        from trainer.train import run

        return run(spec.config, spec.folder, device=spec.device, on_progress=spec.on_progress,
                   stop=spec.stop, echo=spec.echo, lock_timeout=spec.lock_timeout,
                   header=spec.header)
