# FlowKV: `make up` serves SmolLM2 on CPU, `make test` runs the tests. Both set up .venv first.
# Pass flags through ARGS, e.g. `make up ARGS="--prefill-nodes 2 --port 8080"`.

VENV ?= .venv
PY := $(VENV)/bin/python
VLLM_VENV ?= .venv-vllm-node
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help setup setup-vllm up test bench config-doc clean

help:
	@echo "make up      set up .venv and run a cluster (embedded NATS, scheduler, gateway, 1P + 1D) on :8000"
	@echo "make test    set up .venv and $(VLLM_VENV) (vLLM nodes), run the test suite, then tests/vllm with vLLM"
	@echo "make bench   set up .venv, start a cluster, benchmark it, stop it (flowkv bench --launch; ARGS replace --launch)"
	@echo "make clean   remove .venv and build outputs"

setup:
	@bash scripts/setup.sh

setup-vllm:
	@FLOWKV_VLLM_VENV=$(VLLM_VENV) bash scripts/setup.sh --vllm

up: setup
	$(VENV)/bin/flowkv up $(ARGS)

test: setup setup-vllm
	$(PY) -m pytest -q --ignore=tests/vllm $(PYTEST_ARGS)
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm tests/engine/test_engine_protocol.py $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/flowkv bench $(if $(ARGS),$(ARGS),--launch)

config-doc: setup
	$(PY) scripts/gen_config_doc.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist *.egg-info .pytest_cache bench-results
	find . -name __pycache__ -type d -prune -not -path "./.git/*" -exec rm -rf {} +
