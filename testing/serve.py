"""The dashboard's server (`python -m runner serve`) as a child process, for the tests and
the benchmarks: started on a free loopback port, stopped as Ctrl-C would."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def start_server(url: str, *args: str, cwd: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """`python -m runner --db URL serve --port 0 ARGS`; (process, its base URL) once it
    answers. RuntimeError if it does not start, with its output."""
    proc = subprocess.Popen([sys.executable, "-m", "runner", "--db", url, "serve", "--port",
                             "0", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(60)
    match = re.search(r"http://[\d.]+:\d+/", line[0] if line else "")
    if not match:
        proc.kill()
        raise RuntimeError(f"serve did not start: {line} {proc.stderr.read()[-2000:]}")
    base = match.group(0)
    for _ in range(100):
        try:
            urllib.request.urlopen(base + "api/info", timeout=5).read()
            break
        except OSError:
            time.sleep(0.1)
    return proc, base


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
