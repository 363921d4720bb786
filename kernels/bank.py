"""The memory bank's momentum update as one Triton op: M[i] <- normalize(m * M[i] + (1 - m) * f_i) for each i of a
batch's indices, in place (DESIGN section 3, ``kernels.bank_update_``).

Layout (Liger-Kernel style): the Triton kernel, its launcher, the torch.library op ``cmc_fast::bank_update_`` (with
its fake registration), then the public function. The op dispatches with ``kernels.dispatch.use_triton``: the
Triton launcher for CUDA tensors (or CPU tensors under TRITON_INTERPRET=1 with CMC_FAST_KERNELS=triton),
``reference.bank_update_reference_`` otherwise.
"""

from __future__ import annotations

import torch

from .dispatch import use_triton
from .reference import bank_update_reference_
from .utils import contiguous, next_power_of_2, on_tensor_device, tl, triton

__all__ = ["bank_update_", "bank_update_triton_"]


# ============================================================================================= kernel
@triton.jit
def _bank_update_kernel(
    bank_ptr,  # [N, D] fp32/bf16/fp16, strides (stride_bn, stride_bd); updated in place
    index_ptr,  # [n] int64/int32, contiguous: the bank row each feature goes to
    feats_ptr,  # [n, D] float, contiguous
    n, D, stride_bn, stride_bd, momentum,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    mine = tl.load(index_ptr + i)
    # The last occurrence of a repeated index wins: a program whose index reappears later writes nothing, so
    # each bank row is read and written by exactly one program and every row is computed from the pre-call bank.
    later = tl.zeros([BLOCK_N], dtype=tl.int32)
    for n0 in range(0, n, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        other = tl.load(index_ptr + offs, mask=offs < n, other=0)
        later += ((other == mine) & (offs > i) & (offs < n)).to(tl.int32)
    if tl.sum(later, axis=0) == 0:
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        ptrs = bank_ptr + mine.to(tl.int64) * stride_bn + offs_d * stride_bd
        old = tl.load(ptrs, mask=mask_d, other=0.0).to(tl.float32)
        f = tl.load(feats_ptr + i.to(tl.int64) * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        mixed = old * momentum + f * (1.0 - momentum)
        norm = tl.sqrt(tl.sum(mixed * mixed, axis=0))
        out = mixed / tl.maximum(norm, 1e-12)  # F.normalize's eps
        tl.store(ptrs, out.to(bank_ptr.dtype.element_ty), mask=mask_d)


# =========================================================================================== launcher
@on_tensor_device
def bank_update_triton_(bank: torch.Tensor, index: torch.Tensor, feats: torch.Tensor, momentum: float) -> None:
    """In place, one program per batch row; rows whose index repeats later in the batch write nothing."""
    index, feats = contiguous(index.reshape(-1), feats)
    n = index.numel()
    if n == 0:
        return
    d = bank.shape[1]
    _bank_update_kernel[(n,)](bank, index, feats, n, d, bank.stride(0), bank.stride(1), float(momentum),
                              BLOCK_N=min(next_power_of_2(n), 1024), BLOCK_D=next_power_of_2(d))


# ================================================================================== torch.library op
@torch.library.custom_op("cmc_fast::bank_update_", mutates_args=("bank",))
def _bank_update_op(bank: torch.Tensor, index: torch.Tensor, feats: torch.Tensor, momentum: float) -> None:
    if use_triton(bank):
        bank_update_triton_(bank, index, feats, momentum)
    else:
        bank_update_reference_(bank, index, feats, momentum)


@_bank_update_op.register_fake
def _(bank, index, feats, momentum):
    return None


# ===================================================================================== public function
def bank_update_(bank: torch.Tensor, index: torch.Tensor, feats: torch.Tensor, momentum: float) -> None:
    """In place: M[i] <- normalize(m * M[i] + (1 - m) * f_i) for each i in ``index``; float32 arithmetic, stored
    in the bank's dtype. Every row is computed from the pre-call bank; a repeated index: the last occurrence wins.
    """
    index = index.reshape(-1)
    if bank.dim() != 2 or feats.dim() != 2 or feats.shape != (index.numel(), bank.shape[1]):
        raise ValueError(f"bank must be [N, d], index [n] and feats [n, d]; got {tuple(bank.shape)}, "
                         f"{tuple(index.shape)}, {tuple(feats.shape)}")
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"index must be int64 (or int32), got {index.dtype}")
    _bank_update_op(bank, index, feats.detach(), float(momentum))
