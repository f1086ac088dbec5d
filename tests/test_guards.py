"""Guards pinned by exact values: each test fails when its guard is removed (tests/mutants.py
removes them one by one).

Balanced accuracy is the mean of the recalls, a state must agree with its manifest, a file is
replaced atomically and durably, and a reused pid is not the dead worker's process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import update

from db.engine import db_now
from db.models import Job
from runner.liveness import HOST, dead_reason, process_token
from tests.support.commands import ROOT
from tests.support.queues import rows
from trainer import atomic
from trainer import checkpoint as ckpt
from trainer.train import scores

# --- scores -----------------------------------------------------------------------------


def test_scores_of_a_known_confusion():
    # 4 positives (3 found: recall 3/4), 2 negatives (both found: recall 1).
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -2.0, -0.5])
    y = torch.tensor([1, 1, 1, 1, -1, -1])
    got = scores(logits, y)
    assert got["accuracy"] == pytest.approx(5 / 6)
    assert got["balanced_accuracy"] == pytest.approx((3 / 4 + 1) / 2)  # 0.875, not max 1.0
    assert got["majority_rate"] == pytest.approx(4 / 6)
    assert got["positive_rate"] == pytest.approx(4 / 6)
    expected_loss = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, (y > 0).float()).item()
    assert got["loss"] == pytest.approx(expected_loss)


def test_scores_with_one_class_present():
    # Only negatives: balanced accuracy is that one class's recall (2 of 3), not half of it.
    got = scores(torch.tensor([-1.0, -3.0, 0.25]), torch.tensor([-1, -1, -1]))
    assert got["balanced_accuracy"] == pytest.approx(2 / 3)
    assert got["majority_rate"] == 1.0 and got["positive_rate"] == 0.0


def test_a_zero_logit_is_a_negative_prediction():
    got = scores(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([-1, -1, 1]))
    assert got["accuracy"] == pytest.approx(2 / 3)
    assert got["balanced_accuracy"] == pytest.approx(0.5)


# --- checkpoint manifests ----------------------------------------------------------------


def tiny_state(step: int) -> dict:
    return {"model": {"w": torch.full((2,), float(step))}, "optimizer": {}, "step": step,
            "rng": {}, "config": {}}


def rewrite_manifest(state: Path, **changes) -> None:
    manifest = state.with_suffix(".json")
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), **changes}))


@pytest.mark.parametrize("change", [{"step": 19}, {"bytes": 1}, {"sha256": "0" * 64}],
                         ids=["step", "bytes", "sha256"])
def test_a_state_disagreeing_with_its_manifest_is_skipped(tmp_path, change):
    ckpt.save_state(tmp_path, tiny_state(10))
    newest = ckpt.save_state(tmp_path, tiny_state(20))
    rewrite_manifest(newest, **change)
    logged = []
    state = ckpt.load_latest_state(tmp_path, logged.append)
    assert state["step"] == 10 and torch.equal(state["model"]["w"], torch.full((2,), 10.0))
    (line,) = logged
    assert line.startswith("ignoring state/state-0000020.pt: ")
    reason = {"step": "step does not match its manifest"}.get(next(iter(change)),
                                                              "size or checksum mismatch")
    assert reason in line


def test_a_state_whose_manifest_matches_is_loaded(tmp_path):
    path = ckpt.save_state(tmp_path, tiny_state(20))
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["step"] == 20 and manifest["bytes"] == path.stat().st_size
    assert manifest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ckpt.load_latest_state(tmp_path, print)["step"] == 20


def test_only_the_newest_states_are_kept(tmp_path):
    for step in (10, 20, 30):
        ckpt.save_state(tmp_path, tiny_state(step))
    assert [p.name for p in ckpt.list_states(tmp_path)] == ["state-0000030.pt",
                                                           "state-0000020.pt"]
    assert sorted(p.name for p in (tmp_path / ckpt.STATE_DIR).iterdir()) == [
        "state-0000020.json", "state-0000020.pt", "state-0000030.json", "state-0000030.pt"]


@pytest.mark.parametrize("write", [lambda out: ckpt.save_state(out, tiny_state(10)),
                                   lambda out: ckpt.save_snapshot(out, 10, {})],
                         ids=["state", "snapshot"])
def test_a_late_background_write_does_not_bring_a_moved_folder_back(tmp_path, write):
    """A write in flight when the job's folder is moved aside (replace, fresh) fails instead
    of recreating the folder at its old path for a later run to trust."""
    out = tmp_path / "job"
    out.mkdir()
    out.rename(tmp_path / "job.replaced")
    with pytest.raises(FileNotFoundError):
        write(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.replaced"]


def test_a_dict_that_is_not_a_training_state_is_skipped(tmp_path):
    ckpt.save_state(tmp_path, tiny_state(10))
    ckpt.save_state(tmp_path, {"model": {}, "step": 20})  # checksummed, but no optimiser, RNGs
    logged = []
    assert ckpt.load_latest_state(tmp_path, logged.append)["step"] == 10
    assert logged == ["ignoring state/state-0000020.pt: not a training state; falling back"]


# --- atomic writes --------------------------------------------------------------------------


def test_an_atomic_write_is_synced_before_and_after_its_rename(tmp_path, monkeypatch):
    """The data reaches the disk before the rename makes it visible, and the rename itself
    is synced (the folder): the order of the real calls, recorded as they pass through."""
    calls = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src, dst):
        calls.append(("replace", str(src), str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    target = tmp_path / "out.json"
    atomic.write_bytes_atomic(target, b"new")
    (_, temp), (_, src, dst), (_, folder) = calls
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"]
    assert (src, dst, folder) == (temp, str(target), str(tmp_path))
    assert Path(temp).parent == tmp_path and Path(temp).name.startswith(".out.json.")
    assert target.read_bytes() == b"new"


def test_a_reader_of_the_old_file_keeps_it_whole(tmp_path):
    target = tmp_path / "metrics.jsonl"
    target.write_bytes(b"old line\n")
    with open(target, "rb") as reader:
        atomic.write_bytes_atomic(target, b"new\n")
        assert reader.read() == b"old line\n"  # a rename: never rewritten in place
    assert target.read_bytes() == b"new\n"


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "eval.json"
    target.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic.write_atomic(target, half_then_fail)
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]
    assert target.read_bytes() == b"old"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_an_atomic_write_gives_the_file_the_mode_open_would(tmp_path, umask, mode):
    """mkstemp's 0600 is not kept: a figure or report is as readable as a plain open() under
    the user's umask would make it."""
    target = tmp_path / "figure.png"
    code = ("import sys; from pathlib import Path; from trainer import atomic; "
            "atomic.write_bytes_atomic(Path(sys.argv[1]), b'png')")
    subprocess.run(["sh", "-c", f'umask {umask:03o} && exec "$0" -c "$1" "$2"', sys.executable,
                    code, str(target)], cwd=ROOT, check=True, timeout=60)
    assert target.stat().st_mode & 0o777 == mode
    assert target.read_bytes() == b"png"


# --- a reused pid --------------------------------------------------------------------------


@pytest.fixture
def other_process():
    """A live process that is not a worker: what a dead worker's pid may now belong to."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_reused_pid_is_not_the_dead_workers_process(other_process):
    pid = other_process.pid
    name = f"{HOST}:cpu:{pid}"
    # The worker that recorded this token was another process (an earlier start time).
    boot, start = process_token(pid).rsplit(":", 1)
    earlier = f"{boot}:{int(start) - 1}"
    assert dead_reason(name, earlier) == f"pid {pid} now belongs to another process"
    assert dead_reason(name, process_token(pid)) is None  # the very process: maybe alive
    assert dead_reason(name, None) is None                # nothing recorded: maybe alive


def test_reclaim_takes_a_job_whose_pid_was_reused(queue, other_process):
    pid = other_process.pid
    name = f"{HOST}:cpu:{pid}"
    boot, start = process_token(pid).rsplit(":", 1)
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    queue.register_worker(name, HOST, pid, f"{boot}:{int(start) - 1}", "cpu", 600)
    claim = queue.claim(name, 600)
    assert queue.reclaim_dead(HOST, dead_reason, by="test") == [
        (claim.name, f"worker {name}: pid {pid} now belongs to another process")]
    (job,) = queue.jobs()
    assert (job["state"], job["lease_token"]) == ("pending", None)


def test_reclaim_judges_only_this_hosts_workers(queue):
    """A pid means nothing on another host: its job waits for its lease."""
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    gone = subprocess.Popen(["true"])
    gone.wait()
    queue.claim(f"elsewhere:cpu:{gone.pid}", 600)
    assert queue.reclaim_dead(HOST, dead_reason, by="test") == []
    assert queue.counts()["running"] == 1


def test_a_job_out_of_attempts_expiring_between_settling_and_selecting_is_not_taken(
        queue, monkeypatch):
    """Its last attempt's lease expires after the claim settled the expired jobs and before
    it selects one: the select itself must refuse a job out of attempts (as it refuses one
    asked to cancel)."""
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    (job,) = queue.jobs()
    for attempt in range(1, job["max_attempts"] + 1):
        claim = queue.claim(f"w{attempt}", 1.0)
        assert claim.attempt == attempt
        if attempt < job["max_attempts"]:
            time.sleep(1.1)
    settle = queue._settle_expired

    def settle_then_expire(conn):
        settle(conn)
        time.sleep(1.2)

    monkeypatch.setattr(queue, "_settle_expired", settle_then_expire)
    assert queue.claim("other", 60) is None
    monkeypatch.undo()
    assert queue.claim("other", 60) is None
    (job,) = queue.jobs()
    assert (job["state"], job["attempts"]) == ("failed", job["max_attempts"])


def test_a_claim_whose_read_went_stale_takes_nothing(queue, monkeypatch):
    """The claim's update is fenced on the lease token it read: if the row changed after the
    read (a lock that did not hold), the claim takes nothing rather than a second lease."""
    queue.plan(rows("V=5", "N=256", "model=gpt2", "run=1"))
    first = queue.claim("w1", 0.3)
    time.sleep(0.4)  # expired: claimable
    claimable = queue._claimable

    def renewed_after_the_read(conn, ordering):
        row = claimable(conn, ordering)
        conn.execute(update(Job).where(Job.id == row.id).values(heartbeat_at=db_now()))
        conn.execute(update(Job).where(Job.id == row.id).values(lease_token="renewed"))
        return row

    monkeypatch.setattr(queue, "_claimable", renewed_after_the_read)
    assert queue.claim("w2", 60) is None
    (job,) = queue.jobs()
    assert (job["state"], job["worker"], job["lease_token"]) == ("running", "w1", "renewed")
    assert [e["kind"] for e in queue.events()] == ["plan", "claim"]  # no expiry of w1's lease
    assert first.attempt == 1
