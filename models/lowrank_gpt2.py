"""Low-rank model: shared per-group position block and structured per-layer attention masks.

Sequence: V groups of C+1 tokens (table, C columns), then separator, q1, q2 (spec section 2).
Layers 0-1 are block diagonal (a group sees itself; each of the last 3 tokens sees only itself);
layers 2.. are sparse over K = {last token of each group} + {last 3 tokens}. Every mask is
intersected with causal. Rows outside K have no key in sparse layers; they see themselves so the
softmax never gets an empty row (they cannot reach the last position anyway).

The structured forward (``last_hidden``) computes only what reaches the last position:
* layer 0: causal attention inside each group, as a batch of (C+1)-token sequences; each tail
  token alone (attention returns its own value);
* layer 1: its output is read at K only, and each group's last token sees its whole group:
  query, projection and MLP for that token, keys and values for the group;
* layers 2..: K only reads K, so they run on the gathered K positions (V + 3 of them) with plain
  causal attention; the last of them for the last position only.
With at most two layers every layer is block diagonal and the last token is alone in its group,
so the logit depends on that token only.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbone import (
    GPT2Backbone,
    causal_layer,
    causal_mask,
    last_query_layer,
    self_only_layer,
    seq_len,
)

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
        self.V, self.G = V, C + 1
        self.pos_group = nn.Parameter(torch.empty(C + 1, E))  # shared by all V groups
        self.pos_tail = nn.Parameter(torch.empty(N_TAIL, E))  # separator, q1, q2
        self.init_gpt2_weights(self.pos_group, self.pos_tail)

    def position_embedding(self) -> torch.Tensor:
        return torch.cat([self.pos_group.repeat(self.V, 1), self.pos_tail])  # (L, E)

    def last_hidden(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.blocks
        if len(blocks) <= N_BLOCK_DIAG:
            h = self.read_in(x[:, -1:]) + self.pos_tail[-1]  # (B, 1, E): the last token only
            for block in blocks:
                h = self_only_layer(block, h)
            return h[:, 0]
        h = self.read_in(x) + self.position_embedding()  # (B, L, E)
        h = self._by_group(causal_layer, blocks[0], h)       # (B, L, E)
        h = self._by_group(last_query_layer, blocks[1], h)   # (B, V + 3, E): the K positions
        for block in blocks[2:-1]:
            h = causal_layer(block, h)
        return last_query_layer(blocks[-1], h)[:, 0]  # (B, E)

    def _by_group(self, layer, block, h: torch.Tensor) -> torch.Tensor:
        """A block-diagonal layer: ``layer`` on each group as its own sequence, each tail token
        alone. h (B, V*G + 3, E) -> (B, V*T + 3, E), T the positions ``layer`` returns."""
        B, E, VG = h.shape[0], h.shape[2], self.V * self.G
        groups = layer(block, h[:, :VG].reshape(B * self.V, self.G, E))  # (B*V, T, E)
        tail = self_only_layer(block, h[:, VG:])                          # (B, 3, E)
        return torch.cat([groups.reshape(B, -1, E), tail], dim=1)
