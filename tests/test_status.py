"""`status` on a large queue: a few queries whatever the job count, the failed table capped,
and --state/--limit/--offset listing any state page by page (text and --json)."""

from __future__ import annotations

import json

import pytest

from runner.progress import eta_line, sweep_progress
from runner.status import FAILED_SHOWN, Listing, snapshot, status_json, status_text
from tests.support.commands import cli
from tests.support.queues import rows


def fail_all(queue, how_many: int) -> list[str]:
    names = []
    for i in range(how_many):
        claim = queue.claim(f"w{i}", 600)
        queue.fail(claim, f"error {i}\ntraceback line")
        names.append(claim.name)
    return names


def test_attempt_starts_are_each_jobs_last_claim_step(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2"))
    first = queue.claim("a", 600)
    queue.progress(first, 7, 0.5)
    queue.release(first, 7)
    again = queue.claim("b", 600)
    other = queue.claim("c", 600)
    assert again.name == first.name
    by_name = {j["name"]: j["id"] for j in queue.jobs(config=False)}
    assert queue.attempt_starts() == {by_name[first.name]: 7, by_name[other.name]: 0}


def test_the_failed_table_is_capped_and_the_rest_is_said(queue):
    queue.plan(rows("V=5"))   # 30 jobs
    failed = fail_all(queue, FAILED_SHOWN + 3)
    text = status_text(snapshot(queue), "q")
    shown = [line.split()[0] for line in text.splitlines() if line.startswith("table_conn")]
    assert shown == failed[:FAILED_SHOWN]
    assert ("... and 3 more failed jobs: status --state failed lists them all"
            in text.splitlines())


def test_state_limit_and_offset_page_through_the_jobs(queue, db_url):
    queue.plan(rows("V=5"))
    failed = fail_all(queue, 6)
    listing = Listing(states=("failed",), limit=2, offset=3)
    doc = json.loads(status_json(snapshot(queue, listing)))
    assert doc["jobs_matched"] == 6 and doc["counts"]["failed"] == 6
    assert [j["name"] for j in doc["jobs"]] == failed[3:5]
    assert [j["error"] for j in doc["jobs"]] == ["error 3\ntraceback line",
                                                 "error 4\ntraceback line"]
    whole = json.loads(status_json(snapshot(queue)))
    assert whole["jobs_matched"] == 30 and len(whole["jobs"]) == 30

    proc = cli(db_url, "status", "--state", "failed", "--limit", "2", "--offset", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    at = lines.index("jobs (failed): 4-5 of 6")
    assert [line.split()[:3] for line in lines[at + 3:]] == [[n, "failed", "1"]
                                                           for n in failed[3:5]]
    proc = cli(db_url, "status", "--json", "--state", "pending", "--state", "failed",
               "--limit", "1000")
    assert json.loads(proc.stdout)["jobs_matched"] == 30
    bad = cli(db_url, "status", "--state", "done")
    assert bad.returncode == 2 and "--state" in bad.stderr


def test_resume_says_when_no_worker_is_left_to_claim(queue, db_url):
    queue.plan(rows("V=5", "N=256"))
    queue.pause()
    lines = cli(db_url, "resume").stdout.splitlines()
    assert lines == ["queue resumed",
                     "note: no worker is running (workers without --wait, SLURM array tasks "
                     "too, exit when they find the queue paused): start workers again "
                     "(make workers, python -m runner slurm submit)"]
    queue.pause()
    queue.register_worker("elsewhere:cpu:1", "elsewhere", 1, None, "cpu", 600)  # waiting
    assert cli(db_url, "resume").stdout.splitlines() == ["queue resumed"]
    assert cli(db_url, "resume").stdout.splitlines() == ["the queue was not paused"]


def test_a_stale_job_is_promised_a_takeover_only_by_a_live_worker(queue):
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    queue.claim("elsewhere:cpu:1", 0.2)   # silent past its lease at once
    import time

    time.sleep(0.5)
    text = status_text(snapshot(queue), "q")
    assert ("stale jobs: no worker is running to take them over; start one (make workers, "
            "python -m runner slurm submit), or: requeue --name NAME") in text.splitlines()
    queue.register_worker("other:cpu:2", "other", 2, None, "cpu", 600)
    text = status_text(snapshot(queue), "q")
    assert ("stale jobs are taken over by the next worker that looks for work (at once on "
            "their own host), or: requeue --name NAME") in text.splitlines()


def test_the_table_reads_whole_only_what_it_shows_and_says_the_same(queue):
    """The plain table reads every job's few progress columns and the running and failed
    jobs whole: it must say exactly what it says from every job read whole (the ETA, the
    diverged advice, late cancels and cancelled jobs come from the few columns)."""
    queue.plan(rows("V=5"))   # 30 jobs
    done = queue.claim("a", 600)
    queue.progress(done, 10, 0.4)
    queue.finish(done, {"accuracy": 0.5, "balanced_accuracy": 0.5})
    late = queue.claim("b", 600)
    queue.cancel([late.name])                       # asked too late: the job ends first
    queue.finish(late, {"accuracy": 0.5, "balanced_accuracy": 0.5})
    queue.fail(queue.claim("c", 600), "ValueError: loss became nan at step 3")
    queue.cancel([queue.jobs(states=("pending",), limit=1)[0]["name"]])
    running = queue.claim("d", 600)
    queue.progress(running, 2, 0.7)

    few, whole = snapshot(queue, None), snapshot(queue)
    assert [j["name"] for j in few["jobs"]] == [
        j["name"] for j in whole["jobs"] if j["state"] in ("running", "failed")]
    assert len(few["jobs"]) == 2
    assert few["progress"]["failed_diverged"] == 1
    assert {k: v for k, v in few["progress"].items() if k != "job_eta"} == {
        k: v for k, v in whole["progress"].items() if k != "job_eta"}
    table = status_text(few, "q")
    assert table == status_text(whole, "q")
    # The pending jobs never claimed are summed in SQL, not read a row each: the same
    # progress and ETA as from a row for every job.
    assert sum(group["jobs"] for group in queue.unclaimed_pending()) == 25
    every_row = queue.jobs(config=False)
    for row in every_row:
        row["stale"] = None
    by_rows = sweep_progress(every_row, queue.attempt_starts(),
                             workers_alive=few["progress"]["live_workers"])
    measured = {k: v for k, v in by_rows["rates"].items() if v is not None}
    assert measured and {k: v for k, v in few["progress"]["rates"].items() if v} == measured
    assert few["progress"]["work_seconds_left"] is not None
    sums = ("work_seconds_left", "eta_seconds")   # summed in another order
    assert [few["progress"][k] for k in sums] == pytest.approx([by_rows[k] for k in sums])
    assert ({k: v for k, v in few["progress"].items() if k not in ("rates", *sums)}
            == {k: v for k, v in by_rows.items() if k not in ("rates", *sums)})
    lines = table.splitlines()
    assert lines[0] == ("queue q: 30 jobs  pending 25  running 1  succeeded 2  failed 1  "
                        "cancelled 1")
    assert any(line.startswith(running.name) for line in lines)
    assert f"cancel came too late (1; the job ended first): {late.name} (succeeded)" in lines
    assert sum(line.startswith("cancelled (1;") for line in lines) == 1


def test_pending_jobs_without_a_measured_rate_leave_the_eta_unknown(queue):
    queue.plan(rows("V=5", "N=256"))   # 6 jobs, none claimed: no rate measured anywhere
    progress = snapshot(queue, None)["progress"]
    assert (progress["jobs_left"], progress["steps_done"]) == (6, 0)
    assert progress["work_seconds_left"] is None and progress["eta_seconds"] is None
    assert eta_line(progress, queue.counts()).endswith("ETA unknown (no step rate measured yet)")
