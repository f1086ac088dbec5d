"""Checks over the events table: at most one live lease per job, no fenced writes."""

from __future__ import annotations

import json
from collections import defaultdict

ENDS = {"release", "finish", "fail", "expire", "reclaim"}


def lease_violations(events: list[dict]) -> list[str]:
    """Every moment two leases on one job were live, or a lease wrote after losing the job.

    A lease (one claim token) is live from its claim until its end event, or,
    if it has none, until its last heartbeat (or claim) plus its lease length.
    A new claim must come after the previous lease ended or expired, and the
    previous token must write nothing after that claim.
    """
    problems = []
    by_job = defaultdict(list)
    for e in events:
        by_job[e["job_id"]].append(e)
    for job_id, evs in by_job.items():
        live = None  # {"token", "seen", "lease", "ended"} of the current lease
        for e in evs:
            if e["kind"] == "claim":
                if live and not live["ended"] and e["at"] < live["seen"] + live["lease"] - 1e-3:
                    problems.append(f"job {job_id}: claim {e['token'][:8]} at {e['at']:.3f} while "
                                    f"{live['token'][:8]} was live (last seen {live['seen']:.3f})")
                lease = float(json.loads(e["detail"])["lease_seconds"])
                live = {"token": e["token"], "seen": e["at"], "lease": lease, "ended": False}
            elif e["token"] is not None and e["kind"] != "expire":
                if live is None or e["token"] != live["token"]:
                    problems.append(f"job {job_id}: {e['kind']} by stale lease {e['token'][:8]}")
                    continue
                live["seen"] = e["at"]
                if e["kind"] in ENDS:
                    live["ended"] = True
    return problems


def finishes_per_job(events: list[dict]) -> dict[int, int]:
    counts: dict[int, int] = defaultdict(int)
    for e in events:
        if e["kind"] == "finish":
            counts[e["job_id"]] += 1
    return dict(counts)
