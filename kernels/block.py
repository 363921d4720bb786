"""BLOCK's block-superdiagonal bilinear merge.

Placeholder: dispatches to the PyTorch reference until the fused Triton kernel lands (issue 5).
"""

from __future__ import annotations

import torch

from kernels.reference import block_merge_reference


def block_merge(x0: torch.Tensor, x1: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: torch.Tensor,
                b1: torch.Tensor, *, sizes: list[int], rank: int) -> torch.Tensor:
    return block_merge_reference(x0, x1, w0, b0, w1, b1, sizes=list(sizes), rank=rank)
