"""Runs compared with a fault-free run of the same config, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer import checkpoint as ckpt
from trainer.train import run as train


def train_1thread(config: dict, out: Path, **kw):
    """trainer.train.run as the workers run it: one torch thread (CPU sums depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(config, out, **kw)
    finally:
        torch.set_num_threads(threads)


def bits(obj):
    """Tensors as (dtype, shape, raw bytes), recursively: equal means bit-identical."""
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().contiguous().reshape(-1)
        return str(obj.dtype), tuple(obj.shape), flat.view(torch.uint8).numpy().tobytes()
    if isinstance(obj, dict):
        return {k: bits(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [bits(v) for v in obj]
    return obj


def assert_bit_identical(out: Path, clean: Path) -> None:
    """Final state (model, optimiser, batch RNG), metrics, evaluation and snapshots agree."""
    a = torch.load(ckpt.list_states(out)[0], weights_only=True)
    b = torch.load(ckpt.list_states(clean)[0], weights_only=True)
    assert a["step"] == b["step"]
    for key in ("model", "optimizer"):
        assert bits(a[key]) == bits(b[key]), key
    assert bits(a["rng"]["batches"]) == bits(b["rng"]["batches"])
    for name in (ckpt.METRICS_FILE, ckpt.EVAL_FILE, ckpt.CONFIG_FILE):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    snaps = sorted(p.name for p in (clean / ckpt.SNAPSHOT_DIR).iterdir())
    assert sorted(p.name for p in (out / ckpt.SNAPSHOT_DIR).iterdir()) == snaps
    for name in snaps:
        assert (out / ckpt.SNAPSHOT_DIR / name).read_bytes() == (
            clean / ckpt.SNAPSHOT_DIR / name).read_bytes(), name


def same_result_as_uninterrupted(job: dict, tmp_path: Path) -> None:
    """The job's final weights and metrics equal a fault-free run of its config."""
    clean = tmp_path / "clean"
    train_1thread(job["config"], clean)
    out = Path(job["out_dir"])
    a = torch.load(ckpt.list_states(out)[0], weights_only=True)["model"]
    b = torch.load(ckpt.list_states(clean)[0], weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / ckpt.EVAL_FILE).read_text()) == json.loads(
        (clean / ckpt.EVAL_FILE).read_text())
    assert (out / ckpt.METRICS_FILE).read_text() == (clean / ckpt.METRICS_FILE).read_text()
