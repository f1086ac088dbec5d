"""Per-step cost of the trainer, split into data side and optimiser step (spec §7).

Run from the repository root:

    .venv/bin/python bench/trainer.py                        # small profile, CPU
    .venv/bin/python bench/trainer.py --device cuda          # full profile, GPU
    .venv/bin/python bench/trainer.py --profile full --steps 1 --repeats 1 --V 5

For each model family x V (N = 4096) it times, per training step, with the trainer's own
building blocks (trainer.data, models.build_model, torch.optim.Adam at the config's lr):
  data  sample_indices on a CPU generator -> .to(device) -> embed(pool_ids[idx]), labels gather
  step  forward, BCE-with-logits loss, zero_grad, backward, Adam step
after a few warm-up steps, in --repeats rounds of --steps steps; it prints the median
seconds/step of each, the data share of the total, and the one-off build_pool time. Beside
each row: the spec's §7 figures, measured on the reference (2 CPU threads, its own Python-loop
data generation). For the full profile it also extrapolates one run and the 60-run sweep.
It prints figures only; it checks nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# As a script, sys.path[0] is bench/, where this file would shadow the `trainer` package:
# swap in the repository root before any other import.
HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
    sys.path[0] = str(HERE.parent)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import build_model  # noqa: E402
from trainer.config import resolve  # noqa: E402
from trainer.data import (  # noqa: E402
    build_eval_set,
    build_pool,
    derive_seed,
    embed,
    sample_indices,
    token_table,
)
from trainer.train import evaluate  # noqa: E402

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


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        return names[0] if names else platform.processor() or "cpu"
    except OSError:
        return platform.processor() or "cpu"


def bench_one(family: str, V: int, args, dev: torch.device) -> dict:
    """Median data and optimiser seconds/step for one (family, V); eval time for full."""
    cfg = resolve(family, V, N, run=1, profile=args.profile)
    m, t = cfg["model"], cfg["training"]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    pool_s = []  # the second call is warm: the first pays torch's first-use costs
    for _ in range(2):
        t0 = time.perf_counter()
        pool_ids, pool_y = build_pool(V, m["C"], t["task_kwargs"]["rho"], cfg["seeds"]["pool"], N)
        pool_s.append(time.perf_counter() - t0)
    run_seed = cfg["seeds"]["run"]
    tokens = token_table(V, m["C"], m["n_dims"], m["truncated_dims"],
                         derive_seed("tokens", run_seed)).to(dev)
    pool_ids, pool_y = pool_ids.to(dev), pool_y.to(dev)
    batches = torch.Generator().manual_seed(derive_seed("batches", run_seed))
    torch.manual_seed(derive_seed("init", run_seed))
    model = build_model(m).to(dev).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=t["learning_rate"])

    def one_step() -> tuple[float, float]:
        a = time.perf_counter()
        idx = sample_indices(N, t["batch_size"], batches).to(dev)
        x, y = embed(pool_ids[idx], tokens), pool_y[idx]
        sync()
        b = time.perf_counter()
        logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits, (y + 1).float() / 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        return b - a, time.perf_counter() - b

    for _ in range(args.warmup):
        one_step()
    data_s, step_s = [], []
    for _ in range(args.repeats):
        times = [one_step() for _ in range(args.steps)]
        data_s.append(sum(d for d, _ in times) / args.steps)
        step_s.append(sum(s for _, s in times) / args.steps)
    out = {"pool": pool_s[-1], "data": statistics.median(data_s), "step": statistics.median(step_s)}
    if args.profile == "full":  # one evaluation on the eval set, as the trainer runs it
        e = cfg["evaluation"]
        ids, y = build_eval_set(V, m["C"], t["task_kwargs"]["rho"],
                                derive_seed("eval", run_seed), e["eval_examples"])
        ids, y = ids.to(dev), y.to(dev)
        t0 = time.perf_counter()
        evaluate(model, ids, y, tokens)
        sync()
        out["eval"] = time.perf_counter() - t0
        # trainer.train: every eval_every steps and the last, plus the final evaluation
        total = t["train_steps"]
        out["steps"] = total
        out["evals"] = sum(i % e["eval_every"] == 0 or i == total - 1 for i in range(total)) + 1
        out["run"] = total * (out["data"] + out["step"]) + out["evals"] * out["eval"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--profile", choices=("small", "full"), default=None,
                   help="default: small on cpu, full on cuda")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--model", choices=FAMILIES, action="append", help="only this family")
    p.add_argument("--V", type=int, choices=VS, action="append", help="only this V")
    args = p.parse_args()
    args.profile = args.profile or ("full" if args.device == "cuda" else "small")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    if dev.type == "cpu":
        torch.use_deterministic_algorithms(True)  # as trainer.train.run does on CPU
    torch.set_num_threads(torch.get_num_threads())  # the machine default, made explicit
    if args.profile == "full" and dev.type == "cpu" and args.steps * args.repeats > 2:
        print("WARNING: full profile on CPU takes ~5 s/step at V=5 and ~35 s/step at V=20; "
              "try --steps 1 --repeats 1 --warmup 1", file=sys.stderr)

    print(f"torch {torch.__version__} | device {args.device}: {device_name(dev)} | "
          f"threads {torch.get_num_threads()} | load average {os.getloadavg()[0]:.2f} "
          "(other work on the cores skews the figures)")
    print(f"profile {args.profile}, N={N}, warm-up {args.warmup}, {args.repeats} rounds x "
          f"{args.steps} steps, median of rounds (seconds per step)\n")
    head = (f"{'profile':7} {'model':12} {'V':>3} {'data':>9} {'optimiser':>10} {'data %':>7}"
            f" {'pool build':>10} | reference (2 CPU threads): data + optimiser, data %")
    print(head + "\n" + "-" * len(head))
    results = {}
    for V in args.V or VS:
        for family in args.model or FAMILIES:
            r = results[family, V] = bench_one(family, V, args, dev)
            total = r["data"] + r["step"]
            ref_d, ref_s = REFERENCE[args.profile, family, V]
            print(f"{args.profile:7} {family:12} {V:>3} {r['data']:9.5f} {r['step']:10.5f} "
                  f"{100 * r['data'] / total:6.1f}% {r['pool']:9.3f}s | "
                  f"{ref_d:.3f} + {ref_s:.3f}, {100 * ref_d / (ref_d + ref_s):.0f}%", flush=True)

    if args.profile == "full":
        print("\nExtrapolated (step time independent of N; pool build and checkpoints left out):")
        sweep = 0.0
        for (family, V), r in results.items():
            sweep += len(SWEEP_NS) * SWEEP_RUNS * r["run"]
            print(f"  {family:12} V={V:<2}: one run {r['run'] / 60:7.1f} min "
                  f"({r['steps']} steps + {r['evals']} evals x {r['eval']:.2f}s)")
        subset = "" if len(results) == len(FAMILIES) * len(VS) else " (measured rows only)"
        print(f"  sweep{subset}: {len(SWEEP_NS)} N x {SWEEP_RUNS} runs per row = "
              f"{sweep / 3600:.2f} h")


if __name__ == "__main__":
    main()
