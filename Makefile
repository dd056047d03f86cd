# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint unit clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

## Run the receiver locally on the embedded default (valkey + SQLite under .bridgehook/).
run: $(VENV)/.installed
	$(BIN)/bridgehook dev

## Lint, type-check and run the whole test suite (REDIS_URL / DATABASE_URL if set).
test: $(VENV)/.installed lint
	$(BIN)/pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .bridgehook .pytest_cache .mypy_cache .ruff_cache .hypothesis
