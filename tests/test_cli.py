"""The command line as a user meets it: bad input (exit status 2, one line naming the fault,
database unchanged), help, output formats, database URLs, runs folders."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from db import JobQueue, connect
from tests.support.commands import PYTHON, ROOT, cli, refused_line
from tests.support.queues import GOOD_SWEEP, digest


def sweep_file(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return str(path)


CASES = [
    ("malformed YAML", lambda t: ["plan", "--sweep", sweep_file(t, "grid: [1, 2\n")],
     "invalid YAML"),
    ("missing sweep file", lambda t: ["plan", "--sweep", str(t / "nope.yaml")], "cannot read"),
    ("unknown sweep key", lambda t: ["plan", "--sweep", sweep_file(t, GOOD_SWEEP + "extra: 1\n")],
     "unknown key 'extra'"),
    ("unknown family", lambda t: ["plan", "--sweep", sweep_file(
        t, GOOD_SWEEP.replace("model: [gpt2, lowrank_gpt2]", "model: [gpt2, bert]"))],
     "unknown model family 'bert'"),
    ("bad V", lambda t: ["plan", "--sweep", sweep_file(
        t, GOOD_SWEEP.replace("V: [5, 20]", "V: [0, 5]"))], "grid.V"),
    ("N below batch", lambda t: ["plan", "--sweep", sweep_file(
        t, GOOD_SWEEP.replace("N: [256,", "N: [8,"))], "training.num_training_examples"),
    ("unsafe folder", lambda t: ["plan", "--sweep", sweep_file(
        t, GOOD_SWEEP.replace("folder: table_connectivity}", "folder: ../../etc}"))],
     "models.gpt2.folder"),
    ("bad --only key", lambda t: ["plan", "--only", "W=5"], "--only 'W=5'"),
    ("bad --only value", lambda t: ["plan", "--only", "V=7"], "not in the sweep's V values"),
    ("bad --only int", lambda t: ["plan", "--only", "N=many"], "N must be an integer"),
    ("unknown --set key", lambda t: ["plan", "--set", "training.lr=1"],
     "unknown key 'training.lr'"),
    ("bad --set value", lambda t: ["plan", "--set", "training.batch_size=-4"],
     "training.batch_size"),
    ("unknown profile", lambda t: ["plan", "--profile", "huge"], "unknown profile 'huge'"),
    ("out-root escapes", lambda t: ["plan", "--out-root", "../elsewhere"], "'..' is not allowed"),
    ("requeue unknown", lambda t: ["requeue", "--name", "nope"], "no job named 'nope'"),
    ("requeue nothing", lambda t: ["requeue"], "--failed and/or NAME"),
    ("missing GPU", lambda t: ["worker", "--gpu", "0"], "--gpu 0"),
    ("bad lease", lambda t: ["worker", "--gpu", "cpu", "--lease", "0"], "--lease"),
]


@pytest.mark.parametrize("label, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(planned, tmp_path, label, args,
                                                             message):
    before = digest(planned)
    assert message in refused_line(cli(planned, *args(tmp_path)))
    assert digest(planned) == before


@pytest.mark.parametrize("url, message", [
    ("sqlite:///{tmp}/missing/queue.sqlite", "no queue at"),
    ("postgresql+psycopg://user:s3cret@127.0.0.1:1/db", "cannot reach database"),
    ("mysql://x@localhost/db", "unsupported database"),
    ("not a url", "no queue at not a url"),          # a plain path: a SQLite file
    ("mysql:not-a-url", "invalid database URL"),
])
def test_unusable_database_exits_2_and_hides_the_password(tmp_path, url, message):
    proc = cli(url.format(tmp=tmp_path), "status")
    assert message in refused_line(proc)
    assert "s3cret" not in proc.stderr + proc.stdout
    assert not (tmp_path / "missing").exists()


def test_plan_into_a_fresh_clone_creates_the_queue(tmp_path):
    url = f"sqlite:///{tmp_path / 'new' / 'queue.sqlite'}"
    proc = cli(url, "plan", "--profile", "smoke", "--dry-run")
    assert proc.returncode == 0 and "would plan 60 jobs: 60 new" in proc.stdout
    assert not (tmp_path / "new").exists()
    proc = cli(url, "plan", "--profile", "smoke")
    assert proc.returncode == 0 and "planned 60 jobs: 60 new, 0 already queued" in proc.stdout
    proc = cli(url, "plan", "--profile", "smoke")
    assert "0 new, 60 already queued" in proc.stdout


def test_no_command_prints_the_help_and_exits_0():
    proc = cli("sqlite:///unused.sqlite")
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout and "plan" in proc.stdout and "error" not in proc.stderr
    assert not (ROOT / "unused.sqlite").exists()


COMMANDS = ["plan", "worker", "status", "requeue", "results", "plot", "logs"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_texts_speak_to_users_not_of_source_files(command):
    proc = cli("sqlite:///unused.sqlite", *([command] if command else []), "--help")
    assert proc.returncode == 0, proc.stderr
    for word in (".py", "spec", "§", "section"):
        assert word not in proc.stdout, f"{word!r} in {command} --help"


def test_results_refuses_two_output_formats(planned):
    assert "choose one" in refused_line(cli(planned, "results", "--json", "--csv"))


def test_plan_stores_numbers_typed_as_users_type_them(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    proc = cli(url, "plan", "--profile", "smoke", "--only", "V=5", "--only", "N=256",
               "--set", "training.learning_rate=3e-4", "--out-root", str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stderr
    jobs = JobQueue(connect(url)).jobs()
    assert {j["config"]["training"]["learning_rate"] for j in jobs} == {3e-4}
    assert {j["overrides"] for j in jobs} == {'["training.learning_rate=3e-4"]'}


def test_requeue_takes_a_unique_part_of_a_name(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    assert cli(url, "plan", "--profile", "smoke", "--only", "V=5", "--only", "N=256",
               "--out-root", str(tmp_path / "runs")).returncode == 0
    queue = JobQueue(connect(url))
    claim = queue.claim("w", 60)
    queue.fail(claim, "boom")
    proc = cli(url, "requeue", "--name", "standard_V5_N256_run1")
    assert proc.returncode == 0, proc.stderr
    assert "requeued 1 job(s): table_connectivity_standard_V5_N256_run1" in proc.stdout
    assert "matches 3 jobs" in refused_line(cli(url, "requeue", "--name", "standard_V5"))


@pytest.mark.parametrize("args, message", [
    (["--out-root", "{tmp}/a-file"], "is a file"),
    (["--out-root", "{tmp}/a-file/runs"], "which is a file"),
    (["--out-root", "/proc/runs"], "cannot write in /proc"),
])
def test_plan_refuses_a_runs_folder_jobs_cannot_write(tmp_path, args, message):
    (tmp_path / "a-file").write_text("not a folder")
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    line = refused_line(cli(url, "plan", "--profile", "smoke",
                            *[a.format(tmp=tmp_path) for a in args]))
    assert message in line
    assert not (tmp_path / "q.sqlite").exists()


@pytest.mark.parametrize("url, message", [
    ("sqlite://tmp/x.sqlite", "sqlite:///tmp/x.sqlite"),
    ("sqlite://q.sqlite", "write sqlite:///q.sqlite (three slashes"),  # no folder: no /None
    ("sqlite://{tmp}/x.sqlite", "a SQLite URL has no host"),
])
def test_a_sqlite_url_one_slash_short_is_refused_and_creates_nothing(tmp_path, url, message):
    before = sorted(p.name for p in ROOT.iterdir())
    line = refused_line(cli(url.format(tmp=str(tmp_path).lstrip("/")), "plan", "--profile",
                            "smoke", "--out-root", str(tmp_path / "runs")))
    assert message in line
    assert sorted(p.name for p in ROOT.iterdir()) == before
    assert list(tmp_path.iterdir()) == []


def test_a_plain_path_is_a_sqlite_file(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "runner", "--db", "q.sqlite", "plan", "--profile",
                           "smoke", "--only", "V=5"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "q.sqlite").is_file()
    status = cli(f"sqlite:///{tmp_path / 'q.sqlite'}", "status")
    assert "pending 30" in status.stdout


@pytest.mark.slow  # trains in real worker or trainer processes
def test_make_workers_gives_each_worker_its_log_and_a_share_of_the_cores(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    assert cli(url, "plan", "--profile", "smoke", "--only", "V=5", "--only", "N=256",
               "--out-root", str(tmp_path / "runs")).returncode == 0
    logs = tmp_path / "logs"
    venv = Path(PYTHON).parent.parent  # -o: its stamp is up to date, never reinstalled
    proc = subprocess.run(["make", "--no-print-directory", "-o", f"{venv}/.installed", "workers",
                           'GPUS=cpu cpu', f"DB={url}", f"LOGS={logs}", f"VENV={venv}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    share = max(1, os.cpu_count() // 2)
    assert f"worker 1 on cpu ({share} threads): pid" in proc.stdout
    pids = [int(line.split("pid ")[1].split(",")[0]) for line in proc.stdout.splitlines()]
    assert len(pids) == 2
    deadline = time.monotonic() + 300
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        assert time.monotonic() < deadline, "workers did not finish"
        time.sleep(0.2)
    assert sorted(p.name for p in logs.iterdir()) == ["worker-1-cpu.log", "worker-2-cpu.log"]
    for log in logs.iterdir():
        assert "nothing left to claim" in log.read_text()
    assert JobQueue(connect(url)).counts()["succeeded"] == 6


def test_version_is_the_package_version():
    proc = cli("sqlite:///unused.sqlite", "--version")
    assert proc.returncode == 0, proc.stderr
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert proc.stdout == f"runner {version}\n"
    assert not (ROOT / "unused.sqlite").exists()


def test_trainer_help_shows_each_example_on_its_own_line():
    proc = subprocess.run([PYTHON, "-m", "trainer", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr
    examples = [line.strip() for line in proc.stdout.splitlines()
                if line.strip().startswith("python -m trainer")]
    assert examples == [
        "python -m trainer --family gpt2 --V 5 --N 256 --run 1 --profile smoke --out runs/debug",
        "python -m trainer --config runs/table_connectivity/<name>/config.yaml --out runs/debug"]


@pytest.mark.slow  # trains in real worker or trainer processes
def test_a_config_that_diverges_is_advised_a_config_change_not_a_requeue(tmp_path):
    """A NaN loss comes back on a requeue (training is seeded): status says to change the
    config instead. A real worker trains with a learning rate that diverges at once."""
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    assert cli(url, "plan", "--profile", "smoke", "--only", "V=5", "--only", "N=256",
               "--only", "model=gpt2", "--only", "run=1", "--set", "training.learning_rate=1e30",
               "--set", "training.train_steps=5", "--out-root",
               str(tmp_path / "runs")).returncode == 0
    worker = cli(url, "worker", "--gpu", "cpu", "--threads", "1")
    assert worker.returncode == 1 and "loss became nan" in worker.stderr
    status = cli(url, "status").stdout.splitlines()
    assert status[1].endswith(
        "nothing left to run but 1 job(s) failed: see below, then their loss diverged (NaN), "
        "as it would again with the same config: change the config (e.g. a smaller "
        "training.learning_rate): plan again as before with --replace --set KEY=VALUE")
    from runner.progress import failed_advice

    assert failed_advice(3, 1).endswith("; the others: requeue --failed")
    assert failed_advice(3, 0) == "requeue --failed"

