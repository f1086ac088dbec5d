"""The queue at scale: N worker processes drain M stand-in jobs through one database.

    python bench/scale.py --db URL --workers N --jobs M --job-seconds S [--json]
                          [--idle-seconds T] [--lease SECONDS]

Each worker process runs the real worker loop (runner.worker.Worker: claim, heartbeat,
progress, finish, fencing, outage handling) with a stand-in job (trainer.job.Job) that
sleeps S seconds and reports progress every second: everything but the training, and no
torch (a stand-in worker never imports it; the report says so and gives each worker's
peak memory). The M jobs are planned into the queue at --db (a PostgreSQL URL, possibly
through PgBouncer, or a SQLite path or URL), which must hold no jobs: the benchmark
refuses one that does (use a new database, or --i-know-this-deletes to empty it).

Every worker starts, imports and registers first; the clock starts when all are ready.
Measured: the wall time from the start to the last job's end against the ideal
(ceil(M / N) * S), each claim's latency as the worker saw it, the most server connections
at once (PostgreSQL), transactions per second while busy and, with --idle-seconds T, while
every worker waits with nothing to claim; then the events table is audited: jobs run more
than once or by two leases at once, jobs not succeeded, workers that crashed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from db import JobQueue, connect
from db.engine import normalize_url
from db.outage import Outages
from testing.audit import finishes_per_job, lease_violations
from testing.scratch import at_risk, clear
from trainer.job import Job, Progress, RunResult

METRICS = {"accuracy": 1.0, "balanced_accuracy": 1.0, "majority_rate": 0.5}


class SleepJob(Job):
    """Sleeps the config's `seconds`, reporting a step every second; stops when told."""

    def run(self, spec):
        seconds = spec.config["seconds"]
        steps = max(1, math.ceil(seconds))
        Path(spec.folder).mkdir(parents=True, exist_ok=True)  # the worker logs the job there
        start = time.monotonic()
        for step in range(1, steps + 1):
            if spec.stop.wait(max(0.0, start + seconds * step / steps - time.monotonic())):
                return RunResult("stopped", step - 1)
            spec.on_progress(Progress(step, steps, loss=1.0 / step, train_accuracy=0.5))
        return RunResult("completed", steps, dict(METRICS))


def job_rows(jobs: int, seconds: float, folder: Path) -> list[dict]:
    steps = max(1, math.ceil(seconds))
    return [{"name": f"scale_{i:06d}", "v": 5, "n": 256, "model": "standin", "run": 1,
             "position": i, "cost": 1.0, "config": {"seconds": seconds},
             "out_dir": str(folder / f"scale_{i:06d}"), "total_steps": steps,
             "max_attempts": 3, "profile": "scale", "overrides": []} for i in range(jobs)]


# --- one worker process -----------------------------------------------------------


def worker_main(args) -> None:
    """A worker process: the real Worker with the stand-in job; waits for the go file, runs
    until nothing is left (or, with --wait, until SIGTERM), writes what it measured."""
    import logging

    from runner.worker import Worker

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    # As `python -m runner worker` opens it: one connection at a time, and a database that
    # refuses connections (more workers than it allows) waited for within the budget.
    queue = Outages(600).run(lambda retrying: JobQueue(
        connect(args.db, one_connection=True), outage_budget=600), str)
    claims_ms: list[float] = []
    claim = queue.claim

    def timed_claim(*a, **kw):
        started = time.perf_counter()
        got = claim(*a, **kw)
        claims_ms.append((time.perf_counter() - started) * 1e3)
        return got

    queue.claim = timed_claim
    worker = Worker(queue, "cpu", args.lease, job=SleepJob(), progress_every=1e9)
    worker.install_signal_handlers()
    queue.engine.dispose()   # no connection held while the others start: a full server
    Path(args.ready).touch()  # would keep them from starting at all
    while not Path(args.go).exists():
        time.sleep(0.05)
    worker.run(wait=args.wait, poll=args.poll)
    report = {"claims_ms": claims_ms, "outcomes": worker.outcomes,
              "torch": "torch" in sys.modules, "peak_rss_mb": peak_rss_mb()}
    Path(args.out).write_text(json.dumps(report))
    queue.engine.dispose()


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- the database's side ----------------------------------------------------------


class ServerWatch:
    """Samples the server's connections to this database (PostgreSQL), twice a second.

    It holds one connection of its own, opened before the workers start: a server that the
    workers fill refuses new connections (some runs are about that), and the figures must
    still be read."""

    def __init__(self, url: str):
        self.engine = self.conn = None
        if url.startswith("postgresql"):
            self.engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT",
                                        connect_args={"prepare_threshold": None})
            self.conn = self.engine.connect()
        self.most = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ServerWatch:
        if self.conn is not None:
            self._thread.start()
        return self

    def _value(self, sql: str) -> int:
        with self._lock:   # each statement its own transaction: the statistics read anew
            return self.conn.execute(text(sql)).scalar_one()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.most = max(self.most, self._value(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"))

    def transactions(self) -> int | None:
        """Transactions committed or rolled back in this database so far (PostgreSQL)."""
        if self.conn is None:
            return None
        return self._value("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                           "WHERE datname = current_database()")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.conn is not None:
            self.conn.close()
            self.engine.dispose()


def rate(before: int | None, after: int | None, seconds: float) -> float | None:
    if before is None or after is None or seconds <= 0:
        return None
    return (after - before) / seconds


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# --- the run ----------------------------------------------------------------------


def start_workers(args, folder: Path, wait: bool) -> list[tuple[subprocess.Popen, Path]]:
    workers = []
    for i in range(args.workers):
        out = folder / f"worker-{i}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--db", args.db,
               "--lease", str(args.lease), "--poll", str(args.poll),
               "--ready", str(folder / f"ready-{i}"), "--go", str(folder / "go"),
               "--out", str(out)] + (["--wait"] if wait else [])
        log = open(folder / f"worker-{i}.log", "w")  # noqa: SIM115 (the process keeps it)
        workers.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)}), out))
    return workers


ROOT = Path(__file__).resolve().parent.parent


def run(args) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="runner-scale-"))
    queue = JobQueue(connect(args.db, create=True))
    queue.plan(job_rows(args.jobs, args.job_seconds, folder / "runs"))
    wait = args.idle_seconds > 0
    watch = ServerWatch(args.db)   # its connection before the workers take theirs
    workers = start_workers(args, folder, wait)
    try:
        started_at = time.monotonic()
        while sum((folder / f"ready-{i}").exists() for i in range(args.workers)) < args.workers:
            if any(p.poll() is not None for p, _ in workers):
                break
            if time.monotonic() - started_at > 600:
                raise SystemExit("error: the workers did not all start within 600 s")
            time.sleep(0.2)
        startup = time.monotonic() - started_at
        watch.start()
        busy_from = watch.transactions()
        go = time.monotonic()
        (folder / "go").touch()
        while queue.counts()["succeeded"] + queue.counts()["failed"] < args.jobs:
            if all(p.poll() is not None for p, _ in workers):
                break
            time.sleep(0.2)
        wall = time.monotonic() - go
        busy_to = watch.transactions()
        idle_rate = None
        if wait:
            time.sleep(min(5.0, args.idle_seconds))   # the last workers finish and go idle
            idle_from = watch.transactions()
            time.sleep(args.idle_seconds)
            idle_rate = rate(idle_from, watch.transactions(), args.idle_seconds)
            for proc, _ in workers:
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=600) for proc, _ in workers]
    except BaseException:
        for proc, _ in workers:   # a failed run leaves no worker waiting for its start
            proc.kill()
        raise
    watch.stop()
    reports = [json.loads(out.read_text()) for _, out in workers if out.exists()]
    claims = [ms for r in reports for ms in r["claims_ms"]]
    events = queue.events()
    finishes = finishes_per_job(events)
    states = {j["name"]: j["state"] for j in queue.jobs(config=False)}
    queue.engine.dispose()
    ideal = math.ceil(args.jobs / args.workers) * args.job_seconds
    return {
        "db": make_url(normalize_url(args.db)).get_backend_name(),
        "workers": args.workers, "jobs": args.jobs, "job_seconds": args.job_seconds,
        "startup_seconds": round(startup, 1),
        "wall_seconds": round(wall, 2), "ideal_seconds": ideal,
        "efficiency": round(ideal / wall, 4) if wall else None,
        "claim_ms_p50": pct(claims, 50), "claim_ms_p99": pct(claims, 99),
        "claims": len(claims),
        "db_connections_max": watch.most if watch.engine is not None else None,
        "db_transactions_per_s_busy": rate(busy_from, busy_to, wall),
        "db_transactions_per_s_idle": idle_rate,
        "double_runs": sum(1 for n in finishes.values() if n > 1)
        + len(lease_violations(events)),
        "lost_jobs": sum(1 for s in states.values() if s != "succeeded"),
        "worker_crashes": sum(1 for c in codes if c != 0) + args.workers - len(reports),
        "workers_with_torch": sum(1 for r in reports if r["torch"]),
        "worker_peak_rss_mb": round(max((r["peak_rss_mb"] for r in reports), default=0), 1),
        "worker_peak_rss_mb_median": round(statistics.median(
            [r["peak_rss_mb"] for r in reports]), 1) if reports else None,
        "logs": str(folder),
    }


def table(result: dict) -> str:
    width = max(len(k) for k in result)
    return "\n".join(f"{k.ljust(width)}  {v if not isinstance(v, float) else round(v, 3)}"
                     for k, v in result.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="queue URL or SQLite path (no jobs in it)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--job-seconds", type=float, default=5.0)
    parser.add_argument("--idle-seconds", type=float, default=0.0,
                        help="then measure T seconds of every worker waiting (--wait)")
    parser.add_argument("--lease", type=float, default=60.0)
    parser.add_argument("--poll", type=float, default=5.0,
                        help="seconds between an idle worker's looks for work")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument("--i-know-this-deletes", action="store_true",
                        help="empty a queue that holds jobs first")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--wait", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--ready", "--go", "--out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    args.db = normalize_url(args.db)
    if min(args.workers, args.jobs) < 1 or args.job_seconds <= 0:
        parser.exit(2, "error: --workers and --jobs must be at least 1, --job-seconds > 0\n")
    held = at_risk(args.db)
    if held and not args.i_know_this_deletes:
        parser.exit(2, f"error: {args.db} holds {held}: give a new database, or "
                       "--i-know-this-deletes to empty it\n")
    if held:
        clear(args.db)
    result = run(args)
    print(json.dumps(result) if args.json else table(result))


if __name__ == "__main__":
    main()
