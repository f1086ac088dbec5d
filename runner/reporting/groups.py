"""Config groups: the resolved-config keys that tell apart jobs of one (V, model, N).

A queue may hold one grid planned twice (learning rate 1e-4 and 3e-4, fp32 and
bf16, under two sweep names). Their runs must never share a mean: results,
figures and the report split every (V, model, N) by the keys that differ, or by
the keys the user names (`--by training.learning_rate`). Seeds differ from run
to run and tracking settings say only where metrics were sent, so neither
splits a group.
"""

from __future__ import annotations

import json

NOT_A_GROUP = ("seeds.", "tracking.")


class GroupingError(ValueError):
    """A --by key no job's config has."""


def flatten(config: dict, prefix: str = "") -> dict:
    """{'training.train_steps': 30, ...}: a nested config as dotted keys."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def flat_config(job: dict) -> dict:
    config = job.get("config")
    return flatten(config) if isinstance(config, dict) else {}


_MISSING = "<missing>"


def _value(flat: dict, key: str) -> str:
    return json.dumps(flat[key], sort_keys=True) if key in flat else _MISSING


def differing_keys(jobs: list[dict], bucket=lambda j: (j["v"], j["model"], j["n"])) -> list[str]:
    """Config keys (seeds and tracking aside) with two values within one bucket of jobs."""
    buckets: dict = {}
    for job in jobs:
        buckets.setdefault(bucket(job), []).append(flat_config(job))
    keys: set[str] = set()
    for flats in buckets.values():
        for key in set().union(*flats):
            if not key.startswith(NOT_A_GROUP) and len({_value(f, key) for f in flats}) > 1:
                keys.add(key)
    return sorted(keys)


def split_keys(jobs: list[dict], by: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The keys that make the groups: `by` if given (each checked), else every difference."""
    if not by:
        return differing_keys(jobs)
    known = set().union(*(flat_config(j) for j in jobs)) if jobs else set()
    for key in by:
        if key not in known:
            differ = differing_keys(jobs)
            raise GroupingError(
                f"--by '{key}': no job's config has this key (a dotted key of config.yaml, "
                "e.g. training.learning_rate); keys that differ between jobs here: "
                + (", ".join(differ) if differ else "none"))
    return list(dict.fromkeys(by))


def group_of(job: dict, keys: list[str]) -> dict:
    """{key: value} of the job's config for the grouping keys (None where it has none)."""
    flat = flat_config(job)
    return {key: flat.get(key) for key in keys}


def label(group: dict) -> str:
    """'training.learning_rate=0.0003, training.precision=bf16'; '' for the only group."""
    return ", ".join(f"{key}={_show(value)}" for key, value in group.items())


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def order_key(group: dict) -> tuple:
    """Groups in the order of their values, numbers numerically."""
    return tuple((0, v, "") if isinstance(v, int | float) and not isinstance(v, bool)
                 else (1, 0, json.dumps(v, sort_keys=True)) for v in group.values())
