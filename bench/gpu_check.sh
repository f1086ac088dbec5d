#!/usr/bin/env bash
# The GPU check of issue 10, one table on stdout (see bench/gpu_check.py):
#   bash bench/gpu_check.sh                 # full profile on cuda:0, at most ~8 minutes on an H100
#   bash bench/gpu_check.sh --device cpu    # dry run on the CPU: smoke profile, tiny counts
# Python: $PYTHON if set, else .venv/bin/python, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
exec "$py" -m bench.gpu_check "$@"
