"""BLOCK merge benchmarks: ``pytest bench/bench_block.py --benchmark-only``.

Providers, all computing the same merge (x0, x1 [B, mm] -> [B, mm], per-chunk products, rank sum, signed sqrt,
per-chunk L2 norm) from the same weights:
  loop         block.bootstrap.pytorch's eager loop over chunks, per-chunk weight tensors (what the original runs).
  compile      ``torch.compile`` (default mode, static shapes) of ``loop``.
  bmm          ``kernels.reference.block_merge_bmm``: runs of one chunk size as two ``baddbmm`` each over views of
               the flat weights (no padding), eager. The dispatch's bmm candidate itself.
  bmm-compile  ``torch.compile`` of ``bmm``.
  fused        ``ops.block_merge`` with the fused Triton kernels forced (``CMC_FAST_KERNELS=triton``); CUDA only
               (the interpreter is far too slow to time).
  auto         ``ops.block_merge`` as a caller gets it: ``choose_block_path``'s pick (recorded as ``path``);
               CUDA only (on a CPU it is the reference).
On a CPU only ``loop`` and ``bmm`` run by default (one thread, ``CMC_BENCH_CPU_THREADS``); the compiled providers
with ``CMC_BENCH_CPU_COMPILE=1`` (Inductor's C++ build takes ~90 s per shape on a 2-core CPU).
Modes: ``fwd`` (the training forward, autograd recording) and ``fwd+bwd`` (forward and ``autograd.grad`` of the
output for x0, x1 and all weights and biases; no ``.grad`` accumulation, so no provider pays per-leaf adds).
Shapes: (mm_dim, chunks, rank) = (1600, 20, 15) (BLOCK's default) and (256, 18, 15) (the CMC authors'); B in {64,
256} on a GPU, 64 on a CPU. dtypes: float32 at float32 matmul precision "highest" (``float32``) and "high"
(``float32-tf32``), bfloat16; a CPU runs ``float32`` only.

Floor beside each row: ``kernels.block.block_merge_floor`` for the GPU the row ran on (H200 when the device name says
so, else H100 SXM) at the row's dtype and precision. On a CPU the floor column stays empty (the H100 floor is kept
as ``gpu_floor_s``, a reference point, not this CPU's).

GPU timing: each round runs ``INNER`` calls back to back and synchronises once at its end (the counter in
``_timed``), so per-call figures carry no per-call synchronisation.
"""

from __future__ import annotations

import os

import pytest
import torch
from cmc_fast.kernels.block_plan import block_merge_floor, choose_block_path
from cmc_fast.kernels.gpus import gpu_name
from cmc_fast.kernels.reference import block_chunk_sizes

from cmc_fast.benchmark import bench_device, block_case, matmul_precision, peak_bytes

DEVICE = bench_device()
ON_GPU = DEVICE.type == "cuda"
CONFIGS = [(1600, 20, 15), (256, 18, 15)]
BATCHES = [64, 256] if ON_GPU else [64]
# (dtype, float32 matmul precision)
DTYPES = {"float32": (torch.float32, "highest"), "float32-tf32": (torch.float32, "high"),
          "bfloat16": (torch.bfloat16, "highest")}
DTYPE_IDS = list(DTYPES) if ON_GPU else ["float32"]
PROVIDERS = ["loop", "compile", "bmm", "bmm-compile", "fused", "auto"]
GPU_ONLY = {"fused", "auto"}
COMPILED = {"compile", "bmm-compile"}
INNER = 10 if ON_GPU else 1
ROUNDS = 20 if ON_GPU else 5


# ---------------------------------------------------------------------------------------- providers
_COMPILED = {}


def compiled(name: str, fn):
    """One compiled function per provider, specialised per shape and dtype (dynamic=False: compile's best case)."""
    if name not in _COMPILED:
        for limit in ("recompile_limit", "cache_size_limit"):  # one entry per (shape, dtype, mode)
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


# ------------------------------------------------------------------------------------------- inputs
def make_case(provider: str, batch: int, sizes: list[int], rank: int, dtype: torch.dtype):
    """``cmc_fast.benchmark.block_case``; ``compile``/``bmm-compile`` compile the loop's or bmm's function."""
    base = {"compile": "loop", "bmm-compile": "bmm"}.get(provider, provider)
    wrap = compiled if provider in COMPILED else (lambda name, fn: fn)
    return block_case(base, batch, sizes, rank, dtype, DEVICE, wrap)


def _timed(fn, inner: int):
    """Call ``fn``; on CUDA synchronise after every ``inner``-th call (the last of a pedantic round)."""
    if not ON_GPU:
        return fn
    count = [0]

    def run():
        fn()
        count[0] += 1
        if count[0] % inner == 0:
            torch.cuda.synchronize()

    return run


# ------------------------------------------------------------------------------------------- benchmark
@pytest.fixture(autouse=True)
def _cpu_threads():
    """On a CPU, time with CMC_BENCH_CPU_THREADS threads (default 1), restored afterwards: on this project's shared
    2-core machines, two OpenMP threads competing with other processes ran 10-300x slower and unstably (spin-waits);
    one thread gives repeatable numbers for every provider alike."""
    if ON_GPU:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("CMC_BENCH_CPU_THREADS", "1")))
    yield
    torch.set_num_threads(before)


def _skip_reason(provider: str) -> str | None:
    if provider in GPU_ONLY and not ON_GPU:
        return "Triton and the dispatch are timed on a GPU only (on a CPU block_merge is the reference)"
    if provider in COMPILED and not ON_GPU and os.environ.get("CMC_BENCH_CPU_COMPILE", "0") in ("", "0"):
        return "torch.compile on CPU takes ~90 s per shape to build; set CMC_BENCH_CPU_COMPILE=1"
    return None


@pytest.mark.parametrize("dtype_id", DTYPE_IDS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "mm{}-c{}-r{}".format(*c))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_block_merge(benchmark, record, monkeypatch, provider, mode, config, batch, dtype_id):
    reason = _skip_reason(provider)
    if reason:
        pytest.skip(reason)
    dtype, precision = DTYPES[dtype_id]
    monkeypatch.setenv("CMC_FAST_KERNELS", "triton" if provider == "fused" else "auto")
    with matmul_precision(precision):
        _run(benchmark, record, provider, mode, config, batch, dtype, precision, dtype_id)


def _run(benchmark, record, provider, mode, config, batch, dtype, precision, dtype_id):
    mm, chunks, rank = config
    sizes = block_chunk_sizes(mm, chunks)
    fn, leaves, grad = make_case(provider, batch, sizes, rank, dtype)

    if mode == "fwd":
        op = fn
    else:
        def op():
            torch.autograd.grad(fn(), leaves, grad)

    for _ in range(2):  # compile, autotune caches, allocator
        op()
    peak = peak_bytes(op, DEVICE)
    if ON_GPU:
        torch.cuda.synchronize()
    benchmark.pedantic(_timed(op, INNER), rounds=ROUNDS, iterations=INNER, warmup_rounds=1 if ON_GPU else 0)
    gpu = gpu_name(DEVICE)
    floor = block_merge_floor(batch, sizes, rank, dtype=dtype, precision=precision, gpu=gpu, backward=mode != "fwd")
    extra = {"path": choose_block_path(sizes, rank, batch, dtype, DEVICE)} if provider == "auto" else {}
    record(benchmark, group=f"block_merge {mode} mm={mm} chunks={chunks} rank={rank} B={batch} {dtype_id}",
           provider=provider, floor_s=floor, peak_bytes=peak, floor_gpu=gpu, **extra)
