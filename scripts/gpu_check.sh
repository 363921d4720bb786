#!/usr/bin/env bash
# The GPU checks, in phases, on a lent H100/H200 (torch 2.11, triton 3.6, Python 3.12, no DALI there):
#   kernels  NCE/BLOCK kernel and fusion tests on CUDA (bf16 cases run on CUDA only)      ~1-3 min
#   bench    kernels vs eager vs torch.compile, train step (pytest bench, images aside)   ~2-4 min
#   train    a short --amp --compile synthetic run, masked-LM pre-training included        ~1-2 min
#   images   DALI/torchvision GPU decode vs the PIL DataLoader on the 268 Weibo JPEGs,
#            and the CUDA image tests (installs the staged DALI bundle when complete)    ~1 min
# Usage: bash scripts/gpu_check.sh [PHASE[,PHASE...]|all]   (default all; "none" only collects)
# One call can run all of it without DALI; with DALI, `python scripts/gpu_stage.py stage` here first, then make
# the calls `python scripts/gpu_stage.py plan` prints (one bundle part per call, a phase in each).
# Results accumulate in /tmp/cmc-gpu-results on the machine (kept while it stays warm) and every call returns
# all of them as $OUT/gpu-results.tar.gz: `tar -xzf gpu-results.tar.gz` in the repo root puts them under
# bench/results/<device>/ and bench/results/<device>.{json,md}.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PHASES=",${1:-all},"
want() { [[ "$PHASES" == *",all,"* || "$PHASES" == *",$1,"* ]]; }

STORE=/tmp/cmc-gpu-results
DEV=$(python3 -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')")
SLUG=$(echo "$DEV" | tr -cs 'A-Za-z0-9' '-' | tr 'A-Z' 'a-z' | sed 's/-$//')
RES=$STORE/bench/results/$SLUG
mkdir -p "$RES"
export CMC_FAST_BENCH_RESULTS=$STORE/bench/results
[ -d .gpu_carry/weibo ] && export CMC_FAST_SHARED_DATA=$PWD/.gpu_carry
{
  echo "device: $DEV"; date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import sys, torch, triton, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'torchvision', torchvision.__version__)"
  echo "cores: $(nproc); real data: ${CMC_FAST_SHARED_DATA:-none}"
} > "$RES/env.txt"
cat "$RES/env.txt"
[ "$DEV" = cpu ] && echo "WARNING: no CUDA device: these are not GPU figures"

# after every phase, so a call stopped at its time limit still returns what the finished phases wrote
collect() {
  if [ -n "${OUT:-}" ]; then
    tar -czf "$OUT/gpu-results.tar.gz" -C "$STORE" bench && echo "returned: gpu-results.tar.gz ($(ls "$RES" | wc -l) files)"
  else
    echo "results in $STORE/bench/results (copy them into the repo's bench/results)"
  fi
}
collect

if want kernels; then
  timeout 240 python3 -m pytest -q -x tests/test_nce_kernel.py tests/test_block_kernel.py tests/test_fusion.py \
    2>&1 | tail -25 | tee "$RES/kernel_tests.txt"
  collect
fi
if want bench; then
  timeout 300 python3 -m pytest -q bench --ignore=bench/bench_images.py --benchmark-only \
    --benchmark-columns=median,iqr,rounds --benchmark-json="$RES/benchmarks.json" 2>&1 | tail -60 | tee "$RES/bench.txt"
  collect
fi
if want train; then
  timeout 240 python3 -m cmc_fast train --amp --compile --text-pretrain-epochs 2 --no-progress \
    --out "$STORE/train-synthetic" 2>&1 | tail -25 | tee "$RES/train.txt"
  cp "$STORE"/train-synthetic/*.{json,md} "$RES/" 2>/dev/null
  collect
fi
if want images; then
  python3 scripts/gpu_stage.py install 2>&1 | tee "$RES/dali_install.txt"
  python3 -c "import nvidia.dali" 2>/dev/null || echo "DALI not importable: the DALI-GPU figure is owed" \
    | tee -a "$RES/dali_install.txt"
  timeout 180 python3 -m pytest -q -s bench/bench_images.py --benchmark-only --benchmark-columns=median,rounds \
    --benchmark-json="$RES/bench_images.json" 2>&1 | grep -v "^$" | tail -40 | tee "$RES/bench_images.txt"
  collect
  timeout 120 python3 -m pytest -q -rs -s tests/test_images.py -k "gpu or cuda or real_weibo" \
    2>&1 | tail -20 | tee "$RES/image_tests.txt"
  collect
fi

