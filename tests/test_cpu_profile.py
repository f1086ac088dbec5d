"""The cpu profile (conf/profiles/cpu.yaml): valid for every job of the sweep, and both
architectures keep their structure (lowrank_gpt2 has block-diagonal and sparse layers)."""

from __future__ import annotations

import pytest
import torch

from models import FAMILIES, build_model
from tests.support.masks import loop_masks
from trainer.config import resolve, validate

SWEEP_NS = (256, 512, 1024, 2048, 4096)


@pytest.mark.parametrize("V", [5, 20])
@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_profile_is_valid_for_every_job(family, V):
    for N in SWEEP_NS:
        cfg = resolve(family, V, N, 1, "cpu")
        assert validate(cfg) == cfg
        m, t, e = cfg["model"], cfg["training"], cfg["evaluation"]
        assert (m["n_embd"], m["n_layer"], m["n_head"]) == (64, 4, 4)
        assert m["n_layer"] >= 4 and m["n_embd"] % m["n_head"] == 0
        assert (t["batch_size"], t["learning_rate"], t["train_steps"]) == (64, 3e-4, 1500)
        assert t["batch_size"] <= N
        assert (e["eval_every"], e["eval_examples"]) == (250, 1280)
        # Everything else is the study's: data, tokens, optimiser, precision.
        full = resolve(family, V, N, 1, "full")
        for key in ("n_dims", "truncated_dims", "n_positions", "C", "V"):
            assert m[key] == full["model"][key], key
        assert t["task_kwargs"] == full["training"]["task_kwargs"]
        assert t["precision"] == "fp32"


@pytest.mark.parametrize("V", [5, 20])
def test_cpu_profile_lowrank_has_block_diagonal_and_sparse_layers(V):
    model = build_model(resolve("lowrank_gpt2", V, 4096, 1, "cpu")["model"])
    got = model.layer_masks()
    want = loop_masks(V, len(got))  # layers 0-1 block diagonal, 2.. sparse, all causal
    for layer, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"layer {layer}"
    block_diag, sparse = got[0], got[-1]
    assert torch.equal(got[1], block_diag) and not torch.equal(block_diag, sparse)
    assert sum(torch.equal(m, sparse) for m in got) == len(got) - 2 >= 2


@pytest.mark.parametrize("V", [5, 20])
def test_cpu_profile_lowrank_last_logit_reads_every_table(V):
    """With sparse layers the answer depends on the tables, not on the query token alone:
    changing table 0's tokens changes the logit (at two layers it could not)."""
    cfg = resolve("lowrank_gpt2", V, 4096, 1, "cpu")["model"]
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg["n_positions"], cfg["n_dims"], generator=g)
    x2 = x.clone()
    x2[:, : cfg["C"] + 1] += 1.0  # table 0 and its columns
    with torch.no_grad():
        diff = (model(x2) - model(x)).abs()
    assert bool((diff > 1e-6).all())
