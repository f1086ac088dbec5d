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
.PHONY: help install plan worker workers status requeue results plot report serve test lint demo clean-demo

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

workers: $(STAMP) ## one background worker per GPU in GPUS="0 1 2 3", logs in runs/logs/
	@mkdir -p runs/logs
	@for g in $(GPUS); do \
	  nohup $(RUNNER) worker --gpu $$g > runs/logs/worker-$$g.log 2>&1 & \
	  echo "worker on GPU $$g: pid $$!, log runs/logs/worker-$$g.log"; \
	done

status: $(STAMP) ## the status table
	$(RUNNER) status

requeue: $(STAMP) ## failed jobs back to pending
	$(RUNNER) requeue --failed

results: $(STAMP) ## accuracy table per (V, model, N): mean ± std over runs
	$(RUNNER) results

plot: $(STAMP) ## sample-complexity figure (runs/sample_complexity.png) and training curves
	$(RUNNER) plot --out runs/sample_complexity.png

report: $(STAMP) ## the sweep as one self-contained HTML file (runs/report.html; DB=URL)
	$(RUNNER) $(if $(DB),--db $(DB)) report --out runs/report.html

serve: $(STAMP) ## the live dashboard on http://127.0.0.1:8765/ (DB=URL for another queue)
	$(RUNNER) $(if $(DB),--db $(DB)) serve

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .

test: $(STAMP) ## lint and the test suite (what CI runs)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q; s=$$?; \
	  if [ $$s -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$s

DEMO_DB := sqlite:///runs/demo/queue.sqlite

demo: $(STAMP) ## the whole smoke sweep on CPU: plan, 2 workers, status, results, figure, report
	rm -rf runs/demo
	$(RUNNER) --db $(DEMO_DB) plan --profile smoke --out-root runs/demo
	$(RUNNER) --db $(DEMO_DB) worker --gpu cpu --threads 1 > runs/demo-worker-1.log 2>&1 & \
	$(RUNNER) --db $(DEMO_DB) worker --gpu cpu --threads 1 > runs/demo-worker-2.log 2>&1 & \
	wait
	$(RUNNER) --db $(DEMO_DB) status
	$(RUNNER) --db $(DEMO_DB) results
	$(RUNNER) --db $(DEMO_DB) plot --out runs/demo/sample_complexity.png
	$(RUNNER) --db $(DEMO_DB) report --out runs/demo/report.html
	@echo ""
	@echo "Open runs/demo/report.html in a browser, or the live dashboard of this queue:"
	@echo "  make serve DB=$(DEMO_DB)    then http://127.0.0.1:8765/"
