"""One prepared GPU check (issue 10): step times, exact resume, the sweep's projected wall time.

Run from the repository root, on a machine with a GPU (at most ~8 minutes on one H100):

    bash bench/gpu_check.sh                 # full profile on cuda:0
    bash bench/gpu_check.sh --device cpu    # dry run: smoke profile, tiny counts, CPU

(the script runs it as a module, `python -m bench.gpu_check`: it imports bench.step_costs).

It prints one table (markdown):
  * torch and CUDA versions, the device's name;
  * full-profile seconds per training step (data + forward + backward + Adam, synchronised)
    and peak GPU memory, for both models x V in {5, 20} x precision fp32 / tf32 / bf16;
  * the same step at fp32 under torch.compile(model, dynamic=False), with the warm-up seconds
    that include compiling (no config is started after --compile-budget): the trainer does
    not compile (on the CPU it gained 1.0-1.1x), this row says whether a GPU would;
  * the same step at fp32 with two processes training side by side on the same device, as two
    workers sharing one GPU (`make workers GPUS="0 0"`);
  * a 150-step full-profile job run by a real worker (`python -m runner worker`) on a temporary
    SQLite queue, stopped with SIGTERM at step ~70 and resumed by a second worker, against the
    same job run uninterrupted by a third worker beside it: final eval-set logits identical,
    or their max abs difference;
  * the whole 60-job sweep's wall time at fp32 projected from the measured times (1001 steps,
    11 evaluations, 11 checkpoint copies and the set-up per job), one worker and two workers
    sharing the GPU, against the goal of 10 minutes on one H100;
  * the cpu profile (conf/profiles/cpu.yaml, the reduced study of `make study-cpu`): its fp32
    seconds per step on the device and its 60-job sweep's wall time projected the same way,
    one worker, so a user with this GPU can choose between the two profiles.
Progress goes to stderr; the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.step_costs import Job, device_name, time_job_extras
from trainer import checkpoint as ckpt
from trainer.config import load_config, resolve
from trainer.data import embed
from trainer.files import read_metrics
from trainer.train import (
    EVAL_BATCH,
    autocast,
    float32_matmuls,
    job_eval_set,
    job_tokens,
)

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("gpt2", "lowrank_gpt2")
VS = (5, 20)
CONFIGS = [(f, v) for f in FAMILIES for v in VS]
PRECISIONS = ("fp32", "tf32", "bf16")
SWEEP_JOBS_PER_CONFIG = 15  # 5 N x 3 runs for each (model, V)
FULL_JOB_COUNTS = (1001, 11, 11)  # steps, evaluations, states of a full-profile job
CPU_PROFILE = "cpu"         # the reduced study of `make study-cpu`
GOAL_S = 600                # the full 60-run sweep in 10 minutes on one H100


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def python_env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


# --- step times ------------------------------------------------------------------------------


def timed_job(family: str, V: int, args, precision: str,
              profile: str | None = None) -> tuple[Job, float, float]:
    """A job set up as the trainer does (at --profile unless `profile` says otherwise); seconds
    of its set-up and per step after the warm-up."""
    dev = torch.device(args.dev)

    def forward(x):
        with autocast(precision, dev):
            return job.model(x).float()

    with float32_matmuls(precision, dev):
        start = time.perf_counter()
        job = Job(family, V, profile or args.profile, dev)
        setup_s = time.perf_counter() - start - job.pool_s  # Job builds the pool twice
        for _ in range(args.warmup):
            job.step(forward)
        start = time.perf_counter()
        for _ in range(args.steps):
            job.step(forward)
        return job, setup_s, (time.perf_counter() - start) / args.steps


def measure_steps(args) -> dict:
    """Seconds per step, peak memory, and at fp32 the per-job extras: set-up, one evaluation,
    one checkpoint copy (what the loop waits for; the write runs in the background)."""
    out = {}
    dev = torch.device(args.dev)
    for family, V in CONFIGS:
        for precision in PRECISIONS:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            job, setup_s, step_s = timed_job(family, V, args, precision)
            r = out[family, V, precision] = {"step": step_s, "setup": setup_s}
            if dev.type == "cuda":
                r["peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
            if precision == "fp32":
                extras = time_job_extras(job)
                r["eval"], r["copy"] = extras["eval"], extras["copy"]
            say(f"  {family} V={V} {precision}: {step_s:.4f} s/step")
            del job
    return out


def measure_cpu_profile(args) -> dict:
    """The cpu profile at fp32 on this device: seconds per step, set-up, one evaluation, one
    checkpoint copy, and its job's counts (steps, evaluations, states) for the projection."""
    out = {}
    for family, V in CONFIGS:
        job, setup_s, step_s = timed_job(family, V, args, "fp32", profile=CPU_PROFILE)
        extras = time_job_extras(job)
        out[family, V] = {"step": step_s, "setup": setup_s, "eval": extras["eval"],
                          "copy": extras["copy"],
                          "counts": (extras["steps"], extras["evals"], extras["states"])}
        say(f"  {family} V={V} cpu profile fp32: {step_s:.4f} s/step")
        del job
    return out


def measure_compiled(args, deadline: float) -> dict:
    """fp32 seconds per step under torch.compile and the seconds its warm-up took, compilation
    included; configs left when `deadline` passes are skipped, to keep the check within its
    time."""
    out = {}
    dev = torch.device(args.dev)
    for family, V in CONFIGS:
        if time.monotonic() > deadline:
            say(f"  {family} V={V} compiled: skipped (time)")
            continue
        torch._dynamo.reset()  # each config compiles afresh, as in a new worker
        with float32_matmuls("fp32", dev):
            job = Job(family, V, args.profile, dev)
            compiled = torch.compile(job.model, dynamic=False)
            start = time.perf_counter()
            for _ in range(max(args.warmup, 2)):  # the first steps compile
                job.step(compiled)
            compile_s = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(args.steps):
                job.step(compiled)
            out[family, V] = {"step": (time.perf_counter() - start) / args.steps,
                              "compile": compile_s}
        say(f"  {family} V={V} fp32 compiled: {out[family, V]['step']:.4f} s/step, warm-up "
            f"{compile_s:.0f} s")
        del job, compiled
    return out


def child(args) -> None:
    """One of two processes stepping side by side: for each config, warm up, say 'ready', wait
    for 'go', time the steps, report."""
    for family, V in CONFIGS:
        dev = torch.device(args.dev)
        with float32_matmuls("fp32", dev):
            job = Job(family, V, args.profile, dev)
            for _ in range(args.warmup):
                job.step(job.model.forward)
            print("ready", flush=True)
            sys.stdin.readline()
            start = time.perf_counter()
            for _ in range(args.steps):
                job.step(job.model.forward)
            step_s = (time.perf_counter() - start) / args.steps
        print(json.dumps({"family": family, "V": V, "step": step_s}), flush=True)
        del job


def measure_shared(args, tmp: Path) -> dict:
    """fp32 seconds per step of each of two processes stepping at the same time."""
    cmd = [sys.executable, "-m", "bench.gpu_check", "--child", "--device", args.device,
           "--gpu", args.gpu, "--profile", args.profile, "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    logs = [open(tmp / f"child-{i}.log", "w") for i in range(2)]  # noqa: SIM115
    children = [subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=log, text=True, env=python_env()) for log in logs]
    out = {}
    try:
        for family, V in CONFIGS:
            for c in children:
                line = c.stdout.readline()
                if line.strip() != "ready":
                    raise RuntimeError(f"side-by-side process failed; see {tmp}/child-*.log")
            for c in children:  # both start stepping together
                c.stdin.write("go\n")
                c.stdin.flush()
            steps = [json.loads(c.stdout.readline())["step"] for c in children]
            out[family, V] = sum(steps) / 2
            say(f"  {family} V={V} fp32, two side by side: {steps[0]:.4f}, {steps[1]:.4f} s/step")
        for c in children:
            c.stdin.close()
            c.wait(timeout=60)
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
        for log in logs:
            log.close()
    return out


# --- exact resume through real workers ---------------------------------------------------------


def runner_cmd(db: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "runner", "--db", db, *args]


def job_row(db_file: Path) -> dict:
    with sqlite3.connect(db_file) as conn:
        conn.row_factory = sqlite3.Row
        (row,) = conn.execute("select state, step, total_steps, out_dir from jobs").fetchall()
        return dict(row)


def final_logits(out_dir: Path, dev: torch.device) -> torch.Tensor:
    """The eval set's logits under the job's newest valid state."""
    from models import build_model

    config = load_config(out_dir / ckpt.CONFIG_FILE)
    state = ckpt.load_latest_state(out_dir, say)
    model = build_model(config["model"])
    model.load_state_dict(state["model"])
    model.to(dev).eval()
    ids, tokens = job_eval_set(config)[0].to(dev), job_tokens(config).to(dev)
    with torch.no_grad(), autocast(config["training"]["precision"], dev):
        return torch.cat([model(embed(ids[s:s + EVAL_BATCH], tokens)).float().cpu()
                          for s in range(0, ids.shape[0], EVAL_BATCH)])


def resume_check(args, tmp: Path) -> dict:
    family, V = args.resume_model, args.resume_V
    only = ["--only", f"V={V}", "--only", "N=256", "--only", f"model={family}", "--only", "run=1"]
    worker = ["worker", "--gpu", args.gpu, "--lease", "30"]
    if args.device == "cpu":
        worker += ["--threads", "1"]  # CPU sums depend on the thread count: the same for all
    dbs, procs = {}, {}
    for name in ("stopped", "whole"):
        dbs[name] = tmp / f"{name}.sqlite"
        db = f"sqlite:///{dbs[name]}"
        subprocess.run(runner_cmd(db, "plan", "--profile", args.profile, *only, "--set",
                                  f"training.train_steps={args.resume_steps}", "--out-root",
                                  str(tmp / name)), cwd=ROOT, check=True, capture_output=True,
                       env=python_env())
    logs = {name: open(tmp / f"worker-{name}.log", "w") for name in ("stopped", "whole")}  # noqa: SIM115
    try:
        for name in ("stopped", "whole"):  # two workers on one device, side by side
            procs[name] = subprocess.Popen(runner_cmd(f"sqlite:///{dbs[name]}", *worker),
                                           cwd=ROOT, stdout=logs[name], stderr=subprocess.STDOUT,
                                           env=python_env())
        out_dir = Path(job_row(dbs["stopped"])["out_dir"])
        deadline = time.monotonic() + args.resume_timeout
        while len(read_metrics(out_dir)) < args.stop_at:
            if procs["stopped"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not reach step {args.stop_at}; see "
                                   f"{tmp}/worker-stopped.log")
            time.sleep(0.02)
        procs["stopped"].send_signal(signal.SIGTERM)
        rc = procs["stopped"].wait(timeout=args.resume_timeout)
        stopped = job_row(dbs["stopped"])
        say(f"  SIGTERM at step >= {args.stop_at}: worker exit {rc}, job {stopped['state']} at "
            f"step {stopped['step']}")
        if rc != 0 or stopped["state"] != "pending" or not (
                args.stop_at <= stopped["step"] < stopped["total_steps"]):
            raise RuntimeError(f"the stop did not hand the job back mid-run: exit {rc}, {stopped}")
        procs["resumed"] = subprocess.Popen(runner_cmd(f"sqlite:///{dbs['stopped']}", *worker),
                                            cwd=ROOT, stdout=logs["stopped"],
                                            stderr=subprocess.STDOUT, env=python_env())
        for name in ("resumed", "whole"):
            if procs[name].wait(timeout=args.resume_timeout) != 0:
                raise RuntimeError(f"worker {name} failed; see {tmp}")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        for log in logs.values():
            log.close()
    rows = {name: job_row(db) for name, db in dbs.items()}
    if any(row["state"] != "succeeded" for row in rows.values()):
        raise RuntimeError(f"jobs did not succeed: {rows}")
    dev = torch.device(args.dev)
    a, b = (final_logits(Path(rows[name]["out_dir"]), dev) for name in ("stopped", "whole"))
    diff = (a - b).abs().max().item()
    return {"job": f"{family} V={V} N=256, {stopped['total_steps']} steps",
            "stopped_at": stopped["step"], "identical": torch.equal(a, b), "max_abs_diff": diff}


# --- the table -------------------------------------------------------------------------------


def job_seconds(r: dict, counts: tuple[int, int, int] = FULL_JOB_COUNTS) -> float:
    """One sweep job (by default 1001 steps at the full profile) from measured parts."""
    steps, evals, states = counts
    return r["setup"] + steps * r["step"] + evals * r["eval"] + states * r["copy"]


def table(args, versions: dict, steps: dict, shared: dict, resume: dict, compiled: dict,
          cpu_profile: dict) -> str:
    cols = [f"{'gpt2' if f == 'gpt2' else 'lowrank'} V={v}" for f, v in CONFIGS]
    rows = [("check", *cols), ("---",) * (len(cols) + 1)]

    def one(label: str, value: str) -> None:
        rows.append((label, value, *[""] * (len(cols) - 1)))

    one("torch / CUDA", f"{versions['torch']} / {versions['cuda']}")
    one("device", versions["device"])
    one("profile (steps timed after warm-up)", f"{args.profile} ({args.steps} after "
                                               f"{args.warmup})")
    for precision in PRECISIONS:
        rows.append((f"s/step {precision}",
                     *[f"{steps[f, v, precision]['step']:.4f}" for f, v in CONFIGS]))
    if args.dev.startswith("cuda"):
        for precision in PRECISIONS:
            rows.append((f"peak GiB {precision}",
                         *[f"{steps[f, v, precision]['peak_mib'] / 1024:.2f}"
                           for f, v in CONFIGS]))
    rows.append(("s/step fp32 under torch.compile (warm-up s, compiling); not in the trainer",
                 *[f"{compiled[c]['step']:.4f} ({compiled[c]['compile']:.0f} s)" if c in compiled
                   else "skipped" for c in CONFIGS]))
    rows.append(("s/step fp32, two processes side by side (each)",
                 *[f"{shared[c]:.4f}" for c in CONFIGS]))
    rows.append(("two side by side: throughput vs one",
                 *[f"{2 * steps[(*c, 'fp32')]['step'] / shared[c]:.2f}x" for c in CONFIGS]))
    one_job = {c: job_seconds(steps[(*c, "fp32")]) for c in CONFIGS}
    rows.append(("one job fp32, s (set-up + 1001 steps + 11 evals + 11 ckpt copies)",
                 *[f"{one_job[c]:.1f}" for c in CONFIGS]))
    rows.append(("share of the job: evaluations / checkpoint copies (writes run behind)",
                 *[f"{100 * 11 * steps[(*c, 'fp32')]['eval'] / one_job[c]:.1f}% / "
                   f"{100 * 11 * steps[(*c, 'fp32')]['copy'] / one_job[c]:.1f}%"
                   for c in CONFIGS]))
    verdict = ("identical" if resume["identical"]
               else f"max abs diff {resume['max_abs_diff']:.3g}")
    one("resume: SIGTERM to the worker, resumed by another",
        f"{resume['job']}: stopped at step {resume['stopped_at']}, final eval logits vs an "
        f"uninterrupted run: {verdict}")
    sweep_1 = sum(SWEEP_JOBS_PER_CONFIG * one_job[c] for c in CONFIGS)
    # Two workers: each job slowed as measured side by side, two jobs at a time.
    sweep_2 = sum(SWEEP_JOBS_PER_CONFIG * one_job[c] * shared[c] / steps[(*c, "fp32")]["step"]
                  for c in CONFIGS) / 2
    scope = ("" if args.profile == "full" else
             f" ({args.profile} profile figures at full-profile counts: a dry run, not the goal)")
    one("60-job sweep fp32, projected: one worker", f"{sweep_1 / 60:.1f} min{scope}")
    one("60-job sweep fp32, projected: two workers sharing the device",
        f"{sweep_2 / 60:.1f} min{scope}")
    best = min(sweep_1, sweep_2)
    one("goal: 60-job sweep <= 10 min on one H100",
        (("met" if best <= GOAL_S else "not met") + f" ({best / 60:.1f} min)")
        if args.profile == "full" and args.device == "cuda" else "not checked (dry run)")
    steps_cpu, evals_cpu, states_cpu = cpu_profile[CONFIGS[0]]["counts"]
    rows.append((f"s/step fp32 at the cpu profile (make study-cpu: {cpu_profile_shape()})",
                 *[f"{cpu_profile[c]['step']:.4f}" for c in CONFIGS]))
    sweep_cpu = sum(SWEEP_JOBS_PER_CONFIG * job_seconds(cpu_profile[c], cpu_profile[c]["counts"])
                    for c in CONFIGS)
    one(f"60-job sweep at the cpu profile fp32, projected: one worker (set-up + {steps_cpu} "
        f"steps + {evals_cpu} evals + {states_cpu} ckpt copies per job)",
        f"{sweep_cpu / 60:.1f} min" + ("" if args.device == "cuda" else
                                       " (this CPU, 1 thread: a dry run)"))
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def cpu_profile_shape() -> str:
    """The cpu profile's size in a few words, read from its config."""
    cfg = resolve("gpt2", 5, 4096, 1, CPU_PROFILE)
    m, t = cfg["model"], cfg["training"]
    return (f"width {m['n_embd']}, {m['n_layer']} layers, batch {t['batch_size']}, "
            f"{t['train_steps']} steps")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--gpu", default="0", help="CUDA device index (default 0)")
    p.add_argument("--profile", default=None, help="default: full on cuda, smoke on cpu")
    p.add_argument("--steps", type=int, default=None, help="timed steps (cuda 20, cpu 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (cuda 5, cpu 1)")
    p.add_argument("--resume-model", default="gpt2", choices=FAMILIES)
    p.add_argument("--resume-V", type=int, default=20, choices=VS)
    p.add_argument("--resume-steps", type=int, default=150)
    p.add_argument("--stop-at", type=int, default=70)
    p.add_argument("--resume-timeout", type=float, default=240, help="seconds per worker wait")
    p.add_argument("--compile-budget", type=float, default=330,
                   help="seconds from the start after which no further config is compiled")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device == "cuda"
    args.profile = args.profile or ("full" if cuda else "smoke")
    args.steps = args.steps or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.dev = f"cuda:{args.gpu}" if cuda else "cpu"
    if cuda:
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device here (try --device cpu for a dry run)")
        torch.cuda.set_device(int(args.gpu))
    else:
        args.gpu = "cpu"
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)  # as the trainer runs on the CPU
    if args.child:
        child(args)
        return

    started = time.monotonic()
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda or "none",
                "device": device_name(torch.device(args.dev))}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        tmp = Path(folder)
        say(f"resume check ({args.resume_model} V={args.resume_V}, {args.resume_steps} steps, "
            "two workers side by side) ...")
        resume = resume_check(args, tmp)
        say("seconds per step ...")
        steps = measure_steps(args)
        say("two processes side by side ...")
        shared = measure_shared(args, tmp)
        say("the cpu profile ...")
        cpu_profile = measure_cpu_profile(args)
        say("torch.compile ...")
        compiled = measure_compiled(args, started + args.compile_budget)
    print(table(args, versions, steps, shared, resume, compiled, cpu_profile))
    print(f"\n({time.monotonic() - started:.0f} s in all; {args.device})")


if __name__ == "__main__":
    main()
