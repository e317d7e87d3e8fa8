# Two commands on a fresh machine: `make demo` and `make test`. Everything else is set up by these.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo demo-cpu up down test lint format bench-toy2d clean

# The venv is rebuilt whenever the dependency pins change. The constraints file pins torch==2.13.0
# (the CPU build; a bare `torch` pulls a multi-GB CUDA build) and every other package.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

# The service demo: starts S3, MLflow, Ray and the API on loopback, submits the rCM job over REST.
demo: $(STAMP)
	$(VENV)/bin/python scripts/demo.py

# The same distillation without the service (rcm_core only).
demo-cpu: $(STAMP)
	$(VENV)/bin/rcm demo

up: $(STAMP)
	$(VENV)/bin/python scripts/stack.py up

down:
	@test -x $(VENV)/bin/python && $(VENV)/bin/python scripts/stack.py down || true

test: $(STAMP)
	bash scripts/test.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench-toy2d: $(STAMP)
	$(VENV)/bin/rcm bench toy2d --out runs/bench-toy2d

clean:
	rm -rf runs .pytest_cache
