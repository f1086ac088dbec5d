"""`python -m runner serve`: a real server process over a queue trained by a real worker.

The queue (SQLite and PostgreSQL) holds succeeded, failed, running (one of them
stale) and pending jobs. The API is checked against `status --json` and
`results --json`, for names it refuses, for secrets and paths it must not show,
for staying read-only, and for surviving a database that is locked or refuses
connections. The page itself is checked in headless chromium (tests/support/browser.py).
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from db import JobQueue, connect
from runner.reporting.results import spread
from tests.support.browser import chrome, keep_artifact
from tests.support.commands import PYTHON, ROOT, cli, runner_env
from tests.support.queues import BACKENDS, digest, doom, new_pg_database
from tests.support.serve import start_server, stop_server
from tests.support.waiting import wait_for
from trainer.files import METRICS_FILE, read_metrics

PASSWORD = "s3cret-Pw"   # the test PostgreSQL server trusts any password: it must never show
NAMES = {run: f"table_connectivity_{tag}_V5_N256_run{run[1]}"
         for run, tag in [(("s", 1), "standard"), (("s", 2), "standard"), (("s", 3), "standard"),
                          (("l", 1), "lowrank"), (("l", 2), "lowrank"), (("l", 3), "lowrank")]}
EXPECTED = {NAMES["s", 1]: "succeeded", NAMES["s", 2]: "succeeded", NAMES["s", 3]: "failed",
            NAMES["l", 1]: "running", NAMES["l", 2]: "running", NAMES["l", 3]: "pending"}


def get(base: str, path: str):
    try:
        with urllib.request.urlopen(base + path, timeout=30) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def get_json(base: str, path: str):
    status, body, _ = get(base, path)
    assert status == 200, (path, status, body[:500])
    return json.loads(body)


@pytest.fixture(scope="module", params=BACKENDS)
def sweep(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dashboard")
    if request.param == "sqlite":
        url = f"sqlite:///{folder / 'queue.sqlite'}"
    else:
        url = make_url(new_pg_database(request.getfixturevalue("pg_server_url"))).set(
            password=PASSWORD).render_as_string(hide_password=False)
    runs = folder / "runs"
    plan = cli(url, "plan", "--profile", "smoke", "--only", "V=5", "--only", "N=256",
               "--out-root", str(runs))
    assert plan.returncode == 0, plan.stderr
    # standard run3 fails at its first step: its metrics log cannot be written
    doom(runs / "table_connectivity" / NAMES["s", 3], url)
    work = subprocess.run([PYTHON, "-m", "runner", "worker", "--gpu", "cpu", "--threads", "1",
                           "--max-jobs", "3"], cwd=ROOT, env=runner_env(url),
                          capture_output=True, text=True, timeout=600)
    assert work.returncode == 0, work.stderr[-2000:]
    queue = JobQueue(connect(url))
    # lowrank run1, on a live worker in a SLURM array task
    queue.register_worker("testhost:0:4242", "testhost", 4242, None, "cuda:0", 3600,
                          slurm={"slurm_job_id": "80", "slurm_array": "77_3",
                                 "slurm_restarts": 1, "gpus": "1"})
    live = queue.claim("testhost:0:4242", 3600)
    assert live.name == NAMES["l", 1]
    assert queue.progress(live, 12, 0.6125)
    gone = queue.claim("testhost:1:4343", 1)          # lowrank run2: its worker went silent
    time.sleep(1.5)
    proc, base = start_server(url)
    yield SimpleNamespace(url=url, folder=folder, runs=runs, queue=queue, live=live, gone=gone,
                          proc=proc, base=base, backend=request.param)
    stop_server(proc)
    queue.engine.dispose()


def cli_json(url: str, *args: str):
    proc = cli(url, *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# --- the API -------------------------------------------------------------------------------


def test_api_status_is_status_json(sweep):
    api, ref = get_json(sweep.base, "api/status"), cli_json(sweep.url, "status", "--json")
    assert api["counts"] == ref["counts"] == {"pending": 1, "running": 2, "succeeded": 2,
                                              "failed": 1, **{k: 0 for k in ref["counts"]
                                                              if k not in EXPECTED.values()}}
    assert {j["name"]: j["state"] for j in api["jobs"]} == EXPECTED
    for key in ("steps_done", "steps_total", "jobs_left", "live_workers"):
        assert api["progress"][key] == ref["progress"][key], key
    root = str(sweep.runs)
    for mine, theirs in zip(api["jobs"], ref["jobs"], strict=True):
        assert set(mine) == set(theirs)
        for key in set(theirs) - {"heartbeat_age", "elapsed_seconds", "out_dir", "error",
                                  "steps_per_second", "eta_seconds", "stale"}:
            assert mine[key] == theirs[key], (mine["name"], key)
        assert bool(mine.get("stale")) == bool(theirs.get("stale"))   # its text holds an age
        # shown relative to the runs folder; errors with the runs folder written <runs>
        assert Path(theirs["out_dir"]) == sweep.runs / mine["out_dir"]
        assert mine["error"] == (theirs["error"] and theirs["error"].replace(root, "<runs>"))
    failed = next(j for j in api["jobs"] if j["state"] == "failed")
    assert "IsADirectoryError" in failed["error"] and "<runs>/table_connectivity/" in \
        failed["error"]
    running = next(j for j in api["jobs"] if j["name"] == NAMES["l", 1])
    assert (running["step"], running["loss"], running["worker"]) == (12, 0.6125,
                                                                    "testhost:0:4242")
    [worker] = [w for w in api["workers"] if w["name"] == "testhost:0:4242"]
    assert (worker["slurm_array"], worker["slurm_job_id"], worker["slurm_restarts"],
            worker["gpus"]) == ("77_3", "80", 1, "1")


def test_api_results_is_results_json(sweep):
    api, ref = get_json(sweep.base, "api/results"), cli_json(sweep.url, "results", "--json")
    assert api == ref
    gpt2 = next(r for r in api["rows"] if r["model"] == "gpt2")
    assert (gpt2["runs_finished"], gpt2["runs_planned"], gpt2["runs_failed"]) == (2, 3, 1)


def test_api_latest_marks_stale_jobs_and_newest_evaluations(sweep):
    latest = get_json(sweep.base, "api/latest")["jobs"]
    assert {n for n, j in latest.items() if j["stale"]} == {NAMES["l", 2]}
    done = NAMES["s", 1]
    evals = [r for r in read_metrics(sweep.runs / "table_connectivity" / done)
             if "test_accuracy" in r]
    assert latest[done]["eval"]["step"] == evals[-1]["step"] + 1 == 30
    assert latest[done]["eval"]["test_accuracy"] == evals[-1]["test_accuracy"]
    assert latest[NAMES["l", 3]]["eval"] is None


def test_api_job_has_metrics_config_events_and_log(sweep):
    name = NAMES["s", 1]
    doc = get_json(sweep.base, f"api/jobs/{name}")
    folder = sweep.runs / "table_connectivity" / name
    assert doc["metrics"] == read_metrics(folder)
    assert len(doc["metrics"]) == len((folder / METRICS_FILE).read_text().splitlines()) == 30
    assert doc["config"] == next(j["config"] for j in sweep.queue.jobs() if j["name"] == name)
    assert [e["kind"] for e in doc["events"] if e["kind"] != "heartbeat"] == [
        "plan", "claim", "finish"]
    assert "=== attempt 1 by worker" in doc["log_tail"] and "finished: test accuracy" in \
        doc["log_tail"]
    assert doc["job"]["state"] == "succeeded" and doc["files"]["folder"] == \
        f"table_connectivity/{name}"
    failed = get_json(sweep.base, f"api/jobs/{NAMES['s', 3]}")
    assert failed["job"]["state"] == "failed" and "Traceback" in failed["log_tail"]
    assert [e["kind"] for e in failed["events"] if e["kind"] != "heartbeat"][-1] == "fail"
    [claim] = doc["claims"]
    assert (claim["claim"], claim["attempt"], claim["outcome"]) == (1, 1, "succeeded")
    assert claim["worker"] == next(e["worker"] for e in doc["events"] if e["kind"] == "claim")
    assert claim["started_at"] <= claim["ended_at"]
    [claim] = failed["claims"]
    assert claim["outcome"] == "failed" and "metrics.jsonl" in claim["why"]  # the error
    assert claim["why"] == failed["job"]["error"]


@pytest.mark.parametrize("path", [
    "api/jobs/no_such_job", "api/jobs/..", "api/jobs/..%2F..%2Fetc%2Fpasswd",
    "api/jobs/%2Fetc%2Fpasswd", "api/jobs/table_connectivity_standard_V5_N256_run1%00",
    "api/jobs/" + "a" * 300, "api/jobs/.hidden", "static/..%2Fserve.py", "static/index.html",
    "static/../serve.py", "api/nothing"])
def test_unknown_names_and_paths_are_404(sweep, path):
    status, body, _ = get(sweep.base, path)
    assert status == 404, (path, body[:300])
    assert b"root:" not in body and b"import" not in body


def test_nothing_served_shows_a_password_or_an_outside_path(sweep):
    paths = ["", "static/app.js", "api/status", "api/results", "api/latest", "api/info",
             *(f"api/jobs/{name}" for name in EXPECTED)]
    outside = {str(sweep.folder), str(ROOT), str(Path.home()), "/tmp/", "/usr/", "/root"}
    for path in paths:
        status, body, headers = get(sweep.base, path)
        assert status == 200, path
        shown = body.decode()
        assert PASSWORD not in shown, path
        for prefix in outside:
            assert prefix not in shown, (path, prefix)
        assert headers.get("Cache-Control") in ("no-store", "no-cache")
    assert get_json(sweep.base, "api/info")["queue"].startswith(
        "sqlite:///" if sweep.backend == "sqlite" else "postgresql+psycopg://")


def test_only_loopback_host_names_are_answered(sweep):
    request = urllib.request.Request(sweep.base + "api/status", headers={"Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 400


def test_the_server_writes_nothing(sweep):
    before = digest(sweep.url)
    for path in ["", "api/status", "api/results", "api/latest", "figures/sample_complexity.png",
                 *(f"api/jobs/{name}" for name in EXPECTED)]:
        assert get(sweep.base, path)[0] == 200, path
    assert digest(sweep.url) == before


@contextmanager
def database_unavailable(sweep):
    """SQLite: another connection holds an exclusive lock. PostgreSQL: the database refuses
    connections and its sessions are ended. Both undone on exit."""
    url = sweep.url
    sweep.queue.engine.dispose()  # this test's own pooled connections would block the lock
    if url.startswith("sqlite"):
        conn = sqlite3.connect(make_url(url).database, isolation_level=None, timeout=30)
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        try:
            yield "database is locked"
        finally:
            conn.execute("COMMIT")
            conn.execute("PRAGMA locking_mode = NORMAL")
            conn.execute("SELECT count(*) FROM jobs").fetchall()  # gives the lock up
            conn.close()
        return
    name = make_url(url).database
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = :name AND pid <> pg_backend_pid()"), {"name": name})
        try:
            yield "not currently accepting connections"
        finally:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
    admin.dispose()


def test_a_locked_or_unreachable_database_gives_503_and_the_server_goes_on(sweep):
    with database_unavailable(sweep) as reason:
        for path in ("api/status", "api/results", f"api/jobs/{NAMES['s', 1]}"):
            status, body, _ = get(sweep.base, path)
            assert status == 503, (path, status, body[:300])
            doc = json.loads(body)
            assert reason in doc["error"] and PASSWORD not in doc["error"]
            assert str(sweep.folder) not in doc["error"]
        assert get(sweep.base, "")[0] == 200   # the page itself is still served
    assert sweep.proc.poll() is None
    assert get_json(sweep.base, "api/status")["counts"]["succeeded"] == 2


def test_serve_refuses_a_missing_queue_and_a_taken_port(sweep, tmp_path):
    missing = cli(f"sqlite:///{tmp_path}/none/queue.sqlite", "serve")
    assert missing.returncode == 2 and "no queue at" in missing.stderr
    port = sweep.base.rstrip("/").rsplit(":", 1)[1]
    taken = cli(sweep.url, "serve", "--port", port)
    assert taken.returncode == 2, taken.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}: port {port} is in use (choose another " \
           "--port, or 0 for any free one)" in taken.stderr
    assert len(taken.stderr.strip().splitlines()) == 1 and PASSWORD not in taken.stderr


# --- the page in a real browser -------------------------------------------------------------


def rows_by_state(driver) -> dict[str, str]:
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#jobs tbody tr')]"
        ".map(tr => [tr.dataset.name, tr.dataset.state]))")


@pytest.mark.slow
def test_the_page_in_a_browser_shows_the_sweep_and_follows_the_database(sweep, tmp_path):
    driver = chrome()
    try:
        driver.get(sweep.base)
        wait_for(lambda: len(rows_by_state(driver)) == 6, what="six job rows")
        assert rows_by_state(driver) == EXPECTED
        text = driver.find_element("id", "jobs").text
        assert "IsADirectoryError" in text and "12/30" in text and "stale" in text
        assert "testhost:0:4242 (SLURM 77_3, GPU 1)" in text
        assert "succeeded 2" in driver.find_element("id", "counts").text
        wait_for(lambda: driver.execute_script(
            "const img = document.getElementById('figure');"
            "return !img.hidden && img.complete && img.naturalWidth > 0"), what="the figure")

        # filters
        driver.execute_script("const s = document.getElementById('f-state'); s.value='failed';"
                              "s.dispatchEvent(new Event('input'))")
        assert list(rows_by_state(driver).values()) == ["failed"]
        driver.execute_script("const s = document.getElementById('f-state'); s.value='';"
                              "s.dispatchEvent(new Event('input'))")

        # a job's detail: three charts, its config, events and log
        driver.find_element("css selector", f"tr[data-name='{NAMES['s', 1]}']").click()
        wait_for(lambda: driver.execute_script(
            "return document.querySelectorAll('#curves svg polyline').length >= 4"),
            what="the job's curves")
        assert "finished: test accuracy" in driver.find_element("id", "detail-log").text
        assert "train_steps: 30" in driver.find_element("id", "detail-config").text
        assert "finish" in driver.find_element("id", "detail-events").text
        assert "succeeded" in driver.find_element("id", "detail-claims").text
        shot = tmp_path / f"dashboard-{sweep.backend}.png"
        driver.save_screenshot(str(shot))
        keep_artifact(shot)
        driver.find_element("id", "detail-close").click()

        # a change in the database shows up without a reload
        driver.execute_script("window.__sameDocument = 'yes'")
        sweep.queue.finish(sweep.live, {"accuracy": 0.75, "balanced_accuracy": 0.6,
                                        "majority_rate": 0.7})
        wait_for(lambda: rows_by_state(driver)[NAMES["l", 1]] == "succeeded", 20,
                 "the finished job on the page")
        assert driver.execute_script("return window.__sameDocument") == "yes"
        assert "succeeded 3" in driver.find_element("id", "counts").text

        # a database that goes away: a banner, then back to normal, still without a reload
        with database_unavailable(sweep) as reason:
            wait_for(lambda: driver.find_element("id", "banner").is_displayed(), 20, "banner")
            assert reason in driver.find_element("id", "banner").text
        wait_for(lambda: not driver.find_element("id", "banner").is_displayed(), 20,
                 "the banner to go")
        assert driver.execute_script("return window.__sameDocument") == "yes"
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
                  and "503" not in e["message"]]
        assert errors == []
    finally:
        driver.quit()
    assert sweep.proc.poll() is None



# --- the report ------------------------------------------------------------------------------

EXTERNAL = re.compile(
    r"""(?:src|href|action|srcset|poster|data)\s*=\s*["']?\s*(?:[a-z][\w+.-]*:)?//""", re.I)


def test_report_is_one_self_contained_file_with_the_sweep(sweep, tmp_path):
    out = tmp_path / "report.html"
    made = cli(sweep.url, "report", "--out", str(out))
    assert made.returncode == 0, made.stderr
    page = out.read_text()
    assert not EXTERNAL.search(page) and "http://" not in page and "https://" not in page
    assert "url(" not in page and "@import" not in page and "<link" not in page
    images = re.findall(r"<img[^>]*src=\"([^\"]+)\"", page)
    assert len(images) == 2 and all(src.startswith("data:image/png;base64,") for src in images)
    states = {j["name"]: j["state"] for j in sweep.queue.jobs()}  # the browser test moves one
    assert set(states) == set(EXPECTED) and {"succeeded", "failed", "pending"} <= set(
        states.values())
    for name, state in states.items():
        assert re.search(rf"<td class=\"path\">{name}</td><td><span class='state {state}'>",
                         page), name
    assert "profile</dt><dd>smoke</dd>" in page and "overrides</dt><dd>none" in page
    assert "NOT the study as run: differs in " in page
    assert "Failures (1)" in page and "IsADirectoryError" in page and "Traceback" in page
    results = cli_json(sweep.url, "results", "--json")["rows"]
    gpt2 = next(r for r in results if r["model"] == "gpt2")
    assert f"<td>{spread(gpt2['accuracy'])}</td>" in page
    assert PASSWORD not in page and str(sweep.folder) not in page and str(ROOT) not in page


def many_jobs(url: str, count: int, folder) -> JobQueue:
    """A queue of `count` small pending jobs (rows written directly: no plan of the study)."""
    queue = JobQueue(connect(url, create=True))
    queue.plan([{"name": f"many_{i:05d}", "v": 5, "n": 256, "model": "gpt2", "run": 1,
                 "position": i, "cost": 1.0, "config": {}, "out_dir": str(folder / f"m{i}"),
                 "total_steps": 10, "max_attempts": 3, "profile": "smoke", "overrides": []}
                for i in range(count)])
    return queue


@pytest.mark.slow
def test_the_job_table_pages_a_sweep_of_10000_jobs(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    many_jobs(url, 10_000, tmp_path / "runs").engine.dispose()
    proc, base = start_server(url, cwd=tmp_path)
    driver = chrome()
    try:
        started = time.monotonic()
        driver.get(base)
        wait_for(lambda: len(rows_by_state(driver)) == 200, 120, "the first page of rows")
        print(f"10,000 jobs: the first page drawn {time.monotonic() - started:.1f} s after "
              "the page was asked for")
        names = list(rows_by_state(driver))
        assert names[0] == "many_00000" and names[-1] == "many_00199"
        pager = driver.find_element("id", "page-text").text
        assert pager == "rows 1–200 of 10000, page 1 of 50"
        assert driver.find_element("id", "shown").text == "(10000 of 10000 shown)"
        driver.find_element("id", "page-next").click()
        wait_for(lambda: next(iter(rows_by_state(driver)), None) == "many_00200", 30,
                 "the second page")
        assert len(rows_by_state(driver)) == 200
        assert driver.find_element("id", "page-prev").is_enabled()
        # A filter goes back to its first page; a narrow one needs no pager.
        driver.execute_script("const t = document.getElementById('f-text'); t.value='many_0999';"
                              "t.dispatchEvent(new Event('input'))")
        assert list(rows_by_state(driver)) == [f"many_0999{d}" for d in range(10)]
        assert not driver.find_element("id", "page-next").is_displayed()
    finally:
        driver.quit()
        stop_server(proc)


@pytest.mark.slow
def test_report_opens_offline_in_a_browser_with_every_figure(sweep, tmp_path):
    out = tmp_path / "report.html"
    assert cli(sweep.url, "report", "--out", str(out)).returncode == 0
    probe = ("const done = arguments[0];"
             f"fetch('{sweep.base}api/info', {{mode: 'no-cors'}})"
             ".then(() => done(true), () => done(false))")
    # The probe itself: from the same page, an online browser reaches the server.
    online = chrome()
    try:
        online.get(out.as_uri())
        assert online.execute_async_script(probe) is True
    finally:
        online.quit()
    driver = chrome(offline=True)
    try:
        driver.get(out.as_uri())
        state = driver.execute_script(
            "const imgs = [...document.images];"
            "return {n: imgs.length, loaded: imgs.filter(i => i.complete && i.naturalWidth > 0)"
            ".length, title: document.title,"
            "online: navigator.onLine}")
        assert state == {"n": 2, "loaded": 2, "title": "Sweep report", "online": False}
        # the browser really is offline: the server next door cannot be reached from the page
        # (no-cors: an online browser gets an opaque answer, so only the network can fail it)
        assert driver.execute_async_script(probe) is False
        shot = tmp_path / f"report-{sweep.backend}.png"
        driver.save_screenshot(str(shot))
        keep_artifact(shot)
    finally:
        driver.quit()


def test_readme_shows_a_small_dashboard_screenshot():
    shot = ROOT / "docs" / "dashboard.png"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size < 300_000
    assert "](docs/dashboard.png)" in (ROOT / "README.md").read_text()
