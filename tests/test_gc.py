"""`gc`: per job it keeps the newest valid state and every snapshot, frees exactly the rest,
and never touches a running job's folder."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import filelock
import pytest

from db import JobQueue
from runner.disk import Collection, collect_job, human_bytes
from tests.support.commands import cli, plan, refused_line
from trainer import checkpoint as ckpt
from trainer.train import run as train

STEPS = 12  # states at steps 11 and 12 (the final one), a snapshot at step 10


def plan_cell(db_url: str, tmp_path: Path, *only: str) -> JobQueue:
    """The cell V=5, N=256, run 1 (both models; `only`: fewer), STEPS steps a job."""
    return plan(db_url, tmp_path / "runs", "--only", "V=5", "--only", "N=256", "--only", "run=1",
                *(f"--only={o}" for o in only), "--set", f"training.train_steps={STEPS}")


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under `root`: its size and sha256, by path relative to `root`."""
    return {str(p.relative_to(root)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def listed(output: str, verb: str) -> dict[str, str]:
    """The paths a gc report lists as removed (or to remove), with their sizes as shown."""
    return {m.group(1): m.group(2) for m in re.finditer(rf"^{verb} (\S+)  \(.*, ([^,]+)\)$",
                                                           output, re.M)}


def freed(output: str, verb: str = "freed") -> int:
    return int(re.search(rf"^{verb} \S+ \S+ \((\d+) bytes\)", output, re.M).group(1))


def add_leftovers(folder: Path) -> dict[Path, str]:
    """What a crash or an old trainer may leave in a job folder, and why each is garbage."""
    state = folder / ckpt.STATE_DIR
    newest = ckpt.list_states(folder)[0]
    leftovers = {
        state / "state-0000020.pt": "killed before its manifest was written",
        state / "state-0000005.json": "manifest whose state was pruned",
        state / ".state-0000013.pt.k2j.tmp": "unfinished write",
        folder / ckpt.SNAPSHOT_DIR / ".model-0000020.pt.a8f.tmp": "unfinished write",
        folder / ".metrics.jsonl.x1.tmp": "unfinished write",
    }
    shutil.copyfile(newest, state / "state-0000020.pt")
    (state / "state-0000005.json").write_text('{"step": 5}\n')
    for path, why in leftovers.items():
        if why == "unfinished write":
            path.write_bytes(b"\0" * 1000)
    return leftovers


@pytest.mark.slow  # trains in real worker or trainer processes
def test_gc_frees_old_and_invalid_states_and_leftovers_and_the_job_still_resumes(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'queue.sqlite'}"
    queue = plan_cell(db_url, tmp_path)
    proc = cli(db_url, "worker", "--gpu", "cpu", "--threads", "1")  # a real smoke run
    assert proc.returncode == 0, proc.stderr[-2000:]
    standard, lowrank = queue.jobs()
    assert (standard["state"], lowrank["state"]) == ("succeeded", "succeeded")
    folder = Path(standard["out_dir"])
    assert sorted(p.name for p in (folder / ckpt.STATE_DIR).iterdir()) == [
        "state-0000011.json", "state-0000011.pt", "state-0000012.json", "state-0000012.pt"]
    eval_before = (folder / ckpt.EVAL_FILE).read_text()
    leftovers = add_leftovers(folder)
    proc = cli(db_url, "requeue", "--fresh", lowrank["name"])  # its folder is moved aside
    assert proc.returncode == 0, proc.stderr
    (replaced,) = Path(lowrank["out_dir"]).parent.glob("*.replaced-*")

    runs = tmp_path / "runs"
    before = tree(runs)
    superseded = [folder / ckpt.STATE_DIR / f"state-0000011.{ext}" for ext in ("pt", "json")]
    garbage = [*superseded, *leftovers]
    garbage_bytes = sum(p.stat().st_size for p in garbage)
    replaced_bytes = sum(size for name, (size, _) in before.items()
                         if name.startswith(str(replaced.relative_to(runs)) + "/"))
    assert garbage_bytes > 600_000 and replaced_bytes > 600_000

    dry = cli(db_url, "gc", "--dry-run", "--replaced")
    assert dry.returncode == 0, dry.stderr
    assert set(listed(dry.stdout, "would remove")) == {str(p) for p in [*garbage, replaced]}
    assert freed(dry.stdout, "would free") == garbage_bytes + replaced_bytes
    assert tree(runs) == before  # a dry run changes nothing

    done = cli(db_url, "gc")
    assert done.returncode == 0, done.stderr
    assert set(listed(done.stdout, "removed")) == {str(p) for p in garbage}
    assert freed(done.stdout) == garbage_bytes
    assert f"freed {human_bytes(garbage_bytes)} ({garbage_bytes} bytes): " in done.stdout
    gone = {str(p.relative_to(runs)) for p in garbage}
    assert tree(runs) == {k: v for k, v in before.items() if k not in gone}
    assert sorted(p.name for p in (folder / ckpt.STATE_DIR).iterdir()) == [
        "state-0000012.json", "state-0000012.pt"]
    assert [p.name for p in (folder / ckpt.SNAPSHOT_DIR).iterdir()] == ["model-0000010.pt"]
    assert replaced.is_dir()  # only with --replaced

    done = cli(db_url, "gc", "--replaced")
    assert done.returncode == 0, done.stderr
    assert listed(done.stdout, "removed") == {str(replaced): human_bytes(replaced_bytes)}
    assert freed(done.stdout) == replaced_bytes
    assert not replaced.exists()
    again = cli(db_url, "gc", "--replaced")
    assert again.stdout.startswith("freed 0 B (0 bytes); kept the newest valid state of 1 job")

    # The kept state is the one a resume loads: the job re-finishes from it, same results.
    assert cli(db_url, "requeue", standard["name"]).returncode == 0
    proc = cli(db_url, "worker", "--gpu", "cpu", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [j["state"] for j in queue.jobs()] == ["succeeded", "succeeded"]
    assert f"resuming at step {STEPS}/{STEPS} from state-{STEPS:07d}" in (
        folder / ckpt.LOG_FILE).read_text()
    assert (folder / ckpt.EVAL_FILE).read_text() == eval_before


def trained_job(db_url: str, tmp_path: Path) -> tuple[JobQueue, dict, Path]:
    """One planned job, trained in-process into its folder, with leftovers beside its states."""
    queue = plan_cell(db_url, tmp_path, "model=gpt2")
    (job,) = queue.jobs()
    train(job["config"], job["out_dir"])
    add_leftovers(Path(job["out_dir"]))
    return queue, job, Path(job["out_dir"])


def test_gc_never_touches_a_running_jobs_folder(db_url, tmp_path):
    queue, stale, folder = trained_job(db_url, tmp_path)
    before = tree(folder)
    # The job is claimed after gc read its row: gc sees it running under the folder's lock.
    assert queue.claim("otherhost:0:4242", lease_seconds=600).name == stale["name"]
    found = Collection()
    collect_job(queue, stale, found)
    assert (found.removed, found.left_alone) == ([], [(stale["name"], "started running")])
    proc = cli(db_url, "gc", "--replaced")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"left alone: {stale['name']} (running)",
        "freed 0 B (0 bytes); kept the newest valid state of 0 job(s) and every snapshot"]
    assert tree(folder) == before


def test_gc_leaves_a_folder_alone_while_another_process_trains_in_it(db_url, tmp_path):
    queue, job, folder = trained_job(db_url, tmp_path)  # pending: as if trained by hand
    before = tree(folder)
    lock = filelock.FileLock(str(folder / ckpt.LOCK_FILE))  # the trainer's own lock
    with lock.acquire(timeout=0):
        proc = cli(db_url, "gc")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[0] == (
            f"left alone: {job['name']} ({folder} is in use by another process)")
        assert tree(folder) == before
    proc = cli(db_url, "gc")
    assert proc.returncode == 0, proc.stderr
    assert len(listed(proc.stdout, "removed")) == 7
    assert ckpt.load_latest_state(folder, print)["step"] == STEPS


def test_gc_refuses_a_database_it_cannot_read_in_one_line(tmp_path):
    missing = tmp_path / "none.sqlite"
    line = refused_line(cli(f"sqlite:///{missing}", "gc"))
    assert line.startswith("error: ") and "none.sqlite" in line
    assert not missing.exists()
    line = refused_line(cli("postgresql+psycopg://runner:secret@127.0.0.1:1/q", "gc",
                            "--dry-run"))
    assert line.startswith("error: cannot reach database") and "secret" not in line


@pytest.mark.parametrize("n, shown", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                      (115_000_000, "109.7 MiB"), (3 * 2**40, "3.0 TiB")])
def test_human_bytes(n, shown):
    assert human_bytes(n) == shown


def test_gc_deletes_nothing_of_a_folder_with_a_state_it_cannot_read(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'queue.sqlite'}"
    queue, job, folder = trained_job(db_url, tmp_path)
    # The newest "state" cannot be read (here: a folder in its place), which says nothing of
    # its contents: it and the states gc would otherwise remove beside it all stay.
    unreadable = folder / ckpt.STATE_DIR / "state-0000030.pt"
    unreadable.mkdir()
    (unreadable.with_suffix(".json")).write_text('{"step": 30, "bytes": 1, "sha256": "0"}\n')
    before = tree(folder)
    proc = cli(db_url, "gc")
    assert proc.returncode == 1
    assert proc.stdout.startswith("freed 0 B (0 bytes)")
    assert proc.stderr.strip() == (f"error: could not clean 1 path(s); first: {folder}: cannot "
                                   f"read {unreadable}: Is a directory")
    assert tree(folder) == before
