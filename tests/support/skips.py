"""Skip a test where this machine lacks what it needs; under CI=true (where .ci/run installs
everything), fail instead, so that a missing piece never passes as green."""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def need(module: str, install: str):
    """Import `module`, or skip (fail under CI=true, where .ci/run installs every extra)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        reason = f"{module} is not installed: {install}"
        if os.environ.get("CI") == "true":
            reason += " (.ci/run installs it)"
        skip_or_fail(reason)


@contextlib.contextmanager
def throwaway_server(what: str, prefix: str, start, stop, hint: str = ""):
    """A server started for the session in a temp folder of its own: yields (folder, what
    start(folder) returned), then stops it and removes the folder. Skipped with the reason
    when it cannot start, except under CI=true: failed."""
    # Not under pytest's own temp root: that is private to this user, and a server may run as
    # another (postgres, when tests run as root).
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        started = start(folder)
    except Exception as e:
        stop(folder)  # whatever part of it did start
        shutil.rmtree(folder, ignore_errors=True)
        skip_or_fail(f"no {what} could be started: {e}{hint}")
    try:
        yield folder, started
    finally:
        stop(folder)
        shutil.rmtree(folder, ignore_errors=True)
