"""Job folders in S3-compatible object storage, against a real server (SeaweedFS, started once
per session: testing/s3server.py): planning and its refusals, a sweep slice resumed by another
host, SIGKILL during an upload, a fenced-out worker's late uploads, a server outage, readers
with no local files, and moving a bucket folder aside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

from db import JobQueue
from runner.bucket import s3
from runner.bucket.folder import collect_bucket_job
from runner.bucket.jobfolder import Fenced, attempt_key, read_head, unreferenced
from runner.bucket.sync import JobSync
from runner.bucket.view import local_folder
from runner.disk import Collection
from testing import s3server
from testing.ports import free_port
from tests.support.commands import PYTHON, ROOT, cli, plan, runner_env, start_worker
from tests.support.serve import start_server, stop_server
from tests.support.skips import need
from tests.support.tensorboard import TB, points
from tests.support.training import train_1thread
from tests.support.waiting import wait_for
from trainer import checkpoint as ckpt
from trainer.files import LOCK_FILE

pytestmark = pytest.mark.slow


@pytest.fixture
def root(s3_server) -> str:
    """A prefix of its own in the session's bucket."""
    return f"s3://{s3server.BUCKET}/{uuid.uuid4().hex[:10]}"


def finish(worker: subprocess.Popen, timeout: float = 600) -> str:
    _, err = worker.communicate(timeout=timeout)
    assert worker.returncode == 0, err[-3000:]
    return err


def plan_slice(db_url, root, *args) -> JobQueue:
    """Two jobs (V=5, N=256, run 1: both models) under `root`."""
    return plan(db_url, root, "--only", "V=5", "--only", "N=256", "--only", "run=1", *args)


def download(out_dir: str, into: Path) -> Path:
    """Every file the folder's head names, laid out as a job folder."""
    job = s3.S3Path.parse(out_dir)
    for relative, key in read_head(job).files.items():
        data, _ = s3.get(job.join(key))
        (into / relative).parent.mkdir(parents=True, exist_ok=True)
        (into / relative).write_bytes(data)
    return into


def same_as_uninterrupted(job: dict, tmp_path: Path) -> None:
    """The bucket folder's final weights, metrics and evaluation equal a fault-free local run
    of the job's config, bit for bit."""
    got = download(job["out_dir"], tmp_path / f"{job['name']}.bucket")
    clean = tmp_path / f"{job['name']}.clean"
    train_1thread(job["config"], clean)
    a = torch.load(ckpt.list_states(got)[0], weights_only=True)
    b = torch.load(ckpt.list_states(clean)[0], weights_only=True)
    assert a["step"] == b["step"] == job["total_steps"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    for name in (ckpt.EVAL_FILE, ckpt.METRICS_FILE):
        assert (got / name).read_text() == (clean / name).read_text(), name


# --- planning ---------------------------------------------------------------------------------


def test_plan_writes_bucket_addresses_and_stores_no_secret(tmp_path, root):
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    queue = plan_slice(url, root)
    jobs = queue.jobs()
    assert sorted(j["out_dir"] for j in jobs) == [
        f"{root}/table_connectivity/table_connectivity_standard_V5_N256_run1",
        f"{root}/table_connectivity_lowrank/table_connectivity_lowrank_V5_N256_run1"]
    dump = subprocess.run(["sqlite3", str(tmp_path / "q.sqlite"), ".dump"],
                          capture_output=True, text=True).stdout
    assert dump and s3server.WRITER[1] not in dump and s3server.WRITER[0] not in dump
    assert not list(s3.listing(s3.S3Path.parse(root)))  # the write probe left nothing


@pytest.mark.parametrize("case", ["unreachable", "no bucket", "bad secret", "read only"])
def test_plan_refuses_a_bucket_it_could_not_write_in_one_line(tmp_path, s3_server, case):
    _, endpoint = s3_server
    root, env = f"s3://{s3server.BUCKET}/refused", {}
    if case == "unreachable":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    elif case == "no bucket":
        root = "s3://no-such-bucket/x"
    elif case == "bad secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    else:
        env.update(s3server.env(endpoint, s3server.READER))
    db = tmp_path / "q.sqlite"
    proc = cli(f"sqlite:///{db}", "plan", "--profile", "smoke", "--out-root", root, env=env)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    expected = {"unreachable": "Could not connect to the endpoint URL",
                "no bucket": "the bucket does not exist",
                "bad secret": "the S3 credentials were refused",
                "read only": "access denied"}[case]
    assert line.startswith(f"error: --out-root {root}: ") and expected in line, line
    assert "not-the-secret" not in line and s3server.READER[1] not in line
    assert not db.exists()  # nothing planned, not even an empty queue


# --- the worker: resume elsewhere, kills, zombies, outages -------------------------------------


def test_a_slice_in_a_bucket_resumes_on_another_host_and_readers_need_no_local_files(
        tmp_path, root, monkeypatch):
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    queue = plan_slice(url, root, "--set", "training.train_steps=300",
                       "--set", "training.save_every_steps=20")
    first_host, second_host = tmp_path / "host-a", tmp_path / "host-b"
    worker = start_worker(url, "--cache-dir", str(first_host))
    wait_for(lambda: max(j["step"] for j in queue.jobs()) >= 60, what="progress")
    worker.send_signal(signal.SIGTERM)
    finish(worker, 60)
    (stopped,) = [j for j in queue.jobs() if j["step"] > 0]
    assert stopped["state"] == "pending" and 60 <= stopped["step"] < 300
    head = read_head(s3.S3Path.parse(stopped["out_dir"]))
    newest = f"state/state-{stopped['step']:07d}.pt"
    assert head.attempt == 1 and head.files[newest] == attempt_key(1, newest)
    assert not list(first_host.rglob("*.pt"))  # the working copy went once the bucket had it

    finish(start_worker(url, "--cache-dir", str(second_host)))  # another host: an empty cache
    jobs = queue.jobs()
    assert [j["state"] for j in jobs] == ["succeeded", "succeeded"]
    resumed = next(j for j in jobs if j["name"] == stopped["name"])
    assert resumed["claims"] == 2
    assert read_head(s3.S3Path.parse(resumed["out_dir"])).attempt == 2
    for job in jobs:
        same_as_uninterrupted(job, tmp_path)

    # Readers on a machine with the queue and the keys, but none of the files.
    elsewhere = {"RUNNER_CACHE_DIR": str(tmp_path / "reader-cache")}
    results = cli(url, "results", "--json", env=elsewhere)
    assert results.returncode == 0, results.stderr
    table = json.loads(results.stdout)
    by_model = {row["model"]: row for row in table["rows"]}
    for job in jobs:
        assert by_model[job["model"]]["accuracy"]["mean"] == job["test_accuracy"]
    assert table["notes"] == []  # every eval.json found, and agreeing with the queue
    log = cli(url, "logs", resumed["name"], env=elsewhere)
    assert log.returncode == 0, log.stderr
    assert "=== attempt 1 by worker" in log.stdout and "=== attempt 2 by worker" in log.stdout
    assert f"resuming at step {stopped['step']}/300" in log.stdout
    report = cli(url, "report", "--out", str(tmp_path / "report.html"), env=elsewhere)
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report.html").read_text()
    assert f"{resumed['test_accuracy'] * 100:.1f}" in page
    proc, base = start_server(url, cwd=tmp_path)
    try:
        detail = json.loads(urllib.request.urlopen(
            base + f"api/jobs/{resumed['name']}", timeout=10).read())
    finally:
        stop_server(proc)
    assert [r["step"] for r in detail["metrics"]] == list(range(300))
    assert "finished: test accuracy" in detail["log_tail"]
    assert detail["files"]["folder"].endswith(resumed["name"])
    # The bucket unreachable: one line, exit 2, and the dashboard's API answers 503 with it.
    nowhere = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
               "RUNNER_CACHE_DIR": str(tmp_path / "cut-off-cache")}
    cut_off = cli(url, "results", env=nowhere)
    [line] = cut_off.stderr.strip().splitlines()
    assert cut_off.returncode == 2 and line.startswith(f"error: {root}/"), cut_off.stderr
    assert "Could not connect to the endpoint URL" in line
    # With a warm cache (the reader's above), readers show what it holds, with one note.
    warm = {**elsewhere, "AWS_ENDPOINT_URL": nowhere["AWS_ENDPOINT_URL"]}
    stale = cli(url, "results", "--json", env=warm)
    assert stale.returncode == 0, stale.stderr
    assert json.loads(stale.stdout)["rows"] == table["rows"]
    [note] = stale.stderr.strip().splitlines()
    assert note.startswith(f"note: {root}/") and "Could not connect to the endpoint" in note
    assert "; 2 job folder(s) shown as cached on this machine (the oldest copy from " in note
    stale_log = cli(url, "logs", resumed["name"], env=warm)
    assert (stale_log.returncode, stale_log.stdout) == (0, log.stdout), stale_log.stderr
    assert "1 job folder(s) shown as cached" in stale_log.stderr
    monkeypatch.setenv("AWS_ENDPOINT_URL", nowhere["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("RUNNER_CACHE_DIR", nowhere["RUNNER_CACHE_DIR"])
    proc, base = start_server(url, cwd=tmp_path)
    try:
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(base + f"api/jobs/{resumed['name']}", timeout=30)
        body = json.loads(answer.value.read())
        status = urllib.request.urlopen(base + "api/status", timeout=30).status
    finally:
        stop_server(proc)
    assert answer.value.code == 503 and body["bucket"] == "unavailable"
    assert "Could not connect to the endpoint URL" in body["error"], body
    assert status == 200  # the queue itself is read as ever
    monkeypatch.undo()
    figure = cli(url, "plot", "--out", str(tmp_path / "fig.png"), env=elsewhere)
    assert figure.returncode == 0, figure.stderr
    assert (tmp_path / "curves" / "curves_V5_N256.png").read_bytes()[:4] == b"\x89PNG"
    # 300 steps x (loss, train accuracy) + 31 evaluations x 5 test metrics, per job
    need("tensorboardX", TB)
    export = cli(url, "export", "--tensorboard", str(tmp_path / "tb"), env=elsewhere)
    assert export.returncode == 0, export.stderr
    assert "exported 1510 new point(s) from 2 job(s)" in export.stdout
    assert points(tmp_path / "tb" / resumed["name"])["train/loss"] == list(range(300))


def test_a_worker_killed_during_an_upload_leaves_nothing_a_resume_trusts(tmp_path, root,
                                                                          s3_server):
    folder, _ = s3_server
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    queue = plan_slice(url, root, "--only", "model=gpt2", "--set", "training.train_steps=1200",
                       "--set", "training.save_every_steps=10")
    victim = start_worker(url, "--cache-dir", str(tmp_path / "host-a"))
    wait_for(lambda: uploaded_states(queue.jobs()[0]), what="a state in the bucket")
    pid = int((folder / "weed.pid").read_text())
    os.killpg(pid, signal.SIGSTOP)  # the server hangs: the next upload stays in flight
    try:
        at_freeze = queue.jobs()[0]["step"]
        wait_for(lambda: queue.jobs()[0]["step"] >= at_freeze + 100, what="progress")
        time.sleep(UPLOAD_PASS + 1)  # a pass has started, its first write unanswered
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    finally:
        os.killpg(pid, signal.SIGCONT)
    (job,) = queue.jobs()
    uploaded = max(uploaded_states(job))
    assert uploaded < job["step"]  # the bucket is behind what was trained locally
    # Same host: the dead worker is seen at once.
    heir = start_worker(url, "--cache-dir", str(tmp_path / "host-b"))
    finish(heir)
    (job,) = queue.jobs()
    assert job["state"] == "succeeded"
    log = download(job["out_dir"], tmp_path / "after")
    assert f"resuming at step {uploaded}/1200" in (log / ckpt.LOG_FILE).read_text()
    same_as_uninterrupted(job, tmp_path)


UPLOAD_PASS = 2.0  # runner.bucket.sync.UPLOAD_EVERY


def uploaded_states(job: dict) -> list[int]:
    """The steps of the states the job folder's head names."""
    head = read_head(s3.S3Path.parse(job["out_dir"]))
    return [int(rel[len("state/state-"):-len(".pt")]) for rel in head.files
            if rel.startswith("state/") and rel.endswith(".pt")]


def fake_training(folder: Path, step: int, evaluated: float | None = None) -> None:
    """What the trainer leaves in its folder at `step`: a state with its manifest, metrics,
    and at the end an evaluation."""
    ckpt.save_state(folder, {"model": {"w": torch.full((2,), float(step))}, "optimizer": {},
                             "step": step, "rng": {}, "config": {}})
    ckpt.append_metrics(folder, {"step": step - 1, "loss": 1.0 / step})
    if evaluated is not None:
        (folder / ckpt.EVAL_FILE).write_text(json.dumps({"accuracy": evaluated}))


def test_a_fenced_out_workers_late_uploads_replace_nothing(tmp_path, root):
    out_dir = f"{root}/table_connectivity/job"
    fenced: list[str] = []
    zombie = JobSync(out_dir, 1, tmp_path / "zombie", budget=5, on_fenced=fenced.append)
    fake_training(zombie.fetch(), 10)
    zombie.upload()
    # The zombie's lease expires (a network cut); attempt 2 claims the job on another host.
    heir = JobSync(out_dir, 2, tmp_path / "heir", budget=5, on_fenced=fenced.append)
    local = heir.fetch()
    assert ckpt.load_latest_state(local, print)["step"] == 10  # resumed from the bucket
    head = read_head(s3.S3Path.parse(out_dir))  # taken over, the metrics under its own key
    assert head.attempt == 2 and head.files[ckpt.METRICS_FILE] == attempt_key(2, "metrics.jsonl")
    assert head.files["state/state-0000010.pt"] == attempt_key(1, "state/state-0000010.pt")
    fake_training(local, 20, evaluated=0.75)
    heir.upload()
    # The zombie comes back and uploads what it trained meanwhile: refused.
    fake_training(zombie.local, 30, evaluated=0.25)
    with pytest.raises(Fenced):
        zombie.upload()
    assert fenced == ["attempt 2 took the job folder over; attempt 1 uploads nothing more"]
    head = read_head(s3.S3Path.parse(out_dir))
    assert head.attempt == 2
    assert head.files[ckpt.EVAL_FILE] == attempt_key(2, ckpt.EVAL_FILE)
    assert sorted(r for r in head.files if r.startswith("state/")) == [
        "state/state-0000010.json", "state/state-0000010.pt",
        "state/state-0000020.json", "state/state-0000020.pt"]
    # Its objects went to keys of its own: the heir's are intact, and readers see the heir's.
    job = s3.S3Path.parse(out_dir)
    assert s3.get(job.join(attempt_key(1, ckpt.EVAL_FILE)))[0] == b'{"accuracy": 0.25}'
    assert s3.get(job.join(attempt_key(2, ckpt.EVAL_FILE)))[0] == b'{"accuracy": 0.75}'
    view = local_folder(out_dir)
    assert json.loads((view / ckpt.EVAL_FILE).read_text()) == {"accuracy": 0.75}
    # Nor can it take the folder back by claiming with its old number.
    with pytest.raises(Fenced):
        JobSync(out_dir, 1, tmp_path / "again", budget=5, on_fenced=fenced.append).fetch()
    # gc deletes its late objects, which no head can name again, and nothing else.
    found = Collection()
    collect_bucket_job({"out_dir": out_dir}, found)
    assert sorted(g.path for g in found.removed) == [f"{out_dir}/{attempt_key(1, rel)}" for rel in (
        "eval.json", "metrics.jsonl", "state/state-0000030.json", "state/state-0000030.pt")]
    assert (found.failed, found.kept_states) == ([], 1)
    head = read_head(job)
    assert sorted(key for key, _ in s3.listing(job)) == sorted(
        job.join(k).key for k in [*head.files.values(), "head.json"])
    local = JobSync(out_dir, 3, tmp_path / "third", budget=5, on_fenced=print).fetch()
    assert ckpt.load_latest_state(local, print)["step"] == 20



def test_a_head_write_whose_answer_was_lost_is_known_as_its_own(tmp_path, root, monkeypatch):
    """The server took a head write but its answer was lost (a connection cut): the retry,
    conditional on the ETag seen before, is refused. The worker finds its own attempt in the
    head and writes again, instead of taking itself for fenced out; the states the lost write
    superseded are still deleted."""
    from botocore.exceptions import ConnectionClosedError

    from runner.bucket import jobfolder

    out_dir = f"{root}/table_connectivity/job"
    job = s3.S3Path.parse(out_dir)
    fenced: list[str] = []
    sync = JobSync(out_dir, 1, tmp_path / "a", budget=5, on_fenced=fenced.append)
    local = sync.fetch()
    fake_training(local, 10)
    fake_training(local, 20)
    sync.upload()
    real_put, lost = jobfolder.put, []

    def answer_lost_once(path, data, **conditions):
        etag = real_put(path, data, **conditions)
        if not lost:
            lost.append(path.key)
            raise ConnectionClosedError(endpoint_url=path.url)
        return etag

    monkeypatch.setattr(jobfolder, "put", answer_lost_once)
    fake_training(local, 30)  # the trainer keeps 2 states: 10 goes
    sync.upload()
    assert lost == [job.join("head.json").key]
    assert (fenced, sync.fenced) == ([], False)
    assert sorted(r for r in read_head(job).files if r.startswith("state/")) == [
        "state/state-0000020.json", "state/state-0000020.pt",
        "state/state-0000030.json", "state/state-0000030.pt"]
    assert sorted(key.rsplit("/", 1)[1] for key, _ in s3.listing(job.join("a0001/state"))) == [
        "state-0000020.json", "state-0000020.pt", "state-0000030.json", "state-0000030.pt"]
    fake_training(local, 40)  # and uploads go on
    sync.upload()
    assert "state/state-0000040.pt" in read_head(job).files


def test_a_claim_clears_old_working_copies_but_not_one_in_use(tmp_path, root):
    """Copies left on this host by earlier attempts (a worker killed) go at the next claim,
    except one whose folder lock a live process still holds."""
    out_dir = f"{root}/table_connectivity/job"
    home = tmp_path / "cache" / "jobs" / s3server.BUCKET / s3.S3Path.parse(out_dir).key
    for attempt in (1, 2):
        (home / f"attempt-{attempt}").mkdir(parents=True)
        (home / f"attempt-{attempt}" / "metrics.jsonl").write_text("{}\n")
    holder = subprocess.Popen(
        [PYTHON, "-c", "import filelock, sys, time; lock = filelock.FileLock(sys.argv[1]); "
         "lock.acquire(); print('held', flush=True); time.sleep(120)",
         str(home / "attempt-1" / LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        JobSync(out_dir, 3, tmp_path / "cache", budget=5, on_fenced=print).fetch()
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in home.iterdir()) == ["attempt-1", "attempt-3"]


def test_moving_a_bucket_folder_deletes_its_head_before_the_rest(root, monkeypatch):
    """S3 has no rename: a move copies, then deletes. The head goes first, so a move cut short
    leaves at the old address no folder whose head names objects already gone."""
    source, target = s3.S3Path.parse(f"{root}/job"), s3.S3Path.parse(f"{root}/job.aside")
    keys = ["head.json", "a0001/config.json", "a0001/state/state-0000010.pt"]
    for key in keys:
        s3.put(source.join(key), key.encode())
    deleted: list[list[str]] = []
    real_delete = s3.delete

    def recording_delete(bucket, chunk):
        deleted.append(sorted(k[len(source.key) + 1:] for k in chunk))
        real_delete(bucket, chunk)

    monkeypatch.setattr(s3, "delete", recording_delete)
    assert s3.move_folder(source, target, delete_first="head.json") == 3
    assert deleted == [["head.json"], ["a0001/config.json", "a0001/state/state-0000010.pt"]]
    assert not s3.exists(source)
    assert sorted((k[len(target.key) + 1:], s3.get(s3.S3Path(target.bucket, k))[0])
                  for k, _ in s3.listing(target)) == sorted((k, k.encode()) for k in keys)

def test_a_torn_or_unannounced_state_in_the_bucket_is_never_trusted(tmp_path, root):
    out_dir = f"{root}/table_connectivity/job"
    job = s3.S3Path.parse(out_dir)
    first = JobSync(out_dir, 1, tmp_path / "a", budget=5, on_fenced=print)
    local = first.fetch()
    fake_training(local, 10)
    fake_training(local, 20)
    first.upload()
    # Bit rot (or a server that kept half an object): the newest state no longer matches
    # its manifest. And an upload cut before its manifest and the head: a state 30.
    newest = job.join(read_head(job).files["state/state-0000020.pt"])
    s3.put(newest, s3.get(newest)[0][:100])
    s3.put(job.join(attempt_key(1, "state/state-0000030.pt")), b"half")
    # Not garbage yet: attempt 1 still owns the head and may be about to name it.
    assert unreferenced(job)[1] == {}
    logged: list[str] = []
    local = JobSync(out_dir, 2, tmp_path / "b", budget=5, on_fenced=print).fetch()
    assert unreferenced(job)[1] == {attempt_key(1, "state/state-0000030.pt"): 4,
                                    attempt_key(1, "metrics.jsonl"): len(
                                        (local / ckpt.METRICS_FILE).read_bytes())}
    assert [p.name for p in ckpt.list_states(local)] == ["state-0000020.pt", "state-0000010.pt"]
    assert ckpt.load_latest_state(local, logged.append)["step"] == 10
    assert logged == ["ignoring state/state-0000020.pt: size or checksum mismatch (100 bytes); "
                      "falling back"]


def test_a_state_still_being_written_is_not_uploaded_until_its_manifest_is(tmp_path, root):
    out_dir = f"{root}/table_connectivity/job"
    sync = JobSync(out_dir, 1, tmp_path / "a", budget=5, on_fenced=print)
    local = sync.fetch()
    fake_training(local, 10)
    fake_training(local, 20)
    (local / "state/state-0000020.json").unlink()  # the trainer's manifest comes last
    sync.upload()
    job = s3.S3Path.parse(out_dir)
    head = read_head(job)
    assert sorted(r for r in head.files if r.startswith("state/")) == [
        "state/state-0000010.json", "state/state-0000010.pt"]
    assert not s3.get(job.join(attempt_key(1, "state/state-0000020.pt")))
    fake_training(local, 30)  # whole: up with its manifest; 10 pruned here and there
    sync.upload()
    assert sorted(r for r in read_head(job).files if r.startswith("state/")) == [
        "state/state-0000030.json", "state/state-0000030.pt"]
    assert sorted(key.rsplit("/", 1)[1] for key, _ in s3.listing(job.join("a0001/state"))) == [
        "state-0000030.json", "state-0000030.pt"]


def test_an_older_attempts_states_go_once_a_newer_one_supersedes_them(tmp_path, root):
    """Attempt 2 resumes from attempt 1's state 10 and trains on: once its head no longer
    names that state, attempt 2 deletes it (it is under attempt 1's keys, not its own)."""
    out_dir = f"{root}/table_connectivity/job"
    job = s3.S3Path.parse(out_dir)
    first = JobSync(out_dir, 1, tmp_path / "a", budget=5, on_fenced=print)
    fake_training(first.fetch(), 10)
    first.upload()
    heir = JobSync(out_dir, 2, tmp_path / "b", budget=5, on_fenced=print)
    local = heir.fetch()
    fake_training(local, 20)
    fake_training(local, 30)  # the trainer keeps two states: 10 is pruned here
    heir.upload()
    assert [key for key, _ in s3.listing(job.join("a0001/state"))] == []
    assert sorted(r for r in read_head(job).files if r.startswith("state/")) == [
        "state/state-0000020.json", "state/state-0000020.pt",
        "state/state-0000030.json", "state/state-0000030.pt"]


def test_a_state_pruned_while_it_went_up_is_deleted_by_its_owner(tmp_path, root, monkeypatch):
    """A slow upload pass (an outage): the trainer prunes state 20 between the put of its .pt
    and the read of its manifest. The .pt is in the bucket, never named: its owner deletes it."""
    out_dir = f"{root}/table_connectivity/job"
    job = s3.S3Path.parse(out_dir)
    sync = JobSync(out_dir, 1, tmp_path / "a", budget=5, on_fenced=print)
    local = sync.fetch()
    fake_training(local, 10)
    sync.upload()
    fake_training(local, 20)
    put = s3.put

    def pruned_meanwhile(path, data, **kw):
        etag = put(path, data, **kw)
        if path.key.endswith("state-0000020.pt"):  # the trainer moves on to 30 and 40
            fake_training(local, 30)
            fake_training(local, 40)
            assert not (local / "state/state-0000020.json").exists()
        return etag

    monkeypatch.setattr(s3, "put", pruned_meanwhile)
    sync.upload()
    monkeypatch.setattr(s3, "put", put)

    def in_bucket():
        return sorted(key.rsplit("/", 1)[1] for key, _ in s3.listing(job.join("a0001/state")))

    assert in_bucket() == ["state-0000010.json", "state-0000010.pt"]  # 20.pt gone at once
    sync.upload()  # the next pass: the trainer's states now
    assert in_bucket() == ["state-0000030.json", "state-0000030.pt",
                           "state-0000040.json", "state-0000040.pt"]
    assert unreferenced(job)[1] == {}


def test_gc_collects_an_owners_unnamed_state_older_than_its_newest_named(tmp_path, root):
    """What an owner killed before its cleanup leaves: an unnamed state of its own older than
    the newest it named is garbage; a newer one may still be on its way to the head."""
    out_dir = f"{root}/table_connectivity/job"
    job = s3.S3Path.parse(out_dir)
    sync = JobSync(out_dir, 1, tmp_path / "a", budget=5, on_fenced=print)
    local = sync.fetch()
    fake_training(local, 10)
    fake_training(local, 20)
    sync.upload()
    s3.put(job.join(attempt_key(1, "state/state-0000015.pt")), b"orphan")   # lost its partner
    s3.put(job.join(attempt_key(1, "state/state-0000030.pt")), b"in flight")
    s3.put(job.join(attempt_key(1, "snapshots/extra.bin")), b"not a state")
    assert unreferenced(job)[1] == {attempt_key(1, "state/state-0000015.pt"): 6}
    # An owner that named no state of its own yet (it resumed from an older attempt's)
    # keeps all of its own: it may be about to name any of them.
    local = JobSync(out_dir, 2, tmp_path / "b", budget=5, on_fenced=print).fetch()
    s3.put(job.join(attempt_key(2, "state/state-0000015.pt")), b"in flight")
    assert attempt_key(2, "state/state-0000015.pt") not in unreferenced(job)[1]


def test_uploads_wait_out_a_server_outage_and_nothing_is_lost(tmp_path, root, s3_server):
    folder, _ = s3_server
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    queue = plan_slice(url, root, "--only", "model=gpt2", "--set", "training.train_steps=600",
                       "--set", "training.save_every_steps=50")
    worker = start_worker(url, "--cache-dir", str(tmp_path / "host"))
    wait_for(lambda: queue.jobs()[0]["step"] >= 100, what="progress")
    s3server.stop(folder)
    stopped = time.monotonic()
    try:
        # Training goes on without the bucket, to its end...
        wait_for(lambda: queue.jobs()[0]["step"] == 600, what="the last step")
        time.sleep(max(0.0, 10 - (time.monotonic() - stopped)))  # down for 10 s at least
        # ...but the job is not finished before the bucket holds its final files.
        assert queue.jobs()[0]["state"] == "running"
    finally:
        s3server.restart(folder)
    err = finish(worker)
    assert "retrying for up to 600s" in err
    (job,) = queue.jobs()
    assert (job["state"], job["claims"]) == ("succeeded", 1)
    same_as_uninterrupted(job, tmp_path)


def test_a_worker_that_cannot_reach_the_bucket_hands_the_job_back_and_exits_1(tmp_path, root):
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    queue = plan_slice(url, root, "--only", "model=gpt2")
    proc = subprocess.run(
        [PYTHON, "-m", "runner", "worker", "--gpu", "cpu", "--db-outage", "0",
         "--cache-dir", str(tmp_path / "host")], cwd=ROOT, capture_output=True, text=True,
        env={**runner_env(url), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
        timeout=300)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {queue.jobs()[0]['out_dir']}: Could not connect to the "
                           "endpoint URL") and last.endswith("; the job was handed back"), last
    (job,) = queue.jobs()
    assert (job["state"], job["claims"], job["attempts"]) == ("pending", 1, 0)


# --- moving a bucket folder aside ----------------------------------------------------------------


def test_requeue_fresh_and_plan_replace_move_the_objects_aside(tmp_path, root):
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    queue = plan_slice(url, root, "--only", "model=gpt2")
    finish(start_worker(url, "--cache-dir", str(tmp_path / "host")))
    (job,) = queue.jobs()
    folder = s3.S3Path.parse(job["out_dir"])
    before = sorted(key[len(folder.key):] for key, _ in s3.listing(folder))
    assert "/head.json" in before

    fresh = cli(url, "requeue", "--fresh", job["name"])
    assert fresh.returncode == 0, fresh.stderr
    assert not s3.exists(folder)
    (aside,) = _aside_all(folder)
    assert sorted(key[len(aside.key):] for key, _ in s3.listing(aside)) == before
    finish(start_worker(url, "--cache-dir", str(tmp_path / "host")))
    (job,) = queue.jobs()
    assert job["state"] == "succeeded" and read_head(folder).attempt == 2
    assert "resuming" not in (local_folder(job["out_dir"]) / ckpt.LOG_FILE).read_text()

    replaced = cli(url, "plan", "--profile", "smoke", "--only", "V=5", "--only", "N=256",
                   "--only", "run=1", "--only", "model=gpt2", "--out-root", root,
                   "--set", "training.learning_rate=0.01", "--replace")
    assert replaced.returncode == 0, replaced.stderr
    assert not s3.exists(folder) and len(_aside_all(folder)) == 2
    finish(start_worker(url, "--cache-dir", str(tmp_path / "host")))
    gc = cli(url, "gc", "--replaced", "--dry-run")
    assert gc.returncode == 0, gc.stderr
    asides = _aside_all(folder)
    assert len(asides) == 2  # a dry run deletes nothing
    assert [line.split("  ")[0] for line in gc.stdout.splitlines()[:-1]] == [
        f"would remove {aside.url}" for aside in asides]
    assert gc.stdout.splitlines()[-1].endswith(": 2 replaced folders; kept the newest valid "
                                               "state of 1 job(s) and every snapshot")
    cut_off = cli(url, "gc", "--replaced",
                  env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"})
    assert cut_off.returncode == 1 and cut_off.stderr.startswith(
        f"error: could not clean 1 path(s); first: {folder.url}: Could not connect to the "
        "endpoint URL"), cut_off.stderr
    gc = cli(url, "gc", "--replaced")
    assert gc.returncode == 0, gc.stderr
    assert _aside_all(folder) == [] and read_head(folder).attempt == 3  # claims never reset
    assert queue.jobs()[0]["state"] == "succeeded"


def _aside_all(folder: s3.S3Path) -> list[s3.S3Path]:
    parent = s3.S3Path(folder.bucket, folder.key.rsplit("/", 1)[0])
    names = {key[len(parent.key) + 1:].split("/")[0] for key, _ in s3.listing(parent)}
    return [parent.join(n) for n in sorted(names) if n.startswith(folder.name + ".replaced-")]
