"""What `plan` stores in a new job's row and what `jobs` reads back, on every backend: the
config as canonical JSON, the overrides as planned, the database's time of planning, a
moved folder reported as a change; rows in the guide's order (positions, not ids), without
the config and traceback when not asked for, and each row's ages on the database's clock."""

from __future__ import annotations

import json
import time

import pytest

from tests.support.queues import rows

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


def test_jobs_are_read_in_position_order_not_in_the_order_planned(queue):
    planned = rows("V=5", "N=256", "model=gpt2")
    for row, position in zip(planned, (30, 20, 10), strict=True):
        row["position"] = position
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
