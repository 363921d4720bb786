"""BLOCK fusion (Ben-Younes et al. 2019) with block.bootstrap.pytorch's parameter names.

The per-chunk merge runs on ``kernels.block_merge`` (Triton on CUDA, the PyTorch reference on CPU).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


class Block(nn.Module):
    def __init__(self, input_dims: list[int], output_dim: int, mm_dim: int = 1600, chunks: int = 20,
                 rank: int = 15, shared: bool = False, dropout_input: float = 0.0, dropout_pre_lin: float = 0.0,
                 dropout_output: float = 0.0, pos_norm: str = "before_cat"):
        super().__init__()
        if pos_norm not in ("before_cat", "after_cat"):
            raise ValueError(f"pos_norm must be 'before_cat' or 'after_cat', got {pos_norm!r}")
        self.input_dims, self.output_dim, self.mm_dim = list(input_dims), output_dim, mm_dim
        self.chunks, self.rank, self.shared, self.pos_norm = chunks, rank, shared, pos_norm
        self.dropout_input, self.dropout_pre_lin, self.dropout_output = dropout_input, dropout_pre_lin, dropout_output
        self.sizes_list = kernels.block_chunk_sizes(mm_dim, chunks)
        self.linear0 = nn.Linear(input_dims[0], mm_dim)
        self.linear1 = self.linear0 if shared else nn.Linear(input_dims[1], mm_dim)
        self.merge_linears0 = nn.ModuleList(nn.Linear(s, s * rank) for s in self.sizes_list)
        self.merge_linears1 = nn.ModuleList(nn.Linear(s, s * rank) for s in self.sizes_list)
        self.linear_out = nn.Linear(mm_dim, output_dim)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        x0, x1 = self.linear0(x[0]), self.linear1(x[1])
        if self.dropout_input > 0:
            x0 = F.dropout(x0, p=self.dropout_input, training=self.training)
            x1 = F.dropout(x1, p=self.dropout_input, training=self.training)
        flat = lambda mods, attr: torch.cat([getattr(m, attr).reshape(-1) for m in mods])  # noqa: E731
        if self.pos_norm == "before_cat":
            z = kernels.block_merge(x0, x1, flat(self.merge_linears0, "weight"), flat(self.merge_linears0, "bias"),
                                    flat(self.merge_linears1, "weight"), flat(self.merge_linears1, "bias"),
                                    sizes=self.sizes_list, rank=self.rank)
        else:
            zs, col = [], 0
            for s, m0, m1 in zip(self.sizes_list, self.merge_linears0, self.merge_linears1):
                m = m0(x0[:, col:col + s]) * m1(x1[:, col:col + s])
                zs.append(m.view(m.shape[0], self.rank, s).sum(1))
                col += s
            z = torch.cat(zs, 1)
            z = torch.sqrt(F.relu(z)) - torch.sqrt(F.relu(-z))
            z = F.normalize(z, p=2, dim=1)
        if self.dropout_pre_lin > 0:
            z = F.dropout(z, p=self.dropout_pre_lin, training=self.training)
        z = self.linear_out(z)
        if self.dropout_output > 0:
            z = F.dropout(z, p=self.dropout_output, training=self.training)
        return z
