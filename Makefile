# Two commands do everything from nothing: `make run` and `make test`.
VENV ?= .venv
# The interpreter the venv is made from. Its build matters for speed: e.g.
# `make bench PYTHON=/usr/bin/python3.11 VENV=.venv-system` (docs/benchmarks.md).
PYTHON ?= python3
BIN := $(VENV)/bin
UV_VERSION := 0.13.9

.PHONY: run test setup lint bench clean

$(VENV)/.synced: pyproject.toml uv.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install --quiet "uv==$(UV_VERSION)"
	UV_PROJECT_ENVIRONMENT=$(VENV) $(BIN)/uv sync --frozen --inexact --quiet
	touch $@

setup: $(VENV)/.synced

# The main job: migrate, declare, run the ingress and two workers (see `fulfillment up --help`).
run: setup
	$(BIN)/fulfillment up

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: setup
	$(BIN)/python ops/bench_ingress.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
