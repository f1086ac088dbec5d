"""Train one job of the study, in-process, resumable to the bit.

Reads top to bottom: lock the folder -> config -> data -> model/optimiser ->
resume or start -> one loop (batch -> forward/backward -> step -> log ->
evaluate/checkpoint every N) -> final evaluation.

Checkpoints are copied to host memory at the step boundary and written by a
background thread (trainer.checkpoint.BackgroundWriter) while training goes
on; a stop, the end of the run and any exit wait for the write in flight.

`run()` may be called many times in one process (a worker runs job after job):
it touches no global state beyond seeding torch's RNG inside a forked scope and
restores the switches it sets (deterministic algorithms on the CPU, the float32
matmul precision on CUDA). Workers call it as trainer.job.StudyJob, which says what a job
receives, reports, returns and raises.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import filelock
import torch
import torch.nn.functional as F
import transformers

from models import build_model
from trainer import checkpoint as ckpt
from trainer import tracking
from trainer.atomic import write_json_atomic, write_yaml_atomic
from trainer.config import ConfigError, resume_conflicts, validate
from trainer.data import build_eval_set, build_pool, derive_seed, embed, sample_indices, token_table
from trainer.files import append_log
from trainer.job import FolderBusy, Progress, RunResult

EVAL_BATCH = 256  # evaluation batch size: memory only, never changes results


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss became NaN)."""


class FolderMoved(RuntimeError):
    """The job's folder was moved away while training (e.g. replaced): stop writing."""


class JobLog:
    """Lines into the job's own log file (trainer.files.append_log), echoed to `echo`."""

    def __init__(self, out_dir: Path, echo: Callable[[str], None] | None):
        self.out_dir, self.echo = out_dir, echo

    def __call__(self, message: str) -> None:
        append_log(self.out_dir, message)
        if self.echo:
            self.echo(message)


def run(
    config: dict,
    out_dir: str | Path,
    device: str = "cpu",
    on_progress: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
    echo: Callable[[str], None] | None = None,
    lock_timeout: float = 0,
    header: str | None = None,
) -> RunResult:
    """Train the job `config` into `out_dir`; resume from its newest valid state.

    Returns "completed" with the final metrics, or "stopped" soon after `stop`
    is set, with the state saved at the step boundary it stopped on.
    `lock_timeout` is how long to wait for another process to leave the
    folder; `header` is written to the job's log first (e.g. the attempt).
    """
    config = validate(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(out / ckpt.LOCK_FILE))
    try:
        lock.acquire(timeout=lock_timeout)
    except filelock.Timeout:
        raise FolderBusy(f"{out} is in use by another process") from None
    deterministic = torch.are_deterministic_algorithms_enabled()
    writer = ckpt.BackgroundWriter()
    try:
        dev = torch.device(device)
        if dev.type == "cpu":
            torch.use_deterministic_algorithms(True)  # bit-exact resume on CPU
        log = JobLog(out, echo)
        if header:
            log(f"=== {header} ===")
        for path in ckpt.remove_temp_files(out):  # left by a process killed mid-write
            log(f"removed {path.relative_to(out)}: an unfinished write")
        track = tracking.for_config(config, out, log)
        try:
            with float32_matmuls(config["training"]["precision"], dev):
                result = _train(config, out, dev, on_progress, stop or threading.Event(), log,
                                writer, track)
        except BaseException:
            track.finish(failed=True)
            raise
        track.finish()
        return result
    finally:
        # Never release the folder with a write in flight. Its error, if any, is dropped here
        # only when another exception is already on its way out (otherwise _train raised it).
        writer.join()
        torch.use_deterministic_algorithms(deterministic)
        lock.release()


def _train(config, out, device, on_progress, stop, log, writer, track) -> RunResult:
    m, t, e = config["model"], config["training"], config["evaluation"]
    V, C, rho = m["V"], m["C"], t["task_kwargs"]["rho"]
    run_seed = config["seeds"]["run"]
    total = t["train_steps"]

    # Data: the pool and eval set as token ids on the device, one shared
    # token-vector table, and a generator of batch indices (saved in the state).
    pool_ids, pool_y = build_pool(V, C, rho, config["seeds"]["pool"], t["num_training_examples"])
    eval_ids, eval_y = job_eval_set(config)
    tokens = job_tokens(config).to(device)
    pool_ids, pool_y = pool_ids.to(device), pool_y.to(device)
    eval_ids, eval_y = eval_ids.to(device), eval_y.to(device)
    batches = torch.Generator().manual_seed(derive_seed("batches", run_seed))

    with torch.random.fork_rng(devices=[]):  # seeding must not leak into the caller
        torch.manual_seed(derive_seed("init", run_seed))
        model = build_model(m)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=t["learning_rate"])

    start = 0
    state = ckpt.load_latest_state(out, log)
    if state is not None:
        conflicts = resume_conflicts(state["config"], config)
        if conflicts:
            raise ConfigError(
                f"{out}: saved state was trained with a different config "
                f"({', '.join(conflicts)}); use a new folder"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ckpt.restore_rng(state["rng"], device, batches)
        start = state["step"]
        log(f"resuming at step {start}/{total} from state-{start:07d}")
    else:
        log(f"starting {m['family']} V={V} N={t['num_training_examples']} on {device}, "
            f"{t['precision']}")
    ckpt.truncate_metrics(out, start)  # records past the state are recomputed
    write_yaml_atomic(out / ckpt.CONFIG_FILE, config)
    track.start(start)  # optional W&B run; logs the records from `start` on

    precision = t["precision"]

    def checkpoint(i: int, keep_snapshot: bool, save_state: bool) -> None:
        """Host copies now; serialising and writing go on in the background."""
        weights = ckpt.to_host(model.state_dict())
        writes = []
        if keep_snapshot:
            writes.append(partial(ckpt.save_snapshot, out, i, weights))
        if save_state:
            writes.append(partial(ckpt.save_state, out, {
                "step": i + 1,
                "model": weights,
                "optimizer": ckpt.to_host(optimizer.state_dict()),
                "rng": ckpt.to_host(ckpt.capture_rng(device, batches)),
                "config": config,
                "versions": {"torch": str(torch.__version__),
                             "transformers": str(transformers.__version__)},
                "device": _device_name(device),
            }))
        writer.submit(writes)

    model.train()
    folder = out.stat().st_ino  # a folder moved aside (replace, fresh) must get no more writes
    started, done = time.monotonic(), start
    last_eval: tuple[int, dict] = (-1, {})  # (steps done, metrics) of the newest evaluation
    def check_folder() -> None:
        if _inode(out) != folder:
            raise FolderMoved(f"{out} was moved away while training; stopping without writing")

    for i in range(start, total):
        try:
            writer.check()  # a failed write stops the run now, not at the next checkpoint
        except OSError:
            check_folder()  # a write that failed because the folder moved says so
            raise
        idx = sample_indices(t["num_training_examples"], t["batch_size"], batches).to(device)
        x, y = embed(pool_ids[idx], tokens), pool_y[idx]  # (B, L, n_dims), (B,)
        with autocast(precision, device):
            logits = model(x).float()                       # (B,) last position
        loss = F.binary_cross_entropy_with_logits(logits, (y + 1).float() / 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TrainingError(f"loss became {loss_value} at step {i}")
        train_acc = ((logits.detach() > 0) == (y > 0)).float().mean().item()
        done = i + 1
        record = {"step": i, "loss": loss_value, "train_accuracy": train_acc}
        evaluated = i % e["eval_every"] == 0 or done == total
        if evaluated:
            last_eval = (done, evaluate(model, eval_ids, eval_y, tokens, precision))
            record.update({f"test_{k}": v for k, v in last_eval[1].items()})
        check_folder()
        ckpt.append_metrics(out, record)
        track.log(record)
        if evaluated and done < total:
            test = last_eval[1]
            log(f"step {done}/{total}: loss {loss_value:.4f}, train accuracy {train_acc:.4f}, "
                f"test accuracy {test['accuracy']:.4f}, balanced {test['balanced_accuracy']:.4f}")
        if on_progress:
            on_progress(Progress(done, total, loss_value, train_acc, last_eval[1] or None))

        # Same cadence as the reference: state every save_every steps (step 0
        # included), snapshot every keep_every steps after 0; plus the last step,
        # and a state at whatever step a stop lands on.
        stopping = stop.is_set() and done < total
        keep_snapshot = i % t["keep_every_steps"] == 0 and i > 0
        save_state = i % t["save_every_steps"] == 0 or done == total or stopping
        if keep_snapshot or save_state:
            checkpoint(i, keep_snapshot, save_state)
        if stopping:
            writer.wait()
            log(f"stopped on request at step {done}/{total}; state saved")
            return RunResult("stopped", done)
    writer.wait()  # the final state is on disk before the result is written

    # The last step's evaluation is the final one; recompute only when no step ran.
    metrics = (last_eval[1] if last_eval[0] == total
               else evaluate(model, eval_ids, eval_y, tokens, precision))
    metrics = {**metrics, "step": total, "eval_examples": int(eval_y.numel())}
    write_json_atomic(out / ckpt.EVAL_FILE, metrics)
    elapsed = time.monotonic() - started
    log(f"finished: test accuracy {metrics['accuracy']:.4f}, balanced "
        f"{metrics['balanced_accuracy']:.4f}, majority rate {metrics['majority_rate']:.4f} "
        f"({done - start} steps in {elapsed:.1f}s)")
    return RunResult("completed", total, metrics)


def job_tokens(config: dict) -> torch.Tensor:
    """The job's token-vector table (truncated as configured), on the CPU."""
    m = config["model"]
    return token_table(m["V"], m["C"], m["n_dims"], m["truncated_dims"],
                       derive_seed("tokens", config["seeds"]["run"]))


def job_eval_set(config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The job's evaluation set (token ids, labels), on the CPU."""
    m, t, e = config["model"], config["training"], config["evaluation"]
    return build_eval_set(m["V"], m["C"], t["task_kwargs"]["rho"],
                          derive_seed("eval", config["seeds"]["run"]), e["eval_examples"])


def autocast(precision: str, device: torch.device):
    """bf16: the forward pass under autocast (weights, gradients, Adam and the loss stay
    float32). fp32 and tf32: a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@contextlib.contextmanager
def float32_matmuls(precision: str, device: torch.device):
    """On CUDA, float32 matmuls in TF32 for `tf32` and in full float32 otherwise; restored on
    exit. TF32 is a GPU format: on the CPU every precision but bf16 is plain float32."""
    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, y: torch.Tensor, tokens: torch.Tensor,
             precision: str = "fp32") -> dict:
    """Accuracy, balanced accuracy, majority-class rate and loss on a fixed set."""
    was_training = model.training
    model.eval()
    with autocast(precision, ids.device):
        logits = torch.cat([model(embed(ids[s:s + EVAL_BATCH], tokens)).float()
                            for s in range(0, ids.shape[0], EVAL_BATCH)])
    model.train(was_training)
    return scores(logits, y)


def scores(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracy, balanced accuracy (the mean recall of the classes present), majority-class
    rate, positive rate and loss of logits (n,) against ±1 labels (n,)."""
    target = (y > 0)
    pred = logits > 0
    pos, neg = target.sum().item(), (~target).sum().item()
    recall_pos = (pred & target).sum().item() / pos if pos else None
    recall_neg = (~pred & ~target).sum().item() / neg if neg else None
    recalls = [r for r in (recall_pos, recall_neg) if r is not None]
    return {
        "accuracy": (pred == target).float().mean().item(),
        "balanced_accuracy": sum(recalls) / len(recalls),
        "majority_rate": max(pos, neg) / (pos + neg),
        "positive_rate": pos / (pos + neg),
        "loss": F.binary_cross_entropy_with_logits(logits, target.float()).item(),
    }


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
