"""Database outages: a restarted, unreachable, locked or full queue database kills no worker
and loses nothing.

Real servers, real worker processes, real outages: a PostgreSQL cluster of the test's own,
stopped (fast and immediate/crash shutdown) and started again; the network path to it cut
by a TCP proxy the test controls; a SQLite file held under a write lock past the workers'
busy timeout; a SQLite database on a small tmpfs that fills up. Every case ends with every
job succeeded once, by the lease of its last claim, bit-identical to a fault-free run.
The retry's parts are pinned too: which errors are transient, backoff and the outage
budget, and writes whose COMMIT answer was lost (they recognise their own success).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, exc
from sqlalchemy.engine import make_url

from db import DatabaseError, JobQueue, LeaseLost, connect
from db.outage import OutageExceeded, OutageNotice, Outages, is_transient
from runner.liveness import HOST
from testing import pgserver
from testing.audit import finishes_per_job, lease_violations
from testing.tcpproxy import Proxy
from tests.support.commands import PYTHON, ROOT, plan, runner_env
from tests.support.queues import METRICS, digest, new_pg_database, rows
from tests.support.skips import skip_or_fail
from tests.support.training import assert_bit_identical, train_1thread
from tests.support.waiting import wait_for

STEPS = 1800           # a job trains for ~15 s on one thread: outages land mid-training
TWO_JOBS = ["--only", "V=5", "--only", "N=256", "--only", "model=gpt2", "--only", "run=1",
            "--only", "run=2", "--set", f"training.train_steps={STEPS}",
            "--set", "training.save_every_steps=50"]
ONE_JOB = TWO_JOBS[:8] + TWO_JOBS[10:]
WAIT = 300             # seconds to wait for jobs to reach a point: past an outage


@pytest.fixture
def pg_cluster():
    """A PostgreSQL cluster of this test's own, to stop and start: (folder, server URL)."""
    folder = Path(tempfile.mkdtemp(prefix="runner-pg-outage-"))
    try:
        server = pgserver.start(folder)
    except Exception as e:
        shutil.rmtree(folder, ignore_errors=True)
        skip_or_fail(f"no PostgreSQL server could be started: {e}")
    yield folder, server
    pgserver.stop(folder)
    shutil.rmtree(folder, ignore_errors=True)


# --- which errors are transient ------------------------------------------------------------


def pg_error(sqlstate: str, message: str = "boom") -> exc.DBAPIError:
    return exc.OperationalError("UPDATE jobs ...", {}, psycopg.errors.lookup(sqlstate)(message))


def sqlite_error(code: int, message: str) -> exc.DBAPIError:
    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code
    return exc.OperationalError("UPDATE jobs ...", {}, error)


@pytest.mark.parametrize("error, transient", [
    (pg_error("57P01", "terminating connection due to administrator command"), True),
    (pg_error("57P02"), True),                         # crash_shutdown
    (pg_error("57P03", "the database system is starting up"), True),
    (pg_error("08006"), True),                         # connection_failure
    (pg_error("08001"), True),
    (pg_error("40001"), True),                         # serialization_failure
    (pg_error("40P01"), True),                         # deadlock_detected
    (pg_error("53300", "sorry, too many clients already"), True),
    (pg_error("28P01", "password authentication failed"), False),
    (pg_error("28000"), False),
    (pg_error("3D000", 'database "sweep" does not exist'), False),
    (pg_error("42P01", 'relation "jobs" does not exist'), False),
    (pg_error("23505"), False),                        # unique_violation: a bug, not an outage
    (exc.OperationalError("", {}, psycopg.OperationalError(
        'connection failed: connection to server at "10.0.0.5", port 5432 failed: '
        "Connection refused")), True),
    (exc.OperationalError("", {}, psycopg.OperationalError(
        "consuming input failed: server closed the connection unexpectedly")), True),
    (exc.OperationalError("", {}, psycopg.OperationalError(
        'connection failed: FATAL:  password authentication failed for user "runner"')), False),
    (exc.OperationalError("", {}, psycopg.OperationalError(
        'connection failed: FATAL:  database "nosuch" does not exist')), False),
    (sqlite_error(5, "database is locked"), True),     # SQLITE_BUSY past the busy timeout
    (sqlite_error(10, "disk I/O error"), True),        # SQLITE_IOERR
    (sqlite_error(778, "disk I/O error"), True),       # SQLITE_IOERR_WRITE
    (sqlite_error(13, "database or disk is full"), True),
    (sqlite_error(11, "database disk image is malformed"), False),   # SQLITE_CORRUPT
    (sqlite_error(26, "file is not a database"), False),             # SQLITE_NOTADB
    (sqlite_error(8, "attempt to write a readonly database"), False),
    (exc.OperationalError("", {}, sqlite3.OperationalError("database is locked")), True),
    (ValueError("not a database error"), False),
], ids=lambda v: v if isinstance(v, bool) else str(getattr(v, "orig", v))[:40])
def test_transient_and_permanent_errors(error, transient):
    assert is_transient(error) is transient


def test_a_broken_connection_is_transient_whatever_it_says():
    error = exc.OperationalError("", {}, psycopg.OperationalError("anything at all"),
                                 connection_invalidated=True)
    assert is_transient(error)


def test_real_errors_are_classified(tmp_path, pg_server_url):
    """As the drivers raise them: a lock held past the busy timeout, a refused connection,
    a database or role the server does not have."""
    path = tmp_path / "q.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlite3.OperationalError) as locked:
        sqlite3.connect(path, timeout=0.1).execute("CREATE TABLE t (x)")
    holder.execute("ROLLBACK")
    assert is_transient(locked.value)

    def connect_error(url: str) -> BaseException:
        engine = create_engine(url)
        with pytest.raises(exc.DBAPIError) as caught, engine.connect():
            pass
        engine.dispose()
        return caught.value

    server = make_url(pg_server_url)
    assert is_transient(connect_error(server.set(port=1).render_as_string(False)))
    assert not is_transient(connect_error(server.set(database="no_such_db")
                                          .render_as_string(False)))
    assert not is_transient(connect_error(server.set(username="no_such_role")
                                          .render_as_string(False)))


# --- backoff, budget, one report per outage -------------------------------------------------


TRANSIENT = sqlite_error(5, "database is locked")
PERMANENT = sqlite_error(11, "database disk image is malformed")


def test_backoff_doubles_to_a_ceiling_with_jitter():
    outages = Outages(60, first_delay=0.2, max_delay=5.0)
    delays = [[outages.delay(t) for _ in range(50)] for t in range(12)]
    for tries, drawn in enumerate(delays):
        ceiling = min(5.0, 0.2 * 2 ** tries)
        assert all(ceiling / 2 <= d <= ceiling for d in drawn)
        assert len(set(drawn)) > 40     # jittered, not in lockstep
    assert max(delays[-1]) <= 5.0 and min(delays[-1]) >= 2.5


def test_an_outage_is_reported_once_by_all_threads_and_retried_until_it_ends():
    notices: list[OutageNotice] = []
    outages = Outages(30, notices.append, first_delay=0.01, max_delay=0.05)
    up = threading.Event()
    tries = []

    def attempt(retrying: bool) -> str:
        tries.append(retrying)
        if not up.is_set():
            raise TRANSIENT
        return "done"

    results = []
    threads = [threading.Thread(target=lambda: results.append(outages.run(attempt, str)))
               for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert outages.down_for is not None and outages.down_for >= 0.4
    up.set()
    for t in threads:
        t.join(10)
    assert results == ["done"] * 3
    assert [n.kind for n in notices] == ["started", "ended"]
    assert 0.4 <= notices[1].seconds < 5 and "database is locked" in notices[0].reason
    assert outages.down_for is None
    assert len(tries) > 10 and tries[0] is False and any(tries)


def test_the_budget_ends_the_retries_with_one_line():
    outages = Outages(0.3, first_delay=0.01, max_delay=0.05)

    def attempt(retrying):
        raise TRANSIENT

    started = time.monotonic()
    with pytest.raises(OutageExceeded) as caught:
        outages.run(attempt, lambda e: "database 'q.sqlite': database is locked")
    assert 0.3 <= time.monotonic() - started < 3
    assert re.fullmatch(r"database unreachable for 0 s \(budget 0\.3 s\): database "
                        r"'q\.sqlite': database is locked", str(caught.value))


def test_permanent_errors_and_no_budget_are_not_retried():
    calls = []

    def attempt(error):
        def fail(retrying):
            calls.append(retrying)
            raise error
        return fail

    with pytest.raises(exc.DBAPIError):
        Outages(30).run(attempt(PERMANENT), str)
    assert calls == [False]
    calls.clear()
    with pytest.raises(exc.DBAPIError):
        Outages(0).run(attempt(TRANSIENT), str)           # the user's commands: no budget
    with pytest.raises(exc.DBAPIError):
        Outages(30).run(attempt(TRANSIENT), str, retry=False)   # progress: one try
    assert calls == [False, False]


def test_a_cancelled_wait_stops_retrying():
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()

    def attempt(retrying):
        raise TRANSIENT

    started = time.monotonic()
    with pytest.raises(exc.DBAPIError):
        Outages(60, first_delay=1.0, max_delay=1.0).run(attempt, str, cancel=cancel)
    assert time.monotonic() - started < 2


# --- a write whose COMMIT answer was lost --------------------------------------------------


def lost_answer(dialect: str) -> Exception:
    """What the driver raises when the connection breaks during COMMIT."""
    if dialect == "sqlite":
        error = sqlite3.OperationalError("disk I/O error")
        error.sqlite_errorcode = 1034   # SQLITE_IOERR_FSYNC
        return error
    return psycopg.OperationalError("consuming input failed: server closed the connection "
                                    "unexpectedly")


@contextlib.contextmanager
def commits_failing(queue: JobQueue, committed: bool, times: int = 1):
    """The next `times` COMMITs raise a transient error, after committing (`committed`: the
    answer was lost) or instead of it (the transaction rolled back)."""
    dialect = queue.engine.dialect
    real = dialect.do_commit
    left = [times]

    def do_commit(dbapi_connection):
        if not left[0]:
            return real(dbapi_connection)
        left[0] -= 1
        if committed:
            real(dbapi_connection)
        else:
            dbapi_connection.rollback()
        raise lost_answer(dialect.name)

    dialect.do_commit = do_commit
    try:
        yield left
    finally:
        del dialect.do_commit


@pytest.fixture
def patient(queue) -> JobQueue:
    """The test's queue with a worker's outage budget."""
    queue.plan(rows("V=5", "N=256", "model=gpt2"))
    return JobQueue(queue.engine, outage_budget=30)


END_WRITES = {
    "finish": lambda q, c: q.finish(c, METRICS),
    "fail": lambda q, c: q.fail(c, "boom", "Traceback ..."),
    "release": lambda q, c: q.release(c, 12),
    "cancel": lambda q, c: q.cancelled(c, 12),
}
END_STATES = {"finish": "succeeded", "fail": "failed", "release": "pending",
              "cancel": "cancelled"}


@pytest.mark.parametrize("kind", END_WRITES)
def test_an_end_write_whose_commit_answer_was_lost_counts_as_done(patient, kind):
    claim = patient.claim("w", 60)
    with commits_failing(patient, committed=True) as left:
        END_WRITES[kind](patient, claim)          # no LeaseLost: it recognised its own write
    assert left == [0]
    job = next(j for j in patient.jobs() if j["id"] == claim.id)
    assert job["state"] == END_STATES[kind] and job["lease_token"] is None
    assert [e["kind"] for e in patient.events(claim.id)] == ["plan", "claim", kind]
    assert lease_violations(patient.events()) == []


def test_a_claim_whose_commit_answer_was_lost_returns_the_job_it_took(patient):
    before = patient.claim("w0", 60)              # another worker's running job
    with commits_failing(patient, committed=True) as left:
        claim = patient.claim("w", 60)
    assert left == [0] and (claim.worker, claim.lease_seconds) == ("w", 60)
    running = [j for j in patient.jobs() if j["state"] == "running"]
    assert [(j["id"], j["lease_token"], j["attempts"]) for j in running] == [
        (before.id, before.token, 1), (claim.id, claim.token, 1)]
    assert [e["token"] for e in patient.events() if e["kind"] == "claim"] == [before.token,
                                                                             claim.token]
    other = patient.claim("w2", 60)
    assert other.id not in (before.id, claim.id)  # the job is not claimed twice


def test_a_claim_rolled_back_by_the_failure_claims_afresh(patient):
    with commits_failing(patient, committed=False) as left:
        claim = patient.claim("w", 60)
    assert left == [0]
    assert [(j["state"], j["lease_token"]) for j in patient.jobs()][0] == ("running",
                                                                            claim.token)
    assert len([e for e in patient.events() if e["kind"] == "claim"]) == 1


def test_a_retried_finish_after_a_takeover_is_refused(patient):
    """The retry finds the job changed by another lease, not by its own earlier try."""
    old = patient.claim("old", 1)
    time.sleep(1.3)  # silent past its lease
    new = patient.claim("new", 60)
    assert new.id == old.id
    patient.finish(new, {"accuracy": 0.5})
    with commits_failing(patient, committed=False), pytest.raises(LeaseLost):
        patient.finish(old, METRICS)
    job = next(j for j in patient.jobs() if j["id"] == old.id)
    assert (job["state"], job["test_accuracy"]) == ("succeeded", 0.5)
    assert finishes_per_job(patient.events()) == {old.id: 1}


# The user's commands and progress write once: a transient failure is reported, never
# repeated (a command is not always safe to repeat; progress is written again at the next
# step). The set-up runs before the failing commit; the command runs under it.
ONE_TRY = {
    "plan": (None, lambda q, c: q.plan(rows("V=20", "N=256", "model=gpt2"))),
    "requeue": (lambda q: q.fail(q.claim("w", 60), "boom"), lambda q, c: q.requeue(failed=True)),
    "cancel": (lambda q: q.jobs()[0]["name"], lambda q, name: q.cancel([name])),
    "pause": (None, lambda q, c: q.pause()),
    "resume": (lambda q: q.pause(), lambda q, c: q.resume()),
    "record_launch": (None, lambda q, c: q.record_launch("slurm", "7", 2, None, {})),
    "cancel_launch": (lambda q: q.record_launch("slurm", "7", 2, None, {}),
                      lambda q, c: q.cancel_launch("slurm", "7")),
    "progress": (lambda q: q.claim("w", 60), lambda q, c: q.progress(c, 3, 0.5)),
}


@pytest.fixture
def watched(patient) -> tuple[JobQueue, list[OutageNotice]]:
    """The patient queue, and the outage notices it gives."""
    notices: list[OutageNotice] = []
    return JobQueue(patient.engine, outage_budget=30, on_outage=notices.append), notices


@pytest.mark.parametrize("command", ONE_TRY)
def test_a_users_command_and_progress_are_tried_once_through_an_outage(watched, db_url,
                                                                        command):
    queue, notices = watched
    set_up, run = ONE_TRY[command]
    claim = set_up(queue) if set_up else None
    before = digest(db_url)
    with commits_failing(queue, committed=False) as left, pytest.raises(DatabaseError) as e:
        run(queue, claim)
    assert type(e.value) is DatabaseError            # not an OutageExceeded after retrying
    assert left == [0] and str(lost_answer(queue.engine.dialect.name)) in str(e.value)
    assert digest(db_url) == before                  # nothing written
    assert [n.kind for n in notices] == ["started"]  # the outage is seen all the same
    queue.jobs()
    assert [n.kind for n in notices] == ["started", "ended"]   # the database answered


def test_a_retried_write_tells_the_one_who_watches_when_the_outage_starts_and_ends(watched):
    queue, notices = watched
    with commits_failing(queue, committed=False, times=2) as left:
        claim = queue.claim("w", 60)
    assert left == [0] and claim is not None
    assert [(n.kind, n.budget) for n in notices] == [("started", 30), ("ended", 30)]
    assert notices[0].reason.startswith("database '")
    assert str(lost_answer(queue.engine.dialect.name)) in notices[0].reason


def test_a_heartbeat_asked_to_stop_waits_for_no_retry(patient):
    claim = patient.claim("w", 60)
    stop = threading.Event()
    stop.set()    # the worker is stopping: its last beat is not worth an outage's wait
    with commits_failing(patient, committed=False, times=3) as left, \
            pytest.raises(DatabaseError):
        patient.heartbeat(claim, cancel=stop)
    assert left == [2]                               # one try, no retry


def test_the_pool_hands_out_no_dead_connection_after_a_server_restart(pg_cluster):
    folder, server = pg_cluster
    url = new_pg_database(server)
    queue = JobQueue(connect(url, create=True))
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    assert queue.counts()["pending"] == 1      # a pooled connection now
    pgserver.shutdown(folder, "fast")
    pgserver.start_again(folder)
    assert queue.counts()["pending"] == 1      # no retry budget: pre-ping replaced it
    queue.engine.dispose()


def test_postgresql_commit_answers_cut_by_the_network_are_recognised(pg_server_url):
    """A real lost answer: the proxy forwards COMMIT, lets the server answer, drops the
    answer and resets the connection."""
    url = new_pg_database(pg_server_url)
    JobQueue(connect(url, create=True)).plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    proxy = Proxy(make_url(url).port)
    try:
        queue = JobQueue(connect(make_url(url).set(port=proxy.port).render_as_string(False)),
                         outage_budget=30)
        proxy.drop_after_commit()
        claim = queue.claim("w", 60)
        assert proxy.dropped_commits == 1
        proxy.drop_after_commit()
        queue.finish(claim, METRICS)
        assert proxy.dropped_commits == 2
        (job,) = queue.jobs()
        assert (job["state"], job["attempts"], job["test_accuracy"]) == ("succeeded", 1, 0.75)
        assert [(e["kind"], e["token"]) for e in queue.events()] == [
            ("plan", None), ("claim", claim.token), ("finish", claim.token)]
        queue.engine.dispose()
    finally:
        proxy.close()


# --- real workers through real outages -------------------------------------------------------


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory):
    """`fault_free(config)`: the folder of a fault-free run of that config (trained once)."""
    made: dict[str, Path] = {}

    def clean(config: dict) -> Path:
        key = json.dumps(config, sort_keys=True)
        if key not in made:
            made[key] = tmp_path_factory.mktemp("fault-free")
            train_1thread(config, made[key])
        return made[key]

    return clean


class Worker:
    """A worker process (`python -m runner worker --gpu cpu --threads 1 ...`), its log in a
    file; `netns`: run in that network namespace."""

    def __init__(self, db_url: str, log: Path, *args: str, env: dict | None = None,
                 netns: str | None = None):
        self.log = log
        inside = ["ip", "netns", "exec", netns] if netns else []   # ip execs: same pid
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                [*inside, PYTHON, "-m", "runner", "worker", "--gpu", "cpu", "--threads", "1",
                 *args],
                cwd=ROOT, env={**runner_env(db_url), **(env or {})}, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=f)
        self.name = f"{HOST}:cpu:{self.proc.pid}"

    def wait(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout=timeout)

    def text(self) -> str:
        return self.log.read_text()

    def count(self, phrase: str) -> int:
        return self.text().count(phrase)


def training(queue: JobQueue, step: int = 20):
    """True once every job is running and past `step`."""
    return lambda: all(j["state"] == "running" and j["step"] >= step for j in queue.jobs())


def steps_on_disk(queue: JobQueue) -> list[int]:
    """Steps each job has trained so far, from its folder's metrics.jsonl (one line a step)."""
    return [len((Path(j["out_dir"]) / "metrics.jsonl").read_text().splitlines())
            for j in queue.jobs()]


def check_all_done_once(queue: JobQueue, fault_free) -> list[dict]:
    """Every job succeeded, finished once by the lease of its last claim, no two live leases,
    files bit-identical to a fault-free run. The jobs."""
    jobs, events = queue.jobs(), queue.events()
    assert {j["state"] for j in jobs} == {"succeeded"}, [(j["name"], j["state"]) for j in jobs]
    assert finishes_per_job(events) == {j["id"]: 1 for j in jobs}
    assert lease_violations(events) == []
    for job in jobs:
        last_claim = [e for e in events if e["job_id"] == job["id"] and e["kind"] == "claim"][-1]
        (finish,) = [e for e in events if e["job_id"] == job["id"] and e["kind"] == "finish"]
        assert finish["token"] == last_claim["token"]
        assert_bit_identical(Path(job["out_dir"]), fault_free(job["config"]))
    return jobs


def one_outage_logged(worker: Worker) -> str:
    """The worker logged the outage once when it began and once when it ended; the end line."""
    text = worker.text()
    assert text.count("WARNING database unreachable: ") == 1, text[-3000:]
    (back,) = re.findall(r"WARNING (database back after .*)", text)
    return back


def rode_it_out(workers: list[Worker], queue, fault_free, cause: str = "") -> None:
    """Every worker exited 0, each job succeeded once on its first attempt, bit-identical
    to the fault-free run, and each worker logged the outage once (`cause` in its start)."""
    for w in workers:
        assert w.wait() == 0, w.text()[-3000:]
    jobs = check_all_done_once(queue, fault_free)
    assert [j["attempts"] for j in jobs] == [1] * len(workers)
    for w in workers:
        assert cause in w.text().split("WARNING database unreachable: ")[1], w.text()[-3000:]
        one_outage_logged(w)
    queue.engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_two_workers_ride_out_a_postgresql_restart(pg_cluster, tmp_path, fault_free, mode):
    """Stopped (fast: clients told "terminating connection"; immediate: as a crash, recovery
    at the next start) while both workers train, started again 5 s later."""
    folder, server = pg_cluster
    url = new_pg_database(server)
    queue = plan(url, tmp_path / "runs", *TWO_JOBS)
    workers = [Worker(url, tmp_path / f"worker-{i}.log", "--lease", "30") for i in range(2)]
    wait_for(training(queue), WAIT, what="both jobs training")
    pgserver.shutdown(folder, mode)
    time.sleep(5)
    pgserver.start_again(folder)
    for w in workers:
        assert w.wait() == 0, w.text()[-3000:]
    jobs = check_all_done_once(queue, fault_free)
    assert [j["attempts"] for j in jobs] == [1, 1]
    for w in workers:
        assert re.fullmatch(r"database back after \d+s", one_outage_logged(w))
        assert "lease lost" not in w.text()
    queue.engine.dispose()


@pytest.mark.slow
def test_a_postgresql_outage_longer_than_the_lease(pg_cluster, tmp_path, fault_free):
    """Down for twice the lease (crash and restart): each job either kept by its worker
    (nobody took it over: the lease token still matches) or taken over cleanly, with the
    old attempt's late writes refused."""
    folder, server = pg_cluster
    url = new_pg_database(server)
    queue = plan(url, tmp_path / "runs", *TWO_JOBS)
    workers = [Worker(url, tmp_path / f"worker-{i}.log", "--lease", "6") for i in range(2)]
    wait_for(training(queue), WAIT, what="both jobs training")
    pgserver.shutdown(folder, "immediate")
    time.sleep(12)
    pgserver.start_again(folder)
    for w in workers:
        assert w.wait() == 0, w.text()[-3000:]
    jobs = check_all_done_once(queue, fault_free)
    events = queue.events()
    for w in workers:
        assert one_outage_logged(w).endswith(
            "(longer than the 6s lease: the job's lease is checked before anything else is "
            "written)")
    for job in jobs:
        claims = [e for e in events if e["job_id"] == job["id"] and e["kind"] == "claim"]
        if job["attempts"] == 1:
            assert len(claims) == 1
            continue
        # Taken over: the first attempt's worker heard so, and wrote nothing after that.
        (first,) = [w for w in workers if w.name == claims[0]["worker"]]
        assert re.search(rf"{job['name']}: lease lost", first.text()), first.text()[-3000:]
    queue.engine.dispose()


@pytest.mark.slow
def test_a_network_cut_while_a_worker_elsewhere_takes_over(pg_cluster, tmp_path, fault_free):
    """Two workers reach the server through a proxy, which cuts them off for 20 s (open
    connections reset, new ones refused) without stopping the server; a third worker with
    a direct path takes over their jobs once the leases expire by the database's clock.
    When the path is back, the cut-off workers learn that their lease is gone (or, for a
    job nobody took, renew it) and write nothing for a job they lost."""
    folder, server = pg_cluster
    url = new_pg_database(server)
    queue = plan(url, tmp_path / "runs", *TWO_JOBS)
    proxy = Proxy(make_url(url).port)
    try:
        cut_off = make_url(url).set(port=proxy.port).render_as_string(False)
        workers = [Worker(cut_off, tmp_path / f"worker-{i}.log", "--lease", "6")
                   for i in range(2)]
        wait_for(training(queue), WAIT, what="both jobs training")
        heir = Worker(url, tmp_path / "heir.log", "--lease", "6", "--wait")
        wait_for(lambda: any(w["name"] == heir.name and w["alive"] for w in queue.workers()),
                 WAIT, what="the heir waiting for work")
        proxy.cut()
        time.sleep(20)
        proxy.restore()
        for w in workers:
            assert w.wait() == 0, w.text()[-3000:]
        wait_for(lambda: queue.counts()["succeeded"] == 2, WAIT, what="every job succeeded")
        heir.proc.send_signal(signal.SIGTERM)
        assert heir.wait(60) == 0, heir.text()[-3000:]
    finally:
        proxy.close()
    jobs = check_all_done_once(queue, fault_free)
    events = queue.events()
    taken = [j for j in jobs if j["attempts"] >= 2]
    claimers = {j["id"]: [e["worker"] for e in events
                          if e["job_id"] == j["id"] and e["kind"] == "claim"] for j in taken}
    # The heir takes one job over; the other may expire while the heir is busy and go to
    # whichever worker looks for work first once the path is back (a cut-off one, say).
    assert any(heir.name in names for names in claimers.values()), \
        f"the heir took no job over during the 20 s cut: {claimers}"
    for job in taken:
        (first,) = [w for w in workers if w.name == claimers[job["id"]][0]]
        assert re.search(rf"{job['name']}: lease lost", first.text()), first.text()[-3000:]
    for w in workers:
        one_outage_logged(w)
    queue.engine.dispose()


@pytest.mark.slow
def test_the_outage_budget_spent_checkpoints_the_job_and_exits_1(pg_cluster, tmp_path,
                                                                 fault_free):
    """--db-outage 4: the worker stops its job at the next step with a checkpoint and exits
    1 with one line; once the server is back, a worker on this host takes the job at once
    (its process is gone) and resumes it."""
    folder, server = pg_cluster
    url = new_pg_database(server)
    queue = plan(url, tmp_path / "runs", *ONE_JOB)
    worker = Worker(url, tmp_path / "worker.log", "--lease", "8", "--db-outage", "4")
    wait_for(training(queue), WAIT, what="the job training")
    pgserver.shutdown(folder, "fast")
    stopped = time.monotonic()
    try:
        assert worker.wait(120) == 1, worker.text()[-3000:]
        assert time.monotonic() - stopped < 30
    finally:
        pgserver.start_again(folder)
    last = worker.text().strip().splitlines()[-1]
    assert re.fullmatch(r"error: database unreachable for [4-9] s \(budget 4 s\): database "
                        r"'postgresql\+psycopg://runner@127\.0\.0\.1:\d+/t_\w+': .+", last), last
    (job,) = queue.jobs()
    assert job["state"] == "running" and job["worker"] == worker.name
    log = (Path(job["out_dir"]) / "train.log").read_text()
    step = int(re.search(rf"stopped on request at step (\d+)/{STEPS}; state saved", log).group(1))
    assert 20 <= step < STEPS
    assert "database unreachable for " in log and "the job is left to be reclaimed" in log
    heir = Worker(url, tmp_path / "heir.log", "--lease", "8")
    assert heir.wait() == 0, heir.text()[-3000:]
    assert re.search(rf"{job['name']}: reclaimed at once \(worker {worker.name}: its process "
                     r"\d+ is gone\)", heir.text()), heir.text()[-3000:]
    (job,) = check_all_done_once(queue, fault_free)
    assert job["attempts"] == 2
    assert f"resuming at step {step}/{STEPS}" in (Path(job["out_dir"]) / "train.log").read_text()
    queue.engine.dispose()


LOOKING = [["status"], ["status", "--json"], ["results"], ["plot", "--out", "{tmp}/f.png"],
           ["logs", "run1"]]


@pytest.mark.slow
def test_looking_during_an_outage_says_so_in_one_line_within_seconds(pg_cluster, tmp_path):
    """Server stopped (connection refused), or a server that accepts and never answers (a
    hung host: the connect timeout decides): exit 2, one line, no minute-long hang."""
    folder, server = pg_cluster
    url = new_pg_database(server)
    plan(url, tmp_path / "runs", *ONE_JOB).engine.dispose()
    proxy = Proxy(make_url(url).port)
    proxy.silence()
    hung = make_url(url).set(port=proxy.port).render_as_string(False)
    pgserver.shutdown(folder, "fast")
    try:
        for target, reason in ((url, "Connection refused"), (hung, "timeout expired")):
            for args in LOOKING:
                started = time.monotonic()
                proc = subprocess.run([PYTHON, "-m", "runner", *[a.format(tmp=tmp_path)
                                                                 for a in args]],
                                      cwd=ROOT, env=runner_env(target), capture_output=True,
                                      text=True, timeout=120)
                elapsed = time.monotonic() - started
                assert proc.returncode == 2, proc.stderr
                (line,) = proc.stderr.strip().splitlines()
                assert line.startswith("error: cannot reach database 'postgresql+psycopg://")
                assert reason in line, line
                assert elapsed < 20, f"{args}: {elapsed:.0f}s"
    finally:
        proxy.close()
        pgserver.start_again(folder)


@pytest.mark.slow
def test_two_workers_ride_out_a_sqlite_lock_held_past_their_busy_timeout(tmp_path, fault_free):
    """Another process holds SQLite's write lock (BEGIN EXCLUSIVE) for 12 s.

    The workers' busy timeout is 60 s: a lock held past it would make this test minutes
    long, so the workers run with $RUNNER_SQLITE_BUSY_TIMEOUT=1 (the same setting, shorter):
    every write then fails with SQLITE_BUSY after 1 s, and is retried, exactly as after 60 s.
    """
    path = tmp_path / "queue.sqlite"
    url = f"sqlite:///{path}"
    queue = plan(url, tmp_path / "runs", *TWO_JOBS)
    env = {"RUNNER_SQLITE_BUSY_TIMEOUT": "1"}
    workers = [Worker(url, tmp_path / f"worker-{i}.log", "--lease", "30", env=env)
               for i in range(2)]
    wait_for(training(queue), WAIT, what="both jobs training")
    holder = sqlite3.connect(path, isolation_level=None, timeout=30)
    holder.execute("BEGIN EXCLUSIVE")
    before = steps_on_disk(queue)
    time.sleep(12)
    after = steps_on_disk(queue)
    holder.execute("COMMIT")
    holder.close()
    # Training went on meanwhile (the steps' metrics are in the jobs' folders).
    assert all(b + 50 <= a or a == STEPS for b, a in zip(before, after, strict=True)), \
        (before, after)
    rode_it_out(workers, queue, fault_free, "database is locked")


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs mounted at tmp_path/disk (root only)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs here (mount -t tmpfs: "
                     f"{(proc.stderr or proc.stdout).strip()})")
    yield disk
    if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path) -> Path:
    """Fill the filesystem of `disk` to the last byte; the file that does it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 16, 512, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
def test_two_workers_ride_out_a_full_disk_under_the_database(small_disk, tmp_path, fault_free):
    """The database's folder is a small tmpfs that fills up for 10 s (the jobs' folders are
    elsewhere): every write fails with SQLITE_FULL until space is freed. The WAL is emptied
    first (a TRUNCATE checkpoint), so that the next commit must grow it."""
    path = small_disk / "queue.sqlite"
    url = f"sqlite:///{path}"
    queue = plan(url, tmp_path / "runs", *TWO_JOBS)
    workers = [Worker(url, tmp_path / f"worker-{i}.log", "--lease", "30") for i in range(2)]
    wait_for(training(queue), WAIT, what="both jobs training")
    checkpoint = sqlite3.connect(path, isolation_level=None, timeout=30)
    checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    checkpoint.close()
    filler = fill(small_disk)
    time.sleep(10)
    filler.unlink()
    rode_it_out(workers, queue, fault_free, "database or disk is full")


@pytest.fixture
def netns():
    """A network namespace of this test's own, its loopback up, where a `blackhole` queueing
    discipline can drop every packet (root, iproute2)."""
    name = f"runner-outage-{os.getpid()}"

    def ip(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", *args], capture_output=True, text=True)

    made = ip("netns", "add", name)
    if made.returncode != 0:
        skip_or_fail(f"cannot create a network namespace here (ip netns add: "
                     f"{made.stderr.strip()})")
    try:
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        probe = ip("netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "blackhole")
        if probe.returncode != 0:
            skip_or_fail(f"cannot drop packets here (tc qdisc add ... blackhole: "
                         f"{probe.stderr.strip()})")
        ip("netns", "exec", name, "tc", "qdisc", "del", "dev", "lo", "root")
        yield name
    finally:
        ip("netns", "del", name)


@pytest.mark.slow
def test_two_workers_ride_out_a_silent_network(netns, tmp_path, fault_free):
    """Every packet between the workers and the server dropped for 20 s (no reset, no
    refusal: a cable pulled, a host gone). The server and the workers run in a network
    namespace of the test's own; the test reads the queue through the server's Unix socket.
    A connection that stops answering is noticed within seconds (TCP keepalives and a
    timeout on unacknowledged data), not after the kernel's many minutes; training goes on
    meanwhile, its progress written by a thread of its own."""
    folder = Path(tempfile.mkdtemp(prefix="runner-pg-outage-"))
    try:
        pgserver.start(folder, netns=netns)
    except Exception as e:
        shutil.rmtree(folder, ignore_errors=True)
        skip_or_fail(f"no PostgreSQL server could be started in a network namespace: {e}")
    try:
        local = new_pg_database(pgserver.socket_url(folder))
        name = make_url(local).database
        port = make_url(local).query["port"]
        over_tcp = pgserver.url_for(int(port), name)      # 127.0.0.1 inside the namespace
        queue = plan(local, tmp_path / "runs", *TWO_JOBS)
        workers = [Worker(over_tcp, tmp_path / f"worker-{i}.log", "--lease", "60",
                          netns=netns) for i in range(2)]
        wait_for(training(queue), WAIT, what="both jobs training")
        tc = ["ip", "netns", "exec", netns, "tc", "qdisc"]
        subprocess.run([*tc, "add", "dev", "lo", "root", "blackhole"], check=True)
        before = steps_on_disk(queue)
        time.sleep(20)
        after = steps_on_disk(queue)
        subprocess.run([*tc, "del", "dev", "lo", "root"], check=True)
        # Training went on (no database wait held the training thread up).
        assert all(b + 50 <= a or a == STEPS for b, a in zip(before, after, strict=True)), \
            (before, after)
        rode_it_out(workers, queue, fault_free)    # noticed, not hung on
    finally:
        pgserver.stop(folder)
        shutil.rmtree(folder, ignore_errors=True)
