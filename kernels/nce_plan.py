"""Which form of ``nce_loss`` runs at a shape -- the gather or the dense -- and what each must move and compute.

Both forms take the same sampled indices idx [B, K+1] and give the same loss and anchor gradient (DESIGN 3):
  gather  fetch the B*(K+1) bank rows by index (each bank row ~B*(K+1)/N times), one dot and one axpy per row.
  dense   score the whole bank once, S = A M^T / tau [B, N] (a GEMM, tensor cores on a GPU), weight each score by
          C[i, n] = how often row n was drawn as a negative for anchor i (an integer histogram of idx[:, 1:], built
          once per step and shared by both directions), the positive on its own; dL/dA = (W M) / (B tau), a second
          product over the same bank tile.
The dense form wins when B*(K+1) is well above N (every shape of the paper: K = 1500 or 16384 against ~10k posts);
the gather where the bank is far larger than B*(K+1) (ImageNet-scale CRD, 1M rows) or the [B, N] working set does
not fit. ``choose_nce_path`` decides from the model below; ``CMC_FAST_NCE=auto|dense|gather`` forces a form (the
implementation -- Triton or PyTorch -- is still ``CMC_FAST_KERNELS``'s call: the two choices are independent).

Model (seconds of one forward+backward, per device profile; every constant is named with its source):
  gather:  bytes  B*(K+1)*d*elem gathered (L2 on a GPU: the bank sits there) + idx B*(K+1)*idx_elem
           flops  4*B*(K+1)*d (dot + gradient axpy);   terms B*(K+1) (exp, log1p, reciprocal each)
  dense:   bytes  ceil(B/BLOCK_B) * N*d*elem (the bank once per tile of anchors) + idx B*(K+1)*idx_elem (the
                  histogram) + counts 3*B*N*4 (zeroed, incremented, read) + partial gradients 2*S*B*d*4
           flops  4*B*N*d (two products);   terms B*N
  GPU: time = max(bytes / bandwidth, flops / rate, terms / term rate) (the kernel overlaps them); CPU (PyTorch,
  one pass per op): the sum. Dense also needs the [B, N] working set (int32 counts): above DENSE_MAX_COUNTS_BYTES
  the gather runs whatever the estimate.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from .utils import cdiv

PATHS = ("gather", "dense")
_MODES = ("auto",) + PATHS

DENSE_MAX_COUNTS_BYTES = 256 << 20  # the [B, N] int32 histogram above which the dense form is not run (a choice)
DENSE_BLOCK_B = 64  # anchors per tile of the dense kernel (kernels/nce.py ``_dense_launch``): bank reads per call


@dataclass(frozen=True)
class DeviceProfile:
    """Rates one forward+backward is charged at. ``overlap``: time is the max of the three (a fused GPU kernel),
    else their sum (eager PyTorch on a CPU: one pass per op)."""
    gather_bytes_per_s: float  # gathered rows (GPU: L2; CPU: memory, random rows)
    stream_bytes_per_s: float  # streamed bytes: bank, idx, counts, partials (GPU: HBM)
    gather_flops_per_s: float  # the gather's dot/axpy (GPU: FP32 CUDA cores)
    dense_flops_per_s: float  # the dense form's products (GPU: tensor cores, 3xTF32; CPU: BLAS)
    terms_per_s: float  # per-score transcendental terms (exp, log1p, sigmoid and their arithmetic)
    overlap: bool


PROFILES = {
    # H100 SXM: HBM 3.35 TB/s (datasheet); L2 ~10 TB/s ASSUMED (NVIDIA publishes none; issue 21 takes 10-12, owed
    # to a measurement); FP32 67 TFLOP/s (datasheet) at an assumed 0.5 for the gather's dot/axpy; TF32 tensor
    # 495 TFLOP/s dense (datasheet), 3xTF32 a third of it, at an ASSUMED 0.5 for 64x64 tiles; terms: 132 SMs x 16
    # MUFU per clock at 1.98 GHz / 3 MUFU per term, ~1.4e12/s, taken at half (ASSUMED). GPU timings are owed.
    "cuda": DeviceProfile(10e12, 3.35e12, 0.5 * 67e12, 0.5 * 495e12 / 3, 0.7e12, overlap=True),
    # This project's 2-core x86-64 VM (shared with other work, so rough), fitted to side-by-side timings of the two
    # PyTorch forms (nce_fwd_torch, nce_dense_reference) at B=64, d=128 and (K, N) from (64, 9528) to (16384, 9528)
    # and (256 | 4096, 100000): gathered rows ~0.15 GB/s (advanced indexing + float copy + two bmm), streamed
    # bytes ~0.3 GB/s (scatter of the histogram), BLAS ~40 GFLOP/s, ~15 M scores/s through ~7 elementwise passes.
    "cpu": DeviceProfile(0.15e9, 0.3e9, 20e9, 40e9, 15e6, overlap=False),
}


def nce_mode() -> str:
    """``CMC_FAST_NCE``: auto (default: by shape), dense or gather."""
    mode = os.environ.get("CMC_FAST_NCE", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"CMC_FAST_NCE={mode!r} is not one of {', '.join(_MODES)}")
    return mode


def gather_cost(b: int, d: int, k1: int, n: int, bank_elem: int, idx_elem: int = 4) -> dict[str, float]:
    """Bytes, FLOPs and per-score terms of one gather forward+backward (``bytes_gathered`` served from L2 on a GPU)."""
    return {"bytes_gathered": b * k1 * d * bank_elem, "bytes_streamed": b * k1 * idx_elem + 2 * b * d * 4,
            "flops": 4 * b * k1 * d, "terms": b * k1}


def dense_cost(b: int, d: int, k1: int, n: int, bank_elem: int, idx_elem: int = 4, splits: int = 1,
               block_b: int = DENSE_BLOCK_B) -> dict[str, float]:
    """Bytes, FLOPs and per-score terms of one dense forward+backward (everything streamed: nothing gathered)."""
    bank = cdiv(max(b, 1), block_b) * n * d * bank_elem
    counts = 3 * b * n * 4  # zeroed, incremented by the histogram, read by the kernel
    partials = 2 * splits * b * d * 4 + 2 * b * d * 4  # written and read once, anchors in and gradient out
    return {"bytes_gathered": 0, "bytes_streamed": bank + b * k1 * idx_elem + counts + partials,
            "flops": 4 * b * n * d, "terms": b * n}


def estimate_seconds(cost: dict[str, float], profile: DeviceProfile, dense: bool) -> float:
    parts = (cost["bytes_gathered"] / profile.gather_bytes_per_s + cost["bytes_streamed"] / profile.stream_bytes_per_s,
             cost["flops"] / (profile.dense_flops_per_s if dense else profile.gather_flops_per_s),
             cost["terms"] / profile.terms_per_s)
    return max(parts) if profile.overlap else sum(parts)


def counts_bytes(b: int, n: int) -> int:
    """The dense form's [B, N] working set: the int32 histogram (the CPU form adds [B, slice] float32 tiles)."""
    return 4 * b * n


@functools.lru_cache(maxsize=256)
def _auto_path(b: int, d: int, k1: int, n: int, bank_elem: int, device_type: str) -> str:
    if counts_bytes(b, n) > DENSE_MAX_COUNTS_BYTES or k1 <= 1 or n == 0:
        return "gather"
    profile = PROFILES["cuda" if device_type == "cuda" else "cpu"]
    dense = estimate_seconds(dense_cost(b, d, k1, n, bank_elem), profile, dense=True)
    gather = estimate_seconds(gather_cost(b, d, k1, n, bank_elem), profile, dense=False)
    return "dense" if dense < gather else "gather"


DENSE_MAX_D = 1024  # the dense kernel's tiles hold [64, d] anchors and [64, d] bank rows: beyond, the gather


@torch.compiler.assume_constant_result  # under torch.compile: decided at trace time, not traced into
def nce_path(b: int, d: int, k1: int, n: int, bank_elem: int, device_type: str) -> str:
    """'dense' or 'gather' for one ``nce_loss`` call at (B, d, K+1, N) with a bank of ``bank_elem`` bytes per
    element on ``device_type`` (the model above); ``CMC_FAST_NCE`` forces one."""
    mode = nce_mode()
    if mode != "auto":
        return mode
    if d > DENSE_MAX_D:
        return "gather"
    return _auto_path(b, d, k1, n, bank_elem, device_type)


_TAKEN: dict[tuple, int] = {}


@torch.compiler.assume_constant_result  # under torch.compile: decided (and recorded) once, at trace time
def choose_nce_path(b: int, d: int, k1: int, n: int, bank_elem: int, device_type: str) -> str:
    """``nce_path``, recorded for the run's report (``nce_paths_taken``): what ``nce_loss`` calls."""
    path = nce_path(b, d, k1, n, bank_elem, device_type)
    key = (path, nce_mode(), b, d, k1, n, bank_elem, device_type)
    _TAKEN[key] = _TAKEN.get(key, 0) + 1
    return path


def nce_paths_taken(reset: bool = False) -> list[str]:
    """The NCE forms chosen since the last reset, one line each (for a run's report), e.g.
    'dense (auto) at B=64 d=128 K=16384 N=9528 fp32 bank on cpu: 40 calls'."""
    lines = []
    for (path, mode, b, d, k1, n, elem, dev), calls in sorted(_TAKEN.items()):
        bank = {4: "fp32", 2: "bf16/fp16"}.get(elem, f"{elem}-byte")
        lines.append(f"{path} ({mode}) at B={b} d={d} K={k1 - 1} N={n} {bank} bank on {dev}: {calls} calls")
    if reset:
        _TAKEN.clear()
    return lines


def floor_bytes(b: int, d: int, k: int, n: int, bank_elem: int, idx_elem: int = 4) -> dict[str, int]:
    """Bytes one forward+backward of ``nce_loss`` must move. Gather: ``l2_gather`` the gathered bank rows
    B*(K+1)*d*elem (served from L2 when the bank fits there: 2-5 MB here against 50 MB of L2) and ``hbm`` what
    crosses HBM at least once -- the indices B*(K+1)*idx_elem, the anchors read and the gradient written 2*B*d*4, and
    the bank once N*d*elem. Dense (``dense``): the bank read once, the indices once (the histogram), the [B, N] int32
    counts written and read, anchors and gradient -- nothing gathered."""
    k1 = k + 1
    return {"l2_gather": b * k1 * d * bank_elem,
            "hbm": b * k1 * idx_elem + 2 * b * d * 4 + n * d * bank_elem,
            "dense": n * d * bank_elem + b * k1 * idx_elem + 2 * b * n * 4 + 2 * b * d * 4}


def nce_constants(k1: int, n_data: int, eps: float) -> tuple[float, float]:
    """(log c, log(noise / c)) with noise = K/N, c = noise + eps, in float64 on the host. With K = 0 there are no
    negatives and the second is never used."""
    noise = (k1 - 1) / n_data
    log_c = math.log(noise + eps)
    return log_c, (math.log(noise) - log_c if noise > 0 else 0.0)
