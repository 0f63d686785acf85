# Every target builds its own virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/jaxgen demo --out demo-out

lint: $(BIN)/.installed
	$(BIN)/ruff check jaxgen tests benchmarks
	$(BIN)/ruff format --check jaxgen tests benchmarks

test: lint
	$(BIN)/python -m pytest --doctest-modules jaxgen tests

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/dispersion.py
	$(BIN)/python benchmarks/gmp.py
	$(BIN)/python benchmarks/tracking.py
	$(BIN)/python benchmarks/methods.py --quick

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
