"""The sweep's results: one row per (V, model, N), mean ± spread over the runs.

Pure functions over the queue's job dicts (`JobQueue.jobs()`) and the job
folders' files; no click, no torch. The database holds each finished job's
metrics; the folder's `eval.json` (written by the trainer before the worker
reports) is the source of truth when the two disagree, and every such case is
reported in `Results.notes`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field

from trainer.files import EVAL_FILE, read_eval

METRICS = ("accuracy", "balanced_accuracy", "majority_rate")
DB_COLUMN = {"accuracy": "test_accuracy", "balanced_accuracy": "balanced_accuracy",
             "majority_rate": "majority_rate"}
MODEL_LABELS = {"gpt2": "gpt2 (standard)", "lowrank_gpt2": "lowrank_gpt2 (low-rank)"}


@dataclass
class Results:
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- aggregation -----------------------------------------------------------------


def stats(values: list[float]) -> dict:
    """Mean, sample standard deviation (n-1; None below 2 values), min, max, n."""
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def _differs(a, b) -> bool:
    if a is None or b is None:
        return a is not b
    return not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def run_metrics(job: dict, notes: list[str], missing: list[str], read=read_eval) -> dict:
    """A succeeded job's metrics: its eval.json's, else the database's."""
    db = {k: job[DB_COLUMN[k]] for k in METRICS}
    found = read(job["out_dir"])
    if found is None:
        missing.append(job["name"])
        return db
    from_file = {k: found.get(k) for k in METRICS}
    changed = [k for k in METRICS if _differs(db[k], from_file[k])]
    if changed:
        notes.append(f"{job['name']}: the database and {EVAL_FILE} disagree on "
                     + ", ".join(f"{k} ({_num(db[k])} vs {_num(from_file[k])})" for k in changed)
                     + f"; using {EVAL_FILE}")
    return {k: from_file[k] if from_file[k] is not None else db[k] for k in METRICS}


def aggregate(jobs: list[dict], read=read_eval) -> Results:
    """One row per (V, model, N), in the order V, model (the sweep's), N.

    Finished = succeeded in the database; planned = every job of the group.
    """
    groups: dict[tuple, list[dict]] = {}
    model_order: dict[str, int] = {}
    for job in jobs:
        model_order.setdefault(job["model"], len(model_order))
        groups.setdefault((job["v"], job["model"], job["n"]), []).append(job)
    results, missing, stray = Results(), [], []
    for key in sorted(groups, key=lambda k: (k[0], model_order[k[1]], k[2])):
        v, model, n = key
        members = sorted(groups[key], key=lambda j: j["run"])
        runs = []
        for job in members:
            if job["state"] == "succeeded":
                runs.append({"run": job["run"], "name": job["name"],
                             **run_metrics(job, results.notes, missing, read)})
            elif read(job["out_dir"]) is not None:
                stray.append(f"{job['name']} ({job['state']})")
        row = {"V": v, "model": model, "N": n, "runs_planned": len(members),
               "runs_finished": len(runs),
               "runs_failed": sum(j["state"] == "failed" for j in members), "runs": runs}
        for k in METRICS:
            row[k] = stats([r[k] for r in runs if r[k] is not None])
        results.rows.append(row)
    if missing:
        results.notes.append(f"{len(missing)} finished job(s) have no readable {EVAL_FILE} here "
                             f"(folder elsewhere?); using the database's values: "
                             + _some(missing))
    if stray:
        results.notes.append(f"{len(stray)} job(s) have an {EVAL_FILE} but are not succeeded in "
                             "the database (requeued, or their result was not recorded); "
                             "not counted: " + _some(stray))
    return results


def _some(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit
                                       else "")


def _num(x) -> str:
    return "none" if x is None else f"{x:.6g}"


# --- output ----------------------------------------------------------------------


def to_json(results: Results) -> str:
    return json.dumps({"rows": results.rows, "notes": results.notes}, indent=2)


CSV_FIELDS = ["V", "model", "N", "runs_finished", "runs_planned", "runs_failed"] + [
    f"{k}_{s}" for k in METRICS for s in ("mean", "std", "min", "max")]


def to_csv(results: Results) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in results.rows:
        flat = {k: row[k] for k in CSV_FIELDS[:6]}
        for k in METRICS:
            for s in ("mean", "std", "min", "max"):
                flat[f"{k}_{s}"] = "" if row[k][s] is None else repr(row[k][s])
        writer.writerow(flat)
    return buf.getvalue()


def pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def spread(s: dict) -> str:
    """'81.2 ± 2.1 (79.0–83.3)' in percent; '-' when no run finished."""
    if not s["n"]:
        return "-"
    return f"{pct(s['mean'])} ± {pct(s['std'])} ({pct(s['min'])}–{pct(s['max'])})"


TEXT_HEADERS = ["V", "model", "N", "runs", "accuracy %", "balanced accuracy %", "majority %"]


def text_cells(row: dict) -> list[str]:
    return [str(row["V"]), row["model"], str(row["N"]),
            f"{row['runs_finished']}/{row['runs_planned']}"
            + (f" ({row['runs_failed']} failed)" if row["runs_failed"] else ""),
            spread(row["accuracy"]), spread(row["balanced_accuracy"]),
            pct(row["majority_rate"]["mean"])]


def to_text(results: Results) -> str:
    """The table a reader sees: grouped by V, then model, N ascending."""
    if not results.rows:
        return "no jobs in the queue: nothing to report (plan the sweep first)"
    rows = [text_cells(r) for r in results.rows]
    widths = [max(len(h), *(len(c[i]) for c in rows)) for i, h in enumerate(TEXT_HEADERS)]
    right = {0, 2, 3}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = ["Test-set scores in %: mean ± sample std over the finished runs (min–max).",
           "runs: finished/planned.  majority: the accuracy of always answering the more "
           "common class.",
           "balanced accuracy: the mean of the per-class recalls; any constant answer "
           "scores 50 %.",
           "", line(TEXT_HEADERS), line(["-" * w for w in widths])]
    previous = None
    for row, cells in zip(results.rows, rows, strict=True):
        if previous is not None and (row["V"], row["model"]) != previous:
            out.append("")
        previous = (row["V"], row["model"])
        out.append(line(cells))
    return "\n".join(out)
