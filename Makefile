# Two commands on a fresh clone:  `make demo`  and  `make test`.
# Every install goes through constraints.txt (torch==2.13.0, the CPU wheel).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: demo test lint setup setup-dev bench compare

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
