"""Model factory: ``build_model(cfg)`` -> module mapping x (B, L, n_dims) to (B,) logits."""

from __future__ import annotations

from torch import nn

from .backbone import GPT2Backbone, seq_len
from .gpt2 import GPT2Model
from .lowrank_gpt2 import LowRankGPT2Model

FAMILIES = ("gpt2", "lowrank_gpt2")
_CLASSES = {"gpt2": GPT2Model, "lowrank_gpt2": LowRankGPT2Model}
_INT_KEYS = ("n_dims", "n_positions", "n_embd", "n_layer", "n_head", "V", "C")

__all__ = ["FAMILIES", "GPT2Backbone", "build_model", "seq_len"]


def build_model(cfg: dict) -> nn.Module:
    """Build a model from a config dict; raises ValueError naming the offending key."""
    family = cfg.get("family")
    if family not in FAMILIES:
        raise ValueError(f"model family: unknown {family!r}, expected one of {FAMILIES}")
    for key in _INT_KEYS:
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model {key}: expected a positive int, got {value!r}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise ValueError(
            f"model n_embd: {cfg['n_embd']} is not divisible by n_head {cfg['n_head']}"
        )
    L = seq_len(cfg["V"], cfg["C"])
    if cfg["n_positions"] < L:
        raise ValueError(f"model n_positions: {cfg['n_positions']} < sequence length {L}")
    return _CLASSES[family](cfg)
