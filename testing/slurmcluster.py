"""A throwaway single-node SLURM cluster, for the tests and CI.

    python -m testing.slurmcluster start DIR   # prints the SLURM_CONF path to export
    python -m testing.slurmcluster stop DIR

Debian's packages (slurmctld, slurmd, slurm-client, munge) run as plain daemons: no
systemd, no cgroups, no accounting. The node has two fake GPUs (/dev/tty0 and /dev/tty1
stand in as device files), so an array task asking for `--gres=gpu:1` gets
CUDA_VISIBLE_DEVICES=0 or 1. Two partitions give real preemption: `low` (the default)
and `high`, whose jobs requeue the low ones they need room from (PreemptMode=REQUEUE).
A third partition, `multi`, spans that node and `ghost`, a node that is down for good: what
a multi-node cluster looks like to `sinfo`. Every client command finds the cluster through
$SLURM_CONF.
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

from testing.ports import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
NODE_CPUS = 4  # more than the machine's 2 cores: tests run a few 1-thread tasks at once
GPUS = 2


def _config(folder: Path, node: str) -> str:
    ctld, slurmd, ghost = free_port(), free_port(), free_port()
    return f"""\
ClusterName=runnertest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={slurmd}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
GresTypes=gpu
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
KillWait=30
MinJobAge=600
ReturnToService=2
SlurmdParameters=config_overrides
MpiDefault=none
NodeName={node} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} Gres=gpu:{GPUS} State=UNKNOWN
NodeName=ghost NodeAddr=127.0.0.1 Port={ghost} CPUs=1 State=DOWN
PartitionName=low Nodes={node} Default=YES MaxTime=INFINITE PriorityTier=1 GraceTime=30 State=UP
PartitionName=high Nodes={node} MaxTime=INFINITE PriorityTier=10 State=UP
PartitionName=multi Nodes={node},ghost MaxTime=INFINITE PriorityTier=1 State=UP
"""


def start(folder: Path) -> str:
    """Start munge, slurmctld and slurmd with their files in `folder`; return SLURM_CONF."""
    for binary in ("munged", "slurmctld", "slurmd", "sbatch"):
        if not shutil.which(binary):
            raise RuntimeError(f"{binary} not found (Debian: slurmctld slurmd slurm-client "
                               "munge)")
    folder = Path(folder).resolve()
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    node = socket.gethostname().split(".")[0]
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = folder / "slurm.conf"
    conf.write_text(_config(folder, node))
    # Fake GPUs: any two device files do; SLURM only needs something to hand out.
    (folder / "gres.conf").write_text(
        f"AutoDetect=off\nNodeName={node} Name=gpu File=/dev/tty[0-{GPUS - 1}]\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    _run(["munged", "--force", f"--key-file={key}", f"--socket={folder}/munge.socket",
          f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log",
          f"--seed-file={folder}/munged.seed"], env)
    # Debian's alternatives names: the -wlm binaries called directly drop the GRES.
    _run(["slurmctld", "-i", "-f", str(conf)], env)
    _run(["slurmd", "-f", str(conf)], env)
    _wait_for_idle_node(env, folder, node)
    return str(conf)


def _run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        raise RuntimeError(f"{cmd[0]} failed: {' '.join(tail)}")


def _wait_for_idle_node(env: dict, folder: Path, node: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        proc = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], env=env, capture_output=True,
                              text=True)
        state = proc.stdout.strip()
        if proc.returncode == 0 and state.startswith("idle"):
            return
        time.sleep(0.5)
    log = (folder / "slurmctld.log")
    tail = log.read_text().strip().splitlines()[-3:] if log.exists() else []
    raise RuntimeError(f"the SLURM node did not come up (state {state or 'unknown'!r}): "
                       + " | ".join(tail))


def stop(folder: Path) -> None:
    """Cancel every job, then stop the daemons of `folder` (slurmd, slurmctld, munged)."""
    folder = Path(folder).resolve()
    conf = folder / "slurm.conf"
    if conf.exists():
        subprocess.run(["scancel", "--full", "--signal=KILL", "--user", "root"],
                       env={**os.environ, "SLURM_CONF": str(conf)}, capture_output=True)
    for daemon in reversed(DAEMONS):
        pid_file = folder / f"{daemon}.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            continue
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.1)


if __name__ == "__main__":
    verb, where = sys.argv[1], Path(sys.argv[2])
    if verb == "start":
        print(start(where))
    elif verb == "stop":
        stop(where)
    else:
        sys.exit(f"usage: {sys.argv[0]} start|stop DIR")
