"""Commands that only look (status, results, plot, logs) never write and never wait on writers."""

from __future__ import annotations

import hashlib
import sqlite3
import time

import pytest
from sqlalchemy import create_engine, inspect

from tests.conftest import cli, new_pg_database, refused_line

LOOKING = [["status"], ["status", "--json"], ["results"], ["results", "--csv"],
           ["plot", "--out", "{tmp}/figure.png"], ["logs", "run1"]]


def folder_digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def unrelated_database(path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    conn.execute("INSERT INTO notes (body) VALUES ('keep me')")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("make", [unrelated_database, lambda p: p.write_bytes(b"")],
                         ids=["another program's SQLite file", "an empty file"])
@pytest.mark.parametrize("args", LOOKING, ids=" ".join)
def test_looking_at_a_file_that_is_no_queue_changes_nothing(tmp_path, make, args):
    db = tmp_path / "data.sqlite"
    make(db)
    before = folder_digest(tmp_path)
    line = refused_line(cli(f"sqlite:///{db}", *[a.format(tmp=tmp_path) for a in args]))
    assert "is not a queue database" in line
    assert folder_digest(tmp_path) == before  # byte-identical, and no new file beside it


def test_looking_at_an_empty_postgresql_database_creates_no_table(pg_server_url):
    db_url = new_pg_database(pg_server_url)
    assert "is not a queue database" in refused_line(cli(db_url, "status"))
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert inspect(conn).get_table_names() == []
    engine.dispose()


def test_status_answers_at_once_while_another_process_writes(tmp_path):
    """SQLite's write lock (PostgreSQL readers never wait on writers)."""
    path = tmp_path / "queue.sqlite"
    planned = f"sqlite:///{path}"
    assert cli(planned, "plan", "--profile", "smoke", "--only", "V=5", "--out-root",
               str(tmp_path / "runs")).returncode == 0
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a worker's claim or heartbeat, held open
    writer.execute("UPDATE jobs SET loss = 1.0 WHERE id = 1")
    try:
        started = time.monotonic()
        proc = cli(planned, "status")
        elapsed = time.monotonic() - started
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert proc.returncode == 0, proc.stderr
    assert "pending 30" in proc.stdout
    assert elapsed < 15  # it used to wait the writers' 60 s busy timeout
