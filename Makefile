# Two commands set up a fresh machine:
#   make demo   create .venv, install fedguard, run the main job on built-in data
#   make test   create .venv, install fedguard, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedguard-installed
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: demo test test-fast lint typecheck bench clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "fedguard needs Python 3.11; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[data,dev,edge,explain,sources]"
	# Test-only reference for the robust rules; --no-deps: its torchvision pin would
	# replace the CPU torch (only byzfl.aggregators is imported, which needs neither).
	$(BIN)/pip install --quiet --no-deps byzfl==0.0.11
	@$(BIN)/python -c 'import torch; v = torch.__version__; assert v.startswith("2.13.0"), v'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedguard simulate --run-name demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(BIN)/ruff check fedguard tests benchmarks
	$(BIN)/mypy
	# The fast tier first (a failure shows in seconds), then the slow tier: engine,
	# deployment, fault, fresh-venv and whole-run tests. `make test-fast` runs only the first.
	$(BIN)/pytest -q -n 2 --dist loadfile -m "not slow"
	$(BIN)/pytest -q -n 2 --dist loadfile -m slow

test-fast: $(STAMP)
	$(BIN)/pytest -q -n 2 --dist loadfile -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check fedguard tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/dp_sgd.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
