# latentforge: `make demo` runs the embedded default end to end; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/latentforge run experiments/quickstart.yaml

# the suite in TEST_WORKERS processes (pytest-xdist), each test module whole in one of them
# (its shared fixtures and Ray session); TEST_WORKERS=0 runs it in this process
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

# every benchmark with its defaults (timing.py is their shared helper); sweep_efficiency runs
# the smoke sweep here: pass experiments/sweeps/dim_frontier.yaml yourself for the full grid
bench: install
	for b in $(filter-out benchmarks/timing.py,$(wildcard benchmarks/*.py)); do \
		$(BIN)/python $$b || exit 1; done

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: install
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
