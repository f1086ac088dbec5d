"""Tables: `jobs` (one row per run; plain-sqlite3 friendly), `workers` (one row per worker
process), `events` (append-only audit) and `launches` (worker batches handed to a scheduler)."""

from __future__ import annotations

from sqlalchemy import Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 4
STATES = ("pending", "running", "succeeded", "failed", "cancelled")
# Asked of a running job's worker, seen at its next write. A cancel that came too late (the
# job succeeded or failed first) stays on the ended row, for status to report.
STOP_REQUESTS = ("cancel", "pause")


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Key/value facts about the database itself, e.g. schema_version."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    # Sweep coordinates.
    v: Mapped[int] = mapped_column(Integer)
    n: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(64))
    run: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)      # the guide's order
    cost: Mapped[float] = mapped_column(Float)          # relative compute estimate
    config: Mapped[str] = mapped_column(Text)           # resolved config, JSON
    out_dir: Mapped[str] = mapped_column(Text)          # absolute
    profile: Mapped[str | None] = mapped_column(String(64))  # as planned, with --set overrides:
    overrides: Mapped[str | None] = mapped_column(Text)      # JSON list of "key=value"
    # Progress and ownership. `attempts` counts against max_attempts (a graceful
    # hand-back gives its attempt back); `claims` counts every claim ever.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claims: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_seconds: Mapped[float | None] = mapped_column(Float)
    stop_request: Mapped[str | None] = mapped_column(String(16))   # see STOP_REQUESTS
    peak_memory: Mapped[float | None] = mapped_column(Float)       # GPU bytes, newest attempt
    # Times are seconds since the epoch on the database's clock.
    created_at: Mapped[float | None] = mapped_column(Float)
    claimed_at: Mapped[float | None] = mapped_column(Float)
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    progress_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    # Outcome.
    test_accuracy: Mapped[float | None] = mapped_column(Float)
    balanced_accuracy: Mapped[float | None] = mapped_column(Float)
    majority_rate: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_jobs_state_position", "state", "position"),)


class Worker(Base):
    """A worker process: who it is, where, and when it was last seen (database clock)."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)   # host:gpu:pid
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    # The process's identity beyond its pid (boot id and start time), so a pid
    # reused after a restart or reboot is not taken for the worker.
    process: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str] = mapped_column(String(64))
    lease_seconds: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16))      # idle busy exited
    job: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[float] = mapped_column(Float)
    seen_at: Mapped[float] = mapped_column(Float)
    # Under SLURM: the task's own job id, its array coordinates ("ARRAYJOB_TASK"), how often
    # SLURM restarted it, and the GPUs SLURM allocated to it (as SLURM numbers them).
    slurm_job_id: Mapped[str | None] = mapped_column(String(32))
    slurm_array: Mapped[str | None] = mapped_column(String(64))
    slurm_restarts: Mapped[int | None] = mapped_column(Integer)
    gpus: Mapped[str | None] = mapped_column(String(64))


class Event(Base):
    """What happened to a job, by whom, under which lease; never updated."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(16))   # plan claim heartbeat release finish fail
    worker: Mapped[str | None] = mapped_column(String(200))   # expire requeue
    token: Mapped[str | None] = mapped_column(String(64))
    attempt: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)

    # Each job's last claim (status's ETA) and the claims per worker (the report), read
    # without scanning the heartbeats: a sweep writes one a beat, millions of rows (status
    # at 100,000 jobs and 2.1 million events: 3.6 s for the last claims, 2 ms with it).
    __table_args__ = (Index("ix_events_kind_job", "kind", "job_id", "id"),)


class Launch(Base):
    """Workers submitted to a scheduler in one go (a SLURM job array): what, when, where."""

    __tablename__ = "launches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float)
    scheduler: Mapped[str] = mapped_column(String(16))       # slurm
    job_id: Mapped[str] = mapped_column(String(32), index=True)  # the scheduler's id
    tasks: Mapped[int] = mapped_column(Integer)
    script: Mapped[str | None] = mapped_column(Text)         # path of the submitted script
    detail: Mapped[str | None] = mapped_column(Text)         # JSON: partition, time limit, ...
    # Set by `slurm cancel`: the launch's workers stop for good (no self-requeue).
    cancelled_at: Mapped[float | None] = mapped_column(Float)
