"""The real worker loop (runner.worker.Worker.run) in this process, on a real queue, with a
stand-in job (trainer.job.Job): what the queue holds after each way a job can end, in
seconds and without torch."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from runner.slurm.task import SlurmTask
from runner.worker import Worker
from tests.support.commands import PYTHON, ROOT
from tests.support.standin import METRICS, STEP_FILE, StandIn, row
from trainer.device import BadDevice
from trainer.files import LOG_FILE
from trainer.job import FolderBusy


def only_job(queue) -> dict:
    (job,) = queue.jobs()
    return job


def details(queue, kind: str) -> list[dict]:
    return [json.loads(e["detail"]) if e["detail"] else None for e in queue.events()
            if e["kind"] == kind]


def test_a_job_succeeds_with_the_jobs_metrics_in_its_row(queue, tmp_path):
    queue.plan([row("a", tmp_path / "a")])
    job = StandIn()
    worker = Worker(queue, "cpu", 30, job=job)
    assert worker.run() == 1
    assert worker.outcomes == ["completed"]
    got = only_job(queue)
    assert (got["state"], got["step"], got["attempts"], got["error"]) == ("succeeded", 5, 1, None)
    assert (got["test_accuracy"], got["balanced_accuracy"], got["majority_rate"]) == (
        0.75, 0.625, 0.5)
    assert details(queue, "finish") == [METRICS]
    assert (tmp_path / "a" / STEP_FILE).read_text() == "5"
    (spec,) = job.specs
    assert (spec.config, spec.folder, spec.device, spec.lock_timeout) == (
        {"steps": 5}, str(tmp_path / "a"), "cpu", 30)
    assert spec.header == f"attempt 1 by worker {worker.name} on cpu"


def test_a_job_that_raises_fails_with_its_error_and_the_attempt_counts(queue, tmp_path):
    def at_step(step):
        if step == 3:
            raise RuntimeError("no more data at step 3")

    queue.plan([row("a", tmp_path / "a")])
    worker = Worker(queue, "cpu", 30, job=StandIn(at_step))
    assert worker.run() == 1
    assert worker.outcomes == ["failed"] and worker.all_failed
    got = only_job(queue)
    assert (got["state"], got["attempts"]) == ("failed", 1)
    assert got["error"] == "RuntimeError: no more data at step 3"
    assert "in at_step" in got["traceback"]
    assert details(queue, "fail") == [{"error": "RuntimeError: no more data at step 3"}]
    assert "attempt 1 failed:" in (tmp_path / "a" / LOG_FILE).read_text()


def test_a_stop_mid_job_hands_it_back_at_the_reported_step_and_it_resumes_there(queue,
                                                                               tmp_path):
    def at_step(step):
        if step == 3:  # what a SIGTERM does (Worker.install_signal_handlers)
            worker.stopped_by = "SIGTERM"
            worker.stopping.set()
            worker.stop_job.set()

    queue.plan([row("a", tmp_path / "a")])
    worker = Worker(queue, "cpu", 30, job=StandIn(at_step))
    assert worker.run() == 1
    assert worker.outcomes == ["stopped"]
    got = only_job(queue)
    assert (got["state"], got["step"], got["attempts"]) == ("pending", 3, 0)
    assert details(queue, "release") == [{"step": 3, "reason": "signal SIGTERM"}]
    assert "job back to pending at step 3" in (tmp_path / "a" / LOG_FILE).read_text()

    heir = StandIn()
    assert Worker(queue, "cpu", 30, job=heir).run() == 1
    assert heir.starts == [3]
    assert [d["step"] for d in details(queue, "claim")] == [0, 3]
    got = only_job(queue)
    assert (got["state"], got["step"], got["attempts"]) == ("succeeded", 5, 1)


def test_progress_reaches_the_queue_while_the_job_runs(queue, tmp_path):
    seen = []

    def at_step(step):
        if step == 2:  # step 1 was reported: the worker writes the first report at once
            deadline = time.monotonic() + 10
            while only_job(queue)["step"] != 1:
                assert time.monotonic() < deadline, "step 1 never reached the queue"
                time.sleep(0.02)
            seen.append(only_job(queue))

    queue.plan([row("a", tmp_path / "a")])
    assert Worker(queue, "cpu", 30, job=StandIn(at_step)).run() == 1
    (running,) = seen
    assert (running["state"], running["step"], running["loss"]) == ("running", 1, 1.0)
    assert running["test_accuracy"] == 0.1
    assert only_job(queue)["state"] == "succeeded"


@pytest.mark.parametrize("ask, state, outcome", [("pause", "pending", "stopped"),
                                                 ("cancel", "cancelled", "cancelled")])
def test_a_stop_asked_through_the_queue_reaches_the_job(queue, tmp_path, ask, state, outcome):
    """The answer to a progress write carries the request; the job stops at its next step."""
    def at_step(step):
        if step == 2 and ask == "pause":
            queue.pause(now=True)
        elif step == 2:
            queue.cancel(["a"])

    queue.plan([row("a", tmp_path / "a", steps=100)])
    # A worker of a SLURM array task: the release says which task handed the job back.
    task = SlurmTask.from_environ({"SLURM_JOB_ID": "123", "SLURM_ARRAY_JOB_ID": "120",
                                   "SLURM_ARRAY_TASK_ID": "3", "SLURM_CPUS_PER_TASK": "1"})
    worker = Worker(queue, "cpu", 30, slurm=task,
                    job=StandIn(at_step, seconds_per_step=0.05))
    assert worker.run() == 1
    assert worker.outcomes == [outcome]
    got = only_job(queue)
    stopped_at = int((tmp_path / "a" / STEP_FILE).read_text())
    assert 2 <= stopped_at < 100  # asked before step 2; the answer to a write carries it
    assert (got["state"], got["step"], got["attempts"]) == (state, stopped_at, 0)
    if ask == "pause":
        assert details(queue, "release") == [{"step": stopped_at, "reason": "pause --now",
                                              "slurm_task": "120_3"}]


def test_a_busy_folder_hands_the_job_back(queue, tmp_path):
    def at_step(step):
        raise FolderBusy(f"{tmp_path / 'a'} is in use by another process")

    queue.plan([row("a", tmp_path / "a")])
    worker = Worker(queue, "cpu", 2, job=StandIn(at_step))
    assert worker.run(max_jobs=1) == 1
    assert worker.outcomes == ["stopped"] and not worker.all_failed
    got = only_job(queue)
    assert (got["state"], got["step"], got["attempts"], got["error"]) == ("pending", 0, 0, None)
    assert details(queue, "release") == [{"step": 0,
                                          "reason": "another process holds the folder"}]
    assert "is in use by another process; job handed back" in (
        tmp_path / "a" / LOG_FILE).read_text()


def test_a_gpu_is_refused_for_a_job_that_runs_on_the_cpu_only(queue):
    with pytest.raises(BadDevice, match="^--gpu 0: this job runs on the CPU only$"):
        Worker(queue, "0", 30, job=StandIn())


# --- torch stays out of a worker until it runs a study job ---------------------------------

HEAVY = "sorted({'torch', 'transformers'} & set(sys.modules))"

STANDIN_WORKER = f"""
import json, sys
from db import JobQueue, connect
from runner.worker import Worker
from trainer.job import Job, RunResult

class Done(Job):
    def run(self, spec):
        return RunResult("completed", 1, {{"accuracy": 1.0}})

queue = JobQueue(connect(sys.argv[1], create=True))
queue.plan([json.loads(sys.argv[2])])
assert Worker(queue, "cpu", 30, threads=1, job=Done()).run() == 1
assert queue.jobs()[0]["state"] == "succeeded"
print({HEAVY})
"""


def python(code: str, *args: str) -> str:
    proc = subprocess.run([PYTHON, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_importing_the_worker_imports_no_torch():
    assert python(f"import sys, runner.worker; print({HEAVY})") == "[]"


def test_a_worker_with_a_stand_in_job_never_imports_torch(tmp_path):
    url = f"sqlite:///{tmp_path / 'queue.sqlite'}"
    assert python(STANDIN_WORKER, url, json.dumps(row("a", tmp_path / "a"))) == "[]"


def test_a_slurm_task_waits_out_a_job_another_worker_holds_and_takes_it_over(queue,
                                                                            tmp_path):
    """An array must not end before the sweep: a task with nothing to claim while another
    worker holds a job waits for that lease (its holder may be dead), then takes the job
    over. A worker outside SLURM without --wait leaves at once."""
    queue.plan([row("a", tmp_path / "a")])
    queue.claim("elsewhere:cpu:1", 1.5)          # silent from now on: its lease runs out
    plain = Worker(queue, "cpu", 30, job=StandIn())
    assert plain.run() == 0 and plain.outcomes == []
    task = SlurmTask.from_environ({"SLURM_JOB_ID": "123", "SLURM_ARRAY_JOB_ID": "120",
                                   "SLURM_ARRAY_TASK_ID": "1", "SLURM_CPUS_PER_TASK": "1"})
    heir = Worker(queue, "cpu", 30, slurm=task, job=StandIn())
    assert heir.run(poll=0.2) == 1
    assert heir.outcomes == ["completed"]
    got = only_job(queue)
    assert (got["state"], got["worker"], got["claims"]) == ("succeeded", heir.name, 2)
