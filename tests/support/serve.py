"""The dashboard's server (`python -m runner serve`) as a process of the test's own."""

from __future__ import annotations

import subprocess

from testing import serve
from testing.serve import stop_server
from tests.support.commands import ROOT, runner_env

__all__ = ["start_server", "stop_server"]


def start_server(url: str, *args: str, cwd=ROOT) -> tuple[subprocess.Popen, str]:
    """`python -m runner serve --port 0 ARGS` against `url`; (process, its base URL)."""
    return serve.start_server(url, *args, cwd=cwd, env=runner_env(url))
