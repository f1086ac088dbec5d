"""Readers' cached copies of bucket folders while the bucket cannot be read, in-process: an
endpoint that is away is asked once per command, not once per job folder."""

from __future__ import annotations

import pytest
from botocore.exceptions import EndpointConnectionError

from runner.bucket import s3, view


def test_an_unreachable_endpoint_is_asked_once_and_each_cached_copy_served(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("RUNNER_CACHE_DIR", str(tmp_path))
    folders = [f"s3://sweeps/study/m/job{i}" for i in range(3)]
    for address in folders[:2]:  # two folders read on this machine before; the third never
        job = s3.S3Path.parse(address)
        local = s3.cache_root() / "view" / job.bucket / job.key
        local.mkdir(parents=True)
        (local / view.INDEX).write_text("{}")
    asked = []

    def away(job, local):
        asked.append(job.url)
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    monkeypatch.setattr(view, "_refresh", away)
    with view.cached_when_unreachable() as fallback:
        served = [view.local_folder(address) for address in folders[:2]]
        with pytest.raises(s3.BucketError, match="Could not connect to the endpoint URL"):
            view.local_folder(folders[2])  # no cached copy: still an error
    assert [p.name for p in served] == ["job0", "job1"]
    assert asked == [folders[0]]  # once: the others were served without asking
    assert fallback.served == 2 and fallback.note().startswith(f"note: {folders[0]}: ")
    with pytest.raises(s3.BucketError):  # outside a reader command: the error, as before
        view.local_folder(folders[1])
