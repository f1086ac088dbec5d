"""Tests for models/: masks, position structure, parameter counts, information flow, the
structured forward against the dense oracle, errors."""

from __future__ import annotations

import pytest
import torch

from models import FAMILIES, build_model
from tests.support.masks import C, loop_masks
from trainer.config import resolve


def cfg(family: str, V: int = 5, **over) -> dict:
    """A tiny config (fast); override any key."""
    L = V * (C + 1) + 3
    base = dict(family=family, n_dims=5, n_positions=L, n_embd=32, n_layer=4, n_head=4, V=V, C=C)
    return {**base, **over}


def full_cfg(family: str, V: int = 5) -> dict:
    n_dims = 20 if family == "gpt2" else 5
    n_positions = 202 if family == "gpt2" else V * (C + 1) + 3
    return dict(
        family=family,
        n_dims=n_dims,
        n_positions=n_positions,
        n_embd=256,
        n_layer=12,
        n_head=8,
        V=V,
        C=C,
    )


def build(c: dict, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(c).eval()


def rand_x(c: dict, B: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, c["V"] * (C + 1) + 3, c["n_dims"], generator=g)


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("V", [5, 20])
def test_lowrank_masks_exact(V):
    n_layer = 12
    model = build_model(cfg("lowrank_gpt2", V, n_layer=n_layer, n_embd=16, n_head=2))
    got = model.layer_masks()
    want = loop_masks(V, n_layer)
    assert len(got) == n_layer
    for layer, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"layer {layer}"
    # Every row has at least one allowed key, so softmax never sees an empty row.
    assert all(bool(m.any(dim=1).all()) for m in got)


@pytest.mark.parametrize("V", [5, 20])
def test_gpt2_masks_causal(V):
    model = build_model(cfg("gpt2", V))
    L = V * (C + 1) + 3
    want = torch.tensor([[k <= q for k in range(L)] for q in range(L)])
    assert all(torch.equal(m, want) for m in model.layer_masks())


def test_masks_not_in_state_dict():
    for family in FAMILIES:
        model = build_model(cfg(family))
        params = {n for n, _ in model.named_parameters()}
        assert set(model.state_dict()) == params


# ---------------------------------------------------------------- parameters


def test_lowrank_position_structure():
    V = 5
    model = build(cfg("lowrank_gpt2", V))
    pos = model.position_embedding()
    G = C + 1
    assert pos.shape == (V * G + 3, 32)
    for g in range(V):
        for p in range(G):
            assert torch.equal(pos[g * G + p], pos[p])
    # The last three positions are their own parameters, distinct from each other and the block.
    assert torch.equal(pos[-3:], model.pos_tail)
    assert torch.equal(pos[:G], model.pos_group)
    tail = pos[-3:]
    assert not torch.equal(tail[0], tail[1]) and not torch.equal(tail[1], tail[2])
    # No other position table exists.
    assert not any("wpe" in n for n, _ in model.named_parameters())
    # A gradient through a later group lands on the shared block.
    pos[2 * G + 1].sum().backward()
    assert model.pos_group.grad[1].abs().sum() > 0
    assert model.pos_tail.grad is None or not model.pos_tail.grad.any()


@pytest.mark.parametrize(
    "family,V,expected",
    [
        ("gpt2", 5, 9_534_977),
        ("gpt2", 20, 9_534_977),
        ("lowrank_gpt2", 5, 9_481_217),
        ("lowrank_gpt2", 20, 9_481_217),
    ],
)
def test_full_size_parameter_counts(family, V, expected):
    model = build_model(full_cfg(family, V))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_gpt2_init_statistics():
    model = build(full_cfg("gpt2"))
    blk = model.blocks[0]
    assert blk.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert blk.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for w in (blk.attn.c_proj.weight, blk.mlp.c_proj.weight):
        assert w.std().item() == pytest.approx(0.02 / 24**0.5, rel=0.05)
    assert model.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(blk.attn.c_attn.bias == 0) and torch.all(blk.ln_1.weight == 1)
    assert torch.all(model.ln_f.weight == 1) and torch.all(model.ln_f.bias == 0)
    assert not hasattr(model, "wte")


# ---------------------------------------------------------------- information flow


def test_gpt2_is_causal():
    c = cfg("gpt2", V=5)
    model = build(c)
    x = rand_x(c)
    j = 10
    x2 = x.clone()
    x2[:, j] += 1.0
    with torch.no_grad():
        h, h2 = model.encode(x), model.encode(x2)
    torch.testing.assert_close(h2[:, :j], h[:, :j], atol=1e-6, rtol=0)
    assert (h2[:, j:] - h[:, j:]).abs().amax(dim=-1).min() > 1e-4  # every later position moved


def test_gpt2_explicit_mask_matches_hf_causal_path():
    """Our explicit causal mask gives what SDPA's own is_causal=True path (mask None) gives."""
    c = cfg("gpt2", V=5)
    model = build(c)
    x = rand_x(c)
    with torch.no_grad():
        h = model.read_in(x) + model.position_embedding()
        for block in model.blocks:
            h = block(h)  # no mask: transformers 5 SDPA uses is_causal=True
        ref = model.read_out(model.ln_f(h)[:, -1]).squeeze(-1)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def _perturb_block_input(model, layer: int, positions: list[int]):
    """Forward pre-hook adding noise to the hidden states entering block `layer` at `positions`."""

    def hook(_module, args):
        h = args[0].clone()
        h[:, positions] += 10.0 * torch.randn_like(h[:, positions])
        return (h, *args[1:])

    return model.blocks[layer].register_forward_pre_hook(hook)


@pytest.mark.parametrize("V", [5, 20])
def test_lowrank_last_logit_only_reads_k_after_layer_2(V):
    c = cfg("lowrank_gpt2", V, n_layer=5)
    model = build(c)
    x = rand_x(c)
    L, G = V * (C + 1) + 3, C + 1
    K = {g * G + C for g in range(V)} | {L - 3, L - 2, L - 1}
    non_k = [i for i in range(L) if i not in K]
    with torch.no_grad():  # the dense oracle: it runs every block on every position
        base = model.forward_dense(x)
        handle = _perturb_block_input(model, 2, non_k)
        out = model.forward_dense(x)
        handle.remove()
        # Masked keys get weight exactly 0, so the logit is bit-for-bit unchanged.
        assert torch.equal(out, base)
        # A K position (last token of group 0) does matter.
        handle = _perturb_block_input(model, 2, [C])
        out_k = model.forward_dense(x)
        handle.remove()
    assert (out_k - base).abs().min() > 1e-6  # small: c_proj init is tiny


def test_lowrank_layers_0_1_keep_groups_apart():
    """Before the sparse layers, group 0's last token is unaffected by other groups' tokens."""
    c = cfg("lowrank_gpt2", V=5, n_layer=2)
    model = build(c)
    x = rand_x(c)
    x2 = x.clone()
    x2[:, C + 1 :] += 1.0  # change every token outside group 0
    with torch.no_grad():
        h, h2 = model.encode(x), model.encode(x2)
    torch.testing.assert_close(h2[:, : C + 1], h[:, : C + 1], atol=1e-6, rtol=0)


# ---------------------------------------------------------------- structured forward vs oracle

# The layer counts of every profile, read from conf/, and one layer: each takes its own branch
# of the structured forward (lowrank: 1-2 layers are all block diagonal).
PROFILE_LAYERS = sorted({resolve("gpt2", 5, 256, 1, p)["model"]["n_layer"]
                         for p in ("full", "smoke", "small", "cpu")} | {1})


def test_profile_layer_counts():
    assert PROFILE_LAYERS == [1, 2, 3, 4, 12]


def _float64_model(c: dict):
    """Built in float64, every parameter moved off its init: c_proj's tiny init and the zero
    biases would otherwise hide a wrong term."""
    model = build(c).double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _logits_and_grads(model, forward, x) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = forward(x)
    (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype)).sum().backward()
    # A parameter the structured forward never reads gets no grad; the oracle's is exactly 0.
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p)
             for n, p in model.named_parameters()}
    return out.detach(), grads


@pytest.mark.parametrize("n_layer", PROFILE_LAYERS)
@pytest.mark.parametrize("V", [5, 20])
@pytest.mark.parametrize("family", FAMILIES)
def test_structured_forward_equals_dense_oracle(family, V, n_layer):
    c = cfg(family, V, n_layer=n_layer, n_embd=16, n_head=2)
    model = _float64_model(c).train()
    x = rand_x(c, B=3).double()
    got, got_grads = _logits_and_grads(model, model.forward, x)
    want, want_grads = _logits_and_grads(model, model.forward_dense, x)
    assert (got - want).abs().max() <= 1e-10
    assert got.std() > 1e-3  # the examples differ: a constant output would prove nothing
    for name, want_grad in want_grads.items():
        assert (got_grads[name] - want_grad).abs().max() <= 1e-10, name
    assert max(g.abs().max() for g in want_grads.values()) > 1e-3


def _record_attention(monkeypatch) -> list[tuple]:
    """Every scaled_dot_product_attention call: (query shape, key shape, mask, is_causal)."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), attn_mask, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("V", [5, 20])
def test_structured_attention_shapes_and_no_masks(V, monkeypatch):
    """No explicit mask anywhere (so SDPA may use its fast kernels), and the sequence lengths of
    spec section 7: the last layer queries one position; lowrank runs layers 2.. on K only."""
    B, H, D, L, G, n_k = 2, 2, 8, V * (C + 1) + 3, C + 1, V + 3
    calls = _record_attention(monkeypatch)
    c = cfg("gpt2", V, n_layer=12, n_embd=16, n_head=2)
    build(c)(rand_x(c, B=B))
    assert calls == [((B, H, L, D), (B, H, L, D), None, True)] * 11 + [
        ((B, H, 1, D), (B, H, L, D), None, False)]
    calls.clear()
    c = cfg("lowrank_gpt2", V, n_layer=12, n_embd=16, n_head=2)
    build(c)(rand_x(c, B=B))
    assert calls == [
        ((B * V, H, G, D), (B * V, H, G, D), None, True),   # layer 0: causal inside each group
        ((B * V, H, 1, D), (B * V, H, G, D), None, False),  # layer 1: each group's last token
        *[((B, H, n_k, D), (B, H, n_k, D), None, True)] * 9,  # layers 2-10: K only
        ((B, H, 1, D), (B, H, n_k, D), None, False),        # layer 11: the last position
    ]
    calls.clear()
    c = cfg("lowrank_gpt2", V, n_layer=2, n_embd=16, n_head=2)
    build(c)(rand_x(c, B=B))
    assert calls == []  # two block-diagonal layers: the last token, alone, is all that counts


# ---------------------------------------------------------------- outputs, determinism, errors


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("V", [5, 20])
def test_output_shape_finite_and_grads(family, V):
    c = cfg(family, V)
    model = build(c).train()
    out = model(rand_x(c, B=4))
    assert out.shape == (4,) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic(family):
    c = cfg(family, V=5)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a, b, other = build(c, seed=7), build(c, seed=7), build(c, seed=8)
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not torch.equal(
            sa["blocks.0.attn.c_attn.weight"], other.state_dict()["blocks.0.attn.c_attn.weight"]
        )
        x = rand_x(c)
        ya, yb = a(x), b(x)
        assert torch.equal(ya, yb)
        ya.sum().backward()
        yb.sum().backward()
        assert all(
            torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters(), strict=True)
        )
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize(
    "over,key",
    [
        (dict(family="bert"), "family"),
        (dict(family=None), "family"),
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(n_positions=22), "n_positions"),  # L = 23 at V=5
        (dict(n_layer=0), "n_layer"),
        (dict(V=None), "V"),
    ],
)
def test_build_model_errors(over, key):
    for family in FAMILIES:
        c = {**cfg(family), **over}
        with pytest.raises(ValueError, match=key):
            build_model(c)


def test_forward_rejects_wrong_shape():
    model = build_model(cfg("gpt2", V=5))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(2, 83, 5))
