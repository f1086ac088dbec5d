"""Queue size: how claim latency and the read paths (CLI, dashboard API) scale with the queue.

The read paths are status, results and the dashboard's JSON API; the queue's size is its
number of jobs and of events.

Run from the repository root:

    .venv/bin/python bench/queue_size.py                               # SQLite in a temp folder
    .venv/bin/python bench/queue_size.py --sizes 1000,10000 --repeats 5 --json
    .venv/bin/python bench/queue_size.py --db postgresql+psycopg://user:pw@host/db_for_bench

--db must be a throwaway database: every job and event in it is deleted before each size.
A database that holds jobs, events or workers (a real queue), or another program's tables,
is refused (exit 2) unless --i-know-this-deletes is given; the benchmark's own rows are
deleted again at the end.

For each size S in --sizes, a fresh queue (a new SQLite file; with --db, every `events` and
`jobs` row deleted first) is filled through JobQueue: S synthetic jobs planned (the rows of
bench/scale.py), then 50 claimed and left running, 30 claimed and failed, 200 claimed and
finished, so that status has running and failed jobs and measured rates. A real sweep
writes a `heartbeat` event per beat: --events E heartbeat rows (default 10 x S) are added
with a bulk INSERT, spread round-robin over all the jobs. Then, each the median of
--repeats runs:

- the CLI as a user runs it, a subprocess with Python's start-up: `status`,
  `status --json`, `results` (wall seconds);
- the dashboard's JSON API, from `python -m runner serve` on a free loopback port, as the
  page polls it: GET /api/status, /api/latest, /api/results, and /api/jobs/NAME of a
  running job (the detail view) (seconds per request, urllib);
- claim latency: one process, --claims sequential claim -> finish through JobQueue, each
  claim timed (p50 and p99 in ms; the median of each over the repeats). Measured last,
  since it changes the queue (more jobs succeeded).

Printed: a table, one row per size (jobs, events, the figures above), or with --json one
JSON object per size (also the fill times and response sizes). It checks nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import sqlalchemy
from sqlalchemy import func, insert, select, text

from db import JobQueue, connect
from db.engine import mask_url
from db.models import Event, Job
from testing.scratch import clear, fresh_queue, refuse_unless_throwaway
from testing.serve import start_server, stop_server

try:
    from bench.claims import pct
    from bench.scale import job_rows
except ImportError:  # run as a file: bench/ itself is on sys.path
    from claims import pct
    from scale import job_rows

ROOT = Path(__file__).resolve().parent.parent
RUNNING, FAILED, SUCCEEDED = 50, 30, 200
LEASE_SECONDS = 24 * 3600.0   # the running jobs stay live (not stale) for the whole run
CHUNK = 10_000                # heartbeat rows per INSERT
METRICS = {"accuracy": 0.5, "balanced_accuracy": 0.5, "majority_rate": 0.5}
CLI = {"status": ["status"], "status_json": ["status", "--json"], "results": ["results"]}
API = ("status", "latest", "results", "job")


def median(values, digits: int = 4):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), digits) if values else None


# --- filling a queue --------------------------------------------------------------


def fill(url: str, size: int, events: int, folder: Path) -> dict:
    """Plan `size` jobs, run some of them as a sweep would, add `events` heartbeat rows."""
    queue = JobQueue(connect(url))
    t0 = time.perf_counter()
    queue.plan(job_rows(size, 5, folder / "runs"))
    planned = time.perf_counter() - t0
    for i in range(RUNNING + FAILED + SUCCEEDED):
        claim = queue.claim(f"bench-host:0:{1000 + i}", LEASE_SECONDS)
        if claim is None:
            break
        if RUNNING <= i < RUNNING + FAILED:
            queue.fail(claim, "RuntimeError: boom", "Traceback (most recent call last):\n"
                       "RuntimeError: boom")
        elif i >= RUNNING + FAILED:
            queue.finish(claim, METRICS)
    t0 = time.perf_counter()
    add_heartbeats(queue.engine, events)
    inserted = time.perf_counter() - t0
    with queue.engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(Event)).scalar_one()
    running = queue.jobs(config=False, columns=["name"], states=["running"], limit=1)
    queue.engine.dispose()
    return {"events": total, "plan_s": planned, "events_insert_s": inserted,
            "running_job": running[0]["name"] if running else None}


def add_heartbeats(engine, count: int) -> None:
    """`count` heartbeat events, round-robin over the jobs, one second apart up to now."""
    now = time.time()
    with engine.begin() as conn:
        ids = conn.execute(select(Job.id).order_by(Job.id)).scalars().all()
        for start in range(0, count, CHUNK):
            conn.execute(insert(Event), [
                {"job_id": ids[i % len(ids)], "at": now - (count - i), "kind": "heartbeat",
                 "worker": f"bench-host:0:{1000 + i % 50}", "token": f"{ids[i % len(ids)]:032x}",
                 "attempt": 1, "detail": None}
                for i in range(start, min(count, start + CHUNK))])


# --- measuring --------------------------------------------------------------------


def env() -> dict:
    """The environment of the CLI and the server: no token, no other queue."""
    return {k: v for k, v in os.environ.items()
            if k not in ("RUNNER_DB", "RUNNER_SERVE_TOKEN")} | {"PYTHONUNBUFFERED": "1"}


def time_cli(url: str, repeats: int, notes: list[str]) -> dict:
    """Wall seconds of each CLI command (median), or None where it failed."""
    out = {}
    for key, args in CLI.items():
        runs, size = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "runner", "--db", url, *args],
                                  cwd=ROOT, env=env(), capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
                notes.append(f"{' '.join(args)}: exit {proc.returncode}: {tail}")
                break
            runs.append(seconds)
            size = len(proc.stdout)
        out[key] = {"s": median(runs), "bytes": size}
    return out


def time_api(url: str, running_job: str | None, repeats: int, notes: list[str]) -> dict:
    """Seconds per GET of each endpoint the page polls (median), or None where it failed."""
    paths = {"status": "api/status", "latest": "api/latest", "results": "api/results",
             "job": f"api/jobs/{running_job}" if running_job else None}
    proc, base = start_server(url, cwd=ROOT, env=env())
    out = {}
    try:
        for key, path in paths.items():
            runs, size = [], None
            for _ in range(repeats if path else 0):
                t0 = time.perf_counter()
                try:
                    with urllib.request.urlopen(base + path, timeout=600) as response:
                        size = len(response.read())
                except OSError as e:
                    notes.append(f"GET /{path}: {e}")
                    break
                runs.append(time.perf_counter() - t0)
            out[key] = {"s": median(runs), "bytes": size}
    finally:
        stop_server(proc)
    return out


def time_claims(url: str, claims: int, repeats: int) -> dict:
    """claim -> finish, `claims` times per repeat; p50 and p99 of the claim (ms), medians."""
    queue = JobQueue(connect(url))
    p50s, p99s, done = [], [], 0
    for r in range(repeats):
        times = []
        for _ in range(claims):
            t0 = time.perf_counter()
            claim = queue.claim(f"bench-claims:0:{r}", LEASE_SECONDS)
            seconds = time.perf_counter() - t0
            if claim is None:  # nothing left to claim
                break
            times.append(seconds * 1e3)
            queue.finish(claim, METRICS)
        p50s.append(pct(times, 50))
        p99s.append(pct(times, 99))
        done += len(times)
    queue.engine.dispose()
    return {"p50_ms": median(p50s, 3), "p99_ms": median(p99s, 3), "claims": done}


def measure(args, folder: Path, size: int) -> dict:
    url = fresh_queue(args.db, folder, f"queue_{size}")
    events = 10 * size if args.events is None else args.events
    print(f"size {size}: filling ({events} heartbeat rows) ...", file=sys.stderr, flush=True)
    filled = fill(url, size, events, folder)
    notes: list[str] = []
    print(f"size {size}: CLI ...", file=sys.stderr, flush=True)
    cli = time_cli(url, args.repeats, notes)
    print(f"size {size}: API ...", file=sys.stderr, flush=True)
    api = time_api(url, filled["running_job"], args.repeats, notes)
    print(f"size {size}: claims ...", file=sys.stderr, flush=True)
    claims = time_claims(url, args.claims, args.repeats)
    return {"db": connect(url).dialect.name, "jobs": size, "events": filled["events"],
            "plan_s": round(filled["plan_s"], 3),
            "events_insert_s": round(filled["events_insert_s"], 3),
            "claim_p50_ms": claims["p50_ms"], "claim_p99_ms": claims["p99_ms"],
            "claims": claims["claims"], "repeats": args.repeats,
            **{f"cli_{k}_s": v["s"] for k, v in cli.items()},
            **{f"cli_{k}_bytes": v["bytes"] for k, v in cli.items()},
            **{f"api_{k}_s": v["s"] for k, v in api.items()},
            **{f"api_{k}_bytes": v["bytes"] for k, v in api.items()},
            "notes": notes}


# --- output -----------------------------------------------------------------------

COLUMNS = [("jobs", "jobs", "d"), ("events", "events", "d"),
           ("claim p50 ms", "claim_p50_ms", ".2f"), ("p99 ms", "claim_p99_ms", ".2f"),
           ("status s", "cli_status_s", ".2f"), ("status --json s", "cli_status_json_s", ".2f"),
           ("results s", "cli_results_s", ".2f"), ("api/status s", "api_status_s", ".3f"),
           ("api/latest s", "api_latest_s", ".3f"), ("api/results s", "api_results_s", ".3f"),
           ("api/jobs/X s", "api_job_s", ".3f")]


def row(result: dict) -> str:
    cells = []
    for title, key, fmt in COLUMNS:
        value = result[key]
        cells.append(("-" if value is None else format(value, fmt)).rjust(width(title)))
    return "  ".join(cells)


def width(title: str) -> int:
    return max(len(title), 7)


def header(args) -> None:
    if args.db:
        engine = connect(args.db, create=True)
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                version = "SQLite " + conn.execute(text("select sqlite_version()")).scalar_one()
            else:
                version = "server " + str(conn.execute(text("show server_version")).scalar_one())
        engine.dispose()
    else:
        version = f"SQLite {sqlite3.sqlite_version}"
    shown = mask_url(args.db) if args.db else "a new SQLite file per size in a temp folder"
    print(f"queue size benchmark  db: {shown} ({version})")
    print(f"  CPUs {os.cpu_count()}  Python {platform.python_version()}  "
          f"SQLAlchemy {sqlalchemy.__version__}  {platform.platform()}")
    print(f"  per size: 50 running, 30 failed, 200 succeeded jobs; medians of {args.repeats} "
          f"runs; {args.claims} claims per run")
    print("  ".join(title.rjust(width(title)) for title, _, _ in COLUMNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="a throwaway queue database (default: SQLite files in a "
                        "temp folder); its jobs and events are DELETED before each size")
    parser.add_argument("--i-know-this-deletes", action="store_true",
                        help="use --db even though it holds jobs, events or other tables")
    parser.add_argument("--sizes", default="1000,10000,100000",
                        type=lambda s: [int(x) for x in s.split(",") if x.strip()])
    parser.add_argument("--events", type=int, help="heartbeat rows added (default 10 x size)")
    parser.add_argument("--claims", type=int, default=200, help="claims timed per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON object per size")
    args = parser.parse_args()
    refuse_unless_throwaway(args.db, args.i_know_this_deletes)
    if not args.json:
        header(args)
    with tempfile.TemporaryDirectory(prefix="bench-queue-size-") as tmp:
        try:
            for size in args.sizes:
                result = measure(args, Path(tmp), size)
                if args.json:
                    print(json.dumps(result), flush=True)
                else:
                    print(row(result), flush=True)
                    for note in result["notes"]:
                        print(f"    {note}", flush=True)
        finally:
            if args.db:  # leave no fake jobs behind (results would call them the study)
                clear(args.db)


if __name__ == "__main__":
    main()
