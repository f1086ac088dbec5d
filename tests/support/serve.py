"""The dashboard's server (`python -m runner serve`) as a process of the test's own."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
import urllib.request

from tests.support.commands import PYTHON, ROOT, runner_env


def start_server(url: str, *args: str, cwd=ROOT) -> tuple[subprocess.Popen, str]:
    """`python -m runner serve --port 0 ARGS`; (process, its base URL) once it answers."""
    proc = subprocess.Popen([PYTHON, "-m", "runner", "--db", url, "serve", "--port", "0", *args],
                            cwd=cwd, env=runner_env(url), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(60)
    match = re.search(r"http://[\d.]+:\d+/", line[0] if line else "")
    if not match:
        proc.kill()
        raise AssertionError(f"serve did not start: {line} {proc.stderr.read()[-2000:]}")
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
