"""Progress: step rates, ETAs, and the worker's display of the job it runs.

No torch, no database access: the rate functions take the queue's job dicts
plus, for each job, the step its current attempt started from (the `claim`
event's step; see `db.queue.JobQueue.attempt_starts`).
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import sys
import time
from typing import TextIO

# --- formatting ------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """12s, 4m05s, 3h07m, 2d04h; 'unknown' for None."""
    if seconds is None:
        return "unknown"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def bar(fraction: float, width: int = 12) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


# --- measured step rates and the sweep's ETA ----------------------------------------


def attempt_rate(job: dict, start_step: int | None) -> float | None:
    """Steps per second of the job's current (or last) attempt, or None if unmeasured.

    Succeeded: the attempt's steps / seconds from claim to finish. Otherwise
    (running, or an attempt that was handed back or failed): steps done since
    the claim / seconds from the claim to its last progress write. Both include
    the attempt's start-up (data, model), so short jobs read slower.
    """
    if start_step is None or job["claimed_at"] is None:
        return None
    if job["state"] == "succeeded":
        steps, end = job["total_steps"] - start_step, job["finished_at"]
    else:
        steps, end = job["step"] - start_step, job["progress_at"]
    if end is None or steps <= 0 or end <= job["claimed_at"]:
        return None
    return steps / (end - job["claimed_at"])


def live_workers(jobs: list[dict]) -> set[str]:
    """Workers holding a running job with a heartbeat younger than its lease."""
    return {j["worker"] for j in jobs if j["state"] == "running" and j["worker"]
            and j["heartbeat_age"] is not None
            and j["heartbeat_age"] <= (j["lease_seconds"] or 60)}


def sweep_progress(jobs: list[dict], starts: dict[int, int],
                   workers_alive: int | None = None, unclaimed: list[dict] = ()) -> dict:
    """Steps done, per-job rates and ETAs, and the sweep's ETA.

    `jobs`: a row each; `unclaimed`: pending jobs never claimed (at step 0), counted by
    (v, model, total_steps, cost) as JobQueue.unclaimed_pending gives them: they have no
    rate of their own, so a count does for each group, and 100,000 pending jobs need no row
    each.

    The ETA, kept simple on purpose:
      * each unfinished job (pending or running; failed jobs wait for a requeue
        and are not counted) has `total_steps - step` steps left;
      * its rate is its own live rate when it is running and has one, else the
        median measured rate of the same (V, model) -- a step costs the same
        whatever N, which only sizes the data pool -- else the median over all
        measured jobs, scaled by the planner's per-step compute estimate
        (`cost / total_steps`);
      * the sweep's ETA is the summed seconds left divided by the number of live
        workers (`workers_alive`, from the worker registry; else the workers of
        running jobs with a fresh heartbeat), assuming they keep working in
        parallel at the rates seen.
    None (shown "unknown") when no rate has been measured or no worker is alive.
    """
    rates = {j["id"]: attempt_rate(j, starts.get(j["id"])) for j in jobs}
    by_group: dict[tuple, list[float]] = {}
    cost_rates = []   # compute units per second
    for j in jobs:
        if rates[j["id"]]:
            by_group.setdefault((j["v"], j["model"]), []).append(rates[j["id"]])
            cost_rates.append(rates[j["id"]] * _cost_per_step(j))
    left = [j for j in jobs if j["state"] in ("pending", "running")]
    seconds, unknown = 0.0, 0
    job_eta = {}
    # Each median once, not once per job left (100,000 jobs: most of status's time).
    group_rate = {group: statistics.median(found) for group, found in by_group.items()}
    cost_rate = statistics.median(cost_rates) if cost_rates else None
    for j in left:
        rate = rates[j["id"]] if j["state"] == "running" else None
        if not rate:
            rate = group_rate.get((j["v"], j["model"]))
        if not rate and cost_rate and _cost_per_step(j):
            rate = cost_rate / _cost_per_step(j)
        if not rate:
            unknown += 1
            continue
        steps_left = max(0, j["total_steps"] - j["step"])
        seconds += steps_left / rate
        if j["state"] == "running" and not j.get("stale"):
            job_eta[j["id"]] = steps_left / rate
    for group in unclaimed:
        rate = group_rate.get((group["v"], group["model"]))
        if not rate and cost_rate and _cost_per_step(group):
            rate = cost_rate / _cost_per_step(group)
        if not rate:
            unknown += group["jobs"]
            continue
        seconds += group["jobs"] * group["total_steps"] / rate
    workers = len(live_workers(jobs)) if workers_alive is None else workers_alive
    done = sum(j["total_steps"] if j["state"] == "succeeded" else min(j["step"], j["total_steps"])
               for j in jobs)
    total = sum(j["total_steps"] for j in jobs) + sum(group["jobs"] * group["total_steps"]
                                                       for group in unclaimed)
    jobs_left = len(left) + sum(group["jobs"] for group in unclaimed)
    if not jobs_left:
        eta = 0.0
    elif unknown or not workers:
        eta = None
    else:
        eta = seconds / workers
    return {"steps_done": done, "steps_total": total, "jobs_left": jobs_left,
            "live_workers": workers, "work_seconds_left": None if unknown else seconds,
            "eta_seconds": eta, "rates": rates, "job_eta": job_eta,
            "rates_measured": sum(1 for r in rates.values() if r),
            "failed_diverged": sum(1 for j in jobs if j["state"] == "failed" and diverged(j))}


# The trainer's error for a loss that is no longer finite (trainer/train.py). Training is
# seeded, so the same config diverges again at the same step: a requeue cannot help.
_DIVERGED = re.compile(r"\bloss became (?:nan|-?inf)\b")


def diverged(job: dict) -> bool:
    """The job failed because its loss became NaN or infinite."""
    return bool(_DIVERGED.search(job.get("error") or ""))


def failed_advice(failed: int, diverged_count: int) -> str:
    """What to do about `failed` jobs, `diverged_count` of them by a NaN or infinite loss."""
    change = ("change the config (e.g. a smaller training.learning_rate): plan again as "
              "before with --replace --set KEY=VALUE")
    if not diverged_count:
        return "requeue --failed"
    if diverged_count == failed:
        return f"their loss diverged (NaN), as it would again with the same config: {change}"
    return (f"{diverged_count} of them diverged (NaN loss), as they would again with the same "
            f"config: {change}; the others: requeue --failed")


def _cost_per_step(job: dict) -> float:
    return (job.get("cost") or 0.0) / job["total_steps"] if job["total_steps"] else 0.0


def eta_line(p: dict, counts: dict[str, int]) -> str:
    frac = p["steps_done"] / p["steps_total"] if p["steps_total"] else 0.0
    head = f"progress {p['steps_done']}/{p['steps_total']} steps ({100 * frac:.1f}%)"
    if not p["jobs_left"]:
        if counts.get("failed"):
            return (head + f", nothing left to run but {counts['failed']} job(s) failed: "
                    "see below, then "
                    + failed_advice(counts["failed"], p.get("failed_diverged", 0)))
        return head + ", sweep finished"
    if p["work_seconds_left"] is None:
        if p["rates_measured"]:
            return head + ", ETA unknown (no step-cost estimate for some jobs)"
        return head + ", ETA unknown (no step rate measured yet)"
    work = f"{duration(p['work_seconds_left'])} of work left for one worker"
    if not p["live_workers"]:
        return head + f", ETA unknown: no live worker ({work})"
    return (head + f", ETA {duration(p['eta_seconds'])} with {p['live_workers']} live "
            f"worker(s) ({work}, from measured step rates)")


# --- the worker's display of its job -----------------------------------------------


class JobDisplay:
    """Progress of one job: a tqdm bar on a terminal, else a log line every `every` s.

    The log lines (and the last step's) read:
    `NAME: step 120/1001 (12%), loss 0.4567, 3.20 steps/s, ETA 4m35s`.
    """

    def __init__(self, name: str, total: int, initial: int, log: logging.Logger,
                 every: float = 30.0, stream: TextIO | None = None):
        self.name, self.total, self.log, self.every = name, total, log, every
        self.stream = stream if stream is not None else sys.stderr
        self.start_step, self.start_time = initial, time.monotonic()
        self.last_line = self.start_time
        self.bar = None
        if _isatty(self.stream):
            from tqdm import tqdm

            sized = _columns(self.stream) > 0  # a pty may report 0x0: tqdm then hides the bar
            self.bar = tqdm(total=total, initial=initial, desc=name, unit="step",
                            file=self.stream, dynamic_ncols=sized, ncols=None if sized else 100,
                            nrows=None if sized else 20, leave=False, smoothing=0.1,
                            mininterval=0.5)

    def update(self, step: int, loss: float | None) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str("" if loss is None else f"loss {loss:.4f}", refresh=False)
            self.bar.update(step - self.bar.n)
            return
        now = time.monotonic()
        if now - self.last_line >= self.every or step >= self.total:
            self.last_line = now
            self.log.info("%s", self.line(step, loss, now))

    def line(self, step: int, loss: float | None, now: float) -> str:
        elapsed = now - self.start_time
        rate = (step - self.start_step) / elapsed if elapsed > 0 else None
        eta = (self.total - step) / rate if rate else None
        return (f"{self.name}: step {step}/{self.total} ({100 * step / self.total:.0f}%)"
                + ("" if loss is None else f", loss {loss:.4f}")
                + ("" if rate is None else f", {rate:.2f} steps/s")
                + ("" if step >= self.total else f", ETA {duration(eta)}"))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0

