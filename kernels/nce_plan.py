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
import warnings
from dataclasses import dataclass

import torch

from .dispatch import triton_interpreted
from .gpus import DEFAULT_GPU, GPUS, SCHEDULERS_PER_SM, device_resident_blocks, sm_count
from .utils import cdiv, next_power_of_2

PATHS = ("gather", "dense")
_MODES = ("auto",) + PATHS

DENSE_MAX_COUNTS_BYTES = 256 << 20  # the [B, N] int32 histogram above which the dense form is not run (a choice)
# Warp-instructions of the hot loops per bank row at d = 128, by the bank's bytes per element (the sm_90 report,
# bench/results/nce-hopper-sm90-report.md): the gather per gathered row, the dense kernel per bank row scored against
# one tile of 16 anchors (split tf32 products, bf16 conversions included). Scaled linearly with d elsewhere (a guess).
GATHER_INSTRUCTIONS_PER_ROW = {4: 20.9, 2: 26.1, 1: 26.1}
DENSE_INSTRUCTIONS_PER_ROW = {4: 130.3, 2: 121.9, 1: 121.9}
GPU_SLOTS = 2 * GPUS[DEFAULT_GPU]["sms"]  # resident programs of the dense kernel on an H100/H200 (2 an SM: the report)
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
    # H100 SXM (``gpus.GPUS``): HBM and FP32 from the datasheet, FP32 at an assumed 0.5 for the gather's dot/axpy;
    # L2 ~10 TB/s ASSUMED (NVIDIA publishes none; issue 21 takes 10-12, owed to a measurement); TF32 tensor dense,
    # 3xTF32 a third of it, at an ASSUMED 0.5 for 64x64 tiles; terms: 132 SMs x 16 MUFU per clock at 1.98 GHz / 3 MUFU
    # per term, ~1.4e12/s, taken at half (ASSUMED). GPU timings are owed. Issue: SMs x 4 schedulers x the clock;
    # warp-instructions per row from the sm_90 report (kernels/nce_sm90.py).
    "cuda": DeviceProfile(10e12, GPUS[DEFAULT_GPU]["hbm"], 0.5 * GPUS[DEFAULT_GPU]["fp32"],
                          0.5 * GPUS[DEFAULT_GPU]["tf32"] / 3, 0.7e12, overlap=True,
                          warp_instructions_per_s=GPUS[DEFAULT_GPU]["sms"] * SCHEDULERS_PER_SM
                          * GPUS[DEFAULT_GPU]["clock_hz"]),
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
# size, and was chosen from the static sm_90 report (``python -m cmc_fast.kernels.sm90_report report --op nce``):
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


# ================================================================================== grid sizing on a GPU
_CHUNK_ALIGN = 128  # columns per split of the partition kernel are a multiple of this


def _block_k(block_d: int, chunk: int, device: torch.device) -> int:
    """Rows the partition kernel gathers per pass."""
    if device.type == "cuda" and not triton_interpreted():
        return max(4, min(64, _TILE // block_d))  # from d > 2048 on, 4 rows is more than _TILE (may spill)
    return max(16, min(next_power_of_2(chunk), _TILE_INTERPRETED // block_d))


def _resident_programs(compiled, num_warps: int, device: torch.device) -> int:
    """Programs of a compiled kernel one SM of ``device`` holds at once, from its registers and shared memory.
    Where Triton's handle does not say (another handle layout), 2 -- with a warning: the grid may then be sized
    for half (or double) the programs that really fit."""
    try:
        compiled._init_handles()
        return max(1, device_resident_blocks(int(compiled.n_regs), int(compiled.metadata.shared), num_warps, device))
    except Exception as e:  # noqa: BLE001 - an older/newer handle layout: a guess, the launch itself still runs
        warnings.warn(f"kernels/nce_plan.py: cannot read the occupancy of {getattr(compiled, 'name', 'a kernel')} "
                      f"({type(e).__name__}: {e}); sizing its grid for 2 programs per SM, which may under- or "
                      "over-fill the GPU", RuntimeWarning, stacklevel=2)
        return 2


_SLOTS: dict = {}


def _kernel_slots(kernel, args: tuple, consts: dict, num_warps: int, device: torch.device) -> int:
    """Resident programs of ``kernel`` on the whole GPU (SMs x per SM), once per specialisation (a compiled launch
    on CUDA; the interpreter has none). ``args`` end with the integer arguments the JIT specialises on."""
    ints = tuple((a == 1, a % 16 == 0) for a in args if isinstance(a, int))
    key = (kernel.__name__, device.index, ints, tuple(a.dtype for a in args if hasattr(a, "dtype")),
           tuple(sorted(consts.items())))
    if key not in _SLOTS:
        compiled = kernel.warmup(*args, grid=(1,), num_warps=num_warps, **consts)
        _SLOTS[key] = sm_count(device) * _resident_programs(compiled, num_warps, device)
    return _SLOTS[key]


def _splits(b: int, k1: int, device: torch.device, splits: int | None) -> tuple[int, int]:
    """(number of splits S of the K+1 columns, columns per split) of the partition kernel. Enough programs to fill
    the GPU: with B = 64 rows alone, a 132-SM H100 would sit half idle, so each row's columns are cut into S chunks."""
    if splits is None:
        # interpreter: fewer, larger programs are faster
        splits = max(1, cdiv(4 * sm_count(device), b)) if device.type == "cuda" else 1
    splits = max(1, min(int(splits), cdiv(k1, 16)))
    align = _CHUNK_ALIGN if device.type == "cuda" else 16
    chunk = cdiv(cdiv(k1, splits), align) * align
    return cdiv(k1, chunk), chunk
