"""NCE loss forward+backward: fused Triton kernel vs eager reference vs torch.compile of the reference.

Run with ``pytest bench --benchmark-only``. One test per provider, each over (B, d, K, N) in
{(64, 128, 1500, 7531), (64, 128, 16384, 9528)} x bank dtype {float32, bfloat16}; results (median time, peak
extra memory, floor, measured/floor) land in bench/results/<device>.{json,md} via the ``record`` fixture.

Floor: the bytes one forward+backward must move -- gathered bank rows B*(K+1)*d*elem, indices B*(K+1)*8,
anchor read and gradient written 2*B*d*4 -- over the device's HBM bandwidth (H100 3.35e12 B/s, H200 4.8e12 B/s;
see the table in kernels/nce.py). On a CPU no floor is recorded (floor_s None; floor_bytes still is), and the
Triton provider is skipped: the interpreter is orders of magnitude too slow to time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cmc_fast.kernels.reference import nce_loss_reference
from conftest import bench_device, device_name, peak_memory

from cmc_fast import kernels

DEVICE = bench_device()
CUDA = DEVICE.type == "cuda"
TAU = 0.07
CASES = [(64, 128, 1500, 7531), (64, 128, 16384, 9528)]
DTYPES = [torch.float32, torch.bfloat16]
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}
ROUNDS, WARMUP = (30, 5) if CUDA else (2, 0)  # CPU: a smoke run (the step already ran once untimed)


def hbm_bandwidth() -> float | None:
    name = device_name()
    return next((bw for key, bw in HBM_BYTES_PER_S.items() if CUDA and key in name), None)


def floor_bytes(b: int, d: int, k: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return b * (k + 1) * d * elem + b * (k + 1) * 8 + 2 * b * d * 4


def make_case(b, d, k, n, dtype):
    g = torch.Generator().manual_seed(1234 + k)
    anchor = F.normalize(torch.randn(b, d, generator=g), dim=1).to(DEVICE).requires_grad_()
    bank = F.normalize(torch.randn(n, d, generator=g), dim=1).to(DEVICE, dtype)
    idx = torch.cat([torch.randperm(n, generator=g)[:b, None], torch.randint(0, n, (b, k), generator=g)], 1)
    idx = idx.to(DEVICE)
    with torch.no_grad():
        z = torch.tensor(kernels.nce_partition(anchor, bank, idx, tau=TAU, n_data=n), device=DEVICE)
    return anchor, bank, idx, z


def _sync():
    if CUDA:
        torch.cuda.synchronize()


_COMPILED = {}


def loss_fn(provider):
    if provider == "triton":
        return kernels.nce_loss
    if provider == "eager":
        return nce_loss_reference
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(nce_loss_reference, fullgraph=True, dynamic=False)
    return _COMPILED["fn"]


def run_provider(benchmark, record, provider, b, d, k, n, dtype):
    anchor, bank, idx, z = make_case(b, d, k, n, dtype)
    fn = loss_fn(provider)

    def step():
        loss = fn(anchor, bank, idx, tau=TAU, z=z, n_data=n)
        (grad,) = torch.autograd.grad(loss, anchor)
        _sync()
        return loss, grad

    loss, grad = step()  # compile / autotune outside the timing, and a sanity check of the numbers
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    nbytes = floor_bytes(b, d, k, dtype)
    bw = hbm_bandwidth()
    record(benchmark, group=f"nce fwd+bwd B={b} d={d} K={k} N={n} bank={str(dtype).replace('torch.', '')}",
           provider=provider, floor_s=(nbytes / bw) if bw else None, floor_bytes=nbytes, hbm_bytes_per_s=bw,
           peak_bytes=peak_memory(step, DEVICE))


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
