# imgbatch: the two commands a newcomer runs are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_PORT ?= 8765

.PHONY: venv demo test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Starts the simulator on a free port, runs jobs/example.yaml against it,
# leaves images and results under output/example/.
demo: $(STAMP)
	$(PY) scripts/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check batch tests bench scripts

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict batch

unit: $(STAMP)
	$(VENV)/bin/pytest -q

test: lint typecheck unit

# The benchmark's extras (openai for the peer script, psutil), installed once.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) output/*/ .pytest_cache .mypy_cache .ruff_cache
