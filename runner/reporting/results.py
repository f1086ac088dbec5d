"""The sweep's results: one row per (config group, V, model, N), mean ± spread over the runs.

Pure functions over the queue's job dicts (`JobQueue.jobs()`) and the job
folders' files; no click, no torch. The database holds each finished job's
metrics; the folder's `eval.json` (written by the trainer before the worker
reports) is the source of truth when the two disagree, and every such case is
reported in `Results.notes`. Jobs of one (V, model, N) planned with different
configs (runner.reporting.groups) are never averaged together.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from runner.jobfolders import local_folder
from runner.reporting.groups import differing_keys, flatten, group_of, label, order_key, split_keys
from trainer.files import EVAL_FILE, read_eval

METRICS = ("accuracy", "balanced_accuracy", "majority_rate")
DB_COLUMN = {"accuracy": "test_accuracy", "balanced_accuracy": "balanced_accuracy",
             "majority_rate": "majority_rate"}
MODEL_LABELS = {"gpt2": "gpt2 (standard)", "lowrank_gpt2": "lowrank_gpt2 (low-rank)"}


@dataclass
class Results:
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    run: dict = field(default_factory=dict)      # what was run (cancelled jobs aside)
    plotted: dict = field(default_factory=dict)  # what the finished runs counted here ran
    by: list[str] = field(default_factory=list)  # the config keys that split groups
    groups: list[dict] = field(default_factory=list)  # label, config, run: one per group


# --- what was run ------------------------------------------------------------------

SIZE_KEYS = (("training", "train_steps"), ("training", "batch_size"), ("model", "n_layer"),
             ("model", "n_embd"))


def what_was_run(jobs: list[dict]) -> dict:
    """Profiles, sizes and --set overrides of the jobs, and how they differ from the study.

    "differences" compares every job's config with the study as run (the full
    profile, no overrides), key by key: empty means the results are the study's.
    """
    jobs = [j for j in jobs if isinstance(j.get("config"), dict)]

    def values(get) -> list:
        return sorted({get(j) for j in jobs}, key=str)

    differences: dict[str, set] = {}
    for job in jobs:
        study = _study_flat(job["model"], job["v"], job["n"], job["run"])
        for key, value in flatten(job["config"]).items():
            if key != "seeds.run" and study.get(key, _NONE) != value:
                differences.setdefault(key, set()).add(json.dumps(value))
    override_jobs = Counter(overrides_of(j) for j in jobs)
    out = {"jobs": len(jobs),
           "profiles": values(lambda j: j.get("profile") or "unknown"),
           "overrides": sorted(override_jobs, key=str),
           "override_jobs": dict(sorted(override_jobs.items())),
           "differences": {k: sorted(v) for k, v in sorted(differences.items())}}
    for section, key in SIZE_KEYS:
        out[key] = values(lambda j, s=section, k=key: j["config"].get(s, {}).get(k))
    out["study_as_run"] = bool(jobs) and not differences
    return out


_NONE = object()


def overrides_of(job: dict) -> str:
    """The job's --set overrides as one string ('' for none)."""
    return " ".join(json.loads(job.get("overrides") or "[]"))


@lru_cache(maxsize=1024)
def _study_flat(model: str, v: int, n: int, run: int) -> dict:
    """The study's config at these coordinates, flattened (cached: the dashboard asks often)."""
    from runner.planner import study_config
    from trainer.config import ConfigError

    try:
        return flatten(study_config({"model": model, "v": v, "n": n, "run": run}))
    except ConfigError:  # coordinates outside the study (a hand-edited sweep)
        return {}


def run_lines(run: dict) -> list[str]:
    """Two lines for a table or a figure: what was run, and whether it is the study."""
    if not run.get("jobs"):
        return []

    def one(values: list) -> str:
        return "/".join(map(str, values))

    first = (f"Run: profile {one(run['profiles'])}; {one(run['train_steps'])} steps, batch "
             f"{one(run['batch_size'])}, {one(run['n_layer'])} layers of width "
             f"{one(run['n_embd'])}; {set_line(run)}")
    if run["study_as_run"]:
        return [first, "This is the study as run (full profile, no overrides)."]
    keys = list(run["differences"])
    return [first, "NOT the study as run: differs in " + ", ".join(keys[:6])
            + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")]


def set_line(run: dict) -> str:
    """'--set: a=1 b=2', '--set: none', or, when jobs differ, which --set how many used."""
    counts = run.get("override_jobs") or {o: None for o in run["overrides"]}
    if len(counts) <= 1:
        only = next(iter(counts), "")
        return f"--set: {only or 'none'}"
    return "--set differs: " + "; ".join(
        f"{o or 'none'}" + (f" ({n} jobs)" if n is not None else "") for o, n in counts.items())


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
    found = read(local_folder(job["out_dir"]))
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


def aggregate(jobs: list[dict], read=read_eval, by: list[str] | tuple[str, ...] = ()) -> Results:
    """One row per (config group, V, model, N), in the order group, V, model (the sweep's), N.

    Groups split the jobs of one (V, model, N) by the config keys `by`, else by every
    key that differs between them (runner.reporting.groups; GroupingError for an
    unknown `by` key). Finished = succeeded in the database; planned = every job of
    the row but the cancelled ones, which are left out (and named in the notes).
    """
    kept = [j for j in jobs if j["state"] != "cancelled"]
    cancelled = [j["name"] for j in jobs if j["state"] == "cancelled"]
    keys = split_keys(kept, by)
    rows: dict[tuple, list[dict]] = {}
    group_config: dict[str, dict] = {}
    model_order: dict[str, int] = {}
    for job in kept:
        model_order.setdefault(job["model"], len(model_order))
        config = group_of(job, keys)
        name = label(config)
        group_config.setdefault(name, config)
        rows.setdefault((name, job["v"], job["model"], job["n"]), []).append(job)
    order = {g: i for i, g in enumerate(sorted(group_config,
                                                key=lambda g: order_key(group_config[g])))}
    results, missing, stray = Results(run=what_was_run(kept), by=keys), [], []
    counted = []
    for key in sorted(rows, key=lambda k: (order[k[0]], k[1], model_order[k[2]], k[3])):
        group, v, model, n = key
        members = sorted(rows[key], key=lambda j: j["run"])
        runs = []
        for job in members:
            if job["state"] == "succeeded":
                counted.append(job)
                runs.append({"run": job["run"], "name": job["name"],
                             **run_metrics(job, results.notes, missing, read)})
            elif read(local_folder(job["out_dir"])) is not None:
                stray.append(f"{job['name']} ({job['state']})")
        row = {"group": group, "config": group_config[group], "V": v, "model": model, "N": n,
               "profiles": sorted({j.get("profile") or "unknown" for j in members}),
               "overrides": sorted({overrides_of(j) for j in members}),
               "runs_planned": len(members), "runs_finished": len(runs),
               "runs_failed": sum(j["state"] == "failed" for j in members), "runs": runs}
        for k in METRICS:
            row[k] = stats([r[k] for r in runs if r[k] is not None])
        results.rows.append(row)
    results.plotted = what_was_run(counted)
    for group in sorted(group_config, key=order.get):
        members = [j for j in kept if label(group_of(j, keys)) == group]
        results.groups.append({"label": group, "config": group_config[group],
                               "run": what_was_run(members)})
    if by:
        mixed = differing_keys(kept, lambda j: (label(group_of(j, keys)), j["v"], j["model"],
                                                j["n"]))
        if mixed:
            results.notes.append("rows grouped by --by " + ", ".join(keys) + " still mix jobs "
                                 "whose configs differ in " + _some(mixed) + " (add --by for "
                                 "them, or leave --by out to split by every difference)")
    if cancelled:
        results.notes.append(f"{len(cancelled)} cancelled job(s) left out: " + _some(cancelled))
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
    return json.dumps({"run": results.run, "by": results.by, "groups": results.groups,
                       "rows": results.rows, "notes": results.notes}, indent=2)


ROW_FIELDS = ["group", "V", "model", "N", "profile", "overrides", "runs_finished",
              "runs_planned", "runs_failed"]
CSV_FIELDS = ROW_FIELDS + [f"{k}_{s}" for k in METRICS for s in ("mean", "std", "min", "max")]


def to_csv(results: Results) -> str:
    """One line per row; `group` the config keys that split it, `profile` and `overrides`
    (--set, space-separated) what its jobs were planned with ('|' between several)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in results.rows:
        flat = {k: row[k] for k in ROW_FIELDS if k in row}
        flat["profile"] = " | ".join(row["profiles"])
        flat["overrides"] = " | ".join(row["overrides"])
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


def group_heading(group: dict) -> str:
    """'config training.learning_rate=0.0003: profile smoke, --set: ... (6 jobs)'."""
    run = group["run"]
    return (f"config {group['label']}: profile {'/'.join(run['profiles'])}, {set_line(run)} "
            f"({run['jobs']} jobs)")


def to_text(results: Results) -> str:
    """The table a reader sees: by config group (when jobs differ), V, then model, N ascending."""
    if not results.rows:
        return "no jobs in the queue: nothing to report (plan the sweep first)"
    rows = [text_cells(r) for r in results.rows]
    widths = [max(len(h), *(len(c[i]) for c in rows)) for i, h in enumerate(TEXT_HEADERS)]
    right = {0, 2, 3}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    split = len(results.groups) > 1
    out = [*run_lines(results.run), "",
           "Test-set scores in %: mean ± sample std over the finished runs (min–max).",
           "runs: finished/planned.  majority: the accuracy of always answering the more "
           "common class.",
           "balanced accuracy: the mean of the per-class recalls; any constant answer "
           "scores 50 %."]
    if split:
        out.append("Rows are split by config (the keys " + ", ".join(results.by)
                   + "): runs of different configs are never averaged together.")
    out += ["", line(TEXT_HEADERS), line(["-" * w for w in widths])]
    headings = {g["label"]: group_heading(g) for g in results.groups}
    previous = None
    for row, cells in zip(results.rows, rows, strict=True):
        if split and (previous is None or row["group"] != previous[0]):
            out += ([""] if previous is not None else []) + [headings[row["group"]]]
        elif previous is not None and (row["V"], row["model"]) != previous[1:]:
            out.append("")
        previous = (row["group"], row["V"], row["model"])
        out.append(line(cells))
    return "\n".join(out)
