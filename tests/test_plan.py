"""Planning as a user meets it: folders that do not depend on where a command runs, and a
changed config reported once, with its keys, and applied only on request."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from db import JobQueue, connect
from tests.support.commands import cli, refused_line
from tests.support.queues import folder_digest, unrelated_database
from trainer import checkpoint as ckpt

ONE_CELL = ["--profile", "smoke", "--only", "V=5", "--only", "N=256"]


@pytest.mark.slow
def test_folders_are_absolute_so_any_directory_finds_them(db_url, tmp_path):
    planner, elsewhere = tmp_path / "planner", tmp_path / "elsewhere"
    planner.mkdir()
    elsewhere.mkdir()
    proc = cli(db_url, "plan", *ONE_CELL, "--only", "model=gpt2", "--only", "run=1",
               "--out-root", "runs", cwd=planner)
    assert proc.returncode == 0, proc.stderr
    queue = JobQueue(connect(db_url))
    (job,) = queue.jobs()
    expected = planner / "runs" / "table_connectivity" / job["name"]
    assert job["out_dir"] == str(expected)
    worker = cli(db_url, "worker", "--gpu", "cpu", "--threads", "1", cwd=elsewhere)
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert (expected / ckpt.EVAL_FILE).is_file()
    assert not (elsewhere / "runs").exists()
    for args in (["logs", "run1"], ["results"]):
        proc = cli(db_url, *args, cwd=elsewhere)
        assert proc.returncode == 0 and "no readable" not in proc.stderr, proc.stderr
    assert "finished: test accuracy" in cli(db_url, "logs", "run1", cwd=elsewhere).stdout
    plot = cli(db_url, "plot", "--out", "fig.png", cwd=elsewhere)
    assert plot.returncode == 0 and (elsewhere / "curves" / "curves_V5_N256.png").is_file()


def test_a_changed_config_is_reported_once_with_its_keys_and_nothing_changes(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    runs = str(tmp_path / "runs")
    assert cli(url, "plan", *ONE_CELL, "--out-root", runs).returncode == 0
    queue = JobQueue(connect(url))
    before = queue.jobs()
    proc = cli(url, "plan", "--profile", "smoke", "--only", "V=5", "--out-root", runs,
               "--set", "training.learning_rate=1e30")
    line = refused_line(proc)
    assert proc.stdout == ""
    assert line.startswith("error: 6 job(s) are queued with a different config: "
                           "training.learning_rate: 0.0001 -> 1e+30; nothing planned.")
    assert line.endswith("--set training.learning_rate=1e30 --replace")
    after = queue.jobs()
    assert len(after) == 6  # the 24 new jobs of the same command were not planned either
    assert [j["config"] for j in after] == [j["config"] for j in before]


def test_an_older_config_names_the_key_it_lacks(tmp_path):
    """A queue planned before tokens were truncated: its jobs are changed, not mixed in."""
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    runs = str(tmp_path / "runs")
    assert cli(url, "plan", *ONE_CELL, "--out-root", runs).returncode == 0
    queue = JobQueue(connect(url))
    with queue.engine.begin() as conn:
        for job in queue.jobs():
            old = job["config"]
            del old["model"]["truncated_dims"]
            conn.exec_driver_sql("UPDATE jobs SET config = ? WHERE id = ?",
                                 (json.dumps(old, sort_keys=True), job["id"]))
    line = refused_line(cli(url, "plan", *ONE_CELL, "--out-root", runs))
    assert "6 job(s) are queued with a different config: " in line
    assert "model.truncated_dims: (absent) -> 5 (3 jobs); model.truncated_dims: (absent) -> 4 " \
           "(3 jobs)" in line


def test_replace_applies_the_change_and_keeps_the_old_folders(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    runs = tmp_path / "runs"
    assert cli(url, "plan", *ONE_CELL, "--out-root", str(runs)).returncode == 0
    queue = JobQueue(connect(url))
    jobs = {j["name"]: j for j in queue.jobs()}
    done, failed, running = list(jobs)[:3]
    for name, outcome in ((done, "finish"), (failed, "fail"), (running, None)):
        claim = queue.claim(f"w-{name}", 600)
        assert claim.name == name
        Path(claim.out_dir).mkdir(parents=True)
        (Path(claim.out_dir) / "eval.json").write_text('{"accuracy": 0.5}')
        if outcome == "finish":
            queue.finish(claim, {"accuracy": 0.5})
        elif outcome == "fail":
            queue.fail(claim, "boom")
    proc = cli(url, "plan", *ONE_CELL, "--out-root", str(runs), "--set",
               "training.train_steps=40", "--replace")
    assert proc.returncode == 0, proc.stderr
    assert "planned 6 jobs: 0 new, 0 already queued, 5 replaced" in proc.stdout
    assert f"1 changed job(s) are running and were left as they are: {running}" in proc.stderr
    after = {j["name"]: j for j in queue.jobs()}
    for name in (done, failed):
        job = after[name]
        assert (job["state"], job["total_steps"], job["attempts"]) == ("pending", 40, 0)
        assert job["test_accuracy"] is None and job["error"] is None
        assert not Path(job["out_dir"]).exists()
        (aside,) = Path(job["out_dir"]).parent.glob(f"{name}.replaced-*")
        assert json.loads((aside / "eval.json").read_text()) == {"accuracy": 0.5}
    assert after[running]["state"] == "running" and after[running]["total_steps"] == 30
    assert Path(after[running]["out_dir"]).is_dir()
    replaced = [e for e in queue.events() if e["kind"] == "replace"]
    assert len(replaced) == 5
    assert "training.train_steps: 30 -> 40" in replaced[0]["detail"]
    # Planning the same again: nothing left to replace but the running job.
    again = cli(url, "plan", *ONE_CELL, "--out-root", str(runs), "--set",
                "training.train_steps=40", "--replace")
    assert "0 new, 5 already queued" in again.stdout and running in again.stderr


@pytest.mark.parametrize("args", [["plan", *ONE_CELL, "--out-root", "{tmp}/runs"],
                                  ["worker", "--gpu", "cpu"]], ids=["plan", "worker"])
def test_a_sqlite_file_of_another_program_gets_no_queue_tables(tmp_path, args):
    """As status refuses to read it, plan (and a worker) refuse to write into it."""
    db = tmp_path / "data.sqlite"
    unrelated_database(db)   # a `notes` table
    before = folder_digest(tmp_path)
    line = refused_line(cli(f"sqlite:///{db}", *[a.format(tmp=tmp_path) for a in args]))
    assert "is not a queue database (it holds other tables: notes)" in line
    assert folder_digest(tmp_path) == before   # byte-identical: no table, no WAL switch
    conn = sqlite3.connect(db)
    assert [t for (t,) in conn.execute("SELECT name FROM sqlite_master")] == ["notes"]
    conn.close()
    assert not (tmp_path / "runs").exists()
