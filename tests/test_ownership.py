"""Which queue a job folder belongs to (runner.ownership): the marker each folder carries, on
disk and in a bucket on a real S3 server; `plan` refusing new jobs whose folders another
queue left (the database made again, then planned again into the same out-root) unless
--adopt-folders; a worker failing, in one line and once, a job whose folder turns out to be
another queue's."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import pytest

from db import JobQueue, connect
from runner.bucket import s3
from runner.bucket.jobfolder import read_head
from runner.disk import Collection, collect_job
from runner.jobfolders import EMPTY, MARKER, UNMARKED, move_aside, open_folder
from runner.ownership import ForeignFolder, claim_folder, marker
from runner.worker import Worker
from testing import s3server
from tests.support.commands import cli, refused_line
from tests.support.queues import digest, new_pg_database
from tests.support.standin import STEP_FILE, StandIn, row
from trainer.files import CONFIG_FILE

TWO_JOBS = ("--only", "V=5", "--only", "N=256", "--only", "model=gpt2", "--only", "run=1",
            "--only", "run=2")


@pytest.fixture(params=["local", "bucket"])
def address(request, tmp_path) -> str:
    """A job folder's address, nothing there yet: on disk, or in the session's bucket."""
    if request.param == "local":
        return str(tmp_path / "runs" / "study" / "job")
    request.getfixturevalue("s3_server")
    return f"s3://{s3server.BUCKET}/{uuid.uuid4().hex[:10]}/study/job"


def old_run(address: str, cache: Path, attempt: int = 1) -> None:
    """What a worker of a queue from before markers left: a job's files, no marker."""
    folder = open_folder(address)
    path = folder.prepare(attempt, str(cache), 5.0, on_fenced=print)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text("steps: 5\n")
    (path / STEP_FILE).write_text("3")
    folder.save()
    folder.close(fenced=False)


def test_the_marker_is_written_once_moves_aside_with_its_folder_and_gc_keeps_it(address,
                                                                                tmp_path):
    folder, root = open_folder(address), open_folder(address.rsplit("/", 2)[0])
    assert root.survey([address]) == {address: EMPTY}
    claim_folder(folder, "q1", "job", 1)
    assert folder.read_marker() == {"queue": "q1", "job": "job"}
    assert not folder.write_marker(marker("q2", "job"))  # never over one already there
    with pytest.raises(ForeignFolder, match=r"belongs to another queue \(id q1\): plan into "
                                            r"another --out-root, or plan --adopt-folders"):
        claim_folder(folder, "q2", "job", 1)
    claim_folder(folder, "q1", "job", 2)  # ours: a later attempt goes on
    old_run(address, tmp_path / "cache", attempt=2)
    assert root.survey([address]) == {address: {"queue": "q1", "job": "job"}}

    job = {"id": 1, "name": "job", "state": "succeeded", "out_dir": address}
    collect_job(_OneJob(job), job, found := Collection(), replaced=True)
    assert found.failed == [] and folder.read_marker() == marker("q1", "job")

    aside = move_aside(address)
    assert open_folder(aside).read_marker() == marker("q1", "job")
    assert folder.read_marker() is None and root.survey([address]) == {address: EMPTY}


def test_a_job_files_folder_without_a_marker_is_foreign_on_a_first_attempt_only(address,
                                                                                tmp_path):
    old_run(address, tmp_path / "cache")
    folder, root = open_folder(address), open_folder(address.rsplit("/", 2)[0])
    assert root.survey([address]) == {address: UNMARKED}
    with pytest.raises(ForeignFolder, match="holds a job's files but no queue marker"):
        claim_folder(folder, "q1", "job", 1)
    assert folder.read_marker() is None
    # A queue planned before markers that knows the job ran (progress recorded, its attempt
    # handed back), or a later attempt: its own folder, marked now.
    claim_folder(folder, "q1", "job", 1, step=3)
    assert folder.read_marker() == marker("q1", "job")
    later = address + "-2"
    old_run(later, tmp_path / "cache")
    claim_folder(open_folder(later), "q1", "job", 2)
    assert open_folder(later).read_marker() == marker("q1", "job")


def test_an_adopted_bucket_folder_is_not_fenced_by_the_old_queues_attempts(s3_server,
                                                                          tmp_path):
    address = f"s3://{s3server.BUCKET}/{uuid.uuid4().hex[:10]}/study/job"
    old_run(address, tmp_path / "cache", attempt=4)  # the old queue got to attempt 4
    folder = open_folder(address)
    folder.adopt(marker("new", "job"))
    claim_folder(folder, "new", "job", 1)
    path = folder.prepare(1, str(tmp_path / "cache"), 5.0, on_fenced=print)
    assert (path / STEP_FILE).read_text() == "3"  # resumes from the old queue's state
    folder.save()
    folder.close(fenced=False)
    job = s3.S3Path.parse(address)
    assert read_head(job).attempt == 1


class _OneJob:
    def __init__(self, job: dict):
        self.job = job

    def jobs(self) -> list[dict]:
        return [self.job]


# --- the worker ------------------------------------------------------------------------------


def test_a_worker_fails_a_job_whose_folder_another_queue_marked_after_plan(queue, tmp_path):
    out = tmp_path / "a"
    queue.plan([row("a", out)])
    open_folder(str(out)).write_marker(marker("old-queue", "a"))  # its workers still ran
    job = StandIn()
    worker = Worker(queue, "cpu", 30, job=job)
    assert worker.run() == 1
    assert worker.outcomes == ["failed"] and job.specs == []  # never adopted, never retried
    (got,) = queue.jobs()
    assert (got["state"], got["attempts"]) == ("failed", 1)
    assert got["error"] == (f"job folder {out} belongs to another queue (id old-queue): plan "
                            "into another --out-root, or plan --adopt-folders to take them "
                            "over")
    assert open_folder(str(out)).read_marker() == marker("old-queue", "a")


def test_a_worker_fails_a_job_whose_folder_holds_another_runs_files(queue, tmp_path):
    out = tmp_path / "a"
    queue.plan([row("a", out)])
    out.mkdir()
    (out / CONFIG_FILE).write_text("steps: 5\n")  # a stray run, no marker
    worker = Worker(queue, "cpu", 30, job=StandIn())
    assert worker.run() == 1
    (got,) = queue.jobs()
    assert (got["state"], got["attempts"]) == ("failed", 1)
    assert "holds a job's files but no queue marker" in got["error"]


def test_a_worker_fails_a_bucket_job_of_another_queue_instead_of_looping(queue, s3_server,
                                                                         tmp_path):
    address = f"s3://{s3server.BUCKET}/{uuid.uuid4().hex[:10]}/study/a"
    queue.plan([row("a", address)])
    old_run(address, tmp_path / "old", attempt=4)  # the old queue's workers, still running
    open_folder(address).write_marker(marker("old-queue", "a"))
    job = StandIn()
    worker = Worker(queue, "cpu", 30, job=job, cache_dir=str(tmp_path / "cache"))
    assert worker.run() == 1
    assert worker.outcomes == ["failed"] and job.specs == []
    (got,) = queue.jobs()
    assert (got["state"], got["attempts"]) == ("failed", 1)
    assert got["error"].startswith(f"job folder {address} belongs to another queue "
                                   "(id old-queue)")
    assert read_head(s3.S3Path.parse(address)).attempt == 4  # the old head left alone


def test_a_worker_marks_a_new_folder_as_its_queues(queue, tmp_path):
    queue.plan([row("a", tmp_path / "a")])
    assert Worker(queue, "cpu", 30, job=StandIn()).run() == 1
    assert open_folder(str(tmp_path / "a")).read_marker() == marker(queue.queue_id(), "a")
    assert json.loads((tmp_path / "a" / MARKER).read_text())["job"] == "a"


# --- plan ------------------------------------------------------------------------------------


def another_database(db_url: str, tmp_path: Path, request) -> str:
    """A new, empty queue database of the same kind (the user made the database again)."""
    if db_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / f'again-{uuid.uuid4().hex[:6]}.sqlite'}"
    else:
        url = new_pg_database(request.getfixturevalue("pg_server_url"))
    JobQueue(connect(url, create=True)).engine.dispose()
    return url


def planned_folders(db_url: str) -> list[str]:
    queue = JobQueue(connect(db_url))
    try:
        return [job["out_dir"] for job in queue.jobs()]
    finally:
        queue.engine.dispose()


def worked(db_url: str, folders: list[str]) -> None:
    """What the queue's workers leave: each folder marked as the queue's, with files."""
    queue = JobQueue(connect(db_url))
    queue_id = queue.queue_id()
    queue.engine.dispose()
    for address in folders:
        folder = open_folder(address)
        claim_folder(folder, queue_id, address.rsplit("/", 1)[1], 1)
        if not address.startswith("s3://"):
            Path(address, CONFIG_FILE).write_text("steps: 5\n")
            Path(address, STEP_FILE).write_text("3")


class ResumingStandIn(StandIn):
    """The stand-in on the smoke sweep's real configs: 5 steps whatever they say."""

    def run(self, spec):
        return super().run(dataclasses.replace(spec, config={"steps": 5}))


@pytest.mark.parametrize("kind", ["local", "bucket"])
def test_plan_refuses_another_queues_folders_unless_adopted(db_url, tmp_path, kind, request):
    if kind == "bucket":
        request.getfixturevalue("s3_server")
        out_root = f"s3://{s3server.BUCKET}/{uuid.uuid4().hex[:10]}"
    else:
        out_root = str(tmp_path / "runs")
    proc = cli(db_url, "plan", "--profile", "smoke", "--out-root", out_root, *TWO_JOBS)
    assert proc.returncode == 0, proc.stderr
    folders = planned_folders(db_url)
    worked(db_url, folders)
    # The same queue planned again: its own folders, accepted.
    proc = cli(db_url, "plan", "--profile", "smoke", "--out-root", out_root, *TWO_JOBS)
    assert proc.returncode == 0 and "0 new, 2 already queued" in proc.stdout, proc.stderr

    again = another_database(db_url, tmp_path, request)
    before = digest(again)
    for args in ((), ("--replace",)):  # --replace does not take them over either
        line = refused_line(cli(again, "plan", "--profile", "smoke", "--out-root", out_root,
                                *TWO_JOBS, *args))
        assert line.startswith("error: 2 new job(s) have folders that are not this queue's, "
                               "e.g. job folder ")
        assert "belongs to another queue (id " in line
        assert line.endswith("nothing planned: plan into another --out-root, or plan "
                             "--adopt-folders to take them over (workers then resume from "
                             "their states where the config matches)")
        assert digest(again) == before

    proc = cli(again, "plan", "--profile", "smoke", "--out-root", out_root, *TWO_JOBS,
               "--adopt-folders")
    assert proc.returncode == 0 and "2 new" in proc.stdout, proc.stderr
    assert "2 new job(s) took over folders another queue left" in proc.stderr
    queue = JobQueue(connect(again))
    try:
        for address in folders:
            assert open_folder(address).read_marker()["queue"] == queue.queue_id()
        if kind == "local":  # the workers resume from the old queue's states
            job = ResumingStandIn()
            assert Worker(queue, "cpu", 30, job=job).run() == 2
            assert job.starts == [3, 3]
            assert {j["state"] for j in queue.jobs()} == {"succeeded"}
    finally:
        queue.engine.dispose()


def test_plan_refuses_a_folder_with_job_files_and_no_marker(db_url, tmp_path):
    out_root = tmp_path / "runs"
    proc = cli(db_url, "plan", "--profile", "smoke", "--out-root", str(out_root), *TWO_JOBS,
               "--dry-run")
    assert proc.returncode == 0, proc.stderr
    stray = out_root / "table_connectivity" / "table_connectivity_standard_V5_N256_run1"
    stray.mkdir(parents=True)
    (stray / CONFIG_FILE).write_text("steps: 5\n")
    JobQueue(connect(db_url, create=True)).engine.dispose()
    before = digest(db_url)
    line = refused_line(cli(db_url, "plan", "--profile", "smoke", "--out-root", str(out_root),
                            *TWO_JOBS))
    assert "1 new job(s) have folders" in line and "holds a job's files but no queue marker" \
        in line, line
    assert digest(db_url) == before
