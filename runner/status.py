"""The status report: counts, sweep progress and ETA, workers, running jobs, failed jobs."""

from __future__ import annotations

import dataclasses
import json

from db.queue import worker_host
from runner.liveness import HOST, dead_reason
from runner.progress import bar, duration, eta_line, sweep_progress

# stop_request on an ended job: a cancel that came too late (the job finished first).
JOB_FIELDS = ("name", "state", "v", "n", "model", "run", "attempts", "step", "total_steps",
              "loss", "worker", "heartbeat_age", "test_accuracy", "balanced_accuracy",
              "majority_rate", "error", "out_dir", "stop_request")
RUNNING_FIELDS = ("peak_memory",)
# The table lists this many failed jobs at most (a sweep of 100,000 jobs stays readable);
# `status --state failed` lists them all.
FAILED_SHOWN = 20


# What the ETA, the liveness check and the summary lines read of every job ever claimed (the
# others are counted in SQL); the jobs a report lists are read whole. At 100,000 jobs,
# reading every column of every job was most of status's time.
PROGRESS_COLUMNS = ("name", "state", "v", "model", "step", "total_steps", "cost", "worker",
                    "claimed_at", "progress_at", "finished_at", "heartbeat_at", "lease_seconds",
                    "stop_request", "error")
# What the status table lists when no listing is asked for (the failed jobs capped in it).
TABLE_STATES = ("running", "failed")


@dataclasses.dataclass(frozen=True)
class Listing:
    """Which jobs a report lists: those in `states` (all when empty), a page of them."""

    states: tuple[str, ...] = ()
    limit: int | None = None
    offset: int = 0

    def read(self, queue, configs: bool = False) -> list[dict]:
        """This listing's jobs, read whole (their configs too with `configs`)."""
        return queue.jobs(config=configs, states=self.states, offset=self.offset,
                          limit=self.limit)

    def matched(self, jobs: list[dict], unclaimed: list[dict]) -> int:
        """How many jobs the filter matches, the page aside: of `jobs` (a row each) and of
        `unclaimed` (pending jobs never claimed, summed)."""
        pending = sum(group["jobs"] for group in unclaimed)
        if not self.states:
            return len(jobs) + pending
        return (sum(1 for j in jobs if j["state"] in self.states)
                + (pending if "pending" in self.states else 0))


WORKER_FIELDS = ("name", "device", "state", "job", "seen_age", "alive", "dead", "gpus",
                 "slurm_job_id", "slurm_array", "slurm_restarts")


def stale_reason(job: dict, processes: dict[str, str | None]) -> str | None:
    """Why a running job's worker looks gone: silent past its lease, or dead on this host."""
    if job["state"] != "running":
        return None
    if worker_host(job["worker"]) == HOST:
        reason = dead_reason(job["worker"], processes.get(job["worker"]))
        if reason:
            return f"worker dead: {reason}"
    age, lease = job["heartbeat_age"], job["lease_seconds"]
    if age is not None and lease is not None and age > lease:
        return f"no heartbeat for {duration(age)} (lease {duration(lease)})"
    return None


def judge_workers(workers: list[dict]) -> list[dict]:
    """The registry's workers with the liveness rule their jobs get: one of this host whose
    process is gone is not alive (`dead` says why), however recently it was seen."""
    for w in workers:
        w["dead"] = (dead_reason(w["name"], w["process"])
                     if w["state"] != "exited" and worker_host(w["name"]) == HOST else None)
        if w["dead"]:
            w["alive"] = False
    return workers


def snapshot(queue, listing: Listing | None = Listing(), configs: bool = False) -> dict:
    """Everything a status report shows, read once (a few queries, whatever the job count):
    `jobs`, the listing's jobs read whole (`configs`: their configs and tracebacks too, as
    the report shows what was run), or with no listing those the status table shows (the
    running and failed ones); `every`, a few columns (PROGRESS_COLUMNS) of every job but the
    pending ones never claimed, which `unclaimed` sums."""
    counts = queue.counts()
    every = queue.jobs(config=False, columns=PROGRESS_COLUMNS, claimed=True)
    unclaimed = queue.unclaimed_pending()
    jobs = (listing.read(queue, configs) if listing is not None
            else queue.jobs(config=False, states=TABLE_STATES))
    workers = judge_workers(queue.workers())
    processes = {w["name"]: w["process"] for w in workers}
    for job in every:
        job["stale"] = stale_reason(job, processes)
    stale = {job["id"]: job["stale"] for job in every if job["stale"]}
    for job in jobs:   # a running job is in both: its process is looked at once
        job["stale"] = stale.get(job["id"])
    starts = queue.attempt_starts()
    live = [w for w in workers if w["alive"]]
    return {"counts": counts, "jobs": jobs, "every": every, "listing": listing,
            "matched": len(jobs) if listing is None else listing.matched(every, unclaimed),
            "workers": workers, "paused": queue.paused(),
            "progress": sweep_progress(every, starts, workers_alive=len(live),
                                       unclaimed=unclaimed)}


def status_json(snap: dict) -> str:
    """The `status --json` document. `jobs` holds the listing's page; `jobs_matched` says how
    many jobs its filter matched, to page through them."""
    p = snap["progress"]
    out = []
    for job in snap["jobs"]:
        row = {k: job[k] for k in JOB_FIELDS}
        if job["state"] == "running":
            row.update({k: job[k] for k in RUNNING_FIELDS})
            row["stale"] = job["stale"]
            row["elapsed_seconds"] = job["claimed_age"]
            row["steps_per_second"] = p["rates"].get(job["id"])
            row["eta_seconds"] = p["job_eta"].get(job["id"])
        out.append(row)
    progress = {k: p[k] for k in ("steps_done", "steps_total", "jobs_left", "live_workers",
                                  "work_seconds_left", "eta_seconds")}
    progress["summary"] = eta_line(p, snap["counts"])  # status's own line, for the dashboard
    # Every worker that registered, those that exited too (state "exited"): which SLURM task
    # ran what stays readable after the array ended.
    workers = [{k: w[k] for k in WORKER_FIELDS} for w in snap["workers"]]
    return json.dumps({"counts": snap["counts"], "paused": snap["paused"] is not None,
                       "progress": progress, "workers": workers,
                       "jobs_matched": snap["matched"], "jobs": out}, indent=2)


def text_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def status_text(snap: dict, where: str) -> str:
    """The status table: counts, ETA, workers, then the running jobs, the first failed ones,
    late cancels and cancelled jobs; with a listing that names states or a page, the jobs of
    that listing instead of the running and failed tables."""
    counts, jobs, p = snap["counts"], snap["jobs"], snap["progress"]
    total = sum(counts.values())
    out = [f"queue {where}: {total} jobs  "
           + "  ".join(f"{state} {count}" for state, count in counts.items())
           + ("  PAUSED (nothing new is claimed; `python -m runner resume`)"
              if snap["paused"] is not None else "")]
    if total:
        out.append(eta_line(p, counts))
    live = [w for w in snap["workers"] if w["alive"]]
    if live:
        idle = [w["name"] for w in live if w["state"] != "busy"]
        out.append(f"workers: {len(live)} live" + (f" ({len(idle)} idle: "
                                                   + ", ".join(idle[:4]) + ")" if idle else ""))
        out += [f"  {w['name']}: SLURM task {w['slurm_array']} (job {w['slurm_job_id']}, "
                f"restart {w['slurm_restarts']}, GPUs {w['gpus'] or '-'})"
                for w in live if w["slurm_array"]]
    listing = snap["listing"]
    if listing not in (None, Listing()):
        return "\n".join(out + _listing_table(jobs, snap["matched"], listing))
    running = [j for j in jobs if j["state"] == "running"]
    if running:
        rows = []
        for j in running:
            frac = j["step"] / j["total_steps"] if j["total_steps"] else 0.0
            loss = "-" if j["loss"] is None else f"{j['loss']:.4f}"
            rate = p["rates"].get(j["id"])
            age = "-" if j["heartbeat_age"] is None else f"{j['heartbeat_age']:.0f}s"
            eta = f"STALE: {j['stale']}" if j["stale"] else duration(p["job_eta"].get(j["id"]))
            if j["stop_request"] and not j["stale"]:
                eta = f"{j['stop_request']} asked"
            test = ("-" if j["test_accuracy"] is None else
                    f"{100 * j['test_accuracy']:.1f}/{100 * j['balanced_accuracy']:.1f}")
            memory = "" if j["peak_memory"] is None else f"  {j['peak_memory'] / 2**30:.1f}G"
            rows.append([j["name"], (j["worker"] or "-") + memory,
                         f"{bar(frac)} {100 * frac:3.0f}% {j['step']}/{j['total_steps']}", loss,
                         test, "-" if rate is None else f"{rate:.2f}",
                         duration(j["claimed_age"]), age, eta])
        out += ["", "running:", *text_table(["name", "worker (host:gpu:pid) [peak GPU memory]",
                                         "progress", "loss", "test acc/bal %", "steps/s",
                                         "elapsed", "heartbeat", "ETA"], rows)]
        if any(j["stale"] for j in running):
            out.append("stale jobs are taken over by the next worker that looks for work "
                       "(at once on their own host), or: requeue --name NAME" if live else
                       "stale jobs: no worker is running to take them over; start one "
                       "(make workers, python -m runner slurm submit), or: requeue --name "
                       "NAME")
    failed = [j for j in jobs if j["state"] == "failed"]
    if failed:
        rows = [[j["name"], str(j["attempts"]), _first_line(j["error"])]
                for j in failed[:FAILED_SHOWN]]
        out += ["", "failed:", *text_table(["name", "attempts", "error"], rows)]
        if len(failed) > FAILED_SHOWN:
            out.append(f"... and {len(failed) - FAILED_SHOWN} more failed jobs: "
                       "status --state failed lists them all")
    late = [f"{j['name']} ({j['state']})" for j in snap["every"]
            if j["stop_request"] == "cancel" and j["state"] in ("succeeded", "failed")]
    if late:
        out += ["", f"cancel came too late ({len(late)}; the job ended first): "
                + ", ".join(late[:6]) + (", ..." if len(late) > 6 else "")]
    cancelled = [j["name"] for j in snap["every"] if j["state"] == "cancelled"]
    if cancelled:
        out += ["", f"cancelled ({len(cancelled)}; requeue NAME brings one back): "
                + ", ".join(cancelled[:6]) + (", ..." if len(cancelled) > 6 else "")]
    return "\n".join(out)


def _first_line(text: str | None) -> str:
    return text.splitlines()[0][:100] if text else "-"


def _listing_table(page: list[dict], matched: int, listing: Listing) -> list[str]:
    which = "/".join(listing.states) or "all"
    shown = (f"{listing.offset + 1}-{listing.offset + len(page)} of {matched}" if page
             else f"none of {matched}")
    if not page:
        return ["", f"jobs ({which}): {shown}"]
    rows = [[j["name"], j["state"], str(j["attempts"]), f"{j['step']}/{j['total_steps']}",
             "-" if j["test_accuracy"] is None else f"{100 * j['test_accuracy']:.1f}",
             _first_line(j["error"]) if j["state"] == "failed" else (j["worker"] or "-")]
            for j in page]
    return ["", f"jobs ({which}): {shown}",
            *text_table(["name", "state", "attempts", "step", "test acc %", "worker / error"],
                    rows)]
