"""S3 addresses, the client, and its errors as one line.

The endpoint, credentials and region come from the standard AWS variables and files
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE, ...), so any S3-compatible server works;
nothing secret is kept in the queue or printed. boto3 because fencing needs conditional
writes (If-None-Match, If-Match), which it sends and simpler clients do not.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from runner.jobfolders import FolderUnavailable

SCHEME = "s3://"
T = TypeVar("T")


def cache_root() -> Path:
    """Local copies of bucket folders: $RUNNER_CACHE_DIR, else the user's cache folder."""
    if os.environ.get("RUNNER_CACHE_DIR"):
        return Path(os.environ["RUNNER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "runner"


def is_s3(path: str | None) -> bool:
    return bool(path) and str(path).startswith(SCHEME)


class BucketError(FolderUnavailable):
    """A bucket operation that failed for good; the message is one line."""


class Conflict(BucketError):
    """A conditional write lost: the object changed (or appeared) since it was read."""


@dataclass(frozen=True)
class S3Path:
    bucket: str
    key: str  # no leading or trailing slash; "" for the bucket's root

    @classmethod
    def parse(cls, url: str) -> S3Path:
        if not is_s3(url):
            raise BucketError(f"'{url}' is not an s3://BUCKET/PREFIX address")
        bucket, _, key = url[len(SCHEME):].partition("/")
        if not bucket:
            raise BucketError(f"'{url}': no bucket named (s3://BUCKET/PREFIX)")
        parts = [p for p in key.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise BucketError(f"'{url}': '.' and '..' are not allowed")
        return cls(bucket, "/".join(parts))

    def join(self, *parts: str) -> S3Path:
        return S3Path(self.bucket, "/".join(p.strip("/") for p in (self.key, *parts) if p))

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}".rstrip("/")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def with_name(self, name: str) -> S3Path:
        parent = self.key.rsplit("/", 1)[0] if "/" in self.key else ""
        return S3Path(self.bucket, f"{parent}/{name}".strip("/"))


_clients: dict[str, object] = {}
_lock = threading.Lock()


def client():
    """The process's S3 client (thread-safe), configured from the AWS environment."""
    with _lock:
        if "s3" not in _clients:
            import logging

            import boto3
            from botocore.config import Config

            # Its INFO lines ("Found credentials in environment variables") are noise here.
            for name in ("botocore", "boto3", "s3transfer"):
                logging.getLogger(name).setLevel(logging.WARNING)

            config = Config(retries={"mode": "standard", "max_attempts": 3},
                            connect_timeout=5, read_timeout=30)
            _clients["s3"] = boto3.session.Session().client("s3", config=config)
        return _clients["s3"]


def forget_client() -> None:
    """Drop the cached client (tests change the AWS environment between cases)."""
    with _lock:
        _clients.clear()


def transient(error: Exception) -> bool:
    """An error that retrying may cure: no connection, a timeout, a server error, throttling."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(error, (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError,
                          ReadTimeoutError, ConnectionError)):
        return True
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or error.response["Error"].get("Code") in (
            "SlowDown", "RequestTimeout", "Throttling")
    return False


def describe(error: Exception, where: str) -> str:
    """One line for a failed operation on `where` (an s3:// address), without secrets."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(error, NoCredentialsError):
        return (f"{where}: no S3 credentials (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
    if isinstance(error, ClientError):
        code = error.response["Error"].get("Code", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",) or (status == 404 and code in ("404", "NotFound")):
            return f"{where}: the bucket does not exist"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch") or (
                status == 403 and code == "403"):
            return f"{where}: the S3 credentials were refused ({code})"
        if code == "AccessDenied":
            return f"{where}: access denied (the credentials lack permission)"
        return f"{where}: {code or status}: {error.response['Error'].get('Message', '')}".rstrip()
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{where}: {text}"


def with_retries(operation: Callable[[], T], where: str, budget: float,
                 cancel: threading.Event | None = None,
                 on_wait: Callable[[str], None] | None = None) -> T:
    """`operation()` until it succeeds, fails for good, or transient errors outlast `budget`
    seconds (backoff 0.5 s to 5 s); BucketError then. `on_wait` hears of the first retry."""
    from botocore.exceptions import BotoCoreError, ClientError

    started, pause, told = time.monotonic(), 0.5, False
    while True:
        try:
            return operation()
        except (BotoCoreError, ClientError, ConnectionError) as e:
            if not transient(e) or time.monotonic() - started + pause > budget or (
                    cancel is not None and cancel.is_set()):
                raise BucketError(describe(e, where)) from None
            if on_wait and not told:
                told = True
                on_wait(describe(e, where))
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


def _status(error) -> int:
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


def get(path: S3Path) -> tuple[bytes, str] | None:
    """The object's bytes and ETag; None when there is no such object."""
    from botocore.exceptions import ClientError

    try:
        answer = client().get_object(Bucket=path.bucket, Key=path.key)
    except ClientError as e:
        if e.response["Error"].get("Code") in ("NoSuchKey", "404") or _status(e) == 404:
            if e.response["Error"].get("Code") == "NoSuchBucket":
                raise
            return None
        raise
    return answer["Body"].read(), answer["ETag"]


def put(path: S3Path, data: bytes, if_match: str | None = None,
        if_absent: bool = False) -> str:
    """Write the object (whole or not at all); its new ETag. With `if_match` (an ETag) or
    `if_absent`, a Conflict when the object is not as expected."""
    from botocore.exceptions import ClientError

    conditions = {"IfMatch": if_match} if if_match else {}
    if if_absent:
        conditions["IfNoneMatch"] = "*"
    try:
        return client().put_object(Bucket=path.bucket, Key=path.key, Body=data,
                                   **conditions)["ETag"]
    except ClientError as e:
        if _status(e) in (409, 412) or e.response["Error"].get("Code") in (
                "PreconditionFailed", "ConditionalRequestConflict"):
            raise Conflict(f"{path.url}: changed by another writer") from None
        raise


def _objects(prefix: S3Path) -> Iterator[dict]:
    """The listing entries (Key, ETag, Size, ...) of every object under the folder `prefix`."""
    paginator = client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=prefix.bucket, Prefix=prefix.key + "/"):
        yield from page.get("Contents", [])


def listing(prefix: S3Path) -> Iterator[tuple[str, str]]:
    """(key, ETag) of every object under the folder `prefix`."""
    for item in _objects(prefix):
        yield item["Key"], item["ETag"]


def sizes(prefix: S3Path) -> dict[str, int]:
    """key -> bytes of every object under the folder `prefix`."""
    return {item["Key"]: item["Size"] for item in _objects(prefix)}


def subfolders(prefix: S3Path) -> list[S3Path]:
    """The folders directly under `prefix` (the bucket's root when its key is empty)."""
    paginator = client().get_paginator("list_objects_v2")
    start = prefix.key + "/" if prefix.key else ""
    found = []
    for page in paginator.paginate(Bucket=prefix.bucket, Prefix=start, Delimiter="/"):
        found += [S3Path(prefix.bucket, p["Prefix"].rstrip("/"))
                  for p in page.get("CommonPrefixes", [])]
    return found


def delete(bucket: str, keys: list[str]) -> None:
    for start in range(0, len(keys), 1000):   # at most 1,000 keys a request
        client().delete_objects(Bucket=bucket, Delete={
            "Objects": [{"Key": k} for k in keys[start:start + 1000]], "Quiet": True})


def move_folder(source: S3Path, target: S3Path, delete_first: str = "") -> int:
    """Copy every object under `source` to the same place under `target`, then delete the
    originals (S3 has no rename), `source/delete_first` before the others (a folder's index,
    so that a move cut short leaves no folder that names half its files); how many moved."""
    keys = [key for key, _ in listing(source)]
    for key in keys:
        client().copy_object(Bucket=target.bucket, Key=target.key + key[len(source.key):],
                             CopySource={"Bucket": source.bucket, "Key": key})
    first = source.join(delete_first).key if delete_first else None
    delete(source.bucket, [k for k in keys if k == first])
    delete(source.bucket, [k for k in keys if k != first])
    return len(keys)


def delete_folder(prefix: S3Path) -> None:
    """Delete every object under the folder `prefix`."""
    delete(prefix.bucket, [key for key, _ in listing(prefix)])


def exists(prefix: S3Path) -> bool:
    answer = client().list_objects_v2(Bucket=prefix.bucket, Prefix=prefix.key + "/", MaxKeys=1)
    return answer.get("KeyCount", 0) > 0


def check_writable(root: S3Path) -> None:
    """Refuse, in one line, a root that jobs could not write into: no endpoint, no bucket,
    refused credentials, no write permission. Tries it with a probe object."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client().head_bucket(Bucket=root.bucket)
        probe = root.join(f".write-probe-{uuid.uuid4().hex}")
        put(probe, b"")
        client().delete_object(Bucket=probe.bucket, Key=probe.key)
    except (BotoCoreError, ClientError) as e:
        raise BucketError(describe(e, root.url)) from None
