"""The SLURM pieces that need no cluster, in-process: the batch script against a recorded
file, the launches' status lines from given squeue and sacct output, a task's log line.

The batch script is compared to tests/golden/slurm_array.sbatch. After a deliberate change
to the script, record it again and review the diff:

    RUNNER_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_slurm_offline.py -k golden
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from runner.slurm import array, launches
from runner.slurm.array import SubmitOptions
from runner.slurm.task import SlurmTask, log_line

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
                         gpus_per_worker=2, cpus_per_worker=8, mem="32G", account="lab",
                         qos="normal", grace=90, signal="USR1",
                         sbatch_args=["--constraint=a100"], worker_args=["--lease", "30"])
    url = "postgresql+psycopg://runner:secret@dbhost/sweep"
    script = array.batch_script(opts, url, Path("/shared/runs/logs"),
                                python="/opt/checkout/.venv/bin/python",
                                shown_url="postgresql+psycopg://runner:***@dbhost/sweep",
                                root=Path("/opt/checkout"))
    matches_golden("slurm_array.sbatch", script)


def test_a_cpu_script_asks_for_no_gpu_and_quotes_what_the_shell_would_split():
    opts = SubmitOptions(workers=2, cpu=True, gpus_per_worker=0)
    script = array.batch_script(opts, "sqlite:////data/my queue.sqlite", Path("/logs"),
                                python="/usr/bin/python3", root=Path("/home/me/the checkout"))
    lines = script.splitlines()
    assert "#SBATCH --array=0-1" in lines and "#SBATCH --signal=B:TERM@120" in lines
    assert not any("--gres" in line for line in lines)
    assert "cd '/home/me/the checkout'" in lines
    assert lines[-1] == ("exec /usr/bin/python3 -m runner --db 'sqlite:////data/my queue.sqlite' "
                         "worker --gpu cpu")


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
        "  task 120_1: running 0:40 (node1); no worker yet",
        "  task 120_2: pending 0:00 ((Resources)); no worker yet",
        "  task 120_3: completed 00:05:00 (exit 0:0); worker n1:0:13 (exited, GPUs 1, "
        "restarts 0)",
        "  task 120_4: cancelled 00:00:10 (exit 0:15); no worker yet",
        "  task 120_9: not in squeue; worker n1:0:14 (exited, GPUs -, restarts 0)",
        f"SLURM job 131: 1 task(s), cancelled "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at + 30))}; ",
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


def test_a_tasks_log_line_names_its_job_array_restarts_and_gpus():
    task = SlurmTask.from_environ({"SLURM_JOB_ID": "123", "SLURM_ARRAY_JOB_ID": "120",
                                   "SLURM_ARRAY_TASK_ID": "3", "SLURM_RESTART_COUNT": "1",
                                   "SLURM_JOB_GPUS": "1"})
    assert log_line(task) == ", SLURM job 123 (array 120_3, restart 1), GPUs 1"
    assert log_line(SlurmTask.from_environ({"SLURM_JOB_ID": "7"})) == (
        ", SLURM job 7 (array 7, restart 0)")
    assert log_line(None) == ""
