"""TensorBoard event files read back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

from tests.support.skips import need

TB = "pip install -e '.[tensorboard-tests]'"


def points(run_dir: Path) -> dict[str, list[int]]:
    """tag -> steps, by tensorboard's EventAccumulator (every point kept)."""
    ea_mod = need("tensorboard.backend.event_processing.event_accumulator", TB)
    acc = ea_mod.EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [e.step for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
