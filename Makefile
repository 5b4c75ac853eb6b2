# `make demo` and `make test` work as the first command on a fresh machine: they create the venv when missing.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.sdo-installed
# The exact versions for this machine (torch's local CPU build); the package itself declares ranges.
CONSTRAINTS ?= constraints/cpu.txt

.PHONY: demo test lint wheel-check bench train-zoo clean

# src/sdo/__init__.py holds the version, which the editable install records in its metadata.
$(STAMP): pyproject.toml $(CONSTRAINTS) src/sdo/__init__.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, held to the constraints: on the project's machines that is the local CPU build.
	$(BIN)/pip install -q -c $(CONSTRAINTS) torch
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sdo demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# 2 pytest-xdist workers, 1 torch thread each (tests/conftest.py); free workers take queued tests from busy ones.
	$(BIN)/pytest -n 2 --dist worksteal --durations=25

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Build the wheel, install it into a new venv beside this machine's torch, run `sdo` from there (docs/packaging.md).
wheel-check: $(STAMP)
	$(BIN)/python scripts/check_wheel.py --constraints $(CONSTRAINTS)

bench: $(STAMP)
	$(BIN)/sdo bench

train-zoo: $(STAMP)
	$(BIN)/sdo train-zoo

clean:
	rm -rf $(VENV) sdo-demo .pytest_cache .ruff_cache build dist
