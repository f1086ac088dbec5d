"""requeue and the reclaim of a dead worker's job, as a contract every backend must meet: what
requeue takes (the named jobs only, unless asked for the failed ones), a running job requeued
only once its worker is known dead or its lease expired, what each records, and requeue's
refusals, each in one line naming the job."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from runner.liveness import HOST, dead_reason, process_token
from tests.support.queues import rows


@pytest.fixture
def other_process():
    """A live process that is not a worker: what a dead worker's pid may now belong to."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def test_requeue_by_name_takes_only_the_named_jobs(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2"))
    first, second = queue.claim("w", 600), queue.claim("w", 600)
    queue.fail(first, "boom")
    queue.fail(second, "boom")
    assert queue.requeue([first.name]) == [first.name]
    states = {j["name"]: j["state"] for j in queue.jobs()}
    assert (states[first.name], states[second.name]) == ("pending", "failed")


def test_unknown_names_are_all_named_in_one_refusal(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2"))
    with pytest.raises(ValueError, match=r"^no job named nope, nada$"):
        queue.requeue(["nope", "nada"])


def test_a_running_job_is_refused_a_fresh_start_naming_its_worker(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    claim = queue.claim("w", 600)
    with pytest.raises(ValueError, match=rf"^{claim.name} is running \(worker w\): cancel it "
                                         r"first, then requeue --fresh$"):
        queue.requeue([claim.name], fresh=True)


def test_a_running_job_with_a_live_lease_is_refused_saying_how_long_it_has_left(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    claim = queue.claim("w", 600)
    with queue.engine.begin() as conn:  # its last beat was 100 s ago: 500 s of lease left
        conn.exec_driver_sql("UPDATE jobs SET heartbeat_at = heartbeat_at - 100")
    with pytest.raises(ValueError) as refused:
        queue.requeue([claim.name])
    found = re.fullmatch(rf"{claim.name} is running \(worker w, heartbeat (\d+)s ago\); stop "
                         r"its worker first, or wait (\d+)s for its lease to expire",
                         str(refused.value))
    assert found, str(refused.value)
    ago, left = map(int, found.groups())
    assert 100 <= ago < 130 and 470 < left <= 500
    assert queue.jobs()[0]["state"] == "running"


def test_a_running_job_whose_pid_was_reused_is_requeued_as_its_workers_reclaim(
        queue, other_process):
    pid = other_process.pid
    name = f"{HOST}:cpu:{pid}"
    boot, start = process_token(pid).rsplit(":", 1)
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    queue.register_worker(name, HOST, pid, f"{boot}:{int(start) - 1}", "cpu", 600)
    claim = queue.claim(name, 600)
    assert queue.requeue([claim.name], host=HOST, is_dead=dead_reason) == [claim.name]
    (job,) = queue.jobs()
    assert (job["state"], job["lease_token"]) == ("pending", None)
    reclaim = [e for e in queue.events() if e["kind"] == "reclaim"]
    assert [(e["worker"], e["token"], json.loads(e["detail"])) for e in reclaim] == [
        (name, claim.token, {"reason": f"pid {pid} now belongs to another process",
                             "by": "requeue", "to": "pending"})]


def test_a_running_job_whose_worker_process_lives_is_refused(queue, other_process):
    pid = other_process.pid
    name = f"{HOST}:cpu:{pid}"
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    queue.register_worker(name, HOST, pid, process_token(pid), "cpu", 600)
    claim = queue.claim(name, 600)
    with pytest.raises(ValueError, match=r"is running \(worker "):
        queue.requeue([claim.name], host=HOST, is_dead=dead_reason)
    assert queue.jobs()[0]["state"] == "running"


def test_requeue_records_where_each_job_came_from_and_ends_an_expired_lease(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2"))
    failed, expired = queue.claim("w", 600), queue.claim("v", 600)
    queue.fail(failed, "boom")
    with queue.engine.begin() as conn:  # v went silent: its lease ran out long ago
        conn.exec_driver_sql(f"UPDATE jobs SET heartbeat_at = heartbeat_at - 700 "
                             f"WHERE name = '{expired.name}'")
    assert queue.requeue([expired.name], failed=True) == sorted([failed.name, expired.name])
    events = [(e["job_id"], e["kind"], e["worker"], e["token"], json.loads(e["detail"]))
              for e in queue.events() if e["kind"] in ("expire", "requeue")]
    assert sorted(events, key=str) == sorted([
        (expired.id, "expire", "v", expired.token, {"requeued": True}),
        (expired.id, "requeue", None, None, {"from": "running", "fresh": False}),
        (failed.id, "requeue", None, None, {"from": "failed", "fresh": False})], key=str)


def test_reclaiming_a_dead_workers_job_ends_its_lease_and_says_whose_and_why(
        queue, other_process):
    pid = other_process.pid
    name = f"{HOST}:cpu:{pid}"
    boot, start = process_token(pid).rsplit(":", 1)
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    queue.register_worker(name, HOST, pid, f"{boot}:{int(start) - 1}", "cpu", 600)
    claim = queue.claim(name, 600)
    queue.reclaim_dead(HOST, dead_reason, by="worker x")
    (job,) = queue.jobs()
    assert (job["state"], job["lease_token"], job["heartbeat_at"]) == ("pending", None, None)
    (event,) = [e for e in queue.events() if e["kind"] == "reclaim"]
    assert (event["worker"], event["token"], json.loads(event["detail"])) == (
        name, claim.token, {"reason": f"pid {pid} now belongs to another process",
                            "by": "worker x", "to": "pending"})
    assert [(w["name"], w["state"], w["job"]) for w in queue.workers()] == [
        (name, "exited", None)]
