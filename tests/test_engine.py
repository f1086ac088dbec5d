"""Engine set-up: first-run races, schema versions, SQLite settings, unsafe places."""

from __future__ import annotations

import subprocess

import pytest
from sqlalchemy import text, update

from db import DatabaseError, JobQueue, connect, mask_url
from db import engine as engine_module
from db.models import Meta
from tests.conftest import PYTHON, ROOT


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


def test_an_older_schema_is_migrated_in_place(queue, db_url, monkeypatch):
    monkeypatch.setattr(engine_module, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(engine_module.MIGRATIONS, 1, ["ALTER TABLE jobs ADD COLUMN note TEXT"])
    engine = connect(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(note) FROM jobs")).scalar() == 0
        version = conn.execute(text("SELECT value FROM meta WHERE key='schema_version'"))
        assert version.scalar() == "2"
    engine.dispose()


def test_sqlite_is_configured_for_many_processes(tmp_path):
    engine = connect(f"sqlite:///{tmp_path / 'q.sqlite'}", create=True)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 60_000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    assert JobQueue(engine).counts()["pending"] == 0


def test_sqlite_on_a_network_filesystem_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "_filesystem_type", lambda path: "nfs4")
    with pytest.raises(DatabaseError, match="network filesystem"):
        connect(f"sqlite:///{tmp_path / 'q.sqlite'}", create=True)
    assert not (tmp_path / "q.sqlite").exists()


def test_filesystem_type_of_a_local_folder(tmp_path):
    assert engine_module._filesystem_type(tmp_path) not in engine_module.NETWORK_FILESYSTEMS


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://alice:hunter2@db.example/queue",
     "postgresql+psycopg://alice:***@db.example/queue"),
    ("sqlite:///runs/queue.sqlite", "sqlite:///runs/queue.sqlite"),
])
def test_passwords_are_masked(url, shown):
    assert mask_url(url) == shown
