# Two commands on a fresh machine: `make demo` and `make test`. Everything else is set up on the way.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)

.PHONY: demo test lint typecheck unit e2e bench gpu-check clean venv

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

test: lint typecheck
	$(BIN)/python -m pytest -m "not gpu" -q

unit: venv
	$(BIN)/python -m pytest -q tests/test_config.py tests/test_protocol.py tests/test_planner.py tests/test_hook.py

lint: venv
	$(BIN)/ruff check sidecar runtime_hooks tests

typecheck: venv
	$(BIN)/mypy sidecar runtime_hooks

bench: venv
	$(BIN)/python -m sidecar.bench

# On a GPU machine (or via the device tool): see tests/gpu/README.md
gpu-check:
	bash tests/gpu/run_device.sh

clean:
	rm -rf $(VENV) .demo .bench .pytest_cache .mypy_cache .ruff_cache
