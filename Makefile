# Quick start: `make demo` (train the demo model end to end) and `make test`.
# Both create .venv and install the project into it when missing.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTHON ?= python3
# Ray runs job entry points with the `python` on the PATH the cluster started with, and
# `mlflow models serve` starts uvicorn through the shell: the venv's bin goes first.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test lint clean

# Every package is byte-compiled at install, on all cores (pip compiles one file at a time:
# about half of its 4-minute install). Compiled they must be: where PYTHONDONTWRITEBYTECODE is
# set (this machine, 2026-12-02) no process ever writes a .pyc, and with pip's --no-compile
# alone every Ray worker compiled torch and Ray from source: make test went from 26 to 41 min.
# A few files are for newer Pythons (torch's py312_intrinsics.py) and fail, as pip skips them.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -e '.[dev]'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vaegan demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
