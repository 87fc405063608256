# Two commands on a fresh clone:  `make demo`  and  `make test`.
# Every install goes through constraints.txt (torch==2.13.0, the CPU wheel).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: demo test lint setup setup-dev bench compare gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(PIP) -e ".[torch]"

setup-dev: $(BIN)/python
	$(PIP) -e ".[dev]"

demo: setup
	$(BIN)/rprop demo

lint: setup-dev
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -n 2 --dist loadgroup

bench: setup-dev
	$(BIN)/python benchmarks/step_speed.py

compare: setup-dev
	$(BIN)/rprop compare --plot docs/compare.png

# On a machine with a GPU whose python3 already holds a CUDA torch and Triton
# (nothing installed, no venv): the CUDA tests, then the GPU benchmark.
gpu-check:
	PYTHONPATH=src $(PYTHON) -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_fused_kernel.py tests/test_parity_paths.py tests/test_compile.py -rs
	PYTHONPATH=src $(PYTHON) benchmarks/step_speed.py --device cuda
