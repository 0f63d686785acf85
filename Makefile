# Every target builds its own virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint docs bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,docs]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/jaxgen demo --out demo-out

lint: $(BIN)/.installed
	$(BIN)/ruff check jaxgen tests benchmarks docs/conf.py _jaxgen_launcher.py
	$(BIN)/ruff format --check jaxgen tests benchmarks docs/conf.py _jaxgen_launcher.py

# Two workers (pytest-xdist); the docs site builds beside them (tests/conftest.py).
test: lint
	$(BIN)/python -m pytest -n 2 --dist worksteal --durations=15 --doctest-modules jaxgen tests

docs: $(BIN)/.installed
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/dispersion.py
	$(BIN)/python benchmarks/clipping.py
	$(BIN)/python benchmarks/gmp.py
	$(BIN)/python benchmarks/tracking.py
	$(BIN)/python benchmarks/methods.py --quick

clean:
	rm -rf $(VENV) demo-out docs/_build .pytest_cache .ruff_cache
