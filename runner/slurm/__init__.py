"""SLURM: workers as a job array (array: script, submit, status, cancel) and what a worker
does inside a SLURM task (task: its ids, GPUs and CPUs, and requeueing itself)."""
