"""Workers as a SLURM job array: the sbatch script, submitting it, its tasks, cancelling it.

The script `exec`s the worker, so the worker is the batch step's process itself and gets
the signals SLURM sends before a time limit (`--signal=B:SIG@GRACE`) or at a preemption.
No process has to stay alive on the submitting host: the queue is the only state.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from db.engine import _filesystem_type as filesystem_type
from runner.jobfolders import open_folder

SIGNALS = ("TERM", "USR1", "HUP")  # each makes a worker hand its job back (runner.worker)
ROOT = Path(__file__).resolve().parents[2]  # the project: `python -m runner` runs from it
LOCAL_FILESYSTEMS = {"tmpfs", "ramfs", "devtmpfs"}


class SlurmError(Exception):
    """SLURM cannot do what was asked; the message says why, in one line."""


@dataclass
class SubmitOptions:
    workers: int
    parallel: int | None = None
    partition: str | None = None
    time: str | None = None          # SLURM's form, from parse_time
    gpus_per_worker: int = 1
    cpus_per_worker: int | None = None
    mem: str | None = None
    account: str | None = None
    qos: str | None = None
    cpu: bool = False                # train on the CPU (workers get --gpu cpu)
    grace: int = 120                 # seconds between the stop signal and the time limit
    signal: str = "TERM"
    sbatch_args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)  # e.g. --lease 30


def parse_time(value: str) -> str:
    """MINUTES, HH:MM:SS or D-HH:MM:SS -> the same in SLURM's form; ValueError if neither."""
    value = value.strip()
    if re.fullmatch(r"[1-9]\d*", value):
        return value
    match = re.fullmatch(r"(?:(\d+)-)?(\d{1,2}):([0-5]\d):([0-5]\d)", value)
    if not match or not any(int(g) for g in match.groups() if g):
        raise ValueError(f"--time {value!r}: expected MINUTES, HH:MM:SS or D-HH:MM:SS, "
                         "more than zero")
    return value


def time_seconds(value: str) -> int:
    """A parse_time value in seconds."""
    if value.isdigit():
        return int(value) * 60
    days, _, clock = value.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def batch_script(opts: SubmitOptions, db_url: str, logs: Path, python: str = sys.executable,
                 shown_url: str | None = None) -> str:
    """The sbatch script of a job array of `opts.workers` worker tasks.

    `shown_url`: the URL to write in the script's comment (masked); `db_url` is what the
    workers use, passed explicitly so nothing depends on the submitting shell's $RUNNER_DB.
    """
    array = f"0-{opts.workers - 1}" + (f"%{opts.parallel}" if opts.parallel else "")
    lines = [
        "#!/bin/bash",
        f"# {opts.workers} worker(s) of the queue {shown_url or db_url}",
        "# written by `python -m runner slurm submit`",
        "#SBATCH --job-name=runner-workers",
        f"#SBATCH --array={array}",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:{opts.signal}@{opts.grace}",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={logs}/slurm-%A_%a.log",
        "#SBATCH --ntasks=1",
        "#SBATCH --nodes=1",
    ]
    if opts.gpus_per_worker:
        lines.append(f"#SBATCH --gres=gpu:{opts.gpus_per_worker}")
    for flag, value in (("cpus-per-task", opts.cpus_per_worker), ("mem", opts.mem),
                        ("partition", opts.partition), ("time", opts.time),
                        ("account", opts.account), ("qos", opts.qos)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH {arg}" for arg in opts.sbatch_args]
    # GPU 0 is the first GPU SLURM allocated: it sets CUDA_VISIBLE_DEVICES to those only.
    gpu = "cpu" if opts.cpu else "0"
    worker = [python, "-m", "runner", "--db", db_url, "worker", "--gpu", gpu,
              *opts.worker_args]
    lines += [
        "",
        f"cd {shlex.quote(str(ROOT))}",
        "# exec: the worker is this batch step's process, so SLURM's signals reach it.",
        "exec " + " ".join(shlex.quote(w) for w in worker),
        "",
    ]
    return "\n".join(lines)


def sbatch_path() -> str:
    found = shutil.which("sbatch")
    if not found:
        raise SlurmError("no `sbatch` on PATH: run this on a SLURM login node (or load its "
                         "module)")
    return found


def _run(cmd: list[str], what: str, timeout: float = 60) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmError(f"{what}: {e}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [
            f"exit status {proc.returncode}"]
        raise SlurmError(f"{what}: {tail[0].removeprefix(what + ': ')}")
    return proc.stdout


def partition_nodes(partition: str | None) -> int:
    """How many nodes the partition (default: the cluster's default one) spans."""
    cmd = ["sinfo", "-h", "-o", "%P %D"]
    if partition:
        cmd += ["-p", partition]
    total = 0
    for line in _run(cmd, "sinfo").splitlines():
        name, _, nodes = line.partition(" ")
        if partition or name.endswith("*"):
            total += int(nodes or 0)
    if partition and total == 0:
        raise SlurmError(f"--partition {partition}: no such partition (sinfo lists none)")
    return total


def check_multi_node(db_url: str, folders: list[str], nodes: int) -> None:
    """Workers on several nodes need a queue and job folders every node reaches."""
    if nodes <= 1:
        return
    if db_url.startswith("sqlite"):
        raise SlurmError(f"the partition spans {nodes} nodes, but the queue is a SQLite file "
                         "(one host only): use PostgreSQL (--db postgresql+psycopg://...; "
                         "README, 'Several machines')")
    for folder in folders:
        if open_folder(folder).on_every_host:  # a bucket: every node reaches it
            continue
        kind = filesystem_type(Path(folder))
        if kind in LOCAL_FILESYSTEMS or folder.startswith(("/tmp/", "/dev/shm/")):
            raise SlurmError(f"the partition spans {nodes} nodes, but job folder {folder} is "
                             f"on a node-local filesystem ({kind or 'tmp'}): plan with "
                             "--out-root on a shared filesystem")


def submit(script: Path) -> str:
    """`sbatch --parsable SCRIPT` -> the job id."""
    out = _run([sbatch_path(), "--parsable", str(script)], "sbatch").strip()
    job_id = out.split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch: unexpected answer {out!r}")
    return job_id


def write_script(text: str, logs: Path) -> Path:
    """The script under `logs`, named by time; private (it holds the queue's URL)."""
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / time.strftime("slurm-workers-%Y%m%d-%H%M%S.sh")
    n = 1
    while path.exists():
        n += 1
        path = path.with_name(time.strftime(f"slurm-workers-%Y%m%d-%H%M%S-{n}.sh"))
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def tasks(job_ids: list[str]) -> dict[str, list[dict]]:
    """Per launch id, its array tasks as squeue and (where accounting runs) sacct know them:
    [{'task': '123_0', 'state': 'RUNNING', 'time': '1:02', 'reason': 'vm'}, ...]."""
    found: dict[str, list[dict]] = {j: [] for j in job_ids}
    if not job_ids or not shutil.which("squeue"):
        return found
    seen: set[str] = set()
    out = _run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i|%F|%T|%M|%R"],
               "squeue")
    for line in out.splitlines():
        task, array, state, elapsed, reason = (line.split("|") + [""] * 5)[:5]
        if array in found:
            found[array].append({"task": task, "state": state, "time": elapsed,
                                 "reason": reason})
            seen.add(task)
    if shutil.which("sacct"):  # finished tasks; clusters without accounting answer nothing
        try:
            out = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o",
                        "JobID,State,Elapsed,ExitCode"], "sacct")
        except SlurmError:
            out = ""
        for line in out.splitlines():
            task, state, elapsed, code = (line.split("|") + [""] * 4)[:4]
            launch = task.split("_")[0]
            if launch in found and task not in seen and "[" not in task:
                found[launch].append({"task": task, "state": state.split()[0],
                                      "time": elapsed, "reason": f"exit {code}"})
    return found


def cancel(job_id: str, sig: str, grace: float, poll: float = 1.0) -> dict:
    """Stop a launch without losing work: its tasks not yet started are cancelled, the
    running ones get the hand-back signal and `grace` seconds to checkpoint and exit; what is
    still there then is cancelled outright. Returns counts of what happened."""
    _run(["scancel", "--state=PENDING", job_id], "scancel")
    running = [t for t in tasks([job_id])[job_id] if t["state"] in ("RUNNING", "COMPLETING")]
    if running:
        _run(["scancel", f"--signal={sig}", "--batch", job_id], "scancel")
    deadline = time.monotonic() + grace
    left = running
    while left and time.monotonic() < deadline:
        time.sleep(poll)
        left = [t for t in tasks([job_id])[job_id] if t["state"] == "RUNNING"]
    if left:
        _run(["scancel", job_id], "scancel")
    return {"signalled": len(running), "killed": len(left)}


def launch_detail(opts: SubmitOptions) -> dict:
    return {k: v for k, v in vars(opts).items() if v not in (None, [], "")}


def describe_detail(detail: dict) -> str:
    keys = ("partition", "time", "gpus_per_worker", "cpus_per_worker", "cpu", "signal", "grace")
    return ", ".join(f"{k}={json.dumps(detail[k]) if isinstance(detail[k], bool) else detail[k]}"
                     for k in keys if k in detail)
