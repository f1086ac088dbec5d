# Table-connectivity sweep: a resumable job queue over SQLite or PostgreSQL.
# `make help` lists the targets.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
SWEEP   ?= conf/sweep.yaml
PROFILE ?= full
GPU     ?= 0
GPUS    ?= 0
RUNNER  := $(PY) -m runner

.DEFAULT_GOAL := help
.PHONY: help install plan worker workers status requeue results plot test lint demo clean-demo

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install the project (CPU torch pinned first)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build first: a looser spec would pull a multi-GB CUDA build.
	# On a GPU machine, install your CUDA build of torch into .venv beforehand.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

plan: $(STAMP) ## write the sweep into the queue (SWEEP=, PROFILE=); idempotent
	$(RUNNER) plan --sweep $(SWEEP) --profile $(PROFILE)

worker: $(STAMP) ## one worker on GPU=0 (GPU=cpu for the CPU)
	$(RUNNER) worker --gpu $(GPU)

workers: $(STAMP) ## one background worker per entry of GPUS="0 1 2 3" ("0 0": two on GPU 0), logs in runs/logs/
	@mkdir -p runs/logs
	@i=0; for g in $(GPUS); do \
	  i=$$((i + 1)); log=runs/logs/worker-$$i-gpu$$g.log; \
	  nohup $(RUNNER) worker --gpu $$g > $$log 2>&1 & \
	  echo "worker $$i on GPU $$g: pid $$!, log $$log"; \
	done

status: $(STAMP) ## the status table
	$(RUNNER) status

requeue: $(STAMP) ## failed jobs back to pending
	$(RUNNER) requeue --failed

results: $(STAMP) ## accuracy table per (V, model, N): mean ± std over runs
	$(RUNNER) results

plot: $(STAMP) ## sample-complexity figure (runs/sample_complexity.png) and training curves
	$(RUNNER) plot --out runs/sample_complexity.png

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .

test: $(STAMP) ## lint and the test suite (what CI runs)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q; s=$$?; \
	  if [ $$s -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$s

DEMO_DB := sqlite:///runs/demo/queue.sqlite

demo: $(STAMP) ## the whole smoke sweep on CPU: plan, 2 workers, status, results, figure
	rm -rf runs/demo
	$(RUNNER) --db $(DEMO_DB) plan --profile smoke --out-root runs/demo
	$(RUNNER) --db $(DEMO_DB) worker --gpu cpu --threads 1 > runs/demo-worker-1.log 2>&1 & \
	$(RUNNER) --db $(DEMO_DB) worker --gpu cpu --threads 1 > runs/demo-worker-2.log 2>&1 & \
	wait
	$(RUNNER) --db $(DEMO_DB) status
	$(RUNNER) --db $(DEMO_DB) results
	$(RUNNER) --db $(DEMO_DB) plot --out runs/demo/sample_complexity.png
