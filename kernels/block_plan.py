"""BLOCK's planning and cost model beside the op file ``kernels/block.py``: the kernels' tiles (``block_plan``), the
compile-time chunk layout, the floors, and the rule that picks the fused kernels or the batched-bmm path per shape
(``choose_block_path``) from the fused kernels' issue bound (``kernels/block_bounds.json``) against the bmm path's
GEMM floors. The GPUs' figures come from ``kernels/gpus.py``; the static report's specialisations and the writer
of the bounds table live in ``kernels/block_sm90.py``. Nothing here launches or builds a kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable

import torch

from .dispatch import kernel_mode, triton_available, triton_interpreted
from .gpus import GPUS, device_timing, gpu_name, issue_bound_s
from .reference import block_chunk_sizes, block_size_groups
from .utils import cdiv, next_power_of_2

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
    dx_split: int  # programs sharing one chunk's features in dx (2: float32 partial sums added atomically)
    dw_b: int  # dW kernel: batch rows per step, features per program, warps
    dw_j: int
    dw_warps: int
    # dx/dW tiles' N order (block.py _tile_rows): rank-major n = r * BLOCK_J + jj (8-byte bias loads; the forward
    # always), else feature-major n = jj * RANK_P + r. The bias in the accumulator before the products (bias_first)
    # or after them. Both off at 3xTF32, where at (1600, 20, 15) they issued 1-4% more; elsewhere up to 24% less
    # (bf16 dx), no kernel of the 12 report shapes more (bench/results/block-sm90-static.md).
    rank_major: bool = True
    bias_first: bool = True


def _block_k(sizes) -> int:
    """The K step with the least padding over the chunks (the larger on ties): 16 for chunks of 80 (0%; 32 would pad
    to 96, 64 and the old whole-chunk tile to 128), 16 for chunks of 15 (6.25%)."""
    best = None
    for bk in (64, 32, 16):
        waste = 1 - sum(sizes) / sum(cdiv(s, bk) * bk for s in sizes)
        if best is None or waste < best[0] - 1e-12:
            best = (waste, bk)
    return best[1]


def block_plan(n_rows: int, sizes, rank: int, *, sms: int = 132, ieee_fp32: bool = False, tf32x3: bool = False,
               itemsize: int = 4, interpreted: bool | None = None, **overrides) -> BlockPlan:
    """Tiles for a launch, chosen to (1) keep every dot dimension a power of two >= 16, (2) hold two fp32 [rows, N]
    accumulators without spilling, (3) have no warp compute a dot tile another warp computes, (4) issue the fewest
    instructions by the static report's count (sm_90 SASS, loops x trips: swept by hand at (1600, 20, 15), B=64).
    ``ieee_fp32``: float32 dots at "highest" (FFMA, operands in registers): smaller tiles (the sm_90 build spilled
    72, 636 and 20 B with the tensor-core tiles). ``tf32x3``: float32 dots split into three TF32 products (what
    "highest" runs, see ``dot_precision``): each operand is held twice (big and small halves), so the forward takes
    half the rows of TF32 (64 spilled 68 B), dx half the features a step (4 spilled 172 B), and dx splits each
    chunk's features over two programs (``dx_split``: 40 programs at B=64 left 92 of 132 SMs idle). ``itemsize``:
    the larger element size of x and the weights
    (16-bit: a larger dx tile). Not timed on a GPU yet (owed); checked for spills, tile replication, tensor-core use
    and the issue bound in the sm_90 build (tests/test_block_kernel.py, ``hopper_specs``). At (1600, 20, 15), B=64,
    bf16: rank_p 16, K step 16; forward 64 rows x (8 features x 16 ranks) on 4 warps -> 20 x 1 x 10 = 200 programs +
    norm 20 x 8 = 160; dx 64 rows x 8 features on 4 warps -> 20 x 1 x 2 = 40; dW 4 features x 16 ranks, 32 rows a
    step, on 4 warps -> 20 x 20 x 2 = 800. ``overrides``: any field, e.g. to force tile shapes in tests."""
    interpreted = triton_interpreted() if interpreted is None else interpreted
    max_s, chunks = max(sizes), len(sizes)
    rank_p = next_power_of_2(rank)
    block_s = max(MIN_DOT, next_power_of_2(max_s))
    out_head, out_tail = _out_tiles(max_s, block_s)
    min_j = cdiv(MIN_DOT, rank_p)  # features a tile needs for N >= 16
    whole = max(min_j, next_power_of_2(max_s))  # one tile per chunk
    rows = max(MIN_DOT, min(64, next_power_of_2(n_rows)))  # the interpreter pays per program: few big tiles
    # forward: a whole chunk per tile (normalised in the same launch) while N <= 256, else N = 128
    fwd_j = whole if whole * rank_p <= 256 else max(min_j, 128 // rank_p)
    fwd_b, budget = rows, 4096 if ieee_fp32 or tf32x3 else 8192
    while fwd_b > MIN_DOT and fwd_b * fwd_j * rank_p > budget:
        fwd_b //= 2
    n_j = cdiv(max_s, fwd_j)
    while not interpreted and fwd_b > MIN_DOT and chunks * cdiv(n_rows, fwd_b) * n_j < sms:
        fwd_b //= 2
    # warps: 8 from N = 256 (4 spilled 128 B at (256, 18, 15) in TF32) or, FFMA, 4096 accumulator elements; else 4
    # (at 64 x 128 on tensor cores 8 warps issued 1.9x the instructions of 4: bf16 872 vs 904 a warp)
    fwd_warps = 8 if fwd_j * rank_p >= 256 or (ieee_fp32 and fwd_b * fwd_j * rank_p >= budget) else 4
    norm_b = rows if interpreted else min(16, 1 << max(0, (chunks * n_rows // sms).bit_length() - 1))
    # dx: [rows, block_s] accumulator and a [N, block_s] weight tile per step, N * block_s <= a budget (FFMA 4096:
    # 8192 spilled 476 B there; TF32 8192: 16384 spilled 28 B; 16-bit 16384). Tensor cores: Triton stacks the
    # warps of a dot fed by another dot along M ([warps, 1]), so the dx product needs 16 rows a warp -- 64 rows on 4
    # warps (the old 16 rows on 8 warps computed each tile 8 times); FFMA dots (blocked layouts): 32 rows, 4 warps
    dx_budget = 4096 if ieee_fp32 else 16384 if itemsize == 2 else 8192
    # TF32 at N = 128 spilled 12 B at chunks of 15; 3xTF32 at N = 64 spilled 172 B at chunks of 80
    dx_n = 32 if tf32x3 else 64 if not ieee_fp32 and itemsize == 4 else 128
    dx_j = max(min_j, min(min(dx_n, max(MIN_DOT, dx_budget // block_s)) // rank_p, whole))  # per block_s
    dx_b = rows if interpreted else min(32 if ieee_fp32 else 64, rows)
    dx_warps = 4 if ieee_fp32 else max(1, dx_b // MIN_DOT)
    # dW: [N, block_s] accumulator, N * block_s <= 8192 (N * block_s = 16384 spilled 168 B at 8 warps in bf16); 4
    # warps on tensor cores (8 issued 1.75x the bound of 4 at (1600, 20, 15), B=64), 8 for FFMA
    dw_j = max(min_j, min(min(128, max(MIN_DOT, 8192 // block_s)) // rank_p, whole))  # idem
    dw_b = rows if interpreted else (MIN_DOT if ieee_fp32 else 32)
    plan = BlockPlan(
        rank_p=rank_p, block_k=_block_k(sizes), block_s=block_s, out_head=out_head, out_tail=out_tail,
        fwd_b=fwd_b, fwd_j=fwd_j, fwd_warps=fwd_warps,
        norm_b=norm_b, dx_b=dx_b, dx_j=dx_j, dx_warps=dx_warps,
        dw_b=dw_b, dw_j=dw_j, dw_warps=8 if ieee_fp32 else 4, dx_split=2 if tf32x3 else 1,
        rank_major=not tf32x3, bias_first=not tf32x3)
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
    """``tl.dot``'s input_precision for x of ``dtype`` under ``torch.get_float32_matmul_precision()``: TF32 at
    "high" and "medium" (what cuBLAS uses there); at "highest" (PyTorch's default) "tf32x3": each float32 operand
    split into a TF32 big half and the rest, three TF32 tensor-core products (small*big + big*small + big*big, as
    cuBLAS's CUBLAS_COMPUTE_32F_FAST_TF32 mode), where FFMA ("ieee") issued 4.1x the floor at (1600, 20, 15), B=64.
    What it costs in accuracy, measured on the CPU by emulating the split and TF32's rounding in the interpreter's
    dot (tests/test_block_kernel.py ``test_tf32x3_meets_highest``): the kernels' error against the float64 oracle
    stays within a small factor of PyTorch's own float32 reference (the "highest" promise; plain TF32 is ~100x
    further off). The product dropped (small*small) is ~2^-22 relative, below float32's rounding of the inputs;
    the tensor cores' accumulation order is not modelled there (its GPU check is owed). 16-bit inputs ignore the
    precision (tensor cores either way): "ieee" names nothing for them."""
    precision = precision or torch.get_float32_matmul_precision()
    if precision not in ("highest", "high", "medium"):
        raise ValueError(f"precision must be 'highest', 'high' or 'medium', got {precision!r}")
    if dtype != torch.float32:
        return "ieee"
    return "tf32x3" if precision == "highest" else "tf32"


def _ieee_fp32(dtype: torch.dtype, prec: str) -> bool:
    return dtype == torch.float32 and prec == "ieee"


def _tf32x3(dtype: torch.dtype, prec: str) -> bool:
    return dtype == torch.float32 and prec == "tf32x3"


# --------------------------------------------------------------------------------------- the dispatch rule
# choose_block_path picks the path with the smaller estimated time of one training step (forward + backward).
#   fused: launches * LAUNCH_TRITON + the kernels' issue bound (``fused_issue_bound``): the instructions one warp of
#          each kernel executes, read from its sm_90 SASS with every loop weighted by its trips (the static report,
#          kernels/block_sm90.py), at one instruction a cycle per scheduler on the device's SMs and clock. A lower
#          bound on the kernels (latency and memory only add): the fused path is picked only when even its bound
#          wins -- until GPU timings replace it (owed). Read from the committed table kernels/block_bounds.json
#          (``python -m cmc_fast.kernels.sm90_report bounds`` writes it); a shape the table does not hold has no
#          bound, so the fused path is not picked there (the plan reads the report's table, never builds kernels).
#   bmm:   the GEMM floor of its 6 products (cuBLAS: no padding, no recomputation) at EFF_CUBLAS of the rate, plus
#          y0, y1 and their gradients through HBM (BMM_TRAFFIC x B*R*mm elements) and its launches per group of
#          equal-size chunks, eager or under torch.compile (separate kernels: no overlap).
# The launch costs and EFF_CUBLAS are ASSUMPTIONS (nothing here has run on a GPU yet; the bench rows of
# `pytest bench/bench_block.py` on an H100/H200 are what should replace them -- owed).
LAUNCH_TRITON = 4e-6  # assumed: one Triton launch from Python incl. host overhead (no CUDA graph)
LAUNCH_EAGER = 5e-6  # assumed: one eager PyTorch op (dispatcher + launch)
LAUNCH_COMPILED = 3e-6  # assumed: one kernel of an Inductor graph
EFF_CUBLAS = 0.6  # assumed share of peak for cuBLAS batched GEMMs of this size
BMM_LAUNCHES = {"eager": (14, 30), "compiled": (3, 6)}  # per size group (forward, backward), counted from the code
BMM_TRAFFIC = {"eager": 14, "compiled": 12}  # B*R*mm-element passes over HBM (y0, y1, their product, dy0, dy1)
BOUNDS_FILE = os.path.join(os.path.dirname(__file__), "block_bounds.json")


def _rate_key(dtype: torch.dtype, precision: str) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "bf16"
    return "fp32" if precision == "highest" else "tf32"


def _bounds_key(batch: int, sizes, rank: int, dtype: str, precision: str) -> str:
    return f"{batch},{sum(sizes)},{len(sizes)},{rank} {dtype} {precision}"


def _table_dtype(dtype: torch.dtype, precision: str) -> tuple[str, str]:
    """The report's (dtype, precision) whose code a call runs: fp16 compiles as bf16 does (same tiles, same
    instruction counts), "medium" as "high" (both TF32), 16-bit inputs ignore the precision."""
    if dtype in (torch.float16, torch.bfloat16):
        return "bf16", "highest"
    return "fp32", "highest" if precision == "highest" else "high"


@functools.lru_cache(maxsize=1)
def _bounds_table() -> dict:
    try:
        with open(BOUNDS_FILE) as f:
            return json.load(f)["entries"]
    except FileNotFoundError:
        return {}


# Counts at a shape the table lacks: the op file (kernels/block.py), which owns the kernels to build, hands in the
# function that builds them for sm_90 and counts their SASS (``block_sm90.kernel_counts``); the plan cannot import
# it, since the op file imports the plan.
_count_missing: Callable[[tuple[int, int, int, int], str, str], list[dict]] | None = None


def count_missing_shapes_with(counter: Callable[[tuple[int, int, int, int], str, str], list[dict]] | None) -> None:
    """Where ``_counts`` finds a shape the bounds table lacks: ``counter(shape, dtype, precision)`` (None: nowhere,
    such a shape then has no bound and takes the bmm path)."""
    global _count_missing
    _count_missing = counter
    _counts.cache_clear()
    _cheaper_path.cache_clear()


@functools.lru_cache(maxsize=64)
def _counts(batch: int, sizes: tuple[int, ...], rank: int, dtype: str, precision: str) -> tuple | None:
    """What the fused kernels execute at a shape: the bounds table's entry, else counted once at run time (some
    seconds of sm_90 compiles, cached per shape); None where neither can say (no compiler or ptxas here, or a
    chunking the report cannot name by (DIM, CHUNKS))."""
    entry = _bounds_table().get(_bounds_key(batch, sizes, rank, dtype, precision))
    if entry is None and _count_missing is not None and list(sizes) == block_chunk_sizes(sum(sizes), len(sizes)):
        try:
            entry = _count_missing((batch, sum(sizes), len(sizes), rank), dtype, precision)
        except Exception:  # noqa: BLE001 - no Triton compiler or ptxas here: no bound, so the fused path is not picked
            entry = None
    return None if entry is None else tuple(tuple(sorted(k.items())) for k in entry)


def fused_issue_bound(batch: int, sizes, rank: int, dtype: torch.dtype, precision: str, gpu: str = "H100 SXM",
                      timing: dict | None = None) -> float | None:
    """Seconds the fused kernels of one forward + backward take at least (their issue bound, see the dispatch
    notes above) on ``gpu``'s SMs and clock (``timing`` {"sms", "clock_hz"} overrides them); None without
    counts for that shape."""
    counts = _counts(int(batch), tuple(int(s) for s in sizes), int(rank), *_table_dtype(dtype, precision))
    if counts is None:
        return None
    timing = timing or {"sms": GPUS[gpu]["sms"], "clock_hz": GPUS[gpu]["clock_hz"]}
    return sum(k["launches"] * issue_bound_s(k["instructions_per_warp"], k["num_warps"], k["programs"],
                                             timing["sms"], timing["clock_hz"]) for k in map(dict, counts))


def estimate_fused(batch: int, sizes, rank: int, dtype: torch.dtype, precision: str, gpu: str = "H100 SXM",
                   timing: dict | None = None) -> float | None:
    """Estimated seconds of one fused forward + backward: its launches plus its issue bound (None without one)."""
    bound = fused_issue_bound(batch, sizes, rank, dtype, precision, gpu, timing)
    if bound is None:
        return None
    prec = dot_precision(dtype, precision)
    plan = block_plan(batch, sizes, rank, tf32x3=_tf32x3(dtype, prec), interpreted=False)
    split = plan.dx_split > 1 and dtype == torch.float32  # dx0 and dx1 zeroed first: two fills
    launches = 3 + (_fwd_tiles(plan, sizes) > 1) + 2 * split
    return launches * LAUNCH_TRITON + bound


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
    before); on CUDA the bmm path where the kernels do not fit, else the fused kernels only where
    ``estimate_fused`` (their issue bound) beats ``estimate_bmm``, the bmm path counted compiled when the call is
    being traced by torch.compile. ``gpu`` names the GPUS entry (default: the device's, with its own SM count and
    clock)."""
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
    timing = None if gpu else tuple(sorted(device_timing(str(device)).items()))
    gpu = gpu or gpu_name(device)
    precision = precision or torch.get_float32_matmul_precision()
    return _cheaper_path(sizes, rank, batch, dtype, precision, gpu, compiled, timing)


@functools.lru_cache(maxsize=256)
def _cheaper_path(sizes: tuple[int, ...], rank: int, batch: int, dtype: torch.dtype, precision: str, gpu: str,
                  compiled: bool, timing: tuple | None = None) -> str:
    """The estimates are pure functions of the shape and the device: computed once per shape, not on every call."""
    fused = estimate_fused(batch, sizes, rank, dtype, precision, gpu, dict(timing) if timing else None)
    bmm = estimate_bmm(batch, sizes, rank, dtype, precision, gpu, compiled)
    return "fused" if fused is not None and fused < bmm else "bmm"


# ---------------------------------------------------------------------------------------------- floors
# Floors per GPU (``kernels.gpus.GPUS``). FLOPs 4*B*R*S2 forward and 8*B*R*S2 backward with S2 = sum_c s_c^2;
# bytes (weights and activations once each) 2*R*S2*wb + 2*R*MM*wb + 3*B*MM*xb forward, 4*R*S2*wb + 4*R*MM*wb +
# 5*B*MM*xb backward; floor = max(FLOPs / rate, bytes / HBM). Rates: FP32 (FFMA: cuBLAS's "highest") for float32 at
# "highest" (the static report gives the 3xTF32 floor beside it), TF32 dense at "high"/"medium", BF16/FP16 dense for
# 16-bit inputs. At (1600, 20, 15), B=64 on an H100 SXM:
# fp32 highest fwd+bwd 1.47 GFLOP / 67 TFLOP/s = 22 us (bytes 49.9 MB / 3.35 TB/s = 14.9 us); fp32 TF32 14.9 us
# (HBM-bound); bf16 25 MB -> 7.5 us (HBM-bound). On an H200 (4.8 TB/s) the HBM-bound floors are 1.43x lower.
def block_merge_bytes(batch: int, sizes, rank: int, x_bytes: int, w_bytes: int, *, backward: bool = False) -> int:
    """HBM bytes the merge cannot avoid: weights and activations once each (above)."""
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


def check_merge_args(x0, x1, w0, b0, w1, b1, sizes, rank) -> None:
    """The merge's inputs against each other and the chunking (flat stacked weights): ValueError/TypeError naming
    the argument."""
    if x0.dim() != 2 or x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must both be [B, mm], got {tuple(x0.shape)} and {tuple(x1.shape)}")
    if x0.dtype != x1.dtype:
        raise ValueError(f"x0 and x1 must have one dtype, got {x0.dtype} and {x1.dtype}")
    if w0.dtype != w1.dtype:
        raise TypeError(f"w0 and w1 must have one dtype, got w0 {w0.dtype} and w1 {w1.dtype}")
    if b0.dtype != b1.dtype:
        raise TypeError(f"b0 and b1 must have one dtype, got b0 {b0.dtype} and b1 {b1.dtype}")
    if not sizes or min(sizes) < 1 or rank < 1:
        raise ValueError(f"sizes must be positive chunk sizes and rank >= 1, got sizes={list(sizes)}, rank={rank}")
    mm = sum(sizes)
    n_w = rank * sum(s * s for s in sizes)
    if x0.shape[1] != mm:
        raise ValueError(f"x0 has {x0.shape[1]} features but the chunk sizes sum to {mm}")
    for name, t, n in (("w0", w0, n_w), ("b0", b0, rank * mm), ("w1", w1, n_w), ("b1", b1, rank * mm)):
        if t.numel() != n:
            raise ValueError(f"{name} must hold {n} elements (flat stacked layout), got {t.numel()}")
