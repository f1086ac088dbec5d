"""The status report: counts, running jobs with live progress, failed jobs."""

from __future__ import annotations

import json

JOB_FIELDS = ("name", "state", "v", "n", "model", "run", "attempts", "step", "total_steps",
              "loss", "worker", "heartbeat_age", "test_accuracy", "balanced_accuracy",
              "majority_rate", "error", "out_dir")


def status_json(counts: dict, jobs: list[dict]) -> str:
    return json.dumps({"counts": counts,
                       "jobs": [{k: job[k] for k in JOB_FIELDS} for job in jobs]}, indent=2)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def status_text(counts: dict, jobs: list[dict], where: str) -> str:
    total = sum(counts.values())
    out = [f"queue {where}: {total} jobs  "
           + "  ".join(f"{state} {count}" for state, count in counts.items())]
    running = [j for j in jobs if j["state"] == "running"]
    if running:
        rows = []
        for j in running:
            loss = "-" if j["loss"] is None else f"{j['loss']:.4f}"
            age = "-" if j["heartbeat_age"] is None else f"{j['heartbeat_age']:.0f}s"
            rows.append([j["name"], j["worker"] or "-", f"{j['step']}/{j['total_steps']}", loss,
                         age])
        out += ["", "running:", *_table(["name", "worker (host:gpu:pid)", "step", "loss",
                                         "heartbeat"], rows)]
    failed = [j for j in jobs if j["state"] == "failed"]
    if failed:
        rows = [[j["name"], str(j["attempts"]), (j["error"] or "").splitlines()[0][:100]
                 if j["error"] else "-"] for j in failed]
        out += ["", "failed:", *_table(["name", "attempts", "error"], rows)]
    return "\n".join(out)
