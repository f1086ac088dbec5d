"""A job folder's files: rolling training state, kept snapshots, metrics log.

Layout of a job folder (names are constants so tools can rely on them):

    config.yaml               the resolved config
    state/state-0000100.pt    rolling training state (model, optimiser, RNGs, step)
    state/state-0000100.json  its manifest: step, size, sha256 (written after the .pt)
    snapshots/model-0000100.pt  kept model weights
    metrics.jsonl             one JSON record per line (train steps and evaluations)
    eval.json                 the final evaluation
    train.log                 the job's own log, across attempts

A state counts only when its manifest exists and the bytes match its sha256,
so a torn, truncated or corrupted file is skipped and the next older one used.

The trainer writes states and snapshots through a BackgroundWriter: it copies the
tensors to host memory at the step boundary and serialises, checksums, writes and
fsyncs them on a thread while training goes on.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from trainer.atomic import write_bytes_atomic, write_json_atomic
from trainer.files import (  # noqa: F401  (re-exported: the folder's names live in files.py)
    CONFIG_FILE,
    EVAL_FILE,
    LOCK_FILE,
    LOG_FILE,
    METRICS_FILE,
    SNAPSHOT_DIR,
    STATE_DIR,
    read_metrics,
)

KEEP_STATES = 2  # the newest two, so a bad newest one still leaves a fallback

_STATE_RE = re.compile(r"^state-(\d{7,})\.pt$")
REQUIRED_STATE_KEYS = {"model", "optimizer", "step", "rng", "config"}


def _state_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / STATE_DIR / f"state-{step:07d}.pt"


def save_state(out_dir: Path, state: dict) -> Path:
    """Write the training state for `state['step']` atomically; prune old ones."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = _state_path(out_dir, state["step"])
    write_bytes_atomic(path, data, parents=False)  # never recreate a folder moved away
    # The manifest goes last: its presence marks the state complete.
    write_json_atomic(path.with_suffix(".json"), {
        "step": state["step"],
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "saved_at": time.time(),
    }, parents=False)
    for old in list_states(out_dir)[KEEP_STATES:]:
        for p in (old, old.with_suffix(".json")):
            p.unlink(missing_ok=True)
    return path


def remove_temp_files(out_dir: Path) -> list[Path]:
    """Delete the temp files of atomic writes that never finished (a process killed mid-write).

    Call it only while holding the folder's lock: then no write into the folder is in flight.
    """
    removed = temp_files(out_dir)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def temp_files(out_dir: Path) -> list[Path]:
    """The temp files of atomic writes in the folder (in flight, or left by a killed process)."""
    found = []
    for folder in (Path(out_dir), Path(out_dir) / STATE_DIR, Path(out_dir) / SNAPSHOT_DIR):
        if folder.is_dir():
            found += sorted(path for path in folder.iterdir()
                            if path.name.startswith(".") and path.name.endswith(".tmp")
                            and path.is_file())
    return found


def list_states(out_dir: Path) -> list[Path]:
    """State files, newest step first (valid or not)."""
    folder = Path(out_dir) / STATE_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STATE_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def stray_manifests(out_dir: Path) -> list[Path]:
    """Manifests whose state file is gone (pruning stopped between the two unlinks)."""
    folder = Path(out_dir) / STATE_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.suffix == ".json" and _STATE_RE.match(p.with_suffix(".pt").name)
                  and not p.with_suffix(".pt").exists())


def _read_state(path: Path) -> dict:
    manifest_path = path.with_suffix(".json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ValueError("no manifest (write did not finish)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("manifest is not valid JSON") from None
    data = path.read_bytes()
    if len(data) != manifest.get("bytes") or hashlib.sha256(data).hexdigest() != manifest.get(
        "sha256"
    ):
        raise ValueError(f"size or checksum mismatch ({len(data)} bytes)")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not REQUIRED_STATE_KEYS <= state.keys():
        raise ValueError("not a training state")
    if state["step"] != manifest["step"]:
        raise ValueError("step does not match its manifest")
    return state


def load_latest_state(out_dir: Path, log: Callable[[str], None]) -> dict | None:
    """The newest valid training state, or None; invalid ones are logged and skipped."""

    def skipped(path: Path, error: Exception) -> None:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        log(f"ignoring {path.parent.name}/{path.name}: {reason}; falling back")

    found = newest_valid_state(out_dir, skipped)
    return found[1] if found else None


def newest_valid_state(out_dir: Path, skipped: Callable[[Path, Exception], None]
                       ) -> tuple[Path, dict] | None:
    """The file and contents of the state a resume loads, or None; `skipped(path, error)`
    hears of each newer one that is invalid."""
    for path in list_states(out_dir):
        try:
            return path, _read_state(path)
        except Exception as e:  # any unreadable state is skipped, never trusted
            skipped(path, e)
    return None


def save_snapshot(out_dir: Path, step: int, model_state: dict) -> None:
    buf = io.BytesIO()
    torch.save(model_state, buf)
    write_bytes_atomic(Path(out_dir) / SNAPSHOT_DIR / f"model-{step:07d}.pt", buf.getvalue(),
                       parents=False)


def to_host(obj):
    """A copy of `obj` with every tensor copied to host memory: safe to write while training
    goes on changing (or freeing) the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_host(v) for v in obj)
    return obj


class BackgroundWriter:
    """Runs a step's file writes (save_state, save_snapshot) on a thread, one batch at a time.

    Each file is written as it always is (temp file, fsync, rename; a state's manifest last), so
    a process killed mid-write leaves nothing the loader trusts. `submit` first waits for the
    previous batch: at most one is in flight and they land in order. The caller passes host
    copies (`to_host`) and must `wait` (or `join`) before releasing the folder's lock.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, writes: list[Callable[[], object]]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(writes,),
                                        name="checkpoint-writer")
        self._thread.start()

    def _run(self, writes: list[Callable[[], object]]) -> None:
        try:
            for write in writes:
                write()
        except BaseException as e:  # raised in the training thread by wait() / check()
            self._error = e

    def join(self) -> BaseException | None:
        """Wait for the write in flight; return (and forget) its error instead of raising it."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        return error

    def wait(self) -> None:
        """Wait for the write in flight; raise its error, if any."""
        error = self.join()
        if error is not None:
            raise error

    def check(self) -> None:
        """Raise the error of a write that already failed, without waiting for one in flight."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()


# --- metrics log -------------------------------------------------------------


def append_metrics(out_dir: Path, record: dict) -> None:
    with open(Path(out_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def truncate_metrics(out_dir: Path, upto_step: int) -> None:
    """Keep only records of steps < upto_step: those after it will be recomputed."""
    path = Path(out_dir) / METRICS_FILE
    kept = [r for r in read_metrics(out_dir) if r["step"] < upto_step]
    write_bytes_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())


# --- RNG states ----------------------------------------------------------------


def capture_rng(device: torch.device, batch_generator: torch.Generator) -> dict:
    """Every RNG in play, at a step boundary."""
    rng = {
        "python": list(random.getstate()[1]),
        "torch_cpu": torch.get_rng_state(),
        "batches": batch_generator.get_state(),
    }
    if device.type == "cuda":
        rng["torch_cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: dict, device: torch.device, batch_generator: torch.Generator) -> None:
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(rng["python"]), gauss))
    torch.set_rng_state(rng["torch_cpu"])
    batch_generator.set_state(rng["batches"])
    if device.type == "cuda" and "torch_cuda" in rng:
        torch.cuda.set_rng_state(rng["torch_cuda"], device)
