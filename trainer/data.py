"""Table-connectivity data (spec §1–3), generated in vectorised torch on the CPU.

Token ids form one vocabulary per ``V``: ``0 .. V-1`` are table ids, ``V + c`` is column
``c`` (``0 <= c < V*C``) and ``V + V*C`` is the separator. One example is the sequence

    [table 0][col]*C [table 1][col]*C ... [sep] [q1] [q2]        length V*(C+1) + 3

with label ``+1`` when a table holding ``q1`` is connected to a table holding ``q2``
(tables linked by a shared column id, transitively), else ``-1``.

Randomness only ever comes from an explicit ``torch.Generator``. Pools and evaluation sets
are built from fixed-size blocks, each with its own generator seeded by ``derive_seed``, so
example ``i`` depends only on ``(seed, i)``: pools are nested and eval is a disjoint stream.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from trainer.seeds import derive_seed, seq_len

__all__ = ["build_eval_set", "build_pool", "derive_seed", "embed", "generate", "sample_indices",
           "seq_len", "token_table"]

BLOCK = 64  # examples per independently seeded block in build_pool / build_eval_set


class _Draws(NamedTuple):
    """Every random number one batch consumes, drawn in this order (B = batch)."""

    edges: torch.Tensor  # (B, V, V) bool, strict upper triangle: ER graph, edge (u, v) u < v
    cols: torch.Tensor  # (B, V, C) long in 0..V*C-1: columns before edge sharing
    src_slot: torch.Tensor  # (B, V, V) long in 0..C-1: slot of u read for edge (u, v)
    dst_slot: torch.Tensor  # (B, V, V) long in 0..C-1: slot of v overwritten for edge (u, v)
    queries: torch.Tensor  # (B, 2) long in 0..V*C-1


def _draw(V: int, C: int, rho: float, count: int, generator: torch.Generator) -> _Draws:
    shape = (count, V, V)
    edges = torch.rand(shape, generator=generator) < rho
    edges &= torch.ones(V, V, dtype=torch.bool).triu(1)
    cols = torch.randint(0, V * C, (count, V, C), generator=generator)
    src_slot = torch.randint(0, C, shape, generator=generator)
    dst_slot = torch.randint(0, C, shape, generator=generator)
    queries = torch.randint(0, V * C, (count, 2), generator=generator)
    return _Draws(edges, cols, src_slot, dst_slot, queries)


def _cat(draws: list[_Draws]) -> _Draws:
    return _Draws(*(torch.cat(parts) for parts in zip(*draws, strict=True)))


def _share_columns(d: _Draws) -> torch.Tensor:
    """Apply the edge-sharing step (spec §1.3); returns the final columns (B, V, C).

    Edges are processed in lexicographic order. Edges out of ``u`` only write to tables
    ``v > u``, and every write into ``u`` comes from an edge ``(u', u)`` with ``u' < u``, which
    precedes them; so table ``u`` is final once the edges out of ``u' < u`` are done, and the
    edges out of one ``u`` (distinct targets ``v``) can be applied all at once.
    """
    cols = d.cols.clone()
    B, V, C = cols.shape
    slots = torch.arange(C)
    for u in range(V - 1):
        # value of u's chosen slot for each potential target v: (B, V)
        vals = torch.gather(cols[:, u], 1, d.src_slot[:, u])
        # which (v, slot) gets overwritten: (B, V, C)
        hit = (d.dst_slot[:, u, :, None] == slots) & d.edges[:, u, :, None]
        cols = torch.where(hit, vals[:, :, None], cols)
    return cols


def _labels(cols: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """±1 labels (B,) from final columns (B, V, C) and queries (B, 2)."""
    B, V, C = cols.shape
    # holds[b, t, k]: table t holds column k, (B, V, V*C)
    holds = torch.zeros(B, V, V * C).scatter_(2, cols, 1.0)
    # linked via a shared column; diagonal is set since each table holds >= 1 column: (B, V, V)
    reach = (holds @ holds.transpose(1, 2)) > 0
    for _ in range(max(1, (V - 1).bit_length())):  # paths of length up to 2**k >= V - 1
        r = reach.float()
        reach = (r @ r) > 0
    q1 = torch.gather(holds, 2, queries[:, None, 0:1].expand(B, V, 1))  # (B, V, 1)
    q2 = torch.gather(holds, 2, queries[:, None, 1:2].expand(B, V, 1))  # (B, V, 1)
    hit = (q1.transpose(1, 2) @ reach.float() @ q2).reshape(B) > 0
    return hit.long() * 2 - 1


def _assemble(d: _Draws) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) and labels (B,) from a batch of draws."""
    B, V, C = d.cols.shape
    cols = _share_columns(d)
    tables = torch.arange(V).expand(B, V)[:, :, None]  # (B, V, 1)
    groups = torch.cat([tables, cols + V], dim=2).reshape(B, V * (C + 1))
    sep = torch.full((B, 1), V + V * C)
    ids = torch.cat([groups, sep, d.queries + V], dim=1)  # (B, L)
    return ids, _labels(cols, d.queries)


def _check(V: int, C: int, rho: float, count: int) -> None:
    if V < 1 or C < 1 or not 0.0 <= rho <= 1.0 or count < 0:
        raise ValueError(f"bad data parameters V={V} C={C} rho={rho} count={count}")


def generate(
    V: int, C: int, rho: float, count: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` fresh examples from ``generator`` (CPU): ids (count, L) and labels (count,)."""
    _check(V, C, rho, count)
    return _assemble(_draw(V, C, rho, count, generator))


def _blocks(domain: str, seed: int, V: int, C: int, rho: float, n: int):
    _check(V, C, rho, n)
    draws = []
    for block in range(-(-n // BLOCK)):
        g = torch.Generator().manual_seed(derive_seed(domain, seed, block))
        draws.append(_draw(V, C, rho, BLOCK, g))
    if not draws:
        return generate(V, C, rho, 0, torch.Generator())
    # Assembling is per-example deterministic, so one batched call equals per-block calls.
    ids, labels = _assemble(_cat(draws))
    return ids[:n], labels[:n]


def build_pool(
    V: int, C: int, rho: float, pool_seed: int, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training pool of ``n`` examples; example i depends on (pool_seed, i) only (nested)."""
    return _blocks("pool", pool_seed, V, C, rho, n)


def build_eval_set(
    V: int, C: int, rho: float, seed: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` evaluation examples from the "eval" stream, disjoint from every pool."""
    return _blocks("eval", seed, V, C, rho, count)


def token_table(V: int, C: int, n_dims: int, truncated_dims: int, seed: int) -> torch.Tensor:
    """Fixed token vectors (V + V*C + 1, n_dims) for table, column and separator ids.

    Table and column rows: N(0, 1) in the first ``truncated_dims`` entries, the rest 0, as the
    reference fed them (it drew ``n_dims - 1`` entries, zeroed ``truncated_dims .. n_dims-2``
    and reserved the last). The separator row (last) is all zeros. Seeded from
    ``("tokens", seed)``.
    """
    if not 1 <= truncated_dims <= n_dims - 1:
        raise ValueError(f"truncated_dims must be within [1, n_dims - 1 = {n_dims - 1}], "
                         f"got {truncated_dims}")
    g = torch.Generator().manual_seed(derive_seed("tokens", seed))
    table = torch.zeros(V + V * C + 1, n_dims)
    drawn = torch.randn(V + V * C, n_dims - 1, generator=g)
    table[: V + V * C, :truncated_dims] = drawn[:, :truncated_dims]
    return table


def embed(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Token vectors (B, L, n_dims) for ids (B, L), on ``table``'s device."""
    return table[ids.to(table.device)]


def sample_indices(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` indices uniform over ``0 .. n-1``, with replacement (CPU generator)."""
    return torch.randint(0, n, (batch_size,), generator=generator)
