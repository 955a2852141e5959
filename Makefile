# Two commands do everything from a fresh clone: `make demo` and `make test`
# (lint, types, the import contract and the whole suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint types contract unit browser redis upstreams bench soak chaos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sidecar demo

lint: $(STAMP)
	$(BIN)/ruff check sidecar tests bench
	$(BIN)/ruff format --check sidecar tests bench

types: $(STAMP)
	$(BIN)/mypy

# The import contract (import-linter, in pyproject.toml): the package's layers.
contract: $(STAMP)
	$(BIN)/lint-imports

# The status page test drives a real headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium from Debian's packages for the status page test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	    >/dev/null 2>&1 || echo "warning: could not install chromium; its test will be skipped"; }

# The fleet tests run replicas against a real redis-server (Debian's package),
# started on a free port in a temporary directory.
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server from Debian's packages for the fleet tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) \
	    >/dev/null 2>&1 || { echo "error: could not install redis-server (apt-get install redis-server)"; exit 1; }; }

# The conformance suite runs against the released servers, installed once
# into .cache/upstreams (gptme-server 0.31.0 and 0.35.1 from PyPI, opencode
# 1.18.33, its @opencode-ai/sdk and TypeScript from npm). A failed install
# stops here, naming the server.
upstreams: $(STAMP)
	$(BIN)/python -m tests.real.servers install

unit: $(STAMP) browser redis upstreams
	$(BIN)/python -m pytest -q -rxX

test: lint types contract unit

# Benchmarks print ratios against baselines measured in the same run. They
# need wrk and nginx (apt-get install -y wrk nginx), redis-server, and the
# released gptme-server 0.31.0 (installed as for the conformance suite).
bench: $(STAMP) redis upstreams
	$(BIN)/python bench/run.py
	$(BIN)/python bench/hits.py
	$(BIN)/python bench/fleet.py
	$(BIN)/python bench/gptme.py
	$(BIN)/python bench/lists.py
	$(BIN)/python bench/webhooks.py

# The fleet under faults (bench/chaos.py): a long seeded run against the fake
# upstream, then one against the released gptme-server 0.31.0. SEED=N
# reproduces a run.
SEED ?= 19
chaos: $(STAMP) redis upstreams
	$(BIN)/python bench/chaos.py --seed $(SEED) --duration 300
	$(BIN)/python bench/chaos.py --seed $(SEED) --duration 60 --upstream gptme

soak: $(STAMP)
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
