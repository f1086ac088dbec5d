"""Every queue operation: plan, claim, heartbeat, progress, finish, fail, release, requeue.

A claim starts a new lease with a fresh token. Every later write by that
worker is conditional on `lease_token = token AND state = 'running'`, so a
worker whose lease was taken over can never overwrite the job (fencing). Each
successful transition appends an `events` row in the same transaction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, and_, exc, func, insert, or_, select, update

from db.engine import DatabaseError, db_now, mask_url
from db.models import STATES, Event, Job

ORDERS = ("guide", "cost")


class LeaseLost(Exception):
    """This worker no longer holds the job's lease: another worker may have it."""


@dataclass(frozen=True)
class Claim:
    """A job held under a lease by one worker."""

    id: int
    name: str
    token: str
    attempt: int
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
    changed: list[str] = field(default_factory=list)   # kept as planned, not overwritten


def _expired():
    return and_(Job.state == "running", Job.heartbeat_at < db_now() - Job.lease_seconds)


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
        reason = str(e.orig).strip().splitlines()[0] if e.orig else type(e).__name__
        return f"database '{mask_url(str(self.engine.url))}': {reason}"

    def _event(self, conn: Connection, job_id: int, kind: str, worker=None, token=None,
               attempt=None, detail=None) -> None:
        conn.execute(insert(Event).values(
            job_id=job_id, at=db_now(), kind=kind, worker=worker, token=token, attempt=attempt,
            detail=None if detail is None else json.dumps(detail, sort_keys=True)))

    # --- planning ------------------------------------------------------------------

    def plan(self, rows: list[dict], dry_run: bool = False) -> PlanReport:
        """Insert the rows whose name is new; report existing and changed ones.

        Each row: name, v, n, model, run, position, cost, config (dict), out_dir,
        total_steps, max_attempts.
        """
        report = PlanReport()
        with self._write() as conn:
            stored = {name: cfg for name, cfg in conn.execute(select(Job.name, Job.config))}
            for row in rows:
                config = json.dumps(row["config"], sort_keys=True)
                if row["name"] not in stored:
                    report.new.append(row["name"])
                    if not dry_run:
                        job_id = conn.execute(insert(Job).values(
                            **{**row, "config": config}, state="pending", attempts=0, step=0,
                            created_at=db_now()).returning(Job.id)).scalar_one()
                        self._event(conn, job_id, "plan")
                elif stored[row["name"]] != config:
                    report.changed.append(row["name"])
                else:
                    report.existing.append(row["name"])
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
                        claimed_at=db_now(), heartbeat_at=db_now(), error=None, traceback=None)
                .returning(Job.id, Job.name, Job.attempts, Job.config, Job.out_dir, Job.step,
                           Job.total_steps)
            ).first()
            if job is None:  # cannot happen under the lock; never double-claim
                return None
            self._event(conn, job.id, "claim", worker, token, job.attempts,
                        {"lease_seconds": lease_seconds, "step": job.step})
        return Claim(job.id, job.name, token, job.attempts, worker, json.loads(job.config),
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
        """Renew the lease; False when it was lost."""
        return self._conditional(claim, "heartbeat", {"heartbeat_at": db_now()})

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

    # --- the user's side -----------------------------------------------------------

    def requeue(self, names: list[str] = (), failed: bool = False) -> list[str]:
        """Failed (and/or named) jobs back to pending with attempts reset.

        Unknown names and running jobs are refused (ValueError) before anything changes.
        """
        with self._write() as conn:
            rows = conn.execute(select(Job.id, Job.name, Job.state, Job.worker)).all()
            by_name = {r.name: r for r in rows}
            unknown = [n for n in names if n not in by_name]
            if unknown:
                raise ValueError(f"no job named {', '.join(unknown)}")
            running = [n for n in names if by_name[n].state == "running"]
            if running:
                raise ValueError(
                    f"{', '.join(running)} is running (worker {by_name[running[0]].worker}); "
                    "stop its worker first")
            chosen = {r.name: r for r in rows if failed and r.state == "failed"}
            chosen.update({n: by_name[n] for n in names if by_name[n].state != "pending"})
            for row in chosen.values():
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
