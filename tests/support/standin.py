"""A stand-in job (trainer.job.Job) for running the real worker loop without torch: the
in-process worker tests and the connection tests use it."""

from __future__ import annotations

import time
from pathlib import Path

from trainer.job import Job, Progress, RunResult

METRICS = {"accuracy": 0.75, "balanced_accuracy": 0.625, "majority_rate": 0.5, "steps": 5}
STEP_FILE = "step"  # the stand-in's whole state: the last step it did


def row(name: str, out_dir: Path, steps: int = 5) -> dict:
    """One job as `JobQueue.plan` takes it; the stand-in reads `steps` from its config."""
    return {"name": name, "v": 5, "n": 256, "model": "standin", "run": 1, "position": 0,
            "cost": 1.0, "config": {"steps": steps}, "out_dir": str(out_dir),
            "total_steps": steps, "max_attempts": 3, "profile": "test", "overrides": []}


class StandIn(Job):
    """Counts to the config's `steps`: writes each step to a file in its folder (and resumes
    from it), reports progress after each, stops at a step boundary once `stop` is set, and
    ends with METRICS. `at_step(step)` runs before each step: a test acts mid-job there."""

    def __init__(self, at_step=None, seconds_per_step: float = 0.0):
        self.at_step = at_step or (lambda step: None)
        self.seconds_per_step = seconds_per_step
        self.specs = []    # what each run was handed
        self.starts = []   # the step each run resumed from

    def run(self, spec):
        self.specs.append(spec)
        folder = Path(spec.folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = folder / STEP_FILE
        start = int(state.read_text()) if state.exists() else 0
        self.starts.append(start)
        total = spec.config["steps"]
        spec.echo(f"starting at step {start}")
        for step in range(start + 1, total + 1):
            self.at_step(step)
            time.sleep(self.seconds_per_step)
            state.write_text(str(step))
            spec.on_progress(Progress(step, total, loss=1.0 / step, train_accuracy=0.5,
                                      test={"accuracy": step / 10}))
            if spec.stop.is_set() and step < total:
                return RunResult("stopped", step)
        return RunResult("completed", total, dict(METRICS))
