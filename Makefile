# The two commands: `make serve` and `make test`. Both set everything up on a fresh machine. `make test-image`
# builds the CPU image and checks it from outside (it installs and starts a Docker engine when none runs).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8000
# `make serve` (and the `model` step before it) use ./data unless DATA_DIR is set: the same folder for both, so
# MODEL_NAME=x make serve finds ./data/models/x.
DATA_DIR := $(or $(DATA_DIR),./data)

.PHONY: setup llama-server model serve test test-tools test-image lint bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (found " + sys.version.split()[0] + ")")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	@touch $@

setup: $(STAMP)

# Find llama-server or build it once into ~/.cache/llama-gguf-inference (about 6 minutes on 2 cores).
llama-server: $(STAMP)
	@command -v cmake >/dev/null || test -x $(VENV)/bin/cmake || command -v llama-server >/dev/null \
		|| $(PY) -m pip install --disable-pip-version-check -q cmake
	$(PY) -m lifecycle.llama_server

model: $(STAMP)
	@DATA_DIR="$(DATA_DIR)" $(PY) -m lifecycle.model >/dev/null

serve: llama-server model
	@models=$$(DATA_DIR="$(DATA_DIR)" $(PY) -m lifecycle.model) && \
		echo "Serving $$(echo "$$models" | xargs -d '\n' -n1 basename | paste -sd ' ') on http://localhost:$(PORT)" \
			"(HTTP mode); Ctrl-C stops it."
	@echo "Try: curl http://localhost:$(PORT)/v1/chat/completions -H 'Content-Type: application/json' \\"
	@echo "       -d '{\"model\": \"any\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'"
	DATA_DIR="$(DATA_DIR)" AUTH_ENABLED=$${AUTH_ENABLED:-false} PORT=$(PORT) PATH="$(CURDIR)/$(VENV)/bin:$$PATH" \
		exec ./entrypoint.sh

lint: $(STAMP)
	$(PY) -m ruff check .

# The system tools the suite runs for real: redis-server (REDIS_URL tests), kubectl (the manifests' kustomize).
test-tools:
	@bash tests/tools/ensure.sh

test: test-tools llama-server model
	$(PY) -m ruff check .
	$(PY) -m pytest

# Build Dockerfile.cpu as llama-gguf-inference:cpu and check it as a user would (tests/image/).
test-image: $(STAMP)
	PY=$(PY) bash tests/image/run.sh

bench: llama-server model
	$(PY) bench/gateway_overhead.py
	$(PY) bench/stream_throughput.py
	$(PY) bench/models.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
