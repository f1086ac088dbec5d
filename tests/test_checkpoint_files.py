"""The file rules of trainer/checkpoint.py, on the files themselves (no training): which
state a resume trusts and why each other one is skipped, a state's unpickling, pruning what a
kill left, stray manifests, snapshots."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch

from trainer import checkpoint as ckpt


def state(step: int) -> dict:
    return {"model": {"w": torch.full((2,), float(step))}, "optimizer": {}, "step": step,
            "rng": {}, "config": {"seed": 1}}


def write_state(out: Path, step: int, contents, manifest: dict | str | None = "valid") -> Path:
    """A state file at `step` holding `contents`, with a manifest that matches it ("valid"),
    the given one, raw text, or none."""
    buf = io.BytesIO()
    torch.save(contents, buf)
    data = buf.getvalue()
    path = out / ckpt.STATE_DIR / f"state-{step:07d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if manifest == "valid":
        manifest = {"step": step, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if isinstance(manifest, dict):
        path.with_suffix(".json").write_text(json.dumps(manifest))
    elif isinstance(manifest, str):
        path.with_suffix(".json").write_text(manifest)
    return path


def test_a_resume_takes_the_newest_valid_state_and_says_why_it_skipped_each_newer_one(tmp_path):
    write_state(tmp_path, 5, state(5))
    good = write_state(tmp_path, 6, state(6))
    good.write_bytes(good.read_bytes() + b"x")                  # torn after its manifest
    write_state(tmp_path, 7, state(7), manifest=None)          # killed before its manifest
    write_state(tmp_path, 8, state(8), manifest='{"step": 8,')  # manifest torn
    data = io.BytesIO()
    torch.save(state(9), data)
    write_state(tmp_path, 9, state(9), manifest={             # a manifest of another step
        "step": 90, "bytes": len(data.getvalue()),
        "sha256": hashlib.sha256(data.getvalue()).hexdigest()})
    write_state(tmp_path, 10, [1, 2, 3])                       # not a training state

    log: list[str] = []
    loaded = ckpt.load_latest_state(tmp_path, log.append)

    assert loaded["step"] == 5 and torch.equal(loaded["model"]["w"], torch.full((2,), 5.0))
    size = len((tmp_path / ckpt.STATE_DIR / "state-0000006.pt").read_bytes())
    assert log == [
        "ignoring state/state-0000010.pt: not a training state; falling back",
        "ignoring state/state-0000009.pt: step does not match its manifest; falling back",
        "ignoring state/state-0000008.pt: manifest is not valid JSON; falling back",
        "ignoring state/state-0000007.pt: no manifest (write did not finish); falling back",
        f"ignoring state/state-0000006.pt: size or checksum mismatch ({size} bytes); "
        "falling back",
    ]


class WritesAFile:
    """Unpickled, it would create `path`: what a state file crafted to run code does."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_state_that_would_run_code_when_unpickled_is_skipped_without_running_it(tmp_path):
    write_state(tmp_path, 1, state(1))
    marker = tmp_path / "ran"
    write_state(tmp_path, 2, {**state(2), "extra": WritesAFile(marker)})

    log: list[str] = []
    loaded = ckpt.load_latest_state(tmp_path, log.append)

    assert not marker.exists()
    assert loaded["step"] == 1
    assert len(log) == 1 and log[0].startswith("ignoring state/state-0000002.pt: ")


def test_a_state_a_kill_left_without_its_manifest_is_pruned_like_the_others(tmp_path):
    write_state(tmp_path, 1, state(1), manifest=None)
    for step in (2, 3):
        ckpt.save_state(tmp_path, state(step))
    names = sorted(p.name for p in (tmp_path / ckpt.STATE_DIR).iterdir())
    assert names == ["state-0000002.json", "state-0000002.pt",
                     "state-0000003.json", "state-0000003.pt"]


def test_stray_manifests_are_the_state_manifests_whose_state_file_is_gone(tmp_path):
    assert ckpt.stray_manifests(tmp_path) == []  # no state folder yet
    folder = tmp_path / ckpt.STATE_DIR
    folder.mkdir()
    for name in ("state-0000001.json",                        # its state was pruned: stray
                 "state-0000002.json", "state-0000002.pt",    # a whole state
                 "state-0000003.pt",                          # a state without its manifest
                 "notes.json", "notes.txt", "state-03.json"):  # not a state's manifest
        (folder / name).write_text("{}")
    assert ckpt.stray_manifests(tmp_path) == [folder / "state-0000001.json"]


def test_a_snapshot_holds_the_weights_it_was_given_and_never_makes_its_job_folder(tmp_path):
    weights = {"w": torch.arange(4.0)}
    job = tmp_path / "job"  # moved away
    with pytest.raises(FileNotFoundError):
        ckpt.save_snapshot(job, 7, weights)
    assert list(tmp_path.iterdir()) == []
    job.mkdir()
    ckpt.save_snapshot(job, 7, weights)  # makes snapshots/ inside it
    saved = torch.load(job / ckpt.SNAPSHOT_DIR / "model-0000007.pt", weights_only=True)
    assert saved.keys() == {"w"} and torch.equal(saved["w"], torch.arange(4.0))
