"""A benchmark's queue: refusing one that holds real work, and emptying a throwaway one."""

from __future__ import annotations

import sys
from pathlib import Path

from sqlalchemy import create_engine, delete, func, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from db.engine import connect, mask_url, normalize_url
from db.models import Base, Event, Job


def at_risk(url: str) -> str | None:
    """What the database at `url` holds that the benchmark would delete or mix its fake jobs
    with, in words; None for a throwaway one (empty, or a queue without jobs or events).

    Only reads: a SQLite file that does not exist is not made, nothing is created."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").exists():
        return None
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            rows = {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
                    for t in Base.metadata.sorted_tables if t.name in tables and t.name != "meta"}
    finally:
        engine.dispose()
    other = sorted(tables - set(Base.metadata.tables))
    if other:
        return "another program's tables (" + ", ".join(other[:4]) + ")"
    held = [f"{n} {name}" for name, n in rows.items() if n]
    return ", ".join(held) or None


def clear(url: str) -> None:
    """Delete every job and event (and create the queue's tables where missing)."""
    engine = connect(url, create=True)
    with engine.begin() as conn:
        conn.execute(delete(Event))
        conn.execute(delete(Job))
    engine.dispose()


def refuse_unless_throwaway(db: str | None, forced: bool) -> None:
    """Exit 2 with one line when --db holds real work and --i-know-this-deletes was not given."""
    held = at_risk(db) if db and not forced else None
    if held:
        print(f"error: --db '{mask_url(db)}' holds {held}: the benchmark deletes every job and "
              "event there; give it a throwaway database (or no --db: SQLite files in a temp "
              "folder), or pass --i-know-this-deletes", file=sys.stderr)
        sys.exit(2)


def fresh_queue(db: str | None, folder: Path, label: str) -> str:
    """The URL of an empty queue: a new SQLite file `label` in `folder`, or `db` with every
    job and event deleted."""
    if db is None:
        url = f"sqlite:///{folder / f'{label}.sqlite'}"
        connect(url, create=True).dispose()
        return url
    clear(db)
    return db
