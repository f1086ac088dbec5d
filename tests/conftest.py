"""Shared fixtures: a fresh queue database per test, on every backend.

SQLite is a file in the test's folder. PostgreSQL is a real server: the one
named by $RUNNER_TEST_PG_URL (CI starts it), else a throwaway cluster started
here; each test gets its own new database on it. Where no server can be had,
PostgreSQL tests are skipped with the reason, except under CI=true, where
they fail.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from db import JobQueue, connect
from tests import pgserver

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def pg_server_url():
    url = os.environ.get("RUNNER_TEST_PG_URL")
    if url:
        yield url
        return
    # Not under pytest's own temp root: that is private to this user, and the
    # server may run as another (postgres, when tests run as root).
    folder = Path(tempfile.mkdtemp(prefix="runner-pg-"))
    try:
        url = pgserver.start(folder)
    except Exception as e:
        reason = f"no PostgreSQL server could be started: {e}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    yield url
    pgserver.stop(folder)
    shutil.rmtree(folder, ignore_errors=True)


def new_pg_database(server_url: str) -> str:
    """A new, empty database on the server; its URL."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path) -> str:
    """A fresh, empty queue database URL for each test."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.sqlite'}"
    return new_pg_database(request.getfixturevalue("pg_server_url"))


@pytest.fixture
def queue(db_url) -> JobQueue:
    q = JobQueue(connect(db_url, create=True))
    yield q
    q.engine.dispose()


def runner_env(db_url: str) -> dict:
    return {**os.environ, "RUNNER_DB": db_url, "PYTHONUNBUFFERED": "1"}
