"""BLOCK's planning and cost model beside the op file ``kernels/block.py``: the GPU table, the kernels' tiles
(``block_plan``), the compile-time chunk layout, the floors, the static report's specialisations
(``hopper_specs``), and the rule that picks the fused kernels or the batched-bmm path per shape
(``choose_block_path``) from the fused kernels' issue bound (``kernels/block_bounds.json``) against the bmm
path's GEMM floors. Nothing here launches a kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from .dispatch import kernel_mode, triton_available, triton_interpreted
from .reference import block_chunk_sizes, block_size_groups
from .utils import cdiv, next_power_of_2

# ------------------------------------------------------------------------------------------ GPU constants
# Dense rates (the datasheets quote tensor-core rates "with sparsity": half of that is dense) and HBM bandwidths.
GPUS = {
    "H100 SXM": {
        "fp32": 67e12,  # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: FP32 67 TFLOPS (no tensor cores)
        "tf32": 494.7e12,  # idem: TF32 Tensor Core 989 TFLOPS with sparsity -> 494.7 dense
        "bf16": 989.4e12,  # idem: BF16 Tensor Core 1,979 TFLOPS with sparsity -> 989.4 dense (FP16 the same)
        "hbm": 3.35e12,  # idem: GPU memory bandwidth 3.35 TB/s (HBM3)
        "sms": 132,  # NVIDIA H100 whitepaper: 132 SMs on the SXM5 part
        "clock_hz": 1.98e9,  # the boost clock its FP32 rate implies: 67e12 / (132 SMs x 128 lanes x 2 FLOP)
    },
    "H100 PCIe": {
        "fp32": 51e12,  # NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe column: FP32 51 TFLOPS
        "tf32": 378e12,  # idem: TF32 Tensor Core 756 TFLOPS with sparsity -> 378 dense
        "bf16": 756.5e12,  # idem: BF16 Tensor Core 1,513 TFLOPS with sparsity -> 756.5 dense
        "hbm": 2.0e12,  # idem: GPU memory bandwidth 2 TB/s (HBM2e)
        "sms": 114,  # NVIDIA H100 whitepaper: 114 SMs on the PCIe part
        "clock_hz": 1.755e9,  # its boost clock (51e12 / (114 x 128 x 2) = 1.75 GHz agrees)
    },
    "H200": {
        "fp32": 67e12,  # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: FP32 67 TFLOPS
        "tf32": 494.7e12,  # idem: TF32 Tensor Core 989 TFLOPS with sparsity -> 494.7 dense
        "bf16": 989.4e12,  # idem: BF16 Tensor Core 1,979 TFLOPS with sparsity -> 989.4 dense
        "hbm": 4.8e12,  # idem: GPU memory bandwidth 4.8 TB/s (HBM3e)
        "sms": 132,  # same GH100 die configuration as the H100 SXM
        "clock_hz": 1.98e9,  # as the H100 SXM (the same FP32 rate)
    },
}

MAX_CHUNK = 256  # largest chunk the fused kernels take (dx/dW hold a [rows, pow2 >= chunk] tile)
MAX_RANK = 128  # largest rank (a feature tile holds all ranks of its features)
MIN_DOT = 16  # tl.dot needs every dimension >= 16 on NVIDIA GPUs; the interpreter does not check it


# ------------------------------------------------------------------------------------------------ tiles

def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """The tiles of the kernels for one (batch, chunk sizes, rank). A tile's N dimension is ``*_j * rank_p``."""
    rank_p: int  # rank padded to a power of two
    block_k: int  # contraction step over a chunk's inputs (forward and every recomputation of y)
    block_s: int  # power of two >= the largest chunk: the dx kernel's row of g and t, the norm kernel's row
    out_head: int  # the dx and dW outputs cover a chunk's width with a head tile and a tail tile (0: none)
    out_tail: int
    fwd_b: int  # forward: batch rows, features per tile, warps
    fwd_j: int
    fwd_warps: int
    norm_b: int  # norm kernel: batch rows per program
    dx_b: int  # dx kernel: batch rows, features per step, warps
    dx_j: int
    dx_warps: int
    dw_b: int  # dW kernel: batch rows per step, features per program, warps
    dw_j: int
    dw_warps: int


def _block_k(sizes) -> int:
    """The K step with the least padding over the chunks (the larger on ties): 16 for chunks of 80 (0%; 32 would pad
    to 96, 64 and the old whole-chunk tile to 128), 16 for chunks of 15 (6.25%)."""
    best = None
    for bk in (64, 32, 16):
        waste = 1 - sum(sizes) / sum(cdiv(s, bk) * bk for s in sizes)
        if best is None or waste < best[0] - 1e-12:
            best = (waste, bk)
    return best[1]


def block_plan(n_rows: int, sizes, rank: int, *, sms: int = 132, ieee_fp32: bool = False,
               interpreted: bool | None = None, **overrides) -> BlockPlan:
    """Tiles for a launch, chosen to (1) keep every dot dimension a power of two >= 16, (2) hold two fp32 [rows, N]
    accumulators in <= 64 registers a thread, (3) give each of the forward, dx and dW launches >= ``sms`` programs
    where the batch allows. ``ieee_fp32``: float32 dots at "highest" (FFMA, operands in registers): half the
    forward, dx and dW tiles (the sm_90 build spilled 72, 636 and 20 B with the tensor-core tiles). Not timed on a
    GPU yet (owed); checked for spills and tensor-core use in the sm_90 build
    (tests/test_block_kernel.py, ``hopper_specs``). At (1600, 20, 15), B=64: rank_p 16, K step 16; forward 64 rows x
    (8 features x 16 ranks) -> 20 x 1 x 10 = 200 programs + norm 20 x 8 = 160; dx 16 rows -> 20 x 4 x 2 = 160; dW
    8 features x 16 ranks -> 20 x 10 x 2 = 400. ``overrides``: any field, e.g. to force tile shapes in tests."""
    interpreted = triton_interpreted() if interpreted is None else interpreted
    max_s, chunks = max(sizes), len(sizes)
    rank_p = next_power_of_2(rank)
    block_s = max(MIN_DOT, next_power_of_2(max_s))
    out_head, out_tail = _out_tiles(max_s, block_s)
    min_j = cdiv(MIN_DOT, rank_p)  # features a tile needs for N >= 16
    whole = max(min_j, next_power_of_2(max_s))  # one tile per chunk
    rows = max(MIN_DOT, min(64, next_power_of_2(n_rows)))  # the interpreter pays per program: few big tiles
    # forward: a whole chunk per tile (normalised in the same launch) while N <= 256, else N = 128. Warps: 8 from
    # 8192 accumulator elements or N = 256 (4 warps spilled 128 B at (256, 18, 15) in TF32); dW 8 (4 spilled 40-180 B
    # at chunks of 15 and of 80)
    fwd_j = whole if whole * rank_p <= 256 else max(min_j, 128 // rank_p)
    fwd_b, budget = rows, 4096 if ieee_fp32 else 8192
    while fwd_b > MIN_DOT and fwd_b * fwd_j * rank_p > budget:
        fwd_b //= 2
    n_j = cdiv(max_s, fwd_j)
    while not interpreted and fwd_b > MIN_DOT and chunks * cdiv(n_rows, fwd_b) * n_j < sms:
        fwd_b //= 2
    norm_b = rows if interpreted else min(16, 1 << max(0, (chunks * n_rows // sms).bit_length() - 1))
    # dx: [rows, block_s] accumulator and a [N, block_s] weight tile per step, N * block_s <= budget (FFMA: 4096;
    # 8192 spilled 476 B there)
    dx_j = max(min_j, min(min(128, max(MIN_DOT, budget // block_s)) // rank_p, whole))  # per block_s, not out_w
    # dW: [N, block_s] accumulator, N * block_s <= 8192 (N * block_s = 16384 spilled 168 B at 8 warps in bf16)
    dw_j = max(min_j, min(min(128, max(MIN_DOT, 8192 // block_s)) // rank_p, whole))  # idem
    dw_b = rows if interpreted else (MIN_DOT if ieee_fp32 else 32)
    plan = BlockPlan(
        rank_p=rank_p, block_k=_block_k(sizes), block_s=block_s, out_head=out_head, out_tail=out_tail,
        fwd_b=fwd_b, fwd_j=fwd_j, fwd_warps=8 if fwd_b * fwd_j * rank_p >= budget or fwd_j * rank_p >= 256 else 4,
        norm_b=norm_b, dx_b=rows if interpreted else MIN_DOT, dx_j=dx_j, dx_warps=8,
        dw_b=dw_b, dw_j=dw_j, dw_warps=8)
    plan = dataclasses.replace(plan, **overrides)
    _check_plan(plan, max_s, rank)
    return plan


def _out_tiles(max_s: int, block_s: int) -> tuple[int, int]:
    """(head, tail) widths covering a chunk of max_s in the dx/dW outputs: the largest power of two <= max_s and the
    power of two >= the rest (80 -> 64 + 16, 40 -> 32 + 16), or one tile of block_s where that saves nothing
    (100 -> 128, 15 -> 16)."""
    head = max(MIN_DOT, 1 << (max_s.bit_length() - 1))
    tail = 0 if max_s <= head else max(MIN_DOT, next_power_of_2(max_s - head))
    return (head, tail) if head + tail < block_s else (block_s, 0)


def _check_plan(plan: BlockPlan, max_s: int, rank: int) -> None:
    dots = {"fwd_b": plan.fwd_b, "block_k": plan.block_k, "block_s": plan.block_s, "out_head": plan.out_head,
            "out_tail": plan.out_tail or MIN_DOT, "dx_b": plan.dx_b,
            "dw_b": plan.dw_b, "fwd_j*rank_p": plan.fwd_j * plan.rank_p, "dx_j*rank_p": plan.dx_j * plan.rank_p,
            "dw_j*rank_p": plan.dw_j * plan.rank_p}
    bad = {k: v for k, v in dots.items() if v < MIN_DOT or not _pow2(v)}
    if bad:
        raise ValueError(f"tl.dot needs tiles >= {MIN_DOT} in every dimension, powers of two; got {bad}")
    others = {"rank_p": plan.rank_p, "fwd_j": plan.fwd_j, "dx_j": plan.dx_j, "dw_j": plan.dw_j, "norm_b": plan.norm_b}
    bad = {k: v for k, v in others.items() if not _pow2(v)}
    if bad:
        raise ValueError(f"tile sizes must be powers of two, got {bad}")
    if plan.rank_p < rank or plan.block_s < max_s or plan.out_head + plan.out_tail < max_s:
        raise ValueError(f"rank_p={plan.rank_p} must be >= the rank ({rank}), block_s={plan.block_s} and out_head + "
                         f"out_tail={plan.out_head}+{plan.out_tail} >= the largest chunk ({max_s})")


def _fwd_tiles(plan: BlockPlan, sizes) -> int:
    return cdiv(max(sizes), plan.fwd_j)


def padding_waste(plan: BlockPlan, n_rows: int, sizes, rank: int) -> dict[str, float]:
    """Share of each padded dimension that is padding, summed over chunks. Inner (contraction) dimensions: ``k``
    (a chunk's inputs, in steps of block_k: forward and every recomputation of y), ``dx_n`` (features x ranks of the
    dx product), ``dw_batch`` (rows of the dW product). Output dimensions: ``fwd_n`` (features x ranks of a forward
    tile) and ``chunk_out`` (a chunk's inputs padded to out_head + out_tail in the dx and dW outputs)."""
    total = sum(sizes)

    def n_waste(j: int) -> float:
        return 1 - rank * total / sum(cdiv(s, j) * j * plan.rank_p for s in sizes)

    return {"k": 1 - total / sum(cdiv(s, plan.block_k) * plan.block_k for s in sizes),
            "dx_n": n_waste(plan.dx_j), "dw_batch": 1 - n_rows / (cdiv(n_rows, plan.dw_b) * plan.dw_b),
            "fwd_n": n_waste(plan.fwd_j), "chunk_out": 1 - total / (len(sizes) * (plan.out_head + plan.out_tail))}


def chunk_layout(sizes) -> dict[str, int]:
    """The kernels' compile-time chunk arguments: S, the chunk size when every chunk has it (else 0: read from
    META), and ALIGN, the largest power of two <= 16 dividing every chunk size (so every column, weight and bias
    offset), declared to Triton so loads of 16-bit and 32-bit data vectorise where the sizes allow."""
    sizes = [int(s) for s in sizes]
    g = math.gcd(*sizes)
    return {"S": sizes[0] if len(set(sizes)) == 1 else 0, "ALIGN": min(16, g & -g)}


def dot_precision(dtype: torch.dtype, precision: str | None = None) -> str:
    """``tl.dot``'s input_precision: IEEE fp32 for float32 at "highest" (PyTorch's default), TF32 at "high" and
    "medium" (what cuBLAS uses there); 16-bit inputs ignore it (tensor cores either way)."""
    precision = precision or torch.get_float32_matmul_precision()
    if precision not in ("highest", "high", "medium"):
        raise ValueError(f"precision must be 'highest', 'high' or 'medium', got {precision!r}")
    return "tf32" if dtype == torch.float32 and precision != "highest" else "ieee"


def _ieee_fp32(dtype: torch.dtype, prec: str) -> bool:
    return dtype == torch.float32 and prec == "ieee"


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return GPUS["H100 SXM"]["sms"]


# --------------------------------------------------------------------------------------- the dispatch rule
# choose_block_path picks the path with the smaller estimated time of one training step (forward + backward) from
# the static model below. Its efficiencies and launch costs are ASSUMPTIONS (nothing here has run on a GPU yet; the
# bench rows `pytest bench/bench_block.py` on an H100/H200 are what should replace them -- owed). Units: U = 2*B*R*S2
# FLOPs, one side's products y over all chunks (S2 = sum_c s_c^2).
#   fused: FLOPs = U * rank_p/R * (2 k + 2 k + 2 o + 2 k + 2 o) -- forward (2 products), dx (2 recomputed products,
#          2 dx products over the padded chunk width o = (out_head + out_tail)/s), dW (likewise); k = padded K / s.
#          time = launches * LAUNCH_TRITON + max(FLOPs / (rate * EFF_FUSED), bytes / HBM), launches 3 or 4.
#   bmm:   FLOPs = 6 U (cuBLAS, no padding, no recomputation); y0, y1 and their gradients go through HBM:
#          BMM_TRAFFIC x B*R*mm elements; launches per group of equal-size chunks, eager or under torch.compile.
#          time = launches * LAUNCH + FLOPs / (rate * EFF_CUBLAS) + bytes / HBM (separate kernels: no overlap).
LAUNCH_TRITON = 4e-6  # assumed: one Triton launch from Python incl. host overhead (no CUDA graph)
LAUNCH_EAGER = 5e-6  # assumed: one eager PyTorch op (dispatcher + launch)
LAUNCH_COMPILED = 3e-6  # assumed: one kernel of an Inductor graph
EFF_FUSED = {"mma": 0.3, "ffma": 0.5}  # assumed share of the unit's peak the fused kernels reach (small tiles)
EFF_CUBLAS = 0.6  # assumed share of peak for cuBLAS batched GEMMs of this size
BMM_LAUNCHES = {"eager": (14, 30), "compiled": (3, 6)}  # per size group (forward, backward), counted from the code
BMM_TRAFFIC = {"eager": 14, "compiled": 12}  # B*R*mm-element passes over HBM (y0, y1, their product, dy0, dy1)


def _rate_key(dtype: torch.dtype, precision: str) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "bf16"
    return "fp32" if precision == "highest" else "tf32"


def _gpu_name(device: torch.device | str) -> str:
    return _gpu_name_of(str(torch.device(device)))


@functools.lru_cache(maxsize=16)
def _gpu_name_of(device: str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and "H200" in torch.cuda.get_device_name(device):
        return "H200"
    return "H100 SXM"


def estimate_fused(batch: int, sizes, rank: int, dtype: torch.dtype, precision: str, gpu: str = "H100 SXM"
                   ) -> float:
    """Estimated seconds of one fused forward + backward (the model above)."""
    spec, key = GPUS[gpu], _rate_key(dtype, precision)
    plan = block_plan(batch, sizes, rank, sms=spec["sms"], ieee_fp32=key == "fp32", interpreted=False)
    s2 = sum(s * s for s in sizes)
    unit = 2 * batch * rank * s2
    k = sum(s * cdiv(s, plan.block_k) * plan.block_k for s in sizes) / s2
    o = sum(s * (plan.out_head + plan.out_tail) for s in sizes) / s2
    flops = unit * plan.rank_p / rank * (6 * k + 4 * o)
    eff = EFF_FUSED["ffma" if key == "fp32" else "mma"]
    launches = 3 + (_fwd_tiles(plan, sizes) > 1)
    nbytes = block_merge_bytes(batch, sizes, rank, dtype.itemsize, dtype.itemsize, backward=True)
    return launches * LAUNCH_TRITON + max(flops / (spec[key] * eff), nbytes / spec["hbm"])


def estimate_bmm(batch: int, sizes, rank: int, dtype: torch.dtype, precision: str, gpu: str = "H100 SXM",
                 compiled: bool = False) -> float:
    """Estimated seconds of one forward + backward of ``block_merge_bmm`` (the model above)."""
    spec, key, how = GPUS[gpu], _rate_key(dtype, precision), "compiled" if compiled else "eager"
    groups = len(block_size_groups(sizes))
    launches = groups * sum(BMM_LAUNCHES[how]) + (2 if groups > 1 else 0)  # + the cat and its backward
    flops = 6 * 2 * batch * rank * sum(s * s for s in sizes)
    nbytes = BMM_TRAFFIC[how] * batch * rank * sum(sizes) * dtype.itemsize + block_merge_bytes(
        batch, sizes, rank, dtype.itemsize, dtype.itemsize, backward=True)
    launch = LAUNCH_COMPILED if compiled else LAUNCH_EAGER
    return launches * launch + flops / (spec[key] * EFF_CUBLAS) + nbytes / spec["hbm"]


def choose_block_path(sizes, rank: int, batch: int, dtype: torch.dtype, device: torch.device | str, *,
                      compiled: bool | None = None, precision: str | None = None, gpu: str | None = None) -> str:
    """'fused' (the Triton kernels), 'bmm' (``block_merge_bmm``) or 'reference' (the chunk loop) for one call.

    ``CMC_FAST_KERNELS``: ``reference`` and ``bmm`` force those paths, ``triton`` the fused kernels (the reference
    where they do not fit: chunks > MAX_CHUNK or rank > MAX_RANK, as before). ``auto``: the reference off CUDA (as
    before); on CUDA the bmm path where the kernels do not fit, else whichever of ``estimate_fused`` and
    ``estimate_bmm`` is smaller, the bmm path counted compiled when the call is being traced by torch.compile."""
    compiled = torch.compiler.is_compiling() if compiled is None else compiled
    return _path(tuple(int(s) for s in sizes), int(rank), int(batch), dtype, str(torch.device(device)), compiled,
                 precision, gpu)


@torch.compiler.assume_constant_result  # under torch.compile: decided at trace time, not traced into
def _path(sizes: tuple[int, ...], rank: int, batch: int, dtype: torch.dtype, device: str, compiled: bool,
          precision: str, gpu: str | None) -> str:
    mode, device = kernel_mode(), torch.device(device)
    fits = max(sizes) <= MAX_CHUNK and rank <= MAX_RANK
    if mode in ("reference", "bmm"):
        return mode
    if mode == "triton":
        return "fused" if fits else "reference"
    if device.type != "cuda" or not triton_available():
        return "reference"
    if not fits:
        return "bmm"
    gpu = gpu or _gpu_name(device)
    precision = precision or torch.get_float32_matmul_precision()
    return _cheaper_path(sizes, rank, batch, dtype, precision, gpu, compiled)


@functools.lru_cache(maxsize=256)
def _cheaper_path(sizes: tuple[int, ...], rank: int, batch: int, dtype: torch.dtype, precision: str, gpu: str,
                  compiled: bool) -> str:
    """The static estimates are pure functions of the shape: computed once per shape, not on every eager call."""
    fused = estimate_fused(batch, sizes, rank, dtype, precision, gpu)
    bmm = estimate_bmm(batch, sizes, rank, dtype, precision, gpu, compiled)
    return "fused" if fused <= bmm else "bmm"


# ---------------------------------------------------------------------------------------------- floors
def block_merge_bytes(batch: int, sizes, rank: int, x_bytes: int, w_bytes: int, *, backward: bool = False) -> int:
    """HBM bytes the merge cannot avoid: weights and activations once each (see the module docstring)."""
    s2, mm = sum(s * s for s in sizes), sum(sizes)
    nbytes = 2 * rank * s2 * w_bytes + 2 * rank * mm * w_bytes + 3 * batch * mm * x_bytes
    if backward:
        nbytes += 4 * rank * s2 * w_bytes + 4 * rank * mm * w_bytes + 5 * batch * mm * x_bytes
    return nbytes


def block_merge_floor(batch: int, sizes, rank: int, *, dtype: torch.dtype = torch.float32,
                      w_dtype: torch.dtype | None = None, precision: str = "highest", gpu: str = "H100 SXM",
                      backward: bool = False) -> float:
    """Seconds the merge cannot beat on ``gpu`` (a key of ``GPUS``): max(FLOPs / the rate of dtype and precision,
    bytes / HBM bandwidth)."""
    if gpu not in GPUS:
        raise ValueError(f"gpu must be one of {sorted(GPUS)}, got {gpu!r}")
    spec = GPUS[gpu]
    flops = (12 if backward else 4) * batch * rank * sum(s * s for s in sizes)
    nbytes = block_merge_bytes(batch, sizes, rank, dtype.itemsize, (w_dtype or dtype).itemsize, backward=backward)
    return max(flops / spec[_rate_key(dtype, precision)], nbytes / spec["hbm"])


# ======================================================================================= static report
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _report_args(shape, dtype: str, precision: str):
    if len(shape) != 4:
        raise ValueError(f"block shape is B,DIM,CHUNKS,RANK, got {shape}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if precision not in ("highest", "high", "medium"):
        raise ValueError(f"precision must be highest, high or medium, got {precision!r}")
    b, dim, chunks, rank = shape
    return b, block_chunk_sizes(dim, chunks), rank


def hopper_specs(shape: tuple[int, ...], dtype: str = "fp32", precision: str = "highest",
                 gpu: str = "H100 SXM") -> list:
    """The specialisations one ``block_merge`` forward + backward through the fused kernels runs at shape
    (B, DIM, CHUNKS, RANK) on ``gpu`` (a key of ``GPUS``: its SM count sizes the plan, its clock the issue bound),
    x and weights of ``dtype``, float32 matmul precision ``precision``: forward (+ norm where a chunk spans several
    feature tiles), dx, dW, each with its source loops and trip counts (``hopper_build.Loop``) and its share of the
    floor (``kernel_floors``). For ``kernels.hopper_build report``; whether ``block_merge`` picks this path at that
    shape is ``choose_block_path``'s call."""
    from . import block as k  # lazily: the kernels live in the op file, which imports this module
    from .hopper_build import Loop, Spec  # lazily: hopper_build imports Triton's compiler

    b, sizes, rank = _report_args(shape, dtype, precision)
    if gpu not in GPUS:
        raise ValueError(f"gpu must be one of {sorted(GPUS)}, got {gpu!r}")
    spec_gpu = GPUS[gpu]
    chunks, mm, max_s = len(sizes), sum(sizes), max(sizes)
    prec = dot_precision(_DTYPES[dtype], precision)
    plan = block_plan(b, sizes, rank, sms=spec_gpu["sms"], ieee_fp32=_ieee_fp32(_DTYPES[dtype], prec),
                      interpreted=False)
    x, f32 = "*" + dtype, "*fp32"
    types = {"X0": x, "X1": x, "OUT": x, "G": x, "DX0": x, "DX1": x, "T": f32, "SQ": f32, "NORM": f32, "DZ": f32,
             "META": "*i64", **{n: x for n in ("W0", "B0", "W1", "B1", "DW0", "DB0", "DW1", "DB1")}}
    ints = {"n_rows": b, "MM": mm, "C": chunks, "R": rank}
    # what the JIT specialises: integers equal to 1 become constants, pointers and multiples of 16 are marked
    ones = {k: 1 for k, v in ints.items() if v == 1}
    divisible = tuple(types) + tuple(k for k, v in ints.items() if v % 16 == 0 and v != 1)
    waste = padding_waste(plan, b, sizes, rank)
    n_j = _fwd_tiles(plan, sizes)
    fused = n_j == 1
    layout = chunk_layout(sizes)
    common = {"RANK_P": plan.rank_p, "BLOCK_K": plan.block_k, "PREC": prec, **layout}
    floors = kernel_floors(b, sizes, rank, _DTYPES[dtype], precision, gpu)
    # trip counts at the largest chunk (a shorter one runs fewer: the bound is for the longest program)
    const = layout["S"] > 0

    def k_loop(name):
        return Loop(name, cdiv(max_s, plan.block_k), unrollable=const)

    def spec(fn, consts, warps, programs, inner, outputs, loops, floor_key):
        consts = {k: v for k, v in {**common, **consts, **ones}.items() if k in fn.arg_names}
        names = tuple(n for n in divisible if n in fn.arg_names and n not in consts)
        return Spec(fn, types, consts, warps, names, f"{dtype} {precision}", programs,
                    extra={"padding_waste": round(max(waste[k] for k in inner), 4) if inner else None,
                           "padding": {k: round(waste[k], 4) for k in inner + outputs}, "dot_precision": prec},
                    loops=loops, timing={"gpu": gpu, "sms": spec_gpu["sms"], "clock_hz": spec_gpu["clock_hz"],
                                         "floor_us": 1e6 * floors[floor_key]})

    specs = [spec(k._block_fwd_kernel, {"BLOCK_B": plan.fwd_b, "BLOCK_J": plan.fwd_j, "NORMALIZE": True,
                                        "FUSED_NORM": fused}, plan.fwd_warps,
                  chunks * cdiv(b, plan.fwd_b) * n_j, ("k",), ("fwd_n",), (k_loop("k y0"), k_loop("k y1")), "fwd")]
    if not fused:
        specs.append(spec(k._block_norm_kernel, {"BLOCK_B": plan.norm_b, "BLOCK_S": plan.block_s,
                                                 "BLOCK_J": plan.fwd_j, "N_JP": next_power_of_2(n_j)}, 4,
                          chunks * cdiv(b, plan.norm_b), (), ("chunk_out",), (), "norm"))
    out = {"HEAD": plan.out_head, "TAIL": plan.out_tail}
    dx_loops = (Loop("features", cdiv(max_s, plan.dx_j), (k_loop("k y"),), unrollable=const),)
    specs.append(spec(k._block_bwd_dx_kernel, {"BLOCK_B": plan.dx_b, "BLOCK_J": plan.dx_j, "BLOCK_S": plan.block_s,
                                               "NORMALIZE": True, **out}, plan.dx_warps,
                      chunks * cdiv(b, plan.dx_b) * 2, ("k", "dx_n"), ("chunk_out",), dx_loops, "dx"))
    dw_loops = (Loop("batch", cdiv(b, plan.dw_b), (k_loop("k y"),)),)
    specs.append(spec(k._block_bwd_dw_kernel, {"BLOCK_B": plan.dw_b, "BLOCK_J": plan.dw_j, **out},
                      plan.dw_warps, chunks * cdiv(max_s, plan.dw_j) * 2, ("k", "dw_batch"), ("chunk_out",),
                      dw_loops, "dw"))
    return specs


def kernel_floors(batch: int, sizes, rank: int, dtype: torch.dtype, precision: str, gpu: str) -> dict[str, float]:
    """Each kernel's share of the merge's floor, seconds: max(its FLOPs / the precision's rate, its bytes / HBM).
    forward: 4 B R S2 FLOPs, weights, biases, x0, x1 and out; dx: the two dx products (4 B R S2, the recomputed y
    not counted), weights, biases, x0, x1, g, dx0, dx1; dW: the two dW products (4 B R S2), dW and db written;
    norm: nothing the merge needs (0). Their sum over one forward + backward is >= ``block_merge_floor``."""
    spec = GPUS[gpu]
    rate = spec[_rate_key(dtype, precision)]
    s2, mm, xb, wb = sum(s * s for s in sizes), sum(sizes), dtype.itemsize, dtype.itemsize
    weights = 2 * rank * s2 * wb + 2 * rank * mm * wb
    flops = 4 * batch * rank * s2
    return {"fwd": max(flops / rate, (weights + 3 * batch * mm * xb) / spec["hbm"]),
            "norm": 0.0,
            "dx": max(flops / rate, (weights + 5 * batch * mm * xb) / spec["hbm"]),
            "dw": max(flops / rate, weights / spec["hbm"])}


def hopper_floors(shape: tuple[int, ...], dtype: str = "fp32", precision: str = "highest",
                  gpu: str = "H100 SXM") -> dict:
    """Floors (microseconds) of the forward and the forward + backward at ``shape`` on each GPU of ``GPUS``."""
    b, sizes, rank = _report_args(shape, dtype, precision)
    t = _DTYPES[dtype]
    return {f"{gpu} {what} us": round(1e6 * block_merge_floor(b, sizes, rank, dtype=t, precision=precision, gpu=gpu,
                                                             backward=bwd), 2)
            for gpu in GPUS for what, bwd in (("fwd", False), ("fwd+bwd", True))}
