# imgbatch: the two commands a newcomer runs are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_PORT ?= 8765

.PHONY: venv demo test lint typecheck unit soak bench million clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,s3,test-s3,ray]'
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

# The randomized engine test (tests/test_engine_random.py) with many more schedules than the
# suite's 200: IMGBATCH_SOAK_EXAMPLES=N to change it. About 35 ms per schedule.
SOAK_EXAMPLES ?= 20000
soak: $(STAMP)
	IMGBATCH_SOAK_EXAMPLES=$(SOAK_EXAMPLES) $(VENV)/bin/pytest -q -p no:randomly \
		--hypothesis-show-statistics tests/test_engine_random.py
	IMGBATCH_SOAK_EXAMPLES=$(SOAK_EXAMPLES) $(VENV)/bin/pytest -q -p no:randomly \
		tests/test_storage_faults.py -k randomized
	IMGBATCH_SCENARIO_SEEDS=30 $(VENV)/bin/pytest -q -p no:randomly tests/test_congestion.py
	# issue 14's Done-when: 200 jobs into s3:// (moto), 30% faults, SIGKILL four times, resumed
	IMGBATCH_S3_CRASH_JOBS=200 IMGBATCH_S3_CRASH_KILLS=4 $(VENV)/bin/pytest -q -s -p no:randomly \
		tests/test_s3_crash.py
	IMGBATCH_SOAK_BATCH=1 $(VENV)/bin/pytest -q -p no:randomly tests/test_batch_gemini_e2e.py -k 500
	# issue 15: the node-removal test (in make test once) five more times, a fresh cluster each
	for i in 1 2 3 4 5; do $(VENV)/bin/pytest -q -p no:randomly tests/test_ray_cluster.py \
		-k node_removed || exit 1; done
	IMGBATCH_SOAK_BATCH=1 $(VENV)/bin/pytest -q -p no:randomly tests/test_batch_openai_e2e.py -k three_runs

# The benchmark's extras (openai for the peer script, psutil), installed once.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,s3,test-s3,ray,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) bench/run.py

# Issue 14's goal: validate and the resume plan of 1,000,000 jobs (990,000 done), each under
# 20 s and 250 MB. The first run writes its fixtures (990,000 tiny images, ~4 min) to
# bench/out/million, reused after. MILLION_BEFORE=path/to/a/checkout of main puts the figures
# side by side.
million: $(STAMP)
	$(PY) bench/million.py $(if $(MILLION_BEFORE),--before $(MILLION_BEFORE))

clean:
	rm -rf $(VENV) output/*/ .pytest_cache .mypy_cache .ruff_cache
