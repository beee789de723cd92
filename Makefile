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

# pip byte-compiles what it installs (about half of the 4-minute install): keep it. With
# --no-compile the install took 116 s instead of 245, but where PYTHONDONTWRITEBYTECODE is set
# (this machine, 2026-12-02) no process ever writes a .pyc, so every Ray worker compiled torch
# and Ray from source: make test went from 26 to 41 minutes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vaegan demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
