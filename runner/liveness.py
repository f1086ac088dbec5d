"""Is a worker process on this host still alive? (Linux /proc; a plain pid check elsewhere.)

A worker is named `host:gpu:pid` and records its process identity when it
starts: the boot id and the process's start time. A pid that no longer exists,
or that now belongs to another process (reused after the worker died, or after
a reboot), means the worker is dead and its job can be taken at once.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

HOST = socket.gethostname()


def process_token(pid: int) -> str | None:
    """'<boot id>:<start time in clock ticks>' of a live process, or None if unknown/gone."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) counts after the command name, which may hold spaces: split after ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return f"{boot}:{fields[19]}"


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_reason(worker: str, recorded: str | None) -> str | None:
    """Why the worker `host:gpu:pid` of this host is dead, or None if it may be alive."""
    try:
        pid = int(worker.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None
    if pid == os.getpid():
        return None
    if not _pid_exists(pid):
        return f"its process {pid} is gone"
    if recorded is not None:
        now = process_token(pid)
        if now is not None and now != recorded:
            return f"pid {pid} now belongs to another process"
    return None
