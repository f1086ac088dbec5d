"""What `plan` stores in a new job's row and what `jobs` reads back, on every backend: the
config as canonical JSON, the overrides as planned, the database's time of planning, a
moved folder reported as a change; `plan --replace` resetting every changed job but a
running one, with its events; rows in the guide's order (positions, not ids), without the
config and traceback when not asked for, and each row's ages on the database's clock. On
SQLite: a read never waits for the write lock, progress waits for it only briefly."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest

from db import DatabaseError, JobQueue, connect
from db.engine import BUSY_TIMEOUT_ENV
from tests.support.queues import digest, last_planned_first, rows

ONE = ("V=5", "N=256", "model=gpt2", "run=1")


def stored(queue, column: str) -> list:
    with queue.engine.connect() as conn:
        return [r[0] for r in conn.exec_driver_sql(f"SELECT {column} FROM jobs ORDER BY id")]


def test_plan_stores_the_config_sorted_the_overrides_and_when_it_was_planned(queue):
    (row,) = rows(*ONE, overrides=["training.train_steps=7"])
    row["config"] = dict(reversed(list(row["config"].items())))  # keys out of order
    assert list(row["config"]) != sorted(row["config"])
    before = time.time()
    queue.plan([row])
    after = time.time()
    assert stored(queue, "config") == [json.dumps(row["config"], sort_keys=True)]
    assert stored(queue, "overrides") == ['["training.train_steps=7"]']
    (job,) = queue.jobs()
    assert before - 1 <= job["created_at"] <= after + 1
    assert (job["state"], job["attempts"], job["claims"], job["step"]) == ("pending", 0, 0, 0)


def test_a_job_planned_again_into_another_folder_is_changed_from_old_to_new(queue):
    (row,) = rows(*ONE, out_root="/srv/a")
    queue.plan([row])
    (moved,) = rows(*ONE, out_root="/srv/b")
    report = queue.plan([moved])
    assert report.changed == {row["name"]: [f"folder: {row['out_dir']} -> {moved['out_dir']}"]}
    assert (report.new, report.existing) == ([], [])


STEPS = ["training.train_steps: 30 -> 7"]


def test_replace_resets_every_changed_job_but_the_running_one_and_records_why(queue):
    planned = rows("V=5", "N=256", "model=gpt2")
    queue.plan(planned)
    running = queue.claim("w", 600)
    assert running.name == planned[0]["name"]
    changed = rows("V=5", "N=256", "model=gpt2", overrides=["training.train_steps=7"])
    moved = []
    report = queue.plan(changed, replace=True, move_aside=moved.append)
    names = [row["name"] for row in planned]
    assert report.changed == dict.fromkeys(names, STEPS)
    assert (report.running, report.replaced) == (names[:1], names[1:])
    assert moved == [row["out_dir"] for row in planned[1:]]
    jobs = queue.jobs()
    assert [job["state"] for job in jobs] == ["running", "pending", "pending"]
    assert [job["config"]["training"]["train_steps"] for job in jobs] == [30, 7, 7]
    # Stored as sorted JSON; a plan event has no detail.
    replaced = [(e["job_id"], e["detail"]) for e in queue.events() if e["kind"] == "replace"]
    detail = json.dumps({"changes": STEPS, "from": "pending"})
    assert replaced == [(jobs[1]["id"], detail), (jobs[2]["id"], detail)]
    assert {e["detail"] for e in queue.events() if e["kind"] == "plan"} == {None}


def test_a_dry_run_replace_reports_every_job_it_would_reset_and_writes_nothing(queue, db_url):
    queue.plan(rows("V=5", "N=256", "model=gpt2"))
    before = digest(db_url)
    changed = rows("V=5", "N=256", "model=gpt2", overrides=["training.train_steps=7"])
    moved = []
    report = queue.plan(changed, dry_run=True, replace=True, move_aside=moved.append)
    assert report.replaced == [row["name"] for row in changed]
    assert (moved, digest(db_url)) == ([], before)


def test_jobs_are_read_in_position_order_not_in_the_order_planned(queue):
    planned = last_planned_first(rows("V=5", "N=256", "model=gpt2"))
    queue.plan(planned)
    names = [row["name"] for row in reversed(planned)]
    assert [job["name"] for job in queue.jobs()] == names
    assert [job["name"] for job in queue.jobs(config=False)] == names
    assert [job["name"] for job in queue.jobs(offset=1, limit=1)] == names[1:2]


def test_jobs_without_config_leave_out_the_config_and_the_traceback_only(queue):
    queue.plan(rows(*ONE))
    (whole,) = queue.jobs()
    (light,) = queue.jobs(config=False)
    assert set(whole) - set(light) == {"config", "traceback"}
    assert set(queue.jobs(columns=["state", "state"])[0]) == {"id", "state"}


@pytest.mark.parametrize("column, age", [("claimed_at", "claimed_age"),
                                          ("heartbeat_at", "heartbeat_age")])
def test_each_running_job_has_its_age_on_the_databases_clock(queue, column, age):
    queue.plan(rows("V=5", "N=256", "model=gpt2"))
    queue.claim("w", 600)
    with queue.engine.begin() as conn:  # claimed, and last beat, 100 s ago
        conn.exec_driver_sql(f"UPDATE jobs SET {column} = {column} - 100 "
                             "WHERE state = 'running'")
    ages = [job[age] for job in queue.jobs()]
    assert ages[1:] == [None, None]
    assert 100 <= ages[0] < 110


@pytest.fixture
def sqlite_queue(tmp_path, monkeypatch):
    """A SQLite queue whose writers wait 10 s for the lock, and a held write lock's release."""
    monkeypatch.setenv(BUSY_TIMEOUT_ENV, "10")
    path = tmp_path / "queue.sqlite"
    queue = JobQueue(connect(f"sqlite:///{path}", create=True))
    queue.plan(rows("V=5", "N=256", "model=gpt2"))
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    yield queue, blocker
    blocker.close()
    queue.engine.dispose()


def test_a_read_does_not_wait_for_the_write_lock(sqlite_queue):
    queue, blocker = sqlite_queue
    blocker.execute("BEGIN IMMEDIATE")  # a worker's write under way
    assert len(queue.jobs()) == 3


def test_progress_gives_up_on_the_lock_long_before_a_claim_would(sqlite_queue):
    queue, blocker = sqlite_queue
    claim = queue.claim("w", 600)
    blocker.execute("BEGIN IMMEDIATE")
    release = threading.Timer(5, blocker.rollback)  # the lock is held for 5 s
    release.start()
    try:
        with pytest.raises(DatabaseError, match="locked"):  # progress waits about 2 s
            queue.progress(claim, 3, 0.5)
        assert queue.claim("w2", 600) is not None  # a claim waits up to 10 s: it came free
    finally:
        release.join()  # never left to touch the connection after the fixture closed it
