"""The chaos run (bench/chaos.py), shortened for CI: 30 jobs, 4 workers, >= 15 faults.

Workers are SIGKILLed, SIGTERMed and SIGSTOPped at random moments, restarted to keep four
alive, and the database is locked past their busy timeout twice; at the end every job
succeeded, no job ever had two live leases, no result came from a fenced-out attempt, no
worker exited with an error, and every job's files equal a fault-free run's bit for bit.
The full run: `.venv/bin/python bench/chaos.py` (60 jobs, 60 faults).
"""

from __future__ import annotations

import pytest

from bench.chaos import chaos, report

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def test_chaos_run_loses_nothing(tmp_path):
    # Faults every 0.3-1.5 s: on an idle machine the short sweep ends before 16 land at the
    # full run's 0.5-2.5 s.
    res = chaos(tmp_path, only=["V=5"], faults=16, freezes=2, seed=20241127, interval=(0.3, 1.5),
                ref_processes=2, timeout=900, progress=lambda message: None, outages=2)
    text = report(res, "SQLite")
    print(text)
    assert res.ok, text
    assert res.counts["succeeded"] == res.jobs == 30
    assert len(res.faults) >= 15
    assert res.violations == [] and res.fenced_results == [] and res.duplicate_finishes == 0
    assert res.compared == 30 and res.mismatches == []
    assert {f.signal for f in res.faults} == {"SIGKILL", "SIGTERM"}
    assert [o.kind for o in res.outages] == ["sqlite lock"] * 2
    assert all(o.seconds >= 3 for o in res.outages)      # past the workers' 1 s busy timeout
    assert res.outages_seen >= 1 and res.worker_errors == []
