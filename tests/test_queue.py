"""Queue operations, as a contract every backend must meet."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from db import LeaseLost
from runner.liveness import HOST, dead_reason
from testing.audit import lease_violations
from tests.support.queues import last_planned_first, rows


def test_plan_is_idempotent_and_adds_only_new_jobs(queue):
    first = queue.plan(rows("V=5"))
    assert len(first.new) == 30 and not first.existing
    again = queue.plan(rows())
    assert len(again.new) == 30 and len(again.existing) == 30 and not again.changed
    assert queue.counts()["pending"] == 60
    changed = queue.plan(rows("V=5", "N=256", overrides=["training.train_steps=99"]))
    assert len(changed.changed) == 6 and not changed.new
    assert {j["total_steps"] for j in queue.jobs()} == {30}  # not overwritten


def test_dry_run_writes_nothing(queue):
    report = queue.plan(rows(), dry_run=True)
    assert len(report.new) == 60
    assert queue.counts()["pending"] == 0


def test_claims_follow_the_guide_order_then_cost(queue):
    queue.plan(rows("N=256", "N=4096"))
    names = [queue.claim("w", 60).name for _ in range(3)]
    assert names == ["table_connectivity_standard_V5_N256_run1",
                     "table_connectivity_standard_V5_N256_run2",
                     "table_connectivity_standard_V5_N256_run3"]
    biggest = queue.claim("w", 60, order="cost")
    assert "_V20_" in biggest.name


def test_an_expired_job_takes_its_place_in_the_claim_order(queue):
    """A claim takes the first job, in its order, of the pending and the expired ones: an
    expired job is neither put first nor last (two queries find the two candidates)."""
    queue.plan(rows("V=5", "V=20", "N=256", "model=gpt2"))   # V5 runs 1-3, then V20 runs 1-3
    name = "table_connectivity_standard_V{}_N256_run{}".format
    costly = queue.claim("a", 0.2, order="cost")
    assert costly.name == name(20, 1)
    assert queue.claim("b", 60).name == name(5, 1)
    early = queue.claim("c", 0.2)
    assert early.name == name(5, 2)
    time.sleep(0.5)   # both 0.2 s leases expired
    # Cost order: the expired V20 job before the pending one of the same cost that follows it.
    assert queue.claim("d", 60, order="cost").name == costly.name
    # Guide order: the expired V5 job before the pending one that follows it ...
    assert queue.claim("e", 60).name == early.name
    later = queue.claim("f", 0.2, order="cost")
    assert later.name == name(20, 2)
    time.sleep(0.5)
    # ... and a pending job before an expired one that comes after it.
    assert queue.claim("g", 60).name == name(5, 3)
    assert queue.claim("h", 60).name == later.name


def test_an_unknown_claim_order_is_refused_naming_the_known_ones(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    with pytest.raises(ValueError) as refused:
        queue.claim("w", 60, order="newest")
    assert str(refused.value) == "unknown order 'newest' (known: guide, cost)"
    counts = queue.counts()
    assert (counts["pending"], counts["running"]) == (1, 0)


def test_in_cost_order_the_costlier_of_the_pending_and_the_expired_job_comes_first(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2") + rows("V=20", "N=256", "model=gpt2",
                                                          "run=1"))
    cheap = queue.claim("a", 0.2)                      # guide order: a V5 job
    time.sleep(0.5)   # expired: V5 run 1; pending: V5 runs 2-3 and the costlier V20 run 1
    costly = queue.claim("b", 0.2, order="cost")
    assert "_V20_" in costly.name                      # the pending job, costlier
    assert queue.claim("c", 60, order="cost").name == cheap.name   # expired before later V5
    time.sleep(0.5)   # expired: the V20 job; pending: V5 runs 2-3, cheaper
    assert queue.claim("d", 60, order="cost").name == costly.name
    rest = {queue.claim(worker, 60, order="cost").name for worker in ("e", "f")}
    assert rest == {j["name"] for j in queue.jobs() if "_V5_" in j["name"]} - {cheap.name}
    assert queue.claim("g", 60, order="cost") is None   # nothing left: none, in either order
    assert queue.claim("g", 60) is None


@pytest.mark.parametrize("order", ["guide", "cost"])
def test_the_claim_order_is_by_position_not_by_when_a_job_was_planned(queue, order):
    planned = last_planned_first(rows("V=5", "N=256", "model=gpt2"))   # 3 jobs of one cost
    queue.plan(planned)
    first = queue.claim("a", 0.2, order=order)
    assert first.name == planned[2]["name"]
    time.sleep(0.5)   # expired: the first job; pending: the two planned before it
    assert queue.claim("b", 60, order=order).name == planned[2]["name"]
    assert queue.claim("c", 60, order=order).name == planned[1]["name"]


def test_a_takeover_starts_a_new_attempt_and_records_whose_lease_expired(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    queue.register_worker("b", "host", 1, None, "cpu", 60)
    first = queue.claim("a", 0.2)
    queue.progress(first, 5, 0.5, peak_memory=2.0**30)
    (old,) = queue.jobs()
    time.sleep(0.5)   # the lease expires: the next claim takes the job over
    second = queue.claim("b", 60)
    (job,) = queue.jobs()
    # The attempt's clock, beat and memory are the new attempt's, not the lost one's.
    assert job["claimed_at"] >= old["claimed_at"] + 0.5
    assert abs(job["heartbeat_at"] - job["claimed_at"]) < 0.1
    assert (old["peak_memory"], job["peak_memory"]) == (2.0**30, None)
    assert (job["worker"], job["lease_token"], job["step"]) == ("b", second.token, 5)
    expire = [e for e in queue.events() if e["kind"] == "expire"]
    assert [(e["worker"], e["token"], e["detail"]) for e in expire] == [
        ("a", first.token, '{"taken_over_by": "b"}')]
    claims = [e for e in queue.events() if e["kind"] == "claim"]
    assert [(e["worker"], e["token"], e["attempt"]) for e in claims] == [
        ("a", first.token, 1), ("b", second.token, 2)]
    assert (second.attempt, second.lease_seconds) == (2, 60)
    (registered,) = queue.workers()   # the claimer is seen busy with the job
    assert (registered["name"], registered["state"], registered["job"]) == (
        "b", "busy", second.name)


def test_claim_is_exclusive_and_returns_the_config(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    claim = queue.claim("a", 60)
    assert claim.config["model"]["family"] == "gpt2" and claim.attempt == 1
    assert claim.out_dir == str(Path("runs").resolve() / "table_connectivity"
                                / "table_connectivity_standard_V5_N256_run1")
    assert queue.claim("b", 60) is None


def test_finish_records_the_result(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    claim = queue.claim("a", 60)
    assert queue.progress(claim, 12, 0.5)
    queue.finish(claim, {"accuracy": 0.75, "balanced_accuracy": 0.6, "majority_rate": 0.7})
    (job,) = queue.jobs()
    assert (job["state"], job["step"], job["test_accuracy"]) == ("succeeded", 30, 0.75)
    assert job["lease_token"] is None and job["worker"] == "a"


def test_a_taken_over_lease_can_write_nothing(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    old = queue.claim("old", 1)
    time.sleep(1.2)  # the old worker stays silent past its lease
    new = queue.claim("new", 60)
    assert new is not None and new.attempt == 2
    assert not queue.heartbeat(old)
    assert not queue.progress(old, 25, 0.1)
    with pytest.raises(LeaseLost):
        queue.finish(old, {"accuracy": 1.0})
    with pytest.raises(LeaseLost):
        queue.fail(old, "boom")
    with pytest.raises(LeaseLost):
        queue.release(old, 3)
    queue.finish(new, {"accuracy": 0.5})
    (job,) = queue.jobs()
    assert job["test_accuracy"] == 0.5 and job["worker"] == "new"
    kinds = [e["kind"] for e in queue.events()]
    assert kinds == ["plan", "claim", "expire", "claim", "finish"]
    assert lease_violations(queue.events()) == []


def test_heartbeats_keep_a_lease(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    claim = queue.claim("a", 1)
    for _ in range(4):
        time.sleep(0.4)
        assert queue.heartbeat(claim)
    assert queue.claim("b", 60) is None


def test_release_does_not_burn_an_attempt(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    for _ in range(5):
        claim = queue.claim("a", 60)
        queue.release(claim, 10)
    (job,) = queue.jobs()
    assert (job["state"], job["attempts"], job["step"]) == ("pending", 0, 10)


def test_silent_deaths_use_up_attempts_then_fail(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    for attempt in (1, 2, 3):
        assert queue.claim(f"w{attempt}", 0.2).attempt == attempt
        time.sleep(0.3)
    assert queue.claim("w4", 60) is None
    (job,) = queue.jobs()
    assert job["state"] == "failed" and "lease expired" in job["error"]


def test_fail_then_requeue(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2"))
    claim = queue.claim("a", 60)
    queue.fail(claim, "RuntimeError: boom", "Traceback ...")
    (job, *_) = queue.jobs()
    assert (job["state"], job["error"], job["traceback"]) == (
        "failed", "RuntimeError: boom", "Traceback ...")
    assert queue.requeue(failed=True) == [claim.name]
    (job, *_) = queue.jobs()
    assert (job["state"], job["attempts"], job["error"]) == ("pending", 0, None)


def test_requeue_by_name_refuses_unknown_and_running_jobs(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2"))
    claim = queue.claim("a", 60)
    with pytest.raises(ValueError, match="no job named nope"):
        queue.requeue(["nope"])
    with pytest.raises(ValueError, match="is running"):
        queue.requeue([claim.name])
    queue.finish(claim, {"accuracy": 0.5})
    assert queue.requeue([claim.name]) == [claim.name]
    assert queue.counts() == {"pending": 3, "running": 0, "succeeded": 0, "failed": 0,
                             "cancelled": 0}


# --- guards that only a second party shows ------------------------------------------------


def test_a_claim_skips_a_job_another_claimer_is_taking(queue, db_url):
    """PostgreSQL: while one claimer's transaction holds job 1, another claim takes job 2 at
    once (FOR UPDATE SKIP LOCKED), without waiting for that transaction (10 s of slack).
    Reading job 1 without the lock finds it taken once that transaction ends: 'nothing left
    to claim' with jobs pending; locking without SKIP LOCKED queues every claimer behind it."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite holds one write lock for the whole claim: claims are serial")
    import threading

    from sqlalchemy import text

    queue.plan(rows("V=5", "N=256", "model=gpt2"))
    first, second = queue.jobs()[0]["name"], queue.jobs()[1]["name"]
    other = queue.engine.connect()
    holding = other.begin()
    other.execute(text("SELECT id FROM jobs WHERE name = :n FOR UPDATE"), {"n": first})
    got = {}
    claimer = threading.Thread(target=lambda: got.update(claim=queue.claim("b", 60)))
    claimer.start()
    claimer.join(10)
    waited = claimer.is_alive()  # it waited for the other transaction instead of skipping
    other.execute(text("UPDATE jobs SET state = 'running', lease_token = 'a', "
                       "attempts = attempts + 1 WHERE name = :n"), {"n": first})
    holding.commit()
    other.close()
    claimer.join(10)
    assert not waited
    assert got["claim"] is not None and got["claim"].name == second


def test_a_dead_workers_job_on_its_last_attempt_is_failed_not_pending(queue):
    """A job whose worker died on its last attempt has no attempt left: pending, no claim
    would ever take it. It is failed, with the reason."""
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    gone = subprocess.Popen(["true"])
    gone.wait()
    name = f"{HOST}:cpu:{gone.pid}"
    for attempt in range(1, 4):
        claim = queue.claim(name, 600)
        assert claim.attempt == attempt
        reclaimed = queue.reclaim_dead(HOST, dead_reason, by="test")
        assert [n for n, _ in reclaimed] == [claim.name]
        (job,) = queue.jobs()
        assert job["state"] == ("pending" if attempt < 3 else "failed"), attempt
    assert job["error"] == f"worker lost: its process {gone.pid} is gone, on attempt 3 of 3"
    assert queue.claim("other", 600) is None


def test_a_cancelled_launch_stops_only_its_own_workers(queue):
    """Once a launch was cancelled, a later launch's workers still claim."""
    queue.record_launch("slurm", "101", 2, None, {})
    queue.record_launch("slurm", "102", 2, None, {})
    assert queue.cancel_launch("slurm", "101")
    assert queue.launch_cancelled("slurm", "101")
    assert not queue.launch_cancelled("slurm", "102")
    assert not queue.launch_cancelled("slurm", "103")
    assert not queue.cancel_launch("slurm", "103")
