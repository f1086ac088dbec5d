"""Shared fixtures: a queue database per backend (SQLite file; PostgreSQL when available)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from db import JobQueue, connect

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

BACKENDS = ["sqlite"]


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path) -> str:
    """A fresh, empty queue database URL for each test."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.sqlite'}"
    raise AssertionError(request.param)


@pytest.fixture
def queue(db_url) -> JobQueue:
    q = JobQueue(connect(db_url, create=True))
    yield q
    q.engine.dispose()


def runner_env(db_url: str) -> dict:
    return {**os.environ, "RUNNER_DB": db_url, "PYTHONUNBUFFERED": "1"}
