"""Cross-modal NCE distillation (CMC stage 1): projections phi1/phi2, two memory banks, negatives, Z.

L_{V->T}: text anchors against the image bank; L_{T->V}: image anchors against the text bank. Both run on
``ops.nce_loss`` (fused Triton on CUDA, the PyTorch reference on CPU) in float32, even under AMP:
exp(s) reaches ~1.6e6 at tau = 0.07.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cmc_fast import distributed, ops


class CrossModalNCE(nn.Module):
    def __init__(self, text_dim: int, image_dim: int, labels: torch.Tensor, *, proj_dim: int = 128, k: int = 1500,
                 tau: float = 0.07, momentum: float = 0.5, negatives: str = "uniform",
                 bank_dtype: torch.dtype = torch.float32):
        super().__init__()
        n = int(labels.numel())
        if n < 2:
            raise ValueError(f"the memory bank needs at least 2 training samples, got {n}")
        if negatives not in ("uniform", "opposite-class"):
            raise ValueError(f"negatives must be 'uniform' or 'opposite-class', got {negatives!r}")
        if bank_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"bank_dtype must be torch.float32 or torch.bfloat16, got {bank_dtype}")
        self.n_data, self.k, self.tau, self.momentum, self.negatives = n, k, tau, momentum, negatives
        self.embed_t = nn.Linear(text_dim, proj_dim)  # phi1, the paper's "1x1 convolution"
        self.embed_v = nn.Linear(image_dim, proj_dim)  # phi2
        # CRD initialises banks uniformly in [-stdv, stdv]; we also normalise so every row lives on the sphere.
        # A bfloat16 bank (half the memory) is the float32 one rounded; updates mix and normalise in float32.
        stdv = 1.0 / math.sqrt(proj_dim / 3)
        for name in ("memory_t", "memory_v"):
            bank = F.normalize(torch.rand(n, proj_dim).mul_(2 * stdv).add_(-stdv), dim=1)
            self.register_buffer(name, bank.to(bank_dtype))
        # Frozen partition estimates; -1 = not yet set. Saved with checkpoints.
        self.register_buffer("z_v2t", torch.tensor(-1.0))
        self.register_buffer("z_t2v", torch.tensor(-1.0))
        # For opposite-class negatives: sample ids grouped by label, and where each label's group starts.
        labels = labels.long().cpu()
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=2)
        if negatives == "opposite-class" and int(counts.min()) == 0:
            raise ValueError("opposite-class negatives need both labels in the training set")
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("by_label", order, persistent=False)
        self.register_buffer("label_start", torch.tensor([0, int(counts[0])]), persistent=False)
        self.register_buffer("label_count", counts, persistent=False)
        # The noise prior K/N counts the pool the negatives are drawn from: all N samples (uniform), or the other
        # class's rows (opposite-class). One number per loss, so for opposite-class it is the mean pool size over
        # the training anchors, 2 * n0 * n1 / N (N/2 when the classes are balanced). Z = mean(exp(s)) * N scales
        # with it too, so the loss depends on this choice only through eps.
        n0, n1 = (int(c) for c in counts)
        self.noise_pool = n if negatives == "uniform" else max(1, round(2 * n0 * n1 / n))

    def sample_indices(self, index: torch.Tensor) -> torch.Tensor:
        """idx [B, K+1] int32: the sample's own bank slot, then K negatives (never the positive's slot)."""
        b, n = index.shape[0], self.n_data
        if self.negatives == "uniform":
            neg = torch.randint(0, n, (b, self.k), device=index.device)
            # redraw collisions with the positive by a uniform non-zero shift: still uniform over the others
            shift = torch.randint(1, n, (b, self.k), device=index.device)
            neg = torch.where(neg == index[:, None], (neg + shift) % n, neg)
        else:  # the authors' code: negatives from the other class only
            other = 1 - self.labels[index]
            u = torch.rand(b, self.k, device=index.device)
            pos = (u * self.label_count[other][:, None]).long().clamp_max(self.label_count[other][:, None] - 1)
            neg = self.by_label[self.label_start[other][:, None] + pos]
        # int32 for the kernels (half the index stream); drawn as before, so a run's indices are the same values
        return torch.cat([index[:, None], neg], dim=1).to(torch.int32)

    def project(self, text_feat: torch.Tensor, image_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = F.normalize(self.embed_t(text_feat.float()), dim=1)
        v = F.normalize(self.embed_v(image_feat.float()), dim=1)
        return t, v

    @torch.no_grad()
    def init_partition(self, text_feat: torch.Tensor, image_feat: torch.Tensor, index: torch.Tensor) -> None:
        """Estimate Z once, on the first batch (CRD), then keep it frozen."""
        t, v = self.project(text_feat, image_feat)
        idx = self.sample_indices(index)
        # the op behind ops.nce_partition (which returns a Python float): Z stays on the device, no host sync
        self.z_v2t.copy_(torch.ops.cmc_fast.nce_partition(t, self.memory_v, idx, float(self.tau), self.noise_pool))
        self.z_t2v.copy_(torch.ops.cmc_fast.nce_partition(v, self.memory_t, idx, float(self.tau), self.noise_pool))

    def forward(self, text_feat: torch.Tensor, image_feat: torch.Tensor,
                index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_{V->T}, L_{T->V}) for a batch of training samples ``index``; then both banks take the batch."""
        t, v = self.project(text_feat, image_feat)
        idx = self.sample_indices(index)
        # where the dense form runs, one histogram of idx serves both directions (same idx, banks of one size)
        counts = ops.nce_counts_for(t, self.memory_v, idx)
        loss_v2t = ops.nce_loss(t, self.memory_v, idx, tau=self.tau, z=self.z_v2t, n_data=self.noise_pool,
                                counts=counts)
        loss_t2v = ops.nce_loss(v, self.memory_t, idx, tau=self.tau, z=self.z_t2v, n_data=self.noise_pool,
                                counts=counts)
        if self.training:
            # data parallel: every rank takes the whole global batch, gathered in rank order (= one process's
            # batch), so every replica applies the same update and a repeated index has the same winner
            index, t, v = (distributed.all_gather_cat(x.detach()) for x in (index, t, v))
            ops.bank_update_(self.memory_v, index, v, self.momentum)
            ops.bank_update_(self.memory_t, index, t, self.momentum)
        return loss_v2t, loss_t2v
