"""The SLURM pieces that need no cluster, in-process: the batch script against a recorded
file, the launches' status lines from given squeue and sacct output, cancelling launches
against a stand-in for squeue and scancel, the options' checks, a task's log line.

The batch script is compared to tests/golden/slurm_array.sbatch. After a deliberate change
to the script, record it again and review the diff:

    RUNNER_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_slurm_offline.py -k golden
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from db import JobQueue, connect
from runner.slurm import array, launches, submit
from runner.slurm.array import Refused, SubmitOptions
from runner.slurm.task import SlurmTask, log_line, threads_line
from tests.support.commands import ROOT, cli, refused_line

GOLDEN = Path(__file__).parent / "golden"


def matches_golden(name: str, text: str) -> None:
    """`text` is the recorded file `name`; RUNNER_UPDATE_GOLDEN=1 records it instead."""
    path = GOLDEN / name
    if os.environ.get("RUNNER_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: record it with RUNNER_UPDATE_GOLDEN=1"
    assert text == path.read_text(), (f"the script differs from {path}; if that is meant, "
                                       "record it with RUNNER_UPDATE_GOLDEN=1 and review the diff")


def test_the_batch_script_matches_the_golden_file():
    opts = SubmitOptions(workers=8, parallel=4, partition="gpu", time="1-04:00:00",
                         gpus_per_worker=1, gpu_type="a100", workers_per_task=2,
                         cpus_per_worker=8, mem="32G", account="lab",
                         qos="normal", grace=90, signal="USR1", sbatch_args=["--exclusive"],
                         worker_args=submit.worker_args(lease=30, db_outage=900, order="cost",
                                                        cache_dir="$SLURM_TMPDIR/runner"))
    url = "postgresql+psycopg://runner:secret@dbhost/sweep"
    script = array.batch_script(opts, url, Path("/shared/runs/logs"),
                                python="/opt/checkout/.venv/bin/python",
                                shown_url="postgresql+psycopg://runner:***@dbhost/sweep",
                                root=Path("/opt/checkout"))
    matches_golden("slurm_array.sbatch", script)
    # Any user of a node reads a process's arguments (ps -eo args): the password is only in
    # the script (private to its owner), exported as the worker's $RUNNER_DB.
    [command] = [line for line in script.splitlines() if line.startswith("exec ")]
    assert "secret" not in command and " --db " not in command and "dbhost" not in command
    assert "export RUNNER_DB=postgresql+psycopg://runner:secret@dbhost/sweep" in script


def test_a_cpu_script_asks_for_no_gpu_and_quotes_what_the_shell_would_split():
    opts = SubmitOptions(workers=2, cpu=True, gpus_per_worker=0)
    script = array.batch_script(opts, "sqlite:////data/my queue.sqlite", Path("/logs"),
                                python="/usr/bin/python3", root=Path("/home/me/the checkout"))
    lines = script.splitlines()
    assert "#SBATCH --array=0-1" in lines and "#SBATCH --signal=B:TERM@120" in lines
    assert not any("--gres" in line for line in lines)
    assert "cd '/home/me/the checkout'" in lines
    assert lines[-3:-1] == ["export RUNNER_DB='sqlite:////data/my queue.sqlite'",
                            "# exec: the worker is this batch step's process, so SLURM's "
                            "signals reach it."]
    assert lines[-1] == "exec /usr/bin/python3 -m runner worker --gpu cpu"


SQUEUE = """\
120_2|120|PENDING|0:00|(Resources)
120_0|120|RUNNING|1:02|node1
120_1|120|RUNNING|0:40|node1
"""
SACCT = """\
120_0|RUNNING|00:01:02|0:0
120_3|COMPLETED|00:05:00|0:0
120_4|CANCELLED by 1000|00:00:10|0:15
120_[5-7]|PENDING|00:00:00|0:0
131_0|FAILED|00:00:01|1:0
"""


def test_tasks_from_squeue_and_sacct_output():
    found = array.parse_tasks(["120", "125"], SQUEUE, SACCT)
    assert found["125"] == []
    assert [(t["task"], t["state"], t["time"], t["reason"]) for t in found["120"]] == [
        ("120_2", "PENDING", "0:00", "(Resources)"),
        ("120_0", "RUNNING", "1:02", "node1"),
        ("120_1", "RUNNING", "0:40", "node1"),
        ("120_3", "COMPLETED", "00:05:00", "exit 0:0"),   # finished: sacct only
        ("120_4", "CANCELLED", "00:00:10", "exit 0:15"),
    ]


def worker_row(name: str, task: str, **fields) -> dict:
    return {"name": name, "slurm_array": task, "alive": False, "state": "exited", "gpus": "0",
            "slurm_restarts": 0, "job": None, **fields}


def test_status_lines_from_the_records_squeue_sacct_and_workers():
    at = 1_700_000_000
    recorded = [{"job_id": "120", "tasks": 5, "cancelled_at": None, "at": at,
                 "script": "/runs/logs/slurm-workers-1.sh",
                 "detail": {"partition": "gpu", "time": "4:00:00", "gpus_per_worker": 1,
                            "cpu": False, "signal": "TERM", "grace": 120, "workers": 5}},
                {"job_id": "131", "tasks": 1, "cancelled_at": at + 60, "at": at + 30,
                 "script": "/runs/logs/slurm-workers-2.sh", "detail": {}}]
    workers = [worker_row("n1:0:11", "120_0", state="running", gpus="0"),
               worker_row("n1:0:12", "120_0", alive=True, gpus="0", slurm_restarts=1,
                          job="table_V5_run1"),
               worker_row("n1:0:13", "120_3", gpus="1"),
               worker_row("n1:0:14", "120_9", gpus=None),      # squeue and sacct forgot it
               worker_row("n1:0:16", "120_1", state="busy", dead="its process 16 is gone"),
               worker_row("n1:cpu:15", None)]                  # not a SLURM worker
    lines = launches.describe(recorded, array.parse_tasks(["120", "131"], SQUEUE, SACCT),
                              workers)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
    assert lines == [
        f"SLURM job 120: 5 task(s), submitted {stamp}; partition=gpu, time=4:00:00, "
        "gpus_per_worker=1, cpu=false, signal=TERM, grace=120",
        "  script /runs/logs/slurm-workers-1.sh",
        "  task 120_0: running 1:02 (node1); worker n1:0:12 (live, GPUs 0, restarts 1, "
        "job table_V5_run1)",
        "  task 120_1: running 0:40 (node1); worker n1:0:16 (dead: its process 16 is gone, "
        "GPUs 0, restarts 0)",
        "  task 120_2: pending 0:00 ((Resources)); no worker yet",
        "  task 120_3: completed 00:05:00 (exit 0:0); worker n1:0:13 (exited, GPUs 1, "
        "restarts 0)",
        "  task 120_4: cancelled 00:00:10 (exit 0:15); no worker yet",
        "  task 120_9: in neither squeue nor sacct (SLURM forgot it); worker n1:0:14 (exited, "
        "GPUs -, restarts 0)",
        f"SLURM job 131: 1 task(s), submitted "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at + 30))}, cancelled "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at + 60))}; ",
        "  script /runs/logs/slurm-workers-2.sh",
        "  task 131_0: failed 00:00:01 (exit 1:0); no worker yet",
    ]


class FakeQueue:
    def __init__(self, launches=()):
        self._launches = list(launches)

    def launches(self, kind):
        return self._launches


def test_status_without_launches_says_how_to_make_one():
    assert launches.status(FakeQueue(), note=print) == [launches.NO_LAUNCHES]


def test_status_judges_a_worker_whose_process_is_gone_dead_as_status_does(monkeypatch):
    """A task's worker killed with SIGKILL was seen a moment ago: `slurm status` must not
    call it live while `status` marks its job STALE."""
    import subprocess

    from runner.liveness import HOST

    gone = subprocess.Popen(["true"])
    gone.wait()
    at = 1_700_000_000
    queue = FakeQueue([{"job_id": "120", "tasks": 1, "cancelled_at": None, "at": at,
                        "script": "s.sh", "detail": {}}])
    queue.workers = lambda: [worker_row(f"{HOST}:0:{gone.pid}", "120_0", alive=True,
                                        state="busy", process=None)]
    monkeypatch.setattr(array, "tasks", lambda ids: {"120": []})
    lines = launches.status(queue, note=print)
    assert lines[-1] == (f"  task 120_0: in neither squeue nor sacct (SLURM forgot it); "
                         f"worker {HOST}:0:{gone.pid} (dead: its process {gone.pid} is gone, "
                         "GPUs 0, restarts 0)")


def test_a_tasks_log_line_names_its_job_array_restarts_and_gpus():
    task = SlurmTask.from_environ({"SLURM_JOB_ID": "123", "SLURM_ARRAY_JOB_ID": "120",
                                   "SLURM_ARRAY_TASK_ID": "3", "SLURM_RESTART_COUNT": "1",
                                   "SLURM_JOB_GPUS": "1"})
    assert log_line(task) == ", SLURM job 123 (array 120_3, restart 1), GPUs 1"
    assert log_line(SlurmTask.from_environ({"SLURM_JOB_ID": "7"})) == (
        ", SLURM job 7 (array 7, restart 0)")
    assert log_line(None) == ""


@pytest.mark.parametrize("environ, cpus, source", [
    ({"SLURM_CPUS_PER_TASK": "4", "SLURM_CPUS_ON_NODE": "8"}, 4, "SLURM_CPUS_PER_TASK"),
    ({"SLURM_CPUS_ON_NODE": "1"}, 1, "SLURM_CPUS_ON_NODE"),  # no --cpus-per-task: one CPU
    ({"SLURM_CPUS_ON_NODE": "8", "SLURM_TASKS_PER_NODE": "4"}, 2, "SLURM_CPUS_ON_NODE/4 tasks"),
    ({"SLURM_CPUS_ON_NODE": "6", "SLURM_TASKS_PER_NODE": "3(x2)"}, 2,
     "SLURM_CPUS_ON_NODE/3 tasks"),
])
def test_a_tasks_threads_follow_the_cpus_slurm_allocated(environ, cpus, source):
    task = SlurmTask.from_environ({"SLURM_JOB_ID": "9", **environ})
    assert (task.cpus, task.cpus_from) == (cpus, source)
    assert threads_line(None, task) == f", {cpus} thread{'s' * (cpus > 1)} ({source})"
    assert threads_line(3, task) == ", 3 threads (--threads)"
    assert threads_line(None, None) == ""


def test_without_slurms_cpu_variables_a_task_uses_its_cpu_affinity():
    """Neither variable (an older SLURM, a stripped environment): the CPUs the process may
    run on, as SLURM's cgroup or affinity limits them; here `taskset -c 0` limits them."""
    if not shutil.which("taskset"):
        pytest.skip("no taskset")
    code = ("from runner.slurm.task import SlurmTask; "
            "t = SlurmTask.from_environ({'SLURM_JOB_ID': '9'}); print(t.cpus, t.cpus_from)")
    proc = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "CPU", "affinity"]


# --- the options' checks -----------------------------------------------------------------

TIME_FORMS = "MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"


@pytest.mark.parametrize("value, seconds", [
    ("30", 30 * 60),                      # MINUTES
    ("30:00", 30 * 60),                   # MM:SS
    ("0:90", 90),
    ("1:5", 65),
    ("1:30:00", 90 * 60),                 # HH:MM:SS
    ("1:2:3", 3723),
    ("100:00:00", 100 * 3600),
    ("1-12", 36 * 3600),                  # D-HH
    ("2-0", 2 * 86400),
    ("1-0:30", 86400 + 30 * 60),          # D-HH:MM
    ("1-02:03:04", 86400 + 2 * 3600 + 3 * 60 + 4),  # D-HH:MM:SS
    (" 45 ", 45 * 60),
])
def test_time_limits_in_every_form_sbatch_takes(value, seconds):
    assert array.time_seconds(value) == seconds
    assert submit.time_limit(value, grace=10) == value.strip()


@pytest.mark.parametrize("value", ["0", "0:00", "0-0", "00:00:00", "soon", "30s", "1.5", "-5",
                                   "1:2:3:4", "1-2:3:4:5", "1-", "-1:00", "1::2", ":30", "",
                                   "1-2-3", "١٢"])
def test_times_sbatch_would_not_take_or_no_time_at_all_are_refused(value):
    with pytest.raises(ValueError, match=f"expected {TIME_FORMS}, more than zero"):
        array.time_seconds(value)


def test_grace_is_checked_against_the_parsed_time():
    assert submit.time_limit("2-0", grace=120) == "2-0"
    assert submit.time_limit("2:01", grace=120) == "2:01"
    for short in ("2", "2:00", "0:120", "0-0:2"):
        with pytest.raises(Refused, match=f"--grace 120s is not shorter than --time {short}"):
            submit.time_limit(short, grace=120)
    assert submit.time_limit(None, grace=120) is None


@pytest.mark.parametrize("value", ["16G", "16g", "16GB", "16gb", "512", "0", "16K", "2T",
                                   "1024M", "16MB"])
def test_memory_as_sbatch_takes_it(value):
    submit.check_memory(value)


@pytest.mark.parametrize("value", ["lots", "1.5G", "16GiB", "16P", "16B", "16 G", "-1", "",
                                   "G", "16GBB"])
def test_memory_sbatch_would_refuse_is_refused(value):
    with pytest.raises(Refused, match="expected a size as sbatch takes it"):
        submit.check_memory(value)


def test_bad_time_or_memory_is_refused_in_one_line_before_anything_is_written(tmp_path):
    url = f"sqlite:///{tmp_path / 'queue.sqlite'}"
    assert refused_line(cli(url, "slurm", "submit", "--workers", "1", "--time", "soon")) == (
        f"error: --time 'soon': expected {TIME_FORMS}, more than zero")
    assert refused_line(cli(url, "slurm", "submit", "--workers", "1", "--time", "2:00")) == (
        "error: --grace 120s is not shorter than --time 2:00: the workers would be told to "
        "stop before they start")
    assert refused_line(cli(url, "slurm", "submit", "--workers", "1", "--mem", "lots")) == (
        "error: --mem 'lots': expected a size as sbatch takes it: megabytes, or a number "
        "with K, M, G or T (16G)")
    assert refused_line(cli(url, "slurm", "submit", "--workers", "1", "--gpus-per-worker",
                            "2")) == (
        "error: --gpus-per-worker 2: a worker trains on one GPU; ask for one per worker and "
        "more workers (--workers), or several workers per GPU (--workers-per-gpu)")
    assert refused_line(cli(url, "slurm", "submit", "--workers", "1", "--cpu", "--gpu-type",
                            "a100")) == (
        "error: --gpu-type a100 with --cpu: the workers ask for no GPU")
    assert refused_line(cli(url, "slurm", "submit", "--workers", "1", "--gpu-type",
                            "a100:2")) == (
        "error: --gpu-type 'a100:2': expected a GPU type as the cluster names it (letters, "
        "digits, '_', '.', '-'; e.g. a100)")
    assert refused_line(cli(url, "slurm", "submit", "--workers", "1", "--gpus-per-worker",
                            "0")) == (
        "error: --gpus-per-worker 0 without --cpu: the workers would look for a GPU they "
        "were not given; add --cpu to train on the CPU")
    assert list(tmp_path.iterdir()) == []  # no queue, no script, no logs folder


def test_slurm_cancel_creates_no_queue_in_a_database_without_one(db_url, tmp_path):
    proc = cli(db_url, "slurm", "cancel")
    assert proc.returncode == 2, proc.stderr
    if db_url.startswith("sqlite"):
        assert not (tmp_path / "queue.sqlite").exists()
        (tmp_path / "queue.sqlite").touch()  # an empty file: a database with no tables
        assert "is not a queue database" in refused_line(cli(db_url, "slurm", "cancel"))
        assert (tmp_path / "queue.sqlite").stat().st_size == 0
    else:
        assert "is not a queue database" in refused_line(proc)
        engine = create_engine(db_url)
        assert inspect(engine).get_table_names() == []
        engine.dispose()


# --- cancelling launches -------------------------------------------------------------------


class FakeSlurm:
    """squeue and scancel (array._run) of a cluster holding `live` launches: id -> {task:
    state}. An id it does not hold is answered as SLURM answers for a job that ended and was
    purged. A hand-back signal ends the running tasks (their workers exit)."""

    def __init__(self, live: dict[str, dict[str, str]]):
        self.live, self.calls = live, []

    def __call__(self, cmd: list[str], what: str, timeout: float = 60) -> str:
        self.calls.append(cmd)
        job = cmd[-1] if cmd[0] == "scancel" else cmd[cmd.index("-j") + 1]
        if job not in self.live:
            raise array.SlurmError(
                "squeue: slurm_load_jobs error: Invalid job id specified" if cmd[0] == "squeue"
                else f"scancel: error: Kill job error on job id {job}: Invalid job id specified")
        tasks = self.live[job]
        if cmd[0] == "squeue":
            return "".join(f"{t}|{job}|{state}|0:10|vm\n" for t, state in tasks.items())
        ending = ("PENDING",) if "--state=PENDING" in cmd else (
            ("RUNNING",) if "--batch" in cmd else ("PENDING", "RUNNING"))
        self.live[job] = {t: s for t, s in tasks.items() if s not in ending}
        if not self.live[job]:
            del self.live[job]
        return ""


@pytest.fixture
def sqlite_queue(tmp_path) -> JobQueue:
    queue = JobQueue(connect(f"sqlite:///{tmp_path / 'queue.sqlite'}", create=True))
    yield queue
    queue.engine.dispose()


def test_cancel_skips_launches_that_ended_and_stops_the_live_ones(sqlite_queue, monkeypatch):
    for job_id in ("8", "12", "15"):
        sqlite_queue.record_launch("slurm", job_id, 2, None, {})
    slurm = FakeSlurm({"12": {"12_0": "RUNNING", "12_1": "PENDING"}, "15": {"15_0": "PENDING"}})
    monkeypatch.setattr(array, "_run", slurm)
    monkeypatch.setattr(array.time, "sleep", lambda s: None)
    assert list(launches.cancel(sqlite_queue, (), "USR1", 5)) == [
        "SLURM job 8 had ended already: nothing to cancel",
        "SLURM job 12 cancelled: 1 running worker(s) signalled to hand their jobs back",
        "SLURM job 15 cancelled: 0 running worker(s) signalled to hand their jobs back",
    ]
    assert slurm.live == {}
    assert ["scancel", "--signal=USR1", "--batch", "12"] in slurm.calls
    assert not [c for c in slurm.calls if c[0] == "scancel" and c[-1] == "8"]
    assert {la["job_id"]: la["cancelled_at"] is not None
            for la in sqlite_queue.launches("slurm")} == {"8": False, "12": True, "15": True}
    # Asked again: the ended launches are said to be, and nothing is left to cancel.
    assert list(launches.cancel(sqlite_queue, (), "TERM", 5)) == [
        "SLURM job 8 had ended already: nothing to cancel"]
    assert list(launches.cancel(sqlite_queue, ("12",), "TERM", 5)) == [
        "SLURM job 12 had ended already: nothing to cancel"]


def test_cancel_refuses_a_launch_not_of_this_queue_before_cancelling_any(sqlite_queue,
                                                                        monkeypatch):
    sqlite_queue.record_launch("slurm", "12", 1, None, {})
    slurm = FakeSlurm({"12": {"12_0": "PENDING"}})
    monkeypatch.setattr(array, "_run", slurm)
    with pytest.raises(Refused, match=r"SLURM job 99 is not a launch of this queue \(known: 12\)"):
        list(launches.cancel(sqlite_queue, ("12", "99"), "TERM", 5))
    assert slurm.calls == [] and not sqlite_queue.launch_cancelled("slurm", "12")


def test_cancel_kills_what_is_still_running_after_the_grace(sqlite_queue, monkeypatch):
    sqlite_queue.record_launch("slurm", "12", 1, None, {})
    slurm = FakeSlurm({"12": {"12_0": "RUNNING"}})
    stubborn = slurm.__call__

    def ignoring_the_hand_back(cmd, what, timeout=60):
        return "" if "--batch" in cmd else stubborn(cmd, what, timeout)

    monkeypatch.setattr(array, "_run", ignoring_the_hand_back)
    assert list(launches.cancel(sqlite_queue, (), "TERM", 0)) == [
        "SLURM job 12 cancelled: 1 running worker(s) signalled to hand their jobs back, 1 "
        "still running after 0s and killed (their jobs resume from their last checkpoints)"]
    assert slurm.live == {}


# --- what a partition of several nodes needs ------------------------------------------------

PG = "postgresql+psycopg://runner:pw@db.cluster/sweep"
SHARED = ["/shared/runs/m/a", "/shared/runs/m/b"]


@pytest.mark.parametrize("args, message", [
    ({"checkout": Path("/tmp/checkout")}, "the checkout /tmp/checkout is on a node-local "
     r"filesystem \(\w+\): run from a checkout on a shared filesystem"),
    ({"logs": Path("/var/tmp/logs")}, "the log folder /var/tmp/logs is on a node-local "
     r"filesystem \(\w+\): give --logs on a shared filesystem"),
    ({"db_url": "postgresql+psycopg://runner:pw@127.0.0.1:5432/sweep"},
     "the queue's database host is 127.0.0.1: each node would reach only itself; name the "
     "host by a name every node resolves"),
    ({"db_url": "postgresql+psycopg://runner:pw@localhost/sweep"},
     "the queue's database host is localhost: each node"),
    ({"db_url": "postgresql+psycopg://runner@/sweep"},
     "the queue's database host is a local socket: each node"),
    ({"db_url": "postgresql+psycopg://runner@/sweep?host=/var/run/postgresql"},
     "the queue's database host is a local socket: each node"),
    ({"environ": {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:8333"}},
     r"the S3 endpoint \(AWS_ENDPOINT_URL_S3\) is 127.0.0.1: each node"),
    ({"environ": {"AWS_ENDPOINT_URL": "http://localhost:8333"}},
     r"the S3 endpoint \(AWS_ENDPOINT_URL\) is localhost: each node"),
    ({"environ": {"AWS_ENDPOINT_URL": "http://[::1]:8333"}},
     r"the S3 endpoint \(AWS_ENDPOINT_URL\) is ::1: each node"),
])
def test_several_nodes_refuse_node_local_paths_and_localhost_unless_forced(args, message):
    given = {"db_url": PG, "folders": SHARED, "nodes": 2, "logs": Path("/shared/runs/logs"),
             "checkout": Path("/shared/checkout"), "environ": {}, **args}
    with pytest.raises(array.SlurmError) as refused:
        array.check_multi_node(**given)
    line = str(refused.value)
    assert re.match(f"the partition spans 2 nodes, but {message}", line), line
    assert line.endswith("; --force submits anyway") and "\n" not in line and "pw" not in line
    array.check_multi_node(**given, force=True)
    array.check_multi_node(**{**given, "nodes": 1})  # one node: every path and host is its own


def test_force_keeps_the_sqlite_refusal_and_shared_settings_pass():
    with pytest.raises(array.SlurmError, match="SQLite file"):
        array.check_multi_node("sqlite:////shared/q.sqlite", SHARED, 2, force=True)
    array.check_multi_node(PG, SHARED, 2, logs=Path("/shared/runs/logs"),
                           checkout=Path("/shared/checkout"),
                           environ={"AWS_ENDPOINT_URL": "https://s3.cluster"})


# --- what submit checks against the queue ----------------------------------------------------


class JobsQueue:
    def __init__(self, folders):
        self._jobs = [{"state": "pending", "out_dir": f} for f in folders]

    def jobs(self):
        return self._jobs


def prepare(folders, workers=2, notes=None, per_task=1):
    return submit.prepare(JobsQueue(folders), PG,
                          SubmitOptions(workers=workers, workers_per_task=per_task),
                          "/shared/runs/logs", dry_run=True,
                          note=(notes if notes is not None else []).append)


def test_workers_beyond_the_unfinished_jobs_are_cut_with_a_note(monkeypatch):
    monkeypatch.setattr(array, "partition_nodes", lambda partition: 1)
    notes: list[str] = []
    sub = prepare(["/shared/runs/m/a"], workers=100, notes=notes)
    assert sub.opts.workers == 1 and "#SBATCH --array=0-0" in sub.script()
    assert notes == ["note: 100 worker(s) asked for 1 unfinished job(s): submitting 1"]
    notes.clear()
    assert prepare(SHARED, workers=2, notes=notes).opts.workers == 2 and notes == []
    five = [f"/shared/runs/m/{n}" for n in "abcde"]  # three tasks of two hold them all
    sub = prepare(five, workers=10, notes=notes, per_task=2)
    assert sub.opts.workers == 3 and "#SBATCH --array=0-2" in sub.script()
    assert notes == ["note: 10 task(s) of 2 workers asked for 5 unfinished job(s): "
                     "submitting 3"]


def test_job_folders_in_a_bucket_without_credentials_are_refused_before_submitting(
        monkeypatch, tmp_path):
    from runner.bucket import s3

    monkeypatch.setattr(array, "partition_nodes", lambda partition: 1)
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.cluster:8333")
    s3.forget_client()
    monkeypatch.setattr(submit.array, "submit", lambda script: pytest.fail("submitted"))
    try:
        with pytest.raises(Refused) as refused:
            prepare(["s3://sweep-bucket/runs/m/a", "s3://sweep-bucket/runs/m/b"])
    finally:
        s3.forget_client()
    assert str(refused.value) == ("job folder s3://sweep-bucket/runs/m/a: no S3 credentials "
                                  "(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                                  "AWS_PROFILE)")
