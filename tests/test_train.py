"""The trainer: exact resume after a stop or a SIGKILL, corrupt-state fallback, folder lock,
checkpoints written in the background, precision."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.support.commands import ROOT
from trainer import checkpoint as ckpt
from trainer.config import ConfigError, resolve
from trainer.train import FolderBusy, FolderMoved, run


def smoke(family="lowrank_gpt2", V=5, steps=23, **more):
    sets = [f"training.train_steps={steps}", *(f"{k}={v}" for k, v in more.items())]
    return resolve(family, V, 256, 1, "smoke", sets)


def final_weights(out: Path) -> dict:
    newest = ckpt.list_states(out)[0]
    return torch.load(newest, weights_only=True)["model"]


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert (a / ckpt.METRICS_FILE).read_text() == (b / ckpt.METRICS_FILE).read_text()
    assert json.loads((a / ckpt.EVAL_FILE).read_text()) == json.loads(
        (b / ckpt.EVAL_FILE).read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run per family, to compare resumed runs against."""
    out = {}
    for family in ("gpt2", "lowrank_gpt2"):
        path = tmp_path_factory.mktemp(family)
        result = run(smoke(family), path)
        assert result.outcome == "completed" and result.step == 23
        out[family] = path
    return out


@pytest.mark.parametrize("family", ["gpt2", "lowrank_gpt2"])
def test_stop_at_an_awkward_step_then_resume_is_bit_exact(family, reference, tmp_path):
    stop = threading.Event()
    seen = []

    def on_progress(p):
        seen.append(p.step)
        if p.step == 7:  # between two saves (every 5)
            stop.set()

    first = run(smoke(family), tmp_path, on_progress=on_progress, stop=stop)
    assert first.outcome == "stopped" and first.step == 7
    assert seen[-1] == 7
    second = run(smoke(family), tmp_path)
    assert second.outcome == "completed"
    assert "resuming at step 7/23" in (tmp_path / ckpt.LOG_FILE).read_text()
    assert_same_run(reference[family], tmp_path)


@pytest.mark.slow  # trains in real worker or trainer processes
def test_sigkill_mid_run_then_resume_is_bit_exact(reference, tmp_path):
    cmd = [sys.executable, "-m", "trainer", "--family", "lowrank_gpt2", "--V", "5", "--N", "256",
           "--profile", "smoke", "--set", "training.train_steps=23", "--out", str(tmp_path)]
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (tmp_path / ckpt.STATE_DIR / "state-0000011.json").exists():
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (tmp_path / ckpt.EVAL_FILE).exists(), "killed too late to test anything"
    result = run(smoke(), tmp_path)
    assert result.outcome == "completed"
    assert_same_run(reference["lowrank_gpt2"], tmp_path)


def test_corrupt_latest_state_falls_back_to_the_previous_one(reference, tmp_path):
    stop = threading.Event()
    run(smoke(), tmp_path, stop=stop,
        on_progress=lambda p: stop.set() if p.step == 16 else None)
    newest = ckpt.list_states(tmp_path)[0]
    assert newest.name == "state-0000016.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated, as by a dying disk
    result = run(smoke(), tmp_path)
    assert result.outcome == "completed"
    log = (tmp_path / ckpt.LOG_FILE).read_text()
    assert "ignoring state/state-0000016.pt" in log
    assert "resuming at step 11/23" in log
    assert_same_run(reference["lowrank_gpt2"], tmp_path)


def test_state_without_manifest_is_ignored(tmp_path):
    stop = threading.Event()
    run(smoke(), tmp_path, stop=stop, on_progress=lambda p: stop.set() if p.step == 3 else None)
    for manifest in (tmp_path / ckpt.STATE_DIR).glob("*.json"):
        manifest.unlink()
    run(smoke(steps=4), tmp_path)
    lines = (tmp_path / ckpt.LOG_FILE).read_text().splitlines()
    last_start = [line for line in lines if " starting " in line or " resuming " in line][-1]
    assert "starting lowrank_gpt2" in last_start


def test_resume_refuses_a_different_config(tmp_path):
    run(smoke(steps=3), tmp_path)
    with pytest.raises(ConfigError, match="model.n_embd"):
        run(smoke(steps=3, **{"model.n_embd": 16}), tmp_path)
    # Extending a finished run is allowed: it continues from its last state.
    assert run(smoke(steps=5), tmp_path).step == 5


@pytest.mark.parametrize("key, value", [
    ("training.learning_rate", "0.001"), ("seeds.run", "7"), ("seeds.pool", "1"),
    ("training.task_kwargs.rho", "0.25"), ("training.num_training_examples", "512"),
    ("training.batch_size", "8"), ("evaluation.eval_examples", "64")])
def test_resume_refuses_a_state_trained_with_another_setting(tmp_path, key, value):
    """Not only the model's shape: a state trained with another learning rate, seed, rho, N,
    batch or eval set would make a mixed run. Refused, naming the key; the folder is left
    as it was."""
    run(smoke(steps=3), tmp_path)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file())
    with pytest.raises(ConfigError, match=rf"different config \({key}\); use a new folder"):
        run(smoke(steps=5, **{key: value}), tmp_path)
    after = sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()
                   if p.name != ckpt.LOG_FILE)
    assert after == [entry for entry in before if entry[0] != ckpt.LOG_FILE]


def test_folder_is_locked_against_a_second_trainer(tmp_path):
    import filelock

    with filelock.FileLock(str(tmp_path / ckpt.LOCK_FILE)):
        with pytest.raises(FolderBusy):
            run(smoke(steps=2), tmp_path)


def test_runs_in_one_process_do_not_leak_state(tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = run(smoke(steps=4), tmp_path / "a")
    b = run(smoke(steps=4), tmp_path / "b")
    assert a.metrics == b.metrics
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.are_deterministic_algorithms_enabled()


def test_no_temp_files_are_left_behind(tmp_path):
    run(smoke(steps=6), tmp_path)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {family: transformer}\n")
    proc = subprocess.run([sys.executable, "-m", "trainer", "--config", str(bad), "--out",
                           str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2
    assert "bad.yaml" in proc.stderr and "missing key" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_the_log_shows_the_run_moving_and_progress_carries_the_newest_evaluation(tmp_path):
    seen = []
    run(smoke(steps=23), tmp_path, on_progress=seen.append)
    lines = (tmp_path / ckpt.LOG_FILE).read_text().splitlines()
    moving = [line.split(" ", 2)[2] for line in lines if ": loss " in line]
    assert [m.split(":")[0] for m in moving] == ["step 1/23", "step 11/23", "step 21/23"]
    evals = [r for r in ckpt.read_metrics(tmp_path) if "test_accuracy" in r]
    assert moving[1].endswith(f"test accuracy {evals[1]['test_accuracy']:.4f}, balanced "
                              f"{evals[1]['test_balanced_accuracy']:.4f}")
    assert seen[0].test["accuracy"] == evals[0]["test_accuracy"]     # step 1: evaluated
    assert seen[5].test == seen[0].test                              # the newest so far
    assert seen[10].test["accuracy"] == evals[1]["test_accuracy"]    # step 11


def test_a_folder_moved_away_while_training_gets_no_more_writes(tmp_path):
    out, aside = tmp_path / "job", tmp_path / "job.replaced"

    def move(p):
        if p.step == 3:
            out.rename(aside)

    with pytest.raises(FolderMoved):
        run(smoke(steps=10), out, on_progress=move)
    assert not out.exists()
    assert [r["step"] for r in ckpt.read_metrics(aside)] == [0, 1, 2]



def test_a_write_that_failed_because_the_folder_moved_stops_the_run_as_moved(tmp_path,
                                                                            monkeypatch):
    """The move is noticed first through the failed background write (at the next step's
    start, before the folder's own check): the run still stops with FolderMoved, which the
    worker reads as a replaced job, not with the write's FileNotFoundError."""
    out, aside = tmp_path / "job", tmp_path / "job.replaced"
    moved, real_save = threading.Event(), ckpt.save_state

    def save_after_the_move(folder, state):
        if state["step"] == 6:
            assert moved.wait(30)
        return real_save(folder, state)

    def move(p):
        if p.step == 7:  # the state after step 6 is being written
            out.rename(aside)
            moved.set()
            for thread in threading.enumerate():
                if thread.name == "checkpoint-writer":
                    thread.join(30)  # its write has failed before the next step starts

    monkeypatch.setattr(ckpt, "save_state", save_after_the_move)
    with pytest.raises(FolderMoved):
        run(smoke(steps=10, **{"training.save_every_steps": 5}), out, on_progress=move)
    assert not out.exists()
    assert [r["step"] for r in ckpt.read_metrics(aside)] == list(range(7))

# --- checkpoints written in the background ------------------------------------------------------


def test_checkpoint_writes_overlap_training_and_hold_their_own_step(reference, tmp_path,
                                                                    monkeypatch):
    """The state after step 6 is written while training runs on to step 9, on another thread;
    it still holds step 6 exactly: a run resumed from it ends bit-identical."""
    reached_9, writers = threading.Event(), []
    real_save = ckpt.save_state

    def slow_save(out, state):
        writers.append(threading.current_thread().name)
        if state["step"] == 6:
            assert reached_9.wait(30), "training did not go on while the state was written"
        return real_save(out, state)

    monkeypatch.setattr(ckpt, "save_state", slow_save)
    stop = threading.Event()

    def on_progress(p):
        if p.step == 9:
            reached_9.set()
            stop.set()

    result = run(smoke(), tmp_path, on_progress=on_progress, stop=stop)
    monkeypatch.undo()
    # The stop waited for both writes: the state at 9 is complete when run() returns.
    assert (result.outcome, result.step) == ("stopped", 9)
    assert [ckpt._read_state(p)["step"] for p in ckpt.list_states(tmp_path)] == [9, 6]
    assert set(writers) == {"checkpoint-writer"}
    assert not [t for t in threading.enumerate() if t.name == "checkpoint-writer"]
    for path in (ckpt.list_states(tmp_path)[0], ckpt.list_states(tmp_path)[0].with_suffix(".json")):
        path.unlink()
    assert run(smoke(), tmp_path).outcome == "completed"
    assert "resuming at step 6/23" in (tmp_path / ckpt.LOG_FILE).read_text()
    assert_same_run(reference["lowrank_gpt2"], tmp_path)


def test_a_failed_background_write_fails_the_run(tmp_path, monkeypatch):
    def disk_full(out, state):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_state", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run(smoke(), tmp_path)
    assert ckpt.list_states(tmp_path) == []


# --- precision ----------------------------------------------------------------------------------


def test_bad_precision_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.precision.*fp32, tf32, bf16"):
        smoke(**{"training.precision": "fp16"})
    proc = subprocess.run([sys.executable, "-m", "trainer", "--profile", "smoke", "--set",
                           "training.precision=fp64", "--out", str(tmp_path / "o")], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "training.precision" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_bf16_autocast_trains_on_cpu_and_resumes_bit_exact(reference, tmp_path):
    config = smoke(**{"training.precision": "bf16"})
    whole = run(config, tmp_path / "whole")
    assert whole.outcome == "completed"
    records = ckpt.read_metrics(tmp_path / "whole")
    assert len(records) == 23 and all(math.isfinite(r["loss"]) for r in records)
    assert "precision: bf16" in (tmp_path / "whole" / ckpt.CONFIG_FILE).read_text()
    # bf16 really ran: the losses are not the float32 run's.
    fp32 = ckpt.read_metrics(reference["lowrank_gpt2"])
    assert [r["loss"] for r in records] != [r["loss"] for r in fp32]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(records, fp32, strict=True)) < 0.05

    stop = threading.Event()
    first = run(config, tmp_path / "resumed", stop=stop,
                on_progress=lambda p: stop.set() if p.step == 8 else None)
    assert (first.outcome, first.step) == ("stopped", 8)
    assert run(config, tmp_path / "resumed").outcome == "completed"
    assert_same_run(tmp_path / "whole", tmp_path / "resumed")


@pytest.mark.parametrize("precision, inside", [("tf32", "high"), ("fp32", "highest"),
                                               ("bf16", "highest")])
def test_tf32_only_where_asked_and_restored(precision, inside):
    from trainer.train import float32_matmuls

    before = torch.get_float32_matmul_precision()
    with float32_matmuls(precision, torch.device("cuda")):  # no GPU needed to set the switch
        assert torch.get_float32_matmul_precision() == inside
    assert torch.get_float32_matmul_precision() == before
    with float32_matmuls(precision, torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == before
