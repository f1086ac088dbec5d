"""Standard model: GPT-2 with its own learned position table and causal attention everywhere."""

from __future__ import annotations

import torch
from torch import nn

from .backbone import GPT2Backbone, causal_layer, causal_mask, last_query_layer, seq_len


class GPT2Model(GPT2Backbone):
    def __init__(self, cfg: dict):
        L = seq_len(cfg["V"], cfg["C"])
        super().__init__(cfg, causal_mask(L).expand(cfg["n_layer"], L, L).clone())
        # Learned position table, n_positions rows (202 in the reference); the first L are used.
        self.wpe = nn.Embedding(cfg["n_positions"], cfg["n_embd"])
        self.init_gpt2_weights(self.wpe)

    def position_embedding(self) -> torch.Tensor:
        return self.wpe.weight[: self.L]  # (L, E)

    def last_hidden(self, x: torch.Tensor) -> torch.Tensor:
        # Causal attention without a mask in every layer but the last, which needs its output
        # at the last position only.
        h = self.read_in(x) + self.position_embedding()  # (B, L, E)
        for block in self.blocks[:-1]:
            h = causal_layer(block, h)
        return last_query_layer(self.blocks[-1], h)[:, 0]  # (B, E)
