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
