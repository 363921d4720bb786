"""The NCE ops' specialisations for the static sm_90 report (``python -m cmc_fast.kernels.sm90_report report --op
nce``): what one ``nce_loss`` forward+backward builds at a shape, in either form, as the launchers of
``kernels/nce.py`` configure it on a GPU (``kernels/nce_plan.py``), and its floors per GPU.
"""

from __future__ import annotations

from .gpus import GPUS, HOPPER_SMS, resident_blocks
from .hopper_build import Spec, build
from .nce import _nce_counts_kernel, _nce_dense_kernel, _nce_finalize_kernel, _nce_fwd_kernel
from .nce_plan import (
    _TILE,
    PATHS,
    PROFILES,
    _choose_splits,
    _dense_consts,
    _dense_launch,
    _fwd_consts,
    _fwd_launch,
    floor_bytes,
)
from .utils import cdiv, next_power_of_2

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
    ``python -m cmc_fast.kernels.sm90_report report --op nce [--nce-path dense]``."""
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
    """Floors of one forward+backward at (B, d, K, N) per GPU (``kernels.gpus.GPUS``; int32 indices), both
    forms side by side whichever ``nce_path`` the report built: the gather's L2 floor (bytes / L2 bandwidth; owed where
    no L2 bandwidth is known, with an assumed 10 TB/s beside it) and HBM floor; the dense form's bytes (bank once,
    idx, [B, N] counts, anchors and gradient: all over HBM) and its split-tf32 tensor-core floor; and the ratio of the
    dense floor to the gather's L2 floor at the assumed L2 bandwidth."""
    b, d, k, n = shape
    nbytes = floor_bytes(b, d, k, n, _BANK_ELEM[bank_dtype])
    dense_flops = (2 if _BANK_ELEM[bank_dtype] < 4 else 3) * 4 * b * n * d  # two products, 3 (2) tf32 MMAs each
    out: dict[str, object] = {"bytes": nbytes, "dense_tf32_flops": dense_flops}
    assumed_l2 = PROFILES["cuda"].gather_bytes_per_s
    us = lambda n, rate: round(n / rate * 1e6, 2) if rate else "owed"  # noqa: E731
    for gpu, bw in GPUS.items():
        dense_us = max(us(nbytes["dense"], bw["hbm"]), us(dense_flops, bw["tf32"]))
        out[gpu] = {"l2_gather_us": us(nbytes["l2_gather"], bw["l2_measured"]),
                    "l2_gather_us_at_assumed_10TBps": us(nbytes["l2_gather"], assumed_l2),
                    "hbm_us_spec": us(nbytes["hbm"], bw["hbm"]),
                    "hbm_us_measured": us(nbytes["hbm"], bw["hbm_measured"]),
                    "dense_us_spec": dense_us,
                    # from the unrounded times: at tiny shapes both round to 0 us
                    "dense_over_gather_l2": round(max(nbytes["dense"] / bw["hbm"], dense_flops / bw["tf32"])
                                                  / (nbytes["l2_gather"] / assumed_l2), 3)}
    return out
