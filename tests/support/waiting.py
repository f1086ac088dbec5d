"""Poll until something is true, or fail naming what never happened."""

from __future__ import annotations

import time


def wait_for(condition, timeout: float = 120, what: str = "condition"):
    """Call `condition` until it returns something true (returned), for at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
