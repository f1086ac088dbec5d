"""`worker --processes K`: K workers sharing a device under one parent, real processes on a
real queue: each claims its own job, a stop signal to the parent reaches each member once
(each hands its job back with a checkpoint), and bad input is one line from the parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from runner.group import threads_each
from tests.support.commands import PYTHON, ROOT, cli, plan, runner_env
from tests.support.waiting import wait_for


def two_long_jobs(db_url, tmp_path):
    return plan(db_url, tmp_path / "runs", "--only", "V=5", "--only", "N=256", "--only", "run=1",
                "--set", "training.train_steps=400", "--set", "training.save_every_steps=20")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_k_workers_share_a_device_and_a_stop_signal_reaches_each_once(tmp_path, stop):
    db_url = f"sqlite:///{tmp_path / 'q.sqlite'}"  # the group is the same on any queue
    queue = two_long_jobs(db_url, tmp_path)
    # In a process group of its own, as on a terminal: a Ctrl-C goes to the whole group.
    parent = subprocess.Popen([PYTHON, "-m", "runner", "worker", "--gpu", "cpu", "--threads", "1",
                               "--processes", "2"], cwd=ROOT, env=runner_env(db_url),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        wait_for(lambda: all(j["state"] == "running" and j["step"] >= 20 for j in queue.jobs()),
                 180, "both jobs training at once")
        workers = json.loads(cli(db_url, "status", "--json").stdout)["workers"]
        assert sorted(w["state"] for w in workers if w["alive"]) == ["busy", "busy"]
        assert len({j["worker"] for j in queue.jobs()}) == 2  # a member each
        members = {int(w["name"].rsplit(":", 1)[1]) for w in workers}
        assert parent.pid not in members
        # Each in a session of its own: a terminal's Ctrl-C reaches the parent alone, which
        # passes it on once (reaching a member twice, it would exit at once, unsaved).
        assert len({os.getsid(pid) for pid in members} - {os.getsid(parent.pid)}) == 2
    finally:
        os.killpg(parent.pid, stop)  # the terminal's way; SLURM signals the parent alone
        _, err = parent.communicate(timeout=120)
    assert parent.returncode == 0, err[-3000:]
    # Once each: a second Ctrl-C would have made a member exit at once, without a checkpoint.
    assert err.count(f"{stop.name}: stopping after the current step") == 2, err[-3000:]
    for job in queue.jobs():
        assert (job["state"], job["attempts"]) == ("pending", 0), job
        assert 20 <= job["step"] < 400
    releases = [e for e in queue.events() if e["kind"] == "release"]
    assert sorted(json.loads(e["detail"])["reason"] for e in releases) == [
        f"signal {stop.name}"] * 2


def test_a_group_refuses_bad_input_in_one_line(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    two_long_jobs(db_url, tmp_path)
    for args, expected in [
        (["--gpu", "7"], "error: --gpu 7: "),
        (["--gpu", "x"], "error: --gpu 'x': expected a GPU index (0, 1, ...) or 'cpu'"),
        (["--gpu", "cpu", "--cache-dir", "$RUNNER_NOT_SET_ANYWHERE/x"],
         "error: --cache-dir '$RUNNER_NOT_SET_ANYWHERE/x': $RUNNER_NOT_SET_ANYWHERE is not "
         "set here"),
    ]:
        proc = cli(db_url, "worker", "--processes", "2", *args)
        [line] = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and line.startswith(expected), proc.stderr


def test_a_cache_dir_names_variables_of_the_node_it_runs_on(tmp_path, monkeypatch):
    """'$SLURM_TMPDIR/runner' given on the login node is expanded where the worker runs."""
    from runner.cli import expand_variables

    monkeypatch.setenv("RUNNER_TEST_NODE_TMP", str(tmp_path))
    assert expand_variables("$RUNNER_TEST_NODE_TMP/runner", "--cache-dir") == f"{tmp_path}/runner"
    assert expand_variables("${RUNNER_TEST_NODE_TMP}/r", "--cache-dir") == f"{tmp_path}/r"
    assert expand_variables("/plain/path", "--cache-dir") == "/plain/path"


def test_each_member_gets_its_share_of_the_cpus():
    assert [threads_each(k, 8) for k in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
