"""`slurm submit`: check a submission against the queue and the cluster, then write the
script, submit it and record the launch in the queue.

Everything that can be refused is refused (array.Refused) before anything is written; what
SLURM itself refuses afterwards is an array.SlurmError.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from db import JobQueue, mask_url
from db.engine import normalize_url
from runner.jobfolders import BadAddress, FolderUnavailable, open_folder
from runner.slurm import array
from runner.slurm.array import Refused, SubmitOptions


def time_limit(value: str | None, grace: int) -> str | None:
    """--time in SLURM's form (None: the partition's default), checked against --grace."""
    if not value:
        return None
    try:
        seconds = array.time_seconds(value)
    except ValueError as e:
        raise Refused(str(e)) from None
    if grace >= seconds:
        raise Refused(f"--grace {grace}s is not shorter than --time {value}: the workers "
                      "would be told to stop before they start")
    return value.strip()


def check_memory(value: str | None) -> None:
    """--mem as sbatch takes it (megabytes, or K, M, G, T with an optional B, any case;
    0: all of a node's), so a typo is refused before a script is written."""
    if value is not None and not re.fullmatch(r"[0-9]+(?:[KMGT]B?)?", value, re.IGNORECASE):
        raise Refused(f"--mem {value!r}: expected a size as sbatch takes it: megabytes, or a "
                      "number with K, M, G or T (16G)")


def check_gpus(gpus_per_worker: int | None, cpu: bool, gpu_type: str | None = None) -> None:
    """A worker trains on one GPU, or on the CPU with --cpu: what else would be asked for
    would sit idle (several GPUs) or leave the worker looking for a GPU it has not got."""
    if gpus_per_worker is not None and gpus_per_worker > 1:
        raise Refused(f"--gpus-per-worker {gpus_per_worker}: a worker trains on one GPU; "
                      "ask for one per worker and more workers (--workers), or several "
                      "workers per GPU (--workers-per-gpu)")
    if gpus_per_worker == 0 and not cpu:
        raise Refused("--gpus-per-worker 0 without --cpu: the workers would look for a GPU "
                      "they were not given; add --cpu to train on the CPU")
    if gpu_type is not None and cpu:
        raise Refused(f"--gpu-type {gpu_type} with --cpu: the workers ask for no GPU")
    if gpu_type is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", gpu_type):
        raise Refused(f"--gpu-type {gpu_type!r}: expected a GPU type as the cluster names it "
                      "(letters, digits, '_', '.', '-'; e.g. a100)")


def worker_args(lease: float | None = None, db_outage: float | None = None,
                order: str | None = None, cache_dir: str | None = None) -> list[str]:
    """The worker options a submission passes on (those given)."""
    args: list[str] = []
    for option, value in (("--lease", lease), ("--db-outage", db_outage)):
        if value is not None:
            args += [option, f"{value:g}"]
    for option, value in (("--order", order), ("--cache-dir", cache_dir)):
        if value:
            args += [option, value]
    return args


def absolute_sqlite_url(url: str) -> str:
    """A SQLite URL with an absolute path: the tasks run in another folder."""
    url = normalize_url(url)
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url[len(prefix):].startswith("/"):
        path, sep, query = url[len(prefix):].partition("?")
        return prefix + str(Path(path).resolve()) + sep + query
    return url


@dataclass
class Submission:
    """A submission checked against the queue and the cluster, not made yet."""

    opts: SubmitOptions
    url: str          # the queue, as the workers reach it
    logs: Path        # the script and the tasks' logs
    unfinished: int   # jobs pending or running when it was checked

    def script(self, masked: bool = False) -> str:
        """The batch script; `masked`: with the URL's password hidden (to be shown)."""
        shown = mask_url(self.url)
        return array.batch_script(self.opts, shown if masked else self.url, self.logs,
                                  shown_url=shown)


def prepare(queue: JobQueue, url: str, opts: SubmitOptions, logs: str | None, dry_run: bool,
            note: Callable[[str], None], force: bool = False) -> Submission:
    """Check a submission; `note` hears what a dry run could not check and what was changed.
    `force`: skip the multi-node checks of paths and hosts (array.check_multi_node)."""
    # Running jobs count: one whose worker died is the new workers' to reclaim.
    pending = [j for j in queue.jobs() if j["state"] in ("pending", "running")]
    if not pending:
        raise Refused("nothing pending or running in the queue: no workers to submit "
                      "(python -m runner status)")
    first = pending[0]["out_dir"]  # beside the job folders; job folders in a bucket: runs/
    folder = Path(logs or (Path("runs/logs") if open_folder(first).on_every_host
                           else Path(first).parents[1] / "logs")).resolve()
    try:
        nodes = array.partition_nodes(opts.partition) if shutil.which("sinfo") else 1
    except array.SlurmError as e:
        if not dry_run:
            raise Refused(str(e)) from None
        # A script may be previewed where no cluster answers (a laptop, say).
        note(f"note: the partition was not checked ({e})")
        nodes = 1
    try:
        if not dry_run:
            array.sbatch_path()
        array.check_multi_node(url, sorted({j["out_dir"] for j in pending}), nodes,
                               logs=folder, force=force)
    except array.SlurmError as e:
        raise Refused(str(e)) from None
    check_buckets([j["out_dir"] for j in pending])
    # A task more than there are jobs for would only exit.
    needed = -(-len(pending) // opts.workers_per_task)
    if opts.workers > needed:
        asked = (f"{opts.workers} task(s) of {opts.workers_per_task} workers"
                 if opts.workers_per_task > 1 else f"{opts.workers} worker(s)")
        note(f"note: {asked} asked for {len(pending)} unfinished job(s): submitting {needed}")
        opts.workers = needed
    return Submission(opts, url, folder, len(pending))


def check_buckets(folders: list[str]) -> None:
    """Job folders in a bucket are written with the submitting shell's credentials, which the
    tasks inherit: probe each bucket once, as `plan` does, so that a missing or refused key
    is one line now rather than every task failing."""
    probed: set[str] = set()
    for address in folders:
        folder = open_folder(address)
        bucket = address.split("/")[2] if folder.on_every_host else ""
        if not folder.on_every_host or bucket in probed:
            continue
        probed.add(bucket)
        try:
            folder.check_root()
        except (BadAddress, FolderUnavailable) as e:
            raise Refused(f"job folder {e}") from None


def submit(queue: JobQueue, sub: Submission) -> tuple[str, Path]:
    """Write the script, submit it, record the launch: (the job id, the script)."""
    script = array.write_script(sub.script(), sub.logs)
    try:
        job_id = array.submit(script)
    except array.SlurmError as e:
        raise array.SlurmError(f"{e} (script kept: {script})") from None
    queue.record_launch("slurm", job_id, sub.opts.workers, str(script),
                        array.launch_detail(sub.opts))
    return job_id, script


def submitted_line(sub: Submission, job_id: str, script: Path) -> str:
    return (f"submitted {sub.opts.workers} worker(s) as SLURM job {job_id} for "
            f"{sub.unfinished} unfinished job(s); script {script}, logs "
            f"{sub.logs}/slurm-{job_id}_*.log")
