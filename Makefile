# Two commands set everything up on a fresh machine:
#   make demo   serve a small MoE transformer through the paged cache (CPU by default)
#   make test   lint (ruff), the conformance suite (every built backend) + the newest-jax smoke test
# Both create their virtual environments themselves.

SHELL := /bin/bash
JAX_PINNED := 0.11.2
VENV := .venv
VENV_NEWEST := .venv-newest
PY := $(VENV)/bin/python
# Backends the conformance suite runs on this machine (kernels under their interpreters).
BACKENDS ?= xla,triton,mosaic,metal
PYTEST_WORKERS ?= 2

# JAX >= 0.11 needs Python >= 3.12; the machine's python3 may be older, so look for one.
PYTHON312 := $(shell for p in python3.12 $$(ls -d $$HOME/.pyenv/versions/3.12*/bin/python3 /root/.pyenv/versions/3.12*/bin/python3 2>/dev/null | sort -rV) \
	  python3.13 $$(ls -d $$HOME/.pyenv/versions/3.1[3-9]*/bin/python3 /root/.pyenv/versions/3.1[3-9]*/bin/python3 2>/dev/null | sort -rV) python3; do \
	  if $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then echo $$p; break; fi; done)

.PHONY: demo test lint format test-pinned test-newest gpu-test bench bench-zoo clean venv

$(VENV)/.installed: pyproject.toml Makefile
	@test -n "$(PYTHON312)" || { echo "error: no Python >= 3.12 found (install one, e.g. with pyenv)"; exit 1; }
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]" "jax==$(JAX_PINNED)" "jaxlib==$(JAX_PINNED)"
	touch $@

venv: $(VENV)/.installed

$(VENV_NEWEST)/.installed: pyproject.toml Makefile
	$(PYTHON312) -m venv $(VENV_NEWEST)
	$(VENV_NEWEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_NEWEST)/bin/python -m pip install -q --upgrade -e ".[test]" jax jaxlib
	touch $@

demo: $(VENV)/.installed
	$(PY) -m examples.serve_demo

test: lint test-pinned test-newest

# ruff: lint rules and the formatter's 4-space style (config in pyproject.toml).
lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.installed
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test-pinned: $(VENV)/.installed
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --backends=$(BACKENDS) tests

# The newest jax release: the xla backend's conformance suite and the public examples.
test-newest: $(VENV_NEWEST)/.installed
	@$(VENV_NEWEST)/bin/python -c 'import jax; print("newest jax:", jax.__version__)'
	$(VENV_NEWEST)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --backends=xla \
	  tests/test_attention.py tests/test_cache.py tests/test_moe.py tests/test_validation.py

# On an NVIDIA GPU machine with jax installed: the suite on the real lowerings (the Metal
# emulator and the CPU benchmark smoke test belong to `make test`).
# The fuzzer runs 500 random serving batches per backend here (50 in `make test`).
gpu-test:
	JPA_FUZZ_CASES=500 python3 -m pytest -q -n 6 -rs --backends=xla,triton,mosaic tests \
	  --ignore=tests/test_metal_kernels.py --ignore=tests/test_metal_lowering.py \
	  --ignore=tests/test_metal_sanitizers.py --ignore=tests/test_metal_selftest.py \
	  --ignore=tests/test_benchmarks_smoke.py

bench:
	python3 -m benchmarks.run

# The model zoo: attention layers of 11 models (benchmarks/zoo_models.py), every entry point.
bench-zoo:
	$(PY) -m benchmarks.zoo --json benchmarks/results/zoo.json --plot benchmarks/results/zoo.png

clean:
	rm -rf $(VENV) $(VENV_NEWEST) .pytest_cache .hypothesis metal_plugin/_build
