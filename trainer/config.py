"""Resolve and validate a job's config.

A job's config is a plain mapping, layered as
    conf/experiment.yaml  <-  conf/models/<family>.yaml  <-  conf/profiles/<profile>.yaml
    <-  the job's coordinates (V, N, seeds)  <-  `--set` overrides,
then validated against SCHEMA. Every error is a ConfigError whose message
names the file, key or value at fault.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import yaml

from trainer.seeds import derive_seed, seq_len

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
FAMILIES = ("gpt2", "lowrank_gpt2")
PROFILES = ("full", "smoke", "small")
PRECISIONS = ("fp32", "tf32", "bf16")  # fp32: the study as run; tf32, bf16: opt-in, for GPUs
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class ConfigError(ValueError):
    """A bad config; the message names what is wrong."""


class OptionalStr:
    """Schema type of a key that holds a string or null (YAML `null`, `~`)."""


# Every key a resolved config may (and must) hold, with its type.
SCHEMA: dict[str, Any] = {
    "model": {
        "family": str, "n_dims": int, "n_positions": int, "n_embd": int,
        "n_layer": int, "n_head": int, "V": int, "C": int, "truncated_dims": int,
    },
    "training": {
        "task": str,
        "task_kwargs": {"V": int, "C": int, "rho": float},
        "num_training_examples": int, "batch_size": int, "learning_rate": float,
        "train_steps": int, "save_every_steps": int, "keep_every_steps": int,
        "precision": str,
    },
    "evaluation": {"eval_every": int, "eval_examples": int},
    "seeds": {"pool": int, "run": int},
    # Optional experiment tracking (trainer/tracking.py); never changes what is trained.
    "tracking": {"wandb": {"project": OptionalStr, "entity": OptionalStr, "mode": OptionalStr}},
}
WANDB_MODES = ("online", "offline", "disabled")


class _Loader(yaml.SafeLoader):
    """The safe loader, reading numbers as YAML 1.2 does: 3e-4 and 1E5 are floats.

    YAML 1.1 (PyYAML's default) wants a dot and a signed exponent (3.0e-4), so
    it reads `--set training.learning_rate=3e-4` as a string.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    """A YAML document through the safe loader, numbers as a user would type them."""
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml(path: Path) -> dict:
    """Read a YAML mapping with the safe loader; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        raise ConfigError(f"{path}: invalid YAML{line}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
    return data


def merge(base: dict, override: dict, source: str, schema: dict = SCHEMA, prefix: str = "") -> dict:
    """Deep-merge `override` into a copy of `base`, rejecting keys not in `schema`."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"{source}: unknown key '{dotted}'")
        if isinstance(schema[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' must be a mapping")
            out[key] = merge(out.get(key, {}), value, source, schema[key], dotted + ".")
        else:
            out[key] = value
    return out


def resolve(
    family: str,
    V: int,
    N: int,
    run: int,
    profile: str = "full",
    overrides: list[str] | tuple[str, ...] = (),
    conf_dir: Path = CONF_DIR,
) -> dict:
    """The complete config of one run of the sweep."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family '{family}' (known: {', '.join(FAMILIES)})")
    profile_path = conf_dir / "profiles" / f"{profile}.yaml"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", profile):  # no ../ out of profiles/
        known = ", ".join(sorted(p.stem for p in (conf_dir / "profiles").glob("*.yaml")))
        raise ConfigError(f"unknown profile '{profile}': a profile is the name of a file in "
                          f"{conf_dir / 'profiles'} ({known})")
    if not profile_path.exists():
        raise ConfigError(f"unknown profile '{profile}': no file {profile_path}")
    config: dict = {}
    for path in (conf_dir / "experiment.yaml", conf_dir / "models" / f"{family}.yaml"):
        layer = load_yaml(path)
        if path.parent.name == "models":
            layer = {"model": layer}
        config = merge(config, layer, str(path))
    config = merge(config, load_yaml(profile_path), str(profile_path))

    model, training = config.setdefault("model", {}), config.setdefault("training", {})
    model["family"] = family
    model["V"] = V
    training.setdefault("task_kwargs", {})["V"] = V
    training["num_training_examples"] = N
    if family == "lowrank_gpt2" and isinstance(model.get("C"), int) and isinstance(V, int):
        model["n_positions"] = seq_len(V, model["C"])
    # Runs r of one (V) share a seed across N and model, so sample-complexity
    # curves compare paired runs; different r always differ.
    config.setdefault("seeds", {})["run"] = derive_seed("run", V, run)
    for item in overrides:
        config = apply_override(config, item)
    return validate(config)


def apply_override(config: dict, item: str) -> dict:
    """Apply one `dotted.key=value` override (value parsed as YAML) to a copy."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set '{item}': expected KEY=VALUE, e.g. training.train_steps=200")
    try:
        value = parse_yaml(raw)
    except yaml.YAMLError:
        raise ConfigError(f"--set '{item}': value is not valid YAML") from None
    parts = key.split(".")
    schema = SCHEMA
    for part in parts[:-1]:
        schema = schema.get(part) if isinstance(schema, dict) else None
        if not isinstance(schema, dict):
            raise ConfigError(f"--set '{item}': unknown key '{key}'")
    if parts[-1] not in schema or isinstance(schema[parts[-1]], dict):
        raise ConfigError(f"--set '{item}': unknown key '{key}'")
    out = copy.deepcopy(config)
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _check_types(config: Any, schema: dict, prefix: str = "") -> None:
    if not isinstance(config, dict):
        raise ConfigError(f"config: '{prefix.rstrip('.') or 'config'}' must be a mapping")
    for key in config:
        if key not in schema:
            raise ConfigError(f"config: unknown key '{prefix}{key}'")
    for key, kind in schema.items():
        dotted = f"{prefix}{key}"
        if key not in config:
            raise ConfigError(f"config: missing key '{dotted}'")
        value = config[key]
        if isinstance(kind, dict):
            _check_types(value, kind, dotted + ".")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"config: '{dotted}' must be a number, got {value!r}")
            if not math.isfinite(value):  # .inf passes `> 0`; NaN fails every comparison
                raise ConfigError(f"config: '{dotted}' must be a finite number, got {value!r}")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"config: '{dotted}' must be an integer, got {value!r}")
            # The queue's columns (and torch) hold 64-bit integers; a larger one would fail
            # only when written, after the queue file was made.
            if not INT64_MIN <= value <= INT64_MAX:
                raise ConfigError(f"config: '{dotted}' must fit in 64 bits (below 2**63 in "
                                  f"size), got {value!r}")
        elif kind is OptionalStr:
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"config: '{dotted}' must be a string or null, got {value!r}")
        elif not isinstance(value, kind):
            raise ConfigError(f"config: '{dotted}' must be a {kind.__name__}, got {value!r}")


def validate(config: dict) -> dict:
    """Check types, ranges and consistency; return a normalised copy."""
    if isinstance(config, dict) and "tracking" not in config:  # planned before tracking existed
        config = {**config, "tracking": copy.deepcopy(TRACKING_OFF)}
    _check_types(config, SCHEMA)
    config = copy.deepcopy(config)
    m, t, e = config["model"], config["training"], config["evaluation"]
    tk = t["task_kwargs"]
    tk["rho"] = float(tk["rho"])
    t["learning_rate"] = float(t["learning_rate"])

    def require(ok: bool, key: str, what: str) -> None:
        if not ok:
            value = config
            for part in key.split("."):
                value = value[part]
            raise ConfigError(f"config: '{key}' {what}, got {value!r}")

    require(m["family"] in FAMILIES, "model.family", f"must be one of {', '.join(FAMILIES)}")
    require(t["task"] == "table_connectivity", "training.task", "must be 'table_connectivity'")
    for key in ("n_dims", "n_embd", "n_layer", "n_head", "V", "C"):
        require(m[key] >= 1, f"model.{key}", "must be >= 1")
    require(m["n_dims"] >= 2, "model.n_dims", "must be >= 2 (the last entry is reserved)")
    require(1 <= m["truncated_dims"] <= m["n_dims"] - 1, "model.truncated_dims",
            f"must be within [1, model.n_dims - 1 = {m['n_dims'] - 1}] (the last entry is "
            "reserved)")
    require(m["n_embd"] % m["n_head"] == 0, "model.n_embd", "must be divisible by model.n_head")
    require(tk["V"] == m["V"], "training.task_kwargs.V", f"must equal model.V ({m['V']})")
    require(tk["C"] == m["C"], "training.task_kwargs.C", f"must equal model.C ({m['C']})")
    require(0.0 <= tk["rho"] <= 1.0, "training.task_kwargs.rho", "must be within [0, 1]")
    length = seq_len(m["V"], m["C"])
    if m["family"] == "lowrank_gpt2":
        require(m["n_positions"] == length, "model.n_positions", f"must be V*(C+1)+3 = {length}")
    else:
        require(m["n_positions"] >= length, "model.n_positions", f"must be >= V*(C+1)+3 = {length}")
    for key in ("batch_size", "train_steps", "save_every_steps", "keep_every_steps"):
        require(t[key] >= 1, f"training.{key}", "must be >= 1")
    require(t["learning_rate"] > 0, "training.learning_rate", "must be > 0")
    require(t["precision"] in PRECISIONS, "training.precision",
            f"must be one of {', '.join(PRECISIONS)}")
    require(
        t["num_training_examples"] >= t["batch_size"],
        "training.num_training_examples",
        f"must be >= training.batch_size ({t['batch_size']})",
    )
    require(e["eval_every"] >= 1, "evaluation.eval_every", "must be >= 1")
    require(e["eval_examples"] >= 1, "evaluation.eval_examples", "must be >= 1")
    for key in ("pool", "run"):
        require(0 <= config["seeds"][key] < 2**63, f"seeds.{key}", "must be within [0, 2**63)")
    require(config["tracking"]["wandb"]["mode"] in (None, *WANDB_MODES), "tracking.wandb.mode",
            f"must be null or one of {', '.join(WANDB_MODES)}")
    return config


def load_config(path: Path) -> dict:
    """A resolved config from a YAML file (e.g. a job folder's config.yaml)."""
    try:
        return validate(load_yaml(path))
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg.replace("config:", f"{path}:", 1)) from None


# Keys that may change between a run's start and its resume without making
# the saved state meaningless (cadences and length); everything else is fixed.
RESUMABLE_CHANGES = {
    ("training", "train_steps"), ("training", "save_every_steps"),
    ("training", "keep_every_steps"), ("evaluation", "eval_every"),
}
TRACKING_OFF = {"wandb": {"project": None, "entity": None, "mode": None}}


def resume_conflicts(saved: dict, wanted: dict) -> list[str]:
    """Dotted keys whose values differ in a way that forbids resuming."""
    out = []

    def walk(a: Any, b: Any, path: tuple[str, ...]) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), (*path, key))
        elif a != b and path not in RESUMABLE_CHANGES and path[:1] != ("tracking",):
            out.append(".".join(path))

    walk(saved, wanted, ())
    return out
