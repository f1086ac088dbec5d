"""Low-rank model: shared per-group position block and structured per-layer attention masks.

Sequence: V groups of C+1 tokens (table, C columns), then separator, q1, q2 (spec section 2).
Layers 0-1 are block diagonal (a group sees itself; each of the last 3 tokens sees only itself);
layers 2.. are sparse over K = {last token of each group} + {last 3 tokens}. Every mask is
intersected with causal. Rows outside K have no key in sparse layers; they see themselves so the
softmax never gets an empty row (they cannot reach the last position anyway).
"""

from __future__ import annotations

import torch
from torch import nn

from .backbone import GPT2Backbone, causal_mask, seq_len

N_TAIL = 3  # separator, q1, q2
N_BLOCK_DIAG = 2  # layers 0-1


def lowrank_masks(V: int, C: int, n_layer: int) -> torch.Tensor:
    """(n_layer, L, L) bool masks, True = may attend."""
    L = seq_len(V, C)
    G = C + 1
    # Group id per position: groups 0..V-1, then each tail token its own group.
    group = torch.cat([torch.arange(V).repeat_interleave(G), V + torch.arange(N_TAIL)])
    block_diag = group[:, None] == group[None, :]
    in_k = torch.zeros(L, dtype=torch.bool)
    in_k[torch.arange(V) * G + C] = True  # last token of each group
    in_k[-N_TAIL:] = True
    sparse = (in_k[:, None] & in_k[None, :]) | torch.eye(L, dtype=torch.bool)
    causal = causal_mask(L)
    per_layer = [block_diag if i < N_BLOCK_DIAG else sparse for i in range(n_layer)]
    return torch.stack(per_layer) & causal


class LowRankGPT2Model(GPT2Backbone):
    def __init__(self, cfg: dict):
        V, C, E = cfg["V"], cfg["C"], cfg["n_embd"]
        super().__init__(cfg, lowrank_masks(V, C, cfg["n_layer"]))
        self.V = V
        self.pos_group = nn.Parameter(torch.empty(C + 1, E))  # shared by all V groups
        self.pos_tail = nn.Parameter(torch.empty(N_TAIL, E))  # separator, q1, q2
        self.init_gpt2_weights(self.pos_group, self.pos_tail)

    def position_embedding(self) -> torch.Tensor:
        return torch.cat([self.pos_group.repeat(self.V, 1), self.pos_tail])  # (L, E)
