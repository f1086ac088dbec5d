"""A dead worker, as status and requeue see it, and a cancel that came too late: each on both
backends, with real worker processes and real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from runner.liveness import HOST, _pid_exists, dead_reason, process_token
from testing.audit import lease_violations
from tests.support.commands import PYTHON, ROOT, cli, dead_pid, long_job, start_worker
from tests.support.queues import rows
from tests.support.waiting import wait_for
from trainer import checkpoint as ckpt

LONG = "table_connectivity_standard_V5_N256_run1"


@pytest.mark.slow
def test_a_sigkilled_worker_is_not_live_and_its_job_can_be_requeued(db_url, tmp_path):
    queue = long_job(db_url, tmp_path)
    victim = start_worker(db_url, "--lease", "600")
    try:
        wait_for(lambda: queue.jobs()[0]["step"] >= 40, what="progress")
        assert json.loads(cli(db_url, "status", "--json").stdout)["progress"][
            "live_workers"] == 1
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    gone = f"its process {victim.pid} is gone"
    doc = json.loads(cli(db_url, "status", "--json").stdout)
    assert (doc["progress"]["live_workers"], doc["progress"]["eta_seconds"]) == (0, None)
    (worker,) = doc["workers"]
    assert (worker["state"], worker["alive"], worker["dead"]) == ("busy", False, gone)
    text = cli(db_url, "status").stdout
    assert "workers:" not in text and "ETA unknown: no live worker" in text
    assert f"STALE: worker dead: {gone}" in text
    assert "or: requeue --name NAME" in text
    # What status advises works: the job goes back to pending at once, checkpoint kept.
    step = queue.jobs()[0]["step"]
    proc = cli(db_url, "requeue", "--name", LONG)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"requeued 1 job(s): {LONG}"
    (job,) = queue.jobs()
    assert (job["state"], job["attempts"], job["lease_token"]) == ("pending", 0, None)
    assert job["step"] == step and ckpt.list_states(job["out_dir"])
    reclaim = [e for e in queue.events() if e["kind"] == "reclaim"]
    assert [json.loads(e["detail"]) for e in reclaim] == [
        {"reason": gone, "by": "requeue", "to": "pending"}]
    assert lease_violations(queue.events()) == []


def test_requeue_takes_a_dead_workers_job_and_never_a_live_ones(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2"))
    dead = queue.claim(f"{HOST}:cpu:{dead_pid()}", 600)
    queue.progress(dead, 7, 0.5)
    with pytest.raises(ValueError, match=r"is running .* wait \d+s for its lease"):
        queue.requeue([dead.name])  # no liveness rule given: the lease decides
    assert queue.requeue([dead.name], host=HOST, is_dead=dead_reason) == [dead.name]
    job = next(j for j in queue.jobs() if j["name"] == dead.name)
    assert (job["state"], job["step"], job["attempts"], job["lease_token"]) == (
        "pending", 7, 0, None)
    assert not queue.heartbeat(dead)  # the dead attempt's lease is over
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        for worker in (f"{HOST}:cpu:{os.getpid()}", f"{HOST}:cpu:{sleeper.pid}",
                       f"elsewhere:cpu:{dead_pid()}"):  # alive here; a pid of another host
            live = queue.claim(worker, 600)
            with pytest.raises(ValueError, match="is running"):
                queue.requeue([live.name], host=HOST, is_dead=dead_reason)
            assert queue.heartbeat(live)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert queue.counts()["running"] == 3
    assert lease_violations(queue.events()) == []


def test_a_cancel_that_came_too_late_is_reported(queue, db_url):
    queue.plan(rows("V=5", "N=256", "model=gpt2"))
    late = queue.claim("w1", 600)
    paused = queue.claim("w2", 600)
    assert queue.cancel([late.name]).asked == [late.name]
    queue.pause(now=True)
    queue.finish(late, {"accuracy": 0.75, "balanced_accuracy": 0.7, "majority_rate": 0.5})
    queue.finish(paused, {"accuracy": 0.5, "balanced_accuracy": 0.5, "majority_rate": 0.5})
    text = cli(db_url, "status").stdout
    assert f"cancel came too late (1; the job ended first): {late.name} (succeeded)" in text
    rows_by_name = {r["name"]: r for r in json.loads(cli(db_url, "status", "--json").stdout)[
        "jobs"]}
    assert rows_by_name[late.name]["stop_request"] == "cancel"
    assert rows_by_name[paused.name]["stop_request"] is None  # a pause is not reported
    # Requeued, it runs again like any job.
    queue.resume()
    assert queue.requeue([late.name]) == [late.name]
    assert "cancel came too late" not in cli(db_url, "status").stdout
    assert queue.claim("w3", 600).name == late.name


def test_a_failure_after_a_cancel_is_reported_too(queue, db_url):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    claim = queue.claim("w1", 600)
    queue.cancel([claim.name])
    queue.fail(claim, "RuntimeError: boom")
    text = cli(db_url, "status").stdout
    assert f"cancel came too late (1; the job ended first): {claim.name} (failed)" in text


@pytest.mark.slow
def test_a_worker_whose_lease_was_taken_stops_training(tmp_path):
    """Frozen (SIGSTOP) past its lease, the worker's job is taken; woken, it learns the lease
    is lost and stops at its next step: it never trains the job to the end."""
    url = f"sqlite:///{tmp_path / 'queue.sqlite'}"
    queue = long_job(url, tmp_path)
    worker = start_worker(url, "--lease", "2")
    wait_for(lambda: queue.jobs()[0]["step"] >= 20, what="progress")
    worker.send_signal(signal.SIGSTOP)
    wait_for(lambda: queue.claim("thief", 600) is not None, timeout=30, what="the takeover")
    worker.send_signal(signal.SIGCONT)
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err[-2000:]
    (job,) = queue.jobs()
    assert f"{job['name']}: lease lost (taken over); stopping this attempt" in err
    assert (job["state"], job["worker"]) == ("running", "thief")
    out = Path(job["out_dir"])
    assert not (out / ckpt.EVAL_FILE).exists()
    assert int(ckpt.list_states(out)[0].stem.split("-")[1]) < 400
    events = queue.events()
    taken = next(e for e in events if e["kind"] == "claim" and e["worker"] == "thief")
    assert [e for e in events if e["id"] > taken["id"] and e["token"] not in (None,
                                                                             taken["token"])] == []


# --- the process identity behind a worker's name ------------------------------------------


def test_a_process_token_is_its_boot_and_start_time_even_behind_an_odd_name(tmp_path):
    """/proc/PID/stat puts the command name in parentheses, and a name may hold ') ' and
    numbers: the fields are read after the last one. The start time is checked against the
    clock (boot time + ticks), so reading another field would show."""
    odd = tmp_path / "w) 1 2 3"
    shutil.copy(shutil.which("sleep"), odd)
    proc = subprocess.Popen([str(odd), "30"])
    try:
        boot, ticks = process_token(proc.pid).rsplit(":", 1)
        assert boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        started = btime + int(ticks) / os.sysconf("SC_CLK_TCK")
        assert abs(started - time.time()) < 5, (started, time.time())
        assert process_token(proc.pid) == f"{boot}:{ticks}"  # the same process: the same token
    finally:
        proc.kill()
        proc.wait()
    assert process_token(proc.pid) is None  # gone


def test_looking_at_a_pid_sends_nothing_and_a_process_one_may_not_signal_exists():
    # SIGHUP as by default, even under nohup (whose ignoring it a child would inherit).
    proc = subprocess.Popen(["sleep", "30"],
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        assert _pid_exists(proc.pid)
        time.sleep(0.3)
        assert proc.poll() is None  # no signal reached it (SIGHUP would end a sleep)
    finally:
        proc.kill()
        proc.wait()
    assert not _pid_exists(proc.pid)
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    # As another user, signalling pid 1 is refused: refused means it exists.
    # (everything it needs loaded first: the new user may not read this Python's files)
    code = "import os; from runner.liveness import _pid_exists; _pid_exists(os.getpid()); " \
           "os.setuid(65534); print(_pid_exists(1))"
    check = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, check=False)
    assert check.stdout.strip() == "True", check.stderr

