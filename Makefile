# kiln: two commands to start. `make demo` runs the main job on the embedded default corpus;
# `make test` runs the whole test suite (starting the real Slurm and Ray services it needs).
# Both create or reuse the virtual environment in $(VENV) with ordinary pip.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KILN := $(VENV)/bin/kiln
STAMP := $(VENV)/.kiln-installed
# On a machine without a GPU we install PyTorch's CPU build first (PyPI's Linux torch wheel is
# the multi-GB CUDA build): from the sources pip is configured with (a local wheel, a mirror)
# when they have it, else from PyTorch's CPU index. On a GPU host the CUDA build is kept.
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
# The suite runs in this many pytest-xdist workers; tests/conftest.py makes each module one unit
# of work (the Slurm and the Ray modules one each) and orders them. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile

.PHONY: install demo test test-fast lint format services bench gpu-bundle clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
		if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
		else $(PY) -m pip install -q "$(TORCH_CPU)" 2>/dev/null || { \
			echo "$(TORCH_CPU) is not on pip's configured index: trying $(TORCH_CPU_INDEX)"; \
			$(PY) -m pip install -q --index-url "$(TORCH_CPU_INDEX)" "$(TORCH_CPU)"; }; fi; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# The whole chain on this machine: stdlib -> tokenizer and shards -> a tiny decoder trained by
# 2 CPU ranks with DeepSpeed ZeRO-2 -> checkpoint, a sample, the W&B offline run -> plots.
demo: install
	$(KILN) data experiment=demo
	$(KILN) train experiment=demo
	$(KILN) report experiment=demo

services:
	bash scripts/install-services.sh

test: install services
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# Everything but the tests that need the Slurm and Ray services.
test-fast: install
	$(PY) -m pytest -m "not slurm and not ray and not slow" $(XDIST) $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The CPU benchmark suite (issue #9): each script replaces its own section of BENCHMARKS.md
# (machine, date, commit, every ratio with its target) and writes bench/results/NAME.json.
# About 20 minutes on 2 cores. The GPU script is `python bench/gpu.py` on an H100/H200.
bench: install
	$(PY) bench/data_pipeline.py --repeat 3
	$(PY) bench/loader.py --repeat 3
	$(PY) bench/trainer.py --repeat 3
	$(PY) bench/memory.py
	$(PY) bench/loss.py --compile
	$(PY) bench/checkpoint.py
	$(PY) bench/startup.py
	$(PY) bench/demo.py

# What bench/gpu.py needs on a GPU host with only PyTorch (hydra, omegaconf, torchao, stdlib
# shards, run.sh) in .gpu_bundle/: carry it with the repository, run `bash .gpu_bundle/run.sh`.
gpu-bundle: install
	$(PY) bench/gpu_bundle.py

clean:
	rm -rf $(VENV) runs outputs out .pytest_cache
