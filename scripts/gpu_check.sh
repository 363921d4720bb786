#!/usr/bin/env bash
# The GPU check: one command on any CUDA machine with an H100/H200 (torch, triton and torchvision installed):
#
#   bash scripts/gpu_check.sh                  # -> $OUT (default /tmp/cmc-gpu-check)
#   CMC_FAST_SHARED_DATA=DIR bash scripts/gpu_check.sh   # DIR/weibo holds the Weibo JPEGs for the image rows
#
# runs scripts/gpu_check.py (7-minute budget, every compile included; see its docstring for the sections) with
# the environment it needs. $OUT/gpu-results.json and .md are rewritten (atomically) after every measured row, so a
# run stopped early still keeps all that finished.
# Afterwards:  python scripts/gpu_results.py $OUT/gpu-results.json  (-> bench/results/<device>.json and .md).
# Without Weibo JPEGs (CMC_FAST_SHARED_DATA or ../shared/data) the image rows are reported owed.
#
# DALI on the GPU, where nvidia-dali-cuda130 is installed:  bash scripts/gpu_check.sh dali   -> $OUT/dali/
# Extra arguments go to gpu_check.py (e.g. --budget-s 300, --sections env,correctness).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET CMC_FAST_KERNELS  # compiled GPU kernels, dispatched as in training
OUT="${OUT:-/tmp/cmc-gpu-check}"

if [ "${1:-}" = dali ]; then
  shift
  exec python3 scripts/gpu_check.py --sections env,images --budget-s 240 --out "$OUT/dali" "$@"
fi
exec python3 scripts/gpu_check.py --out "$OUT" "$@"
