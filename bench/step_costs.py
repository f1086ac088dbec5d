"""Per-step cost of the trainer (spec §7), and the structured forward against the dense one.

Run from the repository root:

    python bench/step_costs.py                        # small profile, CPU
    python bench/step_costs.py --device cuda          # full profile, GPU
    python bench/step_costs.py --profile full --steps 1 --repeats 1 --V 5
    python -m bench.step_costs --compare              # dense vs structured, small and full, CPU

Default mode: for each model family x V (N = 4096) it times, per training step, with the
trainer's own building blocks (trainer.data, models.build_model, torch.optim.Adam at the
config's lr):
  data       sample_indices on a CPU generator -> .to(device) -> embed(pool_ids[idx]), labels
  forward    the model (structured) and the BCE-with-logits loss
  backward   zero_grad, backward
  optimiser  Adam step
after a few warm-up steps, in --repeats rounds of --steps steps; it prints the median
seconds/step of each and the one-off build_pool time. Beside each row: the spec's §7 figures,
measured on the reference (2 CPU threads, its own Python-loop data generation). For the full
profile it also times one evaluation and one checkpoint (state + snapshot, written the way the
trainer writes them) and splits one whole job (1001 steps, 11 evaluations, 11 states, 10
snapshots) into those parts, then extrapolates the 60-run sweep.

--compare: for the small and full profiles (or --profile), per model and V, seconds per
training step (data + forward + backward + Adam) with the dense oracle (model.forward_dense)
and with the structured forward (model.forward), from the same initial weights, alternating
step by step so load on the machine hits both alike; the median step of each and their ratio,
against the targets of the project's issue 10. Rounds: --repeats x --steps at the small
profile, --full-steps at the full one. --compile adds the structured forward under
torch.compile and the seconds its warm-up (compilation) took.

It prints figures only; it checks nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models import build_model
from trainer import checkpoint as ckpt
from trainer.config import resolve
from trainer.data import (
    build_pool,
    derive_seed,
    embed,
    sample_indices,
)
from trainer.train import evaluate, job_eval_set, job_tokens

N = 4096
FAMILIES = ("gpt2", "lowrank_gpt2")
VS = (5, 20)
SWEEP_NS, SWEEP_RUNS = (256, 512, 1024, 2048, 4096), 3
# Spec §7, measured on the reference (2 CPU threads): (data, optimiser) seconds per step.
REFERENCE = {
    ("small", "gpt2", 5): (0.043, 0.041), ("small", "gpt2", 20): (0.169, 0.145),
    ("small", "lowrank_gpt2", 5): (0.069, 0.038), ("small", "lowrank_gpt2", 20): (0.305, 0.122),
    ("full", "gpt2", 5): (0.27, 4.9), ("full", "gpt2", 20): (0.99, 33.5),
    ("full", "lowrank_gpt2", 5): (0.22, 5.0), ("full", "lowrank_gpt2", 20): (1.27, 37.0),
}
# Issue 10's targets for structured over dense on a 2-core CPU: (profile, family, V) -> ratio.
TARGETS = {
    ("full", "lowrank_gpt2", 20): 2.5, ("full", "gpt2", 20): 1.05, ("full", "gpt2", 5): 1.05,
    **{("small", f, v): 1.4 for f in FAMILIES for v in VS},
}
PARTS = ("data", "forward", "backward", "optimiser")


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        return names[0] if names else platform.processor() or "cpu"
    except OSError:
        return platform.processor() or "cpu"


class Job:
    """One job's training set-up, as trainer.train builds it (N = 4096, run 1)."""

    def __init__(self, family: str, V: int, profile: str, dev: torch.device):
        self.cfg = cfg = resolve(family, V, N, run=1, profile=profile)
        m, t = cfg["model"], cfg["training"]
        self.dev, self.batch_size = dev, t["batch_size"]
        self.sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        pool_s = []  # the second call is warm: the first pays torch's first-use costs
        for _ in range(2):
            t0 = time.perf_counter()
            pool_ids, pool_y = build_pool(V, m["C"], t["task_kwargs"]["rho"], cfg["seeds"]["pool"],
                                          N)
            pool_s.append(time.perf_counter() - t0)
        self.pool_s = pool_s[-1]
        run_seed = cfg["seeds"]["run"]
        self.tokens = job_tokens(cfg).to(dev)
        self.pool_ids, self.pool_y = pool_ids.to(dev), pool_y.to(dev)
        self.batches = torch.Generator().manual_seed(derive_seed("batches", run_seed))
        torch.manual_seed(derive_seed("init", run_seed))
        self.model = build_model(m).to(dev).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=t["learning_rate"])

    def step(self, forward) -> dict[str, float]:
        """One training step with `forward` (model.forward or model.forward_dense); seconds of
        each part."""
        times, sync = [time.perf_counter()], self.sync
        idx = sample_indices(N, self.batch_size, self.batches).to(self.dev)
        x, y = embed(self.pool_ids[idx], self.tokens), self.pool_y[idx]
        sync()
        times.append(time.perf_counter())
        loss = F.binary_cross_entropy_with_logits(forward(x), (y + 1).float() / 2)
        sync()
        times.append(time.perf_counter())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        times.append(time.perf_counter())
        self.optimizer.step()
        sync()
        times.append(time.perf_counter())
        return {part: b - a for part, a, b in zip(PARTS, times[:-1], times[1:], strict=True)}


def time_steps(job: Job, forward, args) -> dict[str, float]:
    """Median over --repeats rounds of the mean seconds per step of each part."""
    for _ in range(args.warmup):
        job.step(forward)
    rounds = []
    for _ in range(args.repeats):
        steps = [job.step(forward) for _ in range(args.steps)]
        rounds.append({p: sum(s[p] for s in steps) / args.steps for p in PARTS})
    return {p: statistics.median(r[p] for r in rounds) for p in PARTS}


def time_job_extras(job: Job) -> dict[str, float]:
    """Full profile: one evaluation, and one checkpoint (state + snapshot) as the trainer
    writes it: the host copy the training loop waits for, and the serialise/checksum/write/fsync
    it used to wait for too and now leaves to a background thread."""
    cfg, t, e = job.cfg, job.cfg["training"], job.cfg["evaluation"]
    ids, y = (v.to(job.dev) for v in job_eval_set(cfg))
    t0 = time.perf_counter()
    evaluate(job.model, ids, y, job.tokens)
    job.sync()
    out = {"eval": time.perf_counter() - t0}

    with tempfile.TemporaryDirectory(prefix="bench-step-costs-") as folder:
        t0 = time.perf_counter()
        weights = ckpt.to_host(job.model.state_dict())
        state = {"step": 1, "model": weights, "optimizer": ckpt.to_host(job.optimizer.state_dict()),
                 "rng": ckpt.to_host(ckpt.capture_rng(job.dev, job.batches)), "config": cfg}
        out["copy"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        path = ckpt.save_state(Path(folder), state)
        out["state_write"] = time.perf_counter() - t0
        out["state_mb"] = path.stat().st_size / 1e6
        t0 = time.perf_counter()
        ckpt.save_snapshot(Path(folder), 1, weights)
        out["snapshot_write"] = time.perf_counter() - t0

    total = t["train_steps"]
    out["steps"] = total
    # trainer.train: evaluate every eval_every steps and at the last; states every save_every
    # steps (step 0 included) and at the last; snapshots every keep_every steps after 0.
    out["evals"] = sum(i % e["eval_every"] == 0 or i == total - 1 for i in range(total))
    out["states"] = sum(i % t["save_every_steps"] == 0 or i == total - 1 for i in range(total))
    out["snapshots"] = sum(i % t["keep_every_steps"] == 0 and i > 0 for i in range(total))
    return out


def job_breakdown(r: dict) -> dict[str, float]:
    """Seconds of one whole job in each part (checkpoints: writes as they used to block)."""
    parts = {p: r["steps"] * r[p] for p in PARTS}
    parts["evaluation"] = r["evals"] * r["eval"]
    parts["state saving"] = (r["states"] * (r["copy"] + r["state_write"])
                             + r["snapshots"] * r["snapshot_write"])
    return parts


def default_mode(args, dev: torch.device) -> None:
    print(f"profile {args.profile}, N={N}, warm-up {args.warmup}, {args.repeats} rounds x "
          f"{args.steps} steps, median of rounds (seconds per step)\n")
    head = (f"{'profile':7} {'model':12} {'V':>3} {'data':>8} {'forward':>8} {'backward':>8}"
            f" {'optimiser':>9} {'step':>8} {'pool build':>10}"
            " | reference (2 CPU threads): data + optimiser")
    print(head + "\n" + "-" * len(head))
    results = {}
    for V in args.V or VS:
        for family in args.model or FAMILIES:
            job = Job(family, V, args.profile, dev)
            r = results[family, V] = time_steps(job, job.model.forward, args)
            if args.profile == "full":
                r.update(time_job_extras(job))
            ref_d, ref_s = REFERENCE[args.profile, family, V]
            print(f"{args.profile:7} {family:12} {V:>3} {r['data']:8.5f} {r['forward']:8.4f} "
                  f"{r['backward']:8.4f} {r['optimiser']:9.4f} {sum(r[p] for p in PARTS):8.4f} "
                  f"{job.pool_s:9.3f}s | {ref_d:.3f} + {ref_s:.3f}", flush=True)

    if args.profile != "full":
        return
    print("\nOne job (1001 steps, 11 evaluations, 11 states, 10 snapshots): share of its time, "
          "state saving counted as if written in the training loop (copy + write)")
    print(f"{'model':12} {'V':>3} " + " ".join(f"{p:>12}" for p in (*PARTS, "evaluation",
                                                                     "state saving"))
          + f" {'job':>9} | state MB, copy s, write s; snapshot write s")
    sweep = 0.0
    for (family, V), r in results.items():
        parts = job_breakdown(r)
        job_s = sum(parts.values())
        sweep += len(SWEEP_NS) * SWEEP_RUNS * job_s
        print(f"{family:12} {V:>3} " + " ".join(f"{100 * s / job_s:11.2f}%" for s in
                                                parts.values())
              + f" {job_s / 60:7.1f}min | {r['state_mb']:.0f}, {r['copy']:.3f}, "
              f"{r['state_write']:.3f}; {r['snapshot_write']:.3f}")
    subset = "" if len(results) == len(FAMILIES) * len(VS) else " (measured rows only)"
    print(f"\nSweep{subset}: {len(SWEEP_NS)} N x {SWEEP_RUNS} runs per row = {sweep / 3600:.2f} h "
          "(pool builds left out). The trainer now waits only for the copy of each checkpoint; "
          "its write runs on a background thread.")


def compare_mode(args, dev: torch.device) -> None:
    profiles = [args.profile] if args.profile else ["small", "full"]
    print(f"seconds per training step (data + forward + backward + Adam), N={N}; dense "
          "(forward_dense) and structured (forward) alternate step by step; median step")
    if args.compile:
        print("compiled: the structured forward under torch.compile(model, dynamic=False), in "
              "the same rounds; compile s: its warm-up steps, compilation included")
    print(f"small: warm-up {args.warmup}, {args.repeats * args.steps} rounds; full: warm-up 1, "
          f"{args.full_steps} rounds; one step of each forward per round\n")
    head = (f"{'profile':7} {'model':12} {'V':>3} {'dense':>9} {'structured':>10} {'ratio':>7}"
            f" {'target':>13}")
    if args.compile:
        head += f" {'compiled':>9} {'vs struct.':>10} {'compile s':>9}"
    print(head + "\n" + "-" * len(head))
    for profile in profiles:
        # One step per round: the finest interleaving, so a burst of load on the machine
        # lands on both forwards alike and the medians shrug it off.
        warmup, rounds = ((1, args.full_steps) if profile == "full"
                          else (args.warmup, args.repeats * args.steps))
        for V in args.V or VS:
            for family in args.model or FAMILIES:
                runs = {}
                for name in ("dense", "structured", "compiled")[:3 if args.compile else 2]:
                    job = Job(family, V, profile, dev)  # the same initial weights every time
                    forward = {"dense": job.model.forward_dense, "structured": job.model.forward,
                               "compiled": torch.compile(job.model, dynamic=False)}[name]
                    start = time.perf_counter()
                    for _ in range(warmup):
                        job.step(forward)
                    runs[name] = (job, forward, time.perf_counter() - start)
                per_round = {name: [] for name in runs}
                for _ in range(rounds):
                    for name, (job, forward, _) in runs.items():
                        per_round[name].append(sum(job.step(forward).values()))
                median = {name: statistics.median(per_round[name]) for name in runs}
                d, s = median["dense"], median["structured"]
                target = TARGETS.get((profile, family, V))
                verdict = "" if target is None else (f"{target:.2f}x "
                                                     + ("met" if d / s >= target else "MISSED"))
                line = (f"{profile:7} {family:12} {V:>3} {d:9.4f} {s:10.4f} {d / s:6.2f}x "
                        f"{verdict:>13}")
                if args.compile:
                    c = median["compiled"]
                    line += f" {c:9.4f} {s / c:9.2f}x {runs['compiled'][2]:9.1f}"
                print(line, flush=True)
                del runs
                torch._dynamo.reset()  # compile each job afresh, as a new worker process would


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--profile", choices=("small", "full"), default=None,
                   help="default: small on cpu, full on cuda; with --compare: both")
    p.add_argument("--compare", action="store_true",
                   help="dense oracle vs structured forward, seconds per step and ratio")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true",
                   help="--compare: also the structured forward under torch.compile")
    p.add_argument("--full-steps", type=int, default=3,
                   help="--compare, full profile: rounds of one step each (after one warm-up)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the machine's default)")
    p.add_argument("--model", choices=FAMILIES, action="append", help="only this family")
    p.add_argument("--V", type=int, choices=VS, action="append", help="only this V")
    args = p.parse_args()
    if not args.compare:
        args.profile = args.profile or ("full" if args.device == "cuda" else "small")
    if min(args.steps, args.repeats, args.full_steps) < 1 or args.warmup < 0:
        p.error("--steps, --repeats and --full-steps must be >= 1, --warmup >= 0")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    if dev.type == "cpu":
        torch.use_deterministic_algorithms(True)  # as trainer.train.run does on CPU
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if (not args.compare and args.profile == "full" and dev.type == "cpu"
            and args.steps * args.repeats > 2):
        print("WARNING: full profile on CPU takes seconds per step (tens at V=20 for gpt2); "
              "try --steps 1 --repeats 1 --warmup 1", file=sys.stderr)

    print(f"torch {torch.__version__} | device {args.device}: {device_name(dev)} | "
          f"threads {torch.get_num_threads()} | load average {os.getloadavg()[0]:.2f} "
          "(other work on the cores skews the figures)")
    (compare_mode if args.compare else default_mode)(args, dev)


if __name__ == "__main__":
    main()
