"""A job's history, claim by claim, from its events: which worker (and SLURM task) ran it,
from when to when, how far, and how that claim ended (`history NAME`, the dashboard).

Each claim holds a lease token of its own; the event that ended the claim is the first
later one of that token that gives the job up: handed back, succeeded, failed, cancelled,
its lease expired, or its worker found dead.
"""

from __future__ import annotations

import json
import time

from runner.status import text_table

ENDINGS = {"release": "handed back", "finish": "succeeded", "fail": "failed",
           "cancel": "cancelled", "expire": "lease expired", "reclaim": "worker lost"}


def claims(events: list[dict], workers: list[dict], live_token: str | None) -> list[dict]:
    """One entry per claim of the job whose `events` (oldest first) are given. `workers`:
    the registry, for the SLURM task of a worker whose ending did not name it; `live_token`:
    the job's lease token now (its claim is still running)."""
    tasks = {w["name"]: w.get("slurm_array") for w in workers}
    found = []
    for claim in (e for e in events if e["kind"] == "claim"):
        end = next((e for e in events if e["id"] > claim["id"] and e["token"] == claim["token"]
                    and e["kind"] in ENDINGS), None)
        detail = _detail(end)
        outcome = (ENDINGS[end["kind"]] if end else
                   "running" if claim["token"] == live_token else "no ending recorded")
        if end and end["kind"] == "reclaim" and detail.get("to") in ("failed", "cancelled"):
            outcome += f", job {detail['to']}"
        found.append({
            "claim": len(found) + 1, "attempt": claim["attempt"], "worker": claim["worker"],
            "slurm_task": detail.get("slurm_task") or tasks.get(claim["worker"]),
            "started_at": claim["at"], "ended_at": end["at"] if end else None,
            "outcome": outcome, "step": detail.get("step"),
            "why": detail.get("reason") or detail.get("error"),
        })
    return found


def _detail(event: dict | None) -> dict:
    if event is None or not event["detail"]:
        return {}
    try:
        detail = json.loads(event["detail"])
    except ValueError:
        return {}
    return detail if isinstance(detail, dict) else {}


def to_text(name: str, entries: list[dict]) -> str:
    if not entries:
        return f"{name}: never claimed\n"

    def when(at: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"

    rows = [[str(e["claim"]), str(e["attempt"]), when(e["started_at"]), when(e["ended_at"]),
             e["worker"] or "-", e["slurm_task"] or "-", e["outcome"],
             "-" if e["step"] is None else str(e["step"]), _first_line(e["why"])]
            for e in entries]
    headers = ["claim", "attempt", "started", "ended", "worker", "SLURM task", "outcome",
               "step", "why"]
    lines = [f"{name}: {len(entries)} claim(s)", *text_table(headers, rows)]
    return "\n".join(lines) + "\n"


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""
