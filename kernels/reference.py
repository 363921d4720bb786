"""PyTorch references for every kernel op, with the exact signatures of the Triton versions.

These are the ground truth the Triton kernels are tested against, and the implementation that runs on
CPU tensors (and whenever ``CMC_FAST_KERNELS=reference``). They are written for clarity first; they
still avoid Python loops over the batch so they are usable as the eager baseline in benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import check_index_range, index_checks
from .nce_plan import nce_constants

__all__ = [
    "nce_loss_reference",
    "nce_partition_reference",
    "nce_counts_reference",
    "nce_dense_reference",
    "nce_fwd_torch",
    "bank_update_reference_",
    "block_merge_reference",
    "block_merge_sum_reference",
    "block_merge_bmm",
    "block_size_groups",
    "block_chunk_sizes",
    "block_flat_offsets",
    "last_occurrence_mask",
]


# --------------------------------------------------------------------------------------------- NCE
def _nce_scores(anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, tau: float) -> torch.Tensor:
    """s_ij = <a_i, M[idx_ij]> / tau in float32, shape [B, K+1]. Materialises the [B, K+1, d] gather."""
    rows = bank[idx].float()  # [B, K+1, d]; banks take no gradient (the caller passes a plain tensor)
    return torch.bmm(rows, anchor.float().unsqueeze(2)).squeeze(2) / tau


def nce_loss_reference(
    anchor: torch.Tensor,
    bank: torch.Tensor,
    idx: torch.Tensor,
    *,
    tau: float,
    z: float | torch.Tensor,
    n_data: int,
    eps: float = 1e-7,
) -> torch.Tensor:
    """CRD's NCE loss for one direction (DESIGN section 1), a float32 scalar differentiable in ``anchor``.

    anchor [B, d], bank [N, d], idx [B, K+1] int64 with column 0 the positive; z the frozen partition.
    """
    if idx.dim() != 2 or idx.shape[0] != anchor.shape[0]:
        raise ValueError(f"idx must be [B, K+1] with B={anchor.shape[0]}, got {tuple(idx.shape)}")
    k = idx.shape[1] - 1
    noise = k / n_data  # K * P_n with the uniform noise distribution P_n = 1/N
    p = torch.exp(_nce_scores(anchor, bank.detach(), idx, tau)) / z
    log_pos = torch.log(p[:, 0] / (p[:, 0] + noise + eps))
    log_neg = torch.log(noise / (p[:, 1:] + noise + eps)).sum(1)
    return -(log_pos + log_neg).mean()


def nce_partition_reference(anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, *, tau: float,
                            n_data: int) -> float:
    """The first-batch estimate Z = mean(exp(s)) * N (CRD's ``Z_v``), returned as a Python float."""
    with torch.no_grad():
        return float(torch.exp(_nce_scores(anchor, bank, idx, tau)).mean().item() * n_data)


def nce_counts_reference(idx: torch.Tensor, n: int) -> torch.Tensor:
    """C [B, N] int32: C[i, r] = how often bank row r was drawn as a negative for anchor i (idx[i, 1:]); the
    positive idx[i, 0] counts only where it was also drawn among the negatives. Integer adds: exact, deterministic."""
    b, k1 = idx.shape
    counts = torch.zeros(b, n, dtype=torch.int32, device=idx.device)
    if k1 > 1:
        neg = idx[:, 1:].long()
        counts.scatter_add_(1, neg, torch.ones(1, dtype=torch.int32, device=idx.device).expand_as(neg))
    return counts


def nce_dense_reference(anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor,
                        z: torch.Tensor | float, tau: float, n_data: int, eps: float,
                        need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense form of ``nce_loss_reference``: (loss [] fp32, dL/danchor [B, d] fp32 or [0]), same idx, same loss.

    S = A M^T / tau over the whole bank [B, N] (the bank read once, one GEMM), the negatives weighted by their
    histogram ``counts`` (``nce_counts_reference(idx, N)``), the positive idx[:, 0] added on its own; the gradient
    (W M) / (B tau) with W = C * sigmoid(t) minus sigmoid(-t) at the positive. In log space, t = s - log Z - log c
    (c = K/N + eps), as the Triton kernels: positive term -softplus(-t), negative term log(noise/c) - softplus(t).
    Written for the CPU and as the oracle of the dense kernel; columns are taken in slices so the [B, N] working set
    stays bounded whatever N."""
    b = idx.shape[0]
    log_c, log_noise_over_c = nce_constants(idx.shape[1], n_data, eps)
    z = torch.as_tensor(z, dtype=torch.float32, device=anchor.device).reshape(1)
    minus_shift = -(torch.log(z) + log_c)
    a = anchor.detach().float()
    pos = idx[:, :1].long()
    # negatives: sum_n C * (log(noise/c) - softplus(t)); sum_n C is K per anchor when counts come from idx
    loss = counts.sum(dtype=torch.float64).float() * log_noise_over_c
    grad = anchor.new_zeros(anchor.shape, dtype=torch.float32) if need_grad else None
    step = max(1, _DENSE_SLICE // max(b, 1))
    for lo in range(0, bank.shape[0], step):
        rows = bank.detach()[lo:lo + step].float()  # [n, d]
        t = torch.addmm(minus_shift, a, rows.T, alpha=1.0 / tau)  # [B, n]: s - log Z - log c
        weight = counts[:, lo:lo + step].float()
        softplus_t = F.softplus(t)  # log1p(exp(t)) below 20 (accurate for tiny P/c), t above
        loss = loss - (weight * softplus_t).sum()
        mine = (pos >= lo) & (pos < lo + rows.shape[0])  # [B, 1]: the positive falls in this slice
        at = (pos - lo).clamp(0, rows.shape[0] - 1)
        t_pos = t.gather(1, at)
        loss = loss - torch.where(mine, F.softplus(-t_pos), 0.0).sum()
        if need_grad:
            weight.mul_(torch.sigmoid(t))
            weight.scatter_add_(1, at, torch.where(mine, -torch.sigmoid(-t_pos), 0.0))
            grad.addmm_(weight, rows)
    loss = -loss / b
    if not need_grad:
        return loss, anchor.new_empty(0, dtype=torch.float32)
    return loss, grad / (b * tau)


def nce_fwd_torch(anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, z: torch.Tensor | float, tau: float,
                  n_data: int, eps: float, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference path of ``cmc_fast::nce_fwd``: the loss exactly as ``nce_loss_reference`` computes it, and
    its anchor gradient in closed form (autograd cannot run inside a custom op's implementation). Checked
    against autograd of the reference by the tests. An index outside the bank raises a clear IndexError."""
    check_index_range(idx, bank.shape[0], sync=index_checks())
    rows = bank.detach()[idx].float()  # [B, K+1, d]
    b, k1 = idx.shape
    s = torch.bmm(rows, anchor.float().unsqueeze(2)).squeeze(2) / tau
    p = torch.exp(s) / z
    noise = (k1 - 1) / n_data
    log_pos = torch.log(p[:, 0] / (p[:, 0] + noise + eps))
    log_neg = torch.log(noise / (p[:, 1:] + noise + eps)).sum(1)
    loss = -(log_pos + log_neg).mean()
    if not need_grad:
        return loss, anchor.new_empty(0, dtype=torch.float32)
    c = noise + eps
    w = p / (p + c)
    w = torch.cat([-c / (p[:, :1] + c), w[:, 1:]], dim=1)
    grad = torch.bmm(w.unsqueeze(1), rows).squeeze(1) / (b * tau)
    return loss, grad


_DENSE_SLICE = 1 << 22  # elements of one [B, n] slice of the scores (16 MB in float32)


def last_occurrence_mask(index: torch.Tensor) -> torch.Tensor:
    """True at the last position of each distinct value of ``index`` (1-D). Used to make the bank update
    deterministic: when an index repeats in a batch, the last occurrence wins."""
    n = index.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=index.device)
    pos = torch.arange(n, device=index.device)
    # stable sort by index: within equal values positions stay ascending, so the run's last is the winner
    order = torch.sort(index, stable=True).indices
    sorted_idx = index[order]
    is_last_sorted = torch.ones(n, dtype=torch.bool, device=index.device)
    is_last_sorted[:-1] = sorted_idx[1:] != sorted_idx[:-1]
    mask = torch.zeros(n, dtype=torch.bool, device=index.device)
    mask[order[is_last_sorted]] = True
    del pos
    return mask


def bank_update_reference_(bank: torch.Tensor, index: torch.Tensor, feats: torch.Tensor, momentum: float) -> None:
    """In place: M[i] <- normalize(m * M[i] + (1 - m) * f_i) for each i in ``index``.

    Every row is computed from the bank as it was before the call; when ``index`` repeats, the last
    occurrence in the batch is the one written (deterministic, unlike a plain ``index_copy_``).
    Arithmetic in float32, stored in the bank's dtype.
    """
    with torch.no_grad():
        index = index.reshape(-1)
        keep = last_occurrence_mask(index)
        index, feats = index[keep], feats.detach()[keep]
        mixed = bank[index].float() * momentum + feats.float() * (1.0 - momentum)
        bank[index] = F.normalize(mixed, dim=1).to(bank.dtype)


# ------------------------------------------------------------------------------------------- BLOCK
def block_chunk_sizes(dim: int, chunks: int) -> list[int]:
    """block.bootstrap.pytorch's ``get_sizes_list``, verbatim: ceil(dim/chunks) each, the last adjusted; when that
    makes the last negative, it is levelled up by taking one from each of the chunks before it."""
    if chunks < 1 or dim < chunks:
        raise ValueError(f"BLOCK needs 1 <= chunks <= mm_dim, got mm_dim={dim}, chunks={chunks}")
    split_size = (dim + chunks - 1) // chunks
    sizes = [split_size] * chunks
    sizes[-1] = sizes[-1] - (sum(sizes) - dim)
    if sizes[-1] < 0:
        n_miss = sizes[-2] - sizes[-1]
        sizes[-1] = sizes[-2]
        for j in range(n_miss):
            sizes[-j - 1] -= 1
    if sum(sizes) != dim or min(sizes) <= 0:  # the original builds an empty chunk here, then fails in forward
        raise ValueError(f"cannot cut mm_dim={dim} into {chunks} non-empty chunks (got sizes {sizes}); "
                         f"choose another --chunks")
    return sizes


def block_flat_offsets(sizes: list[int], rank: int) -> tuple[list[int], list[int]]:
    """Offsets of each chunk inside the flat weight and flat bias (see ``block_merge_reference``)."""
    w_off, b_off, w, b = [], [], 0, 0
    for s in sizes:
        w_off.append(w)
        b_off.append(b)
        w += rank * s * s
        b += rank * s
    return w_off, b_off


def block_merge_reference(
    x0: torch.Tensor,
    x1: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    *,
    sizes: list[int],
    rank: int,
    normalize: bool = True,
) -> torch.Tensor:
    """BLOCK's block-superdiagonal merge for all chunks: out [B, mm] with mm = sum(sizes).

    Weight layout ("flat stacked"): chunk c has ``merge_linears0.<c>`` = Linear(s_c, s_c * rank), i.e. a
    weight [rank * s_c, s_c] and bias [rank * s_c]. ``w0`` is the concatenation of every chunk's weight
    flattened row-major (length sum_c rank * s_c^2), ``b0`` the concatenation of the biases (length
    rank * mm); likewise ``w1``/``b1`` for ``merge_linears1``. Per chunk:
    m = (W0_c x0_c + b0_c) * (W1_c x1_c + b1_c); z = m.view(B, rank, s).sum(1) (rank-major as in the
    original); z = sqrt(relu(z)) - sqrt(relu(-z)); z = z / max(||z||_2, 1e-12). ``normalize=False``: the raw
    rank sums z (``block_merge_sum_reference``).
    """
    w_off, b_off = block_flat_offsets(sizes, rank)
    outs, col = [], 0
    for s, wo, bo in zip(sizes, w_off, b_off):
        n_w, n_b = rank * s * s, rank * s
        x0c, x1c = x0[:, col:col + s], x1[:, col:col + s]
        y0 = F.linear(x0c, w0[wo:wo + n_w].view(n_b, s), b0[bo:bo + n_b])
        y1 = F.linear(x1c, w1[wo:wo + n_w].view(n_b, s), b1[bo:bo + n_b])
        z = (y0 * y1).view(-1, rank, s).sum(1)
        if normalize:
            z = F.normalize(torch.sqrt(F.relu(z)) - torch.sqrt(F.relu(-z)), p=2, dim=1)
        outs.append(z)
        col += s
    return torch.cat(outs, dim=1)


def block_merge_sum_reference(x0, x1, w0, b0, w1, b1, *, sizes, rank: int) -> torch.Tensor:
    """The merge without its epilogue: the raw rank sums z of every chunk, [B, mm] (for ``pos_norm='after_cat'``)."""
    return block_merge_reference(x0, x1, w0, b0, w1, b1, sizes=sizes, rank=rank, normalize=False)


def block_size_groups(sizes: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive chunks of one size, as (size, count): [80] * 20 -> [(80, 20)]; block_chunk_sizes(256, 18)
    = [15] * 17 + [1] -> [(15, 17), (1, 1)]. A run is contiguous in x and in the flat weights, so it is one batch."""
    groups: list[tuple[int, int]] = []
    for s in sizes:
        if groups and groups[-1][0] == s:
            groups[-1] = (s, groups[-1][1] + 1)
        else:
            groups.append((s, 1))
    return groups


def block_merge_bmm(x0: torch.Tensor, x1: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: torch.Tensor,
                    b1: torch.Tensor, *, sizes: list[int], rank: int, normalize: bool = True) -> torch.Tensor:
    """The merge as batched matrix products: chunks grouped into runs of one size (``block_size_groups``), each run
    two ``baddbmm`` over views of the flat weights ([n, R*s, s], no copy, no padding), the rank sum, signed sqrt and
    norm on [n, B, s]. Same layout, dtypes (weights cast to x's dtype) and result as ``block_merge_reference``;
    autograd gives the backward, and torch.compile can fuse its elementwise parts. A dispatch candidate of
    ``kernels.block_merge`` (``choose_block_path``)."""
    w0, b0, w1, b1 = (t.to(x0.dtype) for t in (w0, b0, w1, b1))
    n_rows = x0.shape[0]
    outs, col, w_off, b_off = [], 0, 0, 0
    for s, n in block_size_groups(list(sizes)):
        at = (col, w_off, b_off, s, n, rank)
        z = (_group_products(x0, w0, b0, *at) * _group_products(x1, w1, b1, *at)).view(n, n_rows, rank, s).sum(2)
        if normalize:  # z: [n, B, s]
            z = F.normalize(torch.sqrt(F.relu(z)) - torch.sqrt(F.relu(-z)), p=2, dim=2)
        outs.append(z.transpose(0, 1).reshape(n_rows, n * s))
        col, w_off, b_off = col + n * s, w_off + n * rank * s * s, b_off + n * rank * s
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _group_products(x, w, b, col: int, w_off: int, b_off: int, s: int, n: int, rank: int) -> torch.Tensor:
    """y = x_c W_c^T + b_c for a run of n chunks of size s starting at column col: [n, B, R*s]."""
    xs = x[:, col:col + n * s].reshape(x.shape[0], n, s).transpose(0, 1)  # [n, B, s]
    weight = w[w_off:w_off + n * rank * s * s].view(n, rank * s, s)
    return torch.baddbmm(b[b_off:b_off + n * rank * s].view(n, 1, rank * s), xs, weight.transpose(1, 2))
