"""BLOCK merge benchmarks: ``pytest bench/test_block.py --benchmark-only``.

Providers, all computing the same merge (x0, x1 [B, mm] -> [B, mm], per-chunk products, rank sum, signed sqrt,
per-chunk L2 norm) from the same weights in their natural storage:
  triton   ``kernels.block_merge`` (the torch.library op; fused Triton kernels), flat stacked weights; CUDA only
           (the interpreter is far too slow to time).
  loop     block.bootstrap.pytorch's eager loop over chunks, per-chunk weight tensors (what the original runs).
  bmm      batched PyTorch: chunks padded to the largest and stacked, two ``baddbmm`` for all chunks at once.
  compile  ``torch.compile`` (default mode, static shapes) of ``loop``; on CPU only with ``CMC_BENCH_CPU_COMPILE=1``
           (Inductor's C++ build of the 20-chunk forward and backward takes ~90 s per shape on a 2-core CPU).
CPU runs use one thread (``CMC_BENCH_CPU_THREADS``; see ``_cpu_threads``).
Modes: ``fwd`` (the training forward, autograd recording) and ``fwd+bwd`` (forward and ``autograd.grad`` of the
output for x0, x1 and all weights and biases; no ``.grad`` accumulation, so no provider pays per-leaf adds).
Shapes: (mm_dim, chunks, rank) = (1600, 20, 15) (BLOCK's default) and (256, 18, 15) (the CMC authors'); B in
{32, 64, 256} on a GPU, 64 on a CPU. dtypes: float32, plus bfloat16 on a GPU.

Floor beside each row (``kernels.block.block_merge_floor``; H100 SXM assumed: 3.35e12 B/s, 60e12 FLOP/s fp32 without
tensor cores, 495e12 FLOP/s bf16): max(FLOPs / rate, bytes / bandwidth) with FLOPs = 4 B R sum(s^2) forward and 3x
that forward+backward. On a CPU the floor column still shows the H100 floor (a reference point, not this CPU's).

GPU timing: each round runs ``INNER`` calls back to back and synchronises once at its end (the counter in
``_timed``), so per-call figures carry no per-call synchronisation.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from cmc_fast.kernels.block import block_merge, block_merge_floor
from cmc_fast.kernels.reference import block_chunk_sizes
from conftest import bench_device, peak_memory

DEVICE = bench_device()
ON_GPU = DEVICE.type == "cuda"
CONFIGS = [(1600, 20, 15), (256, 18, 15)]
BATCHES = [32, 64, 256] if ON_GPU else [64]
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]
PROVIDERS = ["triton", "loop", "bmm", "compile"]
INNER = 10 if ON_GPU else 1
ROUNDS = 20 if ON_GPU else 5
FLOPS = {torch.float32: 60e12, torch.bfloat16: 495e12}


# ---------------------------------------------------------------------------------------- providers
def loop_merge(x0, x1, ws0, bs0, ws1, bs1, rank: int):
    """block.bootstrap.pytorch's Block.forward merge, verbatim in substance."""
    zs, begin = [], 0
    for w0, b0, w1, b1 in zip(ws0, bs0, ws1, bs1):
        s = w0.shape[1]
        m = F.linear(x0.narrow(1, begin, s), w0, b0) * F.linear(x1.narrow(1, begin, s), w1, b1)
        z = torch.sum(m.view(m.shape[0], rank, s), 1)
        z = torch.sqrt(F.relu(z)) - torch.sqrt(F.relu(-z))
        zs.append(F.normalize(z, p=2))
        begin += s
    return torch.cat(zs, 1)


def bmm_merge(x0, x1, w0p, b0p, w1p, b1p, rank: int):
    """All chunks at once: chunks padded to S = max size (only the last is shorter: padding at the end of x),
    weights stored padded [C, R*S, S] (zeros in the padding, which get zero gradients)."""
    n, mm = x0.shape
    chunks, size = w0p.shape[0], w0p.shape[2]
    pad = chunks * size - mm

    def side(x, w, b):
        xp = F.pad(x, (0, pad)).view(n, chunks, size).transpose(0, 1)  # [C, B, S]
        return torch.baddbmm(b.unsqueeze(1), xp, w.transpose(1, 2))  # [C, B, R*S]

    z = (side(x0, w0p, b0p) * side(x1, w1p, b1p)).view(chunks, n, rank, size).sum(2)
    z = torch.sqrt(F.relu(z)) - torch.sqrt(F.relu(-z))
    z = F.normalize(z, p=2, dim=2)
    return z.transpose(0, 1).reshape(n, chunks * size)[:, :mm]


_COMPILED = {}


def compiled_loop():
    """One compiled function, specialised per shape and dtype (dynamic=False: the best case for compile)."""
    if "loop" not in _COMPILED:
        for name in ("recompile_limit", "cache_size_limit"):  # one entry per (shape, dtype, mode): 24 on a GPU
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        _COMPILED["loop"] = torch.compile(loop_merge, dynamic=False)
    return _COMPILED["loop"]


# ------------------------------------------------------------------------------------------- inputs
def make_case(provider: str, batch: int, sizes: list[int], rank: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    mm = sum(sizes)
    x0, x1 = (torch.randn(batch, mm, generator=gen) for _ in range(2))
    ws = [[torch.randn(rank * s, s, generator=gen) * s ** -0.5 for s in sizes] for _ in range(2)]
    bs = [[0.1 * torch.randn(rank * s, generator=gen) for s in sizes] for _ in range(2)]
    grad = torch.randn(batch, mm, generator=gen)

    def leaf(t):
        return t.to(DEVICE, dtype).requires_grad_()

    xs = [leaf(x0), leaf(x1)]
    if provider in ("loop", "compile"):
        params = [[leaf(t) for t in group] for group in (ws[0], bs[0], ws[1], bs[1])]
        fn = compiled_loop() if provider == "compile" else loop_merge
        leaves = xs + [t for group in params for t in group]
        return (lambda: fn(*xs, *params, rank)), leaves, grad.to(DEVICE, dtype)
    if provider == "bmm":
        size = max(sizes)
        padded = []
        for w_list, b_list in ((ws[0], bs[0]), (ws[1], bs[1])):
            wp = torch.zeros(len(sizes), rank, size, size)
            bp = torch.zeros(len(sizes), rank, size)
            for c, (w, b) in enumerate(zip(w_list, b_list)):
                s = w.shape[1]
                wp[c, :, :s, :s] = w.view(rank, s, s)
                bp[c, :, :s] = b.view(rank, s)
            padded += [leaf(wp.view(len(sizes), rank * size, size)), leaf(bp.view(len(sizes), rank * size))]
        return (lambda: bmm_merge(*xs, *padded, rank)), xs + padded, grad.to(DEVICE, dtype)
    flat = [leaf(torch.cat([t.reshape(-1) for t in group])) for group in (ws[0], bs[0], ws[1], bs[1])]
    return (lambda: block_merge(*xs, *flat, sizes=sizes, rank=rank)), xs + flat, grad.to(DEVICE, dtype)


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


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "mm{}-c{}-r{}".format(*c))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_block_merge(benchmark, record, provider, mode, config, batch, dtype):
    if provider == "triton" and not ON_GPU:
        pytest.skip("Triton is timed on a GPU only (the CPU interpreter is not a benchmark)")
    if provider == "compile" and not ON_GPU and os.environ.get("CMC_BENCH_CPU_COMPILE", "0") in ("", "0"):
        pytest.skip("torch.compile on CPU takes ~90 s per shape to build; set CMC_BENCH_CPU_COMPILE=1")
    if dtype == torch.bfloat16 and batch != 64:
        pytest.skip("bfloat16 at B=64 only")
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
    peak = peak_memory(op, DEVICE)
    if ON_GPU:
        torch.cuda.synchronize()
    benchmark.pedantic(_timed(op, INNER), rounds=ROUNDS, iterations=INNER, warmup_rounds=1 if ON_GPU else 0)
    floor = block_merge_floor(batch, sizes, rank, x_bytes=dtype.itemsize, w_bytes=dtype.itemsize,
                              backward=mode != "fwd", flops_per_s=FLOPS[dtype])
    record(benchmark, group=f"block_merge {mode} mm={mm} chunks={chunks} rank={rank} B={batch} {dtype}",
           provider=provider, floor_s=floor, peak_bytes=peak)
