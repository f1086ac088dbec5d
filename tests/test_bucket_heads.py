"""A bucket folder's head.json on the real S3 server: its first write is conditional too, so
a stalled attempt that read "no head yet" cannot overwrite the head of the attempt that took
the job over meanwhile; every later write is conditional on the ETag it read; a take-over
that loses a race is fenced out; and which objects no head can name again (what gc may
delete while workers run)."""

from __future__ import annotations

import uuid

import pytest

from runner.bucket import jobfolder
from runner.bucket.jobfolder import (
    Fenced,
    attempt_of,
    read_head,
    take_over,
    unreferenced,
    write_head,
)
from runner.bucket.s3 import Conflict, S3Path, put
from testing import s3server


@pytest.fixture
def job(s3_server) -> S3Path:
    return S3Path.parse(f"s3://{s3server.BUCKET}/{uuid.uuid4().hex[:10]}/study/job")


def test_a_stalled_attempt_that_read_no_head_cannot_overwrite_a_newer_one(job):
    stale = read_head(job)            # attempt 1 reads: no head yet ... and stalls
    assert (stale.attempt, stale.etag) == (0, None)
    take_over(job, 2)                 # its lease expired: attempt 2 took the job over
    with pytest.raises(Conflict):
        write_head(job, stale, 1, {"config.yaml": "a0001/config.yaml"})
    assert read_head(job).attempt == 2 and read_head(job).files == {}


def test_an_older_attempt_is_fenced_out_once_a_newer_one_holds_the_head(job):
    take_over(job, 2)
    with pytest.raises(Fenced, match="attempt 2 owns the folder, not 1"):
        take_over(job, 1)
    assert take_over(job, 3).attempt == 3
    assert read_head(job).attempt == 3


def test_each_head_write_is_conditional_on_the_etag_it_read(job):
    first = take_over(job, 1)
    second = write_head(job, first, 1, {"eval.json": "a0001/eval.json"})
    third = write_head(job, second, 1, {"eval.json": "a0001/eval.json",  # from what it wrote
                                        "train.log": "a0001/train.log"})
    with pytest.raises(Conflict):  # the head as read before the last two writes
        write_head(job, first, 1, {})
    assert read_head(job).files == third.files
    assert read_head(job).etag == third.etag


def test_a_take_over_that_loses_the_race_after_its_read_is_fenced_out(job, monkeypatch):
    take_over(job, 1)
    real_read = jobfolder.read_head

    def read_then_overtaken(path):
        head = real_read(path)
        monkeypatch.setattr(jobfolder, "read_head", real_read)
        take_over(path, 3)  # a newer attempt gets in between this read and the write
        return head

    monkeypatch.setattr(jobfolder, "read_head", read_then_overtaken)
    with pytest.raises(Fenced, match="attempt 3 took the folder over, not 2$"):
        take_over(job, 2)
    assert read_head(job).attempt == 3


def test_an_attempts_own_take_over_retried_returns_its_head_unchanged(job):
    head = take_over(job, 2)
    assert take_over(job, 2) == head
    assert read_head(job) == head


@pytest.mark.parametrize("key, attempt", [
    ("a0007/state/state-0000100.pt", 7), ("a12345/train.log", 12345), ("a0000/x", 0),
    ("head.json", None), ("a007/train.log", None), ("A0007/train.log", None),
    ("a0007/", None), ("a0007", None)])
def test_the_attempt_of_an_objects_key(key, attempt):
    assert attempt_of(key) == attempt


def sized(job: S3Path, relative: str, size: int) -> None:
    put(job.join(relative), b"x" * size)


def test_unreferenced_is_what_no_head_can_name_again(job):
    owner = {"config.yaml": "a0003/config.yaml", "eval.json": "a0002/eval.json",
             "state/state-0000200.pt": "a0003/state/state-0000200.pt"}
    for n, relative in enumerate([
        "a0001/metrics.jsonl",             # an older attempt's, unnamed: stale
        "a0002/eval.json",                 # an older attempt's the head names: kept
        "a0002/state/state-0000100.pt",    # an older attempt's, unnamed: stale
        "a0003/config.yaml",
        "a0003/state/state-0000100.json",  # the owner's, older than a state it names: stale
        "a0003/state/state-0000200.pt",
        "a0003/state/state-0000200.json",  # the owner's, as new as the newest it names
        "a0003/state/state-0000300.pt",    # the owner's, newer: in flight
        "a0003/metrics.jsonl",             # the owner's, not a state: it names it next
        "a0003/state/notes.pt",            # the owner's, not a state either
        "a0004/state/state-0000050.pt",    # a newer attempt's, before its take-over
    ], start=1):
        sized(job, relative, n)
    head = take_over(job, 3)
    write_head(job, head, 3, owner)

    found, stale = unreferenced(job)

    assert (found.attempt, found.files) == (3, owner)
    assert stale == {"a0001/metrics.jsonl": 1, "a0002/state/state-0000100.pt": 3,
                     "a0003/state/state-0000100.json": 5}


def test_an_owner_that_names_none_of_its_own_states_yet_loses_none(job):
    head = take_over(job, 2)
    write_head(job, head, 2, {"state/state-0000100.pt": "a0001/state/state-0000100.pt"})
    for relative in ("a0001/state/state-0000100.pt", "a0001/state/state-0000050.pt",
                     "a0002/state/state-0000020.pt"):
        sized(job, relative, 4)
    assert unreferenced(job)[1] == {"a0001/state/state-0000050.pt": 4}
