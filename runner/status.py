"""The status report: counts, sweep progress and ETA, workers, running jobs, failed jobs."""

from __future__ import annotations

import json

from db.queue import worker_host
from runner.liveness import HOST, dead_reason
from runner.progress import bar, duration, eta_line, sweep_progress

# stop_request on an ended job: a cancel that came too late (the job finished first).
JOB_FIELDS = ("name", "state", "v", "n", "model", "run", "attempts", "step", "total_steps",
              "loss", "worker", "heartbeat_age", "test_accuracy", "balanced_accuracy",
              "majority_rate", "error", "out_dir", "stop_request")
RUNNING_FIELDS = ("peak_memory",)
WORKER_FIELDS = ("name", "device", "state", "job", "seen_age", "alive", "dead", "gpus",
                 "slurm_job_id", "slurm_array", "slurm_restarts")


def attempt_starts(queue, jobs: list[dict], cache: dict | None = None) -> dict[int, int]:
    """The step each job's latest attempt started from (jobs claimed at least once).

    Read from the job's last `claim` event (one small query per job). An
    attempt's start never changes, so `cache`, keyed by (job id, claimed_at)
    and kept across `status --watch` redraws, saves reading it again.
    """
    cache = {} if cache is None else cache
    starts = {}
    for job in jobs:
        if job["claimed_at"] is None:
            continue
        key = (job["id"], job["claimed_at"])
        if key not in cache:
            claims = [e for e in queue.events(job["id"]) if e["kind"] == "claim"]
            cache[key] = json.loads(claims[-1]["detail"] or "{}").get("step") if claims else None
        if cache[key] is not None:
            starts[job["id"]] = cache[key]
    return starts


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


def snapshot(queue, cache: dict | None = None) -> dict:
    """Everything a status report shows, read once."""
    counts, jobs, workers = queue.counts(), queue.jobs(), judge_workers(queue.workers())
    processes = {w["name"]: w["process"] for w in workers}
    for job in jobs:
        job["stale"] = stale_reason(job, processes)
    starts = attempt_starts(queue, jobs, cache)
    live = [w for w in workers if w["alive"]]
    return {"counts": counts, "jobs": jobs, "workers": workers, "paused": queue.paused(),
            "progress": sweep_progress(jobs, starts, workers_alive=len(live))}


def status_json(snap: dict) -> str:
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
    workers = [{k: w[k] for k in WORKER_FIELDS} for w in snap["workers"]
               if w["state"] != "exited"]
    return json.dumps({"counts": snap["counts"], "paused": snap["paused"] is not None,
                       "progress": progress, "workers": workers, "jobs": out}, indent=2)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def status_text(snap: dict, where: str) -> str:
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
        out += ["", "running:", *_table(["name", "worker (host:gpu:pid) [peak GPU memory]",
                                         "progress", "loss", "test acc/bal %", "steps/s",
                                         "elapsed", "heartbeat", "ETA"], rows)]
        if any(j["stale"] for j in running):
            out.append("stale jobs are taken over by the next worker that looks for work "
                       "(at once on their own host), or: requeue --name NAME")
    failed = [j for j in jobs if j["state"] == "failed"]
    if failed:
        rows = [[j["name"], str(j["attempts"]), (j["error"] or "").splitlines()[0][:100]
                 if j["error"] else "-"] for j in failed]
        out += ["", "failed:", *_table(["name", "attempts", "error"], rows)]
    late = [f"{j['name']} ({j['state']})" for j in jobs
            if j["stop_request"] == "cancel" and j["state"] in ("succeeded", "failed")]
    if late:
        out += ["", f"cancel came too late ({len(late)}; the job ended first): "
                + ", ".join(late[:6]) + (", ..." if len(late) > 6 else "")]
    cancelled = [j["name"] for j in jobs if j["state"] == "cancelled"]
    if cancelled:
        out += ["", f"cancelled ({len(cancelled)}; requeue NAME brings one back): "
                + ", ".join(cancelled[:6]) + (", ..." if len(cancelled) > 6 else "")]
    return "\n".join(out)
