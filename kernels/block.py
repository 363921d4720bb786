"""BLOCK's block-superdiagonal bilinear merge (Ben-Younes et al. 2019): fused Triton kernels on tensor cores, a
batched-bmm formulation, and the rule that picks between them per shape.

Math (per chunk c of size s, rank R; DESIGN section 1): y0 = x0_c W0_c^T + b0_c, y1 likewise, both [B, R*s] with
m index r*s + j; z[b, j] = sum_r y0[b, r*s+j] * y1[b, r*s+j]; t = sqrt(relu(z)) - sqrt(relu(-z));
out = t / max(||t||_2, 1e-12). Weights use the "flat stacked" layout of ``kernels.reference.block_merge_reference``.

Kernels. One tile of the products covers BLOCK_J output features x all ranks: its N dimension is n = jj * RANK_P + r
(rank padded to a power of two), so one ``tl.dot`` per K step makes [BLOCK_B, BLOCK_J * RANK_P] and the rank sum is
a reduction inside the tile (reshape to [BLOCK_B, BLOCK_J, RANK_P], sum the last axis). The weight tile is gathered
from the flat layout by pointer arithmetic (row r*s + j, K contiguous): no repacked copy of the weights per call.
The contraction over a chunk's inputs runs in steps of BLOCK_K (16 for chunks of 80: no padding; the power of two
above the chunk, 128, wasted 37.5%).
  * ``_block_fwd_kernel``    grid (chunks, batch tiles, feature tiles of the largest chunk). Writes t (fp32) for the
                             backward, and either finishes the chunk's norm itself (one feature tile per chunk:
                             FUSED_NORM, one launch) or writes partial sums of t^2 per feature tile.
  * ``_block_norm_kernel``   grid (chunks, batch tiles of NORM_B rows): sums the partials, out = t / max(n, eps),
                             keeps n. Only when a chunk spans several feature tiles (1600/20: 10 tiles of 8).
  * ``_block_bwd_dx_kernel`` grid (chunks, batch tiles, 2 sides): side 0 computes dx0 = sum_{j,r} (dz*y1) W0, side
                             1 dx1; dz comes from g and what the forward kept (t and the norm; the old kernel
                             recomputed z with a whole extra forward), y_other is recomputed (see Recomputation).
                             Side 0 also writes dz for the dW kernel. The chunk's width in dx is a head and a tail
                             tile (64 + 16 for chunks of 80), not the power of two above it (128: 37.5% padding).
  * ``_block_bwd_dw_kernel`` grid (chunks, feature tiles of the largest chunk, 2 sides): a program owns
                             dW_side[(j, r), :] for its feature tile and all ranks and loops over the batch:
                             dW0 += (dz*y1)^T x0 (head + tail tiles of the chunk's width, as dx). Deterministic (no
                             atomics). The grid is sized by the largest chunk
                             (the old one by the padded tile: 37.5% of its programs stored nothing).
Precision: x float32, float16 or bfloat16; weights may be another float dtype than x (AMP: fp32 master weights, bf16
activations), cast to x's dtype before each ``tl.dot``, which accumulates in fp32. 16-bit inputs run on tensor cores
(MMA). float32 inputs follow ``torch.get_float32_matmul_precision()`` as cuBLAS does: "highest" (PyTorch's default)
IEEE fp32 (FFMA, no tensor cores), "high" and "medium" TF32 tensor cores (``input_precision="tf32"``). Rank sum,
signed sqrt, norm and gradients of them in fp32; out and dx in x's dtype, dW/db in the weights' dtype. W0/W1 (and
B0/B1) must share a dtype: the backward picks a side's pointers at run time and Triton needs one type for both.

Recomputation. The backward keeps t [B, mm] fp32 and the norms [B, chunks] from the forward (0.4 MB at B=64) and
recomputes y_other in dx and dW on tensor cores instead of storing y0 and y1: at (1600, 20, 15), B=64 they are
2 x 6.1 MB in fp32, ~12 MB written and ~25 MB read again = ~11 us of HBM at 3.35 TB/s, against 4 x 0.25 GFLOP of
recomputation (y1 and y0 in dx, again in dW) = ~2 us of TF32 at 495 TFLOP/s. At "highest" (FP32 FFMA, 67 TFLOP/s)
the same recomputation costs ~15 us and keeping y would be cheaper: not done (that path is FFMA-bound anyway).

Limits: chunk sizes up to MAX_CHUNK = 256 (dx holds a [rows, block_s] row of g and t), rank up to MAX_RANK = 128;
beyond, ``block_merge`` takes the bmm path on CUDA (the reference under ``CMC_FAST_KERNELS=triton``). Every dot
dimension is >= 16 (``tl.dot``'s minimum on GPUs). Left open (static report, bench/results/block-sm90-static.md): at
(1600, 20, 15), B=64 the forward's 200 and dx's 160 programs hold one block per SM (163-255 registers a thread), so
they run in 1.5 and 1.2 waves on 132 SMs. Padding at chunks of 80: none in the K steps, the dx/dW output tiles or
the batch; 6.25% in the rank (15 -> 16) of every N.

Floors per GPU (the ``GPUS`` table below). FLOPs 4*B*R*S2 forward and 8*B*R*S2 backward with S2 = sum_c s_c^2;
bytes (weights and activations once each) 2*R*S2*wb + 2*R*MM*wb + 3*B*MM*xb forward, 4*R*S2*wb + 4*R*MM*wb +
5*B*MM*xb backward; floor = max(FLOPs / rate, bytes / HBM). Rates: FP32 (no tensor cores) for float32 at "highest",
TF32 dense at "high"/"medium", BF16/FP16 dense for 16-bit inputs. At (1600, 20, 15), B=64 on an H100 SXM:
fp32 highest fwd+bwd 1.47 GFLOP / 67 TFLOP/s = 22 us (bytes 49.9 MB / 3.35 TB/s = 14.9 us); fp32 TF32 14.9 us
(HBM-bound); bf16 25 MB -> 7.5 us (HBM-bound). On an H200 (4.8 TB/s) the HBM-bound floors are 1.43x lower.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from .dispatch import kernel_mode, triton_available, triton_interpreted, use_triton
from .reference import (
    block_chunk_sizes,
    block_merge_bmm,
    block_merge_reference,
    block_merge_sum_reference,
    block_size_groups,
)
from .utils import cdiv, contiguous, next_power_of_2, on_tensor_device, tl, triton

__all__ = [
    "block_merge",
    "block_merge_sum",
    "block_merge_forward_triton",
    "block_merge_backward_triton",
    "block_merge_backward_reference",
    "block_merge_sum_reference",
    "block_merge_floor",
    "block_plan",
    "choose_block_path",
    "hopper_specs",
    "hopper_floors",
    "GPUS",
    "MAX_CHUNK",
    "MAX_RANK",
]

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
_EPS = 1e-12  # F.normalize's default eps


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _chunk(META, C, c, R, S: tl.constexpr, ALIGN: tl.constexpr):
    """Chunk c's size, column offset, flat weight offset and flat bias offset. S > 0: every chunk is S wide, so all
    four are products of compile-time constants and Triton proves 16-byte alignment (vector loads, async copies);
    S = 0: read from META, declared multiples of ALIGN (the largest power of two <= 16 dividing every chunk size,
    hence every offset)."""
    if S > 0:
        s = S
        col = c * S
        w_off = c.to(tl.int64) * R * (S * S)
        b_off = c * R * S
    else:
        s = tl.multiple_of(tl.load(META + c).to(tl.int32), ALIGN)
        col = tl.multiple_of(tl.load(META + C + c), ALIGN)
        w_off = tl.multiple_of(tl.load(META + 2 * C + c), ALIGN)
        b_off = tl.multiple_of(tl.load(META + 3 * C + c), ALIGN)
    return s, col, w_off, b_off


@triton.jit
def _tile_rows(s, w_off, b_off, BLOCK_J: tl.constexpr, RANK_P: tl.constexpr, R, j0):
    """Indices of one feature tile x all ranks (the N dimension of a tile: n = jj * RANK_P + r): the flat weight
    offset of each row r*s + j, the flat bias index, and which n are real (j < s, r < R)."""
    offs_n = tl.arange(0, BLOCK_J * RANK_P)
    r = offs_n % RANK_P
    j = j0 + offs_n // RANK_P
    mask_n = (j < s) & (r < R)
    row = r * s + j
    return w_off + row.to(tl.int64) * s, b_off + row, mask_n


@triton.jit
def _tile_products(X, W, BIAS, x_row, w_row, b_idx, mask_b, mask_n, s, y,
                   BLOCK_K: tl.constexpr, S: tl.constexpr, PREC: tl.constexpr):
    """y [BLOCK_B, N] += x_c[rows] W[tile rows]^T over the chunk's s inputs in steps of BLOCK_K, plus the bias.
    x_row [BLOCK_B] int64: offset of each row's chunk start in X; w_row [N] int64: flat offset of each weight row.
    Chunks of a compile-time S that BLOCK_K divides load without a K mask."""
    for k0 in range(0, s, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if S > 0 and S % BLOCK_K == 0:  # no K mask: the row and column masks are constant along K (vectors)
            x = tl.load(X + x_row[:, None] + offs_k[None, :], mask=mask_b[:, None], other=0.0)
            w = tl.load(W + w_row[None, :] + offs_k[:, None], mask=mask_n[None, :], other=0.0)
        else:
            mask_k = offs_k < s
            x = tl.load(X + x_row[:, None] + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(W + w_row[None, :] + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        y = tl.dot(x, w.to(x.dtype), y, input_precision=PREC)  # [BLOCK_K, N]: W^T, gathered row by row
    bias = tl.load(BIAS + b_idx, mask=mask_n, other=0.0).to(tl.float32)
    return y + bias[None, :]


@triton.jit
def _block_fwd_kernel(
    X0, X1,  # [B, MM] inputs of the merge, x's dtype (fp32/fp16/bf16), contiguous
    W0, B0, W1, B1,  # flat stacked weights [sum_c R*s_c^2] and biases [R*MM]; W0/W1 one dtype, B0/B1 one dtype
    OUT,  # [B, MM] x's dtype: the normalised merge (FUSED_NORM), or z (not NORMALIZE)
    T,  # [B, MM] fp32: the signed roots t, kept for the backward
    SQ,  # [N_J, B, C] fp32: sum of t^2 per feature tile, row and chunk (when not FUSED_NORM)
    NORM,  # [B, C] fp32: ||t|| per row and chunk, kept for the backward (written here when FUSED_NORM)
    META,  # [4, C] int64: chunk size s_c, column offset, flat weight offset, flat bias offset
    n_rows, MM, C, R,  # B, mm_dim, chunks, rank
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, RANK_P: tl.constexpr,
    NORMALIZE: tl.constexpr, FUSED_NORM: tl.constexpr, PREC: tl.constexpr, S: tl.constexpr, ALIGN: tl.constexpr,
):
    c = tl.program_id(0)
    pb = tl.program_id(1)
    pj = tl.program_id(2)
    s, col, w_off, b_off = _chunk(META, C, c, R, S, ALIGN)
    j0 = pj * BLOCK_J
    if j0 < s:  # the grid is sized by the largest chunk: a shorter chunk's last tiles have nothing to do
        offs_b = (pb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
        mask_b = offs_b < n_rows
        w_row, b_idx, mask_n = _tile_rows(s, w_off, b_off, BLOCK_J, RANK_P, R, j0)
        x_row = offs_b * MM + col
        y0 = tl.zeros([BLOCK_B, BLOCK_J * RANK_P], dtype=tl.float32)
        y1 = tl.zeros([BLOCK_B, BLOCK_J * RANK_P], dtype=tl.float32)
        y0 = _tile_products(X0, W0, B0, x_row, w_row, b_idx, mask_b, mask_n, s, y0, BLOCK_K, S, PREC)
        y1 = _tile_products(X1, W1, B1, x_row, w_row, b_idx, mask_b, mask_n, s, y1, BLOCK_K, S, PREC)
        z = tl.sum(tl.reshape(y0 * y1, (BLOCK_B, BLOCK_J, RANK_P)), axis=2)  # the rank sum, inside the tile
        offs_j = j0 + tl.arange(0, BLOCK_J)
        o_idx = x_row[:, None] + offs_j[None, :]
        o_mask = mask_b[:, None] & (offs_j < s)[None, :]
        if NORMALIZE:
            t = tl.sqrt(tl.maximum(z, 0.0)) - tl.sqrt(tl.maximum(-z, 0.0))
            t = tl.where(o_mask, t, 0.0)
            tl.store(T + o_idx, t, mask=o_mask)
            sumsq = tl.sum(t * t, axis=1)
            if FUSED_NORM:  # this tile is the whole chunk: finish here, one launch for the forward
                norm = tl.sqrt(sumsq)
                inv = 1.0 / tl.maximum(norm, 1e-12)
                tl.store(OUT + o_idx, (t * inv[:, None]).to(OUT.dtype.element_ty), mask=o_mask)
                tl.store(NORM + offs_b * C + c, norm, mask=mask_b)
            else:
                tl.store(SQ + (pj * n_rows + offs_b) * C + c, sumsq, mask=mask_b)
        else:
            tl.store(OUT + o_idx, z.to(OUT.dtype.element_ty), mask=o_mask)


@triton.jit
def _block_norm_kernel(
    T,  # [B, MM] fp32 signed roots from the forward
    SQ,  # [N_J, B, C] fp32 partial sums of t^2
    OUT,  # [B, MM] out, x's dtype
    NORM,  # [B, C] fp32 out: ||t||
    META,  # [4, C] int64 (see the forward)
    n_rows, MM, C,
    BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr, N_JP: tl.constexpr, S: tl.constexpr,
    ALIGN: tl.constexpr,
):
    c = tl.program_id(0)
    pb = tl.program_id(1)
    s, col, _, _ = _chunk(META, C, c, 1, S, ALIGN)
    offs_b = (pb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    mask_b = offs_b < n_rows
    offs_p = tl.arange(0, N_JP)
    mask_p = offs_p * BLOCK_J < s  # the tiles this chunk's forward wrote
    part = tl.load(SQ + (offs_p[:, None] * n_rows + offs_b[None, :]) * C + c,
                   mask=mask_p[:, None] & mask_b[None, :], other=0.0)
    norm = tl.sqrt(tl.sum(part, axis=0))  # summed in tile order: deterministic
    tl.store(NORM + offs_b * C + c, norm, mask=mask_b)
    offs_s = tl.arange(0, BLOCK_S)
    idx = offs_b[:, None] * MM + col + offs_s[None, :]
    mask = mask_b[:, None] & (offs_s < s)[None, :]
    t = tl.load(T + idx, mask=mask, other=0.0)
    tl.store(OUT + idx, (t / tl.maximum(norm, 1e-12)[:, None]).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _dz_of(g, t, inv, coef):
    """Gradient of z from the output's gradient g and the kept root t, with inv = 1 / max(n, eps) and
    coef = <g, out> / max(n, eps) (0 below eps: clamp_min passes no gradient there). Back through out = t * inv
    (dt = (g - out <g, out>) * inv) and the signed sqrt (dz = dt / (2 |t|)); 0 where t == 0, as autograd of the
    reference gives (relu's backward masks sqrt's infinite derivative)."""
    dt = (g - t * inv * coef) * inv
    return tl.where(t != 0.0, dt / tl.where(t != 0.0, 2.0 * tl.abs(t), 1.0), 0.0)


@triton.jit
def _block_bwd_dx_kernel(
    X0, X1,  # [B, MM] x's dtype
    W0, B0, W1, B1,  # flat weights / biases (see the forward)
    G,  # [B, MM] gradient of the output, any float dtype, contiguous (unused without NORMALIZE)
    T, NORM,  # kept from the forward: [B, MM] fp32 roots, [B, C] fp32 norms (unused without NORMALIZE)
    DX0, DX1,  # [B, MM] out: gradients of x0, x1 (x's dtype)
    DZ,  # [B, MM] fp32: written by side 0 (NORMALIZE) for the dW kernel; else the given gradient of z, read
    META,  # [4, C] int64 (see the forward)
    n_rows, MM, C, R,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    HEAD: tl.constexpr, TAIL: tl.constexpr, RANK_P: tl.constexpr, NORMALIZE: tl.constexpr, PREC: tl.constexpr,
    S: tl.constexpr, ALIGN: tl.constexpr,
):
    # the chunk's width in the dx product is covered by a HEAD and a TAIL tile (64 + 16 for chunks of 80: no
    # padding, where one power-of-two tile of 128 wasted 37.5%); TAIL = 0: one tile
    c = tl.program_id(0)
    pb = tl.program_id(1)
    side = tl.program_id(2)  # 0: dx0 = sum (dz*y1) W0; 1: dx1 = sum (dz*y0) W1
    if side == 0:
        X_OTHER, W_SELF, W_OTHER, B_OTHER, DX = X1, W0, W1, B1, DX0
    else:
        X_OTHER, W_SELF, W_OTHER, B_OTHER, DX = X0, W1, W0, B0, DX1
    s, col, w_off, b_off = _chunk(META, C, c, R, S, ALIGN)
    offs_b = (pb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    mask_b = offs_b < n_rows
    x_row = offs_b * MM + col
    offs_s = tl.arange(0, BLOCK_S)
    row_mask = mask_b[:, None] & (offs_s < s)[None, :]
    inv = tl.zeros([BLOCK_B], dtype=tl.float32)
    coef = tl.zeros([BLOCK_B], dtype=tl.float32)
    if NORMALIZE:  # <g, out> over the whole chunk row, then dz for the dW kernel (one side writes it)
        g = tl.load(G + x_row[:, None] + offs_s[None, :], mask=row_mask, other=0.0).to(tl.float32)
        t = tl.load(T + x_row[:, None] + offs_s[None, :], mask=row_mask, other=0.0)
        norm = tl.load(NORM + offs_b * C + c, mask=mask_b, other=1.0)
        inv = 1.0 / tl.maximum(norm, 1e-12)
        coef = tl.where(norm >= 1e-12, tl.sum(g * t, axis=1) * inv, 0.0)
        if side == 0:
            tl.store(DZ + x_row[:, None] + offs_s[None, :], _dz_of(g, t, inv[:, None], coef[:, None]), mask=row_mask)

    offs_h = tl.arange(0, HEAD)
    dx_h = tl.zeros([BLOCK_B, HEAD], dtype=tl.float32)
    if TAIL > 0:
        offs_t = HEAD + tl.arange(0, TAIL)
        dx_t = tl.zeros([BLOCK_B, TAIL], dtype=tl.float32)
    for j0 in range(0, s, BLOCK_J):
        w_row, b_idx, mask_n = _tile_rows(s, w_off, b_off, BLOCK_J, RANK_P, R, j0)
        y = tl.zeros([BLOCK_B, BLOCK_J * RANK_P], dtype=tl.float32)
        y = _tile_products(X_OTHER, W_OTHER, B_OTHER, x_row, w_row, b_idx, mask_b, mask_n, s, y, BLOCK_K, S, PREC)
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_idx = x_row[:, None] + offs_j[None, :]
        j_mask = mask_b[:, None] & (offs_j < s)[None, :]
        if NORMALIZE:
            g_j = tl.load(G + j_idx, mask=j_mask, other=0.0).to(tl.float32)
            t_j = tl.load(T + j_idx, mask=j_mask, other=0.0)
            dz = _dz_of(g_j, t_j, inv[:, None], coef[:, None])
        else:
            dz = tl.load(DZ + j_idx, mask=j_mask, other=0.0)
        dz_n = tl.reshape(tl.broadcast_to(dz[:, :, None], (BLOCK_B, BLOCK_J, RANK_P)), (BLOCK_B, BLOCK_J * RANK_P))
        dy = (dz_n * y).to(X0.dtype.element_ty)  # zero on padded rows and n (dz, W and the bias are)
        w = tl.load(W_SELF + w_row[:, None] + offs_h[None, :], mask=mask_n[:, None] & (offs_h < s)[None, :],
                    other=0.0)
        dx_h = tl.dot(dy, w.to(X0.dtype.element_ty), dx_h, input_precision=PREC)
        if TAIL > 0:
            w = tl.load(W_SELF + w_row[:, None] + offs_t[None, :], mask=mask_n[:, None] & (offs_t < s)[None, :],
                        other=0.0)
            dx_t = tl.dot(dy, w.to(X0.dtype.element_ty), dx_t, input_precision=PREC)
    tl.store(DX + x_row[:, None] + offs_h[None, :], dx_h.to(DX.dtype.element_ty),
             mask=mask_b[:, None] & (offs_h < s)[None, :])
    if TAIL > 0:
        tl.store(DX + x_row[:, None] + offs_t[None, :], dx_t.to(DX.dtype.element_ty),
                 mask=mask_b[:, None] & (offs_t < s)[None, :])


@triton.jit
def _block_bwd_dw_kernel(
    X0, X1,  # [B, MM] x's dtype
    W0, B0, W1, B1,  # flat weights / biases (see the forward)
    DZ,  # [B, MM] fp32 gradient of z (from _block_bwd_dx_kernel, or the given one without the epilogue)
    DW0, DB0, DW1, DB1,  # out: flat gradients, same layout and dtype as W0, B0, W1, B1
    META,  # [4, C] int64 (see the forward)
    n_rows, MM, C, R,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr,
    RANK_P: tl.constexpr, PREC: tl.constexpr, S: tl.constexpr, ALIGN: tl.constexpr,
):
    c = tl.program_id(0)
    pj = tl.program_id(1)
    side = tl.program_id(2)  # 0: dW0/db0 (needs y1), 1: dW1/db1 (needs y0)
    if side == 0:
        X_SELF, X_OTHER, W_OTHER, B_OTHER, DW, DB = X0, X1, W1, B1, DW0, DB0
    else:
        X_SELF, X_OTHER, W_OTHER, B_OTHER, DW, DB = X1, X0, W0, B0, DW1, DB1
    s, col, w_off, b_off = _chunk(META, C, c, R, S, ALIGN)
    j0 = pj * BLOCK_J
    if j0 < s:  # the grid is sized by the largest chunk
        w_row, b_idx, mask_n = _tile_rows(s, w_off, b_off, BLOCK_J, RANK_P, R, j0)
        offs_h = tl.arange(0, HEAD)  # the chunk's width as a HEAD and a TAIL tile, as in the dx kernel
        offs_j = j0 + tl.arange(0, BLOCK_J)
        acc_h = tl.zeros([BLOCK_J * RANK_P, HEAD], dtype=tl.float32)
        if TAIL > 0:
            offs_t = HEAD + tl.arange(0, TAIL)
            acc_t = tl.zeros([BLOCK_J * RANK_P, TAIL], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_J * RANK_P], dtype=tl.float32)
        for b_start in range(0, n_rows, BLOCK_B):
            offs_b = (b_start + tl.arange(0, BLOCK_B)).to(tl.int64)
            mask_b = offs_b < n_rows
            x_row = offs_b * MM + col
            y = tl.zeros([BLOCK_B, BLOCK_J * RANK_P], dtype=tl.float32)
            y = _tile_products(X_OTHER, W_OTHER, B_OTHER, x_row, w_row, b_idx, mask_b, mask_n, s, y, BLOCK_K, S,
                               PREC)
            dz = tl.load(DZ + x_row[:, None] + offs_j[None, :], mask=mask_b[:, None] & (offs_j < s)[None, :],
                         other=0.0)
            dz_n = tl.reshape(tl.broadcast_to(dz[:, :, None], (BLOCK_B, BLOCK_J, RANK_P)),
                              (BLOCK_B, BLOCK_J * RANK_P))
            dy = dz_n * y  # zero on padded rows and n
            dy_t = tl.trans(dy.to(X_SELF.dtype.element_ty))
            x = tl.load(X_SELF + x_row[:, None] + offs_h[None, :], mask=mask_b[:, None] & (offs_h < s)[None, :],
                        other=0.0)
            acc_h = tl.dot(dy_t, x, acc_h, input_precision=PREC)
            if TAIL > 0:
                x = tl.load(X_SELF + x_row[:, None] + offs_t[None, :], mask=mask_b[:, None] & (offs_t < s)[None, :],
                            other=0.0)
                acc_t = tl.dot(dy_t, x, acc_t, input_precision=PREC)
            acc_b += tl.sum(dy, axis=0)
        tl.store(DW + w_row[:, None] + offs_h[None, :], acc_h.to(DW.dtype.element_ty),
                 mask=mask_n[:, None] & (offs_h < s)[None, :])
        if TAIL > 0:
            tl.store(DW + w_row[:, None] + offs_t[None, :], acc_t.to(DW.dtype.element_ty),
                     mask=mask_n[:, None] & (offs_t < s)[None, :])
        tl.store(DB + b_idx, acc_b.to(DB.dtype.element_ty), mask=mask_n)


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


# ------------------------------------------------------------------------------------------- launchers
@functools.lru_cache(maxsize=64)
def _meta_cached(sizes: tuple[int, ...], rank: int, device: str) -> torch.Tensor:
    cols, w_offs, b_offs, col, w, b = [], [], [], 0, 0, 0
    for s in sizes:
        cols.append(col)
        w_offs.append(w)
        b_offs.append(b)
        col += s
        w += rank * s * s
        b += rank * s
    return torch.tensor([list(sizes), cols, w_offs, b_offs], dtype=torch.int64, device=device)


def _meta(sizes, rank: int, device: torch.device) -> torch.Tensor:
    return _meta_cached(tuple(int(s) for s in sizes), int(rank), str(device))


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


def _check(x0, x1, w0, b0, w1, b1, sizes, rank) -> None:
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


def _scratch(n: int, device) -> torch.Tensor:
    return torch.empty(n, dtype=torch.float32, device=device)


@on_tensor_device
def block_merge_forward_triton(x0: torch.Tensor, x1: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor,
                               w1: torch.Tensor, b1: torch.Tensor, *, sizes, rank: int, normalize: bool = True,
                               plan: BlockPlan | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused forward. x0, x1 [B, mm]; w*, b* flat stacked (see the module docstring). Returns
    (out [B, mm] in x's dtype, t [B, mm] fp32, norm [B, chunks] fp32): the normalised merge with the roots and norms
    the backward keeps, or (z, empty, empty) when ``normalize`` is False."""
    sizes = [int(s) for s in sizes]
    _check(x0, x1, w0, b0, w1, b1, sizes, rank)
    x0, x1, w0, b0, w1, b1 = contiguous(x0, x1, w0, b0, w1, b1)
    (n_rows, mm), chunks, dev = x0.shape, len(sizes), x0.device
    out = torch.empty_like(x0, memory_format=torch.contiguous_format)
    t = torch.empty(n_rows, mm, dtype=torch.float32, device=dev) if normalize else _scratch(0, dev)
    norm = torch.empty(n_rows, chunks, dtype=torch.float32, device=dev) if normalize else _scratch(0, dev)
    if n_rows == 0:
        return out, t, norm
    prec = dot_precision(x0.dtype)
    plan = plan or block_plan(n_rows, sizes, rank, sms=_sm_count(dev), ieee_fp32=_ieee_fp32(x0.dtype, prec))
    n_j = _fwd_tiles(plan, sizes)
    fused = normalize and n_j == 1
    sq = _scratch(n_j * n_rows * chunks if normalize and not fused else 1, dev)
    meta, dummy, layout = _meta(sizes, rank, dev), _scratch(1, dev), chunk_layout(sizes)
    _block_fwd_kernel[(chunks, cdiv(n_rows, plan.fwd_b), n_j)](
        x0, x1, w0, b0, w1, b1, out, t if normalize else dummy, sq, norm if normalize else dummy, meta,
        n_rows, mm, chunks, int(rank), BLOCK_B=plan.fwd_b, BLOCK_J=plan.fwd_j, BLOCK_K=plan.block_k,
        RANK_P=plan.rank_p, NORMALIZE=bool(normalize), FUSED_NORM=fused, PREC=prec, **layout,
        num_warps=plan.fwd_warps)
    if normalize and not fused:
        _block_norm_kernel[(chunks, cdiv(n_rows, plan.norm_b))](
            t, sq, out, norm, meta, n_rows, mm, chunks, BLOCK_B=plan.norm_b, BLOCK_S=plan.block_s,
            BLOCK_J=plan.fwd_j, N_JP=next_power_of_2(n_j), **layout, num_warps=4)
    return out, t, norm


@on_tensor_device
def block_merge_backward_triton(grad: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, w0: torch.Tensor,
                                b0: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, t: torch.Tensor,
                                norm: torch.Tensor, *, sizes, rank: int, normalize: bool = True,
                                plan: BlockPlan | None = None) -> tuple[torch.Tensor, ...]:
    """Launch the two backward kernels with what the forward kept (t, norm; unused without ``normalize``). Returns
    (dx0, dx1, dw0, db0, dw1, db1), each shaped and typed as its input. ``grad`` may be any strided view (under
    compile it can arrive expanded, stride 0): it is made contiguous."""
    sizes = [int(s) for s in sizes]
    _check(x0, x1, w0, b0, w1, b1, sizes, rank)
    if grad.shape != x0.shape:
        raise ValueError(f"grad must be {tuple(x0.shape)}, got {tuple(grad.shape)}")
    grad, x0, x1, w0, b0, w1, b1, t, norm = contiguous(grad, x0, x1, w0, b0, w1, b1, t, norm)
    (n_rows, mm), chunks, dev = x0.shape, len(sizes), x0.device
    dx0, dx1 = (torch.empty_like(v, memory_format=torch.contiguous_format) for v in (x0, x1))
    dw0, db0, dw1, db1 = (torch.empty_like(v, memory_format=torch.contiguous_format) for v in (w0, b0, w1, b1))
    if n_rows == 0:
        return dx0, dx1, dw0.zero_(), db0.zero_(), dw1.zero_(), db1.zero_()
    if normalize and (t.shape != x0.shape or norm.shape != (n_rows, chunks)):
        raise ValueError(f"t must be {tuple(x0.shape)} and norm {(n_rows, chunks)} (kept by the forward), got "
                         f"{tuple(t.shape)} and {tuple(norm.shape)}")
    # dz: written by the dx kernel with the epilogue; the output gradient itself without it
    dz = torch.empty(n_rows, mm, dtype=torch.float32, device=dev) if normalize else grad.float().contiguous()
    prec = dot_precision(x0.dtype)
    plan = plan or block_plan(n_rows, sizes, rank, sms=_sm_count(dev), ieee_fp32=_ieee_fp32(x0.dtype, prec))
    meta, dummy, layout = _meta(sizes, rank, dev), _scratch(1, dev), chunk_layout(sizes)
    _block_bwd_dx_kernel[(chunks, cdiv(n_rows, plan.dx_b), 2)](
        x0, x1, w0, b0, w1, b1, grad, t if normalize else dummy, norm if normalize else dummy, dx0, dx1, dz, meta,
        n_rows, mm, chunks, int(rank), BLOCK_B=plan.dx_b, BLOCK_J=plan.dx_j, BLOCK_K=plan.block_k,
        BLOCK_S=plan.block_s, HEAD=plan.out_head, TAIL=plan.out_tail, RANK_P=plan.rank_p, NORMALIZE=bool(normalize),
        PREC=prec, **layout, num_warps=plan.dx_warps)
    _block_bwd_dw_kernel[(chunks, cdiv(max(sizes), plan.dw_j), 2)](
        x0, x1, w0, b0, w1, b1, dz, dw0, db0, dw1, db1, meta, n_rows, mm, chunks, int(rank),
        BLOCK_B=plan.dw_b, BLOCK_J=plan.dw_j, BLOCK_K=plan.block_k, HEAD=plan.out_head, TAIL=plan.out_tail,
        RANK_P=plan.rank_p, PREC=prec, **layout, num_warps=plan.dw_warps)
    return dx0, dx1, dw0, db0, dw1, db1


# ------------------------------------------------------------------------------------------- references
def _reference(x0, x1, w0, b0, w1, b1, sizes, rank, normalize):
    # one compute dtype: weights follow x (fp32 master weights under AMP), as the kernels do
    w0, b0, w1, b1 = (v.to(x0.dtype) for v in (w0, b0, w1, b1))
    return block_merge_reference(x0, x1, w0, b0, w1, b1, sizes=list(sizes), rank=rank, normalize=normalize)


def block_merge_backward_reference(grad, x0, x1, w0, b0, w1, b1, *, sizes, rank: int, normalize: bool = True
                                   ) -> tuple[torch.Tensor, ...]:
    """The reference's own autograd (through ``torch.func.vjp``, which works inside a custom op's implementation,
    where the autograd dispatch keys are excluded and ``torch.autograd.grad`` would not)."""
    _, vjp = torch.func.vjp(lambda *a: _reference(*a, sizes, rank, normalize), x0, x1, w0, b0, w1, b1)
    return tuple(vjp(grad.to(x0.dtype)))


# ------------------------------------------------------------------------------------ torch.library ops
# ``fused`` is decided once by ``block_merge`` (``choose_block_path``) and travels with the op, so the backward
# runs the path the forward ran. The fused path keeps t and norm for its backward; the reference path returns
# zeros of the same shapes (its backward is its own autograd), so the op's output shapes do not depend on the path.
def _kept_shapes(x0, sizes, normalize):
    n_rows, mm = x0.shape
    return ((n_rows, mm), (n_rows, len(sizes))) if normalize else ((0,), (0,))


@torch.library.custom_op("cmc_fast::block_merge", mutates_args=())
def _block_merge_op(x0: torch.Tensor, x1: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: torch.Tensor,
                    b1: torch.Tensor, sizes: list[int], rank: int, normalize: bool, fused: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if fused and use_triton(x0):  # use_triton raises where forced Triton cannot run (CPU without the interpreter)
        return block_merge_forward_triton(x0, x1, w0, b0, w1, b1, sizes=sizes, rank=rank, normalize=normalize)
    with torch.no_grad():
        out = _reference(x0, x1, w0, b0, w1, b1, sizes, rank, normalize).contiguous()
    t_shape, n_shape = _kept_shapes(x0, sizes, normalize)
    zeros = functools.partial(torch.zeros, dtype=torch.float32, device=x0.device)
    return out, zeros(t_shape), zeros(n_shape)  # never read: the reference's backward is its autograd


@_block_merge_op.register_fake
def _(x0, x1, w0, b0, w1, b1, sizes, rank, normalize, fused):
    t_shape, n_shape = _kept_shapes(x0, sizes, normalize)
    return (torch.empty_like(x0, memory_format=torch.contiguous_format),
            x0.new_empty(t_shape, dtype=torch.float32), x0.new_empty(n_shape, dtype=torch.float32))


@torch.library.custom_op("cmc_fast::block_merge_backward", mutates_args=())
def _block_merge_backward_op(grad: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, w0: torch.Tensor,
                             b0: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, t: torch.Tensor,
                             norm: torch.Tensor, sizes: list[int], rank: int, normalize: bool, fused: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor]:
    if fused and use_triton(x0):
        return block_merge_backward_triton(grad, x0, x1, w0, b0, w1, b1, t, norm, sizes=sizes, rank=rank,
                                           normalize=normalize)
    grads = block_merge_backward_reference(grad.contiguous(), x0, x1, w0, b0, w1, b1, sizes=sizes, rank=rank,
                                           normalize=normalize)
    return tuple(g.contiguous() for g in grads)


@_block_merge_backward_op.register_fake
def _(grad, x0, x1, w0, b0, w1, b1, t, norm, sizes, rank, normalize, fused):
    return tuple(torch.empty_like(v, memory_format=torch.contiguous_format) for v in (x0, x1, w0, b0, w1, b1))


def _setup_context(ctx, inputs, output) -> None:
    x0, x1, w0, b0, w1, b1, sizes, rank, normalize, fused = inputs
    _, t, norm = output
    ctx.save_for_backward(x0, x1, w0, b0, w1, b1, t, norm)
    ctx.mark_non_differentiable(t, norm)
    ctx.sizes, ctx.rank, ctx.normalize, ctx.fused = list(sizes), int(rank), bool(normalize), bool(fused)


def _backward(ctx, grad, _grad_t, _grad_norm):
    grads = torch.ops.cmc_fast.block_merge_backward(grad, *ctx.saved_tensors, ctx.sizes, ctx.rank, ctx.normalize,
                                                    ctx.fused)
    return (*grads, None, None, None, None)


_block_merge_op.register_autograd(_backward, setup_context=_setup_context)


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


# ------------------------------------------------------------------------------------------- public API
def _merge(x0, x1, w0, b0, w1, b1, sizes, rank, normalize) -> torch.Tensor:
    sizes, rank = [int(s) for s in sizes], int(rank)
    _check(x0, x1, w0, b0, w1, b1, sizes, rank)
    path = choose_block_path(sizes, rank, x0.shape[0], x0.dtype, x0.device)
    if path == "bmm":
        return block_merge_bmm(x0, x1, w0, b0, w1, b1, sizes=sizes, rank=rank, normalize=normalize)
    out, _, _ = torch.ops.cmc_fast.block_merge(x0, x1, w0, b0, w1, b1, sizes, rank, normalize, path == "fused")
    return out


def block_merge(x0: torch.Tensor, x1: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: torch.Tensor,
                b1: torch.Tensor, *, sizes: list[int], rank: int) -> torch.Tensor:
    """BLOCK's per-chunk merge, rank sum, signed sqrt and per-chunk L2 norm for all chunks (DESIGN section 3).

    x0, x1 [B, mm] (one dtype); w0, w1 flat stacked weights and b0, b1 biases (``block_merge_reference``'s layout;
    w0/w1 one float dtype, b0/b1 one float dtype, cast to x's dtype for the products). Returns [B, mm] in x's dtype,
    differentiable in all six tensors (not twice). The path (fused kernels, batched bmm, reference) is
    ``choose_block_path``'s, overridable with ``CMC_FAST_KERNELS``.
    """
    return _merge(x0, x1, w0, b0, w1, b1, sizes, rank, True)


def block_merge_sum(x0: torch.Tensor, x1: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: torch.Tensor,
                    b1: torch.Tensor, *, sizes: list[int], rank: int) -> torch.Tensor:
    """As ``block_merge`` without the epilogue: the raw rank sums z, [B, mm] (BLOCK's ``pos_norm='after_cat'``)."""
    return _merge(x0, x1, w0, b0, w1, b1, sizes, rank, False)


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


def hopper_specs(shape: tuple[int, ...], dtype: str = "fp32", precision: str = "highest") -> list:
    """The specialisations one ``block_merge`` forward + backward through the fused kernels runs at shape
    (B, DIM, CHUNKS, RANK) on an H100/H200 (132 SMs), x and weights of ``dtype``, float32 matmul precision
    ``precision``: forward (+ norm where a chunk spans several feature tiles), dx, dW. For ``kernels.hopper_build
    report``; whether ``block_merge`` picks this path at that shape is ``choose_block_path``'s call."""
    from .hopper_build import HOPPER_SMS, Spec  # lazily: hopper_build imports Triton's compiler

    b, sizes, rank = _report_args(shape, dtype, precision)
    chunks, mm, max_s = len(sizes), sum(sizes), max(sizes)
    prec = dot_precision(_DTYPES[dtype], precision)
    plan = block_plan(b, sizes, rank, sms=HOPPER_SMS, ieee_fp32=_ieee_fp32(_DTYPES[dtype], prec), interpreted=False)
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
    common = {"RANK_P": plan.rank_p, "BLOCK_K": plan.block_k, "PREC": prec, **chunk_layout(sizes)}

    def spec(fn, consts, warps, programs, inner, outputs):
        consts = {k: v for k, v in {**common, **consts, **ones}.items() if k in fn.arg_names}
        names = tuple(n for n in divisible if n in fn.arg_names and n not in consts)
        return Spec(fn, types, consts, warps, names, f"{dtype} {precision}", programs,
                    extra={"padding_waste": round(max(waste[k] for k in inner), 4),
                           "padding": {k: round(waste[k], 4) for k in inner + outputs}, "dot_precision": prec})

    specs = [spec(_block_fwd_kernel, {"BLOCK_B": plan.fwd_b, "BLOCK_J": plan.fwd_j, "NORMALIZE": True,
                                      "FUSED_NORM": fused}, plan.fwd_warps,
                  chunks * cdiv(b, plan.fwd_b) * n_j, ("k",), ("fwd_n",))]
    if not fused:
        norm = Spec(_block_norm_kernel, types, {"BLOCK_B": plan.norm_b, "BLOCK_S": plan.block_s,
                                                "BLOCK_J": plan.fwd_j, "N_JP": next_power_of_2(n_j),
                                                **chunk_layout(sizes), **{
                                                    k: v for k, v in ones.items() if k in ("n_rows", "C")}}, 4,
                    tuple(n for n in divisible if n in _block_norm_kernel.arg_names and n not in ones),
                    f"{dtype} {precision}", chunks * cdiv(b, plan.norm_b),
                    extra={"padding_waste": None, "padding": {"chunk_out": round(waste["chunk_out"], 4)}})
        specs.append(norm)
    out = {"HEAD": plan.out_head, "TAIL": plan.out_tail}
    specs.append(spec(_block_bwd_dx_kernel, {"BLOCK_B": plan.dx_b, "BLOCK_J": plan.dx_j, "BLOCK_S": plan.block_s,
                                             "NORMALIZE": True, **out}, plan.dx_warps, chunks * cdiv(b, plan.dx_b) * 2,
                      ("k", "dx_n"), ("chunk_out",)))
    specs.append(spec(_block_bwd_dw_kernel, {"BLOCK_B": plan.dw_b, "BLOCK_J": plan.dw_j, **out},
                      plan.dw_warps, chunks * cdiv(max_s, plan.dw_j) * 2, ("k", "dw_batch"), ("chunk_out",)))
    return specs


def hopper_floors(shape: tuple[int, ...], dtype: str = "fp32", precision: str = "highest") -> dict:
    """Floors (microseconds) of the forward and the forward + backward at ``shape`` on each GPU of ``GPUS``."""
    b, sizes, rank = _report_args(shape, dtype, precision)
    t = _DTYPES[dtype]
    return {f"{gpu} {what} us": round(1e6 * block_merge_floor(b, sizes, rank, dtype=t, precision=precision, gpu=gpu,
                                                             backward=bwd), 2)
            for gpu in GPUS for what, bwd in (("fwd", False), ("fwd+bwd", True))}
