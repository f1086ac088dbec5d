"""Every queue operation: plan, claim, heartbeat, progress, finish, fail, release, requeue,
and the worker registry (who is alive, whose job to reclaim).

A claim starts a new lease with a fresh token. Every later write by that
worker is conditional on `lease_token = token AND state = 'running'`, so a
worker whose lease was taken over can never overwrite the job (fencing). Each
successful transition appends an `events` row in the same transaction.

Every operation is one short transaction run by `JobQueue._transaction`, which retries it
through a database outage within the queue's outage budget (db.outage). A retried write
may find that its earlier try committed although the answer was lost (the connection broke
during COMMIT): claims and end-of-job writes recognise their own earlier success instead of
claiming twice or reporting a lost lease.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    case,
    delete,
    exc,
    func,
    insert,
    or_,
    select,
    update,
)

from db.engine import (
    QUEUE_ID_KEY,
    QUICK_BUSY_TIMEOUT_MS,
    DatabaseError,
    db_now,
    describe,
    mask_url,
)
from db.models import STATES, Event, Job, Launch, Meta, Worker
from db.outage import OutageNotice, Outages

T = TypeVar("T")

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


@dataclass(frozen=True)
class Lease:
    """A heartbeat's or progress write's answer: true while the lease is held; `stop` is a
    stop the user asked for (cancel, pause), for the worker to act on."""

    held: bool
    stop: str | None = None

    def __bool__(self) -> bool:
        return self.held


@dataclass
class CancelReport:
    cancelled: list[str] = field(default_factory=list)   # now cancelled
    asked: list[str] = field(default_factory=list)       # running: their workers will stop them
    skipped: list[str] = field(default_factory=list)     # already cancelled, or succeeded


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
         "error": None, "traceback": None, "stop_request": None}


def _expired():
    return and_(Job.state == "running", Job.heartbeat_at < db_now() - Job.lease_seconds)


def worker_host(worker: str | None) -> str | None:
    """The host of a worker id `host:gpu:pid`."""
    parts = (worker or "").rsplit(":", 2)
    return parts[0] if len(parts) == 3 else None


def _late_cancel():
    """stop_request for a job that ends anyway: 'cancel' is kept (the cancel came too late),
    a pause is dropped (nothing left to hand back)."""
    return case((Job.stop_request == "cancel", "cancel"), else_=None)


def _never_claimed():
    return and_(Job.state == "pending", Job.claimed_at.is_(None))


def _held(claim: Claim):
    return and_(Job.id == claim.id, Job.lease_token == claim.token, Job.state == "running")


CLAIM_COLUMNS = (Job.id, Job.name, Job.claims, Job.config, Job.out_dir, Job.step,
                 Job.total_steps)


def _claim(row, token: str, worker: str, lease_seconds: float) -> Claim:
    """The Claim for a row of CLAIM_COLUMNS just claimed with `token`."""
    return Claim(row.id, row.name, token, row.claims, worker, json.loads(row.config),
                 row.out_dir, row.step, row.total_steps, lease_seconds)


def _logged(conn: Connection, claim: Claim, kind: str) -> bool:
    """Whether this claim's lease already wrote a `kind` event for its job."""
    return conn.execute(select(Event.id).where(
        Event.job_id == claim.id, Event.token == claim.token, Event.kind == kind).limit(1)
    ).first() is not None


class JobQueue:
    """The queue on `engine`. `outage_budget`: seconds an operation keeps retrying while the
    database is unreachable (0: report it at once, as the user's commands do); `on_outage` is
    told when an outage starts and ends (see db.outage)."""

    def __init__(self, engine: Engine, outage_budget: float = 0.0,
                 on_outage: Callable[[OutageNotice], None] | None = None):
        self.engine = engine
        self.outages = Outages(outage_budget, on_outage)

    # --- transactions ------------------------------------------------------------

    def _transaction(self, body: Callable[[Connection, bool], T], read: bool = False,
                     retry: bool = True, quick: bool = False,
                     cancel: threading.Event | None = None) -> T:
        """`body(conn, retrying)` in one short transaction (BEGIN IMMEDIATE on SQLite for a
        write), committed; DatabaseError when the database fails.

        A transient failure (db.outage.is_transient) is retried with backoff until the
        outage budget is spent; `retrying` tells the body that an earlier try may have
        committed. `retry=False`: one try (the user's commands, which are not all safe to
        repeat). `quick`: on SQLite, wait a couple of seconds for the write lock instead of
        the full busy timeout (a write the training thread makes, which must not hold it up).
        `cancel`: stop waiting to retry once it is set.
        """
        options: dict = {"readonly": True} if read else {}
        if quick:
            options["busy_ms"] = QUICK_BUSY_TIMEOUT_MS

        def attempt(retrying: bool) -> T:
            with self.engine.connect().execution_options(**options) as conn, conn.begin():
                return body(conn, retrying)

        try:
            return self.outages.run(attempt, self._describe, retry=retry, cancel=cancel)
        except (exc.DBAPIError, self.engine.dialect.loaded_dbapi.Error) as e:
            raise DatabaseError(self._describe(e)) from e

    def _read(self, body: Callable[[Connection], T]) -> T:
        return self._transaction(lambda conn, retrying: body(conn), read=True)

    def _describe(self, e: BaseException) -> str:
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

        def body(conn: Connection, retrying: bool) -> PlanReport:
            report = PlanReport()
            stored = {r.name: r for r in conn.execute(
                select(Job.id, Job.name, Job.config, Job.out_dir))}
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

        return self._transaction(body, retry=False)

    # --- the worker's side ---------------------------------------------------------

    def claim(self, worker: str, lease_seconds: float, order: str = "guide") -> Claim | None:
        """Take the next claimable job under a new lease, or None.

        Claimable: pending, or running with a heartbeat older than its lease
        (its worker is gone; the job resumes from its checkpoint). A silent job
        that has used all its attempts is marked failed instead.
        """
        if order not in ORDERS:
            raise ValueError(f"unknown order '{order}' (known: {', '.join(ORDERS)})")
        # The token is drawn once: a retry after a lost answer finds the job it already took.
        token = uuid.uuid4().hex

        def body(conn: Connection, retrying: bool) -> Claim | None:
            if retrying:
                mine = conn.execute(select(*CLAIM_COLUMNS).where(
                    Job.lease_token == token, Job.state == "running")).first()
                if mine is not None:
                    return _claim(mine, token, worker, lease_seconds)
            self._settle_expired(conn)
            if self._paused(conn):
                return None
            row = self._claimable(conn, order)
            if row is None:
                return None
            job = conn.execute(
                update(Job)
                .where(Job.id == row.id, Job.state == row.state,
                       Job.lease_token.is_(None) if row.lease_token is None
                       else Job.lease_token == row.lease_token)
                .values(state="running", worker=worker, lease_token=token,
                        lease_seconds=lease_seconds, attempts=Job.attempts + 1,
                        claims=Job.claims + 1, claimed_at=db_now(), heartbeat_at=db_now(),
                        error=None, traceback=None, stop_request=None, peak_memory=None)
                .returning(*CLAIM_COLUMNS)
            ).first()
            if job is None:  # the row changed after it was read (not under the lock): take none
                return None
            if row.state == "running":
                self._event(conn, row.id, "expire", row.worker, row.lease_token,
                            detail={"taken_over_by": worker})
            self._event(conn, job.id, "claim", worker, token, job.claims,
                        {"lease_seconds": lease_seconds, "step": job.step})
            self._seen(conn, worker, "busy", job.name)
            return _claim(job, token, worker, lease_seconds)

        return self._transaction(body)

    def _claimable(self, conn: Connection, order: str):
        """The next claimable job (id, state, worker, lease_token), locked, or None: of the
        first pending job and the first expired one, the one that comes first in `order`.

        Two queries, each walking the (state, position) index, not one with an OR: that one
        sorted every pending job at each claim (100,000 pending: 23 ms a claim)."""
        ordering = (Job.position,) if order == "guide" else (Job.cost.desc(), Job.position)
        found = [conn.execute(
            select(Job.id, Job.state, Job.worker, Job.lease_token, Job.position, Job.cost)
            .where(which, Job.attempts < Job.max_attempts,
                   # A lease can expire between the settling and this select (each statement
                   # reads the clock anew): a job asked to cancel is never taken, whatever
                   # the timing.
                   or_(Job.stop_request.is_(None), Job.stop_request != "cancel"))
            .order_by(*ordering).limit(1)
            .with_for_update(skip_locked=True)  # PostgreSQL; SQLite holds the write lock
        ).first() for which in (Job.state == "pending", _expired())]
        found = [row for row in found if row is not None]
        if order == "guide":
            return min(found, key=lambda row: row.position, default=None)
        return min(found, key=lambda row: (-row.cost, row.position), default=None)

    def _settle_expired(self, conn: Connection) -> None:
        """Expired jobs that must not run again: cancelled ones, and those out of attempts."""
        rows = conn.execute(
            select(Job.id, Job.worker, Job.lease_token, Job.attempts, Job.stop_request)
            .where(_expired(), or_(Job.attempts >= Job.max_attempts,
                                   Job.stop_request == "cancel"))
            .with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            if row.stop_request == "cancel":
                values, detail = {"state": "cancelled"}, {"cancelled": True}
            else:
                error = (f"worker lost: lease expired on attempt {row.attempts} of "
                         f"{row.attempts} (last worker {row.worker})")
                values, detail = {"state": "failed", "error": error}, {"error": error}
            conn.execute(update(Job).where(Job.id == row.id, Job.lease_token == row.lease_token)
                         .values(**values, lease_token=None, stop_request=None,
                                 finished_at=db_now()))
            self._event(conn, row.id, "expire", row.worker, row.lease_token, row.attempts,
                        detail)

    def _conditional(self, claim: Claim, kind: str, values: dict,
                     detail: dict | None = None) -> bool:
        """Apply `values` to the job if this claim still holds it, and log `kind`; False when
        the lease was lost. A retry that finds the job changed checks whether its own earlier
        try did it (that try's `kind` event of this lease is there): then it is done."""

        def body(conn: Connection, retrying: bool) -> bool:
            if conn.execute(update(Job).where(_held(claim)).values(**values)).rowcount == 1:
                self._event(conn, claim.id, kind, claim.worker, claim.token, claim.attempt,
                            detail)
                return True
            return retrying and _logged(conn, claim, kind)

        return self._transaction(body)

    def heartbeat(self, claim: Claim, cancel: threading.Event | None = None) -> Lease:
        """Renew the lease (and the worker's liveness); false when the lease was lost.

        Through an outage it keeps trying (within the budget) until `cancel` is set.
        """

        def body(conn: Connection, retrying: bool) -> Lease:
            row = conn.execute(update(Job).where(_held(claim)).values(heartbeat_at=db_now())
                               .returning(Job.stop_request)).first()
            if row is not None:
                self._event(conn, claim.id, "heartbeat", claim.worker, claim.token,
                            claim.attempt)
                self._seen(conn, claim.worker, "busy", claim.name)
            return Lease(row is not None, row.stop_request if row else None)

        return self._transaction(body, cancel=cancel)

    def progress(self, claim: Claim, step: int, loss: float | None,
                 test: dict | None = None, peak_memory: float | None = None) -> Lease:
        """Record live progress (throttled by the caller): step, loss, the newest test
        accuracy and balanced accuracy, peak GPU memory. False when the lease was lost.

        One quick try, never retried: progress is advisory, and a newer one follows within
        seconds (a failure still marks an outage).
        """
        values = {"step": step, "loss": loss, "progress_at": db_now()}
        if test:
            values.update(test_accuracy=test.get("accuracy"),
                          balanced_accuracy=test.get("balanced_accuracy"))
        if peak_memory is not None:
            values["peak_memory"] = peak_memory

        def body(conn: Connection, retrying: bool) -> Lease:
            row = conn.execute(update(Job).where(_held(claim)).values(**values)
                               .returning(Job.stop_request)).first()
            return Lease(row is not None, row.stop_request if row else None)

        return self._transaction(body, retry=False, quick=True)

    def finish(self, claim: Claim, metrics: dict) -> None:
        """The job succeeded. A cancel asked too late (the worker finished first) stays on
        the row as stop_request 'cancel', so that status can tell the user."""
        values = {"state": "succeeded", "lease_token": None, "finished_at": db_now(),
                  "step": claim.total_steps, "error": None, "traceback": None,
                  "stop_request": _late_cancel(),
                  "test_accuracy": metrics.get("accuracy"),
                  "balanced_accuracy": metrics.get("balanced_accuracy"),
                  "majority_rate": metrics.get("majority_rate")}
        if not self._conditional(claim, "finish", values, metrics):
            raise LeaseLost(f"{claim.name}: lease lost; result not recorded")

    def fail(self, claim: Claim, error: str, traceback: str | None = None) -> None:
        values = {"state": "failed", "lease_token": None, "finished_at": db_now(),
                  "error": error, "traceback": traceback, "stop_request": _late_cancel()}
        if not self._conditional(claim, "fail", values, {"error": error}):
            raise LeaseLost(f"{claim.name}: lease lost; failure not recorded")

    def release(self, claim: Claim, step: int, why: dict | None = None) -> None:
        """Back to pending after a graceful stop; the attempt is not counted. `why` (e.g.
        {"reason": "signal SIGTERM", "slurm_task": "120_3"}) goes into the event."""
        values = {"state": "pending", "lease_token": None, "step": step,
                  "attempts": Job.attempts - 1, "heartbeat_at": None, "stop_request": None}
        if not self._conditional(claim, "release", values, {"step": step, **(why or {})}):
            raise LeaseLost(f"{claim.name}: lease lost; not released")

    def cancelled(self, claim: Claim, step: int) -> None:
        """The worker stopped a job whose cancel was asked for: it is `cancelled` now."""
        values = {"state": "cancelled", "lease_token": None, "step": step,
                  "attempts": Job.attempts - 1, "heartbeat_at": None, "stop_request": None,
                  "finished_at": db_now()}
        if not self._conditional(claim, "cancel", values, {"step": step}):
            raise LeaseLost(f"{claim.name}: lease lost; cancel not recorded")

    # --- the worker registry ------------------------------------------------------

    def _seen(self, conn: Connection, worker: str, state: str, job: str | None) -> None:
        conn.execute(update(Worker).where(Worker.name == worker)
                     .values(seen_at=db_now(), state=state, job=job))

    def register_worker(self, name: str, host: str, pid: int, process: str | None,
                        device: str, lease_seconds: float, slurm: dict | None = None) -> None:
        """Record a starting worker (a row left by an earlier process of that name is
        replaced: pids are reused). `slurm`: the workers-table SLURM columns, under SLURM."""

        def body(conn: Connection, retrying: bool) -> None:
            conn.execute(delete(Worker).where(Worker.name == name))
            conn.execute(insert(Worker).values(
                name=name, host=host, pid=pid, process=process, device=device,
                lease_seconds=lease_seconds, state="idle", job=None, started_at=db_now(),
                seen_at=db_now(), **(slurm or {})))

        self._transaction(body)

    def worker_seen(self, name: str, state: str = "idle") -> None:
        """The worker is alive (between jobs, or waiting), or has `exited`."""
        self._transaction(lambda conn, retrying: self._seen(conn, name, state, None))

    def workers(self) -> list[dict]:
        """Every registered worker, with `alive`: not exited and seen within its lease."""

        def body(conn: Connection):
            return (conn.execute(select(db_now())).scalar_one(),
                    conn.execute(select(*Worker.__table__.columns)
                                 .order_by(Worker.started_at)).mappings().all())

        now, rows = self._read(body)
        return [{**r, "seen_age": now - r["seen_at"],
                 "alive": r["state"] != "exited" and now - r["seen_at"] <= r["lease_seconds"]}
                for r in rows]

    def reclaim_dead(self, host: str, is_dead: Callable[[str, str | None], str | None],
                     by: str) -> list[tuple[str, str]]:
        """Running jobs of this host's workers whose process is gone: back to pending now.

        `is_dead(worker_name, process)` says why that worker is dead, or None if it may be
        alive. Only workers on `host` are judged (a pid means nothing elsewhere); other
        hosts' jobs wait for their lease. The dead attempt counts: after max_attempts the
        job is failed instead (a cancel asked of the dead worker is settled as cancelled).
        Returns (name, reason) of each job reclaimed (by this call: a retry after a lost
        answer does not see what its earlier try reclaimed).
        """

        def body(conn: Connection, retrying: bool) -> list[tuple[str, str]]:
            reclaimed = []
            rows = conn.execute(
                select(Job.id, Job.name, Job.worker, Job.lease_token, Job.attempts,
                       Job.max_attempts, Job.stop_request, Worker.process)
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
                state = ("cancelled" if row.stop_request == "cancel" else
                         "failed" if exhausted else "pending")
                error = (f"worker lost: {reason}, on attempt {row.attempts} of "
                         f"{row.max_attempts}") if state == "failed" else None
                changed = conn.execute(
                    update(Job).where(Job.id == row.id, Job.lease_token == row.lease_token)
                    .values(state=state, lease_token=None, heartbeat_at=None, error=error,
                            stop_request=None,
                            finished_at=None if state == "pending" else db_now())).rowcount
                if changed:
                    self._event(conn, row.id, "reclaim", row.worker, row.lease_token,
                                detail={"reason": reason, "by": by, "to": state})
                    conn.execute(update(Worker).where(Worker.name == row.worker)
                                 .values(state="exited", job=None))
                    reclaimed.append((row.name, f"worker {row.worker}: {reason}"))
            return reclaimed

        return self._transaction(body)

    def held_elsewhere(self, worker: str) -> list[dict]:
        """Running jobs of other workers: name, worker, seconds until their lease expires."""

        def body(conn: Connection):
            return (conn.execute(select(db_now())).scalar_one(),
                    conn.execute(select(Job.name, Job.worker, Job.heartbeat_at,
                                        Job.lease_seconds)
                                 .where(Job.state == "running", Job.worker != worker)
                                 .order_by(Job.position)).all())

        now, rows = self._read(body)
        return [{"name": r.name, "worker": r.worker,
                 "expires_in": max(0.0, r.heartbeat_at + r.lease_seconds - now)} for r in rows]

    # --- launches: workers handed to a scheduler ------------------------------------

    def record_launch(self, scheduler: str, job_id: str, tasks: int, script: str | None,
                      detail: dict) -> None:
        def body(conn: Connection, retrying: bool) -> None:
            conn.execute(insert(Launch).values(
                at=db_now(), scheduler=scheduler, job_id=job_id, tasks=tasks, script=script,
                detail=json.dumps(detail, sort_keys=True)))

        self._transaction(body, retry=False)

    def launches(self, scheduler: str) -> list[dict]:
        """Every launch of `scheduler`, oldest first (detail parsed)."""
        rows = self._read(lambda conn: conn.execute(
            select(*Launch.__table__.columns).where(Launch.scheduler == scheduler)
            .order_by(Launch.id)).mappings().all())
        return [{**r, "detail": json.loads(r["detail"] or "{}")} for r in rows]

    def cancel_launch(self, scheduler: str, job_id: str) -> bool:
        """Mark a launch cancelled: its workers stop for good. False if no such launch."""

        def body(conn: Connection, retrying: bool) -> bool:
            return bool(conn.execute(
                update(Launch).where(Launch.scheduler == scheduler, Launch.job_id == job_id)
                .values(cancelled_at=func.coalesce(Launch.cancelled_at, db_now()))).rowcount)

        return self._transaction(body, retry=False)

    def launch_cancelled(self, scheduler: str, job_id: str) -> bool:
        return self._read(lambda conn: conn.execute(
            select(Launch.id).where(Launch.scheduler == scheduler, Launch.job_id == job_id,
                                    Launch.cancelled_at.is_not(None))).first() is not None)

    # --- the user's side -----------------------------------------------------------

    def requeue(self, names: list[str] = (), failed: bool = False, fresh: bool = False,
                move_aside: Callable[[str], None] | None = None, host: str | None = None,
                is_dead: Callable[[str, str | None], str | None] | None = None) -> list[str]:
        """Failed (and/or named) jobs back to pending with attempts reset.

        They resume from their checkpoint; with `fresh`, `move_aside(out_dir)` first moves
        their folder out of the way (inside this transaction) and they start from step 0.
        A named running job is requeued (not fresh) only once its lease has expired, or at
        once when its worker is on `host` and `is_dead(worker, process)` (as reclaim_dead)
        says why it is dead: its folder stays, guarded by the folder lock against a worker
        that wakes up. Unknown names and refused jobs raise ValueError before anything
        changes.
        """

        def body(conn: Connection, retrying: bool) -> list[str]:
            now = conn.execute(select(db_now())).scalar_one()
            rows = conn.execute(select(Job.id, Job.name, Job.state, Job.worker, Job.out_dir,
                                       Job.lease_token, Job.heartbeat_at, Job.lease_seconds,
                                       Worker.process)
                                .outerjoin(Worker, Worker.name == Job.worker)
                                .with_for_update(of=Job)).all()
            by_name = {r.name: r for r in rows}
            unknown = [n for n in names if n not in by_name]
            if unknown:
                raise ValueError(f"no job named {', '.join(unknown)}")
            dead: dict[str, str] = {}  # running jobs whose worker is known dead: why
            for name in names:
                row = by_name[name]
                if row.state != "running":
                    continue
                if fresh:
                    raise ValueError(f"{name} is running (worker {row.worker}): cancel it "
                                     "first, then requeue --fresh")
                reason = (is_dead(row.worker, row.process)
                          if is_dead and host and worker_host(row.worker) == host else None)
                if reason:
                    dead[name] = reason
                elif row.heartbeat_at + row.lease_seconds > now:
                    left = row.heartbeat_at + row.lease_seconds - now
                    raise ValueError(
                        f"{name} is running (worker {row.worker}, heartbeat "
                        f"{now - row.heartbeat_at:.0f}s ago); stop its worker first, or wait "
                        f"{left:.0f}s for its lease to expire")
            chosen = {r.name: r for r in rows if failed and r.state == "failed"}
            chosen.update({n: by_name[n] for n in names
                           if fresh or by_name[n].state != "pending"})
            for row in chosen.values():
                if row.name in dead:  # its worker's process is gone: its lease ends here
                    self._event(conn, row.id, "reclaim", row.worker, row.lease_token,
                                detail={"reason": dead[row.name], "by": "requeue",
                                        "to": "pending"})
                elif row.state == "running":  # silent worker: its lease ends here
                    self._event(conn, row.id, "expire", row.worker, row.lease_token,
                                detail={"requeued": True})
                reset = {"state": "pending", "attempts": 0, "lease_token": None, "error": None,
                         "traceback": None, "finished_at": None, "heartbeat_at": None,
                         "stop_request": None}
                if fresh:
                    reset.update(FRESH)
                # Fenced on the lease judged above: a lease renewed or taken since is kept.
                fence = (Job.lease_token == row.lease_token if row.lease_token is not None
                         else Job.lease_token.is_(None))
                changed = conn.execute(update(Job).where(Job.id == row.id, fence,
                                                         Job.state == row.state)
                                       .values(**reset)).rowcount
                if not changed:
                    raise ValueError(f"{row.name} changed while being requeued; try again")
                if fresh and move_aside:  # a failed move rolls the requeue back
                    move_aside(row.out_dir)
                self._event(conn, row.id, "requeue", detail={"from": row.state, "fresh": fresh})
            return sorted(chosen)

        return self._transaction(body, retry=False)

    def cancel(self, names: list[str]) -> CancelReport:
        """Named jobs to `cancelled` (never claimed; requeue brings one back).

        Pending and failed jobs at once; a running job by asking its worker (it sees the
        request at its next heartbeat or progress write, checkpoints, and marks the job
        cancelled); a running job whose lease expired at once. Unknown names raise
        ValueError before anything changes.
        """

        def body(conn: Connection, retrying: bool) -> CancelReport:
            report = CancelReport()
            rows = {r.name: r for r in conn.execute(
                select(Job.id, Job.name, Job.state, Job.worker, Job.lease_token)
                .where(Job.name.in_(names)).with_for_update())}
            unknown = [n for n in names if n not in rows]
            if unknown:
                raise ValueError(f"no job named {', '.join(unknown)}")
            expired = {r.id for r in conn.execute(select(Job.id).where(
                _expired(), Job.name.in_(names)))}
            for name in names:
                row = rows[name]
                if row.state in ("cancelled", "succeeded"):
                    report.skipped.append(name)
                elif row.state == "running" and row.id not in expired:
                    conn.execute(update(Job).where(Job.id == row.id, Job.state == "running")
                                 .values(stop_request="cancel"))
                    self._event(conn, row.id, "cancel", detail={"asked": row.worker})
                    report.asked.append(name)
                else:
                    if row.state == "running":
                        self._event(conn, row.id, "expire", row.worker, row.lease_token,
                                    detail={"cancelled": True})
                    conn.execute(update(Job).where(Job.id == row.id, Job.state == row.state)
                                 .values(state="cancelled", lease_token=None, stop_request=None,
                                         heartbeat_at=None, finished_at=db_now()))
                    self._event(conn, row.id, "cancel", detail={"from": row.state})
                    report.cancelled.append(name)
            return report

        return self._transaction(body, retry=False)

    # --- pausing ---------------------------------------------------------------------

    def queue_id(self) -> str | None:
        """The queue's identity (made with the queue; None only in a read-only database made
        before queues had one)."""
        return self._read(lambda conn: conn.execute(
            select(Meta.value).where(Meta.key == QUEUE_ID_KEY)).scalar())

    def _paused(self, conn: Connection) -> bool:
        return conn.execute(select(Meta.value).where(Meta.key == "paused")).first() is not None

    def paused(self) -> float | None:
        """When the queue was paused (database clock), or None."""
        value = self._read(lambda conn: conn.execute(
            select(Meta.value).where(Meta.key == "paused")).scalar())
        return None if value is None else float(value)

    def pause(self, now: bool = False) -> list[str]:
        """Claim nothing new; with `now`, ask every running job's worker to hand it back.

        Returns the running jobs asked to stop.
        """

        def body(conn: Connection, retrying: bool) -> list[str]:
            if not self._paused(conn):
                stamp = conn.execute(select(db_now())).scalar_one()
                conn.execute(insert(Meta).values(key="paused", value=repr(stamp)))
            if not now:
                return []
            rows = conn.execute(select(Job.id, Job.name, Job.worker).where(
                Job.state == "running", Job.stop_request.is_(None))).all()
            for row in rows:
                conn.execute(update(Job).where(Job.id == row.id, Job.state == "running")
                             .values(stop_request="pause"))
                self._event(conn, row.id, "pause", detail={"asked": row.worker})
            return [r.name for r in rows]

        return self._transaction(body, retry=False)

    def resume(self) -> bool:
        """Claims go on; stops asked by pause --now and not yet acted on are withdrawn.
        False when the queue was not paused."""

        def body(conn: Connection, retrying: bool) -> bool:
            was = conn.execute(delete(Meta).where(Meta.key == "paused")).rowcount > 0
            conn.execute(update(Job).where(Job.state == "running", Job.stop_request == "pause")
                         .values(stop_request=None))
            return was

        return self._transaction(body, retry=False)

    def counts(self) -> dict[str, int]:
        got = dict(self._read(lambda conn: conn.execute(
            select(Job.state, func.count()).group_by(Job.state)).all()))
        return {state: got.get(state, 0) for state in STATES}

    def jobs(self, config: bool = True, columns: Sequence[str] | None = None,
             states: Sequence[str] = (), offset: int = 0, limit: int | None = None,
             claimed: bool = False) -> list[dict]:
        """Jobs as dicts (config parsed), in the guide's order, with the DB's `now`: every
        job, or a page (`offset`, `limit`) of those in `states`; `claimed`: only those ever
        claimed or no longer pending (the others: `unclaimed_pending`).

        config=False leaves out `config` and `traceback`; `columns` reads only those (`id`
        always). Status reads a few columns of the claimed jobs, sums the others, and reads
        whole only the jobs it lists: at 100,000 jobs, reading every column of every job
        was most of its time."""
        if columns is None:
            chosen = [c for c in Job.__table__.columns
                      if config or c.name not in ("config", "traceback")]
        else:
            chosen = [Job.__table__.c[name] for name in dict.fromkeys(("id", *columns))]
        keys = [c.name for c in chosen]
        query = select(*chosen).order_by(Job.position, Job.id).offset(offset or None).limit(limit)
        if states:
            query = query.where(Job.state.in_(states))
        if claimed:
            query = query.where(~_never_claimed())

        def body(conn: Connection):
            return conn.execute(select(db_now())).scalar_one(), conn.execute(query).all()

        now, rows = self._read(body)
        out = []
        for row in rows:
            job = dict(zip(keys, row, strict=True))
            if "config" in job:
                job["config"] = json.loads(job["config"])
            if "heartbeat_at" in job:
                job["heartbeat_age"] = (now - job["heartbeat_at"]) if job["heartbeat_at"] else None
            if "claimed_at" in job:
                job["claimed_age"] = (now - job["claimed_at"]) if job["claimed_at"] else None
            out.append(job)
        return out

    def unclaimed_pending(self) -> list[dict]:
        """The pending jobs never claimed (so at step 0: a step is written only under a
        claim), counted by (v, model, total_steps, cost): `jobs` says how many."""
        query = (select(Job.v, Job.model, Job.total_steps, Job.cost, func.count().label("jobs"))
                 .where(_never_claimed()).group_by(Job.v, Job.model, Job.total_steps, Job.cost))
        return self._read(lambda conn: [dict(r) for r in conn.execute(query).mappings()])

    def attempt_starts(self) -> dict[int, int]:
        """The step each job's latest attempt started from: its last `claim` event's step
        (jobs claimed at least once), in one query."""
        last_claims = (select(func.max(Event.id)).where(Event.kind == "claim")
                       .group_by(Event.job_id))
        rows = self._read(lambda conn: conn.execute(
            select(Event.job_id, Event.detail).where(Event.id.in_(last_claims))).all())
        starts = {}
        for job_id, detail in rows:
            step = json.loads(detail or "{}").get("step")
            if step is not None:
                starts[job_id] = step
        return starts

    def claims_by_worker(self) -> dict[str, int]:
        """How many claims each worker ever made (the claim events, counted in SQL)."""
        query = (select(Event.worker, func.count()).where(Event.kind == "claim")
                 .group_by(Event.worker))
        return dict(self._read(lambda conn: conn.execute(query).all()))

    def events(self, job_id: int | None = None) -> list[dict]:
        query = select(*Event.__table__.columns).order_by(Event.id)
        if job_id is not None:
            query = query.where(Event.job_id == job_id)
        return self._read(lambda conn: [dict(r) for r in conn.execute(query).mappings()])
