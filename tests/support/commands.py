"""The project's commands as a user runs them: `python -m runner ...` in a subprocess, from
the repository root, against one queue database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from db import JobQueue, connect

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def runner_env(db_url: str) -> dict:
    return {**os.environ, "RUNNER_DB": db_url, "PYTHONUNBUFFERED": "1"}


def cli(db_url: str, *args: str, timeout: float = 600, cwd: Path = ROOT, env: dict | None = None,
        **kw) -> subprocess.CompletedProcess:
    """`python -m runner ARGS` against `db_url`, output captured; `env`: variables added."""
    return subprocess.run([PYTHON, "-m", "runner", *args], cwd=cwd,
                          env={**runner_env(db_url), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, **kw)


def refused_line(proc: subprocess.CompletedProcess) -> str:
    """The one stderr line of a command refused as bad input (exit status 2)."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def plan(db_url: str, out_root: str | Path, *args: str, env: dict | None = None) -> JobQueue:
    """`plan --profile smoke --out-root OUT_ROOT ARGS`, which must succeed; the queue."""
    proc = cli(db_url, "plan", "--profile", "smoke", "--out-root", str(out_root), *args,
               env=env)
    assert proc.returncode == 0, proc.stderr
    return JobQueue(connect(db_url))


def long_job(db_url: str, tmp_path: Path) -> JobQueue:
    """One job of 400 steps, a state every 20: long enough to act on while it trains."""
    return plan(db_url, tmp_path / "runs", "--only", "V=5", "--only", "N=256",
                "--only", "model=gpt2", "--only", "run=1",
                "--set", "training.train_steps=400", "--set", "training.save_every_steps=20")


def start_worker(db_url: str, *args: str) -> subprocess.Popen:
    """A background worker on the CPU, one thread; its output in pipes."""
    return subprocess.Popen([PYTHON, "-m", "runner", "worker", "--gpu", "cpu", "--threads", "1",
                             *args], cwd=ROOT, env=runner_env(db_url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
