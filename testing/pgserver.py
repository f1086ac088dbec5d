"""A throwaway PostgreSQL cluster on a loopback port, for the tests and CI.

    python -m testing.pgserver start DIR   # prints the server's URL
    python -m testing.pgserver stop DIR
    python -m testing.pgserver restart DIR [fast|immediate|smart]   # same port, same data

Uses the installed server binaries (Debian: /usr/lib/postgresql/*/bin). As
root, the cluster runs as the `postgres` user, since PostgreSQL refuses root.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from testing.ports import free_port

USER = "runner"


def find_binary(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def start(folder: Path, netns: str | None = None, max_connections: int = 200) -> str:
    """Create and start a cluster in `folder`; return a SQLAlchemy URL to it.

    `max_connections`: the server's limit (the benchmarks run hundreds of workers, or
    fewer connections than workers on purpose).

    `netns`: the server runs in that network namespace (`ip netns`): its TCP port is
    reachable only there; its socket in `folder` (socket_url) from anywhere.
    """
    initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
    if not initdb or not pg_ctl:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    _run([initdb, "-D", str(data), "-U", USER, "--auth=trust", "--no-sync", "-E", "UTF8"])
    # fsync off: a throwaway test server; max_connections for many worker processes.
    options = (f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off "
               f"-c max_connections={max_connections}")
    (folder / "options").write_text(options)
    if netns:
        (folder / "netns").write_text(netns)
    _start(folder)
    (folder / "url").write_text(url_for(port))
    return url_for(port)


def _run(cmd: list[str], netns: str | None = None) -> None:
    cmd = _as_server_user(cmd)
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        raise RuntimeError(f"{Path(cmd[0]).name} failed: {' '.join(tail)}")


def _start(folder: Path) -> None:
    folder = Path(folder).resolve()
    netns = (folder / "netns").read_text() if (folder / "netns").exists() else None
    _run([find_binary("pg_ctl"), "-D", str(folder / "data"), "-o",
          (folder / "options").read_text(), "-l", str(folder / "server.log"), "-w", "start"],
         netns)


def socket_url(folder: Path, database: str = "postgres") -> str:
    """A URL to the cluster of `folder` through its Unix socket (from any network namespace)."""
    folder = Path(folder).resolve()
    port = re.search(r"-p (\d+)", (folder / "options").read_text()).group(1)
    return f"postgresql+psycopg://{USER}@/{database}?host={folder}&port={port}"


def shutdown(folder: Path, mode: str = "fast") -> None:
    """Stop the cluster of `folder` and wait until it is down: `fast` (clients are told
    "terminating connection due to administrator command"), `immediate` (the server quits
    without a checkpoint, as in a crash: recovery runs at the next start) or `smart`."""
    _run([find_binary("pg_ctl"), "-D", str(Path(folder).resolve() / "data"), "-m", mode, "-w",
          "stop"])


def start_again(folder: Path) -> None:
    """Start the stopped cluster of `folder` again: same data, same port."""
    _start(folder)


def url_for(port: int, database: str = "postgres") -> str:
    return f"postgresql+psycopg://{USER}@127.0.0.1:{port}/{database}"


def stop(folder: Path) -> None:
    pg_ctl = find_binary("pg_ctl")
    data = Path(folder).resolve() / "data"
    if pg_ctl and data.exists():
        subprocess.run(_as_server_user([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)


if __name__ == "__main__":
    verb, where = sys.argv[1], Path(sys.argv[2])
    if verb == "start":
        print(start(where, max_connections=int(sys.argv[3]) if len(sys.argv) > 3 else 200))
    elif verb == "stop":
        stop(where)
    elif verb == "restart":
        shutdown(where, sys.argv[3] if len(sys.argv) > 3 else "fast")
        start_again(where)
    else:
        sys.exit(f"usage: {sys.argv[0]} start DIR [MAX_CONNECTIONS] | stop DIR | "
                 "restart DIR [fast|immediate|smart]")
