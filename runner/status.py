"""The status report: counts, sweep progress and ETA, running jobs, failed jobs."""

from __future__ import annotations

import json

from runner.progress import bar, duration, eta_line, sweep_progress

JOB_FIELDS = ("name", "state", "v", "n", "model", "run", "attempts", "step", "total_steps",
              "loss", "worker", "heartbeat_age", "test_accuracy", "balanced_accuracy",
              "majority_rate", "error", "out_dir")


def attempt_starts(queue, jobs: list[dict], cache: dict | None = None) -> dict[int, int]:
    """The step each running or succeeded job's latest attempt started from.

    Read from the job's last `claim` event (one small query per job). An
    attempt's start never changes, so `cache`, keyed by (job id, claimed_at)
    and kept across `status --watch` redraws, saves reading it again.
    """
    cache = {} if cache is None else cache
    starts = {}
    for job in jobs:
        if job["state"] not in ("running", "succeeded") or job["claimed_at"] is None:
            continue
        key = (job["id"], job["claimed_at"])
        if key not in cache:
            claims = [e for e in queue.events(job["id"]) if e["kind"] == "claim"]
            cache[key] = json.loads(claims[-1]["detail"] or "{}").get("step") if claims else None
        if cache[key] is not None:
            starts[job["id"]] = cache[key]
    return starts


def status_json(counts: dict, jobs: list[dict], starts: dict[int, int] | None = None) -> str:
    p = sweep_progress(jobs, starts or {})
    out = []
    for job in jobs:
        row = {k: job[k] for k in JOB_FIELDS}
        if job["state"] == "running":
            row["steps_per_second"] = p["rates"].get(job["id"])
            row["eta_seconds"] = p["job_eta"].get(job["id"])
        out.append(row)
    progress = {k: p[k] for k in ("steps_done", "steps_total", "jobs_left", "live_workers",
                                  "work_seconds_left", "eta_seconds")}
    return json.dumps({"counts": counts, "progress": progress, "jobs": out}, indent=2)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def status_text(counts: dict, jobs: list[dict], where: str,
                starts: dict[int, int] | None = None) -> str:
    total = sum(counts.values())
    out = [f"queue {where}: {total} jobs  "
           + "  ".join(f"{state} {count}" for state, count in counts.items())]
    p = sweep_progress(jobs, starts or {})
    if total:
        out.append(eta_line(p))
    running = [j for j in jobs if j["state"] == "running"]
    if running:
        rows = []
        for j in running:
            frac = j["step"] / j["total_steps"] if j["total_steps"] else 0.0
            loss = "-" if j["loss"] is None else f"{j['loss']:.4f}"
            rate = p["rates"].get(j["id"])
            age = "-" if j["heartbeat_age"] is None else f"{j['heartbeat_age']:.0f}s"
            rows.append([j["name"], j["worker"] or "-",
                         f"{bar(frac)} {100 * frac:3.0f}% {j['step']}/{j['total_steps']}", loss,
                         "-" if rate is None else f"{rate:.2f}",
                         duration(p["job_eta"].get(j["id"])), age])
        out += ["", "running:", *_table(["name", "worker (host:gpu:pid)", "progress", "loss",
                                         "steps/s", "ETA", "heartbeat"], rows)]
    failed = [j for j in jobs if j["state"] == "failed"]
    if failed:
        rows = [[j["name"], str(j["attempts"]), (j["error"] or "").splitlines()[0][:100]
                 if j["error"] else "-"] for j in failed]
        out += ["", "failed:", *_table(["name", "attempts", "error"], rows)]
    return "\n".join(out)
