"""Engine set-up: first-run races, schema versions, SQLite settings, unsafe places."""

from __future__ import annotations

import re
import subprocess

import pytest
from sqlalchemy import create_engine, exc, inspect, text, update

from db import DatabaseError, JobQueue, connect, mask_url
from db import engine as engine_module
from db.models import Meta
from tests.support.commands import PYTHON, ROOT
from tests.support.queues import new_pg_database, rows


def test_many_processes_creating_the_schema_at_once(db_url):
    code = ("import sys; from db import connect, JobQueue; "
            "print(JobQueue(connect(sys.argv[1], create=True)).counts()['pending'])")
    procs = [subprocess.Popen([PYTHON, "-c", code, db_url], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.strip() == "0"


def test_a_newer_schema_is_refused(queue, db_url):
    with queue.engine.begin() as conn:
        conn.execute(update(Meta).where(Meta.key == "schema_version").values(value="99"))
    with pytest.raises(DatabaseError, match="schema version 99 is newer"):
        connect(db_url)


def make_version_1(queue) -> None:
    """Turn a fresh queue into one as version 1 of the schema left it, with one job."""
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    with queue.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET attempts = 2"))
        for column in ("profile", "overrides", "claims", "stop_request", "peak_memory"):
            conn.execute(text(f"ALTER TABLE jobs DROP COLUMN {column}"))
        conn.execute(text("DROP TABLE workers"))
        conn.execute(update(Meta).where(Meta.key == "schema_version").values(value="1"))


def test_a_version_1_queue_is_migrated_in_place_keeping_its_rows(queue, db_url):
    make_version_1(queue)
    engine = connect(db_url)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT name, attempts, claims, profile FROM jobs")).one()
        assert tuple(row) == ("table_connectivity_standard_V5_N256_run1", 2, 2, None)
        assert conn.execute(text("SELECT count(*) FROM workers")).scalar() == 0
        version = conn.execute(text("SELECT value FROM meta WHERE key='schema_version'"))
        assert version.scalar() == "4"
    assert JobQueue(engine).claim("w", 60).attempt == 3  # claims go on counting
    engine.dispose()


def test_a_version_2_queue_gains_the_slurm_columns_keeping_its_workers(queue, db_url):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    queue.register_worker("h:0:1", "h", 1, None, "cpu", 60)
    with queue.engine.begin() as conn:
        for column in ("slurm_job_id", "slurm_array", "slurm_restarts", "gpus"):
            conn.execute(text(f"ALTER TABLE workers DROP COLUMN {column}"))
        conn.execute(text("DROP TABLE launches"))
        conn.execute(update(Meta).where(Meta.key == "schema_version").values(value="2"))
    engine = connect(db_url)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT name, device, slurm_job_id, gpus FROM workers")).one()
        assert tuple(row) == ("h:0:1", "cpu", None, None)
        assert conn.execute(text("SELECT count(*) FROM launches")).scalar() == 0
        assert conn.execute(text("SELECT value FROM meta WHERE key='schema_version'")
                            ).scalar() == "4"
    engine.dispose()


def test_a_version_3_queue_gains_the_events_index_keeping_its_events(queue, db_url):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    queue.claim("h:0:1", 60)
    with queue.engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_events_kind_job"))
        conn.execute(update(Meta).where(Meta.key == "schema_version").values(value="3"))
    assert "ix_events_kind_job" not in index_names(queue.engine, "events")
    engine = connect(db_url)
    assert index_names(engine, "events")["ix_events_kind_job"] == ["kind", "job_id", "id"]
    assert JobQueue(engine).claims_by_worker() == {"h:0:1": 1}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM meta WHERE key='schema_version'")
                            ).scalar() == "4"
    engine.dispose()


def index_names(engine, table: str) -> dict[str, list[str]]:
    return {ix["name"]: ix["column_names"] for ix in inspect(engine).get_indexes(table)}


def test_a_read_only_open_neither_creates_nor_migrates(queue, db_url):
    make_version_1(queue)
    with pytest.raises(DatabaseError, match="version 1 is older"):
        connect(db_url, readonly=True)
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM meta WHERE key='schema_version'")
                            ).scalar() == "1"
    engine.dispose()


def test_a_read_only_open_refuses_writes(queue, db_url):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    reader = JobQueue(connect(db_url, readonly=True))
    assert reader.counts()["pending"] == 1
    with pytest.raises(DatabaseError, match="read-only|readonly"):
        reader.plan(rows("V=5", "N=512", "model=gpt2", "run=1"))
    reader.engine.dispose()


def test_sqlite_is_configured_for_many_processes(tmp_path):
    engine = connect(f"sqlite:///{tmp_path / 'q.sqlite'}", create=True)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 60_000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    assert JobQueue(engine).counts()["pending"] == 0


def test_sqlite_on_a_network_filesystem_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "filesystem_type", lambda path: "nfs4")
    with pytest.raises(DatabaseError, match="network filesystem"):
        connect(f"sqlite:///{tmp_path / 'q.sqlite'}", create=True)
    assert not (tmp_path / "q.sqlite").exists()


def test_filesystem_type_of_a_local_folder(tmp_path):
    assert engine_module.filesystem_type(tmp_path) not in engine_module.NETWORK_FILESYSTEMS


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://alice:hunter2@db.example/queue",
     "postgresql+psycopg://alice:***@db.example/queue"),
    ("sqlite:///runs/queue.sqlite", "sqlite:///runs/queue.sqlite"),
])
def test_passwords_are_masked(url, shown):
    assert mask_url(url) == shown


def test_a_readonly_postgresql_engine_refuses_writes_in_every_transaction(pg_server_url):
    """Read-only is asked per transaction (BEGIN READ ONLY), not as a startup option, so it
    holds through a transaction-mode pooler too; the connection prepares no statements."""
    url = new_pg_database(pg_server_url)
    connect(url, create=True).dispose()
    engine = connect(url, readonly=True)
    try:
        for _ in range(7):   # past psycopg's default prepare threshold (5)
            with engine.connect() as conn:
                assert conn.execute(text("SHOW transaction_read_only")).scalar_one() == "on"
                conn.execute(text("SELECT count(*) FROM jobs")).scalar_one()
                conn.rollback()
        with engine.connect() as conn:
            with pytest.raises(exc.DBAPIError, match="read-only transaction"):
                conn.execute(text("DELETE FROM jobs"))
            assert conn.connection.dbapi_connection.prepare_threshold is None
    finally:
        engine.dispose()


def test_a_queue_has_an_identity_of_its_own_kept_across_connections(db_url):
    first = JobQueue(connect(db_url, create=True))
    ident = first.queue_id()
    assert re.fullmatch(r"[0-9a-f]{32}", ident)
    again = JobQueue(connect(db_url))
    assert again.queue_id() == ident
    first.engine.dispose()
    again.engine.dispose()


def test_a_queue_made_before_identities_gets_one_when_next_opened(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    engine = connect(url, create=True)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM meta WHERE key = 'queue_id'"))
    engine.dispose()
    assert JobQueue(connect(url, readonly=True)).queue_id() is None
    ident = JobQueue(connect(url)).queue_id()
    assert re.fullmatch(r"[0-9a-f]{32}", ident)
    assert JobQueue(connect(url, readonly=True)).queue_id() == ident
    other = f"sqlite:///{tmp_path / 'other.sqlite'}"
    assert JobQueue(connect(other, create=True)).queue_id() != ident
