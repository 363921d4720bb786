#!/usr/bin/env bash
# The GPU check: ONE command on a lent H100/H200 (torch, triton, torchvision there; no DALI, no network):
#
#   device run: command="bash scripts/gpu_check.sh", carry=[".gpu_carry/weibo"], timeout_s=540
#
# runs scripts/gpu_check.py (7-minute budget, every compile included; see its docstring for the sections) with
# the environment it needs. Every result is a JSON line in $OUT/gpu-results.jsonl, flushed as it is measured, and
# $OUT/gpu-results.md is rewritten after every section, so a call stopped at its limit still returns all that
# finished. Here, afterwards:  python scripts/gpu_results.py <where the files came back>/gpu-results.jsonl
# (-> bench/results/<device>.json, .md and -gpu-check.md). `.gpu_carry/weibo` (the Weibo JPEGs for the image
# rows) is made by `python scripts/gpu_stage.py stage --no-dali`; without it the image rows are reported owed.
#
# Optional second command, DALI on the GPU (its wheel is staged in parts by scripts/gpu_stage.py, one part a call;
# `python scripts/gpu_stage.py plan` prints the calls):  bash scripts/gpu_check.sh dali   -> $OUT/dali/
# Extra arguments go to gpu_check.py (e.g. --budget-s 300, --sections env,correctness).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET CMC_FAST_KERNELS  # compiled GPU kernels, dispatched as in training
[ -d .gpu_carry/weibo ] && export CMC_FAST_SHARED_DATA="$PWD/.gpu_carry"
OUT="${OUT:-/tmp/cmc-gpu-check}"

if [ "${1:-}" = dali ]; then
  shift
  python3 scripts/gpu_stage.py install || echo "DALI bundle not installed here: the DALI-GPU rows stay owed"
  exec python3 scripts/gpu_check.py --sections env,images --budget-s 240 --out "$OUT/dali" "$@"
fi
exec python3 scripts/gpu_check.py --out "$OUT" "$@"
