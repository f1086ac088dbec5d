"""The program's version, as `python -m runner --version` prints it."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "table-connectivity-runner"   # pyproject.toml's [project] name
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def package_version() -> str:
    """The installed package's version; else the source tree's pyproject.toml's, so noted."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    try:
        found = re.search(r'^version\s*=\s*"([^"]+)"', PYPROJECT.read_text(), re.MULTILINE)
    except OSError:
        found = None
    return f"{found.group(1)} (not installed)" if found else "unknown (not installed)"
