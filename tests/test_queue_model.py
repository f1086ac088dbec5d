"""A model-based test of the queue: random interleavings of three workers' operations and the
user's commands, each checked against a plain Python model of what it should do, and the
invariants the docs promise checked after every step (Hypothesis stateful testing).

Workers are named `HOST:cpu:PID` so that reclaim_dead judges them; a worker "dies" by being
counted dead by the is_dead given to reclaim_dead (and to requeue), and comes back under a
new pid. A silent worker's lease expires when the test moves its job's heartbeat back past
the lease (the queue reads the database's clock, which the test cannot move).

`pytest --hypothesis-profile=long tests/test_queue_model.py` runs many more and longer
examples than the CI budget below.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text

from db import JobQueue, LeaseLost, connect
from db.models import STATES
from runner.liveness import HOST
from tests.support.queues import new_pg_database, rows

LEASE = 600.0           # never runs out by itself during an example
SILENCE = 3600.0        # how far back an expired job's heartbeat is moved
# Three workers on this host, which reclaim_dead judges, and one elsewhere, which it must not.
HOSTS = (HOST, HOST, HOST, "elsewhere")
WORKERS = len(HOSTS)
ENDED = ("succeeded", "failed", "cancelled")
FENCED_KINDS = {"heartbeat", "finish", "fail", "release", "cancel"}  # written under a lease
# Few attempts for some jobs, so that running out of them happens in a short example.
MAX_ATTEMPTS = (1, 2, 3, 1, 2, 3)


def _planned(overrides=()) -> list[dict]:
    return [{**row, "max_attempts": attempts}
            for row, attempts in zip(rows("V=5", "N=256", overrides=overrides), MAX_ATTEMPTS,
                                     strict=True)]


# Each job's row as planned (variant 0) and with a changed config (variant 1).
VARIANTS = (_planned(), _planned(["training.train_steps=99"]))
NAMES = [r["name"] for r in VARIANTS[0]]


def budget(backend: str) -> settings:
    """Small fixed budgets for CI; a profile chosen with --hypothesis-profile (`long`, see
    tests/conftest.py) instead, a third of its examples on PostgreSQL."""
    if settings.get_current_profile_name() != "default":  # chosen on the command line
        base = settings()
        examples = base.max_examples if backend == "sqlite" else max(1, base.max_examples // 3)
        return settings(base, max_examples=examples, deadline=None, database=None)
    return settings(max_examples=25 if backend == "sqlite" else 10, stateful_step_count=50,
                    deadline=None, database=None,
                    derandomize=os.environ.get("CI") == "true",
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.filter_too_much])


@dataclass
class JobModel:
    """What a job's row should hold."""

    id: int
    name: str
    position: int
    max_attempts: int
    variant: int = 0
    state: str = "pending"
    attempts: int = 0
    claims: int = 0
    step: int = 0
    worker: str | None = None
    token: str | None = None
    expired: bool = False       # running, heartbeat older than its lease
    stop_request: str | None = None
    error: bool = False
    accuracy: float | None = None
    snapshot: tuple | None = None   # the succeeded row's (state, results, finished_at)

    @property
    def total_steps(self) -> int:
        return VARIANTS[self.variant][NAMES.index(self.name)]["total_steps"]

    @property
    def config(self) -> dict:
        return VARIANTS[self.variant][NAMES.index(self.name)]["config"]

    def reset(self, fresh: bool) -> None:
        """requeue's reset (fresh: as new, the result gone too)."""
        self.state, self.attempts, self.token, self.expired = "pending", 0, None, False
        self.stop_request, self.error, self.snapshot = None, False, None
        if fresh:
            self.step, self.worker, self.accuracy = 0, None, None


class Database:
    """A fresh, empty queue for each example: a new SQLite file, or PostgreSQL's tables
    emptied (making a database per example would take most of the time)."""

    def __init__(self, backend: str, folder, pg_url: str | None):
        self.backend, self.folder, self.pg_url = backend, folder, pg_url
        self.examples = 0
        self.queue: JobQueue | None = None

    def fresh(self) -> JobQueue:
        self.examples += 1
        if self.backend == "sqlite":
            if self.queue is not None:
                self.queue.engine.dispose()
            url = f"sqlite:///{self.folder / f'queue{self.examples}.sqlite'}"
            self.queue = JobQueue(connect(url, create=True))
            return self.queue
        if self.queue is None:
            self.queue = JobQueue(connect(self.pg_url, create=True))
        with self.queue.engine.begin() as conn:
            conn.execute(text("TRUNCATE jobs, events, workers, launches RESTART IDENTITY"))
            conn.execute(text("DELETE FROM meta WHERE key = 'paused'"))
        return self.queue

    def close(self) -> None:
        if self.queue is not None:
            self.queue.engine.dispose()


ACTIONS = ("heartbeat", "heartbeat", "progress", "finish", "fail", "release", "cancelled",
           "forget")


def _worker_rule(w: int):
    """The rule `worker_W`: worker w's next move (QueueMachine.act)."""

    def move(self, action, step, accuracy):
        self.act(w, action, step, accuracy)

    move.__name__ = move.__qualname__ = f"worker_{w}"
    return rule(action=st.sampled_from(ACTIONS), step=st.integers(0, 30),
                accuracy=st.sampled_from([0.25, 0.5, 0.75]))(move)


class QueueMachine(RuleBasedStateMachine):
    db: Database  # set by the test

    def __init__(self):
        super().__init__()
        self.queue = self.db.fresh()
        self.jobs: dict[str, JobModel] = {}
        self.held: list = [None] * WORKERS            # each worker's Claim (maybe stale)
        self.pids = [4_000_000 + i for i in range(WORKERS)]  # fake: is_dead judges
        self.dead: set[str] = set()
        self.paused = False
        self.events: Counter = Counter()
        self.launches: list[list] = []                # [job_id, cancelled]
        self.moved: list[str] = []

    # --- helpers ----------------------------------------------------------------------

    def name_of(self, w: int) -> str:
        return f"{HOSTS[w]}:cpu:{self.pids[w]}"

    def is_dead(self, name: str, process: str | None) -> str | None:
        """As runner.liveness.dead_reason would say: a worker of another host is "gone" too
        (its pid means nothing here), which is why only this host's workers may be judged."""
        return "gone" if name in self.dead or not name.startswith(f"{HOST}:") else None

    def holds(self, claim) -> bool:
        job = self.jobs[claim.name]
        return job.state == "running" and job.token == claim.token

    def by_position(self) -> list[JobModel]:
        return sorted(self.jobs.values(), key=lambda j: j.position)

    def row(self, name: str) -> dict:
        row = next(j for j in self.queue.jobs() if j["name"] == name)
        return {k: v for k, v in row.items() if k not in ("heartbeat_age", "claimed_age")}

    def drop_if_stale(self, w: int) -> None:
        if not self.holds(self.held[w]):
            self.held[w] = None

    # --- setup ----------------------------------------------------------------------

    @initialize()
    def plan_the_sweep(self):
        report = self.queue.plan(VARIANTS[0])
        assert report.new == NAMES
        for job in self.queue.jobs():
            self.jobs[job["name"]] = JobModel(job["id"], job["name"], job["position"],
                                              job["max_attempts"])
        self.events["plan"] += len(NAMES)

    # --- the worker's side ------------------------------------------------------------

    def _settle_expired(self) -> None:
        for job in self.jobs.values():
            if not (job.state == "running" and job.expired):
                continue
            if job.stop_request == "cancel":
                job.state = "cancelled"
            elif job.attempts >= job.max_attempts:
                job.state, job.error = "failed", True
            else:
                continue
            job.token, job.stop_request, job.expired = None, None, False
            self.events["expire"] += 1

    def act(self, w: int, action: str, step: int, accuracy: float) -> None:
        """Worker w's next move: a claim when it holds none, else `action` on its claim."""
        if self.held[w] is None:
            self.claim(w)
        elif action in ("heartbeat", "forget"):
            getattr(self, action)(w)
        elif action == "finish":
            self.finish(w, accuracy)
        else:
            getattr(self, action)(w, step)

    def claim(self, w: int) -> None:
        name = self.name_of(w)
        self._settle_expired()
        candidates = [] if self.paused else [
            j for j in self.by_position()
            if (j.state == "pending" or (j.state == "running" and j.expired))
            and j.attempts < j.max_attempts and j.stop_request != "cancel"]
        claim = self.queue.claim(name, LEASE)
        if not candidates:
            assert claim is None, (claim, self.paused)
            return
        job = candidates[0]
        assert claim is not None, f"expected {job.name} to be claimed"
        if job.state == "running":
            self.events["expire"] += 1
        job.state, job.worker, job.token, job.expired = "running", name, claim.token, False
        job.attempts += 1
        job.claims += 1
        job.stop_request, job.error = None, False
        self.events["claim"] += 1
        assert (claim.name, claim.attempt, claim.worker, claim.step, claim.total_steps) == (
            job.name, job.claims, name, job.step, job.total_steps)
        assert claim.config == job.config
        self.held[w] = claim

    def _holding(self, data) -> int:
        return data.draw(st.sampled_from([i for i, c in enumerate(self.held) if c is not None]),
                         label="worker")

    def _fenced(self, w: int, write, on_held) -> None:
        """A write under worker w's claim: done when the claim holds its job (then the model
        follows: on_held(job)), else LeaseLost and the job unchanged."""
        claim = self.held[w]
        if self.holds(claim):
            write(claim)
            on_held(self.jobs[claim.name])
            self.held[w] = None
            return
        before = self.row(claim.name)
        with pytest.raises(LeaseLost):
            write(claim)
        assert self.row(claim.name) == before
        self.held[w] = None  # the worker gives up its stale claim

    def _renew(self, w: int, renew, on_held) -> None:
        """A heartbeat or progress write: the Lease says whether the claim holds its job, and
        the stop asked of it; a stale claim changes nothing (the worker keeps it for now)."""
        claim = self.held[w]
        held = self.holds(claim)
        before = None if held else self.row(claim.name)
        lease = renew(claim)
        if held:
            job = self.jobs[claim.name]
            assert lease.held and lease.stop == job.stop_request
            on_held(job)
        else:
            assert not lease.held and lease.stop is None
            assert self.row(claim.name) == before

    def heartbeat(self, w: int) -> None:
        def renewed(job):
            job.expired = False
            self.events["heartbeat"] += 1

        self._renew(w, self.queue.heartbeat, renewed)

    def progress(self, w: int, step: int) -> None:
        self._renew(w, lambda c: self.queue.progress(c, step, 0.5),
                    lambda job: setattr(job, "step", step))

    def finish(self, w: int, accuracy: float) -> None:
        def done(job):
            job.state, job.token, job.expired, job.error = "succeeded", None, False, False
            job.step, job.accuracy = self.held[w].total_steps, accuracy
            job.stop_request = "cancel" if job.stop_request == "cancel" else None
            self.events["finish"] += 1

        self._fenced(w, lambda c: self.queue.finish(
            c, {"accuracy": accuracy, "balanced_accuracy": accuracy / 2,
                "majority_rate": 0.5}), done)

    def fail(self, w: int, step: int) -> None:
        def done(job):
            job.state, job.token, job.expired, job.error = "failed", None, False, True
            job.stop_request = "cancel" if job.stop_request == "cancel" else None
            self.events["fail"] += 1

        self._fenced(w, lambda c: self.queue.fail(c, "RuntimeError: boom", "Traceback"), done)

    def release(self, w: int, step: int) -> None:
        def done(job):
            job.state, job.token, job.expired, job.stop_request = "pending", None, False, None
            job.step = step
            job.attempts -= 1
            self.events["release"] += 1

        self._fenced(w, lambda c: self.queue.release(c, step), done)

    def cancelled(self, w: int, step: int) -> None:
        """The worker stopped its job for a cancel (the queue does not check one was asked)."""
        def done(job):
            job.state, job.token, job.expired, job.stop_request = "cancelled", None, False, None
            job.step = step
            job.attempts -= 1
            self.events["cancel"] += 1

        self._fenced(w, lambda c: self.queue.cancelled(c, step), done)

    def forget(self, w: int) -> None:
        """A worker that saw its lease lost (a false heartbeat) moves on."""
        self.drop_if_stale(w)

    # One rule per worker (rather than one for all, with the worker drawn): the workers'
    # moves are most of what happens, as in a real queue.
    worker_0, worker_1, worker_2, worker_3 = (_worker_rule(w) for w in range(WORKERS))

    # --- time and deaths -------------------------------------------------------------

    @rule(data=st.data())
    @precondition(lambda self: any(j.state == "running" and not j.expired
                                   for j in self.jobs.values()))
    def lease_runs_out(self, data):
        """The job's worker went silent: its heartbeat is older than its lease."""
        name = data.draw(st.sampled_from(sorted(
            j.name for j in self.jobs.values() if j.state == "running" and not j.expired)),
            label="job")
        with self.queue.engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET heartbeat_at = heartbeat_at - :s "
                              "WHERE name = :n"), {"s": SILENCE, "n": name})
        self.jobs[name].expired = True

    @rule(data=st.data())
    @precondition(lambda self: any(self.held))
    def die(self, data):
        """The worker's process is gone (its claim stays with the slot: a process judged dead
        that was not must still be fenced out); the slot is a new process from now on."""
        w = self._holding(data)
        self.dead.add(self.name_of(w))
        self.pids[w] += WORKERS

    def _reclaimed(self, job: JobModel, by_requeue: bool = False) -> None:
        self.events["reclaim"] += 1
        if by_requeue:
            return
        if job.stop_request == "cancel":
            job.state = "cancelled"
        elif job.attempts >= job.max_attempts:
            job.state, job.error = "failed", True
        else:
            job.state, job.error = "pending", False
        job.token, job.stop_request, job.expired = None, None, False

    def judged_dead(self, job: JobModel) -> bool:
        """Whether reclaim_dead (or requeue given this host) takes the job as its worker's."""
        return (job.state == "running" and job.worker in self.dead
                and job.worker.startswith(f"{HOST}:"))

    @rule()
    @precondition(lambda self: any(j.state == "running" and j.worker in self.dead
                                   for j in self.jobs.values()))
    def reclaim_dead(self):
        expected = sorted(j.name for j in self.jobs.values() if self.judged_dead(j))
        for name in expected:
            self._reclaimed(self.jobs[name])
        got = self.queue.reclaim_dead(HOST, self.is_dead, by="model")
        assert sorted(n for n, _ in got) == expected
        assert all(reason.endswith(": gone") for _, reason in got)

    # --- the user's side --------------------------------------------------------------

    def _names(self, data, first: tuple[str, ...], min_size: int = 0) -> list[str]:
        """A few job names, those in a state of `first` likelier (drawn first), and now and
        then one that no job has."""
        ranked = sorted(NAMES, key=lambda n: self.jobs[n].state not in first)
        return data.draw(st.lists(st.sampled_from(ranked + ["nope"]), min_size=min_size,
                                  max_size=3, unique=True), label="names")

    @rule(data=st.data(), failed=st.booleans(), fresh=st.booleans())
    @precondition(lambda self: any(j.state != "pending" for j in self.jobs.values()))
    def requeue(self, data, failed, fresh):
        """As the requeue command asks: a named job of a dead worker of this host at once."""
        names = self._names(data, ("running", "failed", "succeeded", "cancelled"))
        before = self.queue.jobs()
        moved: list[str] = []
        kwargs = {"failed": failed, "fresh": fresh, "move_aside": moved.append,
                  "host": HOST, "is_dead": self.is_dead}
        refusal, dead = None, set()
        if "nope" in names:
            refusal = "no job named nope"
        else:
            for name in names:
                job = self.jobs[name]
                if job.state != "running":
                    continue
                if fresh:
                    refusal = "is running"
                    break
                if self.judged_dead(job):
                    dead.add(name)
                elif not job.expired:
                    refusal = "is running"
                    break
        if refusal:
            with pytest.raises(ValueError, match=refusal):
                self.queue.requeue(names, **kwargs)
            after = self.queue.jobs()
            assert [_stable(j) for j in after] == [_stable(j) for j in before]
            return
        chosen = {j.name for j in self.jobs.values() if failed and j.state == "failed"}
        chosen |= {n for n in names if fresh or self.jobs[n].state != "pending"}
        for name in chosen:
            job = self.jobs[name]
            if name in dead:
                self._reclaimed(job, by_requeue=True)
            elif job.state == "running":
                self.events["expire"] += 1
            job.reset(fresh)
            self.events["requeue"] += 1
        got = self.queue.requeue(names, **kwargs)
        assert got == sorted(chosen)
        if fresh:
            assert sorted(moved) == sorted(r["out_dir"] for r in before
                                           if r["name"] in chosen)
        else:
            assert moved == []

    @rule(data=st.data())
    @precondition(lambda self: any(j.state in ("running", "pending")
                                   for j in self.jobs.values()))
    def cancel(self, data):
        names = self._names(data, ("running",), min_size=1)
        if "nope" in names:
            before = [_stable(j) for j in self.queue.jobs()]
            with pytest.raises(ValueError, match="no job named nope"):
                self.queue.cancel(names)
            assert [_stable(j) for j in self.queue.jobs()] == before
            return
        cancelled, asked, skipped = [], [], []
        for name in names:
            job = self.jobs[name]
            if job.state in ("cancelled", "succeeded"):
                skipped.append(name)
            elif job.state == "running" and not job.expired:
                job.stop_request = "cancel"
                self.events["cancel"] += 1
                asked.append(name)
            else:
                if job.state == "running":
                    self.events["expire"] += 1
                job.state, job.token, job.stop_request, job.expired = (
                    "cancelled", None, None, False)
                self.events["cancel"] += 1
                cancelled.append(name)
        report = self.queue.cancel(names)
        assert (report.cancelled, report.asked, report.skipped) == (cancelled, asked, skipped)

    @rule(now=st.booleans())
    @precondition(lambda self: not self.paused)
    def pause(self, now):
        """Claim nothing new; with `now`, running jobs' workers are asked to hand them back."""
        asked = []
        if now:
            asked = [j.name for j in self.jobs.values()
                     if j.state == "running" and j.stop_request is None]
            for name in asked:
                self.jobs[name].stop_request = "pause"
            self.events["pause"] += len(asked)
        self.paused = True
        assert sorted(self.queue.pause(now=now)) == sorted(asked)

    @rule()
    @precondition(lambda self: self.paused)
    def resume(self):
        self.paused = False
        for job in self.jobs.values():
            if job.state == "running" and job.stop_request == "pause":
                job.stop_request = None
        assert self.queue.resume()

    @rule(index=st.integers(0, len(NAMES) - 1), toggle=st.booleans(), replace=st.booleans())
    def plan(self, index, toggle, replace):
        """Plan the sweep again, one job's config changed (toggle) or not, the others as
        they are."""
        target = self.jobs[NAMES[index]]
        variant = 1 - target.variant if toggle else target.variant
        planned = [VARIANTS[variant if name == target.name else self.jobs[name].variant][i]
                   for i, name in enumerate(NAMES)]
        moved: list[str] = []
        changed = target.variant != variant
        replaced = changed and replace and target.state != "running"
        report = self.queue.plan(planned, replace=replace, move_aside=moved.append)
        assert report.new == []
        assert sorted(report.changed) == ([target.name] if changed else [])
        assert report.existing == [n for n in NAMES if not (changed and n == target.name)]
        assert report.replaced == ([target.name] if replaced else [])
        assert report.running == ([target.name] if changed and replace and not replaced
                                  else [])
        if replaced:
            assert moved == [planned[index]["out_dir"]]
            target.variant = variant
            target.reset(fresh=True)
            self.events["replace"] += 1
        else:
            assert moved == []

    @rule(action=st.sampled_from(["record", "cancel", "ask"]),
          job_id=st.sampled_from(["101", "102", "103"]))
    def launch(self, action, job_id):
        """A scheduler launch recorded, cancelled, or asked whether it was cancelled."""
        if action == "record":
            self.queue.record_launch("slurm", job_id, 2, None, {"partition": "gpu"})
            self.launches.append([job_id, False])
        elif action == "cancel":
            known = False
            for launch in self.launches:
                if launch[0] == job_id:
                    launch[1] = known = True
            assert self.queue.cancel_launch("slurm", job_id) == known
        else:
            expected = any(j == job_id and cancelled for j, cancelled in self.launches)
            assert self.queue.launch_cancelled("slurm", job_id) == expected

    # --- invariants -------------------------------------------------------------------

    @invariant()
    def rows_match_the_model(self):
        if not self.jobs:
            return
        for row in self.queue.jobs():
            job = self.jobs[row["name"]]
            assert (row["state"], row["attempts"], row["claims"], row["step"], row["worker"],
                    row["lease_token"], row["stop_request"], row["error"] is not None,
                    row["test_accuracy"], row["total_steps"]) == (
                job.state, job.attempts, job.claims, job.step, job.worker, job.token,
                job.stop_request, job.error, job.accuracy, job.total_steps), row["name"]
            assert row["config"] == job.config
            # A lease is held by exactly one token while running, by none otherwise.
            assert (row["lease_token"] is not None) == (row["state"] == "running")
            holders = [c for c in self.held
                       if c is not None and c.id == row["id"] and c.token == row["lease_token"]]
            assert len(holders) <= 1
            # An ended job says when it ended; others do not.
            assert (row["finished_at"] is not None) == (row["state"] in ENDED), row
            assert 0 <= row["attempts"] <= row["max_attempts"]
            if row["state"] == "pending":  # claimable
                assert row["attempts"] < row["max_attempts"] and row["stop_request"] is None
            if row["state"] == "succeeded":
                seen = (row["state"], row["test_accuracy"], row["balanced_accuracy"],
                        row["majority_rate"], row["finished_at"], row["step"])
                if job.snapshot is None:
                    job.snapshot = seen
                assert seen == job.snapshot, "a succeeded job changed"

    @invariant()
    def counts_match(self):
        if not self.jobs:
            return
        expected = Counter(j.state for j in self.jobs.values())
        assert self.queue.counts() == {s: expected.get(s, 0) for s in STATES}

    @invariant()
    def pause_matches(self):
        assert (self.queue.paused() is not None) == self.paused

    @invariant()
    def launches_match(self):
        got = [[r["job_id"], r["cancelled_at"] is not None]
               for r in self.queue.launches("slurm")]
        assert got == self.launches

    @invariant()
    def every_event_accounted_for(self):
        events = self.queue.events()
        assert Counter(e["kind"] for e in events) == +self.events
        assert (sum(j.claims for j in self.jobs.values()) == self.events["claim"])
        assert self.fenced_writes_by_stale_leases(events) == []

    @staticmethod
    def fenced_writes_by_stale_leases(events: list[dict]) -> list[str]:
        """Writes under a lease (heartbeat, finish, ...) made by a token that was not the
        job's latest claim, or after that lease ended."""
        problems = []
        live: dict[int, str | None] = {}
        for e in events:
            job = e["job_id"]
            if e["kind"] == "claim":
                live[job] = e["token"]
            elif e["kind"] in FENCED_KINDS and e["token"] is not None:
                if live.get(job) != e["token"]:
                    problems.append(f"{e['kind']} on job {job} by stale lease {e['token']}")
                if e["kind"] != "heartbeat":
                    live[job] = None
            elif e["kind"] in ("expire", "reclaim", "requeue", "replace", "cancel"):
                # A lease ends with its job's expiry, reclaim, requeue, replan, or a cancel
                # that cancelled it at once (detail "from"); an asked cancel does not end it.
                if e["kind"] != "cancel" or "from" in json.loads(e["detail"] or "{}"):
                    live[job] = None
        return problems


def _stable(job: dict) -> dict:
    return {k: v for k, v in job.items() if k not in ("heartbeat_age", "claimed_age")}


@pytest.fixture(scope="module")
def pg_url(request):
    return new_pg_database(request.getfixturevalue("pg_server_url"))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_queue_follows_its_model(backend, tmp_path, request):
    pg = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    db = Database(backend, tmp_path, pg)
    machine = type("QueueMachine", (QueueMachine,), {"db": db})
    try:
        run_state_machine_as_test(machine, settings=budget(backend))
    finally:
        db.close()
