"""The queue through PgBouncer in transaction-pooling mode: what a site runs in front of a
default PostgreSQL when workers outnumber its connections. Three workers share a pool of two
server connections; every statement runs on whichever server connection is free, so any
state kept in a server session (prepared statements, session settings, advisory locks held
across transactions) would break here."""

from __future__ import annotations

import json
import subprocess

from sqlalchemy.engine import make_url

from tests.support.commands import PYTHON, ROOT, cli, runner_env
from tests.support.queues import new_pg_database


def test_a_sweep_slice_runs_through_pgbouncer(pg_server_url, pgbouncer_url, tmp_path):
    database = make_url(new_pg_database(pg_server_url)).database
    url = f"{pgbouncer_url}/{database}"
    plan = cli(url, "plan", "--profile", "smoke", "--only", "V=5", "--only", "N=256",
               "--out-root", str(tmp_path / "runs"))
    assert plan.returncode == 0, plan.stderr
    workers = [subprocess.Popen([PYTHON, "-m", "runner", "worker", "--gpu", "cpu", "--threads",
                                 "1", "--lease", "20"], cwd=ROOT, env=runner_env(url),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for _ in range(3)]
    errors = [w.communicate(timeout=300)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], errors
    status = json.loads(cli(url, "status", "--json").stdout)
    assert status["counts"]["succeeded"] == 6
    assert all(j["attempts"] == 1 for j in status["jobs"])   # each job ran once
    # The readers ran through the pooler too, read-only per transaction.
    results = cli(url, "results", "--json")
    assert results.returncode == 0, results.stderr
    assert sum(row["runs_finished"] for row in json.loads(results.stdout)["rows"]) == 6
