"""Starts background workers, one per listed device, and checks that each one came up
(`make workers GPUS="0 1"`).

Each worker gets its own log, appended to under a dated separator line (an earlier run's
lines stay). A worker counts as up once it has logged its registration in the queue; one
that exits first is reported with the last line of its log (no GPU, a bad --threads, no
queue), and the exit status is then 1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

POLL = 0.2  # seconds between looks at the workers while they start


@dataclass
class Started:
    """A worker process just started: its number, device, log and where its lines begin."""

    number: int
    device: str
    log: Path
    offset: int
    proc: subprocess.Popen

    def new_lines(self) -> list[str]:
        """Its log's lines written since this start."""
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            text = f.read().decode("utf-8", errors="replace")
        return [line for line in text.splitlines() if line.strip()]

    def registered(self) -> bool:
        """It logged `worker HOST:GPU:PID on DEVICE, lease ...`: it is in the queue's registry."""
        mark = re.compile(rf"\bworker \S+:{self.proc.pid} on \S+, lease ")
        return any(mark.search(line) for line in self.new_lines())


def cpu_share(devices: list[str]) -> int:
    """Threads for each CPU worker: the cores split evenly among them (at least one)."""
    cpus = sum(d == "cpu" for d in devices)
    return max(1, (os.cpu_count() or 1) // max(1, cpus))


def start(number: int, device: str, logs: Path, db: str | None, threads: str | None,
          db_outage: str | None) -> Started:
    tag = "cpu" if device == "cpu" else f"gpu{device}"
    log = logs / f"worker-{number}-{tag}.log"
    command = [sys.executable, "-m", "runner", *(["--db", db] if db else []), "worker",
               "--gpu", device, *(["--threads", threads] if threads else []),
               *(["--db-outage", db_outage] if db_outage else [])]
    with open(log, "ab") as f:
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} make workers: worker {number} on "
                f"{device}: {' '.join(command[1:])}\n".encode())
        offset = f.tell()
        # A session of its own: closing the terminal (SIGHUP) or Ctrl-C there spares it.
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Started(number, device, log, offset, proc)


def wait_until_up(workers: list[Started], timeout: float) -> list[Started]:
    """Wait until each worker has registered or exited (at most `timeout` s); those that
    exited with an error."""
    deadline = time.monotonic() + timeout
    pending = list(workers)
    while pending and time.monotonic() < deadline:
        pending = [w for w in pending if w.proc.poll() is None and not w.registered()]
        if pending:
            time.sleep(POLL)
    return [w for w in workers if w.proc.poll() not in (None, 0)]


@click.command()
@click.argument("devices", nargs=-1, required=True, metavar="GPU|cpu...")
@click.option("--db", default=None, metavar="URL", help="The queue (else the workers' default).")
@click.option("--logs", default="runs/logs", show_default=True, type=click.Path(file_okay=False),
              help="Folder of the workers' logs.")
@click.option("--threads", default=None, help="CPU threads per worker [default: CPU workers "
                                              "split the cores].")
@click.option("--db-outage", default=None, metavar="SECONDS", help="Passed to each worker.")
@click.option("--startup", type=click.FloatRange(min=0), default=120, show_default=True,
              metavar="SECONDS", help="How long to wait for each worker to come up.")
def main(devices, db, logs, threads, db_outage, startup) -> None:
    """One background worker per device ("0 0": two on GPU 0; "cpu cpu"), a log each."""
    logs = Path(logs)
    logs.mkdir(parents=True, exist_ok=True)
    share = str(cpu_share(list(devices)))
    workers = []
    for number, device in enumerate(devices, start=1):
        n = threads or (share if device == "cpu" else None)
        worker = start(number, device, logs, db, n, db_outage)
        workers.append(worker)
        click.echo(f"worker {number} on {device}{f' ({n} threads)' if n else ''}: "
                   f"pid {worker.proc.pid}, log {worker.log}")
    died = wait_until_up(workers, startup)
    for w in died:
        last = (w.new_lines() or ["(its log is empty)"])[-1]
        click.echo(f"worker {w.number} on {w.device} died at once (exit status "
                   f"{w.proc.returncode}): {last}", err=True)
    for w in workers:
        if w.proc.returncode == 0:
            last = (w.new_lines() or ["(its log is empty)"])[-1]
            click.echo(f"worker {w.number} on {w.device} has already finished: {last}",
                       err=True)
    if died:
        sys.exit(1)


if __name__ == "__main__":
    main()
