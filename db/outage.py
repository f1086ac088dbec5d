"""Riding out database outages: which errors may clear by themselves, and retrying a
transaction through them, with backoff and jitter, within an outage budget.

A server restart, a failover, a network cut, a SQLite file locked past the busy timeout or a
full disk are transient: the same transaction succeeds once the database is back. Bad
credentials, a missing database, SQL or schema errors and a corrupt file are permanent:
they are raised at once. The outage is shared by every thread of the process (the worker's
heartbeat thread and its main thread): it is reported once when it starts and once when it
ends, and the budget counts from its start, whichever thread saw it first.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import exc

from db.engine import DatabaseError

T = TypeVar("T")

# PostgreSQL SQLSTATEs worth retrying: class 08 (connection exceptions), the server shutting
# down, crashing or starting up (57P01-57P03), a serialization failure or deadlock (the
# transaction was rolled back), a server out of disk, memory or connection slots.
TRANSIENT_SQLSTATE_CLASSES = ("08",)
TRANSIENT_SQLSTATES = {"57P01", "57P02", "57P03", "40001", "40P01", "53100", "53200", "53300"}
# SQLite primary result codes worth retrying: BUSY and LOCKED (a lock held past the busy
# timeout), IOERR (a disk that fails and recovers), FULL (a disk that fills and empties),
# PROTOCOL (a WAL lock race). CORRUPT, NOTADB, READONLY, CANTOPEN and the rest are not.
TRANSIENT_SQLITE_CODES = {5, 6, 10, 13, 15}
_SQLITE_TRANSIENT_MESSAGES = ("database is locked", "database table is locked",
                              "disk i/o error", "database or disk is full")
# A failed connection attempt carries no SQLSTATE (libpq reports it as text): the server
# refusing us for good says so in these words; anything else (refused, reset, timed out,
# closed, "the database system is starting up") is taken for transient.
_PERMANENT_CONNECT = re.compile(
    r"authentication failed|no pg_hba\.conf entry|does not exist|password is required|"
    r"no password supplied|permission denied|certificate|invalid (?:connection )?option|"
    r"unsupported|too old|sslmode", re.IGNORECASE)


def is_transient(error: BaseException) -> bool:
    """True when `error` may clear by itself (the database restarting or out of reach, a lock
    held too long, a full disk); False for errors retrying cannot fix."""
    while isinstance(error, DatabaseError) and error.orig is not None:
        error = error.orig   # our own wrapping (db.engine.connect): what the driver said
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True  # the connection broke: the pool is refreshed, a new one may work
    if isinstance(error, exc.TimeoutError):
        return True  # the pool's connection stayed busy (a one-connection worker in an outage)
    orig = getattr(error, "orig", None) or error   # the driver's own exception
    module = type(orig).__module__.split(".")[0]
    if module == "psycopg":
        sqlstate = getattr(orig, "sqlstate", None)
        if sqlstate:
            return sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES or sqlstate in TRANSIENT_SQLSTATES
        import psycopg

        if isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError):
            return not _PERMANENT_CONNECT.search(str(orig))
        return False
    if module == "sqlite3":
        code = getattr(orig, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in TRANSIENT_SQLITE_CODES
        return any(m in str(orig).lower() for m in _SQLITE_TRANSIENT_MESSAGES)
    return False


class OutageExceeded(DatabaseError):
    """The database stayed unreachable for longer than the outage budget."""


@dataclass(frozen=True)
class OutageNotice:
    """What `on_outage` is told: an outage `started` (with the error), or `ended` (with its
    length in seconds)."""

    kind: str            # "started" or "ended"
    reason: str          # the first error of the outage
    seconds: float       # 0 when it starts; its length when it ends
    budget: float


class Outages:
    """The database's reachability as this process sees it, and retries through outages.

    `budget` seconds: how long an outage may last before a retried operation gives up with
    OutageExceeded (0: never retry). `on_outage(notice)` is called once when an outage starts
    and once when it ends (from the thread that saw it), never per retry.
    """

    def __init__(self, budget: float = 0.0,
                 on_outage: Callable[[OutageNotice], None] | None = None,
                 first_delay: float = 0.2, max_delay: float = 5.0,
                 rng: random.Random | None = None):
        self.budget, self.on_outage = budget, on_outage
        self.first_delay, self.max_delay = first_delay, max_delay
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._since: float | None = None     # monotonic time the current outage began
        self._reason = ""

    @property
    def down_for(self) -> float | None:
        """Seconds since the current outage began, or None while the database answers."""
        since = self._since
        return None if since is None else time.monotonic() - since

    def delay(self, tries: int) -> float:
        """Backoff before retry number `tries` (0, 1, ...): doubling up to `max_delay`, half
        of it random, so that workers cut off together do not come back in lockstep."""
        ceiling = min(self.max_delay, self.first_delay * 2 ** min(tries, 30))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def failed(self, reason: str) -> float:
        """Record a transient failure; seconds the outage has lasted so far."""
        with self._lock:
            started = self._since is None
            if started:
                self._since, self._reason = time.monotonic(), reason
            elapsed = time.monotonic() - self._since
        if started and self.on_outage:
            self.on_outage(OutageNotice("started", reason, 0.0, self.budget))
        return elapsed

    def succeeded(self) -> None:
        """The database answered: an outage in progress is over."""
        if self._since is None:
            return
        with self._lock:
            if self._since is None:
                return
            seconds, reason = time.monotonic() - self._since, self._reason
            self._since = None
        if self.on_outage:
            self.on_outage(OutageNotice("ended", reason, seconds, self.budget))

    def run(self, attempt: Callable[[bool], T], describe: Callable[[BaseException], str],
            retry: bool = True, cancel: threading.Event | None = None) -> T:
        """`attempt(retrying)` until it succeeds, a permanent error, or the budget is spent.

        `retrying` is True on every call after a transient failure: the earlier call may
        have committed although its answer was lost, and the attempt must recognise that.
        Without `retry` a transient failure is recorded (an outage starts) and raised at
        once; with no budget it is only raised. `cancel` set while waiting to retry raises
        the last error.
        """
        tries = 0
        while True:
            try:
                result = attempt(tries > 0)
            except Exception as e:
                if not is_transient(e) or self.budget <= 0:
                    raise  # no budget: nothing waits, so there is no outage to report
                reason = describe(e)
                elapsed = self.failed(reason)
                if not retry:
                    raise
                if elapsed >= self.budget:
                    raise OutageExceeded(
                        f"database unreachable for {elapsed:.0f} s (budget {self.budget:g} s): "
                        f"{reason}") from e
                wait = min(self.delay(tries), self.budget - elapsed)
                tries += 1
                if cancel is not None:
                    if cancel.wait(wait):
                        raise
                else:
                    time.sleep(wait)
                continue
            self.succeeded()
            return result
