"""Workers as a SLURM job array, on a real single-node SLURM (testing/slurmcluster.py).

One cluster per test session, with fake GPUs. Where it cannot start, these tests skip
with the reason, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from db import JobQueue, connect
from runner.slurm import array
from testing import slurmcluster
from tests.support.commands import PYTHON, ROOT, plan, refused_line, runner_env, start_worker
from tests.support.queues import new_pg_database
from tests.support.skips import throwaway_server
from tests.support.training import same_result_as_uninterrupted
from tests.support.waiting import wait_for
from trainer import checkpoint as ckpt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def slurm_conf():
    with throwaway_server("SLURM cluster", "runner-slurm-", slurmcluster.start,
                          slurmcluster.stop) as (_, conf):
        yield conf


@pytest.fixture
def env(slurm_conf, tmp_path) -> dict:
    return {**runner_env(f"sqlite:///{tmp_path / 'queue.sqlite'}"), "SLURM_CONF": slurm_conf}


def run(env, *args, timeout=300, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "runner", *args], cwd=cwd,
                          env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=timeout)


def slurm(env, *args) -> str:
    proc = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def plan_in(env, tmp_path, *args) -> JobQueue:
    """`plan` into the queue of `env` (a whole environment, as `run` takes it)."""
    proc = run(env, "plan", "--profile", "smoke", "--out-root", str(tmp_path / "runs"), *args)
    assert proc.returncode == 0, proc.stderr
    return JobQueue(connect(env["RUNNER_DB"]))


def submit(env, *args) -> str:
    proc = run(env, "slurm", "submit", "--cpu", "--gpus-per-worker", "1",
               "--cpus-per-worker", "1", *args)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert job_id.isdigit(), proc.stdout
    return job_id


def array_tasks(env, job_id) -> dict[str, str]:
    """'JOB_TASK' -> squeue state (tasks SLURM no longer holds are absent)."""
    out = slurm(env, "squeue", "-h", "-r", "-j", job_id, "-o", "%i %T")
    return dict(line.split() for line in out.splitlines())


def wait_for_array_end(env, job_id, timeout=300):
    wait_for(lambda: not array_tasks(env, job_id), timeout, f"SLURM job {job_id} to end")


def release_requeued(env, job_id) -> None:
    """A requeued task waits ~2 minutes before SLURM starts it again; tests skip the wait."""
    for task, state in array_tasks(env, job_id).items():
        if state == "PENDING":
            subprocess.run(["scontrol", "update", f"jobid={task}", "StartTime=now"], env=env,
                           capture_output=True)


def wait_releasing(env, job_id, predicate, timeout, what):
    """wait_for, starting the array's requeued tasks at once."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        release_requeued(env, job_id)
        time.sleep(0.5)


def slurm_logs(tmp_path, job_id) -> str:
    return "\n".join(p.read_text() for p in
                     sorted((tmp_path / "runs" / "logs").glob(f"slurm-{job_id}_*.log")))


def step_of(queue, name) -> int:
    return next(j["step"] for j in queue.jobs() if j["name"] == name)


# --- the script ----------------------------------------------------------------------------


def test_dry_run_script_for_gpu_workers(env, tmp_path):
    plan_in(env, tmp_path, "--only", "V=5", "--only", "N=256")
    proc = run(env, "slurm", "submit", "--workers", "4", "--parallel", "2", "--time", "1:30:00",
               "--partition", "low", "--cpus-per-worker", "8", "--mem", "32G", "--account",
               "lab", "--qos", "normal", "--sbatch-arg=--constraint=a100", "--grace", "90",
               "--signal", "USR1", "--lease", "30", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    db = f"sqlite:///{tmp_path / 'queue.sqlite'}"
    for line in ("#SBATCH --array=0-3%2", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@90",
                 "#SBATCH --open-mode=append", "#SBATCH --gres=gpu:1",
                 f"#SBATCH --output={tmp_path / 'runs' / 'logs'}/slurm-%A_%a.log",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G", "#SBATCH --partition=low",
                 "#SBATCH --time=1:30:00", "#SBATCH --account=lab", "#SBATCH --qos=normal",
                 "#SBATCH --constraint=a100", f"cd {ROOT}", f"export RUNNER_DB={db}",
                 f"exec {PYTHON} -m runner worker --gpu 0 --lease 30"):
        assert line in script.splitlines(), (line, script)
    assert not list((tmp_path / "runs").glob("logs/*.sh")), "a dry run writes nothing"
    assert JobQueue(connect(db)).launches("slurm") == []


def test_dry_run_script_for_cpu_workers_has_no_gpu_request(env, tmp_path):
    plan_in(env, tmp_path, "--only", "V=5", "--only", "N=256")
    # A relative SQLite path is made absolute: the tasks run in the project's folder.
    proc = run(env, "--db", "queue.sqlite", "slurm", "submit", "--workers", "2", "--cpu",
               "--time", "30", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "#SBATCH --array=0-1" in lines and "#SBATCH --time=30" in lines
    assert "#SBATCH --signal=B:TERM@120" in lines
    assert not any("--gres" in line for line in lines)
    assert f"export RUNNER_DB=sqlite:///{tmp_path / 'queue.sqlite'}" in lines
    assert lines[-1] == (f"exec {PYTHON} -m runner "
                         "worker --gpu cpu")


def test_a_dry_run_where_no_cluster_answers_still_shows_the_script(env, tmp_path):
    plan_in(env, tmp_path, "--only", "V=5", "--only", "N=256")
    nowhere = {**env, "SLURM_CONF": str(tmp_path / "no-such-slurm.conf")}
    proc = run(nowhere, "slurm", "submit", "--workers", "2", "--cpu", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].endswith("worker --gpu cpu")
    [note] = proc.stderr.strip().splitlines()
    assert note.startswith("note: the partition was not checked (sinfo: ") and \
        "sinfo: sinfo:" not in note, note
    assert refused_line(run(nowhere, "slurm", "submit", "--workers", "2", "--cpu")).startswith(
        "error: sinfo: ")


def test_multi_node_partitions_need_postgresql_and_shared_folders(env, tmp_path,
                                                                   pg_server_url):
    plan_in(env, tmp_path, "--only", "V=5", "--only", "N=256")
    line = refused_line(run(env, "slurm", "submit", "--workers", "2", "--partition", "multi",
                            "--dry-run"))
    assert line == ("error: the partition spans 2 nodes, but the queue is a SQLite file (one "
                    "host only): use PostgreSQL (--db postgresql+psycopg://...; README, "
                    "'Several machines')")
    pg = {**env, "RUNNER_DB": new_pg_database(pg_server_url)}
    plan_in(pg, tmp_path / "tmpfolders", "--only", "V=5", "--only", "N=256")
    line = refused_line(run(pg, "slurm", "submit", "--workers", "2", "--partition", "multi",
                            "--dry-run"))
    assert re.fullmatch(r"error: the partition spans 2 nodes, but job folder /tmp/\S+ is on a "
                        r"node-local filesystem \(\w+\): plan with --out-root on a shared "
                        r"filesystem; --force submits anyway", line), line
    # Folders outside /tmp: beside the checkout, or in the home folder when the checkout
    # itself is under /tmp (a throwaway clone), which is then refused first.
    checkout_local = array.node_local(str(ROOT))
    shared = (Path.home() if checkout_local else ROOT / "runs") / f"test-slurm-{os.getpid()}"
    try:
        pg = {**env, "RUNNER_DB": new_pg_database(pg_server_url)}
        proc = run(pg, "plan", "--profile", "smoke", "--only", "V=5", "--only", "N=256",
                   "--out-root", str(shared))
        assert proc.returncode == 0, proc.stderr
        line = refused_line(run(pg, "slurm", "submit", "--workers", "8", "--partition",
                                "multi", "--dry-run"))
        if checkout_local:
            assert line == (f"error: the partition spans 2 nodes, but the checkout {ROOT} is "
                            f"on a node-local filesystem ({checkout_local}): run from a "
                            "checkout on a shared filesystem; --force submits anyway"), line
        else:  # the test's PostgreSQL listens on localhost: each node would reach only itself
            assert re.fullmatch(r"error: the partition spans 2 nodes, but the queue's database "
                                r"host is (localhost|127\.0\.0\.1|a local socket): each node "
                                r"would reach only itself; name the host by a name every node "
                                r"resolves; --force submits anyway", line), line
        proc = run(pg, "slurm", "submit", "--workers", "8", "--partition", "multi", "--dry-run",
                   "--force")
        assert proc.returncode == 0, proc.stderr
        assert "#SBATCH --partition=multi" in proc.stdout.splitlines()
        assert "#SBATCH --nodes=1" in proc.stdout.splitlines()  # one worker, one node
        assert "#SBATCH --array=0-5" in proc.stdout.splitlines()  # 6 jobs: 6 workers
        assert "note: 8 worker(s) asked for 6 unfinished job(s): submitting 6" in proc.stderr
        assert "export RUNNER_DB=postgresql+psycopg://runner@" in proc.stdout
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.parametrize("args, message", [
    (["--time", "0"], "error: --time '0': expected MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
                      "D-HH:MM:SS, more than zero"),
    (["--time", "1:2:3:4"], "error: --time '1:2:3:4': expected MINUTES, MM:SS, HH:MM:SS, D-HH, "
                            "D-HH:MM or D-HH:MM:SS, more than zero"),
    (["--time", "2", "--grace", "120"], "error: --grace 120s is not shorter than --time 2: "
                                        "the workers would be told to stop before they start"),
    (["--mem", "lots"], "error: --mem 'lots': expected a size as sbatch takes it: megabytes, "
                        "or a number with K, M, G or T (16G)"),
    (["--partition", "nosuch"], "error: --partition nosuch: no such partition (sinfo lists "
                                "none)"),
])
def test_bad_submissions_are_refused_in_one_line(env, tmp_path, args, message):
    queue = plan_in(env, tmp_path, "--only", "V=5", "--only", "N=256")
    assert refused_line(run(env, "slurm", "submit", "--workers", "1", *args)) == message
    assert not (tmp_path / "runs" / "logs").exists()  # no script left behind
    assert queue.launches("slurm") == []


def test_the_time_forms_sbatch_takes_reach_the_script(env, tmp_path):
    plan_in(env, tmp_path, "--only", "V=5", "--only", "N=256")
    for form in ("30:00", "1-12", "2-0", "1-0:30", "100:00:00", "1:2:3"):
        proc = run(env, "slurm", "submit", "--workers", "1", "--time", form, "--dry-run")
        assert proc.returncode == 0, proc.stderr
        assert f"#SBATCH --time={form}" in proc.stdout.splitlines()


def test_nothing_pending_or_no_sbatch_is_refused(env, tmp_path):
    queue = plan_in(env, tmp_path, "--only", "V=5", "--only", "N=256")
    no_slurm = {**env, "PATH": str(Path(PYTHON).parent)}
    assert refused_line(run(no_slurm, "slurm", "submit", "--workers", "1")) == (
        "error: no `sbatch` on PATH: run this on a SLURM login node (or load its module)")
    assert run(env, "cancel", "--pending").returncode == 0
    assert refused_line(run(env, "slurm", "submit", "--workers", "1")) == (
        "error: nothing pending or running in the queue: no workers to submit (python -m "
        "runner status)")
    assert queue.launches("slurm") == []


# --- real arrays -------------------------------------------------------------------------


def test_an_array_runs_a_smoke_slice_each_worker_on_its_own_gpu(env, tmp_path):
    queue = plan_in(env, tmp_path, "--only", "V=5", "--only", "N=256", "--only", "run=1")
    job_id = submit(env, "--workers", "2")
    wait_for_array_end(env, job_id)
    jobs = queue.jobs()
    assert [(j["state"], j["claims"]) for j in jobs] == [("succeeded", 1)] * 2
    workers = sorted(queue.workers(), key=lambda w: w["slurm_array"])
    assert [(w["slurm_array"], w["gpus"], w["slurm_restarts"], w["state"]) for w in workers] == [
        (f"{job_id}_0", "0", 0, "exited"), (f"{job_id}_1", "1", 0, "exited")]
    assert all(w["slurm_job_id"].isdigit() for w in workers)
    # Smoke jobs take a second: one worker may run both before the other starts.
    assert {j["worker"] for j in jobs} <= {w["name"] for w in workers}
    [launch] = queue.launches("slurm")
    assert (launch["job_id"], launch["tasks"]) == (job_id, 2)
    assert Path(launch["script"]).read_text().startswith("#!/bin/bash")
    text = run(env, "slurm", "status").stdout
    assert f"SLURM job {job_id}: 2 task(s), submitted" in text
    assert f"task {job_id}_1:" in text and "GPUs 1, restarts 0" in text


def test_preempted_workers_hand_back_and_resume_bit_identically(env, tmp_path):
    queue = plan_in(env, tmp_path, "--only", "V=5", "--only", "N=256", "--only", "run=1",
                    "--set", "training.train_steps=2000", "--set", "training.save_every_steps=20")
    job_id = submit(env, "--workers", "2")
    names = [j["name"] for j in queue.jobs()]
    wait_for(lambda: all(step_of(queue, n) >= 40 for n in names), 240, "both jobs training")
    rows = json.loads(run(env, "status", "--json").stdout)["workers"]
    assert sorted((w["slurm_array"], w["gpus"], w["slurm_restarts"]) for w in rows) == [
        (f"{job_id}_0", "0", 0), (f"{job_id}_1", "1", 0)]
    assert f"SLURM task {job_id}_1 (job " in run(env, "status").stdout
    # A higher-priority job asking for both GPUs preempts the array (PreemptMode=REQUEUE).
    high = slurm(env, "sbatch", "--parsable", "-p", "high", "--gres=gpu:2", "-o", "/dev/null",
                 "--wrap", "sleep 2").strip()
    wait_for(lambda: not array_tasks(env, high), 180, "the high-priority job")
    wait_for(lambda: all(j["state"] == "pending" for j in queue.jobs()), 60, "hand-backs")
    steps = {n: step_of(queue, n) for n in names}
    assert all(0 < s < 2000 for s in steps.values()), steps
    wait_releasing(env, job_id, lambda: not array_tasks(env, job_id), 900,
                   "the requeued array to finish")
    jobs = queue.jobs()
    assert [(j["state"], j["attempts"], j["claims"]) for j in jobs] == [("succeeded", 1, 2)] * 2
    logs = slurm_logs(tmp_path, job_id)
    assert logs.count("SIGTERM: stopping after the current step") >= 2, logs
    assert logs.count("back to pending at step") >= 2, logs
    restarted = [w for w in queue.workers() if w["slurm_restarts"]]
    assert len(restarted) >= 2
    for job in jobs:
        same_result_as_uninterrupted(job, tmp_path / job["name"])


def test_at_the_time_limit_workers_hand_back_and_requeue_themselves(env, tmp_path):
    queue = plan_in(env, tmp_path, "--only", "V=5", "--only", "N=256", "--only", "run=1",
                    "--only", "model=gpt2", "--set", "training.train_steps=20000",
                    "--set", "training.save_every_steps=20")
    # SLURM checks time limits every 30 s and sends the --signal up to 30 s before it is
    # due: with a 1-minute limit it could come the moment a task starts, before its worker
    # has claimed. With 2 minutes and 60 s of grace it comes 30-60 s into a run.
    job_id = submit(env, "--workers", "1", "--time", "2", "--grace", "60")
    [job] = queue.jobs()

    def resumed_after_a_hand_back() -> bool:
        """A release (the job handed back at the signal), then a claim by the task SLURM
        restarted, which trained on from the released step. (A signal that comes while a
        worker still starts up stops it before it claims: that run releases nothing.)"""
        events = queue.events(job["id"])
        release = next((e for e in events if e["kind"] == "release"), None)
        if release is None:
            return False
        step = json.loads(release["detail"])["step"]
        later = [e for e in events if e["kind"] == "claim" and e["id"] > release["id"]]
        return step > 0 and bool(later) and step_of(queue, job["name"]) > step

    # SLURM's own delay before a requeued task starts again (~2 minutes), not skipped here:
    # a task started early by `scontrol update StartTime=now` gets its time-limit signal
    # within seconds (seen with SLURM 22.05), before a worker on a busy machine claims.
    wait_for(resumed_after_a_hand_back, 600,
             "the job handed back at the limit and resumed by the requeued task")
    logs = slurm_logs(tmp_path, job_id)
    assert "SIGTERM: stopping after the current step" in logs, logs
    assert f"SLURM task {job_id}_0 requeued" in logs, logs
    assert any(w["slurm_restarts"] for w in queue.workers())
    assert run(env, "cancel", job["name"]).returncode == 0  # enough: the cycle is proven
    wait_releasing(env, job_id, lambda: not array_tasks(env, job_id), 200, "the array to end")
    [job] = queue.jobs()
    assert job["state"] == "cancelled" and job["claims"] >= 2
    assert job["attempts"] <= 1  # hand-backs at the limit gave their attempts back


def test_slurm_cancel_mid_job_loses_nothing(env, tmp_path):
    queue = plan_in(env, tmp_path, "--only", "V=5", "--only", "N=256", "--only", "run=1",
                    "--set", "training.train_steps=5000", "--set", "training.save_every_steps=10")
    job_id = submit(env, "--workers", "3")  # two workers run, a third waits for a GPU
    names = [j["name"] for j in queue.jobs()]
    wait_for(lambda: all(step_of(queue, n) >= 20 for n in names), 240, "both jobs training")
    proc = run(env, "slurm", "cancel", "--grace", "60")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"SLURM job {job_id} cancelled: 2 running worker(s) "
                                   "signalled to hand their jobs back")
    assert not array_tasks(env, job_id)
    jobs = queue.jobs()
    assert [(j["state"], j["attempts"]) for j in jobs] == [("pending", 0)] * 2
    for job in jobs:
        assert job["step"] >= 20 and ckpt.list_states(Path(job["out_dir"]))
    assert "not requeueing task" in slurm_logs(tmp_path, job_id)
    assert queue.launches("slurm")[0]["cancelled_at"] is not None
    assert len(queue.workers()) == 2  # the third task never started a worker


def test_a_task_of_two_workers_runs_two_jobs_and_slurm_cancel_hands_both_back(env, tmp_path):
    """--workers-per-gpu 2: one task, two workers (worker --processes 2); the stop signal
    SLURM sends the task's process reaches both, and the task decides its requeue once."""
    queue = plan_in(env, tmp_path, "--only", "V=5", "--only", "N=256", "--only", "run=1",
                    "--set", "training.train_steps=5000", "--set", "training.save_every_steps=10")
    job_id = submit(env, "--workers", "4", "--workers-per-gpu", "2")  # cut to 1 task
    names = [j["name"] for j in queue.jobs()]
    wait_for(lambda: all(step_of(queue, n) >= 20 for n in names), 240, "both jobs training")
    assert sorted(w["slurm_array"] for w in queue.workers()) == [f"{job_id}_0"] * 2
    proc = run(env, "slurm", "cancel", "--grace", "60")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"SLURM job {job_id} cancelled: 1 running task(s) of 2 "
                                   "workers signalled to hand their jobs back")
    assert not array_tasks(env, job_id)
    jobs = queue.jobs()
    assert [(j["state"], j["attempts"]) for j in jobs] == [("pending", 0)] * 2
    for job in jobs:
        assert job["step"] >= 20 and ckpt.list_states(Path(job["out_dir"]))
    logs = slurm_logs(tmp_path, job_id)
    assert logs.count("SIGTERM: stopping after the current step") == 2, logs
    assert logs.count("not requeueing task") == 1, logs  # the task's word, not each worker's


def test_slurm_cancel_skips_a_launch_that_ended_and_cancels_the_live_one(env, tmp_path):
    queue = plan_in(env, tmp_path, "--only", "V=5", "--only", "N=256", "--only", "run=1")
    queue.record_launch("slurm", "999999", 2, None, {})  # long gone: SLURM forgot its id
    # Tasks that wait an hour to start: a live launch, and no training in this test.
    job_id = submit(env, "--workers", "2", "--sbatch-arg=--begin=now+3600")
    assert set(array_tasks(env, job_id).values()) == {"PENDING"}
    proc = run(env, "slurm", "cancel", "--grace", "10")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "SLURM job 999999 had ended already: nothing to cancel",
        f"SLURM job {job_id} cancelled: 0 running worker(s) signalled to hand their jobs back"]
    assert not array_tasks(env, job_id)
    assert {la["job_id"]: la["cancelled_at"] is not None for la in queue.launches("slurm")} == {
        "999999": False, job_id: True}
    assert [j["state"] for j in queue.jobs()] == ["pending"] * 2


def test_a_plain_scancel_is_honoured_the_job_handed_back(env, tmp_path):
    queue = plan_in(env, tmp_path, "--only", "V=5", "--only", "N=256", "--only", "run=1",
                    "--only", "model=gpt2", "--set", "training.train_steps=5000",
                    "--set", "training.save_every_steps=10")
    job_id = submit(env, "--workers", "1")
    [name] = [j["name"] for j in queue.jobs()]
    wait_for(lambda: step_of(queue, name) >= 20, 240, "the job training")
    slurm(env, "scancel", job_id)  # SIGTERM now, SIGKILL after KillWait
    wait_for_array_end(env, job_id, 60)
    [job] = queue.jobs()
    assert (job["state"], job["attempts"]) == ("pending", 0)
    assert ckpt.list_states(Path(job["out_dir"]))
    assert f"SLURM task {job_id}_0 is " in slurm_logs(tmp_path, job_id)  # not requeued


def test_a_task_killed_outright_is_reclaimed_at_once_by_the_next_worker(env, tmp_path):
    queue = plan_in(env, tmp_path, "--only", "V=5", "--only", "N=256", "--only", "run=1",
                    "--only", "model=gpt2", "--set", "training.train_steps=3000",
                    "--set", "training.save_every_steps=10")
    # A long lease: waiting for it to expire would outlast the test.
    first = submit(env, "--workers", "1", "--lease", "900")
    [name] = [j["name"] for j in queue.jobs()]
    wait_for(lambda: step_of(queue, name) >= 20, 240, "the job training")
    # SIGKILL straight to the worker, as the kernel's OOM killer would send it (scancel
    # itself sends SIGTERM first, whatever signal it is given).
    [worker] = queue.workers()
    os.kill(worker["pid"], signal.SIGKILL)
    wait_for(lambda: not array_tasks(env, first), 60, "the killed task to end")
    assert [j["state"] for j in queue.jobs()] == ["running"]
    second = submit(env, "--workers", "1", "--lease", "900")
    wait_for_array_end(env, second, 900)
    [job] = queue.jobs()
    assert (job["state"], job["claims"]) == ("succeeded", 2)
    kinds = [e["kind"] for e in queue.events(job["id"])]
    assert kinds.count("reclaim") == 1, kinds
    assert "reclaimed at once" in slurm_logs(tmp_path, second)


def test_a_tasks_worker_shows_no_queue_url_to_ps_and_threads_as_slurm_allocated(env, tmp_path):
    """Every user of a node reads a process's arguments (`ps -eo args`); only its owner its
    environment. No --cpus-per-worker: SLURM sets no SLURM_CPUS_PER_TASK, and the worker
    takes the CPUs SLURM put on the node for it, not every core."""
    queue = plan_in(env, tmp_path, "--only", "V=5", "--only", "N=256", "--only", "run=1",
                    "--only", "model=gpt2", "--set", "training.train_steps=3000")
    proc = run(env, "slurm", "submit", "--cpu", "--gpus-per-worker", "1", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    try:
        [name] = [j["name"] for j in queue.jobs()]
        wait_for(lambda: step_of(queue, name) >= 1, 240, "the job training")
        [worker] = queue.workers()
        proc_dir = Path("/proc") / str(worker["pid"])
        args = (proc_dir / "cmdline").read_bytes().split(b"\0")
        environ = dict(item.decode().partition("=")[::2] for item in
                       (proc_dir / "environ").read_bytes().split(b"\0") if item)
    finally:
        slurm(env, "scancel", job_id)
    url = env["RUNNER_DB"]
    assert b"--db" not in args and not any(url.encode() in a for a in args), args
    assert b"worker" in args and environ["RUNNER_DB"] == url
    assert "SLURM_CPUS_PER_TASK" not in environ
    wait_for_array_end(env, job_id)
    cpus = int(environ["SLURM_CPUS_ON_NODE"])
    assert f", {cpus} thread{'s' * (cpus > 1)} (SLURM_CPUS_ON_NODE), SLURM job" in (
        slurm_logs(tmp_path, job_id))


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGHUP])
def test_the_signals_clusters_send_before_a_limit_make_a_worker_hand_back(tmp_path, sig):
    url = f"sqlite:///{tmp_path / 'queue.sqlite'}"
    queue = plan(url, tmp_path / "runs", "--only", "V=5", "--only", "N=256", "--only", "run=1",
                 "--only", "model=gpt2", "--set", "training.train_steps=5000",
                 "--set", "training.save_every_steps=10")
    [name] = [j["name"] for j in queue.jobs()]
    worker = start_worker(url)
    wait_for(lambda: step_of(queue, name) >= 20, 240, "the job training")
    worker.send_signal(sig)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    assert f"{sig.name}: stopping after the current step" in err
    [job] = queue.jobs()
    assert (job["state"], job["attempts"]) == ("pending", 0)
    assert 20 <= job["step"] < 5000


def test_a_task_of_a_cancelled_launch_that_starts_late_claims_nothing(tmp_path):
    """A task SLURM starts after `slurm cancel` marked its launch (one that was pending
    between the cancel's steps, say) exits without claiming. No cluster needed: the task's
    variables are SLURM's, the launch is the queue's."""
    url = f"sqlite:///{tmp_path / 'queue.sqlite'}"
    queue = plan(url, tmp_path / "runs", "--only", "V=5", "--only", "N=256", "--only", "run=1")
    queue.record_launch("slurm", "4242", 2, None, {})
    queue.cancel_launch("slurm", "4242")
    task = {"SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "1"}
    proc = subprocess.run([PYTHON, "-m", "runner", "worker", "--gpu", "cpu"], cwd=ROOT,
                          env={**runner_env(url), **task}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "SLURM job 4242 was cancelled (python -m runner slurm cancel): not claiming" in (
        proc.stderr)
    assert [(j["state"], j["claims"]) for j in queue.jobs()] == [("pending", 0)] * 2
    [worker] = queue.workers()
    assert (worker["slurm_job_id"], worker["state"]) == ("4243", "exited")
