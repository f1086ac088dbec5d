"""Comparing configurations: one grid planned twice into one queue, at two learning rates.

A real SQLite queue planned by `plan` from two sweep files (two study names)
with different `--set`, trained by two real worker processes (4 steps a job);
two jobs of the second config fail for real (their metrics log cannot be
written). `results`, `plot`, `report` and the dashboard split every (V, model, N)
by the config that differs, or by `--by KEY`, and never average across configs.
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

from db import JobQueue, connect
from runner.reporting.plot import sample_complexity_figure
from runner.reporting.results import aggregate
from tests.support.browser import chrome
from tests.support.commands import PYTHON, ROOT, cli, refused_line, runner_env
from tests.support.queues import digest, doom
from tests.support.serve import start_server, stop_server
from tests.support.waiting import wait_for
from trainer.files import EVAL_FILE

TINY = ["--set", "training.train_steps=4", "--set", "evaluation.eval_every=2",
        "--set", "training.save_every_steps=2"]
TINY_SET = "training.train_steps=4 evaluation.eval_every=2 training.save_every_steps=2"
LOW, HIGH = "training.learning_rate=0.0001", "training.learning_rate=0.0003"
DOOMED = ["lr3e4_standard_V5_N256_run1", "lr3e4_standard_V5_N256_run2"]
pytestmark = pytest.mark.slow   # the fixture trains twelve jobs in two workers


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    import subprocess

    folder = tmp_path_factory.mktemp("compare")
    url = f"sqlite:///{folder / 'queue.sqlite'}"
    runs = folder / "runs"
    second = folder / "sweep_lr3e4.yaml"
    second.write_text((ROOT / "conf" / "sweep.yaml").read_text().replace(
        "study: table_connectivity", "study: lr3e4"))
    common = ["--profile", "smoke", "--only", "V=5", "--only", "N=256", "--out-root", str(runs)]
    first = cli(url, "plan", *common, *TINY)
    assert first.returncode == 0, first.stderr
    other = cli(url, "plan", "--sweep", str(second), *common, *TINY,
                "--set", "training.learning_rate=3e-4")
    assert other.returncode == 0, other.stderr
    for name in DOOMED:   # these fail at their first step: the metrics log is a folder
        doom(runs / "table_connectivity" / name, url)
    worker = [PYTHON, "-m", "runner", "worker", "--gpu", "cpu", "--threads", "1"]
    for extra in (["--max-jobs", "6"], []):   # two workers share the sweep
        done = subprocess.run(worker + extra, cwd=ROOT, env=runner_env(url),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    queue = JobQueue(connect(url))
    assert queue.counts()["succeeded"] == 10 and queue.counts()["failed"] == 2
    yield SimpleNamespace(url=url, runs=runs, queue=queue, folder=folder)
    queue.engine.dispose()


def eval_accuracy(queue: JobQueue, name: str) -> float:
    (job,) = [j for j in queue.jobs() if j["name"] == name]
    return json.loads((Path(job["out_dir"]) / EVAL_FILE).read_text())["accuracy"]


def test_results_give_each_config_its_own_rows(compared):
    made = cli(compared.url, "results", "--json")
    assert made.returncode == 0, made.stderr
    doc = json.loads(made.stdout)
    assert doc["by"] == ["training.learning_rate"]
    assert [(r["group"], r["model"], r["runs_finished"], r["runs_planned"], r["runs_failed"])
            for r in doc["rows"]] == [
        (LOW, "gpt2", 3, 3, 0), (LOW, "lowrank_gpt2", 3, 3, 0),
        (HIGH, "gpt2", 1, 3, 2), (HIGH, "lowrank_gpt2", 3, 3, 0)]
    for row in doc["rows"]:   # each mean is over its own config's runs only
        study = "table_connectivity" if row["group"] == LOW else "lr3e4"
        tag = "standard" if row["model"] == "gpt2" else "lowrank"
        names = [f"{study}_{tag}_V5_N256_run{r}" for r in (1, 2, 3)
                 if f"{study}_{tag}_V5_N256_run{r}" not in DOOMED]
        assert [r["name"] for r in row["runs"]] == names
        assert row["accuracy"]["mean"] == pytest.approx(
            statistics.fmean(eval_accuracy(compared.queue, n) for n in names))
    assert [g["label"] for g in doc["groups"]] == [LOW, HIGH]

    text = cli(compared.url, "results").stdout
    assert text.splitlines()[0].endswith(
        f"--set differs: {TINY_SET} (6 jobs); {TINY_SET} training.learning_rate=3e-4 (6 jobs)")
    assert (f"config {LOW}: profile smoke, --set: {TINY_SET} (6 jobs)") in text
    assert (f"config {HIGH}: profile smoke, --set: {TINY_SET} "
            "training.learning_rate=3e-4 (6 jobs)") in text
    assert "runs of different configs are never averaged together" in text

    rows = list(csv.DictReader(io.StringIO(cli(compared.url, "results", "--csv").stdout)))
    assert [(r["group"], r["model"], r["profile"], r["overrides"], r["runs_finished"])
            for r in rows] == [
        (LOW, "gpt2", "smoke", TINY_SET, "3"), (LOW, "lowrank_gpt2", "smoke", TINY_SET, "3"),
        (HIGH, "gpt2", "smoke", f"{TINY_SET} training.learning_rate=3e-4", "1"),
        (HIGH, "lowrank_gpt2", "smoke", f"{TINY_SET} training.learning_rate=3e-4", "3")]


def test_by_picks_the_split_and_an_unknown_key_is_refused(compared):
    default = json.loads(cli(compared.url, "results", "--json").stdout)
    by_lr = json.loads(cli(compared.url, "results", "--json", "--by",
                           "training.learning_rate").stdout)
    assert by_lr["rows"] == default["rows"]
    merged = cli(compared.url, "results", "--json", "--by", "model.n_layer")
    doc = json.loads(merged.stdout)
    assert [(r["group"], r["runs_finished"]) for r in doc["rows"]] == [
        ("model.n_layer=3", 4), ("model.n_layer=3", 6)]
    assert any("still mix jobs whose configs differ in training.learning_rate" in n
               for n in doc["notes"])
    before = digest(compared.url)
    for command in (["results"], ["plot", "--out", str(compared.folder / "f" / "x.png")],
                    ["report", "--out", str(compared.folder / "r" / "x.html")]):
        line = refused_line(cli(compared.url, *command, "--by", "training.lr"))
        assert line == ("error: --by 'training.lr': no job's config has this key (a dotted key "
                        "of config.yaml, e.g. training.learning_rate); keys that differ between "
                        "jobs here: training.learning_rate"), command
    assert not (compared.folder / "f").exists() and not (compared.folder / "r").exists()
    assert digest(compared.url) == before


def test_the_figure_draws_a_line_per_config_and_model(compared):
    results = aggregate(compared.queue.jobs())
    fig = sample_complexity_figure(results)
    top = fig.axes[0]
    from matplotlib.container import ErrorbarContainer

    handles, labels = zip(*[(h, lab) for h, lab in zip(*top.get_legend_handles_labels(),
                                                       strict=True)
                            if isinstance(h, ErrorbarContainer)], strict=True)
    assert list(labels) == [f"gpt2 (standard)\n{LOW}", f"lowrank_gpt2 (low-rank)\n{LOW}",
                          f"gpt2 (standard)\n{HIGH}", f"lowrank_gpt2 (low-rank)\n{HIGH}"]
    means = [h.lines[0].get_ydata()[0] for h in handles]
    assert means == pytest.approx([r["balanced_accuracy"]["mean"] for r in results.rows])
    assert "a line per model and config (training.learning_rate)" in " ".join(
        fig._suptitle.get_text().split())

    made = cli(compared.url, "plot", "--out", str(compared.folder / "figs" / "sc.png"))
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in (compared.folder / "figs" / "curves").iterdir()) == [
        "curves_V5_N256.png"]


def test_the_report_splits_by_config_and_names_every_worker(compared):
    out = compared.folder / "report.html"
    made = cli(compared.url, "report", "--out", str(out))
    assert made.returncode == 0, made.stderr
    page = out.read_text()
    assert "<th>config</th><th>V</th>" in page
    assert page.count(f"<td>{LOW}</td>") == 2 and page.count(f"<td>{HIGH}</td>") == 2
    workers = {e["worker"] for e in compared.queue.events() if e["kind"] == "claim"}
    assert len(workers) == 2
    listed = re.search(r"<dt>workers</dt><dd>(.*?)</dd>", page).group(1)
    assert listed.startswith("2: ") and all(w in listed for w in workers)


# --- in a browser, at 1400 px ------------------------------------------------------------


def test_the_dashboard_says_failures_wait_and_fits_1400px(compared):
    proc, base = start_server(compared.url)
    driver = chrome(width=1400)
    try:
        driver.get(base)
        wait_for(lambda: driver.execute_script(
            "return document.querySelectorAll('#jobs tbody tr').length") == 12, what="rows")
        eta = driver.find_element("id", "eta").text
        assert eta.endswith("nothing left to run but 2 job(s) failed: see below, then "
                            "requeue --failed"), eta
        assert "finished" not in eta
        fit = driver.execute_script(
            "const cells = [...document.querySelectorAll('#jobs td.error')]"
            "  .filter(td => td.textContent);"
            "return {n: cells.length, inner: window.innerWidth,"
            "  right: Math.max(...cells.map(td => td.getBoundingClientRect().right)),"
            "  page: document.documentElement.scrollWidth}")
        assert fit["n"] == 2 and fit["right"] <= fit["inner"], fit
        assert fit["page"] <= fit["inner"], fit
        wait_for(lambda: driver.execute_script(
            "return document.querySelectorAll('#results tbody tr').length") == 4, what="results")
        configs = driver.execute_script(
            "return [...document.querySelectorAll('#results tbody td.group')]"
            ".map(td => td.offsetWidth > 0 ? td.textContent : null)")
        assert configs == [LOW, LOW, HIGH, HIGH]

        # one job's charts: a one-point loss curve keeps a whole-step axis and no loss below 0
        labels = driver.execute_script(
            "const svg = chart('loss', [{points: [[1, 0.2]]}], {nonNegative: true, xmax: 4});"
            "return [...svg.querySelectorAll('text')].map(t => t.textContent)")
        x_ticks = labels[labels.index("0", 1):labels.index("training steps done")]
        y_ticks = labels[1:labels.index("0", 1)]
        assert x_ticks == ["0", "1", "2", "3", "4"], labels
        assert all(float(y) >= 0 for y in y_ticks), labels
        many = driver.execute_script(
            "return integerTicks(2).concat(['|'], integerTicks(30), ['|'], integerTicks(1001))")
        assert many == [0, 1, 2, "|", 0, 10, 20, 30, "|", 0, 500, 1000]
    finally:
        driver.quit()
        stop_server(proc)


def test_the_report_keeps_its_jobs_table_on_the_page_at_1400px(compared):
    out = compared.folder / "wide.html"
    assert cli(compared.url, "report", "--out", str(out)).returncode == 0
    driver = chrome(offline=True, width=1400)
    try:
        driver.get(out.as_uri())
        fit = driver.execute_script(
            "const tables = [...document.querySelectorAll('table')];"
            "const jobs = tables[tables.length - 1];"
            "const last = [...jobs.querySelectorAll('tr td:last-child')];"
            "return {n: last.length, inner: window.innerWidth,"
            "  right: Math.max(...last.map(td => td.getBoundingClientRect().right)),"
            "  page: document.documentElement.scrollWidth,"
            "  head: jobs.querySelector('th:last-child').textContent}")
        assert fit["head"] == "folder (in the runs folder)" and fit["n"] == 12
        assert fit["right"] <= fit["inner"] and fit["page"] <= fit["inner"], fit
    finally:
        driver.quit()
