"""`export --tensorboard`: event files read back with TensorBoard's own reader.

The jobs are planned for real; their metrics logs are written in the trainer's
format (one JSON record per step, test metrics every 10 steps), so the
export's counting is checked without training anything.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from db import JobQueue, connect
from tests.support.commands import PYTHON, ROOT, cli, runner_env
from tests.support.skips import need
from tests.support.tensorboard import TB, points
from trainer.files import METRICS_FILE


def record(step: int) -> dict:
    rec = {"step": step, "loss": 0.7 - step / 1000, "train_accuracy": 0.5 + step / 100}
    if step % 10 == 0:
        rec.update({"test_accuracy": 0.6, "test_balanced_accuracy": 0.55,
                    "test_majority_rate": 0.7, "test_positive_rate": 0.3, "test_loss": 0.6})
    return rec


def write_metrics(out_dir: str, steps: range, mode: str = "w") -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / METRICS_FILE, mode) as f:
        f.writelines(json.dumps(record(s)) + "\n" for s in steps)


def hparams_of(run_dir: Path) -> dict:
    ea_mod = need("tensorboard.backend.event_processing.event_accumulator", TB)
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = ea_mod.EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


@pytest.fixture
def jobs(db_url, tmp_path):
    need("tensorboardX", TB)
    plan = cli(db_url, "plan", "--profile", "smoke", "--only", "V=5", "--only", "N=256",
               "--only", "model=gpt2", "--out-root", str(tmp_path / "runs"))
    assert plan.returncode == 0, plan.stderr
    queue = JobQueue(connect(db_url))
    found = {j["run"]: j for j in queue.jobs()}
    queue.engine.dispose()
    write_metrics(found[1]["out_dir"], range(30))     # a finished job's 30 steps
    write_metrics(found[2]["out_dir"], range(12))     # one still running
    return found                                      # run 3: nothing yet


def test_export_one_run_per_job_with_every_point_and_the_config(db_url, jobs, tmp_path):
    out = tmp_path / "tb"
    proc = cli(db_url, "export", "--tensorboard", str(out))
    assert proc.returncode == 0, proc.stderr
    # 42 records x (loss, train accuracy) + 5 evaluations x 5 test metrics
    assert "exported 109 new point(s) from 2 job(s)" in proc.stdout
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(
        jobs[r]["name"] for r in (1, 2))
    first = points(out / jobs[1]["name"])
    assert first["train/loss"] == first["train/accuracy"] == list(range(30))
    assert first["test/accuracy"] == first["test/balanced_accuracy"] == [0, 10, 20]
    assert points(out / jobs[2]["name"])["train/loss"] == list(range(12))
    hp = hparams_of(out / jobs[1]["name"])
    assert hp["training.train_steps"] == 30 and hp["model.family"] == "gpt2"
    assert hp["job.run"] == 1 and hp["seeds.run"] == str(jobs[1]["config"]["seeds"]["run"])


def test_export_again_adds_only_new_points(db_url, jobs, tmp_path):
    out = tmp_path / "tb"
    for _ in range(2):
        assert cli(db_url, "export", "--tensorboard", str(out)).returncode == 0
    again = cli(db_url, "export", "--tensorboard", str(out))
    assert "exported 0 new point(s) from 0 job(s)" in again.stdout
    write_metrics(jobs[2]["out_dir"], range(12, 20), "a")
    more = cli(db_url, "export", "--tensorboard", str(out))
    assert "exported 16 new point(s) from 1 job(s)" in more.stdout   # steps 12-19: 8 x 2
    running = points(out / jobs[2]["name"])
    assert running["train/loss"] == list(range(20)) and running["test/accuracy"] == [0, 10]
    assert points(out / jobs[1]["name"])["train/loss"] == list(range(30))
    # a job started over (its log now shorter and different) is written anew, not mixed
    write_metrics(jobs[1]["out_dir"], range(5))
    assert cli(db_url, "export", "--tensorboard", str(out)).returncode == 0
    assert points(out / jobs[1]["name"])["train/loss"] == list(range(5))


def test_export_follow_picks_up_new_points_until_stopped(db_url, jobs, tmp_path):
    out = tmp_path / "tb"
    proc = subprocess.Popen([PYTHON, "-m", "runner", "export", "--tensorboard", str(out),
                             "--follow", "--interval", "0.3"], cwd=ROOT, env=runner_env(db_url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run = out / jobs[2]["name"]
        deadline = time.monotonic() + 60
        while not (run.is_dir() and points(run).get("train/loss") == list(range(12))):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.3)
        write_metrics(jobs[2]["out_dir"], range(12, 25), "a")
        while points(run).get("train/loss") != list(range(25)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert proc.returncode == 0, proc.stderr
    assert points(run)["test/accuracy"] == [0, 10, 20]


def test_export_without_the_writer_says_how_to_install_it(db_url, jobs, tmp_path):
    blocker = tmp_path / "block" / "tensorboardX"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked for this test')\n")
    env = {**runner_env(db_url), "PYTHONPATH": str(blocker.parent)}
    proc = subprocess.run([PYTHON, "-m", "runner", "export", "--tensorboard",
                           str(tmp_path / "tb")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: export --tensorboard needs the tensorboardX package: "
        "pip install -e '.[tensorboard]'"]
