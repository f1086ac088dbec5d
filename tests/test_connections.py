"""Connection discipline on PostgreSQL, where connections are scarce (max_connections is 100
by default): a worker holds at most one connection at a time, none while it waits with
nothing to do, and rides out a server that refuses connections. The real worker loop,
in-process, with a stand-in job, on the tests' PostgreSQL server."""

from __future__ import annotations

import random
import subprocess
import threading
import time

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from db import JobQueue, connect
from db.engine import POOL_WAIT_SECONDS
from runner.worker import IdleWait, Worker
from tests.support.commands import PYTHON, ROOT, cli, runner_env
from tests.support.queues import new_pg_database
from tests.support.standin import StandIn, row


def server_connections(admin, database: str) -> int:
    with admin.connect() as conn:
        return conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = :d "
            "AND pid <> pg_backend_pid()"), {"d": database}).scalar_one()


class WatchedStop(threading.Event):
    """The worker's stop event; each wait (an idle worker resting) first records how many
    connections the database has, from the test's side."""

    def __init__(self, count):
        super().__init__()
        self.count, self.counts = count, []

    def wait(self, timeout=None):
        # A closed connection's server process exits a moment after the client lets go.
        deadline = time.monotonic() + 2
        while (n := self.count()) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.counts.append(n)
        return super().wait(timeout)


def test_a_worker_holds_one_connection_at_most_and_none_while_idle(pg_server_url, tmp_path):
    url = new_pg_database(pg_server_url)
    database = make_url(url).database
    admin = create_engine(url, poolclass=NullPool)
    queue = JobQueue(connect(url, create=True, one_connection=True))
    queue.plan([row("a", tmp_path / "a", steps=12), row("b", tmp_path / "b", steps=12)])
    peak, running = [0], threading.Event()

    def sample():
        while not running.is_set():
            peak[0] = max(peak[0], server_connections(admin, database))
            time.sleep(0.02)

    worker = Worker(queue, "cpu", 30, job=StandIn(seconds_per_step=0.1))
    worker.stopping = WatchedStop(lambda: server_connections(admin, database))
    sampler = threading.Thread(target=sample)
    sampler.start()
    loop = threading.Thread(target=lambda: worker.run(wait=True, poll=0.2))
    loop.start()
    deadline = time.monotonic() + 60
    while len(worker.stopping.counts) < 3:   # both jobs done, then three idle rests
        assert time.monotonic() < deadline, "the worker never went idle"
        time.sleep(0.05)
    running.set()
    sampler.join()
    worker.stopping.set()
    loop.join(30)
    assert worker.outcomes == ["completed", "completed"]
    assert peak[0] == 1          # heartbeat, progress and the main loop share one connection
    pool = queue.engine.pool   # and could never open a second one
    assert (pool.size(), pool._max_overflow, pool.timeout()) == (1, 0, POOL_WAIT_SECONDS)
    assert worker.stopping.counts[:3] == [0, 0, 0]   # resting holds none
    queue.engine.dispose()
    admin.dispose()


def test_idle_waits_grow_to_half_the_lease_with_jitter_and_start_over_after_work():
    random.seed(7)
    idle = IdleWait(poll=2.0, lease=20.0)
    waits = [idle.next() for _ in range(6)]
    for wait, nominal in zip(waits, [2, 4, 8, 10, 10, 10], strict=True):
        assert nominal / 2 <= wait <= nominal
    assert len({round(w, 6) for w in waits[3:]}) == 3   # drawn, not in step
    idle.reset()
    assert 1.0 <= idle.next() <= 2.0
    assert IdleWait(poll=5.0, lease=4.0).most == 5.0      # never shorter than the poll
    assert IdleWait(poll=5.0, lease=600.0).most == 60.0   # a minute at most


def test_a_worker_refused_a_connection_waits_and_finishes_the_job(pg_server_url, tmp_path):
    """The server answers 'too many connections' (SQLSTATE 53300; here a role limited to one
    connection, held by the test) when the worker starts: it says so once, keeps trying
    within its outage budget, and runs the job once the slot is free; exit 0, the job run
    once."""
    url = new_pg_database(pg_server_url)
    planned = cli(url, "plan", "--profile", "smoke", "--only", "V=5", "--only", "N=256",
                  "--only", "model=gpt2", "--only", "run=1", "--out-root", str(tmp_path))
    assert planned.returncode == 0, planned.stderr
    role = f"limited_{make_url(url).database}"
    admin = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 1'))
        conn.execute(text(f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"'))
        conn.execute(text(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}"'))
    limited = make_url(url).set(username=role).render_as_string(hide_password=False)
    holder = create_engine(limited, poolclass=NullPool).connect()   # the one slot
    proc = subprocess.Popen([PYTHON, "-m", "runner", "--db", limited, "worker", "--gpu", "cpu",
                             "--threads", "1", "--db-outage", "120"], cwd=ROOT,
                            env=runner_env(limited), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4)
        assert proc.poll() is None   # waiting, not crashed
    finally:
        holder.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    refused = [line for line in err.splitlines() if "too many connections" in line]
    assert len(refused) == 1 and "retrying for up to 2m00s" in refused[0], err[-3000:]
    assert "database back after" in err
    queue = JobQueue(connect(url))
    (job,) = queue.jobs()
    assert (job["state"], job["attempts"]) == ("succeeded", 1)
    queue.engine.dispose()
    admin.dispose()


@pytest.fixture(autouse=True)
def _quiet_workers(caplog):
    caplog.set_level("WARNING")
