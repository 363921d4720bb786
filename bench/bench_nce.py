"""NCE loss forward+backward: the dense form vs the gather vs the eager reference vs torch.compile of each.

Run with ``pytest bench/bench_nce.py --benchmark-only``. Providers, all on the same inputs (int32 indices):
  eager            ``nce_loss_reference`` (gather of [B, K+1, d], autograd backward)
  compile          ``torch.compile`` of it
  gather / dense   ``ops.nce_loss`` forced to one form (CMC_FAST_NCE): on CUDA the Triton kernels, on the CPU the
                   PyTorch forms (``nce_fwd_torch``: gather + closed-form gradient; ``nce_counts_reference`` +
                   ``nce_dense_reference``: the bank scored once, weighted by the negatives' histogram)
  compile-gather / compile-dense   ``torch.compile`` of those PyTorch forms (the ops are opaque to the compiler)
  auto             ``ops.nce_loss`` as the trainer calls it: the form ``choose_nce_path`` picks (recorded per row)
  compile-max-autotune (CUDA only) Inductor's max-autotune of the reference
Shapes (B, d, K, N): the paper's (64, 128, 16384, 9528) and (64, 128, 1500, 9528), a larger batch
(256, 128, 16384, 9528) and an ImageNet-scale bank (256, 128, 16384, 1_000_000), where the gather should win. fp32
banks, and bf16 on CUDA. Results land in bench/results/<device>.{json,md} via the ``record`` fixture: the
synchronised wall time of a step (pytest-benchmark), beside it on CUDA the GPU time alone
(``cmc_fast.benchmark.kernel_seconds``: a CUDA graph's replay, or the profiler's kernel times),
peak extra memory, and the floors (``nce_plan.floor_bytes``: the gather's L2 bytes,
its HBM bytes, the dense form's bytes). On a CPU the numbers are a side-by-side smoke measurement on a shared
2-core VM, not GPU figures; the Triton providers need CUDA (the interpreter is far too slow to time).
"""

from __future__ import annotations

import os

import pytest
import torch
from cmc_fast.kernels.gpus import GPUS
from cmc_fast.kernels.nce_plan import _auto_path, floor_bytes
from cmc_fast.kernels.reference import nce_counts_reference, nce_dense_reference, nce_fwd_torch, nce_loss_reference

from cmc_fast import ops
from cmc_fast.benchmark import NCE_TAU, bench_device, device_name, kernel_seconds, nce_case, peak_bytes

DEVICE = bench_device()
CUDA = DEVICE.type == "cuda"
TAU = NCE_TAU
CASES = [(64, 128, 16384, 9528), (64, 128, 1500, 9528), (256, 128, 16384, 9528), (256, 128, 16384, 1_000_000)]
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
ROUNDS, WARMUP = (30, 5) if CUDA else (3, 0)  # CPU: a smoke run (the step already ran once untimed)
PROVIDERS = ["eager", "compile", "gather", "dense", "compile-gather", "compile-dense", "auto"]


def gpu_bandwidths() -> dict:
    """The GPUS entry of this device (H100 / H200), or {} (a CPU, or a GPU without figures here)."""
    name = device_name()
    key = "H200" if "H200" in name else ("H100 SXM" if "H100" in name else None)
    return GPUS.get(key, {}) if CUDA and key else {}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def gather_torch(anchor, bank, idx, *, tau, z, n_data):
    """The gather's PyTorch form as one differentiable step: (loss, dL/danchor) in closed form."""
    return nce_fwd_torch(anchor.detach(), bank, idx, z, tau, n_data, 1e-7, True)


def dense_torch(anchor, bank, idx, *, tau, z, n_data):
    """The dense form's PyTorch form: the histogram, then the scores, terms and gradient."""
    counts = nce_counts_reference(idx, bank.shape[0])
    return nce_dense_reference(anchor.detach(), bank, idx, counts, z, tau, n_data, 1e-7, True)


_COMPILED = {}


def _compiled(name, fn, mode=None):
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)
    return _COMPILED[name]


def step_fn(provider, monkeypatch):
    """A callable (anchor, bank, idx, tau, z, n_data) -> (loss, grad) for ``provider``."""
    def autograd_step(loss_fn):
        def run(anchor, bank, idx, **kw):
            loss = loss_fn(anchor, bank, idx, **kw)
            return loss, torch.autograd.grad(loss, anchor)[0]
        return run

    if provider in ("gather", "dense", "auto"):
        monkeypatch.setenv("CMC_FAST_NCE", provider)
        return autograd_step(ops.nce_loss)
    if provider == "eager":
        return autograd_step(nce_loss_reference)
    if provider in ("compile", "compile-max-autotune"):
        mode = "max-autotune" if provider == "compile-max-autotune" else None
        return autograd_step(_compiled(provider, nce_loss_reference, mode))
    return _compiled(provider, gather_torch if provider == "compile-gather" else dense_torch)


@pytest.mark.parametrize("provider", PROVIDERS + (["compile-max-autotune"] if CUDA else []))
@pytest.mark.parametrize("b,d,k,n,dtype", [(*c, t) for c in CASES for t in DTYPES],
                         ids=[f"B{c[0]}-K{c[2]}-N{c[3]}-{str(t).replace('torch.', '')}" for c in CASES for t in DTYPES])
def test_nce(benchmark, record, monkeypatch, provider, b, d, k, n, dtype):
    if provider == "compile-dense" and b * n > 64 * 10**6:
        pytest.skip("the dense form's Python loop over bank slices would be unrolled into a huge graph at this N")
    if os.environ.get("CMC_BENCH_NCE_PROVIDERS") and provider not in os.environ["CMC_BENCH_NCE_PROVIDERS"].split(","):
        pytest.skip("not in CMC_BENCH_NCE_PROVIDERS")
    anchor, bank, idx, z = nce_case(b, d, k, n, dtype, DEVICE)
    fn = step_fn(provider, monkeypatch)

    def unsynced():
        return fn(anchor, bank, idx, tau=TAU, z=z, n_data=n)

    def step():
        out = unsynced()
        _sync()
        return out

    loss, grad = step()  # compile / first launch outside the timing, and a sanity check of the numbers
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = floor_bytes(b, d, k, n, elem, idx.element_size())
    bw = gpu_bandwidths()
    l2, hbm = bw.get("l2_measured"), bw.get("hbm_spec")
    kernel_s, kernel_method = kernel_seconds(unsynced) if CUDA else (None, None)
    record(benchmark, group=f"nce fwd+bwd B={b} d={d} K={k} N={n} bank={str(dtype).replace('torch.', '')}",
           provider=provider, floor_s=(nbytes["l2_gather"] / l2) if l2 else None, kernel_s=kernel_s,
           kernel_method=kernel_method,
           l2_gather_bytes=nbytes["l2_gather"], hbm_bytes=nbytes["hbm"], dense_bytes=nbytes["dense"],
           auto_path=_auto_path(b, d, k + 1, n, elem, DEVICE.type), loss=float(loss.detach()),
           hbm_floor_s=(nbytes["hbm"] / hbm) if hbm else None, peak_bytes=peak_bytes(step, DEVICE))
