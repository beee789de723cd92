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

# --no-compile: pip byte-compiles every module it installs, torch's and Ray's whole trees
# included: the install took 245 s with it and 116 s without (fresh venv, 2 cores, 2026-12-02).
# Python compiles the modules a process imports on first use instead: the first import of
# vaegan.train, Ray Train and MLflow took 8 s longer, once.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vaegan demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
