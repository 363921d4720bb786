"""Cross-modal NCE over a memory bank: loss, first-batch partition and bank update.

Placeholder: dispatches to the PyTorch reference until the fused Triton kernel lands (issue 4).
"""

from __future__ import annotations

import torch

from kernels.reference import bank_update_reference_, nce_loss_reference, nce_partition_reference


def nce_loss(anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, *, tau: float,
             z: float | torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    return nce_loss_reference(anchor, bank, idx, tau=tau, z=z, n_data=n_data, eps=eps)


def nce_partition(anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, *, tau: float,
                  n_data: int) -> float:
    return nce_partition_reference(anchor, bank, idx, tau=tau, n_data=n_data)


def bank_update_(bank: torch.Tensor, index: torch.Tensor, feats: torch.Tensor, momentum: float) -> None:
    bank_update_reference_(bank, index, feats, momentum)
