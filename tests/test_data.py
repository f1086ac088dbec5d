"""Tests for trainer/data.py: layout, labels against a plain-Python brute force, seeding."""

import random

import pytest
import torch

from trainer import data
from trainer.config import resolve
from trainer.data import (
    build_eval_set,
    build_pool,
    derive_seed,
    embed,
    generate,
    sample_indices,
    seq_len,
    token_table,
)

C, RHO = 3, 0.5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def parse(row: list[int], V: int, C: int) -> tuple[list[set[int]], int, int]:
    """Tables' column sets and the two queries, read from one id sequence only."""
    tables = [{row[g * (C + 1) + 1 + s] - V for s in range(C)} for g in range(V)]
    return tables, row[-2] - V, row[-1] - V


def brute_label(row: list[int], V: int, C: int) -> int:
    """Union-find over tables sharing a column; +1 iff the queries' tables meet."""
    tables, q1, q2 = parse(row, V, C)
    parent = list(range(V))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for i in range(V):
        for j in range(i + 1, V):
            if tables[i] & tables[j]:
                parent[find(i)] = find(j)
    roots1 = {find(t) for t in range(V) if q1 in tables[t]}
    roots2 = {find(t) for t in range(V) if q2 in tables[t]}
    return 1 if roots1 & roots2 else -1


def test_seq_len():
    assert seq_len(5, 3) == 23
    assert seq_len(20, 3) == 83


@pytest.mark.parametrize("V", [5, 20])
def test_layout(V):
    ids, y = generate(V, C, RHO, 500, gen(0))
    L = seq_len(V, C)
    assert ids.shape == (500, L) and ids.dtype == torch.long
    assert y.shape == (500,) and set(y.tolist()) <= {-1, 1}
    for g in range(V):
        assert (ids[:, g * (C + 1)] == g).all()
        cols = ids[:, g * (C + 1) + 1 : (g + 1) * (C + 1)]
        assert ((cols >= V) & (cols < V + V * C)).all()
    assert (ids[:, L - 3] == V + V * C).all()
    q = ids[:, L - 2 :]
    assert ((q >= V) & (q < V + V * C)).all()


@pytest.mark.parametrize(
    ("V", "rho", "count"),
    [
        (5, 0.5, 4000),
        (20, 0.5, 2000),
        (5, 0.0, 1000),
        (5, 1.0, 1000),
        (20, 0.1, 1000),
        (2, 0.5, 500),
    ],
)
def test_labels_match_brute_force(V, rho, count):
    ids, y = generate(V, C, rho, count, gen(V * 1000 + int(rho * 10)))
    expected = [brute_label(row, V, C) for row in ids.tolist()]
    assert y.tolist() == expected


def test_pool_labels_match_brute_force():
    ids, y = build_pool(20, C, RHO, 7, 300)
    assert y.tolist() == [brute_label(row, 20, C) for row in ids.tolist()]


def reference_ids(d, V: int, C: int) -> list[list[int]]:
    """Spec §1 step 3 applied literally, edge by edge, to the same raw draws."""
    out = []
    for b in range(d.cols.shape[0]):
        cols = d.cols[b].tolist()
        for u in range(V):
            for v in range(u + 1, V):
                if d.edges[b, u, v]:
                    cols[v][int(d.dst_slot[b, u, v])] = cols[u][int(d.src_slot[b, u, v])]
        row = [tok for t in range(V) for tok in [t] + [V + c for c in cols[t]]]
        out.append(row + [V + V * C] + [V + int(q) for q in d.queries[b]])
    return out


@pytest.mark.parametrize("V", [2, 5, 20])
def test_edge_sharing_matches_sequential_reference(V):
    d = data._draw(V, C, RHO, 300, gen(11))
    assert not d.edges.tril().any()  # only pairs u < v
    ids, _ = generate(V, C, RHO, 300, gen(11))
    assert ids.tolist() == reference_ids(d, V, C)


@pytest.mark.parametrize("V", [2, 5, 20])
def test_rho_one_links_every_table(V):
    # With every edge present, the last edge into v is (v-1, v), applied once v-1 is final,
    # so consecutive tables always share a column: all tables form one component.
    ids, y = generate(V, C, 1.0, 1000, gen(3))
    for row, label in zip(ids.tolist(), y.tolist(), strict=True):
        tables, q1, q2 = parse(row, V, C)
        assert all(tables[v - 1] & tables[v] for v in range(1, V))
        held = set().union(*tables)
        assert label == (1 if q1 in held and q2 in held else -1)


def test_rho_zero_links_only_by_collision():
    d = data._draw(5, C, 0.0, 2000, gen(4))
    assert not d.edges.any()
    ids, _ = generate(5, C, 0.0, 2000, gen(4))
    cols = ids[:, : 5 * (C + 1)].reshape(2000, 5, C + 1)[:, :, 1:] - 5
    assert torch.equal(cols, d.cols)  # nothing overwritten: the raw uniform draws


def test_generate_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = generate(5, C, RHO, 100, gen(9))
    b = generate(5, C, RHO, 100, gen(9))
    c = generate(5, C, RHO, 100, gen(10))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("V", [5, 20])
def test_pool_nesting_and_seeds(V):
    big_ids, big_y = build_pool(V, C, RHO, 0, 512)
    ids, y = build_pool(V, C, RHO, 0, 256)
    assert torch.equal(ids, big_ids[:256]) and torch.equal(y, big_y[:256])
    odd_ids, odd_y = build_pool(V, C, RHO, 0, 100)
    assert odd_ids.shape == (100, seq_len(V, C))
    assert torch.equal(odd_ids, big_ids[:100]) and torch.equal(odd_y, big_y[:100])
    again, _ = build_pool(V, C, RHO, 0, 512)
    assert torch.equal(again, big_ids)
    other, _ = build_pool(V, C, RHO, 1, 512)
    assert not torch.equal(other, big_ids)
    assert len({tuple(r) for r in big_ids.tolist()}) == 512  # blocks are not repeats


def test_pool_4096_has_100_prefix():
    ids, y = build_pool(5, C, RHO, 0, 4096)
    assert ids.shape == (4096, 23)
    small, small_y = build_pool(5, C, RHO, 0, 100)
    assert torch.equal(small, ids[:100]) and torch.equal(small_y, y[:100])


def test_eval_set_disjoint_from_pool():
    pool, _ = build_pool(5, C, RHO, 0, 256)
    ev, ev_y = build_eval_set(5, C, RHO, 0, 256)
    assert ev.shape == pool.shape and ev_y.shape == (256,)
    assert not torch.equal(ev[:64], pool[:64])
    assert (ev != pool).any(dim=1).float().mean() > 0.95
    again, _ = build_eval_set(5, C, RHO, 0, 256)
    assert torch.equal(again, ev)
    assert not torch.equal(build_eval_set(5, C, RHO, 1, 256)[0], ev)


def test_derive_seed():
    s = derive_seed("pool", 0, 1)
    assert s == derive_seed("pool", 0, 1)
    assert 0 <= s < 2**63
    others = [derive_seed("pool", 0, 2), derive_seed("eval", 0, 1), derive_seed("pool", 1, 1)]
    assert len({s, *others}) == 4


def test_token_table():
    V, n_dims = 5, 20
    t = token_table(V, C, n_dims, 19, seed=0)
    assert t.shape == (V + V * C + 1, n_dims) and t.dtype == torch.float32
    assert (t[:, -1] == 0).all()
    assert (t[-1] == 0).all()
    assert (t[:-1, :-1] != 0).all()
    assert torch.equal(t, token_table(V, C, n_dims, 19, seed=0))
    assert not torch.equal(t, token_table(V, C, n_dims, 19, seed=1))
    big = token_table(20, C, n_dims, 19, seed=3)[:-1, :-1]
    assert abs(big.mean().item()) < 0.1 and abs(big.std().item() - 1) < 0.1


def test_token_table_truncation_keeps_the_leading_entries():
    full = token_table(5, C, 20, 19, seed=4)
    cut = token_table(5, C, 20, 5, seed=4)
    assert torch.equal(cut[:, :5], full[:, :5])  # the same draws, later entries zeroed
    assert (cut[:, 5:] == 0).all()
    for bad in (0, 20):
        with pytest.raises(ValueError, match="truncated_dims"):
            token_table(5, C, 20, bad, seed=0)


@pytest.mark.parametrize("profile", ["full", "smoke"])
@pytest.mark.parametrize(("family", "n_dims", "informative"), [("gpt2", 20, 5),
                                                                ("lowrank_gpt2", 5, 4)])
@pytest.mark.parametrize("V", [5, 20])
def test_tokens_carry_the_references_informative_entries(profile, family, n_dims, informative,
                                                         V):
    """Spec section 2: gpt2 saw 5 Gaussian entries per token (15 zeros), lowrank_gpt2 saw 4."""
    m = resolve(family, V, 256, 1, profile)["model"]
    assert (m["n_dims"], m["truncated_dims"]) == (n_dims, min(5, n_dims - 1))
    table = token_table(V, m["C"], m["n_dims"], m["truncated_dims"], seed=7)
    nonzero = (table != 0).sum(dim=1)
    assert nonzero[:-1].tolist() == [informative] * (V + V * m["C"])  # every table and column
    assert nonzero[-1] == 0                                             # the separator
    ids, _ = generate(V, m["C"], RHO, 16, gen(1))
    x = embed(ids, table)                                               # (B, L, n_dims)
    per_token = (x != 0).sum(dim=2)
    assert set(per_token[:, :-3].flatten().tolist()) == {informative}
    assert per_token[:, -3].eq(0).all()                                 # separator
    assert per_token[:, -2:].eq(informative).all()                      # queries


def test_embed():
    ids, _ = generate(5, C, RHO, 8, gen(0))
    table = token_table(5, C, 5, 4, seed=0)
    x = embed(ids, table)
    assert x.shape == (8, 23, 5)
    assert torch.equal(x[2, 7], table[ids[2, 7]])
    assert (x[..., -1] == 0).all() and (x[:, -3] == 0).all()


def test_sample_indices():
    idx = sample_indices(10, 256, gen(0))
    assert idx.shape == (256,) and idx.dtype == torch.long
    assert idx.min() >= 0 and idx.max() < 10
    assert len(set(idx.tolist())) < 256  # with replacement: repeats are certain here
    assert set(idx.tolist()) == set(range(10))
    assert torch.equal(idx, sample_indices(10, 256, gen(0)))


@pytest.mark.parametrize(("V", "expected", "tolerance"), [(5, 0.265, 0.004), (20, 0.065, 0.003)])
def test_label_balance(V, expected, tolerance):
    """Spec section 1, measured on the reference: P(y=+1) = 0.265 +- 0.003 / 0.065 +- 0.002."""
    _, y = build_pool(V, C, RHO, 0, 100_000)
    assert abs((y == 1).float().mean().item() - expected) < tolerance


def test_bad_parameters():
    with pytest.raises(ValueError):
        generate(5, C, 1.5, 10, gen(0))
    with pytest.raises(ValueError):
        build_pool(0, C, RHO, 0, 10)
    assert build_pool(5, C, RHO, 0, 0)[0].shape == (0, 23)


def test_random_module_untouched():
    state = random.getstate()
    build_pool(5, C, RHO, 0, 64)
    assert random.getstate() == state
