"""BLOCK's specialisations for the static sm_90 report (``python -m cmc_fast.kernels.sm90_report report --op
block``): what one ``block_merge`` forward + backward through the fused kernels of ``kernels/block.py`` builds at a
shape, with the tiles ``kernels/block_plan.py`` plans; each kernel's share of the floor; and the writer of the bounds
table the dispatch reads (``python -m cmc_fast.kernels.sm90_report bounds``).
"""

from __future__ import annotations

import json
import tempfile

import torch
import triton

from .block_plan import (
    BOUNDS_FILE,
    _bounds_key,
    _bounds_table,
    _counts,
    _fwd_tiles,
    _ieee_fp32,
    _rate_key,
    _tf32x3,
    block_merge_floor,
    block_plan,
    chunk_layout,
    dot_precision,
    padding_waste,
)
from .gpus import GPUS
from .hopper_build import Loop, Spec, report_spec
from .reference import block_chunk_sizes
from .utils import cdiv, next_power_of_2

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
                 gpu: str = "H100 SXM", w_dtype: str | None = None, *, kernels) -> list:
    """The specialisations one ``block_merge`` forward + backward through the fused kernels runs at shape
    (B, DIM, CHUNKS, RANK) on ``gpu`` (a key of ``GPUS``: its SM count sizes the plan, its clock the issue bound),
    x and weights of ``dtype`` (weights of ``w_dtype`` if given: AMP's fp32 master weights), float32 matmul
    precision ``precision``: forward (+ norm where a chunk spans several
    feature tiles), dx, dW, each with its source loops and trip counts (``hopper_build.Loop``) and its share of the
    floor (``kernel_floors``). For ``kernels.sm90_report report``; whether ``block_merge`` picks this path at that
    shape is ``choose_block_path``'s call. ``kernels``: the module holding the @triton.jit kernels
    (``cmc_fast.kernels.block``), handed in because the op file imports this module to count a shape at run time."""
    b, sizes, rank = _report_args(shape, dtype, precision)
    if gpu not in GPUS:
        raise ValueError(f"gpu must be one of {sorted(GPUS)}, got {gpu!r}")
    spec_gpu = GPUS[gpu]
    chunks, mm, max_s = len(sizes), sum(sizes), max(sizes)
    prec = dot_precision(_DTYPES[dtype], precision)
    w_dtype = w_dtype or dtype
    if w_dtype not in _DTYPES:
        raise ValueError(f"w_dtype must be one of {sorted(_DTYPES)}, got {w_dtype!r}")
    plan = block_plan(b, sizes, rank, sms=spec_gpu["sms"], ieee_fp32=_ieee_fp32(_DTYPES[dtype], prec),
                      tf32x3=_tf32x3(_DTYPES[dtype], prec),
                      itemsize=max(_DTYPES[dtype].itemsize, _DTYPES[w_dtype].itemsize), interpreted=False)
    x, w, f32 = "*" + dtype, "*" + w_dtype, "*fp32"
    types = {"X0": x, "X1": x, "OUT": x, "G": x, "DX0": x, "DX1": x, "T": f32, "SQ": f32, "NORM": f32, "DZ": f32,
             "META": "*i64", **{n: w for n in ("W0", "B0", "W1", "B1", "DW0", "DB0", "DW1", "DB1")}}
    ints = {"n_rows": b, "MM": mm, "C": chunks, "R": rank}
    # what the JIT specialises: integers equal to 1 become constants, pointers and multiples of 16 are marked
    ones = {k: 1 for k, v in ints.items() if v == 1}
    divisible = tuple(types) + tuple(k for k, v in ints.items() if v % 16 == 0 and v != 1)
    waste = padding_waste(plan, b, sizes, rank)
    n_j = _fwd_tiles(plan, sizes)
    fused = n_j == 1
    layout = chunk_layout(sizes)
    common = {"RANK_P": plan.rank_p, "BLOCK_K": plan.block_k, "PREC": prec, "BIAS_FIRST": plan.bias_first, **layout}
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

    specs = [spec(kernels._block_fwd_kernel, {"BLOCK_B": plan.fwd_b, "BLOCK_J": plan.fwd_j, "NORMALIZE": True,
                                        "FUSED_NORM": fused}, plan.fwd_warps,
                  chunks * cdiv(b, plan.fwd_b) * n_j, ("k",), ("fwd_n",), (k_loop("k y0"), k_loop("k y1")), "fwd")]
    if not fused:
        specs.append(spec(kernels._block_norm_kernel, {"BLOCK_B": plan.norm_b, "BLOCK_S": plan.block_s,
                                                 "BLOCK_J": plan.fwd_j, "N_JP": next_power_of_2(n_j)}, 4,
                          chunks * cdiv(b, plan.norm_b), (), ("chunk_out",), (), "norm"))
    out = {"HEAD": plan.out_head, "TAIL": plan.out_tail}
    split = plan.dx_split if dtype == "fp32" else 1  # as the launcher: partial dx sums in float32 only
    dx_loops = (Loop("features", cdiv(max_s, plan.dx_j * split), (k_loop("k y"),), unrollable=const),)
    specs.append(spec(kernels._block_bwd_dx_kernel, {"BLOCK_B": plan.dx_b, "BLOCK_J": plan.dx_j,
                                                     "BLOCK_S": plan.block_s, "NORMALIZE": True, "SPLIT": split,
                                                     "RANK_MAJOR": plan.rank_major, **out}, plan.dx_warps,
                      chunks * cdiv(b, plan.dx_b) * 2 * split, ("k", "dx_n"), ("chunk_out",), dx_loops, "dx"))
    dw_loops = (Loop("batch", cdiv(b, plan.dw_b), (k_loop("k y"),)),)
    specs.append(spec(kernels._block_bwd_dw_kernel, {"BLOCK_B": plan.dw_b, "BLOCK_J": plan.dw_j,
                                                     "RANK_MAJOR": plan.rank_major, **out},
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


# ------------------------------------------------------------------------------------------- bounds table
# The shapes of bench/bench_block.py (B in {64, 256} x (1600, 20, 15), (256, 18, 15)) in each report dtype.
BENCH_SHAPES = [(b, *config) for config in ((1600, 20, 15), (256, 18, 15)) for b in (64, 256)]
BENCH_DTYPES = [("fp32", "highest"), ("fp32", "high"), ("bf16", "highest")]


def kernel_counts(shape: tuple[int, int, int, int], dtype: str, precision: str, *, kernels) -> list[dict]:
    """What the fused kernels execute at shape (B, DIM, CHUNKS, RANK), from their sm_90 SASS: per kernel, the
    instructions one warp executes (loops x trips), its warps, programs and launches in one forward + backward."""
    with tempfile.TemporaryDirectory() as sass_dir:
        rows = [report_spec(spec, sass_dir, i) for i, spec in enumerate(hopper_specs(shape, dtype, precision,
                                                                                    kernels=kernels))]
    return [{"kernel": r["kernel"], "instructions_per_warp": r["executed_per_warp"]["total"],
             "num_warps": r["num_warps"], "programs": r["programs"], "launches": r["launches"]} for r in rows]


def write_bounds_table(kernels, path: str = BOUNDS_FILE, shapes=BENCH_SHAPES, dtypes=BENCH_DTYPES) -> dict:
    """Build the fused kernels for sm_90 at every shape and dtype and write what they execute (``kernel_counts``)
    to ``path``: the table the dispatch reads its issue bounds from. Run without TRITON_INTERPRET."""
    entries = {}
    for shape in shapes:
        b, dim, chunks, rank = shape
        for dtype, precision in dtypes:
            key = _bounds_key(b, block_chunk_sizes(dim, chunks), rank, dtype, precision)
            entries[key] = kernel_counts(shape, dtype, precision, kernels=kernels)
    table = {"what": "instructions one warp of each fused BLOCK kernel executes (sm_90 SASS, loops x trips), its "
                     "warps, programs and launches per forward + backward; key 'B,DIM,CHUNKS,RANK dtype precision'",
             "command": "python -m cmc_fast.kernels.sm90_report bounds", "triton": triton.__version__,
             "entries": entries}
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    _bounds_table.cache_clear()
    _counts.cache_clear()
    return table
