"""Optional experiment tracking: each job as a Weights & Biases run.

Off unless the job's config sets `tracking.wandb.project` (e.g. `plan --set
tracking.wandb.project=NAME`); wandb is imported only then (the `wandb`
extra). The run is named as the job (its folder), its config is the job's
resolved config, and its id is kept in the job folder (`wandb-run.json`), so
every attempt of the job logs into the same run (`resume="allow"`) and a job
started over in a new folder gets a new one. An attempt that resumes at step
s logs from s on: the steps before s were logged by the attempt that saved
the state (a worker stopped gracefully saves the state at the step it stops
on, so no step is logged twice).

Tracking never stops training: when wandb cannot start a run (no network,
no login), the job's log says so and the job trains without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

RUN_FILE = "wandb-run.json"
EXTRA = "pip install -e '.[wandb]'"


class Tracker:
    """No tracking: the default."""

    def start(self, step: int) -> None:
        pass

    def log(self, record: dict) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


def for_config(config: dict, out: Path, log: Callable[[str], None]) -> Tracker:
    """The job's tracker: W&B when `tracking.wandb.project` is set, else a no-op."""
    settings = config.get("tracking", {}).get("wandb", {})
    if not settings.get("project"):
        return Tracker()
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise RuntimeError(f"tracking.wandb.project is set but wandb is not installed: "
                           f"{EXTRA}") from None
    return WandbTracker(config, settings, Path(out), log)


def run_id(out: Path) -> str:
    """This job folder's W&B run id: made on the first attempt, read back on the next ones."""
    from trainer.atomic import write_json_atomic

    path = out / RUN_FILE
    try:
        return json.loads(path.read_text())["id"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    seed = f"{out.resolve()}\0{time.time_ns()}\0{os.getpid()}"
    made = hashlib.sha256(seed.encode()).hexdigest()[:16]
    write_json_atomic(path, {"id": made, "name": out.name})
    return made


def _metrics(record: dict) -> dict:
    """A metrics record as W&B keys: train/loss, train/accuracy, test/accuracy, ..."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if key.startswith("test_"):
            out["test/" + key[5:]] = value
        elif key.startswith("train_"):
            out["train/" + key[6:]] = value
        else:
            out["train/" + key] = value
    return out


class WandbTracker(Tracker):
    def __init__(self, config: dict, settings: dict, out: Path, log: Callable[[str], None]):
        self.config, self.settings, self.out, self.say = config, settings, out, log
        self.run = None
        self.first_step = 0

    def start(self, step: int) -> None:
        import wandb

        self.first_step = step
        try:
            self.run = wandb.init(
                project=self.settings["project"], entity=self.settings.get("entity"),
                mode=self.settings.get("mode"), name=self.out.name, id=run_id(self.out),
                resume="allow", config=self.config,
                dir=os.environ.get("WANDB_DIR") or str(self.out),
                settings=wandb.Settings(console="off", silent=True, save_code=False,
                                        disable_git=True, x_disable_stats=True))
        except Exception as e:  # tracking must not cost the job
            self.say(f"wandb: no run for this attempt ({type(e).__name__}: {e}); "
                     "training goes on without it")
            self.run = None
            return
        # A resumed online run knows its last step: never send one it already has.
        if getattr(self.run, "resumed", False):
            self.first_step = max(step, int(getattr(self.run, "step", 0) or 0))
        self.say(f"wandb: logging to run {self.run.id} ({self.settings['project']}) "
                 f"from step {self.first_step}")

    def log(self, record: dict) -> None:
        if self.run is None or record["step"] < self.first_step:
            return
        try:
            self.run.log(_metrics(record), step=record["step"])
        except Exception as e:
            self.say(f"wandb: logging stopped at step {record['step']} "
                     f"({type(e).__name__}: {e}); training goes on")
            self.run = None

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            try:
                self.run.finish(exit_code=1 if failed else 0)
            except Exception as e:  # never hide the job's own outcome
                self.say(f"wandb: run not finished cleanly ({type(e).__name__}: {e})")
            finally:
                self.run = None
