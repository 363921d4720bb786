"""BLOCK's block-superdiagonal bilinear merge (Ben-Younes et al. 2019) as fused Triton kernels.

Math (per chunk c of size s, rank R; DESIGN section 1): y0 = x0_c W0_c^T + b0_c, y1 likewise, both
[B, R*s] with m index r*s + j; z[b, j] = sum_r y0[b, r*s+j] * y1[b, r*s+j]; t = sqrt(relu(z)) - sqrt(relu(-z));
out = t / max(||t||_2, 1e-12). Weights use the "flat stacked" layout of ``kernels.reference.block_merge_reference``.

Kernels (one launch each, all chunks at once; a program keeps its chunk's x tiles [BLOCK_B, BLOCK_S] in registers
and walks the chunk's output features in row tiles of BLOCK_J = 16, so weight tiles are [16, BLOCK_S]):
  * ``_block_fwd_kernel``    grid (chunks, batch tiles). Per row tile: loop over the rank, two ``tl.dot`` per step,
                             product and rank sum in fp32 registers, signed sqrt, running sum of squares; the
                             roots go to an fp32 scratch (``out`` itself when fp32). Epilogue in the same launch:
                             a second sweep scales the chunk by 1 / max(||t||, 1e-12).
  * ``_block_bwd_dx_kernel`` grid (chunks, batch tiles). Recomputes z (flash-attention style: only the inputs are
                             saved for backward) into the fp32 ``dz`` buffer with sum t^2 and sum g*t, turns it into
                             dz in place (back through the norm and the signed sqrt), then per row tile and rank
                             dx0 += (dz*y1_r) W0_r and dx1 += (dz*y0_r) W1_r.
  * ``_block_bwd_dw_kernel`` grid (chunks, rank, 2 x row tiles): one program owns a [16, s] slice of dW0_r (side 0)
                             or dW1_r (side 1) and its bias slice, looping over batch tiles: dW0_r += (dz*y1_r)^T x0.
                             Deterministic (no atomics), one more recomputation of y.
Built for sm_90 with ptxas -v (no GPU here; tests/test_block_kernel.py compiles them): at the default tiles no
kernel spills registers (fp32, bf16, bf16 activations with fp32 weights) and shared memory stays under 50 KB.

The signed sqrt's derivative is unbounded at 0. PyTorch's autograd of the reference gives exactly 0 there (relu's
backward zeroes the gradient where its input <= 0, masking sqrt's inf), and so do these kernels: dz = 0 where
z == 0. Through F.normalize: dt = (g - out * <g, out>) / n when n >= eps, and g / eps when n < eps (clamp_min
passes no gradient there), as autograd gives.

Precision: inputs float32, float16 or bfloat16; weights may be a different float dtype than x (the AMP case: fp32
master weights, bf16 activations): weight tiles are cast to x's dtype before ``tl.dot``, which accumulates in
fp32; rank sum and epilogue in fp32; out and dx in x's dtype, dW/db in the weights' dtype. For float32 inputs the
dot runs in IEEE fp32 when ``torch.get_float32_matmul_precision() == "highest"`` (PyTorch's default, as the
reference's F.linear) and in TF32 otherwise.

Limits: chunk sizes up to 256 (a program holds its chunk's x rows, [BLOCK_B, BLOCK_S], in registers); larger chunks
run the reference. Tiles are padded to >= 16 in every dot dimension (``tl.dot``'s minimum on GPUs).

Floor (H100 SXM assumed: 3.35e12 B/s HBM3, ~60e12 FLOP/s fp32 without tensor cores, ~495e12 FLOP/s bf16 dense
tensor cores, the figures of the issue). With S2 = sum_c s_c^2 and MM = sum_c s_c:
  forward   FLOPs = 4*B*R*S2 (two linears)         bytes = 2*R*S2*wb + 2*R*MM*wb + 3*B*MM*xb
  backward  FLOPs = 8*B*R*S2 (dx0, dx1, dW0, dW1)  bytes = 4*R*S2*wb + 4*R*MM*wb + 5*B*MM*xb (read W, write dW)
  floor = max(FLOPs / rate, bytes / bandwidth), recomputation not counted.
  (1600, 20, 15), B=64, fp32: fwd 0.49 GFLOP -> 8.2 us (bytes 16.8 MB -> 5.0 us); fwd+bwd 1.47 GFLOP -> 24.6 us
                              (bytes 49.9 MB -> 14.9 us).
  (1600, 20, 15), B=64, bf16: fwd 8.4 MB -> 2.5 us (FLOPs 1.0 us: bandwidth-bound); fwd+bwd 25 MB -> 7.5 us.
  (256, 18, 15),  B=64, fp32: fwd 0.24 us, fwd+bwd 0.73 us: far below a launch (~3-5 us), latency is the floor.
``bench/test_block.py`` computes the floor of each benchmarked case with the same formulas.
"""

from __future__ import annotations

import functools

import torch

from .dispatch import triton_interpreted, use_triton
from .reference import block_merge_reference
from .utils import contiguous, next_power_of_2, tl, triton

__all__ = [
    "block_merge",
    "block_merge_sum",
    "block_merge_forward_triton",
    "block_merge_backward_triton",
    "block_merge_backward_reference",
    "block_merge_sum_reference",
    "block_merge_floor",
    "MAX_CHUNK",
]

MAX_CHUNK = 256  # largest chunk size the fused kernels take (the whole chunk row lives in one tile)
MIN_DOT = 16  # tl.dot needs every dimension >= 16 on NVIDIA GPUs; the interpreter does not check it
_EPS = 1e-12  # F.normalize's default eps


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _block_fwd_kernel(
    X0, X1,  # [B, MM] inputs of the merge, x's dtype (fp32/fp16/bf16), contiguous
    W0, B0, W1, B1,  # flat stacked weights [sum_c R*s_c^2] and biases [R*MM], any float dtype, contiguous
    OUT,  # [B, MM] output, x's dtype
    T,  # [B, MM] fp32 scratch for the unnormalised signed roots (may be OUT itself when OUT is fp32)
    META,  # [4, C] int64: chunk size s_c, column offset, flat weight offset, flat bias offset
    n_rows, MM, C, R,  # B, mm_dim, chunks, rank
    BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr, NORMALIZE: tl.constexpr,
    PREC: tl.constexpr,
):
    c = tl.program_id(0)
    pb = tl.program_id(1)
    s = tl.load(META + c)
    col = tl.load(META + C + c)
    w_off = tl.load(META + 2 * C + c)
    b_off = tl.load(META + 3 * C + c)

    offs_b = (pb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_S)  # input features of the chunk, all at once
    mask_b = offs_b < n_rows
    mask_k = offs_k < s
    x_idx = offs_b[:, None] * MM + col + offs_k[None, :]
    x0 = tl.load(X0 + x_idx, mask=mask_b[:, None] & mask_k[None, :], other=0.0)
    x1 = tl.load(X1 + x_idx, mask=mask_b[:, None] & mask_k[None, :], other=0.0)
    sumsq = tl.zeros([BLOCK_B], dtype=tl.float32)
    for j0 in range(0, s, BLOCK_J):  # output features in tiles of BLOCK_J: weight tiles [BLOCK_J, BLOCK_S]
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < s
        mask_w = mask_j[:, None] & mask_k[None, :]
        w_idx = w_off + offs_j[:, None] * s + offs_k[None, :]  # row j, column k of rank block 0
        z = tl.zeros([BLOCK_B, BLOCK_J], dtype=tl.float32)
        for r in range(R):
            w0 = tl.load(W0 + w_idx + r * s * s, mask=mask_w, other=0.0).to(x0.dtype)
            w1 = tl.load(W1 + w_idx + r * s * s, mask=mask_w, other=0.0).to(x0.dtype)
            bias0 = tl.load(B0 + b_off + r * s + offs_j, mask=mask_j, other=0.0).to(tl.float32)
            bias1 = tl.load(B1 + b_off + r * s + offs_j, mask=mask_j, other=0.0).to(tl.float32)
            y0 = tl.dot(x0, tl.trans(w0), input_precision=PREC) + bias0[None, :]
            y1 = tl.dot(x1, tl.trans(w1), input_precision=PREC) + bias1[None, :]
            z += y0 * y1
        o_idx = offs_b[:, None] * MM + col + offs_j[None, :]
        o_mask = mask_b[:, None] & mask_j[None, :]
        if NORMALIZE:
            t = tl.sqrt(tl.maximum(z, 0.0)) - tl.sqrt(tl.maximum(-z, 0.0))
            sumsq += tl.sum(t * t, axis=1)
            tl.store(T + o_idx, t, mask=o_mask)
        else:
            tl.store(OUT + o_idx, z.to(OUT.dtype.element_ty), mask=o_mask)
    if NORMALIZE:  # epilogue: the chunk's L2 norm, known once every tile is done
        tl.debug_barrier()  # T was written by other threads of this program
        inv = 1.0 / tl.maximum(tl.sqrt(sumsq), 1e-12)
        for j1 in range(0, s, BLOCK_J):
            offs_n = j1 + tl.arange(0, BLOCK_J)
            n_idx = offs_b[:, None] * MM + col + offs_n[None, :]
            n_mask = mask_b[:, None] & (offs_n < s)[None, :]
            t_n = tl.load(T + n_idx, mask=n_mask, other=0.0)
            tl.store(OUT + n_idx, (t_n * inv[:, None]).to(OUT.dtype.element_ty), mask=n_mask)


@triton.jit
def _block_bwd_dx_kernel(
    X0, X1,  # [B, MM] x's dtype
    W0, B0, W1, B1,  # flat weights / biases (see the forward)
    G,  # [B, MM] gradient of the output, any float dtype, contiguous (unused without NORMALIZE)
    DX0, DX1,  # [B, MM] out: gradients of x0, x1 (x's dtype)
    DZ,  # [B, MM] fp32: out, the gradient of the rank sums z (scratch for z first); in, when not NORMALIZE
    META,  # [4, C] int64 (see the forward)
    n_rows, MM, C, R,
    BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr, NORMALIZE: tl.constexpr,
    PREC: tl.constexpr,
):
    c = tl.program_id(0)
    pb = tl.program_id(1)
    s = tl.load(META + c)
    col = tl.load(META + C + c)
    w_off = tl.load(META + 2 * C + c)
    b_off = tl.load(META + 3 * C + c)

    offs_b = (pb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_S)
    mask_b = offs_b < n_rows
    mask_k = offs_k < s
    x_idx = offs_b[:, None] * MM + col + offs_k[None, :]
    x0 = tl.load(X0 + x_idx, mask=mask_b[:, None] & mask_k[None, :], other=0.0)
    x1 = tl.load(X1 + x_idx, mask=mask_b[:, None] & mask_k[None, :], other=0.0)
    if NORMALIZE:
        # sweep 1: recompute z tile by tile (kept in DZ), with sum t^2 and sum g*t per row
        sumsq = tl.zeros([BLOCK_B], dtype=tl.float32)
        gt = tl.zeros([BLOCK_B], dtype=tl.float32)
        for j0 in range(0, s, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            mask_j = offs_j < s
            mask_w = mask_j[:, None] & mask_k[None, :]
            w_idx = w_off + offs_j[:, None] * s + offs_k[None, :]
            z = tl.zeros([BLOCK_B, BLOCK_J], dtype=tl.float32)
            for r in range(R):
                w0 = tl.load(W0 + w_idx + r * s * s, mask=mask_w, other=0.0).to(x0.dtype)
                w1 = tl.load(W1 + w_idx + r * s * s, mask=mask_w, other=0.0).to(x0.dtype)
                bias0 = tl.load(B0 + b_off + r * s + offs_j, mask=mask_j, other=0.0).to(tl.float32)
                bias1 = tl.load(B1 + b_off + r * s + offs_j, mask=mask_j, other=0.0).to(tl.float32)
                y0 = tl.dot(x0, tl.trans(w0), input_precision=PREC) + bias0[None, :]
                y1 = tl.dot(x1, tl.trans(w1), input_precision=PREC) + bias1[None, :]
                z += y0 * y1
            o_idx = offs_b[:, None] * MM + col + offs_j[None, :]
            o_mask = mask_b[:, None] & mask_j[None, :]
            g = tl.load(G + o_idx, mask=o_mask, other=0.0).to(tl.float32)
            t = tl.sqrt(tl.maximum(z, 0.0)) - tl.sqrt(tl.maximum(-z, 0.0))
            sumsq += tl.sum(t * t, axis=1)
            gt += tl.sum(g * t, axis=1)
            tl.store(DZ + o_idx, z, mask=o_mask)
        tl.debug_barrier()
        # sweep 2: back through out = t / max(n, eps) and the signed sqrt, z -> dz in place
        norm = tl.sqrt(sumsq)
        denom = tl.maximum(norm, 1e-12)
        proj = tl.where(norm >= 1e-12, gt / denom, 0.0)  # <g, out>; clamp_min passes no gradient below eps
        for j0 in range(0, s, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            o_idx = offs_b[:, None] * MM + col + offs_j[None, :]
            o_mask = mask_b[:, None] & (offs_j < s)[None, :]
            z = tl.load(DZ + o_idx, mask=o_mask, other=0.0)
            g = tl.load(G + o_idx, mask=o_mask, other=0.0).to(tl.float32)
            root = tl.sqrt(tl.abs(z))  # == |t| exactly: one of sqrt(relu(z)), sqrt(relu(-z)) is sqrt(0) = 0
            t = tl.sqrt(tl.maximum(z, 0.0)) - tl.sqrt(tl.maximum(-z, 0.0))
            dt = (g - (t / denom[:, None]) * proj[:, None]) / denom[:, None]
            # relu's backward zeroes the (infinite) sqrt gradient where z == 0, as autograd of the reference does
            dz = tl.where(z != 0.0, dt / tl.where(z != 0.0, 2.0 * root, 1.0), 0.0)
            tl.store(DZ + o_idx, dz, mask=o_mask)
        tl.debug_barrier()

    # dx0 = sum_r (dz * y1_r) W0_r and dx1 = sum_r (dz * y0_r) W1_r, tile by tile over the output features j
    dx0 = tl.zeros([BLOCK_B, BLOCK_S], dtype=tl.float32)
    dx1 = tl.zeros([BLOCK_B, BLOCK_S], dtype=tl.float32)
    for j0 in range(0, s, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < s
        mask_w = mask_j[:, None] & mask_k[None, :]
        w_idx = w_off + offs_j[:, None] * s + offs_k[None, :]
        dz = tl.load(DZ + offs_b[:, None] * MM + col + offs_j[None, :], mask=mask_b[:, None] & mask_j[None, :],
                     other=0.0)
        for r in range(R):
            w0 = tl.load(W0 + w_idx + r * s * s, mask=mask_w, other=0.0).to(x0.dtype)
            w1 = tl.load(W1 + w_idx + r * s * s, mask=mask_w, other=0.0).to(x0.dtype)
            bias0 = tl.load(B0 + b_off + r * s + offs_j, mask=mask_j, other=0.0).to(tl.float32)
            bias1 = tl.load(B1 + b_off + r * s + offs_j, mask=mask_j, other=0.0).to(tl.float32)
            y0 = tl.dot(x0, tl.trans(w0), input_precision=PREC) + bias0[None, :]
            y1 = tl.dot(x1, tl.trans(w1), input_precision=PREC) + bias1[None, :]
            dx0 += tl.dot((dz * y1).to(x0.dtype), w0, input_precision=PREC)
            dx1 += tl.dot((dz * y0).to(x0.dtype), w1, input_precision=PREC)
    tl.store(DX0 + x_idx, dx0.to(DX0.dtype.element_ty), mask=mask_b[:, None] & mask_k[None, :])
    tl.store(DX1 + x_idx, dx1.to(DX1.dtype.element_ty), mask=mask_b[:, None] & mask_k[None, :])


@triton.jit
def _block_bwd_dw_kernel(
    X0, X1,  # [B, MM] x's dtype
    W0, B0, W1, B1,  # flat weights / biases (see the forward)
    DZ,  # [B, MM] fp32 gradient of z from _block_bwd_dx_kernel
    DW0, DB0, DW1, DB1,  # out: flat gradients, same layout and dtype as W0, B0, W1, B1
    META,  # [4, C] int64 (see the forward)
    n_rows, MM, C,
    BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr, PREC: tl.constexpr,
):
    N_J: tl.constexpr = BLOCK_S // BLOCK_J
    c = tl.program_id(0)
    r = tl.program_id(1)
    side = tl.program_id(2) // N_J  # 0: dW0/db0 (needs y1), 1: dW1/db1 (needs y0)
    j0 = (tl.program_id(2) % N_J) * BLOCK_J  # this program's rows of the [s, s] block
    s = tl.load(META + c)
    col = tl.load(META + C + c)
    w_off = tl.load(META + 2 * C + c)
    b_off = tl.load(META + 3 * C + c)
    if side == 0:
        X_SELF, X_OTHER, W_OTHER, B_OTHER, DW, DB = X0, X1, W1, B1, DW0, DB0
    else:
        X_SELF, X_OTHER, W_OTHER, B_OTHER, DW, DB = X1, X0, W0, B0, DW1, DB1

    offs_j = j0 + tl.arange(0, BLOCK_J)
    offs_k = tl.arange(0, BLOCK_S)
    mask_j = offs_j < s  # all false for the tiles past a short chunk's end: nothing stored
    mask_k = offs_k < s
    mask_w = mask_j[:, None] & mask_k[None, :]
    w_idx = w_off + r * s * s + offs_j[:, None] * s + offs_k[None, :]
    w_other = tl.load(W_OTHER + w_idx, mask=mask_w, other=0.0).to(X_OTHER.dtype.element_ty)
    bias_other = tl.load(B_OTHER + b_off + r * s + offs_j, mask=mask_j, other=0.0).to(tl.float32)

    acc_w = tl.zeros([BLOCK_J, BLOCK_S], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_J], dtype=tl.float32)
    for b_start in range(0, n_rows, BLOCK_B):
        offs_b = (b_start + tl.arange(0, BLOCK_B)).to(tl.int64)
        mask_b = offs_b < n_rows
        x_idx = offs_b[:, None] * MM + col + offs_k[None, :]
        x_self = tl.load(X_SELF + x_idx, mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        x_other = tl.load(X_OTHER + x_idx, mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        dz = tl.load(DZ + offs_b[:, None] * MM + col + offs_j[None, :], mask=mask_b[:, None] & mask_j[None, :],
                     other=0.0)
        y_other = tl.dot(x_other, tl.trans(w_other), input_precision=PREC) + bias_other[None, :]
        dy = dz * y_other  # zero on padded rows and columns (dz is)
        acc_w += tl.dot(tl.trans(dy.to(x_self.dtype)), x_self, input_precision=PREC)
        acc_b += tl.sum(dy, axis=0)
    tl.store(DW + w_idx, acc_w.to(DW.dtype.element_ty), mask=mask_w)
    tl.store(DB + b_off + r * s + offs_j, acc_b.to(DB.dtype.element_ty), mask=mask_j)


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


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _tiles(n_rows: int, max_size: int, block_b: int | None, block_s: int | None, block_j: int | None
           ) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_S, BLOCK_J, num_warps). A heuristic, not timed on a GPU yet (no autotune under the
    interpreter), but compiled for sm_90 and read with ptxas -v: with BLOCK_J=16 and 8 warps at BLOCK_S=128 no
    kernel spills, for fp32, bf16, and bf16 activations with fp32 weights; BLOCK_J=32 spills in the dx kernel (fp32
    and AMP), 4 warps at BLOCK_S=128 spill up to 1.7 KB, and whole [BLOCK_S, BLOCK_S] weight tiles (no BLOCK_J)
    needed 270 KB of shared memory. BLOCK_S=256 spills ~250 B in the dx kernel. BLOCK_J=16 also divides BLOCK's
    default chunk of 80 exactly."""
    block_s = block_s or max(MIN_DOT, next_power_of_2(max_size))
    block_j = block_j or MIN_DOT
    if block_b is None:
        if triton_interpreted():  # the interpreter pays per program and per op, not per element: few big tiles
            block_b = min(64, max(MIN_DOT, next_power_of_2(n_rows)))
        else:
            block_b = 16 if block_s >= 64 or n_rows <= 256 else 32
    if min(block_b, block_s, block_j) < MIN_DOT:
        raise ValueError(f"tl.dot needs tiles >= {MIN_DOT} in every dimension, got BLOCK_B={block_b}, "
                         f"BLOCK_S={block_s}, BLOCK_J={block_j}")
    if block_s < max_size or any(v & (v - 1) for v in (block_b, block_s, block_j)) or block_j > block_s:
        raise ValueError(f"BLOCK_S={block_s} must be a power of two >= the largest chunk ({max_size}); BLOCK_B="
                         f"{block_b} and BLOCK_J={block_j} <= BLOCK_S powers of two")
    return block_b, block_s, block_j, (8 if block_s >= 128 else 4)


def _check(x0, x1, w0, b0, w1, b1, sizes, rank) -> None:
    if x0.dim() != 2 or x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must both be [B, mm], got {tuple(x0.shape)} and {tuple(x1.shape)}")
    if x0.dtype != x1.dtype:
        raise ValueError(f"x0 and x1 must have one dtype, got {x0.dtype} and {x1.dtype}")
    mm = sum(sizes)
    n_w = rank * sum(s * s for s in sizes)
    if x0.shape[1] != mm:
        raise ValueError(f"x0 has {x0.shape[1]} features but the chunk sizes sum to {mm}")
    for name, t, n in (("w0", w0, n_w), ("b0", b0, rank * mm), ("w1", w1, n_w), ("b1", b1, rank * mm)):
        if t.numel() != n:
            raise ValueError(f"{name} must hold {n} elements (flat stacked layout), got {t.numel()}")


def block_merge_forward_triton(x0: torch.Tensor, x1: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor,
                               w1: torch.Tensor, b1: torch.Tensor, *, sizes, rank: int, normalize: bool = True,
                               block_b: int | None = None, block_s: int | None = None, block_j: int | None = None
                               ) -> torch.Tensor:
    """Launch the fused forward. x0, x1 [B, mm]; w*, b* flat stacked (see the module docstring). Returns [B, mm]
    in x's dtype: the normalised merge, or the raw rank sums z when ``normalize`` is False."""
    sizes = [int(s) for s in sizes]
    _check(x0, x1, w0, b0, w1, b1, sizes, rank)
    x0, x1, w0, b0, w1, b1 = contiguous(x0, x1, w0, b0, w1, b1)
    n_rows, mm = x0.shape
    out = torch.empty_like(x0, memory_format=torch.contiguous_format)
    if n_rows == 0:
        return out
    bb, bs, bj, warps = _tiles(n_rows, max(sizes), block_b, block_s, block_j)
    scratch = out if (out.dtype == torch.float32 or not normalize) else torch.empty(
        n_rows, mm, dtype=torch.float32, device=x0.device)
    grid = (len(sizes), triton.cdiv(n_rows, bb))
    _block_fwd_kernel[grid](x0, x1, w0, b0, w1, b1, out, scratch, _meta(sizes, rank, x0.device), n_rows, mm,
                            len(sizes), int(rank), BLOCK_B=bb, BLOCK_S=bs, BLOCK_J=bj, NORMALIZE=bool(normalize),
                            PREC=_dot_precision(x0.dtype), num_warps=warps)
    return out


def block_merge_backward_triton(grad: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, w0: torch.Tensor,
                                b0: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, *, sizes, rank: int,
                                normalize: bool = True, block_b: int | None = None, block_s: int | None = None,
                                block_j: int | None = None) -> tuple[torch.Tensor, ...]:
    """Launch the two backward kernels. Returns (dx0, dx1, dw0, db0, dw1, db1), each shaped and typed as its input.
    ``grad`` may be any strided view (under compile it can arrive expanded, stride 0): it is made contiguous."""
    sizes = [int(s) for s in sizes]
    _check(x0, x1, w0, b0, w1, b1, sizes, rank)
    if grad.shape != x0.shape:
        raise ValueError(f"grad must be {tuple(x0.shape)}, got {tuple(grad.shape)}")
    grad, x0, x1, w0, b0, w1, b1 = contiguous(grad, x0, x1, w0, b0, w1, b1)
    n_rows, mm = x0.shape
    dx0, dx1 = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x0, x1))
    dw0, db0, dw1, db1 = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (w0, b0, w1, b1))
    if n_rows == 0:
        return dx0, dx1, dw0.zero_(), db0.zero_(), dw1.zero_(), db1.zero_()
    # dz: the kernel's output (and z's scratch) with the epilogue; the output gradient itself without it
    dz = torch.empty(n_rows, mm, dtype=torch.float32, device=x0.device) if normalize else grad.float().contiguous()
    bb, bs, bj, warps = _tiles(n_rows, max(sizes), block_b, block_s, block_j)
    meta, prec, chunks = _meta(sizes, rank, x0.device), _dot_precision(x0.dtype), len(sizes)
    _block_bwd_dx_kernel[(chunks, triton.cdiv(n_rows, bb))](
        x0, x1, w0, b0, w1, b1, grad, dx0, dx1, dz, meta, n_rows, mm, chunks, int(rank),
        BLOCK_B=bb, BLOCK_S=bs, BLOCK_J=bj, NORMALIZE=bool(normalize), PREC=prec, num_warps=warps)
    _block_bwd_dw_kernel[(chunks, int(rank), 2 * (bs // bj))](
        x0, x1, w0, b0, w1, b1, dz, dw0, db0, dw1, db1, meta, n_rows, mm, chunks,
        BLOCK_B=bb, BLOCK_S=bs, BLOCK_J=bj, PREC=prec, num_warps=warps)
    return dx0, dx1, dw0, db0, dw1, db1


# ------------------------------------------------------------------------------------------- references
def block_merge_sum_reference(x0, x1, w0, b0, w1, b1, *, sizes, rank: int) -> torch.Tensor:
    """The merge without its epilogue: the raw rank sums z of every chunk, [B, mm] (for ``pos_norm='after_cat'``)."""
    outs, col, w_off, b_off = [], 0, 0, 0
    for s in sizes:
        n_w, n_b = rank * s * s, rank * s
        y0 = torch.nn.functional.linear(x0[:, col:col + s], w0[w_off:w_off + n_w].view(n_b, s), b0[b_off:b_off + n_b])
        y1 = torch.nn.functional.linear(x1[:, col:col + s], w1[w_off:w_off + n_w].view(n_b, s), b1[b_off:b_off + n_b])
        outs.append((y0 * y1).view(-1, rank, s).sum(1))
        col, w_off, b_off = col + s, w_off + n_w, b_off + n_b
    return torch.cat(outs, dim=1)


def _reference(x0, x1, w0, b0, w1, b1, sizes, rank, normalize):
    # one compute dtype: weights follow x (fp32 master weights under AMP), as the kernels do
    w0, b0, w1, b1 = (t.to(x0.dtype) for t in (w0, b0, w1, b1))
    fn = block_merge_reference if normalize else block_merge_sum_reference
    return fn(x0, x1, w0, b0, w1, b1, sizes=list(sizes), rank=rank)


def block_merge_backward_reference(grad, x0, x1, w0, b0, w1, b1, *, sizes, rank: int, normalize: bool = True
                                   ) -> tuple[torch.Tensor, ...]:
    """The reference's own autograd (through ``torch.func.vjp``, which works inside a custom op's implementation,
    where the autograd dispatch keys are excluded and ``torch.autograd.grad`` would not)."""
    _, vjp = torch.func.vjp(lambda *a: _reference(*a, sizes, rank, normalize), x0, x1, w0, b0, w1, b1)
    return tuple(vjp(grad.to(x0.dtype)))


def _fused_ok(sizes) -> bool:
    return max(sizes) <= MAX_CHUNK


# ------------------------------------------------------------------------------------ torch.library ops
@torch.library.custom_op("cmc_fast::block_merge", mutates_args=())
def _block_merge_op(x0: torch.Tensor, x1: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: torch.Tensor,
                    b1: torch.Tensor, sizes: list[int], rank: int, normalize: bool) -> torch.Tensor:
    if use_triton(x0) and _fused_ok(sizes):
        return block_merge_forward_triton(x0, x1, w0, b0, w1, b1, sizes=sizes, rank=rank, normalize=normalize)
    with torch.no_grad():
        return _reference(x0, x1, w0, b0, w1, b1, sizes, rank, normalize).contiguous()


@_block_merge_op.register_fake
def _(x0, x1, w0, b0, w1, b1, sizes, rank, normalize):
    return torch.empty_like(x0, memory_format=torch.contiguous_format)


@torch.library.custom_op("cmc_fast::block_merge_backward", mutates_args=())
def _block_merge_backward_op(grad: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, w0: torch.Tensor,
                             b0: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, sizes: list[int], rank: int,
                             normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                       torch.Tensor, torch.Tensor]:
    if use_triton(x0) and _fused_ok(sizes):
        return block_merge_backward_triton(grad, x0, x1, w0, b0, w1, b1, sizes=sizes, rank=rank,
                                           normalize=normalize)
    grads = block_merge_backward_reference(grad.contiguous(), x0, x1, w0, b0, w1, b1, sizes=sizes, rank=rank,
                                           normalize=normalize)
    return tuple(g.contiguous() for g in grads)


@_block_merge_backward_op.register_fake
def _(grad, x0, x1, w0, b0, w1, b1, sizes, rank, normalize):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x0, x1, w0, b0, w1, b1))


def _setup_context(ctx, inputs, output) -> None:
    x0, x1, w0, b0, w1, b1, sizes, rank, normalize = inputs
    ctx.save_for_backward(x0, x1, w0, b0, w1, b1)
    ctx.sizes, ctx.rank, ctx.normalize = list(sizes), int(rank), bool(normalize)


def _backward(ctx, grad):
    grads = torch.ops.cmc_fast.block_merge_backward(grad, *ctx.saved_tensors, ctx.sizes, ctx.rank, ctx.normalize)
    return (*grads, None, None, None)


_block_merge_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------- public API
def block_merge(x0: torch.Tensor, x1: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: torch.Tensor,
                b1: torch.Tensor, *, sizes: list[int], rank: int) -> torch.Tensor:
    """BLOCK's per-chunk merge, rank sum, signed sqrt and per-chunk L2 norm for all chunks (DESIGN section 3).

    x0, x1 [B, mm] (one dtype); w0, w1 flat stacked weights and b0, b1 biases (``block_merge_reference``'s layout,
    any float dtype: cast to x's dtype for the products). Returns [B, mm] in x's dtype, differentiable in all six
    tensors (not twice). CUDA tensors run the Triton kernels, CPU tensors the reference (``CMC_FAST_KERNELS``).
    """
    sizes = [int(s) for s in sizes]
    _check(x0, x1, w0, b0, w1, b1, sizes, int(rank))
    return torch.ops.cmc_fast.block_merge(x0, x1, w0, b0, w1, b1, sizes, int(rank), True)


def block_merge_sum(x0: torch.Tensor, x1: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: torch.Tensor,
                    b1: torch.Tensor, *, sizes: list[int], rank: int) -> torch.Tensor:
    """As ``block_merge`` without the epilogue: the raw rank sums z, [B, mm] (BLOCK's ``pos_norm='after_cat'``)."""
    sizes = [int(s) for s in sizes]
    _check(x0, x1, w0, b0, w1, b1, sizes, int(rank))
    return torch.ops.cmc_fast.block_merge(x0, x1, w0, b0, w1, b1, sizes, int(rank), False)


def block_merge_floor(batch: int, sizes, rank: int, *, x_bytes: int = 4, w_bytes: int = 4, backward: bool = False,
                      flops_per_s: float = 60e12, bytes_per_s: float = 3.35e12) -> float:
    """Seconds the merge cannot beat on a device of the given rates (see the module docstring)."""
    s2, mm = sum(s * s for s in sizes), sum(sizes)
    flops = 4 * batch * rank * s2
    nbytes = 2 * rank * s2 * w_bytes + 2 * rank * mm * w_bytes + 3 * batch * mm * x_bytes
    if backward:
        flops += 8 * batch * rank * s2
        nbytes += 4 * rank * s2 * w_bytes + 4 * rank * mm * w_bytes + 5 * batch * mm * x_bytes
    return max(flops / flops_per_s, nbytes / bytes_per_s)
