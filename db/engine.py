"""Engine set-up per backend, schema creation, and the database clock.

SQLite is configured for many worker processes on one host: WAL (set once,
when the file is created), a long busy timeout, synchronous=FULL (a finished
result is expensive), and every write transaction opened with BEGIN IMMEDIATE
so it takes the write lock up front instead of failing on lock upgrade.
PostgreSQL is used as is; claims there skip locked rows.
"""

from __future__ import annotations

import os
import re
import sqlite3
import uuid
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event, exc, inspect, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.expression import FunctionElement
from sqlalchemy.types import Float

from db.models import SCHEMA_VERSION, Base, Meta

# meta key of the queue's identity (a random hex id, made with the queue).
QUEUE_ID_KEY = "queue_id"
BUSY_TIMEOUT_MS = 60_000
# How long a writer waits for SQLite's lock before the failure counts as an outage (and is
# retried, see db/outage.py); $RUNNER_SQLITE_BUSY_TIMEOUT (seconds) overrides BUSY_TIMEOUT_MS.
BUSY_TIMEOUT_ENV = "RUNNER_SQLITE_BUSY_TIMEOUT"
# Readers (status, results, ...) never wait on writers in WAL mode; if the file is
# locked outright, they say so after this long instead of hanging for a minute.
READ_BUSY_TIMEOUT_MS = 3_000
# A write the training thread makes (progress) waits no longer than this for the lock.
QUICK_BUSY_TIMEOUT_MS = 2_000
# A PostgreSQL server that stops answering without closing the connection (a network cut,
# a host gone) is noticed by TCP within seconds (keepalives, unacknowledged data) instead of
# the kernel's many minutes; a connection refused or reset is noticed at once anyway.
PG_TCP_ARGS = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
               "keepalives_count": 3, "tcp_user_timeout": 10_000}

POOL_WAIT_SECONDS = 60

# MIGRATIONS[k]: the SQL statements that take a schema from version k to k+1.
# To change the schema: edit db/models.py, bump SCHEMA_VERSION, add the step here
# (plain ALTER TABLE ... ADD COLUMN works on both backends).
MIGRATIONS: dict[int, list[str]] = {
    # 2: workers table (created by create_all), provenance and claim count per job.
    1: ["ALTER TABLE jobs ADD COLUMN profile VARCHAR(64)",
        "ALTER TABLE jobs ADD COLUMN overrides TEXT",
        "ALTER TABLE jobs ADD COLUMN claims INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN stop_request VARCHAR(16)",
        "ALTER TABLE jobs ADD COLUMN peak_memory FLOAT",
        "UPDATE jobs SET claims = attempts"],
    # 3: launches table (created by create_all), a worker's SLURM ids and GPUs.
    2: ["ALTER TABLE workers ADD COLUMN slurm_job_id VARCHAR(32)",
        "ALTER TABLE workers ADD COLUMN slurm_array VARCHAR(64)",
        "ALTER TABLE workers ADD COLUMN slurm_restarts INTEGER",
        "ALTER TABLE workers ADD COLUMN gpus VARCHAR(64)"],
    # 4: the events' index by kind (db/models.py, Event).
    3: ["CREATE INDEX IF NOT EXISTS ix_events_kind_job ON events (kind, job_id, id)"],
}
# SQLite's READONLY and CANTOPEN: what a file or folder this process may not write gives.
SQLITE_NO_ACCESS = {8, 14}
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse.sshfs", "lustre",
                       "gpfs", "ceph", "glusterfs", "fuse.glusterfs"}


class DatabaseError(Exception):
    """The queue's database cannot be used; the message says why (password masked).

    `orig`: the driver's error behind it, when there is one (db.outage.is_transient reads
    it to tell a database that is away from one that will never work)."""

    orig: BaseException | None = None


class NoQueue(DatabaseError):
    """The SQLite queue file does not exist (nothing planned yet)."""


class NotAQueue(DatabaseError):
    """The database holds no queue: no jobs table (an empty database, or the wrong one)."""


class db_now(FunctionElement):
    """Seconds since the epoch on the database server's clock (not the worker's)."""

    type = Float()
    inherit_cache = True


@compiles(db_now, "sqlite")
def _now_sqlite(element, compiler, **kw):
    return "((julianday('now') - 2440587.5) * 86400.0)"


@compiles(db_now, "postgresql")
def _now_postgresql(element, compiler, **kw):
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


# scheme://user:PASSWORD@ where PASSWORD runs to the last '@': a password with an
# unescaped '@' (p@ss) is hidden whole, not cut at its first '@'.
_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/?#@]*:).*@", re.DOTALL)


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, safe to print (even if the URL is invalid)."""
    return _PASSWORD.sub(r"\1***@", url)


def filesystem_type(path: Path) -> str | None:
    """The mount type holding `path` (Linux /proc/mounts), or None if unknown."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    path = path.resolve()
    best, kind = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3:
            mount = parts[1].replace("\\040", " ")
            if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(
                mount
            ) > len(best):
                best, kind = mount, parts[2]
    return kind


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def normalize_url(url: str) -> str:
    """`url` as SQLAlchemy reads it; a plain file path means a SQLite file there."""
    if "://" not in url and not _SCHEME.match(url):
        return f"sqlite:///{url}"
    return url


def connect(url: str, create: bool = False, readonly: bool = False,
            one_connection: bool = False) -> Engine:
    """An engine for `url` with the schema in place.

    `create=False` refuses a SQLite file that does not exist yet, so a typo in
    a path gives an error instead of an empty queue. `readonly=True` (status,
    results, ...) creates and migrates nothing: the database must already be a
    queue of this program's schema, and every connection refuses writes.
    `one_connection=True` (a worker): PostgreSQL gets at most one connection at a time from
    this engine, whatever its threads (heartbeat, progress, the main loop) ask for: hundreds
    of workers then hold at most as many connections as there are workers.
    """
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except (exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise DatabaseError(f"invalid database URL '{mask_url(url)}'") from None
    if parsed.host and "@" in parsed.host:  # user:p@ss@host: the driver would try host "ss@host"
        raise DatabaseError(f"invalid database URL '{mask_url(url)}': write '@' in a user name "
                            "or password as %40")
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.host:  # sqlite://tmp/x.sqlite: "tmp" is read as a host name
            meant = "/".join(part for part in (parsed.host, parsed.database) if part)
            raise DatabaseError(
                f"invalid SQLite URL '{url}': a SQLite URL has no host; write "
                f"sqlite:///{meant} (three slashes before a relative path, four before an "
                "absolute one), or just the file's path")
        engine = _sqlite_engine(url, parsed.database, create, readonly)
    elif backend == "postgresql":
        # Nothing that lives in the server's session: through a pooler in transaction mode
        # (PgBouncer) each transaction may run on another server connection. So no
        # server-side prepared statements (psycopg prepares a statement after 5 runs), no
        # startup options (PgBouncer refuses them): read-only is asked per transaction.
        args: dict = {"connect_timeout": 5 if readonly else 10, "prepare_threshold": None,
                      **PG_TCP_ARGS}
        # A thread waits for the one connection at most POOL_WAIT_SECONDS: each use of it is
        # one short transaction, bounded by the connect and TCP timeouts above.
        pool = ({"pool_size": 1, "max_overflow": 0, "pool_timeout": POOL_WAIT_SECONDS}
                if one_connection else {})
        try:
            engine = create_engine(url, pool_pre_ping=True, connect_args=args, **pool)
            if readonly:
                engine = engine.execution_options(postgresql_readonly=True)
        except Exception as e:  # driver missing, bad options
            raise DatabaseError(f"cannot use '{mask_url(url)}': {e}") from None
    else:
        raise DatabaseError(
            f"unsupported database '{mask_url(url)}': use sqlite:///PATH or postgresql+psycopg://"
        )
    try:
        if readonly:
            _check_schema(engine, mask_url(url))
        else:
            _ensure_schema(engine, mask_url(url))
    # The driver's own errors too: those raised on a raw connection (SQLite's PRAGMAs, e.g.
    # "file is not a database", or a folder given as the file) are not wrapped by SQLAlchemy.
    except (exc.DBAPIError, engine.dialect.loaded_dbapi.Error) as e:
        engine.dispose()
        code = getattr(getattr(e, "orig", None) or e, "sqlite_errorcode", 0) & 0xFF
        problem = _write_problem(Path(parsed.database)) if code in SQLITE_NO_ACCESS else None
        if problem:  # a permission problem, not one of reaching the database
            error = DatabaseError(
                f"cannot {'read' if readonly else 'write to'} the queue '{mask_url(url)}': "
                f"{describe(e)} ({problem}"
                + (")" if readonly else "; status, results, plot, report, logs, serve and "
                   "export can still read it)"))
        else:
            error = DatabaseError(f"cannot reach database '{mask_url(url)}': {describe(e)}")
        error.orig = e
        raise error from None
    except DatabaseError:
        engine.dispose()
        raise
    return engine


def describe(e: BaseException) -> str:
    """The first line of a database error, plainly."""
    orig = getattr(e, "orig", None) or e
    reason = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    if "database is locked" in reason:
        reason += " (another process holds it; retry in a moment)"
    return reason


def _sqlite_engine(url: str, database: str | None, create: bool, readonly: bool) -> Engine:
    if not database or database == ":memory:":
        raise DatabaseError("a SQLite queue needs a file: sqlite:///runs/queue.sqlite")
    path = Path(database)
    if not path.exists():
        if not create:
            raise NoQueue(f"no queue at {path}: run `make plan` (or `plan --db ...`) first")
        if not path.parent.is_dir():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DatabaseError(f"cannot create the queue's folder {path.parent}: "
                                    f"{e.strerror or e}") from None
    fs = filesystem_type(path.parent)
    if fs in NETWORK_FILESYSTEMS:
        raise DatabaseError(
            f"{path} is on a network filesystem ({fs}); SQLite locking is unsafe there: "
            "keep it on local disk, or use PostgreSQL for several hosts"
        )
    busy_ms = READ_BUSY_TIMEOUT_MS if readonly else _writer_busy_ms()
    if readonly:
        # A connection per use (no pool), to the existing file only (mode=rw or ro: a file
        # deleted meanwhile is an error, never a new empty queue), so a long-lived
        # reader (status --watch, the dashboard) follows a queue that is made anew.
        def open_existing():
            return sqlite3.connect(f"file:{quote(str(path))}?{_read_mode(path)}", uri=True,
                                   timeout=busy_ms / 1000, check_same_thread=False)

        engine = create_engine(url, creator=open_existing, poolclass=NullPool)
    else:
        engine = create_engine(url, connect_args={"timeout": busy_ms / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, record):
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see below)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {busy_ms}")
        if readonly:
            cur.execute("PRAGMA query_only = ON")  # SQLite itself refuses any write
        else:
            cur.execute("PRAGMA synchronous = FULL")
            cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        options = conn.get_execution_options()
        # This transaction's patience for the lock (a quick write waits less).
        patience = min(busy_ms, options.get("busy_ms", busy_ms))
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(patience)}")
        # Writers take the lock up front: no SQLITE_BUSY on read->write upgrade.
        reading = readonly or options.get("readonly")
        conn.exec_driver_sql(f"BEGIN {'DEFERRED' if reading else 'IMMEDIATE'}")

    return engine


def _read_mode(path: Path) -> str:
    """How a command that only looks opens the SQLite file (a URI parameter).

    mode=rw where this process may write beside it, as SQLite does by default (it keeps
    the WAL index there); mode=ro where it may not write the file but the WAL files can
    be used (its folder is writable, or they are there: a copy of a live queue); else
    immutable=1 (read-only media, no WAL to read): nothing can change the file, and
    SQLite reads it without locks or a WAL index.
    """
    if os.access(path, os.W_OK) and os.access(path.parent, os.W_OK):
        return "mode=rw"
    if os.access(path.parent, os.W_OK) or Path(f"{path}-wal").exists():
        return "mode=ro"
    return "immutable=1"


def _write_problem(path: Path) -> str | None:
    """Why this process may not write the SQLite file or its folder; None when it may."""
    for target, what in ((path, "the file"), (path.parent, "its folder")):
        if target.exists() and not os.access(target, os.W_OK):
            try:
                read_only = bool(os.statvfs(target).f_flag & os.ST_RDONLY)
            except OSError:
                read_only = False
            return (f"{what} is on a read-only file system" if read_only
                    else f"no permission to write {what}")
    return None


def _writer_busy_ms() -> int:
    raw = os.environ.get(BUSY_TIMEOUT_ENV)
    if not raw:
        return BUSY_TIMEOUT_MS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1
    if not 0 < seconds <= 3600:
        raise DatabaseError(f"${BUSY_TIMEOUT_ENV}='{raw}': expected seconds, 0 < s <= 3600")
    return int(seconds * 1000)


QUEUE_TABLES = {"jobs", "meta"}  # every schema version has them


def _check_schema(engine: Engine, where: str) -> None:
    """Refuse, without writing, a database that is not a queue of this program's schema."""
    with engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
        if not QUEUE_TABLES <= tables:
            raise NotAQueue(f"'{where}' is not a queue database (it has no jobs table); "
                                "plan a sweep into it first, or check --db")
        version = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar()
    version = int(version or 0)
    if version > SCHEMA_VERSION:
        raise DatabaseError(f"database schema version {version} is newer than this program's "
                            f"({SCHEMA_VERSION}): upgrade the program")
    if version < SCHEMA_VERSION:
        raise DatabaseError(f"database schema version {version} is older than this program's "
                            f"({SCHEMA_VERSION}): a writing command (plan, worker) upgrades it "
                            "in place")


def _ensure_schema(engine: Engine, where: str) -> None:
    """Create the tables if missing; safe when several processes race to do it."""
    if engine.dialect.name == "sqlite":
        # Switch to WAL once, outside any transaction (raw connection: no
        # BEGIN is issued); the mode sticks to the file.
        raw = engine.raw_connection()
        try:
            cur = raw.cursor()
            # A SQLite file belongs to one program: never add the queue's tables (or switch
            # the journal mode) in a file that holds another program's. (A PostgreSQL
            # database may well be shared with other tables.)
            tables = {name for (name,) in cur.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and not QUEUE_TABLES <= tables:
                shown = ", ".join(sorted(tables)[:4]) + (", ..." if len(tables) > 4 else "")
                raise DatabaseError(f"'{where}' is not a queue database (it holds other "
                                    f"tables: {shown}); give a new file, or check --db")
            if cur.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cur.execute("PRAGMA journal_mode = WAL")
            cur.close()
        finally:
            raw.close()
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # One creator at a time; the others find the tables made.
            conn.execute(text("SELECT pg_advisory_xact_lock(7265431)"))
        Base.metadata.create_all(conn, checkfirst=True)
        version = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar()
        if conn.execute(select(Meta.value).where(Meta.key == QUEUE_ID_KEY)).scalar() is None:
            # The queue's identity, which its job folders record: a folder of another queue
            # (a database made anew over the same out-root) is never adopted unseen.
            conn.execute(Meta.__table__.insert().values(key=QUEUE_ID_KEY,
                                                        value=uuid.uuid4().hex))
        if version is None:  # a new database: create_all made the current schema
            conn.execute(Meta.__table__.insert().values(key="schema_version",
                                                        value=str(SCHEMA_VERSION)))
            return
        version = int(version)
        if version > SCHEMA_VERSION:
            raise DatabaseError(
                f"database schema version {version} is newer than this program's "
                f"({SCHEMA_VERSION}): upgrade the program"
            )
        # Older databases are brought forward step by step, inside this same
        # locked transaction, so rows are kept and no two processes migrate.
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                if not _adds_existing_column(conn, statement):
                    conn.execute(text(statement))
        conn.execute(update(Meta).where(Meta.key == "schema_version")
                     .values(value=str(SCHEMA_VERSION)))


def _adds_existing_column(conn, statement: str) -> bool:
    """An `ALTER TABLE t ADD COLUMN c` whose column is there already: a table that
    create_all has just made at the newest schema (it was missing in the old one)."""
    words = statement.split()
    if words[:2] != ["ALTER", "TABLE"] or words[3:5] != ["ADD", "COLUMN"]:
        return False
    return words[5] in {c["name"] for c in inspect(conn).get_columns(words[2])}


def default_url() -> str:
    return normalize_url(os.environ.get("RUNNER_DB") or "sqlite:///runs/queue.sqlite")
