"""Stop signals and the worker loop: a stop that comes while the worker is claiming is not
lost, and a second SIGTERM (SLURM sends one after its warning signal) still hands the job
back with a checkpoint; only a second Ctrl-C exits at once."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from runner.worker import Worker
from tests.support.commands import PYTHON, ROOT, runner_env
from tests.support.standin import StandIn, row
from tests.support.waiting import wait_for


def test_a_stop_that_comes_during_the_claim_stops_the_job_it_claimed(queue, tmp_path):
    """The claim retries through a database outage for up to --db-outage seconds: a SIGTERM
    then must not be forgotten when the job starts (it would train to its end)."""
    queue.plan([row("a", tmp_path / "a", steps=5)])
    job = StandIn()
    worker = Worker(queue, "cpu", 30, job=job)
    claim = queue.claim

    def claim_while_signalled(*args, **kwargs):
        got = claim(*args, **kwargs)
        worker.stopping.set()   # what the signal handler does, mid-claim
        worker.stop_job.set()
        return got

    queue.claim = claim_while_signalled
    assert worker.run() == 1
    assert worker.outcomes == ["stopped"]
    (got,) = queue.jobs()
    assert (got["state"], got["step"]) == ("pending", 1)   # stopped at its first boundary


CODE = """
import logging, sys
from db import JobQueue, connect
from runner.worker import Worker
from tests.support.standin import StandIn
logging.basicConfig(level=logging.INFO)
worker = Worker(JobQueue(connect(sys.argv[1])), "cpu", 30,
                job=StandIn(seconds_per_step=float(sys.argv[2])))
worker.install_signal_handlers()
worker.run()
"""


@pytest.mark.slow
def test_a_second_sigterm_still_hands_the_job_back_with_a_checkpoint(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    from db import JobQueue, connect

    queue = JobQueue(connect(url, create=True))
    queue.plan([row("a", tmp_path / "a", steps=40)])
    # Each step takes 0.5 s: the first signal is acted on at the next step boundary, after
    # the second one has come.
    proc = subprocess.Popen([PYTHON, "-c", CODE, url, "0.5"], cwd=ROOT, env=runner_env(url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: queue.jobs()[0]["step"] >= 2, timeout=60, what="the job running")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)   # two signals back to back may arrive as one
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    (job,) = queue.jobs()
    assert job["state"] == "pending" and job["step"] >= 2
    assert (tmp_path / "a" / "step").read_text() == str(job["step"])
    queue.engine.dispose()


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    from db import JobQueue, connect

    queue = JobQueue(connect(url, create=True))
    queue.plan([row("a", tmp_path / "a", steps=40)])
    proc = subprocess.Popen([PYTHON, "-c", CODE, url, "2"], cwd=ROOT, env=runner_env(url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: queue.jobs()[0]["step"] >= 1, timeout=60, what="the job running")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=10)   # long before the 2 s step ends
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert queue.jobs()[0]["state"] == "running"   # left to its lease
    queue.engine.dispose()
