"""Commands that only look (status, results, plot, logs) never write and never wait on writers,
and read a queue on read-only media."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from db import JobQueue, connect
from runner.reporting.serve import open_readonly
from tests.support.commands import cli, refused_line
from tests.support.queues import METRICS, folder_digest, new_pg_database, unrelated_database
from tests.support.skips import skip_or_fail

LOOKING = [["status"], ["status", "--json"], ["results"], ["results", "--csv"],
           ["plot", "--out", "{tmp}/figure.png"], ["logs", "run1"]]


@pytest.mark.parametrize("make", [unrelated_database, lambda p: p.write_bytes(b"")],
                         ids=["another program's SQLite file", "an empty file"])
@pytest.mark.parametrize("args", LOOKING, ids=" ".join)
def test_looking_at_a_file_that_is_no_queue_changes_nothing(tmp_path, make, args):
    db = tmp_path / "data.sqlite"
    make(db)
    before = folder_digest(tmp_path)
    line = refused_line(cli(f"sqlite:///{db}", *[a.format(tmp=tmp_path) for a in args]))
    assert "is not a queue database" in line
    assert folder_digest(tmp_path) == before  # byte-identical, and no new file beside it


def test_looking_at_an_empty_postgresql_database_creates_no_table(pg_server_url):
    db_url = new_pg_database(pg_server_url)
    assert "is not a queue database" in refused_line(cli(db_url, "status"))
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert inspect(conn).get_table_names() == []
    engine.dispose()


def test_status_answers_at_once_while_another_process_writes(tmp_path):
    """SQLite's write lock (PostgreSQL readers never wait on writers)."""
    path = tmp_path / "queue.sqlite"
    planned = f"sqlite:///{path}"
    assert cli(planned, "plan", "--profile", "smoke", "--only", "V=5", "--out-root",
               str(tmp_path / "runs")).returncode == 0
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a worker's claim or heartbeat, held open
    writer.execute("UPDATE jobs SET loss = 1.0 WHERE id = 1")
    try:
        started = time.monotonic()
        proc = cli(planned, "status")
        elapsed = time.monotonic() - started
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert proc.returncode == 0, proc.stderr
    assert "pending 30" in proc.stdout
    assert elapsed < 15  # it used to wait the writers' 60 s busy timeout


def mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        skip_or_fail(f"mount {' '.join(args)}: {(proc.stderr or proc.stdout).strip()}")


@pytest.fixture(scope="module")
def archived(tmp_path_factory):
    """An archived sweep: a queue (one job finished, with its log and metrics) on a tmpfs
    remounted read-only, as on a read-only share or disc; (URL, the finished job's name)."""
    disk = tmp_path_factory.mktemp("archive")
    mount("-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk))
    try:
        url = f"sqlite:///{disk / 'queue.sqlite'}"
        proc = cli(url, "plan", "--profile", "smoke", "--only", "V=5", "--only", "N=256",
                   "--out-root", str(disk / "runs"))
        assert proc.returncode == 0, proc.stderr
        queue = JobQueue(connect(url))
        claim = queue.claim("w", 60)
        queue.finish(claim, METRICS)
        queue.engine.dispose()   # the last connection gone: no -wal or -shm file is left
        folder = Path(claim.out_dir)
        folder.mkdir(parents=True)
        (folder / "train.log").write_text("attempt 1\nstep 1/30\n")
        (folder / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 0.5}) + "\n")
        (folder / "eval.json").write_text(json.dumps(METRICS))
        mount("-o", "remount,ro", str(disk))
        yield url, claim.name
    finally:
        umount(disk)


ARCHIVE_LOOKS = [
    (["status"], "succeeded 1"),
    (["status", "--json"], '"succeeded": 1'),
    (["results", "--csv"], ",0.75,"),
    (["plot", "--out", "{tmp}/figure.png"], "wrote the sample-complexity figure"),
    (["report", "--out", "{tmp}/report.html"], "wrote the report"),
    (["logs", "{name}"], "attempt 1\nstep 1/30\n"),
    (["export", "--tensorboard", "{tmp}/tb"], "exported 1 new point(s) from 1 job(s)"),
]


@pytest.mark.parametrize("args, expected", ARCHIVE_LOOKS,
                         ids=[" ".join(args[:2]) for args, _ in ARCHIVE_LOOKS])
def test_an_archived_queue_on_read_only_media_can_be_looked_at(archived, tmp_path, args,
                                                               expected):
    url, name = archived
    proc = cli(url, *[a.format(tmp=tmp_path, name=name) for a in args])
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout


def test_the_dashboard_reads_an_archived_queue(archived):
    url, name = archived
    queue = open_readonly(url)   # how `serve` opens it, for every request
    assert queue.counts()["succeeded"] == 1
    assert {j["name"] for j in queue.jobs() if j["state"] == "succeeded"} == {name}
    queue.engine.dispose()


@pytest.mark.parametrize("args", [["requeue", "--failed"], ["worker", "--gpu", "cpu"]],
                         ids=" ".join)
def test_a_command_that_writes_says_the_archive_is_read_only(archived, args):
    url, _ = archived
    line = refused_line(cli(url, *args))
    assert "cannot write to the queue" in line and "read-only file system" in line
    assert "cannot reach" not in line


@pytest.mark.parametrize("args", [["plot", "--out", "{archive}/figure.png"],
                                  ["plot", "--out", "{tmp}/f.png", "--curves-dir", "{archive}/c"],
                                  ["report", "--out", "{archive}/report.html"],
                                  ["export", "--tensorboard", "{archive}/tb"]],
                         ids=" ".join)
def test_an_output_on_read_only_media_is_refused_in_one_line(archived, tmp_path, args):
    url, _ = archived
    archive = Path(url.removeprefix("sqlite:///")).parent
    line = refused_line(cli(url, *[a.format(archive=archive, tmp=tmp_path) for a in args]))
    assert f"cannot write in {archive}: Read-only file system" in line
    assert list(tmp_path.iterdir()) == []


def umount(folder) -> None:
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.parametrize("args", [["plot", "--out", "{disk}/figure.png"],
                                  ["report", "--out", "{disk}/report.html"]], ids=" ".join)
def test_an_output_that_fills_the_disk_leaves_nothing_half_written(archived, tmp_path, args):
    url, _ = archived
    disk = tmp_path / "small"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=8k", "tmpfs", str(disk))   # smaller than either file
    try:
        line = refused_line(cli(url, *[a.format(disk=disk) for a in args]))
        assert "No space left on device" in line
        assert list(disk.iterdir()) == []   # neither the file nor a temp file
    finally:
        umount(disk)

