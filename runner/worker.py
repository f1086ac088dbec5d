"""The worker loop: reclaim dead -> claim -> heartbeat -> train in-process -> finish / fail /
release.

A claimed job is run through trainer.job's small interface (the study's trainer unless the
worker is given another Job), so that this module never imports torch itself.

One worker per GPU. SIGTERM, SIGUSR1, SIGHUP or Ctrl-C asks the trainer to checkpoint and
stop; the job goes back to pending and the worker exits 0 (under SLURM, after requeueing its
task while work is left: runner.slurm.task). A second Ctrl-C
exits at once: the lease then expires (or a worker started on the same host
sees the process gone) and another worker resumes the job.

When the database goes away, training goes on: the heartbeat thread keeps trying, progress
writes are skipped, and a finish, failure or release waits until the database is back (all
within the queue's outage budget, see db/outage.py); every write stays fenced by the lease
token, so a job taken over meanwhile gets nothing from this worker. Once the budget is
spent, the job is checkpointed and the worker exits non-zero.

The job's folder (runner.jobfolders) is prepared on claim, and the job's end (finish,
failure, hand-back) is written to the queue only once the folder holds its files: one in a
bucket (s3://...) is trained in a local working copy, fetched on claim and uploaded in the
background. A folder unusable past the same budget hands the job back and stops the worker
with an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import signal
import threading
import time
import traceback

from db import Claim, DatabaseError, JobQueue, LeaseLost
from db.outage import OutageNotice
from runner.jobfolders import FolderFenced, FolderUnavailable, JobFolder, open_folder
from runner.liveness import HOST, dead_reason, process_token
from runner.ownership import ForeignFolder, claim_folder
from runner.progress import JobDisplay, duration
from runner.slurm import task as slurm_task
from runner.slurm.task import HAND_BACK_SIGNALS, SlurmTask
from trainer.device import BadDevice
from trainer.files import append_log
from trainer.job import FolderBusy, Job, JobSpec, StudyJob

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


def resolve_device(gpu: str, job: Job) -> str:
    """'cpu' or a CUDA index -> a device string the job takes; a missing GPU is an error."""
    if gpu == "cpu":
        return "cpu"
    check_gpu_syntax(gpu)
    try:
        return job.use_device(f"cuda:{gpu}")
    except BadDevice as e:
        raise BadDevice(f"--gpu {gpu}: {str(e).split(': ', 1)[1]}") from None


def check_gpu_syntax(gpu: str) -> None:
    if gpu != "cpu" and not gpu.isdigit():
        raise BadDevice(f"--gpu '{gpu}': expected a GPU index (0, 1, ...) or 'cpu'")


def check_gpu(gpu: str) -> None:
    """BadDevice unless `gpu` is 'cpu' or a GPU of this machine (none is made current)."""
    from trainer.device import check_device

    check_gpu_syntax(gpu)
    if gpu != "cpu":
        try:
            check_device(f"cuda:{gpu}")
        except BadDevice as e:
            raise BadDevice(f"--gpu {gpu}: {str(e).split(': ', 1)[1]}") from None


class JobControl:
    """What the queue says about the job this worker trains: lease lost, or a stop asked for.

    Fed by the heartbeat thread and by progress writes; sets `stop_job` so the
    trainer checkpoints and stops at its next step.
    """

    def __init__(self, claim: Claim, stop_job: threading.Event):
        self.claim, self.stop_job = claim, stop_job
        self.lost = threading.Event()
        self.request: str | None = None  # cancel or pause, as the user asked
        # The database cannot be used (outage budget spent, or a permanent error): the job
        # is checkpointed, nothing more is written, and the worker exits with this error.
        self.unusable: DatabaseError | None = None

    def database_unusable(self, error: DatabaseError) -> None:
        if self.unusable is None:
            self.unusable = error
            log.error("%s: %s; checkpointing the job and stopping", self.claim.name, error)
            job_log(self.claim, f"attempt {self.claim.attempt}: {error}; stopped with a "
                                "checkpoint, the job is left to be reclaimed")
        self.stop_job.set()

    def fenced(self, message: str) -> None:
        """The bucket refused this attempt's head write: a newer attempt owns the job."""
        if not self.lost.is_set():
            self.lost.set()
            job_log(self.claim, f"attempt {self.claim.attempt}: {message}; stopping")
        self.stop_job.set()

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
    (a lost lease ends the beats). Through a database outage a beat keeps trying, within the
    queue's outage budget; the answer after the outage says whether the lease is still held
    (the database's clock decides: a job taken over meanwhile is stopped)."""

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
        renewed = time.monotonic()
        while not self._done.wait(self.interval):
            try:
                lease = self.queue.heartbeat(self.claim, cancel=self._done)
            except DatabaseError as e:  # budget spent, or an error retrying cannot fix
                if not self._done.is_set():
                    self.control.database_unusable(e)
                return
            if not self.control(lease):
                return
            silent, renewed = time.monotonic() - renewed, time.monotonic()
            if silent > self.claim.lease_seconds:
                log.info("%s: lease still held after %s without a heartbeat (nobody took the "
                         "job over); training goes on", self.claim.name, duration(silent))


class ProgressWriter:
    """Writes a job's newest progress from a thread of its own, reporting to `control`: the
    training thread only hands it over, and never waits for the database (a slow, locked or
    silent one included). While the database is away, progress is not written."""

    def __init__(self, queue: JobQueue, control: JobControl):
        self.queue, self.control, self.claim = queue, control, control.claim
        self._latest: tuple | None = None
        self._closing = False
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._write, name="progress", daemon=True)

    def __enter__(self) -> ProgressWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        """Writes what was handed over last (the end of the job waits for that), then stops."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join()

    def post(self, step: int, loss: float | None, test: dict | None,
             peak_memory: float | None) -> None:
        with self._ready:
            self._latest = (step, loss, test, peak_memory)
            self._ready.notify()

    def _write(self) -> None:
        while True:
            with self._ready:
                while self._latest is None and not self._closing:
                    self._ready.wait()
                latest, self._latest = self._latest, None
            if latest is None:
                return
            if self.queue.outages.down_for is not None:
                continue  # the database is away: training goes on, progress waits
            try:
                lease = self.queue.progress(self.claim, *latest)
            except DatabaseError as e:  # progress is advisory: training goes on
                if self.queue.outages.down_for is None:  # not an outage (logged there)
                    log.warning("%s: progress not recorded: %s", self.claim.name, e)
                continue
            if not self.control(lease):
                return


# Each asks the worker to checkpoint its job, hand it back and exit: Ctrl-C, and what clusters
# send before a time limit or a preemption.
STOP_SIGNALS = (signal.SIGINT, *HAND_BACK_SIGNALS)


class IdleWait:
    """How long an idle worker waits between looks for work: `poll` seconds at first, twice
    as long each time nothing was found, up to half the lease (a lease that expires is
    still taken over within half a lease) or a minute, and at least `poll`; each wait drawn
    between half and all of that, so that workers that went idle together drift apart."""

    def __init__(self, poll: float, lease: float):
        self.first = poll
        self.most = max(poll, min(60.0, lease / 2))
        self.current = poll

    def next(self) -> float:
        wait = self.current * random.uniform(0.5, 1.0)
        self.current = min(self.most, self.current * 2)
        return wait

    def reset(self) -> None:
        self.current = self.first


class Worker:
    def __init__(self, queue: JobQueue, gpu: str, lease: float, order: str = "guide",
                 threads: int | None = None, progress_every: float = 30.0,
                 slurm: SlurmTask | None = None, cache_dir: str | None = None,
                 job: Job | None = None, requeue_task: bool = True):
        self.queue, self.gpu, self.lease, self.order = queue, gpu, lease, order
        self.job = job or StudyJob()  # what a claimed job is run with (trainer.job)
        # Working copies of job folders that live in a bucket (None: the user's cache
        # folder); the bucket's outage budget is the database's.
        self.cache_dir = cache_dir
        self.folder_error: FolderUnavailable | None = None  # a job folder unusable: exit 1
        self.progress_every = progress_every  # seconds between progress log lines (no terminal)
        self.slurm = slurm
        # Under SLURM, requeue the task when stopped with work left; a member of a group
        # (worker --processes) leaves that to the group, whose task it is.
        self.requeue_task = requeue_task
        self.device = resolve_device(gpu, self.job)
        self.threads_line = slurm_task.threads_line(threads, slurm)  # said in the first line
        threads = threads or (slurm.cpus if slurm else None)
        if threads:
            self.job.set_threads(threads)
        self.name = f"{HOST}:{gpu}:{os.getpid()}"
        self.stopping = threading.Event()
        self.stopped_by: str | None = None  # the signal that asked this worker to stop
        self.stop_job = threading.Event()
        self.outcomes: list[str] = []  # per job: completed, stopped, cancelled, failed, lost
        self.current: Claim | None = None  # the job being run
        queue.outages.on_outage = self.on_outage

    def on_outage(self, notice: OutageNotice) -> None:
        """Log a database outage once when it starts and once when it ends."""
        claim = self.current
        if notice.kind == "started":
            log.warning("database unreachable: %s; %sretrying for up to %s", notice.reason,
                        "training goes on, progress is not recorded meanwhile; "
                        if claim else "", duration(notice.budget))
            return
        longer = notice.seconds > self.lease
        log.warning("database back after %s%s", duration(notice.seconds),
                    f" (longer than the {self.lease:g}s lease: the job's lease is checked "
                    "before anything else is written)" if longer and claim else "")
        if claim:
            job_log(claim, f"database unreachable for {duration(notice.seconds)} "
                           f"({notice.reason}); training went on")

    def install_signal_handlers(self) -> None:
        def on_signal(signum, frame):
            if self.stopping.is_set() and signum == signal.SIGINT:
                os._exit(130)  # second Ctrl-C: now; the lease will expire
            self.stopped_by = signal.Signals(signum).name
            log.warning("%s: stopping after the current step (checkpoint, job back to pending)",
                        self.stopped_by)
            self.stopping.set()
            self.stop_job.set()

        for signum in STOP_SIGNALS:
            signal.signal(signum, on_signal)

    def run(self, max_jobs: int | None = None, wait: bool = False, poll: float = 5.0) -> int:
        """Work through the queue; returns how many jobs this worker ran."""
        # A job's slow imports (the study's torch and transformers take seconds): before
        # holding a lease, never between a claim and its first heartbeat.
        self.job.prepare()

        self.queue.register_worker(self.name, HOST, os.getpid(), process_token(os.getpid()),
                                   self.device, self.lease,
                                   self.slurm.columns() if self.slurm else None)
        log.info("worker %s on %s, lease %gs%s%s", self.name, self.device, self.lease,
                 self.threads_line, slurm_task.log_line(self.slurm))
        if slurm_task.launch_cancelled(self.queue, self.slurm):
            self.queue.worker_seen(self.name, "exited")
            return 0
        waiting_for = None
        idle = IdleWait(poll, self.lease)
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
                        self.rest(idle)
                        continue
                    held = self.queue.held_elsewhere(self.name)
                    # A SLURM array task waits out the leases of jobs others hold: its
                    # holder may be dead, and the array must not end before the sweep.
                    if not wait and not (self.slurm and held):
                        log.info("nothing left to claim%s; %d job(s) run by this worker",
                                 held_message(held, waiting=False), len(self.outcomes))
                        break
                    if [h["name"] for h in held] != waiting_for:
                        waiting_for = [h["name"] for h in held]
                        log.info("waiting for work%s", held_message(held, waiting=True))
                    self.queue.worker_seen(self.name)
                    self.rest(idle)
                    continue
                waiting_for = None
                idle.reset()
                self.outcomes.append(self.run_job(claim))
                self.queue.worker_seen(self.name)
        finally:
            with contextlib.suppress(DatabaseError):
                self.queue.worker_seen(self.name, "exited")
        if self.stopped_by and self.requeue_task:
            slurm_task.requeue_if_work_left(self.queue, self.slurm)
        return len(self.outcomes)

    @property
    def all_failed(self) -> bool:
        """Every job this worker ran failed (it ran at least one)."""
        return bool(self.outcomes) and all(o == "failed" for o in self.outcomes)

    def rest(self, idle: IdleWait) -> None:
        """Wait before looking for work again, holding no database connection meanwhile:
        hundreds of idle workers then cost the database neither connections nor more than a
        few transactions a second."""
        self.queue.engine.dispose()
        self.stopping.wait(idle.next())

    def reclaim_dead(self) -> list[tuple[str, str]]:
        """Jobs of dead workers on this host go back to pending now, not after their lease."""
        reclaimed = self.queue.reclaim_dead(HOST, dead_reason, by=self.name)
        for name, reason in reclaimed:
            log.warning("%s: reclaimed at once (%s); it resumes from its checkpoint", name,
                        reason)
        return reclaimed

    def run_job(self, claim: Claim) -> str:
        """Prepare the job's folder -> run the job -> save the folder -> the queue's outcome
        -> close the folder."""
        self.stop_job.clear()
        if self.stopping.is_set():
            self.stop_job.set()
        log.info("%s: claimed (attempt %d, from step %d)", claim.name, claim.attempt, claim.step)
        folder = open_folder(claim.out_dir)
        try:
            # Another queue's folder (its database made again, say) is never taken over
            # unasked: the job fails with the reason, it is not retried.
            claim_folder(folder, self.queue_id(), claim.name, claim.attempt, claim.step,
                         self.queue.outages.budget)
        except ForeignFolder as e:
            log.error("%s: failed: %s", claim.name, e)
            try:
                self.queue.fail(claim, str(e))
            except LeaseLost as lost:
                log.error("%s", lost)
                return "lost"
            return "failed"
        except FolderUnavailable as e:
            if folder.on_every_host:  # a bucket past its outage budget: hand back, stop
                return self._folder_unavailable(claim, e, claim.step)
            # A folder on disk that cannot hold its marker (a file in its place, no
            # permission) cannot hold the job either: the job fails on it, as it always did.
            log.warning("%s: %s", claim.name, e)
        try:
            # The trainer, and the worker's own log lines, use the local path (for a folder in
            # a bucket: a working copy, uploaded in the background).
            claim = dataclasses.replace(claim, out_dir=str(folder.prepare(
                claim.attempt, self.cache_dir, self.queue.outages.budget,
                on_fenced=lambda m: control.fenced(m))))
        except FolderFenced as e:
            log.error("%s: %s; leaving the job to its newer attempt", claim.name, e)
            return "lost"
        except FolderUnavailable as e:
            return self._folder_unavailable(claim, e, claim.step)
        self.current = claim
        last_write = 0.0
        display = JobDisplay(claim.name, claim.total_steps, claim.step, log, self.progress_every)
        control = JobControl(claim, self.stop_job)
        peak_memory = self.job.peak_memory_meter(self.device)

        progress = ProgressWriter(self.queue, control)

        def on_progress(p) -> None:
            nonlocal last_write
            display.update(p.step, p.loss)
            now = time.monotonic()
            if now - last_write >= PROGRESS_INTERVAL or p.step == p.total_steps:
                last_write = now
                progress.post(p.step, p.loss, p.test, peak_memory())

        result = error = None
        with _logs_around(display), Heartbeat(self.queue, control, self.lease / 4), progress:
            try:
                result = self.job.run(JobSpec(
                    claim.config, claim.out_dir, device=self.device, on_progress=on_progress,
                    stop=self.stop_job, echo=lambda msg: log.info("%s: %s", claim.name, msg),
                    lock_timeout=self.lease,
                    header=f"attempt {claim.attempt} by worker {self.name} on {self.device}"))
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
        if not control.lost.is_set():
            # The job's end counts only once its folder holds its final files (a stop: its
            # newest state).
            try:
                folder.save()
            except FolderFenced:
                pass  # control.lost is set
            except FolderUnavailable as e:
                if control.unusable is None:
                    step = result.step if result is not None else claim.step
                    return self._folder_unavailable(claim, e, step)
        outcome = "lost"
        try:
            outcome = self._queue_outcome(claim, control, result, error,
                                          busy=isinstance(error, FolderBusy))
        except LeaseLost as e:
            log.error("%s", e)
            job_log(claim, str(e))
        finally:
            result = error = None
            self.current = None
            self._close_folder(folder, control)
            self.job.free_memory(self.device)
        return outcome

    def queue_id(self) -> str | None:
        """The queue's identity, read once (it never changes)."""
        if not hasattr(self, "_queue_id"):
            self._queue_id = self.queue.queue_id()
        return self._queue_id

    def _queue_outcome(self, claim: Claim, control: JobControl, result, error: Exception | None,
                       busy: bool) -> str:
        """Write the attempt's end to the queue (fenced by the lease); the outcome."""
        if control.unusable is not None:
            # Checkpointed; the job stays running under this lease, to be reclaimed.
            raise control.unusable
        if control.lost.is_set():
            return "lost"  # fenced out: another worker owns the job now
        if result is None and busy:
            self.queue.release(claim, claim.step, self.why("another process holds the folder"))
            self.stopping.wait(self.lease / 4)  # let the other holder finish
            return "stopped"
        if result is None:
            self.queue.fail(claim, f"{type(error).__name__}: {error}",
                            "".join(traceback.format_exception(error)))
            return "failed"
        if result.outcome == "completed":
            self.queue.finish(claim, result.metrics)
            accuracy = result.metrics.get("accuracy")
            log.info("%s: succeeded%s", claim.name,
                     "" if accuracy is None else f", test accuracy {accuracy:.4f}")
            if control.request == "cancel":
                job_log(claim, "cancel came too late: the job had finished")
            return "completed"
        if control.request == "cancel":
            self.queue.cancelled(claim, result.step)
            log.info("%s: cancelled at step %d", claim.name, result.step)
            job_log(claim, f"job cancelled at step {result.step}")
            return "cancelled"
        self.queue.release(claim, result.step, self.why(
            "pause --now" if control.request == "pause" else None))
        log.info("%s: back to pending at step %d", claim.name, result.step)
        job_log(claim, f"job back to pending at step {result.step}")
        return "stopped"

    def _close_folder(self, folder: JobFolder, control: JobControl) -> None:
        """The attempt is over: its last log lines are kept too (best effort), then the
        working copy of a folder in a bucket goes."""
        try:
            folder.close(fenced=control.lost.is_set())
        except FolderUnavailable as e:
            log.warning("%s: the job log's last lines were not uploaded: %s",
                        control.claim.name, e)

    def _folder_unavailable(self, claim: Claim, error: FolderUnavailable, step: int) -> str:
        """The job's folder cannot be used (a bucket past the outage budget, permission
        lost): the job goes back to pending (its newest saved state is where it resumes) and
        the worker stops with an error."""
        log.error("%s: %s; job handed back, worker stopping", claim.name, error)
        self.folder_error, self.current = error, None
        self.stopping.set()
        with contextlib.suppress(LeaseLost):
            self.queue.release(claim, step, self.why(f"job folder unusable: {error}"))
        return "stopped"

    def why(self, reason: str | None) -> dict:
        """Why a job is handed back, for its release event: the reason given, else the signal
        that stopped the worker (a preemption, a time limit, scancel, Ctrl-C), else the
        database gone (checkpointed before the budget ran out); and the SLURM task."""
        reason = (reason or (f"signal {self.stopped_by}" if self.stopped_by else None)
                  or "stopped")
        return {"reason": reason, **({"slurm_task": self.slurm.array}
                                     if self.slurm and self.slurm.array else {})}


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
