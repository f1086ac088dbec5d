"""A job folder's file names and plain readers, importable without torch.

The trainer writes these files (trainer/checkpoint.py); the runner reads them
for results, figures and logs without paying for a torch import.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

CONFIG_FILE = "config.yaml"
STATE_DIR = "state"
SNAPSHOT_DIR = "snapshots"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
LOG_FILE = "train.log"
LOCK_FILE = ".lock"


def read_metrics(out_dir: str | Path) -> list[dict]:
    """A job's metrics log; a torn last line (a job killed mid-write) is dropped."""
    try:
        lines = (Path(out_dir) / METRICS_FILE).read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def read_eval(out_dir: str | Path) -> dict | None:
    """A job's final evaluation, or None when the file is missing or unreadable."""
    try:
        data = json.loads((Path(out_dir) / EVAL_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def append_log(out_dir: str | Path, message: str, prefix: str = "") -> None:
    """Append `message` to the job's log, one timestamped line per line of it.

    The trainer and the worker both write here, in one format, so the file
    reads in order across attempts.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    lines = message.rstrip("\n").splitlines() or [""]
    with open(Path(out_dir) / LOG_FILE, "a") as f:
        f.writelines(f"{stamp} {prefix}{line}\n" for line in lines)
