# make run   installs everything and runs the relay (demo mode when there is no .env)
# make bench runs the benchmark (docs/benchmarks.md); about 20 minutes, installs LiteLLM into bench/.venv-litellm
# make test  installs everything the tests need (venv, system packages) and runs lint, types and tests
# make check lint, types and the fast in-process tests (tests/unit, no servers): under a minute
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run install test venv dev-venv system-deps lint check bench assets test-clients soak

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

venv: $(VENV)/.runtime
dev-venv: $(VENV)/.dev

# The chat page's bundle (npm packages pinned by proxy/web/package-lock.json, built by esbuild into the
# gitignored proxy/web/static/dist/); quick when up to date.
assets:
	scripts/build-web.sh

# The relay ready to serve, as a server installs it (README, "From a fresh VPS"): .venv with the pinned
# requirements and the chat page's bundle (needs npm). Run it again after `git pull`.
install: venv assets

run: venv
	scripts/build-web.sh || echo "make run: the chat page at / is not built (needs npm); the API works without it"
	$(BIN)/python -m proxy run

system-deps:
	scripts/install-system-deps.sh

# The real client programs the tests drive through the relay (the Codex CLI, pinned exactly by
# tests/clients/package-lock.json) into the gitignored tests/clients/node_modules/; quick when up to date.
test-clients:
	scripts/install-test-clients.sh

lint: dev-venv
	$(BIN)/ruff check .
	$(BIN)/mypy

# Most test files wait on real servers, not on the CPU: three at a time (pytest-xdist, one file per worker).
# The load and timing tests (marked serial: soak, capacity, fault matrix, client faults) then run alone.
test: dev-venv system-deps assets test-clients lint
	$(BIN)/pytest -n 3 --dist loadfile --no-loadscope-reorder -m "not serial"
	$(BIN)/pytest -n 2 --dist loadgroup -m serial

check: lint
	$(BIN)/pytest -q tests/unit

# The long soak (docs/reliability.md): 5 minutes of mixed traffic at 48 clients; make test runs a 12 s version.
soak: dev-venv
	SOAK_SECONDS=$${SOAK_SECONDS:-300} SOAK_CONCURRENCY=$${SOAK_CONCURRENCY:-48} $(BIN)/pytest -q -s tests/test_soak.py

$(VENV)/.bench: $(VENV)/.runtime bench/requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check -r bench/requirements.txt
	touch $@

bench: $(VENV)/.bench
	$(BIN)/python -m bench
