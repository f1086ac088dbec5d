"""What a claim settles when it finds expired leases, and what the end of a job records, as a
contract every backend must meet: an expired job asked to cancel becomes cancelled, one out
of attempts becomes failed, each with an `expire` event naming the lost worker's lease; a
finish is recorded with its worker, lease and attempt, and refused without the lease."""

from __future__ import annotations

import json

import pytest

from db import LeaseLost
from tests.support.queues import rows


def expire_all(queue) -> None:
    with queue.engine.begin() as conn:  # every lease ran out long ago
        conn.exec_driver_sql("UPDATE jobs SET heartbeat_at = heartbeat_at - 10000 "
                             "WHERE state = 'running'")


def expire_events(queue) -> list[tuple]:
    return [(e["job_id"], e["worker"], e["token"], e["attempt"], json.loads(e["detail"]))
            for e in queue.events() if e["kind"] == "expire"]


def test_an_expired_job_asked_to_cancel_is_cancelled_by_the_next_claim(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    claim = queue.claim("w", 600)
    queue.cancel([claim.name])
    expire_all(queue)
    assert queue.claim("other", 600) is None
    (job,) = queue.jobs()
    assert (job["state"], job["lease_token"], job["stop_request"]) == ("cancelled", None, None)
    assert expire_events(queue) == [(claim.id, "w", claim.token, 1, {"cancelled": True})]


def test_an_expired_job_out_of_attempts_is_failed_by_the_next_claim(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    for _ in range(3):
        claim = queue.claim("w", 600)
        expire_all(queue)
    assert claim.attempt == 3
    assert queue.claim("other", 600) is None
    (job,) = queue.jobs()
    error = "worker lost: lease expired on attempt 3 of 3 (last worker w)"
    assert (job["state"], job["lease_token"], job["error"]) == ("failed", None, error)
    assert expire_events(queue)[-1] == (claim.id, "w", claim.token, 3, {"error": error})


def test_a_finish_is_recorded_with_its_lease_and_refused_without_it(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    claim = queue.claim("w", 600)
    queue.finish(claim, {"accuracy": 0.9, "balanced_accuracy": 0.8, "majority_rate": 0.6})
    (event,) = [e for e in queue.events() if e["kind"] == "finish"]
    assert (event["worker"], event["token"], event["attempt"]) == ("w", claim.token, 1)
    with pytest.raises(LeaseLost, match=r"run1: lease lost; result not recorded$"):
        queue.finish(claim, {"accuracy": 0.1})
    (job,) = queue.jobs()
    assert (job["state"], job["test_accuracy"]) == ("succeeded", 0.9)


def test_cancel_says_what_it_did_to_each_job_and_records_it(queue):
    queue.plan(rows("V=5", "N=256"))
    done, live, silent = (queue.claim(w, 600) for w in ("a", "b", "c"))
    queue.finish(done, {"accuracy": 0.5})
    queue.pause(now=True)  # the silent worker's job carries a pause request when it expires
    with queue.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE jobs SET heartbeat_at = heartbeat_at - 10000 "
                             f"WHERE name = '{silent.name}'")
    pending = [j["name"] for j in queue.jobs() if j["state"] == "pending"][0]
    with pytest.raises(ValueError, match=r"^no job named x, y$"):
        queue.cancel([pending, "x", "y"])
    report = queue.cancel([done.name, live.name, silent.name, pending])
    assert (report.skipped, report.asked, sorted(report.cancelled)) == (
        [done.name], [live.name], sorted([silent.name, pending]))
    jobs = {j["name"]: j for j in queue.jobs()}
    assert (jobs[live.name]["state"], jobs[live.name]["stop_request"]) == ("running", "cancel")
    gone = jobs[silent.name]
    assert (gone["state"], gone["lease_token"], gone["stop_request"], gone["heartbeat_at"]) == (
        "cancelled", None, None, None)
    names = {j["id"]: name for name, j in jobs.items()}
    recorded = sorted((names[e["job_id"]], e["kind"], e["worker"], e["token"],
                       json.loads(e["detail"])) for e in queue.events()
                      if e["kind"] in ("cancel", "expire"))
    assert recorded == sorted([
        (live.name, "cancel", None, None, {"asked": "b"}),
        (silent.name, "expire", "c", silent.token, {"cancelled": True}),
        (silent.name, "cancel", None, None, {"from": "running"}),
        (pending, "cancel", None, None, {"from": "pending"})])


def test_progress_records_the_newest_test_accuracy_and_balanced_accuracy(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    claim = queue.claim("w", 600)
    queue.progress(claim, 7, 0.5, {"accuracy": 0.75, "balanced_accuracy": 0.625})
    (job,) = queue.jobs()
    assert (job["step"], job["loss"], job["test_accuracy"], job["balanced_accuracy"]) == (
        7, 0.5, 0.75, 0.625)
