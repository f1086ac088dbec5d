"""Every queue operation: plan, claim, heartbeat, progress, finish, fail, release, requeue,
and the worker registry (who is alive, whose job to reclaim).

A claim starts a new lease with a fresh token. Every later write by that
worker is conditional on `lease_token = token AND state = 'running'`, so a
worker whose lease was taken over can never overwrite the job (fencing). Each
successful transition appends an `events` row in the same transaction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, and_, delete, exc, func, insert, or_, select, update

from db.engine import DatabaseError, db_now, describe, mask_url
from db.models import STATES, Event, Job, Worker

ORDERS = ("guide", "cost")


class LeaseLost(Exception):
    """This worker no longer holds the job's lease: another worker may have it."""


@dataclass(frozen=True)
class Claim:
    """A job held under a lease by one worker."""

    id: int
    name: str
    token: str
    attempt: int          # this claim's number among the job's claims: 1, 2, ... never reused
    worker: str
    config: dict
    out_dir: str
    step: int
    total_steps: int
    lease_seconds: float


@dataclass
class PlanReport:
    new: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    # Queued with another config: {name: ["key: old -> new", ...]}; replaced only on request.
    changed: dict[str, list[str]] = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)   # changed but running: never replaced


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'dotted.key: old -> new' for every leaf that differs (absent leaves shown as such)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b or type(a) is not type(b):
            out.append(f"{prefix}{key}: {_show(a)} -> {_show(b)}")
    return out


_ABSENT = object()


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


# Fields of a row that a replan may change; the rest (progress, results) is reset.
PLANNED_FIELDS = ("v", "n", "model", "run", "position", "cost", "config", "out_dir",
                  "total_steps", "max_attempts", "profile", "overrides")
FRESH = {"state": "pending", "attempts": 0, "step": 0, "loss": None, "worker": None,
         "lease_token": None, "heartbeat_at": None, "progress_at": None, "finished_at": None,
         "test_accuracy": None, "balanced_accuracy": None, "majority_rate": None,
         "error": None, "traceback": None}


def _expired():
    return and_(Job.state == "running", Job.heartbeat_at < db_now() - Job.lease_seconds)


def worker_host(worker: str | None) -> str | None:
    """The host of a worker id `host:gpu:pid`."""
    parts = (worker or "").rsplit(":", 2)
    return parts[0] if len(parts) == 3 else None


def _held(claim: Claim):
    return and_(Job.id == claim.id, Job.lease_token == claim.token, Job.state == "running")


class JobQueue:
    def __init__(self, engine: Engine):
        self.engine = engine

    # --- transactions ------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One short write transaction (BEGIN IMMEDIATE on SQLite)."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except exc.DBAPIError as e:
            raise DatabaseError(self._describe(e)) from e

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect().execution_options(readonly=True) as conn, conn.begin():
                yield conn
        except exc.DBAPIError as e:
            raise DatabaseError(self._describe(e)) from e

    def _describe(self, e: exc.DBAPIError) -> str:
        return f"database '{mask_url(str(self.engine.url))}': {describe(e)}"

    def _event(self, conn: Connection, job_id: int, kind: str, worker=None, token=None,
               attempt=None, detail=None) -> None:
        conn.execute(insert(Event).values(
            job_id=job_id, at=db_now(), kind=kind, worker=worker, token=token, attempt=attempt,
            detail=None if detail is None else json.dumps(detail, sort_keys=True)))

    # --- planning ------------------------------------------------------------------

    def plan(self, rows: list[dict], dry_run: bool = False, replace: bool = False,
             move_aside: Callable[[str], None] | None = None) -> PlanReport:
        """Insert the rows whose name is new; report existing and changed ones.

        Each row: name, v, n, model, run, position, cost, config (dict), out_dir,
        total_steps, max_attempts, profile, overrides (list). A changed row (config or
        folder) is left as it is, unless `replace`: then, when it is not running, it is
        reset to pending with the new config, after `move_aside(old_out_dir)` has moved its
        old folder out of the way (inside this transaction: no worker can claim the job
        meanwhile, and a failed move changes nothing). Running jobs are never replaced.
        """
        report = PlanReport()
        with self._write() as conn:
            stored = {r.name: r for r in conn.execute(
                select(Job.id, Job.name, Job.state, Job.config, Job.out_dir))}
            for row in rows:
                values = {**row, "config": json.dumps(row["config"], sort_keys=True),
                          "overrides": json.dumps(list(row["overrides"]))}
                old = stored.get(row["name"])
                if old is None:
                    report.new.append(row["name"])
                    if not dry_run:
                        job_id = conn.execute(insert(Job).values(
                            **values, state="pending", attempts=0, claims=0, step=0,
                            created_at=db_now()).returning(Job.id)).scalar_one()
                        self._event(conn, job_id, "plan")
                    continue
                changes = config_changes(json.loads(old.config), row["config"])
                if old.out_dir != row["out_dir"]:
                    changes.append(f"folder: {old.out_dir} -> {row['out_dir']}")
                if not changes:
                    report.existing.append(row["name"])
                    continue
                report.changed[row["name"]] = changes
                if not replace:
                    continue
                # The row locked (PostgreSQL; SQLite holds the write lock): no claim now.
                state = conn.execute(select(Job.state).where(Job.id == old.id)
                                     .with_for_update()).scalar_one()
                if state == "running":
                    report.running.append(row["name"])
                    continue
                report.replaced.append(row["name"])
                if dry_run:
                    continue
                if move_aside:
                    move_aside(old.out_dir)
                conn.execute(update(Job).where(Job.id == old.id)
                             .values(**{k: values[k] for k in PLANNED_FIELDS}, **FRESH))
                self._event(conn, old.id, "replace", detail={"from": state,
                                                             "changes": changes})
            if dry_run:
                conn.rollback()
        return report

    # --- the worker's side ---------------------------------------------------------

    def claim(self, worker: str, lease_seconds: float, order: str = "guide") -> Claim | None:
        """Take the next claimable job under a new lease, or None.

        Claimable: pending, or running with a heartbeat older than its lease
        (its worker is gone; the job resumes from its checkpoint). A silent job
        that has used all its attempts is marked failed instead.
        """
        if order not in ORDERS:
            raise ValueError(f"unknown order '{order}' (known: {', '.join(ORDERS)})")
        ordering = (Job.position,) if order == "guide" else (Job.cost.desc(), Job.position)
        with self._write() as conn:
            self._fail_exhausted(conn)
            row = conn.execute(
                select(Job.id, Job.state, Job.worker, Job.lease_token)
                .where(or_(Job.state == "pending", _expired()), Job.attempts < Job.max_attempts)
                .order_by(*ordering).limit(1)
                .with_for_update(skip_locked=True)  # PostgreSQL; SQLite holds the write lock
            ).first()
            if row is None:
                return None
            token = uuid.uuid4().hex
            if row.state == "running":
                self._event(conn, row.id, "expire", row.worker, row.lease_token,
                            detail={"taken_over_by": worker})
            job = conn.execute(
                update(Job)
                .where(Job.id == row.id, Job.state == row.state,
                       Job.lease_token.is_(None) if row.lease_token is None
                       else Job.lease_token == row.lease_token)
                .values(state="running", worker=worker, lease_token=token,
                        lease_seconds=lease_seconds, attempts=Job.attempts + 1,
                        claims=Job.claims + 1, claimed_at=db_now(), heartbeat_at=db_now(),
                        error=None, traceback=None)
                .returning(Job.id, Job.name, Job.claims, Job.config, Job.out_dir, Job.step,
                           Job.total_steps)
            ).first()
            if job is None:  # cannot happen under the lock; never double-claim
                return None
            self._event(conn, job.id, "claim", worker, token, job.claims,
                        {"lease_seconds": lease_seconds, "step": job.step})
            self._seen(conn, worker, "busy", job.name)
        return Claim(job.id, job.name, token, job.claims, worker, json.loads(job.config),
                     job.out_dir, job.step, job.total_steps, lease_seconds)

    def _fail_exhausted(self, conn: Connection) -> None:
        rows = conn.execute(
            select(Job.id, Job.worker, Job.lease_token, Job.attempts)
            .where(_expired(), Job.attempts >= Job.max_attempts)
            .with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            error = (f"worker lost: lease expired on attempt {row.attempts} of "
                     f"{row.attempts} (last worker {row.worker})")
            conn.execute(update(Job).where(Job.id == row.id, Job.lease_token == row.lease_token)
                         .values(state="failed", lease_token=None, error=error,
                                 finished_at=db_now()))
            self._event(conn, row.id, "expire", row.worker, row.lease_token, row.attempts,
                        {"error": error})

    def _conditional(self, claim: Claim, kind: str | None, values: dict,
                     detail: dict | None = None) -> bool:
        with self._write() as conn:
            done = conn.execute(update(Job).where(_held(claim)).values(**values)).rowcount == 1
            if done and kind:
                self._event(conn, claim.id, kind, claim.worker, claim.token, claim.attempt, detail)
        return done

    def heartbeat(self, claim: Claim) -> bool:
        """Renew the lease (and the worker's liveness); False when the lease was lost."""
        with self._write() as conn:
            held = conn.execute(update(Job).where(_held(claim))
                                .values(heartbeat_at=db_now())).rowcount == 1
            if held:
                self._event(conn, claim.id, "heartbeat", claim.worker, claim.token,
                            claim.attempt)
                self._seen(conn, claim.worker, "busy", claim.name)
        return held

    def progress(self, claim: Claim, step: int, loss: float | None) -> bool:
        """Record live progress (throttled by the caller); False when the lease was lost."""
        return self._conditional(claim, None, {"step": step, "loss": loss,
                                               "progress_at": db_now()})

    def finish(self, claim: Claim, metrics: dict) -> None:
        values = {"state": "succeeded", "lease_token": None, "finished_at": db_now(),
                  "step": claim.total_steps, "error": None, "traceback": None,
                  "test_accuracy": metrics.get("accuracy"),
                  "balanced_accuracy": metrics.get("balanced_accuracy"),
                  "majority_rate": metrics.get("majority_rate")}
        if not self._conditional(claim, "finish", values, metrics):
            raise LeaseLost(f"{claim.name}: lease lost; result not recorded")

    def fail(self, claim: Claim, error: str, traceback: str | None = None) -> None:
        values = {"state": "failed", "lease_token": None, "finished_at": db_now(),
                  "error": error, "traceback": traceback}
        if not self._conditional(claim, "fail", values, {"error": error}):
            raise LeaseLost(f"{claim.name}: lease lost; failure not recorded")

    def release(self, claim: Claim, step: int) -> None:
        """Back to pending after a graceful stop; the attempt is not counted."""
        values = {"state": "pending", "lease_token": None, "step": step,
                  "attempts": Job.attempts - 1, "heartbeat_at": None}
        if not self._conditional(claim, "release", values, {"step": step}):
            raise LeaseLost(f"{claim.name}: lease lost; not released")

    # --- the worker registry ------------------------------------------------------

    def _seen(self, conn: Connection, worker: str, state: str, job: str | None) -> None:
        conn.execute(update(Worker).where(Worker.name == worker)
                     .values(seen_at=db_now(), state=state, job=job))

    def register_worker(self, name: str, host: str, pid: int, process: str | None,
                        device: str, lease_seconds: float) -> None:
        """Record a starting worker (a row left by an earlier process of that name is
        replaced: pids are reused)."""
        with self._write() as conn:
            conn.execute(delete(Worker).where(Worker.name == name))
            conn.execute(insert(Worker).values(
                name=name, host=host, pid=pid, process=process, device=device,
                lease_seconds=lease_seconds, state="idle", job=None, started_at=db_now(),
                seen_at=db_now()))

    def worker_seen(self, name: str, state: str = "idle") -> None:
        """The worker is alive (between jobs, or waiting), or has `exited`."""
        with self._write() as conn:
            self._seen(conn, name, state, None)

    def workers(self) -> list[dict]:
        """Every registered worker, with `alive`: not exited and seen within its lease."""
        with self._read() as conn:
            now = conn.execute(select(db_now())).scalar_one()
            rows = conn.execute(select(*Worker.__table__.columns)
                                .order_by(Worker.started_at)).mappings().all()
        return [{**r, "seen_age": now - r["seen_at"],
                 "alive": r["state"] != "exited" and now - r["seen_at"] <= r["lease_seconds"]}
                for r in rows]

    def reclaim_dead(self, host: str, is_dead: Callable[[str, str | None], str | None],
                     by: str) -> list[str]:
        """Running jobs of this host's workers whose process is gone: back to pending now.

        `is_dead(worker_name, process)` says why that worker is dead, or None if it may be
        alive. Only workers on `host` are judged (a pid means nothing elsewhere); other
        hosts' jobs wait for their lease. The dead attempt counts: after max_attempts the
        job is failed instead. Returns the names reclaimed.
        """
        reclaimed = []
        with self._write() as conn:
            rows = conn.execute(
                select(Job.id, Job.name, Job.worker, Job.lease_token, Job.attempts,
                       Job.max_attempts, Worker.process)
                .outerjoin(Worker, Worker.name == Job.worker)
                .where(Job.state == "running")
                .with_for_update(of=Job, skip_locked=True)).all()
            for row in rows:
                if worker_host(row.worker) != host:
                    continue
                reason = is_dead(row.worker, row.process)
                if reason is None:
                    continue
                exhausted = row.attempts >= row.max_attempts
                error = (f"worker lost: {reason}, on attempt {row.attempts} of "
                         f"{row.max_attempts}") if exhausted else None
                changed = conn.execute(
                    update(Job).where(Job.id == row.id, Job.lease_token == row.lease_token)
                    .values(state="failed" if exhausted else "pending", lease_token=None,
                            heartbeat_at=None, error=error,
                            finished_at=db_now() if exhausted else None)).rowcount
                if changed:
                    self._event(conn, row.id, "reclaim", row.worker, row.lease_token,
                                detail={"reason": reason, "by": by, "failed": exhausted})
                    conn.execute(update(Worker).where(Worker.name == row.worker)
                                 .values(state="exited", job=None))
                    reclaimed.append(row.name)
        return reclaimed

    def held_elsewhere(self, worker: str) -> list[dict]:
        """Running jobs of other workers: name, worker, seconds until their lease expires."""
        with self._read() as conn:
            now = conn.execute(select(db_now())).scalar_one()
            rows = conn.execute(select(Job.name, Job.worker, Job.heartbeat_at, Job.lease_seconds)
                                .where(Job.state == "running", Job.worker != worker)
                                .order_by(Job.position)).all()
        return [{"name": r.name, "worker": r.worker,
                 "expires_in": max(0.0, r.heartbeat_at + r.lease_seconds - now)} for r in rows]

    # --- the user's side -----------------------------------------------------------

    def requeue(self, names: list[str] = (), failed: bool = False) -> list[str]:
        """Failed (and/or named) jobs back to pending with attempts reset.

        A named running job is requeued only once its lease has expired (its worker is
        silent); a live one is refused, like an unknown name (ValueError), before
        anything changes.
        """
        with self._write() as conn:
            now = conn.execute(select(db_now())).scalar_one()
            rows = conn.execute(select(Job.id, Job.name, Job.state, Job.worker,
                                       Job.lease_token, Job.heartbeat_at,
                                       Job.lease_seconds)).all()
            by_name = {r.name: r for r in rows}
            unknown = [n for n in names if n not in by_name]
            if unknown:
                raise ValueError(f"no job named {', '.join(unknown)}")
            for name in names:
                row = by_name[name]
                if row.state == "running" and row.heartbeat_at + row.lease_seconds > now:
                    left = row.heartbeat_at + row.lease_seconds - now
                    raise ValueError(
                        f"{name} is running (worker {row.worker}, heartbeat "
                        f"{now - row.heartbeat_at:.0f}s ago); stop its worker first, or wait "
                        f"{left:.0f}s for its lease to expire")
            chosen = {r.name: r for r in rows if failed and r.state == "failed"}
            chosen.update({n: by_name[n] for n in names if by_name[n].state != "pending"})
            for row in chosen.values():
                if row.state == "running":  # silent worker: its lease ends here
                    self._event(conn, row.id, "expire", row.worker, row.lease_token,
                                detail={"requeued": True})
                conn.execute(update(Job).where(Job.id == row.id, Job.state == row.state).values(
                    state="pending", attempts=0, lease_token=None, error=None, traceback=None,
                    finished_at=None, heartbeat_at=None))
                self._event(conn, row.id, "requeue", detail={"from": row.state})
        return sorted(chosen)

    def counts(self) -> dict[str, int]:
        with self._read() as conn:
            got = dict(conn.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        return {state: got.get(state, 0) for state in STATES}

    def jobs(self) -> list[dict]:
        """Every job as a dict (config parsed), in the guide's order, with the DB's `now`."""
        with self._read() as conn:
            now = conn.execute(select(db_now())).scalar_one()
            rows = conn.execute(
                select(*Job.__table__.columns).order_by(Job.position)).mappings().all()
        out = []
        for row in rows:
            job = dict(row)
            job["config"] = json.loads(job["config"])
            job["heartbeat_age"] = (now - job["heartbeat_at"]) if job["heartbeat_at"] else None
            out.append(job)
        return out

    def events(self, job_id: int | None = None) -> list[dict]:
        with self._read() as conn:
            query = select(*Event.__table__.columns).order_by(Event.id)
            if job_id is not None:
                query = query.where(Event.job_id == job_id)
            return [dict(r) for r in conn.execute(query).mappings()]
