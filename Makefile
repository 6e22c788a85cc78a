# nodekit developer commands. `make test` is the whole check; `make demo` the newcomer's tour.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nodekit-installed
DEMO_DIR ?= demo-data

.PHONY: install test lint typecheck pytest demo bench screenshot clean

$(STAMP): pyproject.toml
	@# (re)create the venv unless it has a working pip: a failed `venv` (no ensurepip) leaves a pip-less one
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"
	$(BIN)/python -m pip install --quiet -e . --group dev
	@touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check nodekit tests recipes benchmarks
	$(BIN)/ruff format --check nodekit tests recipes benchmarks
	$(BIN)/lint-imports --no-logo

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest -q

test: lint typecheck pytest

demo: install
	$(BIN)/python -m recipes.checkout --demo
	@printf '\n--- the same tour with the API down for 9 requests: the circuit breaker opens, a receipt falls back to the outbox, the second pass charges the rest once it half-opens\n\n'
	$(BIN)/python -m recipes.checkout --demo --outage 9 --quiet --data-dir $(DEMO_DIR)/outage

screenshot: install  # docs/run.png, the README's picture of a demo run (needs chromium)
	$(BIN)/python -m recipes._screenshot --out docs/run.png

bench: install
	$(BIN)/python -m pip install --quiet -e . --group bench
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .import_linter_cache
