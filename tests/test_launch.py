"""`make workers` (runner/launch.py): workers that die at once are reported, logs are appended."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.commands import PYTHON, ROOT, cli, runner_env

VENV = Path(PYTHON).parent.parent


def make(*args: str) -> subprocess.CompletedProcess:
    """`make ARGS` with this interpreter's venv, never reinstalling it (-o: its stamp is
    taken as up to date)."""
    return subprocess.run(["make", "--no-print-directory", "-o", f"{VENV}/.installed", *args,
                           f"VENV={VENV}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def separators(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("=== ")]


def test_a_worker_that_dies_at_once_is_reported_and_logs_are_appended(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    logs = tmp_path / "logs"
    bad = "error: Invalid value for '--threads': 'abc' is not a valid integer range."
    for run in (1, 2):
        proc = make("workers", "GPUS=cpu", "THREADS=abc", f"DB={url}", f"LOGS={logs}")
        assert proc.returncode != 0
        assert proc.stdout.startswith("worker 1 on cpu (abc threads): pid ")
        assert f"worker 1 on cpu died at once (exit status 2): {bad}\n" in proc.stderr
        log = logs / "worker-1-cpu.log"
        assert len(separators(log)) == run  # the earlier run's lines are kept
        assert log.read_text().count(bad) == run
    assert re.fullmatch(r"=== \d{4}-\d\d-\d\d \d\d:\d\d:\d\d make workers: worker 1 on cpu: "
                        r"-m runner --db \S+ worker --gpu cpu --threads abc",
                        separators(log)[0])


@pytest.mark.slow
def test_only_the_worker_that_died_is_reported(tmp_path):
    """A CPU worker comes up (the queue is paused: it registers, then exits 0); a worker on a
    GPU this machine lacks dies, and is the one named."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU 0")
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    assert cli(url, "plan", "--profile", "smoke", "--only", "V=5", "--only", "N=256",
               "--out-root", str(tmp_path / "runs")).returncode == 0
    assert cli(url, "pause").returncode == 0
    proc = subprocess.run([PYTHON, "-m", "runner.launch", "--logs", str(tmp_path / "logs"),
                           "--threads", "1", "cpu", "0"], cwd=ROOT, env=runner_env(url),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    died = [line for line in proc.stderr.splitlines() if "died" in line]
    assert len(died) == 1, proc.stderr
    assert re.fullmatch(r"worker 2 on 0 died at once \(exit status 2\): error: --gpu 0: .+",
                        died[0])
    # The CPU worker came up: it registered, then stopped at the pause, exit status 0.
    pid = int(proc.stdout.splitlines()[0].split("pid ")[1].split(",")[0])
    deadline = time.monotonic() + 120
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "the queue is paused" in (tmp_path / "logs" / "worker-1-cpu.log").read_text()
