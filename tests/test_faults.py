"""Storage faults: a checkpoint write that fails half-way, corrupt states, a lost WAL commit.

Each ends with the job finished and bit-identical to an uninterrupted run of its config.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import resource
import shutil
import signal
import sqlite3
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from db import JobQueue, connect
from testing.audit import finishes_per_job, lease_violations
from tests.support.commands import PYTHON, cli, long_job, plan
from tests.support.queues import mark_as_queue_first
from tests.support.training import assert_bit_identical, train_1thread
from trainer import atomic
from trainer import checkpoint as ckpt
from trainer.config import resolve

pytestmark = pytest.mark.slow

ONE_JOB = ["--only", "V=5", "--only", "N=256", "--only", "model=gpt2", "--only", "run=1"]


def worker(db_url, *args, **kw) -> subprocess.CompletedProcess:
    return cli(db_url, "worker", "--gpu", "cpu", "--threads", "1", *args, **kw)


def plan_one(db_url, tmp_path) -> JobQueue:
    return plan(db_url, tmp_path / "runs", *ONE_JOB)


def stop_at(config: dict, out: Path, step: int) -> None:
    stop = threading.Event()
    result = train_1thread(config, out, stop=stop,
                           on_progress=lambda p: stop.set() if p.step == step else None)
    assert (result.outcome, result.step) == ("stopped", step)


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def valid_steps(out: Path) -> list[int]:
    """Steps of the states that load (manifest present, checksum right), newest first."""
    steps = []
    for path in ckpt.list_states(out):
        try:
            steps.append(ckpt._read_state(path)["step"])
        except Exception:
            pass
    return steps


# --- a checkpoint write that fails half-way ---------------------------------------------------


def test_checkpoint_write_past_a_file_size_limit_leaves_the_previous_state(db_url, tmp_path):
    """A worker under RLIMIT_FSIZE: its next state write stops half-way with EFBIG."""
    queue = plan_one(db_url, tmp_path)
    (job,) = queue.jobs()
    out, clean = Path(job["out_dir"]), tmp_path / "clean"
    train_1thread(job["config"], clean)
    state_size = ckpt.list_states(clean)[0].stat().st_size
    snapshot_size = max(p.stat().st_size for p in (clean / ckpt.SNAPSHOT_DIR).iterdir())
    limit = (state_size + snapshot_size) // 2   # snapshots, logs, metrics fit; a state does not
    assert snapshot_size < limit < state_size

    mark_as_queue_first(out, db_url)
    stop_at(job["config"], out, 12)   # states at steps 11 and 12, written without a limit
    before = {p.name: p.read_bytes() for p in (out / ckpt.STATE_DIR).iterdir()}

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = worker(db_url, preexec_fn=limited)
    assert proc.returncode == 1, proc.stderr[-2000:]  # its only job failed
    (job,) = queue.jobs()
    assert job["state"] == "failed" and "File too large" in job["error"], job["error"]
    # The failed write left nothing: the previous states are intact and valid.
    assert temp_files(out) == []
    assert {p.name: p.read_bytes() for p in (out / ckpt.STATE_DIR).iterdir()} == before
    assert valid_steps(out) == [12, 11]

    assert cli(db_url, "requeue", "--failed").returncode == 0
    proc = worker(db_url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (job,) = queue.jobs()
    assert job["state"] == "succeeded"
    assert "resuming at step 12/30" in (out / ckpt.LOG_FILE).read_text()
    assert_bit_identical(out, clean)
    queue.engine.dispose()


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """An uninterrupted run of the smoke config, to compare against."""
    config = resolve("gpt2", 5, 256, 1, "smoke")
    out = tmp_path_factory.mktemp("clean")
    train_1thread(config, out)
    return config, out


@pytest.mark.parametrize("failing", [".pt", ".json"])
def test_disk_full_half_way_through_a_state_or_its_manifest(clean_run, tmp_path, monkeypatch,
                                                            failing):
    """ENOSPC after half the bytes, on the state file or on its manifest (written after it)."""
    config, clean = clean_run
    out = tmp_path / "job"
    stop_at(config, out, 12)
    real = atomic.write_atomic

    def disk_full(path, write, parents=True):
        path = Path(path)
        if path.parent.name == ckpt.STATE_DIR and path.suffix == failing:
            def half(f):
                whole = io.BytesIO()
                write(whole)
                f.write(whole.getvalue()[: len(whole.getvalue()) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, half, parents)
        return real(path, write, parents)

    monkeypatch.setattr(atomic, "write_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train_1thread(config, out)
    monkeypatch.undo()
    assert temp_files(out) == []
    # The state at 16 either was never renamed into place or has no manifest: not trusted.
    assert valid_steps(out) == [12, 11]
    mark = len((out / ckpt.LOG_FILE).read_text())
    assert train_1thread(config, out).outcome == "completed"
    assert "resuming at step 12/30" in (out / ckpt.LOG_FILE).read_text()[mark:]
    assert_bit_identical(out, clean)


def test_temp_files_of_a_killed_write_are_removed_by_the_next_attempt(clean_run, tmp_path):
    """SIGKILL mid-write leaves the temp file behind (no cleanup runs); the next run removes it."""
    config, clean = clean_run
    out = tmp_path / "job"
    stop_at(config, out, 12)
    newest = ckpt.list_states(out)[0]
    torn = [out / ckpt.STATE_DIR / ".state-0000016.pt.k1ll3d.tmp",
            out / ckpt.SNAPSHOT_DIR / ".model-0000020.pt.k1ll3d.tmp"]
    for path in torn:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(newest.read_bytes()[:1000])
    assert train_1thread(config, out).outcome == "completed"
    assert temp_files(out) == []
    assert "removed state/.state-0000016.pt.k1ll3d.tmp" in (out / ckpt.LOG_FILE).read_text()
    assert_bit_identical(out, clean)


# --- a truncated or corrupt newest state --------------------------------------------------------


def _flip_a_byte(state: Path) -> None:
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF           # same size, one bit pattern changed
    state.write_bytes(bytes(data))


def _garbage_manifest(state: Path) -> None:
    state.with_suffix(".json").write_text('{"step": 16, "bytes": ')


def _snapshot_as_state(state: Path) -> None:
    """Valid bytes with a matching manifest, but not a training state (model weights only)."""
    data = next((state.parent.parent / ckpt.SNAPSHOT_DIR).iterdir()).read_bytes()
    state.write_bytes(data)
    state.with_suffix(".json").write_text(json.dumps(
        {"step": 16, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))


def _both_corrupt(state: Path) -> None:
    for path in ckpt.list_states(state.parent.parent):
        path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("corrupt, resumes_at", [
    (_flip_a_byte, 11), (_garbage_manifest, 11), (_snapshot_as_state, 11), (_both_corrupt, None),
], ids=["flipped byte", "garbage manifest", "snapshot posing as a state", "every state bad"])
def test_corrupt_newest_state_is_detected_and_the_job_falls_back(clean_run, tmp_path, corrupt,
                                                                  resumes_at):
    config, clean = clean_run
    out = tmp_path / "job"
    stop_at(config, out, 16)
    newest = ckpt.list_states(out)[0]
    assert newest.name == "state-0000016.pt"
    corrupt(newest)
    mark = len((out / ckpt.LOG_FILE).read_text())
    assert train_1thread(config, out).outcome == "completed"
    log = (out / ckpt.LOG_FILE).read_text()[mark:]
    assert "ignoring state/state-0000016.pt" in log
    if resumes_at is None:
        assert "ignoring state/state-0000011.pt" in log and "starting gpt2" in log
    else:
        assert f"resuming at step {resumes_at}/30" in log
    assert_bit_identical(out, clean)


# --- the database loses the WAL's last transaction ----------------------------------------------


WAL_HEADER, FRAME_HEADER = 32, 24


def wal_commits(wal: Path) -> tuple[int, list[int]]:
    """(frame size, byte offsets where each committed transaction's frames end)."""
    data = wal.read_bytes()
    magic, _, page_size, _, salt1, salt2 = struct.unpack(">IIIIII", data[:24])
    assert magic in (0x377F0682, 0x377F0683), "not a WAL file"
    frame = FRAME_HEADER + page_size
    ends, offset = [], WAL_HEADER
    while offset + frame <= len(data):
        _, commit_size, s1, s2 = struct.unpack(">IIII", data[offset:offset + 16])
        if (s1, s2) != (salt1, salt2):
            break                      # frames of an earlier WAL generation: not live
        offset += frame
        if commit_size:                # a commit frame ends a transaction
            ends.append(offset)
    return frame, ends


def state_after_cut(db: Path, wal: Path, size: int, tmp_path: Path) -> str:
    """The job's state if the WAL were cut at `size` bytes (on copies of the files)."""
    trial = tmp_path / "trial" / "queue.sqlite"
    trial.parent.mkdir(exist_ok=True)
    shutil.copy(db, trial)
    shutil.copy(wal, f"{trial}-wal")
    with open(f"{trial}-wal", "r+b") as f:
        f.truncate(size)
    conn = sqlite3.connect(trial)
    state = conn.execute("SELECT state FROM jobs").fetchone()[0]
    conn.close()
    shutil.rmtree(trial.parent)
    return state


def test_losing_the_wal_s_last_transaction_loses_no_finished_result(tmp_path):
    """A crash during the finish's commit: its frames never fully reach the WAL.

    A second process keeps a connection open so that the worker's exit does not checkpoint
    the WAL into the database; it is then SIGKILLed (no checkpoint either). The WAL is cut
    in the middle of the last transaction's frames, and the shared-memory index removed,
    as after a power loss: SQLite's recovery drops the torn transaction.
    """
    db = tmp_path / "queue.sqlite"
    url = f"sqlite:///{db}"
    proc = cli(url, "plan", "--profile", "smoke", "--out-root", str(tmp_path / "runs"),
               *ONE_JOB)
    assert proc.returncode == 0, proc.stderr
    holder = subprocess.Popen(
        [PYTHON, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
         "c.execute('select count(*) from jobs').fetchall(); print('ready', flush=True); "
         "sys.stdin.read()", str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        done = worker(url, "--lease", "2")
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    wal = Path(f"{db}-wal")
    frame, ends = wal_commits(wal)
    assert len(ends) >= 2

    # Before the crash, as the files are now: succeeded.
    intact = tmp_path / "intact.sqlite"
    shutil.copy(db, intact)
    shutil.copy(wal, f"{intact}-wal")
    queue = JobQueue(connect(f"sqlite:///{intact}"))
    (job,) = queue.jobs()
    assert job["state"] == "succeeded"
    out = Path(job["out_dir"])
    result = {name: (out / name).read_bytes() for name in (ckpt.EVAL_FILE, ckpt.METRICS_FILE)}
    final = ckpt.list_states(out)[0].read_bytes()
    queue.engine.dispose()

    # The crash: the finish's frames cut half-way (the worker's own bookkeeping, which
    # commits after it, is lost with it), the -shm index gone.
    cut = next(end + frame // 2 for end in reversed(ends[:-1])
               if state_after_cut(db, wal, end + frame // 2, tmp_path) == "running")
    with open(wal, "r+b") as f:
        f.truncate(cut)
    Path(f"{db}-shm").unlink(missing_ok=True)
    queue = JobQueue(connect(url))
    (job,) = queue.jobs()
    assert job["state"] == "running", "the lost transaction should have been the finish"
    assert finishes_per_job(queue.events()) == {}

    # The job is finished again from its final state: same result, nothing retrained.
    time.sleep(2.5)   # past the lease of the worker that is gone
    again = worker(url, "--lease", "2")
    assert again.returncode == 0, again.stderr[-2000:]
    (job,) = queue.jobs()
    assert (job["state"], job["attempts"]) == ("succeeded", 2)
    assert "resuming at step 30/30" in (out / ckpt.LOG_FILE).read_text()
    assert {name: (out / name).read_bytes() for name in result} == result
    assert ckpt.list_states(out)[0].read_bytes() == final
    events = queue.events()
    assert finishes_per_job(events) == {job["id"]: 1}
    assert lease_violations(events) == []
    queue.engine.dispose()


# --- a claimed job's lease must be kept from the moment it is claimed --------------------------


def test_first_heartbeat_comes_within_the_lease_of_the_claim(tmp_path):
    url = f"sqlite:///{tmp_path / 'queue.sqlite'}"
    # 400 steps: the job outlasts its 1 s lease, so beats are due (the 30-step smoke job can
    # finish before the first one, a quarter of the lease in).
    long_job(url, tmp_path).engine.dispose()
    proc = worker(url, "--lease", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    queue = JobQueue(connect(url))
    events = queue.events()
    queue.engine.dispose()
    seen = [(e["kind"], e["token"]) for e in events]
    (finish,) = [e for e in events if e["kind"] == "finish"]
    (claim,) = [e for e in events if e["kind"] == "claim" and e["token"] == finish["token"]]
    assert finish["at"] - claim["at"] > 1.0, "the job must outlast the lease for this test"
    beats = [e for e in events if e["kind"] == "heartbeat" and e["token"] == claim["token"]]
    assert beats, f"no heartbeat from the attempt that finished: {seen}"
    beat = beats[0]
    assert beat["at"] - claim["at"] < 1.0, f"first heartbeat {beat['at'] - claim['at']:.1f}s " \
                                           "after the claim, lease 1s"
