"""Operating a sweep: cancel, requeue --fresh, pause/resume and replan, each on both backends
and each raced against a worker that is training the job at that moment."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from testing.audit import finishes_per_job, lease_violations
from tests.support.commands import cli, long_job, plan, start_worker
from tests.support.queues import rows
from tests.support.training import same_result_as_uninterrupted
from tests.support.waiting import wait_for
from trainer import checkpoint as ckpt

pytestmark = pytest.mark.slow
LONG = "table_connectivity_standard_V5_N256_run1"


# --- the queue's contract ---------------------------------------------------------------


def test_cancelled_jobs_are_never_claimed_until_requeued(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2"))
    names = [j["name"] for j in queue.jobs()]
    failed = queue.claim("w", 60)
    queue.fail(failed, "boom")
    report = queue.cancel(names[:2])
    assert (report.cancelled, report.asked, report.skipped) == (names[:2], [], [])
    assert queue.cancel(names[:1]).skipped == names[:1]
    assert queue.counts()["cancelled"] == 2
    assert queue.claim("w", 60).name == names[2]
    assert queue.claim("w", 60) is None
    assert queue.requeue([names[1]]) == [names[1]]
    assert queue.claim("w", 60).name == names[1]
    with pytest.raises(ValueError, match="no job named nope"):
        queue.cancel(["nope"])
    kinds = [e["kind"] for e in queue.events() if e["kind"] in ("cancel", "requeue")]
    assert kinds == ["cancel", "cancel", "requeue"]


def test_a_running_job_is_cancelled_through_its_worker(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    claim = queue.claim("w", 60)
    assert queue.cancel([claim.name]).asked == [claim.name]
    assert queue.jobs()[0]["state"] == "running"          # never changed under its worker
    lease = queue.heartbeat(claim)
    assert lease and lease.stop == "cancel"
    assert queue.progress(claim, 7, 0.5).stop == "cancel"
    queue.cancelled(claim, 7)
    (job,) = queue.jobs()
    assert (job["state"], job["step"], job["attempts"], job["stop_request"]) == (
        "cancelled", 7, 0, None)
    assert lease_violations(queue.events()) == []


def test_a_silent_workers_cancelled_job_is_settled_not_rerun(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    claim = queue.claim("w", 0.5)
    queue.heartbeat(claim)
    queue.cancel([claim.name])                             # asked, but the worker is gone
    wait_for(lambda: queue.claim("other", 60) is None and
             queue.jobs()[0]["state"] == "cancelled", timeout=10, what="settling")
    assert not queue.heartbeat(claim)


def test_a_cancelled_job_expiring_between_settling_and_selecting_is_not_taken(
        queue, monkeypatch):
    # The race, made certain: settling runs before the lease has expired, the select after.
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    claim = queue.claim("w", 0.2)
    queue.cancel([claim.name])
    settle = queue._settle_expired

    def settle_then_expire(conn):
        settle(conn)
        time.sleep(0.4)

    monkeypatch.setattr(queue, "_settle_expired", settle_then_expire)
    assert queue.claim("other", 60) is None
    monkeypatch.undo()
    assert queue.claim("other", 60) is None
    assert queue.jobs()[0]["state"] == "cancelled"


def test_pause_stops_claims_and_pause_now_asks_running_jobs_back(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2"))
    running = queue.claim("w", 60)
    assert queue.pause() == [] and queue.paused() is not None
    assert queue.claim("w2", 60) is None
    assert queue.heartbeat(running).stop is None            # a plain pause lets it finish
    assert queue.pause(now=True) == [running.name]
    assert queue.heartbeat(running).stop == "pause"
    assert queue.resume() and queue.paused() is None
    assert queue.heartbeat(running).stop is None            # withdrawn before it acted
    assert queue.claim("w2", 60) is not None
    assert not queue.resume()


def test_requeue_fresh_moves_the_folder_aside_and_restarts_from_step_0(queue, tmp_path):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1", out_root=str(tmp_path)))
    claim = queue.claim("w", 60)
    queue.progress(claim, 30, 0.1, {"accuracy": 0.9, "balanced_accuracy": 0.8})
    queue.finish(claim, {"accuracy": 0.9})
    moved = []
    assert queue.requeue([claim.name], fresh=True, move_aside=moved.append) == [claim.name]
    assert moved == [claim.out_dir]
    (job,) = queue.jobs()
    assert (job["state"], job["step"], job["test_accuracy"]) == ("pending", 0, None)
    running = queue.claim("w", 60)
    with pytest.raises(ValueError, match="cancel it first"):
        queue.requeue([running.name], fresh=True, move_aside=moved.append)
    assert moved == [claim.out_dir]


# --- raced against a worker that is training the job ------------------------------------


def test_cancel_while_a_worker_trains_then_requeue_resumes_bit_exactly(db_url, tmp_path):
    queue = long_job(db_url, tmp_path)
    worker = start_worker(db_url, "--lease", "4")
    wait_for(lambda: queue.jobs()[0]["step"] >= 30, what="progress")
    proc = cli(db_url, "cancel", "standard_V5_N256_run1")
    assert proc.returncode == 0, proc.stderr
    assert f"1 running job(s) will be stopped by their workers: {LONG}" in proc.stdout
    _, err = worker.communicate(timeout=60)                 # within a lease interval
    assert worker.returncode == 0, err[-2000:]
    (job,) = queue.jobs()
    assert job["state"] == "cancelled" and 30 <= job["step"] < 400
    assert ckpt.list_states(Path(job["out_dir"]))[0].name == f"state-{job['step']:07d}.pt"
    assert "cancel asked; stopping after this step" in (Path(job["out_dir"])
                                                        / ckpt.LOG_FILE).read_text()
    assert "cancelled 1" in cli(db_url, "status").stdout
    idle = cli(db_url, "worker", "--gpu", "cpu")
    assert idle.returncode == 0 and "nothing left to claim; 0 job(s)" in idle.stderr
    assert queue.jobs()[0]["state"] == "cancelled"
    results = cli(db_url, "results")
    assert "1 cancelled job(s) left out" in results.stderr

    assert cli(db_url, "requeue", LONG).returncode == 0
    again = start_worker(db_url)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    (job,) = queue.jobs()
    assert job["state"] == "succeeded"
    events = queue.events()
    assert finishes_per_job(events) == {job["id"]: 1} and lease_violations(events) == []
    same_result_as_uninterrupted(job, tmp_path)


def test_pause_now_hands_the_job_back_and_resume_finishes_it(db_url, tmp_path):
    queue = long_job(db_url, tmp_path)
    worker = start_worker(db_url, "--wait", "--lease", "4")
    try:
        wait_for(lambda: queue.jobs()[0]["step"] >= 30, what="progress")
        assert cli(db_url, "pause", "--now").returncode == 0
        wait_for(lambda: queue.jobs()[0]["state"] == "pending", timeout=60, what="hand-back")
        stopped_at = queue.jobs()[0]["step"]
        status = cli(db_url, "status").stdout
        assert status.splitlines()[0].endswith("PAUSED (nothing new is claimed; `python -m "
                                               "runner resume`)")
        assert queue.jobs()[0]["state"] == "pending" and worker.poll() is None  # waits
        assert cli(db_url, "resume").stdout.strip() == "queue resumed"
        wait_for(lambda: queue.jobs()[0]["state"] == "succeeded", timeout=300, what="finish")
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err[-2000:]
    assert "the queue is paused: waiting for" in err
    (job,) = queue.jobs()
    claims = [json.loads(e["detail"])["step"] for e in queue.events() if e["kind"] == "claim"]
    assert claims == [0, stopped_at] and job["attempts"] == 1
    assert lease_violations(queue.events()) == []
    same_result_as_uninterrupted(job, tmp_path)


def test_replan_and_fresh_rerun_never_touch_a_running_job(db_url, tmp_path):
    queue = plan(db_url, tmp_path / "runs", "--only", "V=5", "--only", "N=256",
                 "--only", "model=gpt2", "--set", "training.train_steps=400",
                 "--set", "training.save_every_steps=20")
    worker = start_worker(db_url, "--max-jobs", "1")
    wait_for(lambda: queue.jobs()[0]["step"] >= 30, what="progress")
    replan = cli(db_url, "plan", "--profile", "smoke", "--only", "V=5", "--only", "N=256",
                 "--only", "model=gpt2", "--out-root", str(tmp_path / "runs"),
                 "--set", "training.train_steps=60", "--replace")
    assert replan.returncode == 0, replan.stderr
    assert "2 replaced" in replan.stdout and f"are running and were left as they are: {LONG}" \
        in replan.stderr
    fresh = cli(db_url, "requeue", "--fresh", LONG)
    assert fresh.returncode == 2 and "cancel it first" in fresh.stderr
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err[-2000:]
    jobs = {j["name"]: j for j in queue.jobs()}
    assert (jobs[LONG]["state"], jobs[LONG]["total_steps"]) == ("succeeded", 400)
    first = jobs[LONG]
    old_eval = (Path(first["out_dir"]) / ckpt.EVAL_FILE).read_text()

    # Now done, it can be rerun from scratch: its folder is kept aside, untouched.
    assert cli(db_url, "requeue", "--fresh", LONG).returncode == 0
    rerun = start_worker(db_url, "--max-jobs", "1")
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    job = {j["name"]: j for j in queue.jobs()}[LONG]
    assert job["state"] == "succeeded" and job["claims"] == 2
    log = (Path(job["out_dir"]) / ckpt.LOG_FILE).read_text()
    assert "starting gpt2" in log and "resuming" not in log
    (aside,) = Path(job["out_dir"]).parent.glob(f"{LONG}.replaced-*")
    assert (aside / ckpt.EVAL_FILE).read_text() == old_eval
    assert lease_violations(queue.events()) == []
    same_result_as_uninterrupted(job, tmp_path)
