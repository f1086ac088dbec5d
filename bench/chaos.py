"""Chaos run: the smoke sweep under 4 workers that are killed at random, checked bit for bit.

Run from the repository root:

    .venv/bin/python bench/chaos.py                       # 60 jobs, SQLite in a temp folder
    .venv/bin/python bench/chaos.py --only V=5 --faults 20
    .venv/bin/python bench/chaos.py --db postgresql+psycopg://user:pw@host/postgres
    .venv/bin/python bench/chaos.py --pg --db-outages 6      # a PostgreSQL server of its own,
                                                             # restarted 6 times

1. Plan the sweep (smoke profile; `max_attempts` raised, see MAX_ATTEMPTS) into a fresh queue:
   a new SQLite file, or with --db a new database created on that PostgreSQL server.
2. The fault-free reference: every job's config trained in-process (trainer.train.run) with
   one torch thread, as the workers run, in a pool of processes, into its own folder.
3. The chaos run: `--workers` real worker processes (`python -m runner worker --gpu cpu
   --threads 1 --lease 2`). A driver sends `--faults` signals, SIGKILL or SIGTERM, to random
   workers, each at a random moment or aimed at a phase from outside, by timing only (no
   hooks in the code under test): a worker whose log shows it claiming (just started, or
   just finished a job), a worker writing a checkpoint (a temp file seen in its job's
   state/ or snapshots/ folder), a worker training. `--freezes` more faults SIGSTOP a worker
   for 1.5-3 leases and SIGCONT it: its job is taken over while it sleeps, so it wakes up
   fenced out. `--db-outages` more faults take the database away for 2-8 s between them:
   a PostgreSQL server (started by this run with --pg) stopped (fast or immediate shutdown,
   at random) and started again; a SQLite file held under an exclusive write lock, the
   workers' busy timeout cut to 1 s ($RUNNER_SQLITE_BUSY_TIMEOUT) so that it is an outage
   to them. Every outage is longer than the lease: leases expire by the database's clock
   meanwhile. Faults are paced by progress so that they land all along the sweep (the k-th
   of F waits for 75% x k/F of the jobs to succeed, and a random --interval). Workers that
   exit (killed, stopped, or nothing claimable while a dead worker's lease runs out) are
   restarted while there is work, until every job succeeded.
   Each fault records what the victim was doing, from its log, its job's row and folder.
4. Checks: every job succeeded; no job ever had two live leases and no lease wrote after
   losing its job (testing.audit, over the events table); each job finished once, by the
   lease of its last claim; every job's final state (model, optimiser, batch RNG), kept
   snapshots, metrics.jsonl, eval.json and config.yaml equal the reference bit for bit; no
   worker exited with an error status (an outage must not kill one).
Prints the figures; exit status 1 when a check fails or fewer faults than --faults landed.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from db import JobQueue, connect, mask_url
from db.engine import BUSY_TIMEOUT_ENV
from testing import pgserver
from testing.audit import finishes_per_job, lease_violations

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SWEEP = ROOT / "conf" / "sweep.yaml"
# A job whose worker dies `max_attempts` times stays failed (the sweep's default is 3). Here
# workers die on purpose dozens of times, so a job may lose several attempts: the limit is
# raised so that every job can finish; a graceful stop (SIGTERM) never counts an attempt.
MAX_ATTEMPTS = 1000
TARGETS = ("claim", "between jobs", "checkpoint", "training", "any")   # where faults aim
PHASES = ("startup", "claim", "between jobs", "training", "checkpoint write", "finishing")

_LINE = re.compile(r"^\S+ \S+ [A-Z]+ (.*)$")


# --- a worker process and what its log says it is doing ----------------------------------


class Worker:
    def __init__(self, index: int, url: str, lease: float, log_dir: Path,
                 env: dict | None = None):
        self.index = index
        self.log_path = log_dir / f"worker-{index:03d}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "runner", "worker", "--gpu", "cpu", "--threads", "1",
                 "--lease", f"{lease:g}"],
                cwd=ROOT, env={**os.environ, "RUNNER_DB": url, "PYTHONUNBUFFERED": "1",
                               **(env or {})},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        self.name = f"{socket.gethostname()}:cpu:{self.proc.pid}"  # as runner.worker names it
        self.offset, self.partial = 0, ""
        self.started = False        # logged its start line (torch imported, about to claim)
        self.job: str | None = None  # the job its log says it works on
        self.finished_line = False   # the trainer logged "finished" (eval.json written)
        self.jobs_ended = 0
        self.fenced = 0              # writes refused because the lease was lost
        self.frozen_until: float | None = None
        self.signalled = False
        self.outages_seen = 0        # database outages it logged
        self.last_line = ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def read_log(self) -> None:
        try:
            with open(self.log_path) as f:
                f.seek(self.offset)
                chunk = f.read()
                self.offset = f.tell()
        except OSError:
            return
        lines = (self.partial + chunk).split("\n")
        self.partial = lines.pop()
        for line in lines:
            m = _LINE.match(line)
            message = m.group(1) if m else line
            if line.strip():
                self.last_line = line.strip()
            if message.startswith("database unreachable: "):
                self.outages_seen += 1
            if message.startswith("worker ") and ", lease " in message:
                self.started = True
            elif ": claimed (attempt " in message:
                self.job, self.finished_line = message.split(": ", 1)[0], False
            elif ": finished: test accuracy" in message:
                self.finished_line = True
            elif (": succeeded, test accuracy" in message or ": back to pending at step" in message
                  or ": failed: " in message or "handing the job back" in message
                  or "lease lost (taken over)" in message):
                self.job, self.finished_line = None, False
                self.jobs_ended += 1
            if "lease lost" in message:
                self.fenced += 1

    def log_phase(self) -> str:
        if not self.started:
            return "startup"
        if self.job is None:
            return "between jobs" if self.jobs_ended else "claim"
        return "finishing" if self.finished_line else "training"


def temp_files(folder: Path) -> set[Path]:
    """Checkpoint temp files (state or snapshot being written) in a job's folder."""
    found = set()
    for sub in ("state", "snapshots"):
        try:
            with os.scandir(folder / sub) as it:
                found.update(Path(e.path) for e in it if e.name.endswith(".tmp"))
        except OSError:
            pass
    return found


@dataclass
class Fault:
    signal: str
    target: str
    phase: str = ""
    job: str | None = None
    claim_committed: bool = False   # killed while claiming, after the claim was committed
    orphaned_temp: bool = False     # SIGKILL left a half-written checkpoint temp file
    at: float = 0.0


@dataclass
class DbOutage:
    kind: str          # "postgresql fast", "postgresql immediate", "sqlite lock"
    start: float       # wall clock (the database's clock is this host's)
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class ChaosResult:
    url: str
    jobs: int
    workers: int
    lease: float
    faults: list[Fault] = field(default_factory=list)
    freezes: int = 0
    outages: list[DbOutage] = field(default_factory=list)
    outages_seen: int = 0           # outages logged by workers (one per worker and outage)
    worker_errors: list[str] = field(default_factory=list)  # exited non-zero, not by a kill
    started_workers: int = 0
    wall_s: float = 0.0
    reference_s: float = 0.0
    counts: dict = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    duplicate_finishes: int = 0
    fenced_results: list[str] = field(default_factory=list)
    fenced_refused: int = 0
    claims: int = 0
    expiries: int = 0
    expiries_of_live: int = 0   # taken over from a live, unfrozen worker that went silent
    expiries_after_outage: int = 0   # ... because a database outage cut it off
    releases: int = 0
    max_attempts_used: int = 0
    mismatches: list[str] = field(default_factory=list)
    compared: int = 0
    orphans_left: int = 0
    problems: list[str] = field(default_factory=list)
    ended: dict = field(default_factory=dict)
    frozen: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


# --- the driver ---------------------------------------------------------------------------


class Driver:
    def __init__(self, url: str, n_workers: int, lease: float, log_dir: Path, rng: random.Random,
                 pg_folder: Path | None = None, worker_env: dict | None = None):
        self.url, self.n_workers, self.lease, self.log_dir, self.rng = (
            url, n_workers, lease, log_dir, rng)
        self.pg_folder, self.worker_env = pg_folder, worker_env
        self.queue = JobQueue(connect(url))
        self.workers: list[Worker] = []
        self.started = 0
        self.fenced_by_dead = 0
        self.outages_seen = 0
        self.worker_errors: list[str] = []
        self.orphans: set[Path] = set()   # temp files of killed writes, seen already
        self.ended: dict[str, float] = {}             # worker name -> wall time it was gone
        self.frozen: dict[str, list[tuple[float, float]]] = {}  # name -> (from, to) wall times

    def start_worker(self) -> Worker:
        w = Worker(self.started, self.url, self.lease, self.log_dir, self.worker_env)
        self.started += 1
        self.workers.append(w)
        return w

    def alive(self) -> list[Worker]:
        return [w for w in self.workers if w.alive()]

    def poll(self) -> tuple[dict, list[dict]]:
        """Read logs, thaw sleepers, reap the dead, restart while there is work."""
        now = time.monotonic()
        for w in self.workers:
            if w.frozen_until is not None and now >= w.frozen_until:
                self._signal(w, signal.SIGCONT)
                w.frozen_until = None
                self.frozen[w.name][-1] = (self.frozen[w.name][-1][0], time.time())
        for w in list(self.workers):
            w.read_log()
            if not w.alive():
                self._reap(w)
                self.workers.remove(w)
        jobs = self.queue.jobs()
        counts = Counter(j["state"] for j in jobs)
        wanted = min(self.n_workers, counts["pending"] + counts["running"])
        while len(self.alive()) < wanted:
            self.start_worker()
        return counts, jobs

    def _reap(self, w: Worker) -> None:
        w.read_log()
        self.fenced_by_dead += w.fenced
        self.outages_seen += w.outages_seen
        self.ended.setdefault(w.name, time.time())
        # 0: done, or stopped by SIGTERM; -9/-15: killed (SIGTERM before its handler was in).
        if w.proc.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM):
            self.worker_errors.append(f"worker {w.name} exited {w.proc.returncode}: "
                                      f"{w.last_line[:300]}")

    def outage(self) -> DbOutage:
        """Take the database away for 2-8 s (always longer than the lease), then back."""
        seconds = self.rng.uniform(max(2.0, 1.5 * self.lease), 8.0)
        if self.pg_folder is not None:
            mode = self.rng.choice(["fast", "immediate"])
            down = time.time()
            pgserver.shutdown(self.pg_folder, mode)
            time.sleep(seconds)
            pgserver.start_again(self.pg_folder)
            return DbOutage(f"postgresql {mode}", down, time.time())
        path = make_url(self.url).database
        holder = sqlite3.connect(path, isolation_level=None, timeout=60)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            down = time.time()
            time.sleep(seconds)
            holder.execute("COMMIT")
        finally:
            holder.close()
        return DbOutage("sqlite lock", down, time.time())

    def _signal(self, w: Worker, sig: signal.Signals) -> None:
        try:
            os.kill(w.proc.pid, sig)
        except ProcessLookupError:
            pass

    def pick(self, target: str, patience: float) -> tuple[Worker | None, Path | None]:
        """A live, unfrozen worker in the phase `target` aims at (or any, after `patience` s).

        "checkpoint" also returns the folder where a checkpoint temp file was just seen.
        """
        deadline = time.monotonic() + patience
        folders: dict[str, Path] = {}
        while True:
            candidates = [w for w in self.alive() if w.frozen_until is None and not w.signalled]
            for w in candidates:
                w.read_log()
            busy = [w for w in candidates if w.log_phase() == "training"]
            if target in ("claim", "between jobs"):
                hits = [w for w in candidates if w.log_phase() == target]
                if hits:
                    return self.rng.choice(hits), None
            elif target == "training" and busy:
                time.sleep(self.rng.uniform(0, 0.3))
                return self.rng.choice(busy), None
            elif target == "checkpoint" and busy:
                if any(w.job not in folders for w in busy):
                    folders = {j["name"]: Path(j["out_dir"]) for j in self.queue.jobs()}
                for _ in range(200):  # a tight look at the busy workers' folders
                    for w in busy:
                        if w.job in folders and temp_files(folders[w.job]) - self.orphans:
                            return w, folders[w.job]
            elif target == "any" and candidates:
                return self.rng.choice(candidates), None
            if time.monotonic() > deadline:
                return (self.rng.choice(candidates), None) if candidates else (None, None)
            if target != "checkpoint" or not busy:
                time.sleep(0.005)

    def fault(self, target: str, sig: signal.Signals) -> Fault | None:
        w, folder = self.pick(target, patience=2.5)
        if w is None:
            return None
        phase = w.log_phase()
        job = w.job
        rows = {j["name"]: j for j in self.queue.jobs()} if folder is None and job else {}
        if folder is None and job in rows:
            folder = Path(rows[job]["out_dir"])
        before = temp_files(folder) - self.orphans if folder else set()
        at = time.monotonic()
        self._signal(w, sig)
        fault = Fault(signal.Signals(sig).name, target, at=at)
        if sig == signal.SIGSTOP:
            w.frozen_until = at + self.lease * self.rng.uniform(1.5, 3.0)
            self.frozen.setdefault(w.name, []).append((time.time(), float("inf")))
        else:
            w.signalled = True
        if sig == signal.SIGKILL:
            w.proc.wait(timeout=30)
            self.ended[w.name] = time.time()
            # Nobody else writes in a job's folder while its worker holds the folder lock:
            # a temp file still there now is a write the kill cut short.
            after = temp_files(folder) - self.orphans if folder else set()
            fault.orphaned_temp = bool(after)
            self.orphans |= after
            held = [j for j in self.queue.jobs()
                    if j["state"] == "running" and j["worker"] == w.name]
            if phase in ("claim", "between jobs") and held:
                fault.claim_committed = True
        if phase == "training" and (before or fault.orphaned_temp):
            phase = "checkpoint write"
        fault.phase, fault.job = phase, job
        return fault

    def shutdown(self) -> None:
        for w in self.workers:
            if w.frozen_until is not None:
                self._signal(w, signal.SIGCONT)
            if w.alive():
                self._signal(w, signal.SIGTERM)
        for w in self.workers:
            try:
                w.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            self._reap(w)
        self.workers = []
        self.queue.engine.dispose()


PACE = 0.75  # every fault may land once this share of the jobs has succeeded


def run_chaos(url: str, n_jobs: int, n_workers: int, lease: float, faults: int, freezes: int,
              interval: tuple[float, float], log_dir: Path, rng: random.Random,
              timeout: float, progress=print, outages: int = 0,
              pg_folder: Path | None = None) -> ChaosResult:
    res = ChaosResult(url, n_jobs, n_workers, lease)
    sqlite = make_url(url).get_backend_name() == "sqlite"
    # A SQLite lock of a few seconds is an outage only to a writer that gives up waiting.
    env = {BUSY_TIMEOUT_ENV: "1"} if outages and sqlite else None
    driver = Driver(url, n_workers, lease, log_dir, rng, pg_folder, env)
    kinds = ["fault"] * faults + ["freeze"] * freezes + ["outage"] * outages
    rng.shuffle(kinds)
    total_faults = len(kinds)
    t0 = time.monotonic()
    next_at = t0 + rng.uniform(*interval)
    try:
        while True:
            counts, _ = driver.poll()
            if counts["succeeded"] + counts["failed"] == n_jobs:
                break
            if time.monotonic() - t0 > timeout:
                res.problems.append(f"timed out after {timeout:.0f}s: {dict(counts)}")
                break
            # Faults are paced by progress, so that they land all along the sweep: the k-th
            # of F waits until PACE x k/F of the jobs succeeded and a random interval passed,
            # or, if the sweep is ahead of that schedule, only until the gate. The last
            # quarter of the sweep is slack for faults that found no target at first.
            sent = total_faults - len(kinds)
            gate = int(PACE * n_jobs * sent / max(total_faults, 1))
            behind = counts["succeeded"] >= int(PACE * n_jobs * (sent + 1)
                                                / max(total_faults, 1))
            if kinds and counts["succeeded"] >= gate and (behind or time.monotonic() >= next_at):
                kind = kinds.pop()
                if kind == "outage":
                    f = driver.outage()
                    res.outages.append(f)
                elif kind == "freeze":
                    f = driver.fault("any", signal.SIGSTOP)
                    res.freezes += f is not None
                else:
                    sig = signal.SIGKILL if rng.random() < 0.55 else signal.SIGTERM
                    f = driver.fault(rng.choice(TARGETS), sig)
                    if f is not None:
                        res.faults.append(f)
                        if len(res.faults) % 10 == 0:
                            progress(f"  {len(res.faults)} faults, {time.monotonic() - t0:.0f}s, "
                                     f"{counts['succeeded']}/{n_jobs} succeeded")
                if f is None:
                    kinds.append(kind)
                next_at = time.monotonic() + rng.uniform(*interval)
            time.sleep(0.05)
    finally:
        driver.shutdown()
    res.wall_s = time.monotonic() - t0
    res.started_workers = driver.started
    res.fenced_refused = driver.fenced_by_dead
    res.outages_seen, res.worker_errors = driver.outages_seen, driver.worker_errors
    res.ended, res.frozen = driver.ended, driver.frozen
    return res


# --- planning, the reference, the checks ----------------------------------------------------


def fresh_url(db: str | None, work: Path) -> str:
    """A new SQLite file in `work`, or a new database on the PostgreSQL server of `db`."""
    if db is None:
        return f"sqlite:///{work / 'queue.sqlite'}"
    parsed = make_url(db)
    if parsed.get_backend_name() != "postgresql":
        raise SystemExit("--db: give a PostgreSQL server URL (SQLite uses a new temp file)")
    name = f"chaos_{uuid.uuid4().hex[:10]}"
    admin = create_engine(db, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return parsed.set(database=name).render_as_string(hide_password=False)


def plan(url: str, work: Path, only: list[str]) -> list[dict]:
    sweep = work / "sweep.yaml"
    text_ = SWEEP.read_text()
    sweep.write_text(re.sub(r"(?m)^max_attempts: *\d+", f"max_attempts: {MAX_ATTEMPTS}", text_))
    args = [PYTHON, "-m", "runner", "plan", "--sweep", str(sweep), "--profile", "smoke",
            "--out-root", str(work / "runs")]
    for item in only:
        args += ["--only", item]
    proc = subprocess.run(args, cwd=ROOT, env={**os.environ, "RUNNER_DB": url},
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"plan failed: {proc.stderr.strip()}")
    queue = JobQueue(connect(url))
    jobs = queue.jobs()
    queue.engine.dispose()
    return jobs


def _train_reference(config: dict, out: str) -> None:
    import torch

    from trainer.train import run

    torch.set_num_threads(1)  # as the workers run: CPU sums depend on the thread count
    run(config, out)


def reference(jobs: list[dict], root: Path, processes: int) -> float:
    """Train every job fault-free into root/<name>; the wall time."""
    t0 = time.monotonic()
    with ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_train_reference, j["config"], str(root / j["name"]))
                   for j in jobs]
        for f in futures:
            f.result()
    return time.monotonic() - t0


def _canonical(obj):
    """A state's content as plain bytes/values, for a bit-for-bit comparison."""
    import torch

    if isinstance(obj, torch.Tensor):  # dtype, shape and the raw bytes: bit for bit
        flat = obj.detach().cpu().contiguous().reshape(-1)
        return (str(obj.dtype), tuple(obj.shape), flat.view(torch.uint8).numpy().tobytes())
    if isinstance(obj, dict):
        return {k: _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    return obj


def final_state(folder: Path) -> dict:
    """The parts of the newest state that training determines (not the process-global RNGs
    the trainer saves but never draws from: Python's and torch's default generator)."""
    import torch

    from trainer import checkpoint as ckpt

    newest = ckpt.list_states(folder)[0]
    state = torch.load(newest, map_location="cpu", weights_only=True)
    return {"file": newest.name, "step": state["step"], "model": _canonical(state["model"]),
            "optimizer": _canonical(state["optimizer"]),
            "batches": _canonical(state["rng"]["batches"]), "config": state["config"]}


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def compare(job: dict, ref: Path) -> list[str]:
    """What differs between a job's folder and its fault-free reference (empty: nothing)."""
    out = Path(job["out_dir"])
    diffs = []
    for name in ("metrics.jsonl", "eval.json", "config.yaml"):
        if _digest(out / name) != _digest(ref / name) or _digest(out / name) is None:
            diffs.append(name)
    snaps = sorted(p.name for p in (ref / "snapshots").glob("*.pt"))
    if sorted(p.name for p in (out / "snapshots").glob("*.pt")) != snaps:
        diffs.append("snapshots (set)")
    diffs += [f"snapshots/{s}" for s in snaps
              if _digest(out / "snapshots" / s) != _digest(ref / "snapshots" / s)]
    a, b = final_state(out), final_state(ref)
    diffs += [f"state:{k}" for k in a if a[k] != b[k]]
    return diffs


def check(res: ChaosResult, url: str, ref_root: Path | None, min_faults: int) -> None:
    queue = JobQueue(connect(url))
    jobs, events = queue.jobs(), queue.events()
    queue.engine.dispose()
    res.counts = Counter(j["state"] for j in jobs)
    if res.counts["succeeded"] != len(jobs):
        res.problems.append(f"only {res.counts['succeeded']}/{len(jobs)} jobs succeeded")
    res.violations = lease_violations(events)
    if res.violations:
        res.problems.append(f"{len(res.violations)} lease violations")
    finishes = finishes_per_job(events)
    res.duplicate_finishes = sum(n - 1 for n in finishes.values() if n > 1)
    if res.duplicate_finishes:
        res.problems.append(f"{res.duplicate_finishes} duplicate finishes")
    last_claim: dict[int, str] = {}
    for e in events:
        if e["kind"] == "claim":
            last_claim[e["job_id"]] = e["token"]
        elif e["kind"] == "finish" and e["token"] != last_claim.get(e["job_id"]):
            res.fenced_results.append(f"job {e['job_id']}: finished by {e['token'][:8]}, "
                                      "not by the lease of its last claim")
    if res.fenced_results:
        res.problems.append(f"{len(res.fenced_results)} results from fenced-out attempts")
    for e in events:  # was the lease's worker dead or frozen when its job was taken over?
        if e["kind"] == "expire" and e["worker"]:
            gone = res.ended.get(e["worker"], float("inf")) <= e["at"]
            slept = any(a <= e["at"] and b >= e["at"] - res.lease
                        for a, b in res.frozen.get(e["worker"], []))
            res.expiries_of_live += not (gone or slept)
            # Cut off by an outage: taken over as the database came back, before the
            # worker's next heartbeat got through.
            res.expiries_after_outage += not (gone or slept) and any(
                o.start <= e["at"] <= o.end + 5 * res.lease for o in res.outages)
    kinds = Counter(e["kind"] for e in events)
    res.claims, res.expiries, res.releases = kinds["claim"], kinds["expire"], kinds["release"]
    res.max_attempts_used = max((j["attempts"] for j in jobs), default=0)
    if ref_root is not None:
        for job in jobs:
            if job["state"] != "succeeded":
                continue
            diffs = compare(job, ref_root / job["name"])
            res.compared += 1
            if diffs:
                res.mismatches.append(f"{job['name']}: {', '.join(diffs)}")
        if res.mismatches:
            res.problems.append(f"{len(res.mismatches)} jobs differ from the fault-free run")
    res.orphans_left = sum(len(temp_files(Path(j["out_dir"]))) for j in jobs)
    if len(res.faults) < min_faults:
        res.problems.append(f"only {len(res.faults)} faults landed (wanted {min_faults})")
    if res.worker_errors:
        res.problems.append(f"{len(res.worker_errors)} workers exited with an error")


def report(res: ChaosResult, backend: str) -> str:
    sigs = Counter(f.signal for f in res.faults)
    phases = Counter(f.phase for f in res.faults)
    committed = sum(f.claim_committed for f in res.faults)
    orphaned = sum(f.orphaned_temp for f in res.faults)
    by_phase = ", ".join(f"{p} {phases[p]}" for p in PHASES if phases[p])
    mismatched = len(res.mismatches)
    kinds = Counter(o.kind for o in res.outages)
    outage_kinds = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
    lines = [
        f"chaos run: {res.jobs} jobs (smoke profile), {res.workers} workers, "
        f"lease {res.lease:g}s, {backend} ({mask_url(res.url)})",
        f"faults injected: {len(res.faults)} (SIGKILL {sigs['SIGKILL']}, "
        f"SIGTERM {sigs['SIGTERM']}) + {res.freezes} freezes (SIGSTOP 1.5-3 leases, SIGCONT)",
        f"  by phase: {by_phase}",
        f"  claims killed after commit (job left to expire): {committed}; "
        f"SIGKILLs that left a half-written checkpoint: {orphaned}",
        *([f"database outages: {len(res.outages)} ({outage_kinds}), "
           f"{min(o.seconds for o in res.outages):.1f}-"
           f"{max(o.seconds for o in res.outages):.1f}s each, "
           f"{sum(o.seconds for o in res.outages):.0f}s in all; logged by the workers "
           f"{res.outages_seen} times (once per worker and outage)"]
          if res.outages else []),
        f"workers that exited with an error (not killed): {len(res.worker_errors)}",
        f"worker processes started: {res.started_workers}; claims {res.claims}, "
        f"taken over after lease expiry {res.expiries} (of a live worker silent past its "
        f"lease: {res.expiries_of_live}"
        + (f", of which cut off by a database outage: {res.expiries_after_outage}"
           if res.outages else "")
        + f"), graceful releases {res.releases}, "
        f"most attempts on one job {res.max_attempts_used}",
        f"jobs succeeded: {res.counts.get('succeeded', 0)}/{res.jobs} "
        f"(failed {res.counts.get('failed', 0)})",
        f"two live leases on one job: {len(res.violations)}",
        f"results written by a fenced-out attempt: {len(res.fenced_results)} "
        f"(stale writes refused: {res.fenced_refused})",
        f"duplicate finishes: {res.duplicate_finishes}",
        f"bit-identical to the fault-free run: {res.compared - mismatched}/{res.compared} "
        f"(final state, snapshots, metrics.jsonl, eval.json, config.yaml); "
        f"mismatches: {mismatched}",
        f"temp files of killed writes still in job folders: {res.orphans_left} "
        "(a job's next attempt removes them)",
        f"wall time: chaos run {res.wall_s:.0f}s; fault-free reference {res.reference_s:.0f}s",
    ]
    for p in (res.violations[:5] + res.fenced_results[:5] + res.mismatches[:5]
              + res.worker_errors[:5]):
        lines.append(f"  ! {p}")
    lines.append("result: " + ("OK" if res.ok else "FAILED: " + "; ".join(res.problems)))
    return "\n".join(lines)


def chaos(work: Path, db: str | None = None, only: list[str] = (), workers: int = 4,
          lease: float = 2.0, faults: int = 60, freezes: int = 6,
          interval: tuple[float, float] = (0.5, 2.5), seed: int | None = None,
          ref_processes: int | None = None, timeout: float = 1800,
          progress=print, outages: int = 0, pg: bool = False) -> ChaosResult:
    """Plan, reference, chaos run, checks; the result (figures and problems).

    `pg`: on a PostgreSQL server this run starts (and stops), which `outages` restart.
    """
    work.mkdir(parents=True, exist_ok=True)
    if outages and db is not None:
        raise SystemExit("--db-outages restarts the server: use --pg (a server of this run's "
                         "own) instead of --db")
    if not pg:
        return _chaos(work, db, only, workers, lease, faults, freezes, interval, seed,
                      ref_processes, timeout, progress, outages, None)
    pg_folder = Path(tempfile.mkdtemp(prefix="chaos-pg-"))  # the server's user must reach it
    try:
        server = pgserver.start(pg_folder)
        progress(f"PostgreSQL server of this run: {server} (data in {pg_folder})")
        return _chaos(work, server, only, workers, lease, faults, freezes, interval, seed,
                      ref_processes, timeout, progress, outages, pg_folder)
    finally:
        pgserver.stop(pg_folder)
        shutil.rmtree(pg_folder, ignore_errors=True)


def _chaos(work, db, only, workers, lease, faults, freezes, interval, seed, ref_processes,
           timeout, progress, outages, pg_folder) -> ChaosResult:
    seed = random.randrange(2**32) if seed is None else seed
    url = fresh_url(db, work)
    jobs = plan(url, work, list(only))
    progress(f"planned {len(jobs)} jobs into {mask_url(url)}; seed {seed}")
    ref_root = work / "reference"
    t = reference(jobs, ref_root, ref_processes or max(1, min(os.cpu_count() or 1, 4)))
    progress(f"fault-free reference: {t:.0f}s")
    log_dir = work / "logs"
    log_dir.mkdir(exist_ok=True)
    res = run_chaos(url, len(jobs), workers, lease, faults, freezes, interval, log_dir,
                    random.Random(seed), timeout, progress, outages, pg_folder)
    res.reference_s = t
    check(res, url, ref_root, faults)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--db", help="a PostgreSQL server URL: a new database is created on it "
                                "(default: a new SQLite file in --work)")
    p.add_argument("--pg", action="store_true",
                   help="start a throwaway PostgreSQL server for the run (testing/pgserver.py; "
                        "needs the server binaries), e.g. to restart it with --db-outages")
    p.add_argument("--work", type=Path, help="folder for the queue, runs, logs (default: temp)")
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                   help="restrict the sweep, as `plan --only` (repeatable)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--lease", type=float, default=2.0)
    p.add_argument("--faults", type=int, default=60, help="SIGKILL/SIGTERM faults to inject")
    p.add_argument("--freezes", type=int, default=6, help="SIGSTOP/SIGCONT faults on top")
    p.add_argument("--db-outages", type=int, default=0,
                   help="database outages on top: PostgreSQL restarts (with --pg), or a SQLite "
                        "write lock held past the workers' busy timeout")
    p.add_argument("--interval", type=float, nargs=2, default=(0.5, 2.5), metavar=("MIN", "MAX"),
                   help="seconds between faults, drawn uniformly")
    p.add_argument("--seed", type=int)
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="chaos-"))
    print(f"work folder: {work}", flush=True)
    if args.pg and args.db:
        p.error("--pg starts its own server: give --pg or --db, not both")
    res = chaos(work, args.db, args.only, args.workers, args.lease, args.faults, args.freezes,
                tuple(args.interval), args.seed,
                progress=lambda m: print(m, flush=True), outages=args.db_outages, pg=args.pg)
    backend = "PostgreSQL" if res.url.startswith("postgresql") else "SQLite"
    print(report(res, backend))
    sys.exit(0 if res.ok else 1)


if __name__ == "__main__":
    main()
