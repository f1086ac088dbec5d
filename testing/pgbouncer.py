"""A throwaway PgBouncer in transaction-pooling mode in front of a PostgreSQL server, on a
loopback port, for the tests and the scale benchmark.

    python -m testing.pgbouncer start DIR POSTGRESQL_URL [POOL_SIZE]   # prints its URL
    python -m testing.pgbouncer stop DIR

Debian's `pgbouncer` package. As root it runs as the `postgres` user (it refuses root).
Every database of the server is reachable through it under the same name; clients
authenticate as the server's trust user.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy.engine import make_url

from testing.ports import free_port


def start(folder: Path, server_url: str, pool_size: int = 20) -> str:
    """Start PgBouncer in `folder` in front of `server_url`; its URL (same user, database
    `postgres`: swap the database name for another one)."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        raise RuntimeError("pgbouncer not found (Debian package pgbouncer)")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    server = make_url(server_url)
    port = free_port()
    (folder / "userlist.txt").write_text(f'"{server.username}" ""\n')
    (folder / "pgbouncer.ini").write_text(f"""[databases]
* = host={server.host or '127.0.0.1'} port={server.port or 5432}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {folder / 'userlist.txt'}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 2000
max_db_connections = {pool_size}
server_reset_query =
ignore_startup_parameters = extra_float_digits
logfile = {folder / 'pgbouncer.log'}
pidfile = {folder / 'pgbouncer.pid'}
""")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        for name in ("userlist.txt", "pgbouncer.ini"):
            shutil.chown(folder / name, "postgres", "postgres")
    cmd = [binary, "-d", str(folder / "pgbouncer.ini")]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pgbouncer failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server.set(host="127.0.0.1", port=port).render_as_string(
                    hide_password=False)
        time.sleep(0.1)
    raise RuntimeError(f"pgbouncer did not listen on port {port}: "
                       f"{(folder / 'pgbouncer.log').read_text()[-300:]}")


def stop(folder: Path) -> None:
    pidfile = Path(folder).resolve() / "pgbouncer.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGINT)   # immediate shutdown
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


if __name__ == "__main__":
    verb, where = sys.argv[1], Path(sys.argv[2])
    if verb == "start":
        print(start(where, sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 20))
    elif verb == "stop":
        stop(where)
    else:
        sys.exit(f"usage: {sys.argv[0]} start DIR POSTGRESQL_URL [POOL_SIZE] | stop DIR")
