"""The worker loop: reclaim dead -> claim -> heartbeat -> train in-process -> finish / fail /
release.

One worker per GPU. SIGTERM or Ctrl-C asks the trainer to checkpoint and
stop; the job goes back to pending and the worker exits 0. A second Ctrl-C
exits at once: the lease then expires (or a worker started on the same host
sees the process gone) and another worker resumes the job.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import threading
import time
import traceback

from db import Claim, DatabaseError, JobQueue, LeaseLost
from runner.liveness import HOST, dead_reason, process_token
from runner.progress import JobDisplay, duration
from trainer.device import BadDevice, check_device
from trainer.files import append_log

log = logging.getLogger("runner.worker")

PROGRESS_INTERVAL = 1.0  # seconds between progress writes: status stays live, DB stays calm


def job_log(claim: Claim, message: str) -> None:
    """Append the worker's own lines about a job to the job's log.

    Best effort: a folder that cannot be written (the job failed because of
    it, say) only loses these lines.
    """
    try:
        append_log(claim.out_dir, message, prefix=f"[worker {claim.worker}] ")
    except OSError as e:
        log.debug("%s: cannot write its log: %s", claim.name, e)


def resolve_device(gpu: str) -> str:
    """'cpu' or a CUDA index -> a torch device string; a missing GPU is an error."""
    if gpu == "cpu":
        return "cpu"
    if not gpu.isdigit():
        raise BadDevice(f"--gpu '{gpu}': expected a GPU index (0, 1, ...) or 'cpu'")
    try:
        device = check_device(f"cuda:{gpu}")
    except BadDevice as e:
        raise BadDevice(f"--gpu {gpu}: {str(e).split(': ', 1)[1]}") from None
    import torch

    torch.cuda.set_device(device)
    return device


class JobControl:
    """What the queue says about the job this worker trains: lease lost, or a stop asked for.

    Fed by the heartbeat thread and by progress writes; sets `stop_job` so the
    trainer checkpoints and stops at its next step.
    """

    def __init__(self, claim: Claim, stop_job: threading.Event):
        self.claim, self.stop_job = claim, stop_job
        self.lost = threading.Event()
        self.request: str | None = None  # cancel or pause, as the user asked

    def __call__(self, lease) -> bool:
        """Act on a heartbeat's or progress write's answer; False once the lease is lost."""
        if not lease.held:
            if not self.lost.is_set():
                self.lost.set()
                log.error("%s: lease lost (taken over); stopping this attempt", self.claim.name)
                job_log(self.claim, f"lease lost on attempt {self.claim.attempt} (another "
                                    "worker took the job over); stopping this attempt")
            self.stop_job.set()
            return False
        if lease.stop and self.request is None:
            self.request = lease.stop
            log.warning("%s: %s asked; stopping after this step", self.claim.name, lease.stop)
            job_log(self.claim, f"{lease.stop} asked; stopping after this step")
            self.stop_job.set()
        return True


class Heartbeat:
    """Renews a claim's lease from a thread every `interval` seconds, reporting to `control`
    (a lost lease ends the beats)."""

    def __init__(self, queue: JobQueue, control: JobControl, interval: float):
        self.queue, self.control, self.interval = queue, control, interval
        self.claim = control.claim
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._done.wait(self.interval):
            try:
                lease = self.queue.heartbeat(self.claim)
            except DatabaseError as e:  # transient: try again next beat
                log.warning("%s: heartbeat failed: %s", self.claim.name, e)
                continue
            if not self.control(lease):
                return


class Worker:
    def __init__(self, queue: JobQueue, gpu: str, lease: float, order: str = "guide",
                 threads: int | None = None, progress_every: float = 30.0):
        self.queue, self.gpu, self.lease, self.order = queue, gpu, lease, order
        self.progress_every = progress_every  # seconds between progress log lines (no terminal)
        self.device = resolve_device(gpu)
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.name = f"{HOST}:{gpu}:{os.getpid()}"
        self.stopping = threading.Event()
        self.stop_job = threading.Event()
        self.outcomes: list[str] = []  # per job: completed, stopped, cancelled, failed, lost

    def install_signal_handlers(self) -> None:
        def on_signal(signum, frame):
            if self.stopping.is_set() and signum == signal.SIGINT:
                os._exit(130)  # second Ctrl-C: now; the lease will expire
            log.warning("%s: stopping after the current step (checkpoint, job back to pending)",
                        signal.Signals(signum).name)
            self.stopping.set()
            self.stop_job.set()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    def run(self, max_jobs: int | None = None, wait: bool = False, poll: float = 5.0) -> int:
        """Work through the queue; returns how many jobs this worker ran."""
        # torch and transformers take seconds to import: do it before holding a
        # lease, never between a claim and its first heartbeat.
        import trainer.train  # noqa: F401

        self.queue.register_worker(self.name, HOST, os.getpid(), process_token(os.getpid()),
                                   self.device, self.lease)
        log.info("worker %s on %s, lease %gs", self.name, self.device, self.lease)
        waiting_for = None
        try:
            self.reclaim_dead()
            while not self.stopping.is_set() and (max_jobs is None or len(self.outcomes)
                                                  < max_jobs):
                claim = self.queue.claim(self.name, self.lease, self.order)
                if claim is None and self.reclaim_dead():
                    continue
                if claim is None:
                    if self.queue.paused() is not None:
                        if not wait:
                            log.info("the queue is paused (python -m runner resume); %d job(s) "
                                     "run by this worker", len(self.outcomes))
                            break
                        if waiting_for != "paused":
                            waiting_for = "paused"
                            log.info("the queue is paused: waiting for `python -m runner "
                                     "resume`")
                        self.queue.worker_seen(self.name)
                        self.stopping.wait(poll)
                        continue
                    held = self.queue.held_elsewhere(self.name)
                    if not wait:
                        log.info("nothing left to claim%s; %d job(s) run by this worker",
                                 held_message(held, waiting=False), len(self.outcomes))
                        break
                    if [h["name"] for h in held] != waiting_for:
                        waiting_for = [h["name"] for h in held]
                        log.info("waiting for work%s", held_message(held, waiting=True))
                    self.queue.worker_seen(self.name)
                    self.stopping.wait(poll)
                    continue
                waiting_for = None
                self.outcomes.append(self.run_job(claim))
                self.queue.worker_seen(self.name)
        finally:
            with contextlib.suppress(DatabaseError):
                self.queue.worker_seen(self.name, "exited")
        return len(self.outcomes)

    @property
    def all_failed(self) -> bool:
        """Every job this worker ran failed (it ran at least one)."""
        return bool(self.outcomes) and all(o == "failed" for o in self.outcomes)

    def reclaim_dead(self) -> list[tuple[str, str]]:
        """Jobs of dead workers on this host go back to pending now, not after their lease."""
        reclaimed = self.queue.reclaim_dead(HOST, dead_reason, by=self.name)
        for name, reason in reclaimed:
            log.warning("%s: reclaimed at once (%s); it resumes from its checkpoint", name,
                        reason)
        return reclaimed

    def run_job(self, claim: Claim) -> str:
        from trainer.train import FolderBusy, run  # torch loads only in workers

        self.stop_job.clear()
        if self.stopping.is_set():
            self.stop_job.set()
        log.info("%s: claimed (attempt %d, from step %d)", claim.name, claim.attempt, claim.step)
        last_write = 0.0
        display = JobDisplay(claim.name, claim.total_steps, claim.step, log, self.progress_every)
        control = JobControl(claim, self.stop_job)
        peak_memory = self._peak_memory_meter()

        def on_progress(p) -> None:
            nonlocal last_write
            display.update(p.step, p.loss)
            now = time.monotonic()
            if now - last_write >= PROGRESS_INTERVAL or p.step == p.total_steps:
                last_write = now
                try:
                    control(self.queue.progress(claim, p.step, p.loss, p.test, peak_memory()))
                except DatabaseError as e:  # progress is advisory: training goes on
                    log.warning("%s: progress not recorded: %s", claim.name, e)

        result = error = None
        with _logs_around(display), Heartbeat(self.queue, control, self.lease / 4):
            try:
                result = run(
                    claim.config, claim.out_dir, device=self.device, on_progress=on_progress,
                    stop=self.stop_job, echo=lambda msg: log.info("%s: %s", claim.name, msg),
                    lock_timeout=self.lease,
                    header=f"attempt {claim.attempt} by worker {self.name} on {self.device}")
            except FolderBusy as e:
                error = e
                log.warning("%s: %s; handing the job back", claim.name, e)
                job_log(claim, f"attempt {claim.attempt}: {e}; job handed back")
            except Exception as e:  # this job failed; the worker goes on
                error = e
                log.error("%s: failed: %s: %s", claim.name, type(e).__name__, e)
                job_log(claim, f"attempt {claim.attempt} failed:\n"
                        + "".join(traceback.format_exception(e)))
            finally:
                display.close()
        outcome = "lost"
        try:
            if control.lost.is_set():
                pass  # fenced out: another worker owns the job now
            elif result is None and isinstance(error, FolderBusy):
                self.queue.release(claim, claim.step)
                outcome = "stopped"
                self.stopping.wait(self.lease / 4)  # let the other holder finish
            elif result is None:
                self.queue.fail(claim, f"{type(error).__name__}: {error}",
                                "".join(traceback.format_exception(error)))
                outcome = "failed"
            elif result.outcome == "completed":
                self.queue.finish(claim, result.metrics)
                outcome = "completed"
                log.info("%s: succeeded, test accuracy %.4f", claim.name,
                         result.metrics["accuracy"])
            elif control.request == "cancel":
                self.queue.cancelled(claim, result.step)
                outcome = "cancelled"
                log.info("%s: cancelled at step %d", claim.name, result.step)
                job_log(claim, f"job cancelled at step {result.step}")
            else:
                self.queue.release(claim, result.step)
                outcome = "stopped"
                log.info("%s: back to pending at step %d", claim.name, result.step)
                job_log(claim, f"job back to pending at step {result.step}")
        except LeaseLost as e:
            log.error("%s", e)
            job_log(claim, str(e))
        finally:
            result = error = None
            self._free_memory()
        return outcome

    def _peak_memory_meter(self):
        """A function giving the GPU's peak memory (bytes) since now; None on the CPU."""
        if not self.device.startswith("cuda"):
            return lambda: None
        import torch

        torch.cuda.reset_peak_memory_stats(self.device)
        return lambda: float(torch.cuda.max_memory_allocated(self.device))

    def _free_memory(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def held_message(held: list[dict], waiting: bool) -> str:
    """': 3 jobs held by other workers; earliest lease expiry in 42s (NAME, WORKER); ...'."""
    if not held:
        return ""
    first = min(held, key=lambda h: h["expires_in"])
    text = (f": {len(held)} job(s) held by other workers; earliest lease expiry in "
            f"{duration(first['expires_in'])} ({first['name']}, worker {first['worker']})")
    return text if waiting else text + "; use --wait to wait for them"


def _logs_around(display: JobDisplay):
    """While a progress bar is drawn, log lines are printed above it, not through it."""
    if display.bar is None:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()
