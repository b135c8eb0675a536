# Two commands do everything from nothing: `make run` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9

.PHONY: run test setup lint bench clean

$(VENV)/.synced: pyproject.toml uv.lock
	test -x $(BIN)/python || python3 -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install --quiet "uv==$(UV_VERSION)"
	UV_PROJECT_ENVIRONMENT=$(VENV) $(BIN)/uv sync --frozen --inexact --quiet
	touch $@

setup: $(VENV)/.synced

# The main job. Without STRIPE_WEBHOOK_SECRETS a throwaway local secret is made and printed.
run: setup
	@if [ -z "$$STRIPE_WEBHOOK_SECRETS" ]; then \
	  STRIPE_WEBHOOK_SECRETS=whsec_local$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(16))'); \
	  echo "No STRIPE_WEBHOOK_SECRETS set: using a local one for this run: $$STRIPE_WEBHOOK_SECRETS"; \
	  export STRIPE_WEBHOOK_SECRETS; \
	fi; \
	exec $(BIN)/fulfillment ingress

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
