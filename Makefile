# Two commands on a fresh machine: `make test` and `make demo`.
# Both create .venv with Python 3.12 when it is missing (python3.12 on PATH,
# else pyenv's installed 3.12) and install pallax with the pinned versions.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test test-slow demo demo-faults bench lint format clean

$(PY):
	@py=$$(scripts/find_python312.sh) || exit 1; \
	echo "creating $(VENV) with $$py"; \
	"$$py" -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	HYPOTHESIS_PROFILE=thorough $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# The main job: train the tiny decoder on the shipped corpus (about two minutes on
# two cores), print a sample, write train.json.
demo: $(STAMP)
	$(PY) -m pallax.train --preset tiny --steps 1500 --batch 32 --json train.json

# Fault tolerance on 4 worker processes (2 replicas x 2 workers): an uninterrupted
# run, then the same run losing worker 2 and suffering a bit flip on worker 1,
# recovered from the intact replica with a cold restart, then again with a hot
# standby. Same final parameters (sha256) each time; recoveries and goodput printed.
# (Another process count may sum across processes in another order: compare like
# with like.)
FAULT_RUN := --preset tiny --steps 60 --batch 16 --seq-len 64 --sample-tokens 16 --quiet
demo-faults: $(STAMP)
	$(PY) -m pallax.train $(FAULT_RUN) --processes 4 --json faults_clean.json
	$(PY) -m pallax.train $(FAULT_RUN) --processes 4 --fault-tolerant --checkpoint-every 20 \
		--sdc-check --inject kill:worker=2,step=25 --inject bitflip:worker=1,step=40 \
		--json faults.json
	$(PY) -m pallax.train $(FAULT_RUN) --processes 4 --fault-tolerant --checkpoint-every 20 \
		--inject kill:worker=2,step=25 --hot-standby --json faults_hot.json

bench: $(STAMP)
	$(PY) -m pallax.bench --json bench.json --plot roofline.png

lint: $(STAMP)
	$(VENV)/bin/ruff check pallax tests
	$(VENV)/bin/ruff format --check pallax tests

format: $(STAMP)
	$(VENV)/bin/ruff check --fix pallax tests
	$(VENV)/bin/ruff format pallax tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks bench.json roofline.png train.json faults*.json
