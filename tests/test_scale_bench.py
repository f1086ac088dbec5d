"""bench/scale.py as its docs run it, on a small SQLite queue: real worker processes with
the stand-in job drain the jobs once each, without torch, and the figures are the run's."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support.commands import PYTHON, ROOT, cli


def scale(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "bench/scale.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_the_scale_benchmark_drains_its_jobs_once_each_without_torch(tmp_path):
    proc = scale("--db", str(tmp_path / "q.sqlite"), "--workers", "3", "--jobs", "9",
                 "--job-seconds", "0.5", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    assert {k: got[k] for k in ("db", "workers", "jobs", "job_seconds", "ideal_seconds",
                                "double_runs", "lost_jobs", "worker_crashes",
                                "workers_with_torch")} == {
        "db": "sqlite", "workers": 3, "jobs": 9, "job_seconds": 0.5, "ideal_seconds": 1.5,
        "double_runs": 0, "lost_jobs": 0, "worker_crashes": 0, "workers_with_torch": 0}
    assert abs(got["efficiency"] - 1.5 / got["wall_seconds"]) < 0.01 and got["efficiency"] <= 1
    assert got["claims"] >= 9 and got["claim_ms_p50"] <= got["claim_ms_p99"]
    assert 0 < got["worker_peak_rss_mb"] < 200   # no torch in a stand-in worker


def test_the_scale_benchmark_refuses_a_queue_that_holds_jobs(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    planned = cli(url, "plan", "--profile", "smoke", "--only", "V=5", "--only", "N=256",
                  "--out-root", str(tmp_path / "runs"))
    assert planned.returncode == 0, planned.stderr
    proc = scale("--db", url, "--workers", "1", "--jobs", "1")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {url} holds 6 jobs, 6 events: give a new "
                                   "database, or --i-know-this-deletes to empty it")


def test_the_queue_size_benchmark_fills_as_it_says_and_times_every_read(tmp_path):
    proc = subprocess.run([PYTHON, "bench/queue_size.py", "--sizes", "300", "--repeats", "1",
                           "--claims", "5", "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    # 300 planned; 280 claimed, 30 of them failed and 200 finished; 10 heartbeats a job.
    assert (got["jobs"], got["events"], got["claims"]) == (300, 300 + 280 + 30 + 200 + 3000, 5)
    timed = ["cli_status_s", "cli_status_json_s", "cli_results_s", "api_status_s",
             "api_latest_s", "api_results_s", "api_job_s"]
    assert all(got[k] > 0 for k in timed) and got["notes"] == []
    assert 0 < got["claim_p50_ms"] <= got["claim_p99_ms"]
