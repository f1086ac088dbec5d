"""Job-queue benchmark: claim throughput/latency, and the sweep's makespan by claim order.

Run from the repository root:

    .venv/bin/python bench/claims.py                                   # SQLite in a temp folder
    .venv/bin/python bench/claims.py --processes 1,2,8 --jobs 1000 --makespan-seconds 10
    .venv/bin/python bench/claims.py --db postgresql+psycopg://user:pw@host/db_for_bench

--db must be a throwaway database: every job and event in it is deleted before each round.
A database that holds jobs, events or workers (a real queue), or another program's tables,
is refused (exit 2) unless --i-know-this-deletes is given; the benchmark's own rows are
deleted again at the end, so the same database can be used for the next run.

1. Throughput: for each process count P, a fresh queue (a new SQLite file per round; with
   --db, every `events` and `jobs` row is deleted first) gets --jobs synthetic jobs (the
   smoke sweep's rows repeated under unique names). P processes (spawn; each builds its own
   engine) loop claim -> finish({"accuracy": 0.0}) until claim returns None. Printed: jobs
   done, jobs finished more than once, lease violations (testing.audit), jobs/s over the wall
   time, p50/p99 of claim and of finish in ms (the final empty claim is not counted).
2. Makespan: the real 60-job sweep (conf/sweep.yaml, profile full) on 4 processes; each job
   sleeps in proportion to its estimated cost, scaled so all sleeps add up to
   4 x --makespan-seconds (a perfect split takes --makespan-seconds). Once per claim order
   ("guide", "cost"): the measured makespan, the list-scheduling makespan computed in pure
   Python, the lower bound max(total/4, longest job), and each one's ratio to the bound.
It prints figures only; it checks nothing.
"""

from __future__ import annotations

import argparse
import heapq
import multiprocessing as mp
import os
import platform
import tempfile
import time
from pathlib import Path

import sqlalchemy
from sqlalchemy import text

from db.engine import connect, filesystem_type, mask_url
from db.queue import JobQueue
from runner.planner import job_rows, load_sweep
from testing.audit import finishes_per_job, lease_violations
from testing.scratch import clear, fresh_queue, refuse_unless_throwaway

SWEEP = Path(__file__).resolve().parent.parent / "conf" / "sweep.yaml"
LEASE_SECONDS = 300.0   # far longer than any round: no lease may expire
WORKERS = 4             # makespan part


def worker(url, order, sleeps, barrier, results, wid):
    """One process: own engine, wait for the others, then claim -> (sleep) -> finish."""
    queue = JobQueue(connect(url))
    claim_ms, finish_ms, error = [], [], None
    barrier.wait()
    try:
        while True:
            t0 = time.perf_counter()
            claim = queue.claim(f"bench-{wid}", LEASE_SECONDS, order=order)
            t1 = time.perf_counter()
            if claim is None:
                break
            claim_ms.append((t1 - t0) * 1e3)
            if sleeps:
                time.sleep(sleeps[claim.name])
            t2 = time.perf_counter()
            queue.finish(claim, {"accuracy": 0.0})
            finish_ms.append((time.perf_counter() - t2) * 1e3)
    except Exception as e:  # reported by the parent; the round goes on without this process
        error = f"{type(e).__name__}: {e}"
    results.put((wid, claim_ms, finish_ms, error, time.monotonic()))  # one clock for all
    queue.engine.dispose()


def run_round(url, rows, processes, order, sleeps=None):
    """Plan `rows`, run `processes` workers to the end; (wall seconds, per-worker results)."""
    engine = connect(url)
    JobQueue(engine).plan(rows)
    engine.dispose()
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(url, order, sleeps, barrier, results, i))
             for i in range(processes)]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)   # every worker has connected
    t0 = time.monotonic()   # CLOCK_MONOTONIC: shared by all processes on the host
    got = [results.get(timeout=600) for _ in procs]
    wall = max(end for *_, end in got) - t0
    for p in procs:
        p.join()
    return wall, got


def audit(url):
    """(jobs succeeded, jobs finished more than once, lease violations) from the database."""
    engine = connect(url)
    queue = JobQueue(engine)
    events, succeeded = queue.events(), queue.counts()["succeeded"]
    engine.dispose()
    dups = sum(1 for n in finishes_per_job(events).values() if n > 1)
    return succeeded, dups, len(lease_violations(events))


def pct(values, q):
    """The q-th percentile (nearest rank) of `values`, or nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def list_schedule(durations, workers):
    """Makespan when each job, in the given order, goes to the first worker to come free."""
    free = [0.0] * workers
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def claim_order(rows, order):
    if order == "guide":
        return sorted(rows, key=lambda r: r["position"])
    return sorted(rows, key=lambda r: (-r["cost"], r["position"]))


def header(args, folder):
    shown = mask_url(args.db) if args.db else f"sqlite:///{folder}/<round>.sqlite"
    engine = connect(args.db or f"sqlite:///{folder / 'probe.sqlite'}", create=True)
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            version = "SQLite " + conn.execute(text("select sqlite_version()")).scalar_one()
        else:
            version = "server " + str(conn.execute(text("show server_version")).scalar_one())
    backend = engine.dialect.name
    engine.dispose()
    print(f"queue benchmark  db: {shown} ({backend}, {version})")
    if backend == "sqlite" and args.db is None:
        print(f"  folder {folder} on {filesystem_type(folder) or '?'}")
    print(f"  CPUs {os.cpu_count()}  Python {platform.python_version()}  "
          f"SQLAlchemy {sqlalchemy.__version__}  {platform.platform()}")


def throughput(args, folder, sweep):
    base = job_rows(sweep, "smoke", {}, [], str(folder / "runs"))
    rows = [{**base[i % len(base)], "name": f"{base[i % len(base)]['name']}_b{i}",
             "position": i, "out_dir": f"{base[i % len(base)]['out_dir']}_b{i}"}
            for i in range(args.jobs)]
    print(f"\n1. claim -> finish on {args.jobs} no-op jobs (order guide, "
          f"lease {LEASE_SECONDS:.0f} s)")
    print(f"{'procs':>5} {'done':>5} {'dup':>4} {'viol':>4} {'errors':>6} {'wall s':>7} "
          f"{'jobs/s':>7} {'claim p50':>9} {'p99':>7} {'finish p50':>10} {'p99':>7}  (ms)")
    for procs in args.processes:
        url = fresh_queue(args.db, folder, f"throughput_p{procs}")
        wall, got = run_round(url, rows, procs, "guide")
        claims = [x for _, c, _, _, _ in got for x in c]
        finishes = [x for _, _, f, _, _ in got for x in f]
        errors = [f"worker {w}: {e}" for w, _, _, e, _ in got if e]
        done, dups, violations = audit(url)
        print(f"{procs:>5} {done:>5} {dups:>4} {violations:>4} {len(errors):>6} {wall:>7.2f} "
              f"{len(finishes) / wall:>7.1f} {pct(claims, 50):>9.2f} {pct(claims, 99):>7.2f} "
              f"{pct(finishes, 50):>10.2f} {pct(finishes, 99):>7.2f}")
        for line in errors:
            print(f"      {line}")


def makespan(args, folder, sweep):
    rows = job_rows(sweep, "full", {}, [], str(folder / "runs"))
    total = sum(r["cost"] for r in rows)
    scale = args.makespan_seconds * WORKERS / total
    sleeps = {r["name"]: r["cost"] * scale for r in rows}
    bound = max(total / WORKERS, max(r["cost"] for r in rows)) * scale
    print(f"\n2. makespan of the {len(rows)}-job sweep (profile full) on {WORKERS} processes; "
          f"sleeps sum to {sum(sleeps.values()):.1f} s, longest job {max(sleeps.values()):.2f} s")
    print(f"   lower bound max(total/{WORKERS}, longest) = {bound:.2f} s")
    print(f"{'order':>6} {'measured s':>10} {'/bound':>7} {'analytical s':>12} {'/bound':>7} "
          f"{'done':>5} {'dup':>4} {'viol':>4} {'errors':>6}")
    for order in ("guide", "cost"):
        analytical = list_schedule([sleeps[r["name"]] for r in claim_order(rows, order)],
                                   WORKERS)
        url = fresh_queue(args.db, folder, f"makespan_{order}")
        wall, got = run_round(url, rows, WORKERS, order, sleeps)
        errors = [f"worker {w}: {e}" for w, _, _, e, _ in got if e]
        done, dups, violations = audit(url)
        print(f"{order:>6} {wall:>10.2f} {wall / bound:>7.3f} {analytical:>12.2f} "
              f"{analytical / bound:>7.3f} {done:>5} {dups:>4} {violations:>4} {len(errors):>6}")
        for line in errors:
            print(f"      {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="a throwaway queue database (default: SQLite files in a "
                        "temp folder); its jobs and events are DELETED before each round")
    parser.add_argument("--i-know-this-deletes", action="store_true",
                        help="use --db even though it holds jobs, events or other tables")
    parser.add_argument("--processes", default="1,4,8",
                        type=lambda s: [int(x) for x in s.split(",") if x.strip()])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--makespan-seconds", type=float, default=20.0)
    args = parser.parse_args()
    refuse_unless_throwaway(args.db, args.i_know_this_deletes)
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as tmp:
        folder = Path(tmp)
        header(args, folder)
        sweep = load_sweep(SWEEP)
        try:
            throughput(args, folder, sweep)
            makespan(args, folder, sweep)
        finally:
            if args.db:  # leave no fake jobs behind (results would call them the study)
                clear(args.db)


if __name__ == "__main__":
    main()
