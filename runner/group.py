"""`worker --processes K`: K worker processes sharing one device, under one parent.

Small jobs leave a GPU mostly idle; several workers on it keep it busy. Each member is an
ordinary worker (`worker ... --processes 1`): it registers, claims and trains on its own, and
hands its job back on a stop signal. The parent only starts them, passes on the signals it
gets (Ctrl-C, and what SLURM sends before a time limit or a preemption), and waits for them.
The members run in a session of their own, so a Ctrl-C on the terminal reaches each once,
through the parent.

Under SLURM a stopped worker requeues its own task while work is left; in a group the task
is the parent's, so the members leave that to it and it asks once, after the last member
has handed its job back (a requeue ends every process of the task).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable

from runner.slurm.task import HAND_BACK_SIGNALS

MEMBER = "RUNNER_WORKER_GROUP"  # set in a member's environment: the group's size
PASSED_ON = (signal.SIGINT, *HAND_BACK_SIGNALS)


def is_member() -> bool:
    return bool(os.environ.get(MEMBER))


def threads_each(processes: int, cpus: int | None) -> int:
    """Each member's share of the CPUs (SLURM's allocation, else this process's affinity):
    without it every member would start a thread per core."""
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
    return max(1, cpus // processes)


def run_group(processes: int, member_args: list[str],
              when_stopped: Callable[[], None] = lambda: None) -> int:
    """Run `processes` members (`python -m runner` with `member_args`) until each exits;
    `when_stopped` runs once after them if a stop signal came. The exit status: 0 when every
    member exited 0, else the highest member's (a signal's as 128 + its number)."""
    command = [sys.executable, "-m", "runner", *member_args]
    env = {**os.environ, MEMBER: str(processes)}
    members: list[subprocess.Popen] = []
    stopped: list[int] = []

    def pass_on(signum, frame):
        stopped.append(signum)
        for member in members:
            if member.poll() is None:
                member.send_signal(signum)

    def unblocked() -> None:  # in the member, before it runs: its own signals as usual
        signal.pthread_sigmask(signal.SIG_UNBLOCK, PASSED_ON)

    previous = {signum: signal.signal(signum, pass_on) for signum in PASSED_ON}
    try:
        for _ in range(processes):
            if stopped:  # a signal while starting: no more members
                break
            # Held while a member starts, so that each signal reaches every member started.
            signal.pthread_sigmask(signal.SIG_BLOCK, PASSED_ON)
            try:
                members.append(subprocess.Popen(command, env=env, start_new_session=True,
                                                preexec_fn=unblocked))
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, PASSED_ON)
        codes = [member.wait() for member in members]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stopped:
        when_stopped()
    return max((128 - code if code < 0 else code for code in codes), default=0)
