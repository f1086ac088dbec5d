"""The attention masks of the spec, written out with plain loops, independently of models/."""

from __future__ import annotations

import torch

C = 3


def loop_masks(V: int, n_layer: int) -> list[torch.Tensor]:
    """The spec's rules written out with plain loops, independently of the model code."""
    L = V * (C + 1) + 3
    G = C + 1

    def group(i):  # table group id, or a unique id for each of the last 3 tokens
        return i // G if i < V * G else 1000 + i

    K = {g * G + C for g in range(V)} | {L - 3, L - 2, L - 1}
    out = []
    for layer in range(n_layer):
        m = torch.zeros(L, L, dtype=torch.bool)
        for q in range(L):
            for k in range(q + 1):  # causal: key <= query
                if layer < 2:
                    m[q, k] = group(q) == group(k)
                elif q in K:
                    m[q, k] = k in K
                else:
                    m[q, k] = k == q  # non-K rows: only themselves
        out.append(m)
    return out
