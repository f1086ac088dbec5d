"""The queue's registries, as a contract every backend must meet: workers (registered, seen,
alive or not), the jobs other workers hold, launches handed to a scheduler and their
cancellation, the cancel a worker records, and how a changed config is described."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import create_engine

from db import DatabaseError, JobQueue, LeaseLost, connect
from db.queue import Lease, config_changes, worker_host
from tests.support.queues import rows

SLURM = {"slurm_job_id": "120", "slurm_array": "119_1", "slurm_restarts": 2, "gpus": "3"}


def by_name(queue) -> dict[str, dict]:
    return {w["name"]: w for w in queue.workers()}


def test_a_registered_worker_is_idle_alive_and_listed_in_the_order_workers_started(queue):
    queue.register_worker("h:1:11", "h", 11, "boot:1", "cuda:1", 30.0)
    queue.register_worker("h:0:10", "h", 10, "boot:0", "cuda:0", 30.0, slurm=SLURM)
    listed = queue.workers()
    assert [w["name"] for w in listed] == ["h:1:11", "h:0:10"]
    plain, under_slurm = listed
    assert plain["state"] == "idle" and plain["job"] is None and plain["alive"] is True
    assert (plain["host"], plain["pid"], plain["process"], plain["device"],
            plain["lease_seconds"]) == ("h", 11, "boot:1", "cuda:1", 30.0)
    assert 0 <= plain["seen_age"] < 10
    assert {k: under_slurm[k] for k in SLURM} == SLURM
    assert {k: plain[k] for k in SLURM} == dict.fromkeys(SLURM)


def test_registering_a_name_again_replaces_its_row(queue):
    queue.register_worker("h:0:10", "h", 10, "boot:old", "cpu", 30.0, slurm=SLURM)
    queue.worker_seen("h:0:10", "busy")
    queue.register_worker("h:0:10", "h", 10, "boot:new", "cpu", 60.0)
    (worker,) = queue.workers()
    assert (worker["process"], worker["lease_seconds"], worker["state"]) == (
        "boot:new", 60.0, "idle")
    assert worker["slurm_job_id"] is None


def test_a_worker_seen_is_idle_unless_told_and_an_exited_one_is_not_alive(queue):
    queue.register_worker("a", "h", 1, None, "cpu", 30.0)
    queue.register_worker("b", "h", 2, None, "cpu", 30.0)
    queue.worker_seen("a", "busy")
    assert by_name(queue)["a"]["state"] == "busy"
    queue.worker_seen("a")
    queue.worker_seen("b", "exited")
    workers = by_name(queue)
    assert (workers["a"]["state"], workers["a"]["alive"]) == ("idle", True)
    assert (workers["b"]["state"], workers["b"]["alive"]) == ("exited", False)


def test_a_worker_not_seen_within_its_lease_is_not_alive(queue):
    queue.register_worker("slow", "h", 1, None, "cpu", 0.2)
    queue.register_worker("fresh", "h", 2, None, "cpu", 30.0)
    with queue.engine.begin() as conn:  # seen 5 s ago: past its 0.2 s lease
        conn.exec_driver_sql("UPDATE workers SET seen_at = seen_at - 5 WHERE name = 'slow'")
    workers = by_name(queue)
    assert workers["slow"]["state"] == "idle" and workers["slow"]["alive"] is False
    assert 5 <= workers["slow"]["seen_age"] < 15
    assert workers["fresh"]["alive"] is True


def test_held_elsewhere_lists_the_running_jobs_of_other_workers_with_their_lease_left(queue):
    queue.plan(rows("V=5", "N=256"))
    mine = queue.claim("me", 600)
    theirs = [queue.claim("them", 600), queue.claim("them", 30)]
    queue.fail(queue.claim("them", 600), "boom")  # not running: not held
    held = queue.held_elsewhere("me")
    assert [(h["name"], h["worker"]) for h in held] == [(c.name, "them") for c in theirs]
    assert 590 < held[0]["expires_in"] <= 600 and 20 < held[1]["expires_in"] <= 30
    assert [h["name"] for h in queue.held_elsewhere("them")] == [mine.name]
    with queue.engine.begin() as conn:  # a lease long expired shows 0 s left, not less
        conn.exec_driver_sql(
            f"UPDATE jobs SET heartbeat_at = heartbeat_at - 100 WHERE name = '{theirs[1].name}'")
    assert queue.held_elsewhere("me")[1]["expires_in"] == 0.0


def test_the_cancel_a_worker_records_holds_its_step_and_needs_its_lease(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    claim = queue.claim("w", 600)
    queue.cancelled(claim, 17)
    (job,) = queue.jobs()
    assert (job["state"], job["step"]) == ("cancelled", 17)
    (event,) = [e for e in queue.events() if e["kind"] == "cancel"]
    assert json.loads(event["detail"]) == {"step": 17}
    with pytest.raises(LeaseLost, match=r"run1: lease lost; cancel not recorded$"):
        queue.cancelled(claim, 18)


def test_launches_keep_what_was_submitted_oldest_first_per_scheduler(queue):
    queue.record_launch("slurm", "102", 4, "/runs/slurm/102.sh", {"time": "4:00:00", "b": 1})
    queue.record_launch("other", "7", 1, None, {})
    queue.record_launch("slurm", "101", 2, None, {"partition": "gpu"})
    launches = queue.launches("slurm")
    assert [(x["job_id"], x["tasks"], x["script"], x["detail"]) for x in launches] == [
        ("102", 4, "/runs/slurm/102.sh", {"b": 1, "time": "4:00:00"}),
        ("101", 2, None, {"partition": "gpu"})]
    assert launches[0]["cancelled_at"] is None
    with queue.engine.begin() as conn:
        stored = conn.exec_driver_sql(
            "SELECT detail FROM launches WHERE job_id = '102'").scalar_one()
    assert stored == '{"b": 1, "time": "4:00:00"}'  # keys sorted: one text per detail
    with queue.engine.begin() as conn:  # a launch recorded without any detail
        conn.exec_driver_sql("UPDATE launches SET detail = NULL WHERE job_id = '7'")
    assert queue.launches("other")[0]["detail"] == {}


def test_cancelling_a_launch_touches_only_that_schedulers_launch_and_keeps_its_time(queue):
    queue.record_launch("slurm", "101", 2, None, {})
    queue.record_launch("other", "101", 2, None, {})
    assert queue.cancel_launch("slurm", "101")
    first = queue.launches("slurm")[0]["cancelled_at"]
    assert first is not None
    assert queue.launches("other")[0]["cancelled_at"] is None
    assert not queue.launch_cancelled("other", "101")
    assert queue.cancel_launch("slurm", "101")  # cancelling again: still cancelled, same time
    assert queue.launches("slurm")[0]["cancelled_at"] == first


def test_config_changes_name_each_changed_leaf_by_its_dotted_key():
    old = {"seed": 1, "training": {"lr": 0.001, "steps": 30}, "model": {"n_embd": 64}}
    new = {"seed": 1, "training": {"lr": 0.002, "steps": 30.0}, "data": {"n": 256}}
    assert config_changes(old, new) == [
        'data: (absent) -> {"n": 256}',
        'model: {"n_embd": 64} -> (absent)',
        "training.lr: 0.001 -> 0.002",
        "training.steps: 30 -> 30.0",  # equal numbers of another type are a change too
    ]
    assert config_changes(old, old) == []


def test_config_changes_sort_keys_of_mixed_types_as_text():
    assert config_changes({1: "a", "b": 2}, {1: "x", "b": 2}) == ['1: "a" -> "x"']


@pytest.mark.parametrize("name, host", [
    ("node7:0:4242", "node7"), ("node7:cpu:4242", "node7"),
    ("fe80::1:cuda:0:4242", "fe80::1:cuda"),  # a host with colons keeps them
    ("node7:4242", None), ("node7", None), ("", None), (None, None)])
def test_the_host_of_a_worker_is_its_name_less_gpu_and_pid(name, host):
    assert worker_host(name) == host


def test_a_queue_keeps_the_identity_it_was_made_with(db_url):
    first = JobQueue(connect(db_url, create=True))
    made = first.queue_id()
    first.engine.dispose()
    again = JobQueue(connect(db_url))
    assert again.queue_id() == made and len(made) >= 16
    again.engine.dispose()


def test_resume_says_whether_the_queue_was_paused(queue):
    assert queue.resume() is False
    queue.pause()
    assert queue.paused() is not None
    assert queue.resume() is True
    assert queue.paused() is None and queue.resume() is False


def test_a_failure_without_the_lease_is_refused_in_one_line(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    claim = queue.claim("w", 600)
    queue.fail(claim, "boom")
    with pytest.raises(LeaseLost, match=r"run1: lease lost; failure not recorded$"):
        queue.fail(claim, "again")
    assert queue.jobs()[0]["error"] == "boom"


def test_claims_are_counted_per_worker(queue):
    queue.plan(rows("V=5", "N=256"))
    for worker in ("a", "b", "a"):
        queue.claim(worker, 600)
    assert queue.claims_by_worker() == {"a": 2, "b": 1}


def test_a_database_that_cannot_be_reached_is_named_without_its_password():
    engine = create_engine("postgresql+psycopg://runner:s3cret@127.0.0.1:1/sweep")
    with pytest.raises(DatabaseError) as refused:
        JobQueue(engine).counts()
    assert str(refused.value).startswith(
        "database 'postgresql+psycopg://runner:***@127.0.0.1:1/sweep': connection failed: ")
    assert str(refused.value).endswith("Connection refused")
    assert "s3cret" not in str(refused.value)


def test_the_never_claimed_pending_jobs_are_counted_per_group(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2") + rows("V=20", "N=256", "model=gpt2")
               + rows("V=5", "N=4096", "model=gpt2", overrides=["training.batch_size=8"])
               + rows("V=5", "N=512", "model=gpt2", overrides=["training.train_steps=7"]))
    jobs = {j["name"]: j for j in queue.jobs()}
    first, second = queue.claim("w", 600), queue.claim("w", 600)
    queue.fail(first, "boom")
    queue.release(second, 0)  # pending again, but claimed once: not counted

    def key(job):
        return job["v"], job["model"], job["total_steps"], job["cost"]

    expected: dict = {}
    for name, job in jobs.items():
        if not name.endswith(("V5_N256_run1", "V5_N256_run2")):
            expected[key(job)] = expected.get(key(job), 0) + 1
    assert len(expected) == 4 and len({k[3] for k in expected}) == 4
    found = {key(g): g["jobs"] for g in queue.unclaimed_pending()}
    assert found == expected


def test_a_heartbeat_records_who_beat_and_marks_the_worker_busy_with_its_job(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    queue.register_worker("w", "h", 1, None, "cpu", 600.0)
    claim = queue.claim("w", 600)
    with queue.engine.begin() as conn:  # last seen long ago: the beat must renew it
        conn.exec_driver_sql("UPDATE workers SET seen_at = seen_at - 100, state = 'idle'")
    assert queue.heartbeat(claim) == Lease(True, None)
    beat = queue.events()[-1]
    assert (beat["kind"], beat["worker"], beat["token"], beat["attempt"]) == (
        "heartbeat", "w", claim.token, 1)
    (worker,) = queue.workers()
    assert (worker["state"], worker["job"]) == ("busy", claim.name)
    assert worker["seen_age"] < 50 and worker["alive"]


def test_a_heartbeat_passes_on_the_stop_asked_for_and_resume_withdraws_only_a_pause(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2"))
    paused, cancelled = queue.claim("a", 600), queue.claim("b", 600)
    queue.cancel([cancelled.name])
    queue.pause(now=True)
    assert queue.heartbeat(paused) == Lease(True, "pause")
    assert queue.heartbeat(cancelled) == Lease(True, "cancel")
    assert queue.resume() is True
    assert queue.heartbeat(paused) == Lease(True, None)
    assert queue.heartbeat(cancelled) == Lease(True, "cancel")
    queue.release(paused, 3)
    assert queue.heartbeat(paused) == Lease(False, None)


def test_a_plain_pause_asks_no_job_back_and_pause_now_records_whom_it_asked(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2"))
    first, second = queue.claim("a", 600), queue.claim("b", 600)
    assert queue.pause() == []
    assert queue.heartbeat(first) == Lease(True, None)
    assert [e for e in queue.events() if e["kind"] == "pause"] == []
    queue.cancel([second.name])              # a job already asked to stop is not asked again
    assert queue.pause(now=True) == [first.name]
    assert [(e["job_id"], json.loads(e["detail"])) for e in queue.events()
            if e["kind"] == "pause"] == [(first.id, {"asked": "a"})]


def test_a_release_without_the_lease_is_refused_in_one_line(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    claim = queue.claim("w", 600)
    queue.release(claim, 2)
    with pytest.raises(LeaseLost, match=r"run1: lease lost; not released$"):
        queue.release(claim, 3)
    assert queue.jobs()[0]["step"] == 2


def test_events_are_read_oldest_first_for_the_queue_or_one_job(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2"))
    first, second = queue.claim("w", 600), queue.claim("w", 600)
    queue.heartbeat(first)
    every = queue.events()
    assert [e["id"] for e in every] == sorted(e["id"] for e in every)
    assert [(e["kind"], e["job_id"]) for e in queue.events(first.id)] == [
        (e["kind"], e["job_id"]) for e in every if e["job_id"] == first.id]
    assert {e["job_id"] for e in queue.events(second.id)} == {second.id}
