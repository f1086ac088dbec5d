"""Optional extras the tests need: skipped with the reason where missing, failed under CI."""

from __future__ import annotations

import importlib
import os

import pytest


def need(module: str, install: str):
    """Import `module`, or skip (fail under CI=true, where .ci/run installs every extra)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        reason = f"{module} is not installed: {install}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (.ci/run installs it)")
        pytest.skip(reason)
