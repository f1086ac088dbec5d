"""Standard model: GPT-2 with its own learned position table and causal attention everywhere."""

from __future__ import annotations

import torch
from torch import nn

from .backbone import GPT2Backbone, causal_mask, seq_len


class GPT2Model(GPT2Backbone):
    def __init__(self, cfg: dict):
        L = seq_len(cfg["V"], cfg["C"])
        super().__init__(cfg, causal_mask(L).expand(cfg["n_layer"], L, L).clone())
        # Learned position table, n_positions rows (202 in the reference); the first L are used.
        self.wpe = nn.Embedding(cfg["n_positions"], cfg["n_embd"])
        self.init_gpt2_weights(self.wpe)

    def position_embedding(self) -> torch.Tensor:
        return self.wpe.weight[: self.L]  # (L, E)
