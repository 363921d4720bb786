"""NCE loss forward+backward: fused Triton kernel vs eager reference vs torch.compile of the reference (default and
max-autotune).

Run with ``pytest bench --benchmark-only``. One test per provider, each over (B, d, K, N) in
{(64, 128, 1500, 7531), (64, 128, 16384, 9528)} x bank dtype {float32, bfloat16}, int32 indices; results land in
bench/results/<device>.{json,md} via the ``record`` fixture: the synchronised wall time of a step (pytest-benchmark,
method unchanged), beside it on CUDA the GPU time alone (``triton.testing.do_bench``: CUDA events around the same
step without the host sync, median), peak extra memory, and the floors.

Floors (kernels/nce.py ``floor_bytes`` / ``hopper_floors``): the L2 gather floor -- gathered rows B*(K+1)*d*elem
over the L2 bandwidth, the one that binds since the bank sits in L2, owed until an L2 bandwidth is measured -- and
the HBM floor: indices, anchors, gradient and the bank once over the HBM bandwidth (specified: H100 SXM 3.35 TB/s,
H200 4.8 TB/s; see kernels/hopper_build.GPUS). ``floor_s`` is the L2 gather floor where known, else None; both
byte counts are recorded. On a CPU the Triton and max-autotune providers are skipped: the interpreter is far too
slow to time, and max-autotune's GPU kernel search has nothing to search there.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cmc_fast.kernels.hopper_build import GPUS
from cmc_fast.kernels.nce import floor_bytes
from cmc_fast.kernels.reference import nce_loss_reference
from conftest import bench_device, device_name, peak_memory

from cmc_fast import ops

DEVICE = bench_device()
CUDA = DEVICE.type == "cuda"
TAU = 0.07
CASES = [(64, 128, 1500, 7531), (64, 128, 16384, 9528)]
DTYPES = [torch.float32, torch.bfloat16]
ROUNDS, WARMUP = (30, 5) if CUDA else (2, 0)  # CPU: a smoke run (the step already ran once untimed)


def gpu_bandwidths() -> dict:
    """The GPUS entry of this device (H100 / H200), or {} (a CPU, or a GPU without figures here)."""
    name = device_name()
    key = "H200" if "H200" in name else ("H100 SXM" if "H100" in name else None)
    return GPUS.get(key, {}) if CUDA and key else {}


def make_case(b, d, k, n, dtype):
    g = torch.Generator().manual_seed(1234 + k)
    anchor = F.normalize(torch.randn(b, d, generator=g), dim=1).to(DEVICE).requires_grad_()
    bank = F.normalize(torch.randn(n, d, generator=g), dim=1).to(DEVICE, dtype)
    idx = torch.cat([torch.randperm(n, generator=g)[:b, None], torch.randint(0, n, (b, k), generator=g)], 1)
    idx = idx.to(DEVICE, torch.int32)  # int32 end to end: half the index stream of int64
    with torch.no_grad():
        z = torch.tensor(ops.nce_partition(anchor, bank, idx, tau=TAU, n_data=n), device=DEVICE)
    return anchor, bank, idx, z


def _sync():
    if CUDA:
        torch.cuda.synchronize()


_COMPILED = {}


def loss_fn(provider):
    if provider == "triton":
        return ops.nce_loss
    if provider == "eager":
        return nce_loss_reference
    if provider not in _COMPILED:
        mode = "max-autotune" if provider == "compile-max-autotune" else None
        _COMPILED[provider] = torch.compile(nce_loss_reference, fullgraph=True, dynamic=False, mode=mode)
    return _COMPILED[provider]


def gpu_time(fn) -> float | None:
    """Median GPU time of ``fn`` in seconds (CUDA events, ``triton.testing.do_bench``); None on CPU."""
    if not CUDA:
        return None
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3


def run_provider(benchmark, record, provider, b, d, k, n, dtype):
    anchor, bank, idx, z = make_case(b, d, k, n, dtype)
    fn = loss_fn(provider)

    def unsynced():
        loss = fn(anchor, bank, idx, tau=TAU, z=z, n_data=n)
        (grad,) = torch.autograd.grad(loss, anchor)
        return loss, grad

    def step():
        out = unsynced()
        _sync()
        return out

    loss, grad = step()  # compile / first launch outside the timing, and a sanity check of the numbers
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    nbytes = floor_bytes(b, d, k, n, torch.empty((), dtype=dtype).element_size(), idx.element_size())
    bw = gpu_bandwidths()
    l2, hbm = bw.get("l2_measured"), bw.get("hbm_spec")
    record(benchmark, group=f"nce fwd+bwd B={b} d={d} K={k} N={n} bank={str(dtype).replace('torch.', '')}",
           provider=provider, floor_s=(nbytes["l2_gather"] / l2) if l2 else None, gpu_time_s=gpu_time(unsynced),
           l2_gather_bytes=nbytes["l2_gather"], hbm_bytes=nbytes["hbm"],
           hbm_floor_s=(nbytes["hbm"] / hbm) if hbm else None, peak_bytes=peak_memory(step, DEVICE))


PARAMS = pytest.mark.parametrize(
    "b,d,k,n,dtype", [(*c, t) for c in CASES for t in DTYPES],
    ids=[f"K{c[2]}-{str(t).replace('torch.', '')}" for c in CASES for t in DTYPES])


@PARAMS
def test_nce_triton(benchmark, record, b, d, k, n, dtype):
    if not CUDA:
        pytest.skip("Triton provider needs CUDA (the interpreter is far too slow to benchmark)")
    run_provider(benchmark, record, "triton", b, d, k, n, dtype)


@PARAMS
def test_nce_eager(benchmark, record, b, d, k, n, dtype):
    run_provider(benchmark, record, "eager", b, d, k, n, dtype)


@PARAMS
def test_nce_compile(benchmark, record, b, d, k, n, dtype):
    run_provider(benchmark, record, "compile", b, d, k, n, dtype)


@PARAMS
def test_nce_compile_max_autotune(benchmark, record, b, d, k, n, dtype):
    """Inductor's max-autotune (with coordinate-descent tuning, as its mode sets) may turn the reference's gather +
    bmm into a fused gather kernel: measured beside the default mode."""
    if not CUDA:
        pytest.skip("max-autotune searches GPU kernels: nothing to search on a CPU")
    run_provider(benchmark, record, "compile-max-autotune", b, d, k, n, dtype)
