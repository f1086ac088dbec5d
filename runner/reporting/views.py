"""What the dashboard and the report show, built from the queue and the job folders.

Torch-free and click-free. The status and results payloads are the `status
--json` and `results --json` documents themselves (runner.status.status_json,
runner.reporting.results.aggregate/to_json), passed through a `Redactor` so that nothing
shown outside this machine holds a database password or a path outside the
runs folder. Everything else (newest evaluation of running jobs, a job's
curves, events and log tail, what was run) is read here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from importlib import metadata
from pathlib import Path

import yaml

from runner.history import claims
from runner.jobfolders import local_folder
from runner.reporting.results import Results, to_json
from runner.reporting.results import what_was_run as results_what_was_run
from runner.status import snapshot, stale_reason, status_json
from trainer.files import CONFIG_FILE, LOG_FILE, METRICS_FILE, read_metrics

ROOT = Path(__file__).resolve().parent.parent
# A job name as the planner makes them (runner.planner.SAFE_NAME), bounded like the column.
JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
LOG_TAIL_BYTES = 32_000
# scheme://user:PASSWORD@ anywhere in a text (db.mask_url handles a whole URL only).
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s'\"]*:)[^\s'\"]*@")
# An absolute path of two or more parts not preceded by a word character (so not the
# path of a URL): everything but its last two parts is dropped.
_SQLITE_FILE = re.compile(r"(sqlite(?:\+\w+)?:///)(/[^\s'\"]*)")
_ABS_PATH = re.compile(r"(?<![\w.~>*/-])/(?:[\w.@+,=-]+/)+[\w.@+,=-]*")


def runs_root(out_dir: str) -> Path:
    """The runs folder (the plan's --out-root) of a job folder `<root>/<study folder>/<name>`."""
    return Path(out_dir).parent.parent


class Redactor:
    """Shows paths relative to the runs folder and masks passwords in any text.

    Job folders are shown as `<study folder>/<name>`; inside texts (errors,
    logs, event details) a runs folder becomes `<runs>`, and any other
    absolute path keeps only its last two parts (`.../trainer/train.py`).
    """

    def __init__(self, jobs: list[dict]):
        prefixes = set()
        # Each runs folder once (a sweep of 100,000 jobs has one or a few).
        for root in {runs_root(out_dir) for out_dir in {job["out_dir"] for job in jobs}}:
            for form in (str(root), os.path.abspath(root), str(root.resolve())):
                if form not in ("", ".", "/"):
                    prefixes.add(form.rstrip("/"))
        self.prefixes = sorted(prefixes, key=len, reverse=True)

    def folder(self, out_dir: str | None) -> str | None:
        if out_dir is None:
            return None
        return str(Path(out_dir).relative_to(runs_root(out_dir)))

    def text(self, value):
        if not isinstance(value, str):
            return value
        value = _URL_PASSWORD.sub(r"\1***@", value)
        value = _SQLITE_FILE.sub(lambda m: m.group(1) + self._paths(m.group(2)), value)
        return self._paths(value)

    def _paths(self, value: str) -> str:
        for prefix in self.prefixes:
            value = value.replace(prefix + "/", "<runs>/")
        return _ABS_PATH.sub(_short_path, value)

    def tree(self, value):
        """`text` applied to every string in a JSON-like value."""
        if isinstance(value, dict):
            return {k: self.tree(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.tree(v) for v in value]
        return self.text(value)


def _short_path(match: re.Match) -> str:
    parts = [p for p in match.group(0).split("/") if p]
    return ".../" + "/".join(parts[-2:]) if len(parts) > 2 else match.group(0)


# --- the documented payloads ---------------------------------------------------------


def status_payload(queue, redactor: Redactor) -> dict:
    """`status --json`, job folders relative to the runs folder, texts redacted."""
    doc = json.loads(status_json(snapshot(queue)))
    for row in doc["jobs"]:
        row["out_dir"] = redactor.folder(row["out_dir"])
    return redactor.tree(doc)


def results_payload(results: Results, redactor: Redactor) -> dict:
    """`results --json`, texts redacted."""
    return redactor.tree(json.loads(to_json(results)))


# --- newest evaluation and staleness per job -------------------------------------------


@functools.lru_cache(maxsize=4096)
def _newest_eval(path: str, mtime_ns: int, size: int) -> dict | None:
    records = read_metrics(Path(path).parent)
    for record in reversed(records):
        if "test_accuracy" in record:
            return {"step": record["step"] + 1,  # steps done when it was evaluated
                    "test_accuracy": record.get("test_accuracy"),
                    "test_balanced_accuracy": record.get("test_balanced_accuracy"),
                    "test_majority_rate": record.get("test_majority_rate")}
    return None


def newest_eval(out_dir: str) -> dict | None:
    """The newest evaluation in a job's metrics log (re-read only when the file changed)."""
    path = local_folder(out_dir) / METRICS_FILE
    try:
        st = path.stat()
    except OSError:
        return None
    return _newest_eval(str(path), st.st_mtime_ns, st.st_size)


def latest_payload(jobs: list[dict], workers: list[dict]) -> dict:
    """Per job: the newest evaluation (running jobs have no final one yet), stale or not
    (silent past its lease, or its worker on this host gone: runner.status.stale_reason)."""
    processes = {w["name"]: w["process"] for w in workers}
    return {"jobs": {j["name"]: {"eval": newest_eval(j["out_dir"]),
                                 "stale": stale_reason(j, processes) is not None,
                                 "lease_seconds": j["lease_seconds"]} for j in jobs}}


# --- one job ---------------------------------------------------------------------------


def read_tail(path: Path, max_bytes: int = LOG_TAIL_BYTES) -> tuple[str, bool]:
    """The last `max_bytes` of a text file, cut at a line start; (text, was cut)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return "", False
    cut = size > max_bytes
    if cut and b"\n" in data:
        data = data[data.index(b"\n") + 1:]
    return data.decode("utf-8", errors="replace"), cut


def job_detail(queue, job: dict, status_row: dict, redactor: Redactor) -> dict:
    """Everything the page shows for one job: its status row, config, curves, events, log."""
    events, logged = [], queue.events(job["id"])
    for event in logged:
        try:
            detail = json.loads(event["detail"]) if event["detail"] else None
        except ValueError:
            detail = event["detail"]
        events.append({"at": event["at"], "kind": event["kind"], "worker": event["worker"],
                       "attempt": event["attempt"], "detail": detail})
    log, cut = read_tail(local_folder(job["out_dir"]) / LOG_FILE)
    attempts = claims(logged, queue.workers(), job.get("lease_token"))
    return redactor.tree({
        "name": job["name"], "job": status_row, "config": job["config"], "claims": attempts,
        # as in config.yaml: a browser's JSON numbers cannot hold the 63-bit seeds exactly
        "config_yaml": yaml.safe_dump(job["config"], sort_keys=False),
        "files": {"folder": redactor.folder(job["out_dir"]), "config": CONFIG_FILE,
                  "metrics": METRICS_FILE, "log": LOG_FILE},
        "metrics": read_metrics(local_folder(job["out_dir"])), "events": events,
        "log_tail": log, "log_truncated": cut, "traceback_in_log": bool(job["traceback"]),
    })


# --- figures -------------------------------------------------------------------------

_figure_lock = threading.Lock()  # one matplotlib render at a time in a threaded server


def sample_complexity_png(results: Results) -> bytes | None:
    """runner.reporting.plot.sample_complexity as PNG bytes; None until a job has finished."""
    from runner.reporting.plot import sample_complexity

    if not any(r["runs_finished"] for r in results.rows):
        return None
    with _figure_lock, tempfile.TemporaryDirectory(prefix="runner-fig-") as tmp:
        return sample_complexity(results, Path(tmp) / "sample_complexity.png").read_bytes()


def training_curves_png(jobs: list[dict], by: list[str] = ()) -> list[tuple[str, bytes]]:
    """runner.reporting.plot.training_curves as (file name, PNG bytes), one per (V, N)."""
    from runner.reporting.plot import training_curves

    with _figure_lock, tempfile.TemporaryDirectory(prefix="runner-fig-") as tmp:
        return [(p.name, p.read_bytes()) for p in training_curves(jobs, tmp, by)]


def fingerprint(doc) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- what was run ----------------------------------------------------------------------


def what_was_run(jobs: list[dict], claims: dict[str, int] | None = None) -> dict:
    """runner.reporting.results.what_was_run, plus the grid, the workers (`claims`: see
    worker_claims) and the versions."""
    run = results_what_was_run(jobs)
    return {
        **run,
        "grid": {"V": sorted({j["v"] for j in jobs}), "N": sorted({j["n"] for j in jobs}),
                 "model": list(dict.fromkeys(j["model"] for j in jobs)),
                 "run": sorted({j["run"] for j in jobs})},
        "workers": claims or {},
        "versions": versions(),
    }


def worker_claims(queue) -> dict[str, int]:
    """Every worker that ever took a job (from the claim events), and how many attempts.

    The jobs table keeps only each job's last worker, so two workers that shared a
    sweep may leave one name there; the events keep them all.
    """
    return queue.claims_by_worker()


def versions() -> dict:
    """Versions of this environment (the one showing the sweep) and the source's commit."""
    out = {"python": sys.version.split()[0]}
    for package in ("table-connectivity-runner", "torch", "transformers", "sqlalchemy"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            out["commit"] = commit.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out

