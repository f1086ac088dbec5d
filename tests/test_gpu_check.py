"""bench/gpu_check.sh runs: its CPU dry path (smoke profile, tiny counts) end to end."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.commands import PYTHON, ROOT

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_on_cpu():
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--device", "cpu", "--steps", "1", "--warmup", "0",
         "--resume-model", "lowrank_gpt2", "--resume-V", "5", "--resume-steps", "40",
         "--stop-at", "15", "--compile-budget", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHON": PYTHON})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| check | gpt2 V=5 | gpt2 V=20 | lowrank V=5 | lowrank V=20 |"
    labels = [line.split(" | ")[0][2:] for line in table]
    for label in ("torch / CUDA", "s/step fp32", "s/step bf16",
                  "s/step fp32, two processes side by side (each)",
                  "60-job sweep fp32, projected: one worker",
                  "60-job sweep fp32, projected: two workers sharing the device"):
        assert label in labels, label
    # The cpu profile (make study-cpu): its steps timed, its sweep projected from its own counts.
    (cpu_steps,) = [line for line in table if line.startswith("| s/step fp32 at the cpu profile")]
    assert "width 64, 4 layers, batch 64, 1500 steps" in cpu_steps
    assert all(float(cell) > 0 for cell in cpu_steps.strip("| ").split(" | ")[1:])
    (cpu_sweep,) = [line for line in table
                    if line.startswith("| 60-job sweep at the cpu profile fp32, projected")]
    assert "(set-up + 1500 steps + 7 evals + 4 ckpt copies per job)" in cpu_sweep
    assert " min (this CPU, 1 thread: a dry run) |" in cpu_sweep
    (compiled,) = [line for line in table if line.startswith("| s/step fp32 under torch.compile")]
    assert compiled.count("skipped") == 4  # --compile-budget 0: nothing compiled
    # On the CPU, deterministic and single-threaded, the resumed run is bit-identical.
    (resume,) = [line for line in table if line.startswith("| resume:")]
    assert "lowrank_gpt2 V=5 N=256, 40 steps: stopped at step" in resume
    assert "uninterrupted run: identical" in resume
    assert "job pending at step" in proc.stderr
