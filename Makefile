# Table-connectivity sweep: a resumable job queue over SQLite or PostgreSQL.
# `make help` lists the targets.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
SWEEP   ?= conf/sweep.yaml
PROFILE ?= full
GPU     ?= 0
GPUS    ?= 0
# DB=URL picks the queue for every target (default: $RUNNER_DB, else runs/queue.sqlite).
DB      ?=
# THREADS=N gives each worker N CPU threads; CPU workers of `make workers` share the
# cores by default, so that several of them do not slow each other down.
THREADS ?=
# DB_OUTAGE=SECONDS: how long a worker waits out an unreachable database (default 600).
DB_OUTAGE ?=
LOGS    ?= runs/logs
RUNNER  := $(PY) -m runner $(if $(DB),--db '$(DB)')

.DEFAULT_GOAL := help
.PHONY: help install plan worker workers slurm status requeue cancel pause resume results plot \
        report serve test test-fast coverage mutmut lint demo clean-demo study-cpu

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

worker: $(STAMP) ## one worker on GPU=0 (GPU=cpu for the CPU; THREADS=, DB=, DB_OUTAGE=)
	$(RUNNER) worker --gpu $(GPU) $(if $(THREADS),--threads $(THREADS)) \
	  $(if $(DB_OUTAGE),--db-outage $(DB_OUTAGE))

workers: $(STAMP) ## one background worker per entry of GPUS="0 1 2 3" ("0 0": two on GPU 0; "cpu cpu"), a log each
	@$(PY) -m runner.launch --logs '$(LOGS)' $(if $(DB),--db '$(DB)') \
	  $(if $(THREADS),--threads '$(THREADS)') $(if $(DB_OUTAGE),--db-outage '$(DB_OUTAGE)') $(GPUS)

slurm: $(STAMP) ## WORKERS=N workers as a SLURM job array (PARTITION=, TIME=, SLURM_ARGS="--cpu ...")
	@[ -n "$(WORKERS)" ] || { echo 'say how many: make slurm WORKERS=4 PARTITION=gpu' >&2; exit 2; }
	$(RUNNER) slurm submit --workers $(WORKERS) $(if $(PARTITION),--partition $(PARTITION)) \
	  $(if $(TIME),--time $(TIME)) $(SLURM_ARGS)

status: $(STAMP) ## the status table
	$(RUNNER) status

requeue: $(STAMP) ## failed jobs back to pending
	$(RUNNER) requeue --failed

cancel: $(STAMP) ## cancel jobs: NAME="name or unique part ..." (running ones are stopped)
	@[ -n "$(NAME)" ] || { echo 'say which: make cancel NAME="standard_V5_N256_run1"' >&2; exit 2; }
	$(RUNNER) cancel $(NAME)

pause: $(STAMP) ## pause the queue: nothing new is claimed (running jobs finish)
	$(RUNNER) pause

resume: $(STAMP) ## lift a pause
	$(RUNNER) resume

results: $(STAMP) ## accuracy table per (V, model, N): mean ± std over runs
	$(RUNNER) results

plot: $(STAMP) ## sample-complexity figure (runs/sample_complexity.png) and training curves
	$(RUNNER) plot --out runs/sample_complexity.png

report: $(STAMP) ## the sweep as one self-contained HTML file (runs/report.html; DB=URL)
	$(RUNNER) report --out runs/report.html

serve: $(STAMP) ## the live dashboard on http://127.0.0.1:8765/ (DB=URL for another queue)
	$(RUNNER) serve

.PHONY: gc
gc: $(STAMP) ## free disk: keep each job's newest valid state (DRY_RUN=1 lists only; REPLACED=1 also replaced folders)
	$(RUNNER) gc $(if $(DRY_RUN),--dry-run) $(if $(REPLACED),--replaced)

.PHONY: mutants
mutants: $(STAMP) ## break each guard in a copy of the tree; its tests must fail (tests/mutants.py)
	$(PY) -m tests.mutants

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .

test: $(STAMP) ## lint and the test suite (what CI runs)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=25; s=$$?; \
	  if [ $$s -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$s

# Markers: slow and chaos are set by hand, server by tests/conftest.py (pyproject.toml lists them).
FAST := not server and not slow and not chaos

test-fast: $(STAMP) ## lint and the tests that need no server and are not slow (a few minutes)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m '$(FAST)'; s=$$?; \
	  if [ $$s -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$s

# TESTS= narrows what is measured (pytest arguments); the table goes to coverage.txt too.
# The data files go under build/coverage: tests check that a refused command leaves the
# checkout's top folder as it was.
COVERAGE_DATA := $(CURDIR)/build/coverage
coverage: $(STAMP) ## branch coverage per module, workers in subprocesses included (bash .ci/run coverage: with the servers)
	rm -rf $(COVERAGE_DATA) && mkdir -p $(COVERAGE_DATA)
	COVERAGE_FILE=$(COVERAGE_DATA)/.coverage $(PY) -m coverage run -m pytest -q $(TESTS); s=$$?; \
	  export COVERAGE_FILE=$(COVERAGE_DATA)/.coverage; $(PY) -m coverage combine -q && \
	  $(PY) -m coverage json -q -o $(COVERAGE_DATA)/coverage.json && \
	  $(PY) -m testing.coverage_table $(COVERAGE_DATA)/coverage.json | tee coverage.txt; exit $$s

# MUTANTS="runner.liveness*" narrows mutmut to those names (all of [tool.mutmut]: hours).
# One OpenMP thread: mutmut forks a child per mutant, and the child of a process whose OpenMP
# pool has started hangs at its first parallel torch op.
mutmut: $(STAMP) ## mutmut 3 over the queue, liveness, checkpoint and bucket-head code; lists the survivors
	$(PY) -m pip install -q -e '.[mutation]'
	rm -rf mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run $(MUTANTS); $(VENV)/bin/mutmut results

DEMO_DB := sqlite:///runs/demo/queue.sqlite
DEMO    := $(PY) -m runner --db $(DEMO_DB)

demo: $(STAMP) ## the whole smoke sweep on CPU: plan, 2 workers, status, results, figure, report
	rm -rf runs/demo
	$(DEMO) plan --profile smoke --out-root runs/demo
	$(DEMO) worker --gpu cpu --threads 1 > runs/demo-worker-1.log 2>&1 & \
	$(DEMO) worker --gpu cpu --threads 1 > runs/demo-worker-2.log 2>&1 & \
	wait
	$(DEMO) status
	$(DEMO) results
	$(DEMO) plot --out runs/demo/sample_complexity.png
	$(DEMO) report --out runs/demo/report.html
	@echo ""
	@echo "Open runs/demo/report.html in a browser, or the live dashboard of this queue:"
	@echo "  make serve DB=$(DEMO_DB)    then http://127.0.0.1:8765/"

STUDY_CPU_DB := sqlite:///runs/study-cpu/queue.sqlite
STUDY_CPU    := $(PY) -m runner --db $(STUDY_CPU_DB)

# Not wiped first: run it again after a stop and it resumes where it stopped.
study-cpu: $(STAMP) ## the 60-job sweep at the cpu profile, 2 CPU workers (~1 hour on 2 cores)
	mkdir -p runs/study-cpu
	$(STUDY_CPU) plan --profile cpu --out-root runs/study-cpu
	$(STUDY_CPU) worker --gpu cpu --threads 1 >> runs/study-cpu/worker-1.log 2>&1 & \
	$(STUDY_CPU) worker --gpu cpu --threads 1 >> runs/study-cpu/worker-2.log 2>&1 & \
	wait
	$(STUDY_CPU) status
	$(STUDY_CPU) results
	$(STUDY_CPU) plot --out runs/study-cpu/sample_complexity.png
	$(STUDY_CPU) report --out runs/study-cpu/report.html
