"""Queue databases for the tests: the backends, a new PostgreSQL database, planned rows, and
digests that prove nothing was written."""

from __future__ import annotations

import hashlib
import sqlite3
import uuid
from pathlib import Path

from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from db.models import Base
from runner.planner import job_rows, load_sweep, parse_only
from tests.support.commands import ROOT

BACKENDS = ["sqlite", "postgresql"]
SWEEP = ROOT / "conf" / "sweep.yaml"
GOOD_SWEEP = SWEEP.read_text()
# What a finished job reports, for jobs finished by hand.
METRICS = {"accuracy": 0.75, "balanced_accuracy": 0.6, "majority_rate": 0.7}


def new_pg_database(server_url: str) -> str:
    """A new, empty database on the server; its URL."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def rows(*only, overrides=(), out_root="runs"):
    """The smoke sweep's job rows (`only`: "V=5" ...), as `plan` writes them."""
    sweep = load_sweep(SWEEP)
    return job_rows(sweep, "smoke", parse_only(only, sweep), list(overrides), out_root)


def last_planned_first(planned: list[dict]) -> list[dict]:
    """The rows with positions that put the guide's order against the order planned (and
    so against the ids): ids and positions must not be confused."""
    for row, position in zip(planned, range(10 * len(planned), 0, -10), strict=True):
        row["position"] = position
    return planned


def digest(url: str) -> str:
    """Every row of every table, to prove nothing was written."""
    engine = create_engine(url)
    with engine.connect() as conn:
        dump = [list(map(tuple, conn.execute(select(table).order_by(*table.primary_key))))
                for table in Base.metadata.sorted_tables]
    engine.dispose()
    return hashlib.sha256(repr(dump).encode()).hexdigest()


def folder_digest(folder: Path) -> dict:
    """Each file directly in `folder`: its sha256, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def unrelated_database(path: Path) -> None:
    """Another program's SQLite file: one `notes` table, one row."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    conn.execute("INSERT INTO notes (body) VALUES ('keep me')")
    conn.commit()
    conn.close()


def mark_as_queue_first(folder: Path, url: str) -> None:
    """Mark `folder` as the queue's own, as the first claim of its job would: a test that puts
    job files there before any claim (a folder holding job files and no marker is another
    run's) marks it first."""
    from db import JobQueue, connect
    from runner.jobfolders import open_folder
    from runner.ownership import marker

    queue = JobQueue(connect(url))
    open_folder(str(folder)).write_marker(marker(queue.queue_id(), folder.name))
    queue.engine.dispose()


def doom(folder: Path, url: str) -> None:
    """Make the job of `folder` fail at its first step: its metrics log cannot be written (a
    folder stands in its place)."""
    from trainer.files import METRICS_FILE

    mark_as_queue_first(folder, url)
    (folder / METRICS_FILE).mkdir(parents=True)
