"""What the bucket code makes of S3 errors and addresses, in-process (botocore's own error
classes, no server): which errors a retry may cure, the one line a user reads for each,
and where the local copies of bucket folders go."""

from __future__ import annotations

from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from runner.bucket import s3

WHERE = "s3://sweeps/runs"


def client_error(code: str, status: int, message: str = "") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize("error, retry", [
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
    (ConnectionResetError(), True),
    (client_error("InternalError", 500), True),
    (client_error("ServiceUnavailable", 503), True),
    (client_error("SlowDown", 200), True),          # throttling, whatever the status
    (client_error("RequestTimeout", 400), True),
    (client_error("NoSuchKey", 404), False),
    (client_error("AccessDenied", 403), False),
    (client_error("PreconditionFailed", 412), False),
    (ValueError("a bug, not an outage"), False),
])
def test_only_what_a_retry_may_cure_is_transient(error, retry):
    assert s3.transient(error) is retry


@pytest.mark.parametrize("error, line", [
    (NoCredentialsError(), f"{WHERE}: no S3 credentials (set AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"),
    (client_error("NoSuchBucket", 404), f"{WHERE}: the bucket does not exist"),
    (client_error("404", 404), f"{WHERE}: the bucket does not exist"),
    (client_error("InvalidAccessKeyId", 403),
     f"{WHERE}: the S3 credentials were refused (InvalidAccessKeyId)"),
    (client_error("403", 403), f"{WHERE}: the S3 credentials were refused (403)"),
    (client_error("AccessDenied", 403),
     f"{WHERE}: access denied (the credentials lack permission)"),
    (client_error("InternalError", 500, "We encountered an internal error."),
     f"{WHERE}: InternalError: We encountered an internal error."),
    (client_error("", 502), f"{WHERE}: 502:"),
    (OSError("disk full\nmore detail"), f"{WHERE}: disk full"),
    (TimeoutError(), f"{WHERE}: TimeoutError"),
])
def test_each_error_is_one_line_naming_the_address(error, line):
    assert s3.describe(error, WHERE) == line


@pytest.mark.parametrize("url, message", [
    ("/data/runs", "'/data/runs' is not an s3://BUCKET/PREFIX address"),
    ("s3:///runs", "'s3:///runs': no bucket named (s3://BUCKET/PREFIX)"),
    ("s3://sweeps/a/../b", "'s3://sweeps/a/../b': '.' and '..' are not allowed"),
])
def test_a_bad_address_is_refused_saying_why(url, message):
    with pytest.raises(s3.BucketError) as refused:
        s3.S3Path.parse(url)
    assert str(refused.value) == message


def test_an_address_is_normalized():
    assert s3.S3Path.parse("s3://sweeps//runs/x/") == s3.S3Path("sweeps", "runs/x")
    assert s3.S3Path.parse("s3://sweeps") == s3.S3Path("sweeps", "")


def test_the_cache_is_runner_cache_dir_else_the_users_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("RUNNER_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert s3.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("RUNNER_CACHE_DIR")
    assert s3.cache_root() == tmp_path / "xdg" / "runner"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert s3.cache_root() == Path(tmp_path / "home") / ".cache" / "runner"
