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
  gather:  L2 bytes  B*(K+1)*d*elem gathered (the bank sits in L2);   HBM bytes  idx B*(K+1)*idx_elem + 2*B*d*4
           flops  4*B*(K+1)*d (dot + gradient axpy);   terms B*(K+1) (exp, log1p, reciprocal each)
  dense:   HBM bytes  the bank once N*d*elem + idx B*(K+1)*idx_elem (the histogram) + counts 3*B*N*4 (zeroed,
                      incremented, read) + 2*B*d*4;   L2 bytes  the bank again per further tile of BLOCK_B anchors
                      + the partial gradients 2*S*B*d*4
           flops  4*B*N*d (two products);   terms B*N
  issue    warp-instructions of the hot loops: rows x per row (gather B*(K+1); dense ceil(B/16)*N), from the report
  GPU: time = max(L2 bytes / L2 + HBM bytes / HBM, flops / rate, terms / term rate, issue) (a kernel overlaps them);
  CPU (PyTorch, one pass per op, all anchors in one GEMM): the sum. Dense also needs the [B, N] working set (int32
  counts): above DENSE_MAX_COUNTS_BYTES the gather runs whatever the estimate.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from .utils import cdiv, next_power_of_2

PATHS = ("gather", "dense")
_MODES = ("auto",) + PATHS

DENSE_MAX_COUNTS_BYTES = 256 << 20  # the [B, N] int32 histogram above which the dense form is not run (a choice)
# Warp-instructions of the hot loops per bank row at d = 128, by the bank's bytes per element (the sm_90 report,
# bench/results/nce-hopper-sm90-report.md): the gather per gathered row, the dense kernel per bank row scored against
# one tile of 16 anchors (split tf32 products, bf16 conversions included). Scaled linearly with d elsewhere (a guess).
GATHER_INSTRUCTIONS_PER_ROW = {4: 20.9, 2: 26.1, 1: 26.1}
DENSE_INSTRUCTIONS_PER_ROW = {4: 130.3, 2: 121.9, 1: 121.9}
GPU_SLOTS = 264  # resident programs of the dense kernel on a 132-SM H100/H200 (2 per SM: sm_90 report)
DENSE_BLOCK_B = 16  # anchors per tile of the dense kernel on a GPU (``_dense_launch``): bank reads per call


@dataclass(frozen=True)
class DeviceProfile:
    """Rates one forward+backward is charged at. ``overlap``: time is the max of the three (a fused GPU kernel),
    else their sum (eager PyTorch on a CPU: one pass per op)."""
    gather_bytes_per_s: float  # gathered rows (GPU: L2; CPU: memory, random rows)
    stream_bytes_per_s: float  # streamed bytes: bank, idx, counts, partials (GPU: HBM)
    gather_flops_per_s: float  # the gather's dot/axpy (GPU: FP32 CUDA cores)
    dense_flops_per_s: float  # the dense form's products (GPU: tensor cores, split tf32; CPU: BLAS)
    terms_per_s: float  # per-score transcendental terms (exp, log1p, sigmoid and their arithmetic)
    overlap: bool
    warp_instructions_per_s: float | None = None  # GPU: the issue bound of the kernels' hot loops


PROFILES = {
    # H100 SXM: HBM 3.35 TB/s (datasheet); L2 ~10 TB/s ASSUMED (NVIDIA publishes none; issue 21 takes 10-12, owed
    # to a measurement); FP32 67 TFLOP/s (datasheet) at an assumed 0.5 for the gather's dot/axpy; TF32 tensor
    # 495 TFLOP/s dense (datasheet), 3xTF32 a third of it, at an ASSUMED 0.5 for 64x64 tiles; terms: 132 SMs x 16
    # MUFU per clock at 1.98 GHz / 3 MUFU per term, ~1.4e12/s, taken at half (ASSUMED). GPU timings are owed.
    # Issue: 132 SMs x 4 schedulers x an assumed 1.98 GHz; warp-instructions per row from the sm_90 report below.
    "cuda": DeviceProfile(10e12, 3.35e12, 0.5 * 67e12, 0.5 * 495e12 / 3, 0.7e12, overlap=True,
                          warp_instructions_per_s=132 * 4 * 1.98e9),
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
    """Bytes, FLOPs and per-score terms of one gather forward+backward: ``bytes_l2`` the gathered rows (served from
    L2 on a GPU), ``bytes_hbm`` the indices, anchors and gradient."""
    return {"bytes_l2": b * k1 * d * bank_elem, "bytes_hbm": b * k1 * idx_elem + 2 * b * d * 4,
            "flops": 4 * b * k1 * d, "terms": b * k1,
            "warp_instructions": b * k1 * GATHER_INSTRUCTIONS_PER_ROW[min(bank_elem, 4)] * d / 128}


def dense_cost(b: int, d: int, k1: int, n: int, bank_elem: int, idx_elem: int = 4, *, anchor_tiles: int = 1,
               splits: int = 1) -> dict[str, float]:
    """Bytes, FLOPs and per-score terms of one dense forward+backward. ``bytes_hbm``: the bank once, the indices (the
    histogram), the [B, N] int32 counts zeroed, incremented and read, anchors and gradient; ``bytes_l2``: the bank
    re-read by each further tile of anchors and the [B, S, d] partial gradients written and read back (both stay in
    L2 on a GPU). ``anchor_tiles``/``splits``: the kernel's grid (1 and 1 for the CPU form: one GEMM per slice)."""
    bank = n * d * bank_elem
    return {"bytes_l2": (anchor_tiles - 1) * bank + 2 * splits * b * d * 4,
            "bytes_hbm": bank + b * k1 * idx_elem + 3 * b * n * 4 + 2 * b * d * 4,
            "flops": 4 * b * n * d, "terms": b * n,
            "warp_instructions": anchor_tiles * n * DENSE_INSTRUCTIONS_PER_ROW[min(bank_elem, 4)] * d / 128}


def estimate_seconds(cost: dict[str, float], profile: DeviceProfile, dense: bool) -> float:
    parts = (cost["bytes_l2"] / profile.gather_bytes_per_s + cost["bytes_hbm"] / profile.stream_bytes_per_s,
             cost["flops"] / (profile.dense_flops_per_s if dense else profile.gather_flops_per_s),
             cost["terms"] / profile.terms_per_s,
             cost["warp_instructions"] / profile.warp_instructions_per_s if profile.warp_instructions_per_s else 0.0)
    return max(parts) if profile.overlap else sum(parts)


def counts_bytes(b: int, n: int) -> int:
    """The dense form's [B, N] working set: the int32 histogram (the CPU form adds [B, slice] float32 tiles)."""
    return 4 * b * n


@functools.lru_cache(maxsize=256)
def _auto_path(b: int, d: int, k1: int, n: int, bank_elem: int, device_type: str) -> str:
    if counts_bytes(b, n) > DENSE_MAX_COUNTS_BYTES or k1 <= 1 or n == 0:
        return "gather"
    on_gpu = device_type == "cuda"
    profile = PROFILES["cuda" if on_gpu else "cpu"]
    tiles = cdiv(b, DENSE_BLOCK_B) if on_gpu else 1
    splits = max(1, GPU_SLOTS // tiles) if on_gpu else 1  # what _choose_splits gives, near enough
    dense = estimate_seconds(dense_cost(b, d, k1, n, bank_elem, anchor_tiles=tiles, splits=splits), profile, True)
    gather = estimate_seconds(gather_cost(b, d, k1, n, bank_elem), profile, dense=False)
    return "dense" if dense < gather else "gather"


DENSE_MAX_D = 128  # the widest d the dense kernel builds for without spilling (sm_90 report): beyond, the gather


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


# ============================================================================ launch configurations
# The loss kernel's launch (see _FwdLaunch): no autotune -- the configuration follows from d and the bank's element
# size, and was chosen from the static sm_90 report (``python -m cmc_fast.kernels.hopper_build report --op nce``):
# the warp-instructions per gathered row, registers and spills of each candidate. The number of splits of K+1 then
# follows from the compiled kernel's occupancy, so the grid fills the GPU's resident slots with no wave tail.
_ROW_BYTES_PER_THREAD = 128  # bytes of one bank row one thread loads (8 x 16-byte vectors): sets lanes per row
# 2-byte banks: 64 bytes (32 elements, as fp32's) per thread -- 4 lanes per row at d = 128, 128 registers, 4 blocks of
# 4 warps = 16 warps per SM (sm_90 report), for ~26 warp-instructions per gathered row. 128 bytes (2 lanes) gave 21.2
# per row but 231-236 registers: 8 warps per SM, too few to hide the gather's latency (issue 21); GPU timing owed.
_ROW_BYTES_PER_THREAD_HALF = 64
_FWD_WARPS = 4
_MIN_LAST_WAVE = 0.9  # splits are chosen so the last wave of programs fills at least this share of the slots
_TILE = 8192  # elements of the [BLOCK_K, BLOCK_D] gathered tile held in registers by one program
_TILE_INTERPRETED = 1 << 18  # the interpreter pays per op, not per element: far larger tiles there


@dataclass(frozen=True)
class _FwdLaunch:
    """Tile of the loss kernel: [n_chunks, block_k, chunk_d], one bank row on chunk_d / vector lanes."""
    block_k: int  # rows gathered per program per loop pass
    n_chunks: int
    chunk_d: int
    num_warps: int


def _fwd_launch(d: int, elem: int, interpreted: bool, block_k: int | None = None, k1: int = 1 << 30) -> _FwdLaunch:
    """16-byte vectors (4 fp32 or 8 bf16/fp16 elements) per thread; lanes per row such that a thread holds ~128 bytes
    of an fp32 row, 64 of a 2-byte one (d = 128: 4 lanes, 8 rows per warp for both; d = 1024 fp32: 32 lanes), so the
    dot product's shuffles and the per-row math are shared by 8 rows per warp-instruction.
    Rows per pass: one per row-slot of the warps (two rows per thread, from the sm_90 report at d = 128: fp32 192
    registers instead of 120 for 20.2 warp-instructions per row instead of 20.6; bf16 spilled 728 bytes). The
    interpreter pays per operation, not per element: far taller tiles there."""
    block_d = next_power_of_2(d)
    vec = max(1, 16 // elem)
    row_bytes = _ROW_BYTES_PER_THREAD if elem >= 4 else _ROW_BYTES_PER_THREAD_HALF
    lanes = max(2, min(32, block_d * elem // row_bytes))
    chunk_d = min(block_d, lanes * vec)
    rows_per_warp = 32 // max(1, chunk_d // vec)
    if block_k is None:
        tall = max(16, min(_TILE_INTERPRETED // block_d, 1024, next_power_of_2(k1)))
        block_k = tall if interpreted else rows_per_warp * _FWD_WARPS
    return _FwdLaunch(block_k, block_d // chunk_d, chunk_d, _FWD_WARPS)


def _fwd_consts(launch: _FwdLaunch, d: int, need_grad: bool, libdevice_log1p: bool) -> dict:
    """The loss kernel's constexprs for a launch (the launcher and the static report build the same kernel)."""
    return {"COMPUTE_GRAD": need_grad, "LIBDEVICE": libdevice_log1p, "BLOCK_K": launch.block_k,
            "N_CHUNKS": launch.n_chunks, "CHUNK_D": launch.chunk_d, "EVEN_D": d == launch.n_chunks * launch.chunk_d}


def _choose_splits(b: int, k1: int, block_k: int, slots: int, splits: int | None = None) -> tuple[int, int]:
    """(S, columns per split): the fewest splits of K+1 for which the B x S programs end with a last wave at least
    _MIN_LAST_WAVE full of ``slots`` (programs resident at once on the GPU); chunks are multiples of block_k (and of
    16, so the JIT specialises ``chunk`` the same way for every S). ``splits`` forces S (tests)."""
    align = max(16, block_k)
    most = max(1, cdiv(k1, align))
    candidates = [max(1, min(int(splits), most))] if splits is not None else range(1, most + 1)
    best = None
    for want in candidates:
        chunk = cdiv(cdiv(k1, want), align) * align
        n = cdiv(k1, chunk)
        programs = b * n
        last = programs % slots
        fill = 1.0 if last == 0 else last / slots
        if splits is not None or (programs >= _MIN_LAST_WAVE * slots and fill >= _MIN_LAST_WAVE):
            return n, chunk
        if best is None or fill > best[0]:
            best = (fill, n, chunk)
    return best[1], best[2]  # no S reaches the target (short K): the best-filled


def _occupancy(regs: int, shared: int, num_warps: int, regs_per_sm: int = 65536, threads_per_sm: int = 2048,
               shared_per_sm: int = 233472) -> int:
    """Blocks of ``num_warps`` warps one SM holds at once (the occupancy calculator's rules: registers allocated per
    warp in units of 256, 1 KB of shared memory reserved per block, at most 32 blocks); defaults: an H100/H200 SM.
    kernels/hopper_build.resident_blocks computes the same for the static report (a test checks they agree)."""
    per_warp = cdiv(max(regs, 1) * 32, 256) * 256
    return max(1, min(32, regs_per_sm // (per_warp * num_warps), threads_per_sm // (32 * num_warps),
                      shared_per_sm // (shared + 1024)))


@dataclass(frozen=True)
class _DenseLaunch:
    """Tile of the dense kernel: block_b anchors x block_n bank rows per pass, the whole (padded) d at once."""
    block_b: int
    block_n: int
    block_d: int
    num_warps: int
    exact_tf32_bank: bool  # a 2-byte bank is exact in tf32: two products per dot instead of three

    @property
    def precision(self) -> str:
        return "2xTF32" if self.exact_tf32_bank else "3xTF32"


def _dense_launch(b: int, d: int, n: int, interpreted: bool, elem: int = 4) -> _DenseLaunch:
    """tl.dot needs >= 16 on every side. On a GPU, from the static sm_90 report at 4 warps and 3xTF32: 16 anchors x
    32 bank rows up to d = 128 (~200-220 registers, no spill; 64 x 64 and 32 x 64 spilled 800+ bytes at d = 128,
    16 x 64 spilled 12 at d = 16, d = 256 spilled 480). The interpreter pays per operation, not per element: taller
    tiles there, any d."""
    block_d = max(16, next_power_of_2(d))
    if interpreted:
        block_b = min(64, max(16, next_power_of_2(b)))
        return _DenseLaunch(block_b, max(16, min(next_power_of_2(n), 2048)), block_d, 4, elem < 4)
    if block_d > DENSE_MAX_D:
        raise ValueError(f"the dense NCE kernel takes d <= {DENSE_MAX_D} on a GPU, got d={d} (CMC_FAST_NCE=gather)")
    return _DenseLaunch(DENSE_BLOCK_B, 32, block_d, 4, elem < 4)


def _dense_consts(launch: _DenseLaunch, need_grad: bool, libdevice_log1p: bool) -> dict:
    return {"COMPUTE_GRAD": need_grad, "LIBDEVICE": libdevice_log1p, "EXACT_TF32_BANK": launch.exact_tf32_bank,
            "BLOCK_B": launch.block_b, "BLOCK_N": launch.block_n, "BLOCK_D": launch.block_d}


# ======================================================================================= static report
_BANK_ELEM = {"fp32": 4, "bf16": 2, "fp16": 2}  # bytes per element of each bank dtype the report takes


def _fwd_spec_args(d: int, k1: int, chunk: int, bank_type: str) -> tuple[dict, tuple]:
    """(types, divisible_by_16) of the loss kernel as the JIT specialises a launch: contiguous fp32 anchors, a
    contiguous [N, d] bank (stride_bd == 1 becomes a constant), int32 indices, torch's 16-byte-aligned pointers."""
    f32 = "*fp32"
    types = {"anchor_ptr": f32, "bank_ptr": "*" + bank_type, "idx_ptr": "*i32", "z_ptr": f32,
             "part_loss_ptr": f32, "part_grad_ptr": f32, "inv_tau": "fp32", "log_c": "fp32",
             "log_noise_over_c": "fp32"}
    ints = {"K1": k1, "D": d, "stride_bn": d, "chunk": chunk}
    divisible = ("anchor_ptr", "bank_ptr", "idx_ptr", "z_ptr", "part_loss_ptr", "part_grad_ptr") + tuple(
        name for name, v in ints.items() if v % 16 == 0)
    return types, divisible


def _dense_spec_args(d: int, n: int, k1: int, chunk: int, bank_type: str) -> tuple[dict, tuple]:
    """(types, divisible_by_16) of the dense kernel as the JIT specialises a launch (as ``_fwd_spec_args``)."""
    f32 = "*fp32"
    types = {"anchor_ptr": f32, "bank_ptr": "*" + bank_type, "idx_ptr": "*i32", "counts_ptr": "*i32", "z_ptr": f32,
             "part_loss_ptr": f32, "part_grad_ptr": f32, "inv_tau": "fp32", "log_c": "fp32",
             "log_noise_over_c": "fp32"}
    ints = {"N": n, "K1": k1, "D": d, "stride_bn": d, "chunk": chunk}
    divisible = ("anchor_ptr", "bank_ptr", "idx_ptr", "counts_ptr", "z_ptr", "part_loss_ptr", "part_grad_ptr") + tuple(
        name for name, v in ints.items() if v % 16 == 0)
    return types, divisible


def hopper_specs(shape: tuple[int, ...], bank_dtype: str = "fp32", nce_path: str = "gather") -> list:
    """The specialisations one ``nce_loss`` forward+backward at shape (B, d, K, N) runs on an H100/H200 (132 SMs)
    with a contiguous bank of ``bank_dtype``, fp32 anchors and int32 indices, by the form ``nce_path``: the gather's
    loss kernel (its splits chosen from its sm_90 build's occupancy, as the launcher does on the GPU) and finalize;
    or the dense form's histogram, dense loss kernel (likewise split over the bank) and finalize. For
    ``python -m cmc_fast.kernels.hopper_build report --op nce [--nce-path dense]``."""
    from .hopper_build import HOPPER_SMS, Spec, build, resident_blocks  # lazily: imports Triton's compiler
    from .nce import _nce_counts_kernel, _nce_dense_kernel, _nce_finalize_kernel, _nce_fwd_kernel

    if len(shape) != 4 or min(shape) < 0 or shape[1] < 1:
        raise ValueError(f"nce shape is B,D,K,N (non-negative, d >= 1), got {shape}")
    if bank_dtype not in _BANK_ELEM:
        raise ValueError(f"bank_dtype must be one of {sorted(_BANK_ELEM)}, got {bank_dtype!r}")
    if nce_path not in PATHS:
        raise ValueError(f"nce_path must be one of {PATHS}, got {nce_path!r}")
    b, d, k, n = shape
    k1 = k + 1
    bank_type, elem = bank_dtype, _BANK_ELEM[bank_dtype]
    specs = []
    if nce_path == "gather":
        launch = _fwd_launch(d, elem, interpreted=False)
        consts = {**_fwd_consts(launch, d, need_grad=True, libdevice_log1p=True), "stride_bd": 1}
        types, divisible = _fwd_spec_args(d, k1, max(16, launch.block_k), bank_type)
        built = build(_nce_fwd_kernel, types, consts, launch.num_warps, divisible)
        slots = HOPPER_SMS * resident_blocks(built.registers, built.shared, launch.num_warps)
        n_split, chunk = _choose_splits(max(b, 1), k1, launch.block_k, slots)
        types, divisible = _fwd_spec_args(d, k1, chunk, bank_type)
        path = f"BLOCK_K={launch.block_k} tile={launch.n_chunks}x{launch.block_k}x{launch.chunk_d} S={n_split}"
        specs.append(Spec(_nce_fwd_kernel, types, consts, launch.num_warps, divisible, path, b * n_split,
                          launch.block_k, {"splits": n_split, "chunk": chunk}))
    else:
        launch = _dense_launch(b, d, n, interpreted=False, elem=elem)
        consts = {**_dense_consts(launch, need_grad=True, libdevice_log1p=True), "stride_bd": 1}
        types, divisible = _dense_spec_args(d, n, k1, launch.block_n, bank_type)
        built = build(_nce_dense_kernel, types, consts, launch.num_warps, divisible)
        slots = HOPPER_SMS * resident_blocks(built.registers, built.shared, launch.num_warps)
        b_tiles = cdiv(max(b, 1), launch.block_b)
        n_split, chunk = _choose_splits(b_tiles, max(n, 1), launch.block_n, slots)
        types, divisible = _dense_spec_args(d, n, k1, chunk, bank_type)
        path = f"dense {launch.block_b}x{launch.block_n}x{launch.block_d} {launch.precision} S={n_split}"
        block = min(1024, next_power_of_2(max(k, 1)))
        specs.append(Spec(_nce_counts_kernel, {"idx_ptr": "*i32", "counts_ptr": "*i32"}, {"BLOCK_K": block}, 4,
                          ("idx_ptr", "counts_ptr"), path, b * cdiv(max(k, 1), block)))
        # rows: bank rows one program scores per pass (against its block_b anchors)
        specs.append(Spec(_nce_dense_kernel, types, consts, launch.num_warps, divisible, path, b_tiles * n_split,
                          launch.block_n, {"splits": n_split, "chunk": chunk, "anchors_per_program": launch.block_b,
                                           "bank_reads": b_tiles}))
    block_d = next_power_of_2(d)
    f32 = "*fp32"
    fin_types = {"part_loss_ptr": f32, "part_grad_ptr": f32, "loss_ptr": f32, "grad_ptr": f32,
                 "loss_scale": "fp32", "grad_scale": "fp32"}
    fin_consts = {"COMPUTE_GRAD": True, "BLOCK_S": min(next_power_of_2(n_split), max(1, _TILE // block_d)),
                  "BLOCK_D": block_d, "BLOCK_P": min(next_power_of_2(b * n_split), 1024)}
    specs.append(Spec(_nce_finalize_kernel, fin_types, fin_consts, 4,
                      ("part_loss_ptr", "part_grad_ptr", "loss_ptr", "grad_ptr"), path, b))
    return specs


def hopper_floors(shape: tuple[int, ...], bank_dtype: str = "fp32", nce_path: str = "gather") -> dict[str, object]:
    """Floors of one forward+backward at (B, d, K, N) per GPU (``kernels.hopper_build.GPUS``; int32 indices), both
    forms side by side whichever ``nce_path`` the report built: the gather's L2 floor (bytes / L2 bandwidth; owed where
    no L2 bandwidth is known, with an assumed 10 TB/s beside it) and HBM floor; the dense form's bytes (bank once,
    idx, [B, N] counts, anchors and gradient: all over HBM) and its split-tf32 tensor-core floor; and the ratio of the
    dense floor to the gather's L2 floor at the assumed L2 bandwidth."""
    from .hopper_build import GPUS

    b, d, k, n = shape
    nbytes = floor_bytes(b, d, k, n, _BANK_ELEM[bank_dtype])
    dense_flops = (2 if _BANK_ELEM[bank_dtype] < 4 else 3) * 4 * b * n * d  # two products, 3 (2) tf32 MMAs each
    out: dict[str, object] = {"bytes": nbytes, "dense_tf32_flops": dense_flops}
    assumed_l2 = PROFILES["cuda"].gather_bytes_per_s
    us = lambda n, rate: round(n / rate * 1e6, 2) if rate else "owed"  # noqa: E731
    for gpu, bw in GPUS.items():
        dense_us = max(us(nbytes["dense"], bw["hbm_spec"]), us(dense_flops, _TF32_DENSE_SPEC[gpu]))
        out[gpu] = {"l2_gather_us": us(nbytes["l2_gather"], bw["l2_measured"]),
                    "l2_gather_us_at_assumed_10TBps": us(nbytes["l2_gather"], assumed_l2),
                    "hbm_us_spec": us(nbytes["hbm"], bw["hbm_spec"]),
                    "hbm_us_measured": us(nbytes["hbm"], bw["hbm_measured"]),
                    "dense_us_spec": dense_us,
                    # from the unrounded times: at tiny shapes both round to 0 us
                    "dense_over_gather_l2": round(max(nbytes["dense"] / bw["hbm_spec"],
                                                      dense_flops / _TF32_DENSE_SPEC[gpu])
                                                  / (nbytes["l2_gather"] / assumed_l2), 3)}
    return out


_TF32_DENSE_SPEC = {"H100 SXM": 495e12, "H200": 495e12}  # TF32 tensor-core FLOP/s without sparsity (datasheets)
