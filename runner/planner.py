"""Expand a sweep file into fully resolved job rows for the queue."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from runner.jobfolders import BadAddress, FolderUnavailable, open_folder
from trainer.config import CONF_DIR, FAMILIES, ConfigError, load_yaml, resolve
from trainer.seeds import seq_len

AXES = ("V", "N", "model", "run")  # nesting order = the guide's claim order
SWEEP_KEYS = {"study", "profile", "max_attempts", "grid", "models"}
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DEFAULT_SWEEP = CONF_DIR / "sweep.yaml"


class SweepError(ValueError):
    """A bad sweep file or filter; the message names the file and key."""


def load_sweep(path: Path) -> dict:
    try:
        sweep = load_yaml(path)
    except ConfigError as e:
        raise SweepError(str(e)) from None
    where = str(path)
    unknown = set(sweep) - SWEEP_KEYS
    if unknown:
        raise SweepError(f"{where}: unknown key '{sorted(unknown)[0]}'")
    for key in ("study", "grid", "models"):
        if key not in sweep:
            raise SweepError(f"{where}: missing key '{key}'")
    if not isinstance(sweep["study"], str) or not SAFE_NAME.match(sweep["study"]):
        raise SweepError(f"{where}: 'study' must be a plain name, got {sweep['study']!r}")
    attempts = sweep.setdefault("max_attempts", 3)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 1000:
        raise SweepError(f"{where}: 'max_attempts' must be an integer from 1 to 1000, "
                         f"got {attempts!r}")
    grid = sweep["grid"]
    if not isinstance(grid, dict) or set(grid) != set(AXES):
        raise SweepError(f"{where}: 'grid' must have exactly the keys {', '.join(AXES)}")
    for axis in AXES:
        values = grid[axis]
        if not isinstance(values, list) or not values or len(set(map(str, values))) != len(values):
            raise SweepError(f"{where}: 'grid.{axis}' must be a non-empty list without repeats")
        kind = str if axis == "model" else int
        for value in values:
            if isinstance(value, bool) or not isinstance(value, kind):
                raise SweepError(f"{where}: 'grid.{axis}' has a bad value {value!r}")
            if kind is int and value < 1:
                raise SweepError(f"{where}: 'grid.{axis}' values must be >= 1, got {value}")
            if axis == "model" and value not in FAMILIES:
                raise SweepError(f"{where}: 'grid.model' has unknown model family '{value}' "
                                 f"(known: {', '.join(FAMILIES)})")
    models = sweep["models"]
    if not isinstance(models, dict):
        raise SweepError(f"{where}: 'models' must be a mapping")
    for family in grid["model"]:
        entry = models.get(family)
        if not isinstance(entry, dict) or set(entry) != {"tag", "folder"}:
            raise SweepError(f"{where}: 'models.{family}' must have exactly 'tag' and 'folder'")
        for key in ("tag", "folder"):
            if not isinstance(entry[key], str) or not SAFE_NAME.match(entry[key]):
                raise SweepError(f"{where}: 'models.{family}.{key}' must be a plain name "
                                 f"(letters, digits, _ . -), got {entry[key]!r}")
    return sweep


def parse_only(items: tuple[str, ...] | list[str], sweep: dict) -> dict[str, set]:
    """--only KEY=VALUE filters: values of one key OR-ed, keys AND-ed."""
    chosen: dict[str, set] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in AXES:
            raise SweepError(
                f"--only '{item}': expected KEY=VALUE with KEY one of {', '.join(AXES)}")
        allowed = sweep["grid"][key]
        value: object = raw
        if key != "model":
            try:
                value = int(raw)
            except ValueError:
                raise SweepError(f"--only '{item}': {key} must be an integer") from None
        if value not in allowed:
            shown = ", ".join(map(str, allowed))
            raise SweepError(f"--only '{item}': {raw} is not in the sweep's {key} values ({shown})")
        chosen.setdefault(key, set()).add(value)
    return chosen


# Config keys that each job's sweep coordinates set (trainer.config.resolve): an override
# would give every job the same value under names that say otherwise.
AXIS_KEYS = {"model.V": "V", "training.task_kwargs.V": "V",
             "training.num_training_examples": "N", "model.family": "model", "seeds.run": "run"}


def check_overrides(overrides: list[str], sweep: dict) -> None:
    """Refuse a --set of a key that a sweep axis sets: point to --only instead."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        axis = AXIS_KEYS.get(key)
        if axis:
            shown = ", ".join(map(str, sweep["grid"][axis]))
            raise SweepError(f"--set '{item}': {key} is set by the sweep axis {axis}; choose "
                             f"with --only {axis}=VALUE among the sweep's values ({shown}), or "
                             "give a sweep file with other values (--sweep)")


def job_rows(sweep: dict, profile: str, only: dict[str, set], overrides: list[str],
             out_root: str) -> list[dict]:
    """Every selected job of the sweep, resolved, in the guide's order.

    Folders are absolute (`out_root` resolved against the planner's working
    directory), so workers and tools started anywhere find the same files.
    """
    check_overrides(overrides, sweep)
    rows = []
    grid = sweep["grid"]
    root = open_folder(out_root)
    for position, (V, N, family, run) in enumerate(itertools.product(*(grid[a] for a in AXES))):
        coords = {"V": V, "N": N, "model": family, "run": run}
        if any(coords[k] not in values for k, values in only.items()):
            continue
        names = sweep["models"][family]
        name = f"{sweep['study']}_{names['tag']}_V{V}_N{N}_run{run}"
        config = resolve(family, V, N, run, profile, overrides)
        t = config["training"]
        rows.append({
            "name": name, "v": V, "n": N, "model": family, "run": run, "position": position,
            "cost": estimate_cost(config), "config": config,
            "out_dir": root.join(names["folder"], name),
            "total_steps": t["train_steps"], "max_attempts": sweep["max_attempts"],
            "profile": profile, "overrides": list(overrides),
        })
    return rows


def study_config(job: dict) -> dict:
    """The config this job would have in the study as run: full profile, no overrides."""
    return resolve(job["model"], job["v"], job["n"], job["run"], "full")


def estimate_cost(config: dict) -> float:
    """Relative compute of a job: steps x batch x sequence length x block weights."""
    m, t = config["model"], config["training"]
    return float(t["train_steps"] * t["batch_size"] * seq_len(m["V"], m["C"])
                 * m["n_layer"] * 12 * m["n_embd"] ** 2)


def check_out_root(out_root: str) -> None:
    """Refuse a runs folder that jobs could not write into, before anything is planned."""
    if not out_root or "\0" in out_root:
        raise SweepError("--out-root must be a folder path")
    try:  # a folder on disk, or in a bucket: reachable, and writable with these keys?
        open_folder(out_root).check_root()
    except (BadAddress, FolderUnavailable) as e:
        raise SweepError(f"--out-root {e}") from None
