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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from db.engine import filesystem_type
from runner.jobfolders import open_folder

SIGNALS = ("TERM", "USR1", "HUP")  # each makes a worker hand its job back (runner.worker)
ROOT = Path(__file__).resolve().parents[2]  # the project: `python -m runner` runs from it
LOCAL_FILESYSTEMS = {"tmpfs", "ramfs", "devtmpfs"}
# What squeue and scancel say of a job id SLURM no longer knows (ended, then purged).
FORGOTTEN = "Invalid job id specified"


class SlurmError(Exception):
    """SLURM cannot do what was asked; the message says why, in one line."""


class Refused(Exception):
    """What was asked cannot be done as given (an option, a launch not of this queue): one
    line, said before anything is written or submitted."""


@dataclass
class SubmitOptions:
    workers: int
    parallel: int | None = None
    partition: str | None = None
    time: str | None = None          # as sbatch takes it (time_seconds checks it)
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
    gpu_type: str | None = None      # --gres=gpu:TYPE:N
    workers_per_task: int = 1        # workers sharing a task's GPU (worker --processes)


TIME_FORMS = "MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_CLOCK = re.compile(r"[0-9]+(?::[0-9]+){0,2}")          # M, M:S, H:M:S
_DAYS = re.compile(r"([0-9]+)-([0-9]+)(?::([0-9]+))?(?::([0-9]+))?")  # D-H, D-H:M, D-H:M:S


def time_seconds(value: str) -> int:
    """A time limit in any form `sbatch --time` takes, in seconds (fields need not be two
    digits, nor below 60: 1:2:3 and 100:00:00 are SLURM's too); ValueError for anything
    else or for no time at all (SLURM reads 0 as no limit: leave --time out for that)."""
    value = value.strip()
    if match := _DAYS.fullmatch(value):
        days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    elif _CLOCK.fullmatch(value):
        fields = tuple(int(f) for f in value.split(":"))
        days = 0
        hours, minutes, seconds = {1: (0, *fields, 0), 2: (0, *fields), 3: fields}[len(fields)]
    else:
        days = hours = minutes = seconds = 0
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ValueError(f"--time {value!r}: expected {TIME_FORMS}, more than zero")
    return total


def batch_script(opts: SubmitOptions, db_url: str, logs: Path, python: str = sys.executable,
                 shown_url: str | None = None, root: Path = ROOT) -> str:
    """The sbatch script of a job array of `opts.workers` worker tasks.

    `shown_url`: the URL to write in the script's comment (masked); `db_url` is what the
    workers use, set explicitly so nothing depends on the submitting shell's $RUNNER_DB.
    It is exported as $RUNNER_DB inside the (private) script, never put on the worker's
    command line: every user of a node can read a process's arguments (`ps -eo args`),
    only its owner its environment.
    `root`: the checkout the tasks run `python -m runner` in.
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
        kind = f"{opts.gpu_type}:" if opts.gpu_type else ""
        lines.append(f"#SBATCH --gres=gpu:{kind}{opts.gpus_per_worker}")
    for flag, value in (("cpus-per-task", opts.cpus_per_worker), ("mem", opts.mem),
                        ("partition", opts.partition), ("time", opts.time),
                        ("account", opts.account), ("qos", opts.qos)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH {arg}" for arg in opts.sbatch_args]
    # GPU 0 is the first GPU SLURM allocated: it sets CUDA_VISIBLE_DEVICES to those only.
    gpu = "cpu" if opts.cpu else "0"
    worker = [python, "-m", "runner", "worker", "--gpu", gpu, *opts.worker_args]
    if opts.workers_per_task > 1:  # one parent passes SLURM's signals on to each of them
        worker += ["--processes", str(opts.workers_per_task)]
    lines += [
        "",
        f"cd {shlex.quote(str(root))}",
        "# The queue's URL (it may hold a password) in the environment, off the command line.",
        f"export RUNNER_DB={shlex.quote(db_url)}",
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


LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
FORCE_HINT = "; --force submits anyway"


def check_multi_node(db_url: str, folders: list[str], nodes: int, logs: Path | None = None,
                     checkout: Path = ROOT, environ: Mapping[str, str] = os.environ,
                     force: bool = False) -> None:
    """Workers on several nodes need a queue, job folders, a log folder, a checkout and an
    S3 endpoint that every node reaches. `force` skips all but the SQLite check (a path that
    looks node-local may be shared on some clusters, and a name may be every node's own
    proxy)."""
    if nodes <= 1:
        return
    if db_url.startswith("sqlite"):
        raise SlurmError(f"the partition spans {nodes} nodes, but the queue is a SQLite file "
                         "(one host only): use PostgreSQL (--db postgresql+psycopg://...; "
                         "README, 'Several machines')")
    if force:
        return
    for folder in folders:
        if open_folder(folder).on_every_host:  # a bucket: every node reaches it
            continue
        if kind := node_local(folder):
            raise SlurmError(f"the partition spans {nodes} nodes, but job folder {folder} is "
                             f"on a node-local filesystem ({kind}): plan with "
                             "--out-root on a shared filesystem" + FORCE_HINT)
    for what, path, fix in (("the log folder", logs, "give --logs on a shared filesystem"),
                            ("the checkout", checkout, "run from a checkout on a shared "
                                                       "filesystem")):
        if path is not None and (kind := node_local(str(path))):
            raise SlurmError(f"the partition spans {nodes} nodes, but {what} {path} is on a "
                             f"node-local filesystem ({kind}): {fix}" + FORCE_HINT)
    endpoints = [(f"the S3 endpoint ({name})", environ.get(name))
                 for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")]
    for what, url in [("the queue's database host", db_url), *endpoints]:
        host = url_host(url or "")
        if url == db_url and not host:  # no host: the server's socket on this machine
            host = "a local socket"
        if host in LOCAL_HOSTS or host == "a local socket":
            raise SlurmError(f"the partition spans {nodes} nodes, but {what} is {host}: each "
                             "node would reach only itself; name the host by a name every "
                             "node resolves" + FORCE_HINT)


def node_local(path: str) -> str | None:
    """The kind of node-local filesystem `path` is on (tmpfs, tmp), else None."""
    kind = filesystem_type(Path(path))
    if kind in LOCAL_FILESYSTEMS:
        return kind
    if f"{path.rstrip('/')}/".startswith(("/tmp/", "/dev/shm/", "/var/tmp/")):
        return kind or "tmp"
    return None


def url_host(url: str) -> str:
    """The host a URL names, in its netloc or a `host=` query (libpq's), lower case, without
    brackets; '' for none. A host that is a path is a Unix socket: this machine's."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:
        return ""
    for query_host in parse_qs(parts.query).get("host", [])[:1]:
        host = "a local socket" if query_host.startswith("/") else query_host.lower()
    return host


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
    if not job_ids or not shutil.which("squeue"):
        return {j: [] for j in job_ids}
    squeue = _run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i|%F|%T|%M|%R"],
                  "squeue")
    sacct = ""
    if shutil.which("sacct"):  # finished tasks; clusters without accounting answer nothing
        try:
            sacct = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o",
                          "JobID,State,Elapsed,ExitCode"], "sacct")
        except SlurmError:
            pass
    return parse_tasks(job_ids, squeue, sacct)


def parse_tasks(job_ids: list[str], squeue: str, sacct: str = "") -> dict[str, list[dict]]:
    """tasks() from squeue's `%i|%F|%T|%M|%R` lines and sacct's
    `JobID|State|Elapsed|ExitCode` lines; squeue's word wins for a task both name."""
    found: dict[str, list[dict]] = {j: [] for j in job_ids}
    seen: set[str] = set()
    for line in squeue.splitlines():
        task, array, state, elapsed, reason = (line.split("|") + [""] * 5)[:5]
        if array in found:
            found[array].append({"task": task, "state": state, "time": elapsed,
                                 "reason": reason})
            seen.add(task)
    for line in sacct.splitlines():
        task, state, elapsed, code = (line.split("|") + [""] * 4)[:4]
        launch = task.split("_")[0]
        if launch in found and task not in seen and "[" not in task:
            found[launch].append({"task": task, "state": state.split()[0],
                                  "time": elapsed, "reason": f"exit {code}"})
    return found


def live_tasks(job_id: str) -> list[dict]:
    """The launch's tasks squeue still lists (pending, running, ending), as tasks() gives
    them; [] once the launch has ended (squeue says nothing, or no longer knows the id)."""
    try:
        out = _run(["squeue", "-h", "-r", "-j", job_id, "-o", "%i|%F|%T|%M|%R"], "squeue")
    except SlurmError as e:
        if FORGOTTEN in str(e):
            return []
        raise
    return parse_tasks([job_id], out)[job_id]


def _scancel(*args: str) -> None:
    """scancel; a launch that ended meanwhile (SLURM forgot its id) is no error."""
    try:
        _run(["scancel", *args], "scancel")
    except SlurmError as e:
        if FORGOTTEN not in str(e):
            raise


def cancel(job_id: str, sig: str, grace: float, poll: float = 1.0) -> dict:
    """Stop a launch without losing work: its tasks not yet started are cancelled, the
    running ones get the hand-back signal and `grace` seconds to checkpoint and exit; what is
    still there then is cancelled outright. Returns counts of what happened."""
    _scancel("--state=PENDING", job_id)
    running = [t for t in live_tasks(job_id) if t["state"] in ("RUNNING", "COMPLETING")]
    if running:
        _scancel(f"--signal={sig}", "--batch", job_id)
    deadline = time.monotonic() + grace
    left = running
    while left and time.monotonic() < deadline:
        time.sleep(poll)
        left = [t for t in live_tasks(job_id) if t["state"] == "RUNNING"]
    if left:
        _scancel(job_id)
    return {"signalled": len(running), "killed": len(left)}


def launch_detail(opts: SubmitOptions) -> dict:
    detail = {k: v for k, v in vars(opts).items() if v not in (None, [], "")}
    if detail.get("workers_per_task") == 1:  # the usual: not worth a word in `slurm status`
        del detail["workers_per_task"]
    return detail


def describe_detail(detail: dict) -> str:
    keys = ("partition", "time", "gpus_per_worker", "gpu_type", "workers_per_task",
            "cpus_per_worker", "cpu", "signal", "grace")
    return ", ".join(f"{k}={json.dumps(detail[k]) if isinstance(detail[k], bool) else detail[k]}"
                     for k in keys if k in detail)
