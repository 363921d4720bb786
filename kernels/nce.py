"""Cross-modal NCE over a memory bank: fused Triton loss + anchor gradient in two exact forms (gather and dense),
the negatives' histogram, the first-batch partition (the bank's momentum update: kernels/bank.py).

Two forms of one loss, same idx, same loss and gradient (DESIGN 3), chosen by shape in ``nce_plan.choose_nce_path``
(``CMC_FAST_NCE=dense|gather`` forces one; the model, its constants and the grid sizing live in kernels/nce_plan.py):
  gather  ``_nce_fwd_kernel``: fetches the B*(K+1) bank rows by index (B*(K+1)*d*elem bytes through L2: 537 MB at
          B=64, d=128, K=16384 against a 4.9 MB bank, each row ~110 times), one dot and one axpy per row; 20.9
          warp-instructions per gathered row on sm_90, ~21 us of issue per call at that shape.
  dense   ``_nce_counts_kernel`` builds C [B, N] int32, how often each bank row was drawn as a negative (once per
          step: both directions share it), then ``_nce_dense_kernel`` scores the whole bank once per tile of 16
          anchors on tensor cores (split tf32 products: float32 accuracy), turns each score tile into the C-weighted
          terms and gradient weights W and takes W M on the same bank tile; 14 MB and ~5 us of issue at that shape.
Floors and the instruction mix of both: ``python -m cmc_fast.kernels.sm90_report report --op nce --nce-path
dense|gather`` (bench/results/nce-hopper-sm90-report.md). The gather stays for banks far larger than B*(K+1) and
wherever the [B, N] working set is too large.

Layout of this file (Liger-Kernel style): Triton kernels, then launchers (pointer arguments commented with
shapes), then the torch.library ops (``cmc_fast::nce_fwd``, ``cmc_fast::nce_dense_fwd``, ``cmc_fast::nce_counts``,
``cmc_fast::nce_partition``) with fake (meta) and autograd registrations, then the public
functions. Launch configurations and grid sizing: kernels/nce_plan.py; the static report's specialisations:
kernels/nce_sm90.py.

Device choice: every op is a ``torch.library.custom_op`` whose single implementation dispatches with
``kernels.dispatch.use_triton`` -- the Triton launcher for CUDA tensors (or CPU tensors under
TRITON_INTERPRET=1 with CMC_FAST_KERNELS=triton), the PyTorch reference otherwise. Under torch.compile the
op is opaque (Inductor calls it as an extern kernel), which compiles with fullgraph=True on CPU and CUDA
alike; a ``triton_op`` would let Inductor see into the CUDA kernel but fails on CPU tensors (DESIGN 3), and
each form is one fused kernel with nothing for Inductor to fuse around it.

Math (DESIGN section 1), with lp_ij = log P_ij = s_ij - log Z, c = K/N + eps, noise = K/N:
    positive term   log(P/(P+c))          = -softplus(log c - lp)
    negative term   log(noise/(P+c))      = -softplus(logaddexp(lp, log eps) - log noise)
    dL/ds_i0 = -(1/B) * c/(P+c) = -(1/B) sigmoid(log c - lp);   dL/ds_ij = (1/B) * P/(P+c) = (1/B) sigmoid(lp - log c)
    dL/da_i  = sum_j dL/ds_ij * M[idx_ij] / tau
Written in log space so nothing overflows even for unnormalised anchors (exp(s) ~ 1.6e6 at tau = 0.07 for
unit vectors is fine in float32; exp(89) is not), and with an accurate log1p so the tiny negative terms
(P << K/N) do not lose their digits to cancellation (the reference's log(noise/(P+noise+eps)) does).
"""

from __future__ import annotations

import torch

from .dispatch import check_index_range, index_checks, triton_interpreted, use_triton
from .nce_plan import (
    _TILE,
    _block_k,
    _choose_splits,
    _dense_consts,
    _dense_launch,
    _fwd_consts,
    _fwd_launch,
    _kernel_slots,
    _splits,
    choose_nce_path,
    nce_constants,
    nce_path,
)
from .reference import (
    nce_counts_reference,
    nce_dense_reference,
    nce_fwd_torch,
    nce_partition_reference,
)
from .utils import cdiv, contiguous, libdevice, next_power_of_2, on_tensor_device, tl, triton

__all__ = ["nce_loss", "nce_partition", "nce_counts", "nce_counts_for", "nce_fwd_triton", "nce_dense_triton",
           "nce_counts_triton", "nce_partition_triton", "nce_fwd_torch"]

# ============================================================================================ kernels
# The kernels are written without @triton.jit helper functions on purpose: the interpreter (the CPU test path)
# re-patches triton.language on every nested jit call, which made the tests several times slower.
# Inline idioms used below:
#   log1p(x), x in [0, 1]: libdevice's on the GPU (tl.log is an approximate lg2 there, too coarse near 1 for the
#     tiny negative terms); the interpreter has no libdevice, so there Goldberg's log(u) * x / (u - 1), u = 1 + x
#   softplus(x) = max(x, 0) + log1p(exp(-|x|));   sigmoid(x) = 1/(1 + e) or e/(1 + e), e = exp(-|x|)


@triton.jit
def _log1p(e, LIBDEVICE: tl.constexpr):
    """log1p(e) for e in (0, 1]; the interpreter has no libdevice: Goldberg's log(u) * e / (u - 1), u = 1 + e."""
    if LIBDEVICE:
        return libdevice.log1p(e)
    u = 1.0 + e
    du = u - 1.0
    return tl.where(du == 0.0, e, tl.log(u) * (e / tl.where(du == 0.0, 1.0, du)))


@triton.jit
def _nce_fwd_kernel(
    anchor_ptr,  # [B, D] fp32/bf16/fp16, contiguous
    bank_ptr,  # [N, D] fp32/bf16/fp16, strides (stride_bn, stride_bd)
    idx_ptr,  # [B, K1] int32/int64, contiguous; column 0 is the positive
    z_ptr,  # [] float: the frozen partition Z
    part_loss_ptr,  # [B, S] fp32 out: sum of this split's loss terms (before the -1/B)
    part_grad_ptr,  # [B, S, D] fp32 out: sum over this split of w_ij * M[idx_ij] (before the 1/(B*tau))
    inv_tau, log_c, log_noise_over_c,  # fp32 scalars: 1/tau, log(K/N + eps), log(K/N) - log(K/N + eps)
    K1, D, stride_bn, stride_bd, chunk,  # chunk: columns per split (a multiple of BLOCK_K)
    COMPUTE_GRAD: tl.constexpr, LIBDEVICE: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_K: tl.constexpr, N_CHUNKS: tl.constexpr, CHUNK_D: tl.constexpr,
):
    # The gathered tile is [N_CHUNKS, BLOCK_K, CHUNK_D]: row k's d values are cut into N_CHUNKS pieces of CHUNK_D
    # contiguous elements. Triton lays threads out from the innermost axis, so one row sits on CHUNK_D / vector
    # lanes (2-8 with 16-byte loads), not 32: the dot product is a few in-thread FMAs plus log2(lanes) shuffles,
    # and the per-row math below runs once per 2-8 lanes instead of on every lane of a warp. The gradient is
    # accumulated per tile element and reduced over rows once, after the loop (no reduction in the loop).
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_d = tl.arange(0, N_CHUNKS)[:, None, None] * CHUNK_D + tl.arange(0, CHUNK_D)[None, None, :]  # [C, 1, W]
    mask_d = offs_d < D
    # 1/tau is folded into the anchor: the loop's dot product is s/tau directly
    a = tl.load(anchor_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32) * inv_tau
    shift = tl.log(tl.load(z_ptr).to(tl.float32)) + log_c  # t = s/tau - log Z - log c = log(P / c)
    start = split * chunk
    end = tl.minimum(start + chunk, K1)
    idx_row_ptr = idx_ptr + row * K1
    acc_l = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_g = tl.zeros([N_CHUNKS, BLOCK_K, CHUNK_D], dtype=tl.float32)
    # past the end: row 0 is gathered (it exists) and its terms are zeroed below, so the gather needs no mask. The
    # next pass's indices are loaded before this pass's rows are used: their latency hides behind this pass's math
    # instead of stalling the gather that depends on them.
    offs_next = start + tl.arange(0, BLOCK_K)
    ids_next = tl.load(idx_row_ptr + offs_next, mask=offs_next < end, other=0)
    for k0 in range(start, end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < end
        ids = ids_next.to(tl.int64)
        offs_next = offs_k + BLOCK_K
        ids_next = tl.load(idx_row_ptr + offs_next, mask=offs_next < end, other=0)
        ptrs = bank_ptr + ids[None, :, None] * stride_bn + offs_d * stride_bd
        if EVEN_D:  # noqa: SIM108 - a constexpr branch: only the unmasked load is compiled
            m = tl.load(ptrs).to(tl.float32)  # [C, BLOCK_K, W]
        else:
            m = tl.load(ptrs, mask=mask_d, other=0.0).to(tl.float32)
        t = tl.sum(tl.sum(m * a, axis=0), axis=1) - shift  # [BLOCK_K]
        # One exp, one log1p and one reciprocal per row (math in DESIGN section 1, with e = exp(-|t|), P/c = e^t):
        #   positive  term = -softplus(-t)              = -max(-t, 0) - log1p(e);   w = -c/(P+c) = -sigmoid(-t)
        #   negative  term = log(noise/c) - softplus(t) = log(noise/c) - max(t, 0) - log1p(e);   w = sigmoid(t)
        e = tl.exp(-tl.abs(t))
        l1p = _log1p(e, LIBDEVICE)
        is_pos = offs_k == 0
        term = tl.where(is_pos, -tl.maximum(-t, 0.0), log_noise_over_c - tl.maximum(t, 0.0)) - l1p
        acc_l += tl.where(mask_k, term, 0.0)
        if COMPUTE_GRAD:
            r = 1.0 / (1.0 + e)
            big = t >= 0.0  # sigmoid(t) = r when t >= 0 else e*r; sigmoid(-t) the other one: no cancellation
            w = tl.where(is_pos, -tl.where(big, e, 1.0), tl.where(big, 1.0, e)) * r
            w = tl.where(mask_k, w, 0.0)
            acc_g += w[:, None][None, :, :] * m
    out = row * n_split + split
    tl.store(part_loss_ptr + out, tl.sum(acc_l, axis=0))
    if COMPUTE_GRAD:
        g = tl.sum(acc_g, axis=1)  # [C, W]
        offs_g = tl.arange(0, N_CHUNKS)[:, None] * CHUNK_D + tl.arange(0, CHUNK_D)[None, :]
        tl.store(part_grad_ptr + out * D + offs_g, g, mask=offs_g < D)


@triton.jit
def _nce_finalize_kernel(
    part_loss_ptr,  # [B * S] fp32
    part_grad_ptr,  # [B, S, D] fp32
    loss_ptr,  # [] fp32 out: -(1/B) * sum of part_loss
    grad_ptr,  # [B, D] fp32 out: (1/(B*tau)) * sum over S of part_grad
    n_part, S, D, loss_scale, grad_scale,
    COMPUTE_GRAD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if COMPUTE_GRAD:
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask = (offs_s < S)[:, None] & mask_d[None, :]
            g = tl.load(part_grad_ptr + (row * S + offs_s)[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
            acc += tl.sum(g, axis=0)
        tl.store(grad_ptr + row * D + offs_d, acc * grad_scale, mask=mask_d)
    if row == 0:  # one program sums the B*S loss partials in a fixed order: deterministic
        acc_p = tl.zeros([BLOCK_P], dtype=tl.float32)
        for p0 in range(0, n_part, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            acc_p += tl.load(part_loss_ptr + offs_p, mask=offs_p < n_part, other=0.0)
        tl.store(loss_ptr, tl.sum(acc_p, axis=0) * loss_scale)


@triton.jit
def _nce_partition_kernel(
    anchor_ptr,  # [B, D] float, contiguous
    bank_ptr,  # [N, D] float, strides (stride_bn, stride_bd)
    idx_ptr,  # [B, K1] int64/int32, contiguous
    part_ptr,  # [B, S] fp32 out: sum of exp(s) over this split's columns
    inv_tau, K1, D, stride_bn, stride_bd, chunk,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    a = tl.load(anchor_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, K1)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < end
        ids = tl.load(idx_ptr + row * K1 + offs_k, mask=mask_k, other=0).to(tl.int64)
        m = tl.load(bank_ptr + ids[:, None] * stride_bn + offs_d[None, :] * stride_bd,
                    mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += tl.where(mask_k, tl.exp(tl.sum(m * a[None, :], axis=1) * inv_tau), 0.0)
    tl.store(part_ptr + row * tl.num_programs(1) + split, tl.sum(acc, axis=0))


@triton.jit
def _nce_counts_kernel(
    idx_ptr,  # [B, K1] int32/int64, contiguous; column 0 (the positive) is skipped
    counts_ptr,  # [B, N] int32, contiguous, zeroed: += 1 per negative drawn
    K1, N,
    BLOCK_K: tl.constexpr,
):
    # The negatives' histogram of the dense form: integer atomics, so the counts are exact whatever the order.
    row = tl.program_id(0).to(tl.int64)
    offs = 1 + tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K1
    ids = tl.load(idx_ptr + row * K1 + offs, mask=mask, other=0).to(tl.int64)
    # an index outside the bank is never written through (CMC_FAST_CHECK_INDEX=1 names it before the launch)
    mask &= (ids >= 0) & (ids < N)
    tl.atomic_add(counts_ptr + row * N + ids, tl.full([BLOCK_K], 1, tl.int32), mask=mask, sem="relaxed")


@triton.jit
def _nce_dense_kernel(
    anchor_ptr,  # [B, D] fp32/bf16/fp16, contiguous
    bank_ptr,  # [N, D] fp32/bf16/fp16, strides (stride_bn, stride_bd)
    idx_ptr,  # [B, K1] int32/int64, contiguous: only column 0 (the positive) is read
    counts_ptr,  # [B, N] int32, contiguous: how often each bank row was drawn as a negative for each anchor
    z_ptr,  # [] float: the frozen partition Z
    part_loss_ptr,  # [B, S] fp32 out: sum of this split's loss terms (before the -1/B)
    part_grad_ptr,  # [B, S, D] fp32 out: sum over this split of W[i, n] * M[n] (before the 1/(B*tau))
    inv_tau, log_c, log_noise_over_c,  # fp32 scalars, as the gather kernel's
    B, N, K1, D, stride_bn, stride_bd, chunk,  # chunk: bank rows per split (a multiple of BLOCK_N)
    COMPUTE_GRAD: tl.constexpr, LIBDEVICE: tl.constexpr, EXACT_TF32_BANK: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program: BLOCK_B anchors against the bank rows [split * chunk, +chunk), BLOCK_N rows per pass. Each pass
    # loads one bank tile and uses it twice on tensor cores: the scores T = A M^T / tau - log Z - log c, then (after
    # the terms and weights, elementwise on the [BLOCK_B, BLOCK_N] tile) the gradient W M. The bank is read once per
    # anchor tile; nothing is gathered. Split tf32 products keep float32 accuracy on tensor cores.
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rows_b = offs_b.to(tl.int64)
    a = tl.load(anchor_ptr + rows_b[:, None] * D + offs_d[None, :], mask=mask_b[:, None] & mask_d[None, :],
                other=0.0).to(tl.float32) * inv_tau
    if EXACT_TF32_BANK:
        # A 2-byte bank is exact in tf32: split the float32 operand alone, x = hi + lo with hi its top 10 mantissa
        # bits (exact in tf32), so hi*m + lo*m carries ~21 bits in two tf32 products instead of tf32x3's three -- and
        # the anchors are split once here, not on every pass (sm_90 report: 122 warp-instructions per bank row, was
        # 210 with tf32x3). An fp32 bank keeps tf32x3 (the same split by hand spilled at d = 128).
        a_hi = (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        a_lo = a - a_hi
    shift = tl.log(tl.load(z_ptr).to(tl.float32)) + log_c
    pos = tl.load(idx_ptr + rows_b * K1, mask=mask_b, other=-1).to(tl.int64)  # -1: never a bank row
    start = split * chunk
    end = tl.minimum(start + chunk, N)
    acc_l = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        m = tl.load(bank_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + offs_d[None, :] * stride_bd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
        if EXACT_TF32_BANK:
            t = tl.dot(a_lo, tl.trans(m), tl.dot(a_hi, tl.trans(m), input_precision="tf32"), input_precision="tf32")
        else:
            t = tl.dot(a, tl.trans(m), input_precision="tf32x3")
        t -= shift  # [BLOCK_B, BLOCK_N]
        # past the end or past B: count 0 and never the positive, so the (finite) t there adds nothing
        cnt = tl.load(counts_ptr + rows_b[:, None] * N + offs_n[None, :], mask=mask_b[:, None] & mask_n[None, :],
                      other=0).to(tl.float32)
        is_pos = (offs_n.to(tl.int64)[None, :] == pos[:, None]) & mask_n[None, :]
        e = tl.exp(-tl.abs(t))
        l1p = _log1p(e, LIBDEVICE)
        # softplus(t) = max(t, 0) + l1p; negative term log(noise/c) - softplus(t), positive -softplus(-t)
        acc_l += tl.sum(cnt * (log_noise_over_c - tl.maximum(t, 0.0) - l1p)
                        + tl.where(is_pos, -tl.maximum(-t, 0.0) - l1p, 0.0), axis=1)
        if COMPUTE_GRAD:
            r = 1.0 / (1.0 + e)
            big = t >= 0.0  # sigmoid(t) = r when t >= 0 else e*r; sigmoid(-t) the other one: no cancellation
            w = cnt * tl.where(big, 1.0, e) * r - tl.where(is_pos, tl.where(big, e, 1.0) * r, 0.0)
            if EXACT_TF32_BANK:
                w_hi = (w.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
                acc_g = tl.dot(w_hi, m, acc_g, input_precision="tf32")
                acc_g = tl.dot(w - w_hi, m, acc_g, input_precision="tf32")
            else:
                acc_g = tl.dot(w, m, acc_g, input_precision="tf32x3")
    out = rows_b * n_split + split
    tl.store(part_loss_ptr + out, acc_l, mask=mask_b)
    if COMPUTE_GRAD:
        tl.store(part_grad_ptr + out[:, None] * D + offs_d[None, :], acc_g, mask=mask_b[:, None] & mask_d[None, :])


# ========================================================================================== launchers
def _check_nce_args(anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor) -> None:
    if anchor.dim() != 2 or bank.dim() != 2 or anchor.shape[1] != bank.shape[1]:
        raise ValueError(f"anchor must be [B, d] and bank [N, d], got {tuple(anchor.shape)} and {tuple(bank.shape)}")
    if idx.dim() != 2 or idx.shape[0] != anchor.shape[0] or idx.shape[1] < 1:
        raise ValueError(f"idx must be [B, K+1] with B={anchor.shape[0]}, got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"idx must be int64 (or int32), got {idx.dtype}")
    if not (anchor.is_floating_point() and bank.is_floating_point()):
        raise TypeError(f"anchor and bank must be floating point, got {anchor.dtype} and {bank.dtype}")


@on_tensor_device
def nce_fwd_triton(anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, z: torch.Tensor, tau: float,
                   n_data: int, eps: float, need_grad: bool, *, block_k: int | None = None,
                   splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused loss (+ anchor gradient) kernel. Returns (loss [] fp32, grad [B, d] fp32 or [0]).
    ``block_k`` / ``splits`` override the heuristics (tests use them to exercise several splits)."""
    anchor, idx = contiguous(anchor, idx)  # the bank is passed with its strides: never copied
    if index_checks():
        check_index_range(idx, bank.shape[0], sync=True)
    z = z.reshape(()).to(device=anchor.device, dtype=torch.float32)
    b, d = anchor.shape
    k1 = idx.shape[1]
    dev = anchor.device
    if b == 0:  # as the reference: the mean of no rows is nan, the gradient empty
        loss = torch.full((), float("nan"), device=dev, dtype=torch.float32)
        return loss, anchor.new_zeros((0, d) if need_grad else (0,), dtype=torch.float32)
    interpreted = dev.type != "cuda" or triton_interpreted()
    launch = _fwd_launch(d, bank.element_size(), interpreted, block_k, k1)
    log_c, log_noise_over_c = nce_constants(k1, n_data, eps)
    consts = _fwd_consts(launch, d, need_grad, libdevice_log1p=not interpreted)
    if interpreted:  # the interpreter pays per operation: one program per row, no occupancy to fill
        slots, splits = 1, 1 if splits is None else splits
    else:
        placeholder = (anchor, bank, idx, z, torch.float32, torch.float32, 1.0 / tau, log_c, log_noise_over_c,
                       k1, d, bank.stride(0), bank.stride(1), max(16, launch.block_k))
        slots = _kernel_slots(_nce_fwd_kernel, placeholder, consts, launch.num_warps, dev)
    n_split, chunk = _choose_splits(b, k1, launch.block_k, slots, splits)
    part_loss = torch.empty(b * n_split, device=dev, dtype=torch.float32)
    part_grad = torch.empty((b, n_split, d) if need_grad else (1,), device=dev, dtype=torch.float32)
    loss = torch.empty((), device=dev, dtype=torch.float32)
    grad = torch.empty((b, d), device=dev, dtype=torch.float32) if need_grad else loss  # unused when no grad
    _nce_fwd_kernel[(b, n_split)](anchor, bank, idx, z, part_loss, part_grad, 1.0 / tau, log_c, log_noise_over_c,
                                  k1, d, bank.stride(0), bank.stride(1), chunk, num_warps=launch.num_warps,
                                  **consts)
    _finalize(part_loss, part_grad, loss, grad, b, n_split, d, tau, need_grad)
    return loss, (grad if need_grad else anchor.new_empty(0, dtype=torch.float32))


@on_tensor_device
def nce_partition_triton(anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, tau: float, n_data: int,
                         *, block_k: int | None = None, splits: int | None = None) -> torch.Tensor:
    """Z = mean(exp(s)) * N as a 0-dim float32 tensor (the sum of partials is taken in float64)."""
    anchor, idx = contiguous(anchor, idx)
    if index_checks():
        check_index_range(idx, bank.shape[0], sync=True)
    b, d = anchor.shape
    k1 = idx.shape[1]
    block_d = next_power_of_2(d)
    n_split, chunk = _splits(b, k1, anchor.device, splits)
    part = torch.empty(b * n_split, device=anchor.device, dtype=torch.float32)
    _nce_partition_kernel[(b, n_split)](anchor, bank, idx, part, 1.0 / tau, k1, d, bank.stride(0), bank.stride(1),
                                        chunk, BLOCK_K=block_k or _block_k(block_d, chunk, anchor.device),
                                        BLOCK_D=block_d)
    return (part.double().sum() / (b * k1) * n_data).float()


@on_tensor_device
def nce_counts_triton(idx: torch.Tensor, n: int) -> torch.Tensor:
    """The negatives' histogram C [B, N] int32 (``nce_counts_reference``), with integer atomics."""
    (idx,) = contiguous(idx)
    if index_checks():
        check_index_range(idx, n, sync=True)
    b, k1 = idx.shape
    counts = torch.zeros((b, n), device=idx.device, dtype=torch.int32)
    if b and k1 > 1:
        block = min(1024, next_power_of_2(k1 - 1))
        _nce_counts_kernel[(b, cdiv(k1 - 1, block))](idx, counts, k1, n, BLOCK_K=block)
    return counts


@on_tensor_device
def nce_dense_triton(anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor,
                     z: torch.Tensor, tau: float, n_data: int, eps: float, need_grad: bool, *,
                     splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the dense loss (+ anchor gradient) kernel and its finalize. Returns (loss [] fp32, grad [B, d] fp32
    or [0]). ``splits`` forces the number of slices of the bank (tests)."""
    anchor, idx, counts = contiguous(anchor, idx, counts)
    z = z.reshape(()).to(device=anchor.device, dtype=torch.float32)
    b, d = anchor.shape
    n, k1, dev = bank.shape[0], idx.shape[1], anchor.device
    if b == 0:
        loss = torch.full((), float("nan"), device=dev, dtype=torch.float32)
        return loss, anchor.new_zeros((0, d) if need_grad else (0,), dtype=torch.float32)
    interpreted = dev.type != "cuda" or triton_interpreted()
    launch = _dense_launch(b, d, n, interpreted, bank.element_size())
    log_c, log_noise_over_c = nce_constants(k1, n_data, eps)
    consts = _dense_consts(launch, need_grad, libdevice_log1p=not interpreted)
    b_tiles = cdiv(b, launch.block_b)
    if interpreted:
        slots, splits = 1, 1 if splits is None else splits
    else:
        placeholder = (anchor, bank, idx, counts, z, z, z, 1.0 / tau, log_c, log_noise_over_c, b, n, k1, d,
                       bank.stride(0), bank.stride(1), launch.block_n)
        slots = _kernel_slots(_nce_dense_kernel, placeholder, consts, launch.num_warps, dev)
    n_split, chunk = _choose_splits(b_tiles, max(n, 1), launch.block_n, slots, splits)
    part_loss = torch.empty(b * n_split, device=dev, dtype=torch.float32)
    part_grad = torch.empty((b, n_split, d) if need_grad else (1,), device=dev, dtype=torch.float32)
    loss = torch.empty((), device=dev, dtype=torch.float32)
    grad = torch.empty((b, d), device=dev, dtype=torch.float32) if need_grad else loss
    _nce_dense_kernel[(b_tiles, n_split)](anchor, bank, idx, counts, z, part_loss, part_grad, 1.0 / tau, log_c,
                                          log_noise_over_c, b, n, k1, d, bank.stride(0), bank.stride(1), chunk,
                                          num_warps=launch.num_warps, **consts)
    _finalize(part_loss, part_grad, loss, grad, b, n_split, d, tau, need_grad)
    return loss, (grad if need_grad else anchor.new_empty(0, dtype=torch.float32))


def _finalize(part_loss, part_grad, loss, grad, b: int, n_split: int, d: int, tau: float, need_grad: bool) -> None:
    """Sum the [B, S] partials of a loss kernel (gather or dense) in a fixed order: loss and gradient."""
    block_d = next_power_of_2(d)
    _nce_finalize_kernel[(b if need_grad else 1,)](
        part_loss, part_grad, loss, grad, b * n_split, n_split, d, -1.0 / b, 1.0 / (b * tau),
        COMPUTE_GRAD=need_grad, BLOCK_S=min(next_power_of_2(n_split), max(1, _TILE // block_d)),
        BLOCK_D=block_d, BLOCK_P=min(next_power_of_2(b * n_split), 1024))


# ================================================================================== torch.library ops
@torch.library.custom_op("cmc_fast::nce_fwd", mutates_args=())
def _nce_fwd_op(anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, z: torch.Tensor, tau: float,
                n_data: int, eps: float, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(anchor):
        return nce_fwd_triton(anchor, bank, idx, z, tau, n_data, eps, need_grad)
    return nce_fwd_torch(anchor, bank, idx, z, tau, n_data, eps, need_grad)


@_nce_fwd_op.register_fake
def _(anchor, bank, idx, z, tau, n_data, eps, need_grad):
    loss = anchor.new_empty((), dtype=torch.float32)
    grad = anchor.new_empty(anchor.shape if need_grad else (0,), dtype=torch.float32)
    return loss, grad


def _nce_setup_context(ctx, inputs, output):
    anchor, need_grad = inputs[0], inputs[-1]
    ctx.anchor_dtype = anchor.dtype
    ctx.need_grad = need_grad
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _nce_backward(ctx, grad_loss, _grad_grad):
    """Both loss ops (gather and dense) computed dL/danchor in their forward: scale it, nothing else."""
    if not ctx.need_grad:
        raise RuntimeError("cmc_fast::nce_fwd ran with need_grad=False; call nce_loss with grad enabled")
    (grad,) = ctx.saved_tensors
    # grad_loss is a 0-dim tensor (possibly an expanded view under compile): a broadcast multiply reads it fine
    return ((grad_loss * grad).to(ctx.anchor_dtype),) + (None,) * (ctx.n_inputs - 1)


_nce_fwd_op.register_autograd(_nce_backward, setup_context=_nce_setup_context)


@torch.library.custom_op("cmc_fast::nce_dense_fwd", mutates_args=())
def _nce_dense_op(anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor,
                  z: torch.Tensor, tau: float, n_data: int, eps: float,
                  need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(anchor):
        return nce_dense_triton(anchor, bank, idx, counts, z, tau, n_data, eps, need_grad)
    check_index_range(idx[:, :1], bank.shape[0], sync=index_checks())
    return nce_dense_reference(anchor, bank, idx, counts, z, tau, n_data, eps, need_grad)


@_nce_dense_op.register_fake
def _(anchor, bank, idx, counts, z, tau, n_data, eps, need_grad):
    loss = anchor.new_empty((), dtype=torch.float32)
    grad = anchor.new_empty(anchor.shape if need_grad else (0,), dtype=torch.float32)
    return loss, grad


_nce_dense_op.register_autograd(_nce_backward, setup_context=_nce_setup_context)


@torch.library.custom_op("cmc_fast::nce_counts", mutates_args=())
def _nce_counts_op(idx: torch.Tensor, n: int) -> torch.Tensor:
    if use_triton(idx):
        return nce_counts_triton(idx, n)
    check_index_range(idx, n, sync=index_checks())
    return nce_counts_reference(idx, n)


@_nce_counts_op.register_fake
def _(idx, n):
    return idx.new_empty((idx.shape[0], n), dtype=torch.int32)


@torch.library.custom_op("cmc_fast::nce_partition", mutates_args=())
def _nce_partition_op(anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, tau: float,
                      n_data: int) -> torch.Tensor:
    if use_triton(anchor):
        return nce_partition_triton(anchor, bank, idx, tau, n_data)
    check_index_range(idx, bank.shape[0], sync=index_checks())
    z = nce_partition_reference(anchor, bank, idx, tau=tau, n_data=n_data)
    return torch.tensor(z, dtype=torch.float32, device=anchor.device)


@_nce_partition_op.register_fake
def _(anchor, bank, idx, tau, n_data):
    return anchor.new_empty((), dtype=torch.float32)


# ===================================================================================== public functions
def nce_loss(anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, *, tau: float,
             z: float | torch.Tensor, n_data: int, eps: float = 1e-7,
             counts: torch.Tensor | None = None) -> torch.Tensor:
    """CRD's NCE loss for one direction (DESIGN sections 1 and 3): a float32 scalar, differentiable in ``anchor``.

    anchor [B, d] (normalised by the caller), bank [N, d] (float32/bfloat16/float16; no gradient), idx [B, K+1]
    int32 or int64 with column 0 the positive (an index outside the bank: IndexError on the reference path, and on
    the Triton path under CMC_FAST_CHECK_INDEX=1), z the frozen partition (float or 0-dim tensor, kept on device),
    n_data the pool the negatives are drawn from (the noise prior K/n_data).

    Two exact forms, chosen by shape (``kernels.nce_plan.choose_nce_path``; ``CMC_FAST_NCE=dense|gather`` forces
    one): the gather fetches the B*(K+1) bank rows by index, never building [B, K+1, d]; the dense form scores the
    whole bank once (S = A M^T / tau, tensor cores on a GPU) and weights each score by ``counts`` -- the negatives'
    histogram ``nce_counts(idx, N)``, computed here when not given: pass the one from ``nce_counts_for`` to every
    call sharing idx. Both accumulate in float32 and compute the anchor gradient in the forward pass; backward only
    scales it by the incoming gradient.
    """
    _check_nce_args(anchor, bank, idx)
    if isinstance(z, torch.Tensor):
        z = z.detach().reshape(()).to(device=anchor.device, dtype=torch.float32)
    else:
        z = torch.full((), float(z), device=anchor.device, dtype=torch.float32)
    need_grad = anchor.requires_grad and torch.is_grad_enabled()
    b, d = anchor.shape
    n = bank.shape[0]
    path = choose_nce_path(b, d, idx.shape[1], n, bank.element_size(), anchor.device.type)
    if path == "gather":
        loss, _ = _nce_fwd_op(anchor, bank.detach(), idx, z, float(tau), int(n_data), float(eps), need_grad)
        return loss
    if counts is None:
        counts = _nce_counts_op(idx, n)
    elif counts.shape != (b, n) or counts.dtype != torch.int32:
        raise ValueError(f"counts must be the int32 [B, N] = [{b}, {n}] histogram of idx (nce_counts), got "
                         f"{counts.dtype} {tuple(counts.shape)}")
    loss, _ = _nce_dense_op(anchor, bank.detach(), idx, counts, z, float(tau), int(n_data), float(eps), need_grad)
    return loss


def nce_counts(idx: torch.Tensor, n: int) -> torch.Tensor:
    """C [B, N] int32: how often each of the bank's N rows was drawn as a negative (idx[:, 1:]) for each anchor --
    the weights of the dense form. Integer adds: exact and deterministic."""
    if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx must be int32/int64 [B, K+1], got {idx.dtype} {tuple(idx.shape)}")
    return _nce_counts_op(idx, int(n))


def nce_counts_for(anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
    """The histogram ``nce_loss`` would build at this shape (dense form), or None (gather): compute it once per
    step and pass it as ``counts=`` to every ``nce_loss`` sharing idx and the bank's size (both directions)."""
    _check_nce_args(anchor, bank, idx)
    path = nce_path(anchor.shape[0], anchor.shape[1], idx.shape[1], bank.shape[0], bank.element_size(),
                    anchor.device.type)
    return nce_counts(idx, bank.shape[0]) if path == "dense" else None


def nce_partition(anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, *, tau: float,
                  n_data: int) -> float:
    """The first-batch estimate Z = mean(exp(s)) * N, as a Python float (it runs once; this syncs)."""
    _check_nce_args(anchor, bank, idx)
    with torch.no_grad():
        return float(_nce_partition_op(anchor.detach(), bank.detach(), idx, float(tau), int(n_data)).item())
