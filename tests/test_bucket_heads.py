"""A bucket folder's head.json on the real S3 server: its first write is conditional too, so
a stalled attempt that read "no head yet" cannot overwrite the head of the attempt that took
the job over meanwhile."""

from __future__ import annotations

import uuid

import pytest

from runner.bucket.jobfolder import Fenced, read_head, take_over, write_head
from runner.bucket.s3 import Conflict, S3Path
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
