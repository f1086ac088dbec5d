"""`python -m runner export --tensorboard DIR`: every job's metrics as TensorBoard runs.

One run per job, `DIR/<job name>/`, with the scalars of its metrics.jsonl
(`train/loss`, `train/accuracy`, `test/accuracy`, `test/balanced_accuracy`,
...; x = the record's `step`) and its resolved config, flattened, as hparams.

Written with tensorboardX (the `tensorboard` extra: a writer that needs only
protobuf, not TensorFlow or TensorBoard). Exporting again adds only the new
records: `DIR/.runner-export.json` remembers how many records of each job
are exported and the step of the last one. A job whose log no longer holds
that record (it was started over) has its run written anew.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from runner.jobfolders import local_folder
from trainer.files import read_metrics

STATE_FILE = ".runner-export.json"
EXTRA = "pip install -e '.[tensorboard]'"
FINAL_METRICS = ("test/accuracy", "test/balanced_accuracy")
FLUSH_SECONDS = 1
MAX_EXACT = 2**53  # larger integers (seeds) would be rounded as an hparam number: kept as text


class MissingExtra(RuntimeError):
    """The writer library is not installed; the message says how to install it."""


def _writer_class():
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise MissingExtra(
            f"export --tensorboard needs the tensorboardX package: {EXTRA}") from None
    return SummaryWriter


def tag(key: str) -> str | None:
    """The TensorBoard tag of a metrics record key (None: not a metric)."""
    if key == "step":
        return None
    if key.startswith("test_"):
        return "test/" + key[len("test_"):]
    if key.startswith("train_"):
        return "train/" + key[len("train_"):]
    return "train/" + key


def hparams(job: dict) -> dict:
    """The job's resolved config, flattened to dotted keys, plus its sweep coordinates."""
    from runner.reporting.results import flatten

    out = {"job.V": job["v"], "job.N": job["n"], "job.model": job["model"], "job.run": job["run"]}
    for key, value in flatten(job["config"]).items():
        if value is None:
            value = "none"
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= MAX_EXACT:
            value = str(value)
        elif not isinstance(value, str | int | float | bool):
            value = json.dumps(value)
        out[key] = value
    return out


class Exporter:
    """Exports the queue's jobs into `out`; call `export(jobs)` once, or repeatedly to follow."""

    def __init__(self, out: str | Path):
        self.SummaryWriter = _writer_class()
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.state_path = self.out / STATE_FILE
        try:
            self.state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            self.state = {}
        self.writers: dict = {}

    def export(self, jobs: list[dict]) -> dict[str, int]:
        """New points per job written by this call (jobs with none are left out)."""
        written = {}
        for job in jobs:
            count = self._export_job(job)
            if count:
                written[job["name"]] = count
            if job["state"] not in ("pending", "running") and job["name"] in self.writers:
                self.writers.pop(job["name"]).close()  # a finished job: nothing more to come
        if written:
            tmp = self.state_path.with_name(STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True))
            os.replace(tmp, self.state_path)
        return written

    def _export_job(self, job: dict) -> int:
        from runner.reporting.views import JOB_NAME

        name = job["name"]
        if not JOB_NAME.fullmatch(name):  # the run's folder name: never a path
            return 0
        records = read_metrics(local_folder(job["out_dir"]))
        done = self.state.get(name)
        if done and (len(records) < done["records"]
                     or records[done["records"] - 1].get("step") != done["last_step"]):
            self._restart(name)  # the job started over: its old points are not its curve
            done = None
        new = records[done["records"]:] if done else records
        if not new:
            return 0
        writer = self.writers.get(name)
        if writer is None:
            # tensorboardX writes from a thread: what is queued reaches the file within
            # FLUSH_SECONDS while the writer is open (--follow), and at once on close().
            writer = self.writers[name] = self.SummaryWriter(logdir=str(self.out / name),
                                                             flush_secs=FLUSH_SECONDS)
        if not done:
            from tensorboardX.summary import hparams as hparams_summary

            experiment, start, _end = hparams_summary(hparams(job),
                                                      {k: None for k in FINAL_METRICS})
            writer.file_writer.add_summary(experiment)
            writer.file_writer.add_summary(start)  # no end: the job may still be running
        points = 0
        wall = time.time()
        for record in new:
            for key, value in record.items():
                name_ = tag(key)
                if name_ and isinstance(value, int | float) and not isinstance(value, bool):
                    writer.add_scalar(name_, value, global_step=record["step"], walltime=wall)
                    points += 1
        writer.flush()
        self.state[name] = {"records": len(records), "last_step": records[-1].get("step")}
        return points

    def _restart(self, name: str) -> None:
        writer = self.writers.pop(name, None)
        if writer is not None:
            writer.close()
        shutil.rmtree(self.out / name, ignore_errors=True)
        self.state.pop(name, None)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
