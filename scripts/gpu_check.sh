#!/usr/bin/env bash
# The one-shot GPU check: kernel tests on CUDA, the benchmarks, a short training run, all recorded with the
# device's name under bench/results/. Made to run in a single call on a lent H100/H200 (torch 2.11, triton 3.6,
# no DALI there): ~5-8 minutes. Usage: bash scripts/gpu_check.sh [quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
DEV=$(python -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>/dev/null)
SLUG=$(echo "$DEV" | tr -cs 'A-Za-z0-9' '-' | tr 'A-Z' 'a-z' | sed 's/-$//')
OUT=bench/results/$SLUG
mkdir -p "$OUT"
{
  echo "device: $DEV"; date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/env.txt"

# 1. kernels vs reference on CUDA (bf16 cases run here only)
timeout 240 python -m pytest -q -x tests/test_nce_kernel.py tests/test_block_kernel.py tests/test_fusion.py \
  2>&1 | tail -25 | tee "$OUT/kernel_tests.txt"

# 2. benchmarks: kernels vs eager vs torch.compile, image decode, train step (writes bench/results/<slug>.{json,md})
timeout 300 python -m pytest -q bench --benchmark-only --benchmark-columns=median,iqr,rounds \
  --benchmark-json="$OUT/benchmarks.json" 2>&1 | tail -60 | tee "$OUT/bench.txt"

# 3. a short training run, compiled and with AMP, on the synthetic data (masked-LM pre-training on CUDA too)
if [ "${1:-}" != "quick" ]; then
  timeout 180 python -m cmc_fast train --amp --compile --text-pretrain-epochs 2 --no-progress --out "$OUT/train-synthetic" \
    2>&1 | tail -20 | tee "$OUT/train.txt"
fi
echo "results in $OUT and bench/results/$SLUG.{json,md}"
