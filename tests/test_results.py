"""Results, figures, progress and logs: pure functions, then a database filled by real runs."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import signal
import statistics
import struct
import subprocess
import time
from pathlib import Path

import pytest

from runner.progress import JobDisplay, duration, eta_line, sweep_progress
from runner.reporting import results as res
from runner.reporting.plot import sample_complexity_figure
from tests.support.commands import PYTHON, ROOT, cli, runner_env
from tests.support.queues import doom
from trainer.config import resolve

# --- pure functions -------------------------------------------------------------------


def test_stats_use_the_sample_std_and_none_for_one_run():
    s = res.stats([0.5, 0.7, 0.9])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.7)
    assert s["std"] == pytest.approx(0.2)   # n-1: sqrt(((.2)^2 + 0 + (.2)^2) / 2)
    assert (s["min"], s["max"]) == (0.5, 0.9)
    assert res.stats([0.8])["std"] is None
    assert res.spread(res.stats([0.8])) == "80.0 ± - (80.0–80.0)"
    assert res.stats([])["mean"] is None and res.spread(res.stats([])) == "-"


def fake_job(tmp_path, run, state="succeeded", acc=0.8, model="gpt2", n=256, eval_acc=None):
    out = tmp_path / f"{model}_N{n}_run{run}"
    if eval_acc is not None:
        out.mkdir()
        (out / res.EVAL_FILE).write_text(json.dumps(
            {"accuracy": eval_acc, "balanced_accuracy": 0.6, "majority_rate": 0.7}))
    return {"id": run, "name": f"job_{model}_N{n}_run{run}", "state": state, "v": 5, "n": n,
            "model": model, "run": run, "test_accuracy": acc if state == "succeeded" else None,
            "balanced_accuracy": 0.6 if state == "succeeded" else None,
            "majority_rate": 0.7 if state == "succeeded" else None, "out_dir": str(out)}


def test_aggregate_prefers_eval_json_and_says_so(tmp_path):
    jobs = [fake_job(tmp_path, 1, eval_acc=0.8),            # agree
            fake_job(tmp_path, 2, acc=0.9, eval_acc=0.6),   # disagree: eval.json wins
            fake_job(tmp_path, 3, state="failed"),
            fake_job(tmp_path, 4, state="pending", eval_acc=0.99),  # stray eval.json
            fake_job(tmp_path, 5, acc=0.7)]                 # no eval.json: the database's
    (row,) = res.aggregate(jobs).rows
    assert (row["runs_finished"], row["runs_planned"], row["runs_failed"]) == (3, 5, 1)
    assert [r["accuracy"] for r in row["runs"]] == [0.8, 0.6, 0.7]
    assert row["accuracy"]["mean"] == pytest.approx(0.7)
    notes = " | ".join(res.aggregate(jobs).notes)
    assert "job_gpt2_N256_run2: the database and eval.json disagree on accuracy (0.9 vs 0.6)" \
        in notes
    assert "job_gpt2_N256_run5" in notes and "job_gpt2_N256_run4 (pending)" in notes
    assert "3/5 (1 failed)" in res.to_text(res.aggregate(jobs))


def test_rows_are_ordered_v_model_n(tmp_path):
    jobs = [fake_job(tmp_path, 1, model=m, n=n) for n in (512, 256) for m in ("gpt2", "lowrank")]
    rows = res.aggregate(jobs).rows
    assert [(r["model"], r["N"]) for r in rows] == [
        ("gpt2", 256), ("gpt2", 512), ("lowrank", 256), ("lowrank", 512)]


def progress_job(id, state, step, total=100, v=5, model="gpt2", claimed=None, progress=None,
                 finished=None, worker=None, age=None):
    return {"id": id, "state": state, "step": step, "total_steps": total, "v": v,
            "model": model, "cost": 10.0 * total * (4 if v == 20 else 1),
            "claimed_at": claimed, "progress_at": progress, "finished_at": finished,
            "worker": worker, "heartbeat_age": age, "lease_seconds": 60.0}


def test_sweep_eta_from_measured_rates():
    jobs = [progress_job(1, "succeeded", 100, claimed=0.0, finished=50.0),      # 2 steps/s
            progress_job(2, "running", 60, claimed=100.0, progress=110.0, worker="a", age=1.0),
            progress_job(3, "running", 10, claimed=100.0, progress=105.0, worker="b", age=1.0),
            progress_job(4, "pending", 0),                       # same (V, model): 2 steps/s
            progress_job(5, "pending", 0, v=20),                 # by cost: 4x slower per step
            progress_job(6, "failed", 3)]
    starts = {1: 0, 2: 20, 3: 0}          # job 2 resumed at step 20: 40 steps in 10 s
    p = sweep_progress(jobs, starts)
    assert p["rates"][2] == pytest.approx(4.0) and p["rates"][3] == pytest.approx(2.0)
    assert p["job_eta"][2] == pytest.approx(10.0)
    # left: job 2 40/4 + job 3 90/2 + job 4 100/2 + job 5 100/(median 2 steps/s / 4)
    # (the median rate by cost of jobs 1, 2, 3 is job 1's/3's 2 steps/s at V=5)
    assert p["work_seconds_left"] == pytest.approx(10 + 45 + 50 + 200)
    assert p["live_workers"] == 2 and p["eta_seconds"] == pytest.approx(305 / 2)
    assert p["steps_done"] == 100 + 60 + 10 + 3


def test_sweep_eta_unknown_without_data_or_workers():
    assert sweep_progress([progress_job(1, "pending", 0)], {})["eta_seconds"] is None
    dead = [progress_job(1, "succeeded", 100, claimed=0.0, finished=50.0),
            progress_job(2, "pending", 0)]
    p = sweep_progress(dead, {1: 0})
    assert p["eta_seconds"] is None and p["work_seconds_left"] == pytest.approx(50)
    assert sweep_progress(dead[:1], {1: 0})["eta_seconds"] == 0.0
    assert [duration(s) for s in (None, 5, 125, 7380, 200000)] == [
        "unknown", "5s", "2m05s", "2h03m", "2d07h"]


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_job_display_bar_on_a_terminal_log_lines_otherwise(caplog):
    tty = FakeTTY()
    bar = JobDisplay("study_standard_V5_N256_run1", 10, 2, logging.getLogger("t"), stream=tty)
    for step in range(3, 10):
        bar.update(step, 0.25)
    time.sleep(0.6)  # past the bar's redraw interval
    bar.update(10, 0.25)
    bar.close()
    assert "standard_V5_N256_run1" in tty.getvalue() and "10/10" in tty.getvalue()
    assert "loss 0.2500" in tty.getvalue()
    with caplog.at_level(logging.INFO, logger="t"):
        plain = JobDisplay("job", 10, 0, logging.getLogger("t"), every=3600, stream=io.StringIO())
        assert plain.bar is None
        for step in range(1, 11):
            plain.update(step, 0.5)
    (line,) = caplog.messages   # only the last step: the interval never elapsed
    assert re.fullmatch(r"job: step 10/10 \(100%\), loss 0\.5000, [\d.]+ steps/s", line)


# --- a database filled by real smoke runs ----------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def text_rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("V  model"))
    return [re.split(r"\s{2,}", line.strip()) for line in lines[start + 2:] if line.strip()]


@pytest.mark.slow
def test_results_plot_and_logs_on_a_real_smoke_sweep(db_url, tmp_path):
    runs = tmp_path / "runs"
    plan = cli(db_url, "plan", "--profile", "smoke", "--only", "V=5", "--only", "N=256",
               "--only", "N=512", "--out-root", str(runs))
    assert plan.returncode == 0, plan.stderr
    doomed = runs / "table_connectivity_lowrank" / "table_connectivity_lowrank_V5_N512_run2"
    doom(doomed, db_url)   # this job fails at its first step
    worker = cli(db_url, "worker", "--gpu", "cpu", "--threads", "1", timeout=600)
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert "table_connectivity_standard_V5_N256_run1: step 30/30 (100%)" in worker.stderr

    # The table: one row per (V, model, N), runs finished/planned, the failure counted.
    table = cli(db_url, "results")
    assert table.returncode == 0, table.stderr
    rows = text_rows(table.stdout)
    assert [r[:4] for r in rows] == [
        ["5", "gpt2", "256", "3/3"], ["5", "gpt2", "512", "3/3"],
        ["5", "lowrank_gpt2", "256", "3/3"], ["5", "lowrank_gpt2", "512", "2/3 (1 failed)"]]

    # --json parses, matches the table and the folders' eval.json files.
    out = json.loads(cli(db_url, "results", "--json").stdout)
    assert out["notes"] == []
    for row, cells in zip(out["rows"], rows, strict=True):
        assert cells[4] == res.spread(row["accuracy"])
        assert cells[5] == res.spread(row["balanced_accuracy"])
        assert cells[6] == f"{100 * row['majority_rate']['mean']:.1f}"
        folders = [runs / ("table_connectivity" if row["model"] == "gpt2" else
                           "table_connectivity_lowrank") / r["name"] for r in row["runs"]]
        accs = [json.loads((f / res.EVAL_FILE).read_text())["accuracy"] for f in folders]
        assert row["accuracy"]["mean"] == pytest.approx(statistics.fmean(accs))
        assert row["accuracy"]["std"] == pytest.approx(statistics.stdev(accs))
        assert (row["accuracy"]["min"], row["accuracy"]["max"]) == (min(accs), max(accs))

    # --csv: the same numbers.
    parsed = list(csv.DictReader(io.StringIO(cli(db_url, "results", "--csv").stdout)))
    assert [(int(r["N"]), r["model"], int(r["runs_finished"])) for r in parsed] == [
        (r["N"], r["model"], r["runs_finished"]) for r in out["rows"]]
    assert [float(r["balanced_accuracy_mean"]) for r in parsed] == [
        r["balanced_accuracy"]["mean"] for r in out["rows"]]

    # eval.json is the source of truth when it disagrees with the database.
    tampered = Path(out["rows"][0]["runs"][0]["name"])
    folder = runs / "table_connectivity" / tampered
    ev = json.loads((folder / res.EVAL_FILE).read_text())
    (folder / res.EVAL_FILE).write_text(json.dumps({**ev, "accuracy": 0.123}))
    again = cli(db_url, "results", "--json")
    first = json.loads(again.stdout)["rows"][0]["runs"][0]
    assert first["accuracy"] == 0.123
    assert any(str(tampered) in n and "disagree" in n for n in json.loads(again.stdout)["notes"])
    assert "disagree on accuracy" in cli(db_url, "results").stderr

    # The figures: valid PNGs of a sensible size.
    figure = tmp_path / "figs" / "sample_complexity.png"
    plot = cli(db_url, "plot", "--out", str(figure))
    assert plot.returncode == 0, plot.stderr
    assert str(figure) in plot.stdout
    width, height = png_size(figure)
    assert 900 <= width <= 4000 and 600 <= height <= 3000 and figure.stat().st_size > 20_000
    curves = sorted((tmp_path / "figs" / "curves").glob("*.png"))
    assert [c.name for c in curves] == ["curves_V5_N256.png", "curves_V5_N512.png"]
    assert all(png_size(c)[0] >= 800 for c in curves)

    # Logs by name (or a unique part of it), with the worker's own lines for a failure.
    log = cli(db_url, "logs", "standard_V5_N256_run1")
    assert log.returncode == 0 and "=== attempt 1 by worker" in log.stdout
    assert "finished: test accuracy" in log.stdout
    failed = cli(db_url, "logs", "lowrank_V5_N512_run2", "--follow", timeout=30)
    assert failed.returncode == 0
    assert "attempt 1 failed:" in failed.stdout and "IsADirectoryError" in failed.stdout
    assert "Traceback" in failed.stdout
    assert cli(db_url, "logs", "V5_N256").returncode == 2   # ambiguous
    assert cli(db_url, "logs", "nope").returncode == 2

    # Status: nothing left to run, but not "finished" with a job failed; --watch redraws
    # until Ctrl-C, then exits 0.
    done = cli(db_url, "status").stdout
    assert "sweep finished" not in done
    assert "nothing left to run but 1 job(s) failed" in done
    watch = subprocess.Popen([PYTHON, "-m", "runner", "status", "--watch", "0.5"], cwd=ROOT,
                             env=runner_env(db_url), stdout=subprocess.PIPE, text=True)
    time.sleep(3)
    watch.send_signal(signal.SIGINT)
    stdout, _ = watch.communicate(timeout=30)
    assert watch.returncode == 0
    assert stdout.count("queue ") >= 2 and "Ctrl-C to stop" in stdout


def test_figure_says_what_was_run_and_shows_every_error_bar(tmp_path):
    jobs = []
    for run, acc in enumerate((0.99, 0.90, 1.0), start=1):
        job = fake_job(tmp_path, run, acc=acc)
        job["balanced_accuracy"], job["majority_rate"] = acc, 0.7
        jobs.append(job)
    for run, acc in enumerate((0.6, 0.62, 0.64), start=1):
        job = fake_job(tmp_path, run, acc=acc, n=512)
        job["v"], job["balanced_accuracy"], job["majority_rate"] = 20, acc, 0.93
        jobs.append(job)
    for job in jobs:
        config = resolve("gpt2", job["v"], job["n"], job["run"], "smoke",
                         ["training.learning_rate=3e-4"])
        job.update(config=config, profile="smoke", overrides='["training.learning_rate=3e-4"]')
    results = res.aggregate(jobs)
    assert results.run["profiles"] == ["smoke"] and results.run["train_steps"] == [30]
    assert not results.run["study_as_run"]
    assert "training.learning_rate" in results.run["differences"]
    text = res.to_text(results)
    assert text.splitlines()[0] == ("Run: profile smoke; 30 steps, batch 16, 3 layers of width "
                                    "32; --set: training.learning_rate=3e-4")
    assert text.splitlines()[1].startswith("NOT the study as run: differs in ")

    fig = sample_complexity_figure(results)
    title = fig._suptitle.get_text()
    assert "profile smoke; 30 steps" in title and "NOT the study as run" in title
    top_row = fig.axes[:2] if fig.axes[0].get_subplotspec().rowspan.start == 0 else None
    assert top_row is not None
    assert top_row[0].get_ylim() == top_row[1].get_ylim()       # one y-range per row
    v5 = results.rows[0]["balanced_accuracy"]
    assert top_row[0].get_ylim()[1] > v5["mean"] + v5["std"]    # the error bar is not clipped
    assert top_row[1].get_ylim()[0] < 0.6                        # nor the lowest run at V=20


def test_the_study_as_run_is_named_so():
    jobs = [{"name": "a", "state": "pending", "v": 5, "n": 256, "model": "gpt2", "run": 1,
             "config": resolve("gpt2", 5, 256, 1, "full"), "profile": "full", "overrides": "[]"}]
    run = res.what_was_run(jobs)
    assert run["study_as_run"] and run["differences"] == {}
    assert res.run_lines(run)[1] == "This is the study as run (full profile, no overrides)."


def test_a_handed_back_or_failed_attempt_still_measures_a_rate():
    """After a SIGTERM hand-back nothing runs, yet steps ran: the ETA is known."""
    jobs = [progress_job(1, "pending", 40, claimed=0.0, progress=20.0),   # released at 40
            progress_job(2, "failed", 10, claimed=0.0, progress=10.0),
            progress_job(3, "pending", 0)]
    p = sweep_progress(jobs, {1: 0, 2: 0}, workers_alive=1)
    assert p["rates"][1] == pytest.approx(2.0) and p["rates"][2] == pytest.approx(1.0)
    # pending jobs run at the median measured rate of their (V, model): 1.5 steps/s
    assert p["work_seconds_left"] == pytest.approx((60 + 100) / 1.5)
    assert "no step rate measured yet" not in eta_line(p, {"failed": 1})
