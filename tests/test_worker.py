"""Real worker processes on real SQLite files: concurrency, SIGKILL, SIGTERM."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from testing.audit import finishes_per_job, lease_violations
from tests.support.commands import cli, dead_pid, long_job, plan, start_worker
from tests.support.training import same_result_as_uninterrupted
from tests.support.waiting import wait_for
from trainer import checkpoint as ckpt

pytestmark = pytest.mark.slow


def test_four_workers_run_the_smoke_sweep_each_job_once(db_url, tmp_path):
    queue = plan(db_url, tmp_path / "runs")
    workers = [start_worker(db_url) for _ in range(4)]
    for w in workers:
        _, err = w.communicate(timeout=900)
        assert w.returncode == 0, err[-2000:]
    assert queue.counts() == {"pending": 0, "running": 0, "succeeded": 60, "failed": 0,
                              "cancelled": 0}
    events = queue.events()
    assert set(finishes_per_job(events).values()) == {1}
    assert len(finishes_per_job(events)) == 60
    assert lease_violations(events) == []
    workers_seen = {j["worker"].rsplit(":", 1)[1] for j in queue.jobs()}
    assert len(workers_seen) > 1
    for job in queue.jobs():
        assert (Path(job["out_dir"]) / ckpt.EVAL_FILE).exists()


def test_sigkilled_worker_job_is_taken_over_and_resumes(db_url, tmp_path):
    queue = long_job(db_url, tmp_path)
    victim = start_worker(db_url, "--lease", "2")
    wait_for(lambda: queue.jobs()[0]["step"] >= 60, what="progress")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    (job,) = queue.jobs()
    assert job["state"] == "running"
    time.sleep(2.5)  # past the dead worker's lease: its job is claimable again
    heir = start_worker(db_url, "--lease", "2")
    _, err = heir.communicate(timeout=300)
    assert heir.returncode == 0, err[-2000:]
    (job,) = queue.jobs()
    assert (job["state"], job["attempts"]) == ("succeeded", 2)
    claims = [json.loads(e["detail"]) for e in queue.events() if e["kind"] == "claim"]
    assert claims[1]["step"] >= 60
    log = (Path(job["out_dir"]) / ckpt.LOG_FILE).read_text()
    assert "=== attempt 2 by worker" in log and "resuming at step" in log
    assert lease_violations(queue.events()) == []
    same_result_as_uninterrupted(job, tmp_path)


def test_sigterm_puts_the_job_back_and_exits_0(db_url, tmp_path):
    queue = long_job(db_url, tmp_path)
    worker = start_worker(db_url)
    wait_for(lambda: queue.jobs()[0]["step"] >= 30, what="progress")
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err[-2000:]
    (job,) = queue.jobs()
    assert (job["state"], job["attempts"]) == ("pending", 0)
    assert 30 <= job["step"] < 400
    assert ckpt.list_states(Path(job["out_dir"]))[0].name == f"state-{job['step']:07d}.pt"
    stopped_at = job["step"]
    again = start_worker(db_url)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    (job,) = queue.jobs()
    assert job["state"] == "succeeded"
    log = (Path(job["out_dir"]) / ckpt.LOG_FILE).read_text()
    assert log.count("=== attempt 1 by worker") == 1 and log.count("=== attempt 2 by worker") == 1
    # history: a claim each, who ran it, how far and how it ended
    shown = json.loads(cli(db_url, "history", "standard_V5", "--json").stdout)
    first, second = shown["claims"]
    assert (first["claim"], first["outcome"], first["why"]) == (1, "handed back",
                                                                "signal SIGTERM")
    assert first["worker"].endswith(f":cpu:{worker.pid}") and first["step"] == stopped_at
    assert (second["claim"], second["outcome"], second["why"]) == (2, "succeeded", None)
    assert second["worker"].endswith(f":cpu:{again.pid}")
    assert first["ended_at"] <= second["started_at"] <= second["ended_at"]
    text = cli(db_url, "history", job["name"]).stdout.splitlines()
    assert text[0] == f"{job['name']}: 2 claim(s)" and len(text) == 5
    assert "handed back" in text[3] and str(stopped_at) in text[3] and "signal SIGTERM" in text[3]
    same_result_as_uninterrupted(job, tmp_path)


def test_a_failing_job_is_marked_failed_and_the_worker_goes_on(db_url, tmp_path):
    queue = plan(db_url, tmp_path / "runs", "--only", "V=5", "--only", "N=256", "--only",
                 "model=gpt2")
    first = queue.jobs()[0]
    # A file where the job's folder should be: training cannot start.
    Path(first["out_dir"]).parent.mkdir(parents=True)
    Path(first["out_dir"]).write_text("not a folder")
    worker = start_worker(db_url)
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err[-2000:]
    assert queue.counts() == {"pending": 0, "running": 0, "succeeded": 2, "failed": 1,
                              "cancelled": 0}
    failed = [j for j in queue.jobs() if j["state"] == "failed"][0]
    assert failed["name"] == first["name"]
    assert "FileExistsError" in failed["error"] and "Traceback" in failed["traceback"]
    status = cli(db_url, "status")
    assert "failed:" in status.stdout and "FileExistsError" in status.stdout


def test_status_json_matches_the_contract(db_url, tmp_path):
    plan(db_url, tmp_path / "runs", "--only", "V=5", "--only", "N=256")
    out = json.loads(cli(db_url, "status", "--json").stdout)
    assert out["counts"] == {"pending": 6, "running": 0, "succeeded": 0, "failed": 0,
                             "cancelled": 0}
    job = out["jobs"][0]
    for key in ("name", "state", "attempts", "step", "total_steps", "worker", "test_accuracy",
                "error", "out_dir"):
        assert key in job
    assert job["name"] == "table_connectivity_standard_V5_N256_run1"


def test_a_dead_workers_job_is_taken_at_once_by_a_worker_on_its_host(db_url, tmp_path):
    queue = long_job(db_url, tmp_path)
    victim = start_worker(db_url, "--lease", "600")
    wait_for(lambda: queue.jobs()[0]["step"] >= 60, what="progress")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    started = time.monotonic()
    heir = start_worker(db_url, "--lease", "600")
    wait_for(lambda: queue.jobs()[0]["worker"].endswith(f":cpu:{heir.pid}"), timeout=60,
             what="the heir's claim")
    assert time.monotonic() - started < 10  # not after the 600 s lease
    _, err = heir.communicate(timeout=300)
    assert heir.returncode == 0, err[-2000:]
    assert f"process {victim.pid} is gone" in err
    (job,) = queue.jobs()
    assert (job["state"], job["attempts"]) == ("succeeded", 2)
    (reclaim,) = [e for e in queue.events() if e["kind"] == "reclaim"]
    assert reclaim["worker"].endswith(f":cpu:{victim.pid}")
    assert json.loads(reclaim["detail"])["reason"] == f"its process {victim.pid} is gone"
    assert lease_violations(queue.events()) == []
    same_result_as_uninterrupted(job, tmp_path)


def test_held_jobs_are_named_and_stale_ones_marked(db_url, tmp_path):
    from runner.liveness import HOST

    queue = plan(db_url, tmp_path / "runs", "--only", "V=5", "--only", "N=256", "--only",
                 "model=gpt2")
    dead = f"{HOST}:cpu:{dead_pid()}"
    queue.claim("elsewhere:0:4242", 600)                 # another host: waits for its lease
    queue.claim(dead, 600)                               # this host, process gone
    queue.claim("elsewhere:1:4243", 1)                   # silent past its 1 s lease
    time.sleep(1.5)
    status = cli(db_url, "status")
    lines = {line.split()[0]: line for line in status.stdout.splitlines()
             if line.startswith("table_connectivity")}
    run1, run2, run3 = (lines[f"table_connectivity_standard_V5_N256_run{r}"] for r in (1, 2, 3))
    assert "STALE" not in run1
    assert f"STALE: worker dead: its process {dead.rsplit(':', 1)[1]} is gone" in run2
    assert "STALE: no heartbeat for" in run3 and "(lease 1s)" in run3
    stale = {j["name"][-4:]: j["stale"] for j in json.loads(
        cli(db_url, "status", "--json").stdout)["jobs"]}
    assert stale["run1"] is None and stale["run3"].startswith("no heartbeat")
    # A worker here takes the dead worker's job at once and the expired one, then says
    # which job is still held, by whom, and when its lease ends.
    worker = start_worker(db_url, "--lease", "30")
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err[-2000:]
    assert queue.counts()["succeeded"] == 2
    assert ("nothing left to claim: 1 job(s) held by other workers; earliest lease expiry in "
            in err)
    assert "(table_connectivity_standard_V5_N256_run1, worker elsewhere:0:4242); use --wait" \
        in err


def test_an_idle_worker_counts_as_live(db_url, tmp_path):
    queue = plan(db_url, tmp_path / "runs", "--only", "V=5", "--only", "N=256", "--only",
                 "model=gpt2",
                 "--only", "run=1")
    queue.claim("elsewhere:0:4242", 600)
    worker = start_worker(db_url, "--wait")
    try:
        wait_for(lambda: any(w["alive"] for w in queue.workers()), what="registration")
        status = json.loads(cli(db_url, "status", "--json").stdout)
        assert status["progress"]["live_workers"] == 1
        (w,) = status["workers"]
        assert (w["state"], w["job"], w["name"]) == ("idle", None, f"{w['name'].split(':')[0]}"
                                                                   f":cpu:{worker.pid}")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=30)
    assert worker.returncode == 0
    assert [w["state"] for w in queue.workers()] == ["exited"]
    (w,) = json.loads(cli(db_url, "status", "--json").stdout)["workers"]  # still listed
    assert (w["name"], w["state"], w["alive"]) == (f"{w['name'].split(':')[0]}:cpu:"
                                                   f"{worker.pid}", "exited", False)


def test_a_worker_whose_every_job_failed_exits_non_zero(db_url, tmp_path):
    queue = plan(db_url, tmp_path / "runs", "--only", "V=5", "--only", "N=256", "--only",
                 "model=gpt2",
                 "--only", "run=1")
    out_dir = Path(queue.jobs()[0]["out_dir"])
    out_dir.parent.mkdir(parents=True)
    out_dir.write_text("not a folder")
    worker = start_worker(db_url)
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 1
    assert err.strip().splitlines()[-1] == ("error: every job this worker ran failed (1); see "
                                            "`python -m runner status`")
