"""The job-folder contract (runner.jobfolders), run the same against both kinds: a folder on
disk, and one in a bucket on a real S3 server (SeaweedFS, testing/s3server.py). An attempt
prepares the folder and trains in the local path it gets; what it closes, readers see; a
newer attempt resumes from it; a folder moved aside leaves room for a new run and is listed
for gc; addresses of neither kind are refused."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

from runner.bucket import view
from runner.disk import REPLACED, Collection, collect_job
from runner.jobfolders import (
    BadAddress,
    JobFolder,
    local_folder,
    local_output_problem,
    move_aside,
    open_folder,
)
from testing import s3server
from trainer import checkpoint as ckpt
from trainer.files import CONFIG_FILE, EVAL_FILE, LOG_FILE, METRICS_FILE

BUDGET = 5.0  # seconds of retries for a bucket that does not answer


@pytest.fixture(params=["local", "bucket"])
def address(request, tmp_path, monkeypatch) -> str:
    """A job folder's address, nothing there yet: on disk, or under a prefix of its own in
    the session's bucket."""
    if request.param == "local":
        return str(tmp_path / "runs" / "study" / "job")
    request.getfixturevalue("s3_server")
    monkeypatch.setattr(view, "FRESH_FOR", 0.0)  # readers see every change at once
    return f"s3://{s3server.BUCKET}/{uuid.uuid4().hex[:10]}/study/job"


def train(path: Path, step: int, accuracy: float) -> dict[str, bytes]:
    """What the trainer leaves in its folder: config, a state with its manifest, metrics,
    log and evaluation. The files readers read, as written."""
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps({"step": step}))
    ckpt.save_state(path, {"model": {"w": torch.full((2,), float(step))}, "optimizer": {},
                           "step": step, "rng": {}, "config": {}})
    ckpt.append_metrics(path, {"step": step - 1, "loss": 1.0 / step})
    with open(path / LOG_FILE, "a") as f:
        f.write(f"trained to step {step}\n")
    (path / EVAL_FILE).write_text(json.dumps({"accuracy": accuracy}))
    return {name: (path / name).read_bytes()
            for name in (CONFIG_FILE, METRICS_FILE, EVAL_FILE, LOG_FILE)}


def attempt(address: str, number: int, cache: Path) -> tuple[JobFolder, Path]:
    folder = open_folder(address)
    fenced: list[str] = []
    path = folder.prepare(number, str(cache), BUDGET, on_fenced=fenced.append)
    return folder, path


def readable(address: str) -> dict[str, bytes]:
    view = local_folder(address)
    return {name: (view / name).read_bytes()
            for name in (CONFIG_FILE, METRICS_FILE, EVAL_FILE, LOG_FILE)
            if (view / name).is_file()}


class OneJob:
    """The queue as gc reads it: one job, not running."""

    def __init__(self, job: dict):
        self.job = job

    def jobs(self) -> list[dict]:
        return [self.job]


def test_what_an_attempt_closes_readers_see_and_the_next_attempt_resumes(address, tmp_path):
    assert readable(address) == {}  # nothing there yet
    folder, path = attempt(address, 1, tmp_path / "host-a")
    written = train(path, 10, accuracy=0.5)
    folder.save()
    folder.close(fenced=False)
    assert readable(address) == written

    # A newer attempt, on another host: the newest state and the files as they were.
    folder, path = attempt(address, 2, tmp_path / "host-b")
    assert ckpt.load_latest_state(path, print)["step"] == 10
    assert (path / LOG_FILE).read_text() == "trained to step 10\n"
    written = train(path, 20, accuracy=0.75)
    folder.save()
    folder.close(fenced=False)
    assert json.loads(readable(address)[EVAL_FILE]) == {"accuracy": 0.75}
    assert readable(address)[LOG_FILE] == b"trained to step 10\ntrained to step 20\n"
    assert readable(address) == written


def test_readers_see_files_an_attempt_rewrites_while_it_runs(address, tmp_path):
    """The metrics and the log grow under the same name (in a bucket: the same key, uploaded
    again): a reader that read them once sees the new content, not its first copy."""
    folder, path = attempt(address, 1, tmp_path / "host-a")
    first = train(path, 10, accuracy=0.5)
    folder.save()
    assert readable(address) == first
    second = train(path, 20, accuracy=0.75)
    folder.save()
    seen = readable(address)
    assert seen[METRICS_FILE] == second[METRICS_FILE] != first[METRICS_FILE]
    assert seen[LOG_FILE] == b"trained to step 10\ntrained to step 20\n"
    assert seen == second
    folder.close(fenced=False)


def test_a_folder_moved_aside_leaves_room_for_a_new_run_and_gc_lists_it(address, tmp_path):
    assert move_aside(address) is None  # no folder yet: nothing to move
    folder, path = attempt(address, 1, tmp_path / "host")
    old = train(path, 10, accuracy=0.5)
    folder.save()
    folder.close(fenced=False)

    aside = move_aside(address)
    parent, name = address.rsplit("/", 1)
    assert aside is not None and aside.startswith(f"{parent}/{name}.replaced-")
    assert open_folder(address).replaced() == [aside]
    assert readable(address) == {}
    assert readable(aside) == old  # moved, never deleted
    folder, path = attempt(address, 2, tmp_path / "host")
    assert ckpt.load_latest_state(path, print) is None  # a new run starts from scratch
    train(path, 5, accuracy=0.25)
    folder.save()
    folder.close(fenced=False)

    job = {"id": 1, "name": "job", "state": "succeeded", "out_dir": address}
    found = Collection()
    collect_job(OneJob(job), job, found, dry_run=True, replaced=True)
    assert [(str(g.path), g.kind) for g in found.removed] == [(aside, REPLACED)]
    assert found.removed[0].size >= sum(map(len, old.values()))
    assert (found.failed, found.kept_states) == ([], 1)
    assert open_folder(address).replaced() == [aside]  # a dry run removes nothing

    collect_job(OneJob(job), job, found := Collection(), replaced=True)
    assert [str(g.path) for g in found.removed] == [aside] and found.failed == []
    assert readable(aside) == {}
    assert open_folder(address).replaced() == []  # (SeaweedFS lists an emptied prefix: none)
    collect_job(OneJob(job), job, found := Collection(), replaced=True)
    assert found.removed == [] and found.failed == []  # nothing left to report, 0 B or more
    assert json.loads(readable(address)[EVAL_FILE]) == {"accuracy": 0.25}  # the job's own


def test_an_out_root_gives_each_job_a_folder_of_its_own_kind(address):
    root = address.rsplit("/", 2)[0]
    open_folder(root).check_root()
    assert open_folder(root).join("study", "job") == address
    assert open_folder(address).on_every_host == address.startswith("s3://")


BAD = ["S3://bucket/runs", "s3:/bucket/runs", "s3:bucket/runs", "gs://bucket/runs",
       "s3a://bucket/runs", "http://host/runs", "file:///tmp/runs", "s3:///runs",
       "s3://bucket/../runs"]


@pytest.mark.parametrize("bad", BAD)
def test_an_address_of_neither_kind_is_refused_in_one_line(bad):
    with pytest.raises(BadAddress) as refused:
        open_folder(bad)
    message = str(refused.value)
    assert "\n" not in message and bad in message
    assert "s3://BUCKET/PREFIX" in message
    assert local_output_problem(bad) is not None


@pytest.mark.parametrize("good", ["runs", "runs/s3", "./s3/x", "/tmp/a:b", "s3-runs/x"])
def test_a_local_path_is_never_taken_for_a_url(good):
    assert open_folder(good).on_every_host is False
    assert local_output_problem(good) is None
