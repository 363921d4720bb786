"""BLOCK fusion (Ben-Younes et al. 2019), block.bootstrap.pytorch's ``Block`` on the fused merge kernel.

Same constructor, forward semantics (dropout placement, ``pos_norm``, ``shared``), initialisation (the same random
numbers drawn in the same order: with one seed both modules start equal) and state-dict names and shapes as
block.bootstrap.pytorch's ``block/models/networks/fusions/fusions.py::Block``: its checkpoints load unchanged and
ours load into it.

Storage differs: the per-chunk merge weights live in four flat parameters (``merge_weight0``, ``merge_bias0``,
``merge_weight1``, ``merge_bias1``; the "flat stacked" layout of ``ops.block_merge``), so a step passes them to
the kernel as they are instead of concatenating 4 x chunks tensors each forward (and scattering the gradients back
to 4 x chunks leaves on the way back). State-dict hooks translate: ``state_dict()`` shows
``merge_linears{0,1}.<c>.{weight,bias}`` (views of the flat storage, original shapes and key order) and
``load_state_dict`` accepts them. ``merge_linears0[c].weight`` reads a chunk's weight as a view.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cmc_fast.kernels.block import block_merge, block_merge_sum
from cmc_fast.kernels.reference import block_chunk_sizes

__all__ = ["Block", "get_sizes_list", "ChunkLinearView"]

_FLAT = ("merge_weight0", "merge_bias0", "merge_weight1", "merge_bias1")


def get_sizes_list(dim: int, chunks: int) -> list[int]:
    """block.bootstrap.pytorch's chunking (``ops.block_chunk_sizes``), under the original's name."""
    return block_chunk_sizes(dim, chunks)


@dataclass
class ChunkLinearView:
    """Read-only stand-in for block.bootstrap's ``merge_linears<i>[c]`` (an ``nn.Linear(s, s*rank)``): ``weight``
    [s*rank, s] and ``bias`` [s*rank] are views of the flat parameters (writes through ``.data`` reach them)."""

    weight: torch.Tensor
    bias: torch.Tensor
    in_features: int
    out_features: int


class Block(nn.Module):
    def __init__(self, input_dims: list[int], output_dim: int, mm_dim: int = 1600, chunks: int = 20,
                 rank: int = 15, shared: bool = False, dropout_input: float = 0.0, dropout_pre_lin: float = 0.0,
                 dropout_output: float = 0.0, pos_norm: str = "before_cat"):
        super().__init__()
        if pos_norm not in ("before_cat", "after_cat"):
            raise ValueError(f"pos_norm must be 'before_cat' or 'after_cat', got {pos_norm!r}")
        self.input_dims, self.output_dim, self.mm_dim = input_dims, output_dim, mm_dim
        self.chunks, self.rank, self.shared, self.pos_norm = chunks, rank, shared, pos_norm
        self.dropout_input, self.dropout_pre_lin, self.dropout_output = dropout_input, dropout_pre_lin, dropout_output
        # Modules, created in the original's order so that one seed gives the original's initial values
        self.linear0 = nn.Linear(input_dims[0], mm_dim)
        self.linear1 = self.linear0 if shared else nn.Linear(input_dims[1], mm_dim)
        self.sizes_list = get_sizes_list(mm_dim, chunks)
        parts: list[list[torch.Tensor]] = [[], [], [], []]
        for size in self.sizes_list:
            ml0 = nn.Linear(size, size * rank)
            ml1 = ml0 if shared else nn.Linear(size, size * rank)
            for i, t in enumerate((ml0.weight, ml0.bias, ml1.weight, ml1.bias)):
                parts[i].append(t.detach().reshape(-1))
        self.merge_weight0 = nn.Parameter(torch.cat(parts[0]))
        self.merge_bias0 = nn.Parameter(torch.cat(parts[1]))
        if not shared:
            self.merge_weight1 = nn.Parameter(torch.cat(parts[2]))
            self.merge_bias1 = nn.Parameter(torch.cat(parts[3]))
        self.linear_out = nn.Linear(mm_dim, output_dim)
        self.n_params = sum(p.numel() for p in self.parameters() if p.requires_grad)
        # public since torch 2.5; the private hook (same signature, may return a dict) before that
        post_hook = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
        post_hook(_state_dict_post_hook)
        self.register_load_state_dict_pre_hook(_load_state_dict_pre_hook)

    # ----------------------------------------------------------------------------------------- weights
    def merge_parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w0, b0, w1, b1) in ``ops.block_merge``'s flat layout; with ``shared`` w1 is w0 and b1 is b0."""
        if self.shared:
            return self.merge_weight0, self.merge_bias0, self.merge_weight0, self.merge_bias0
        return self.merge_weight0, self.merge_bias0, self.merge_weight1, self.merge_bias1

    def _chunk_views(self, side: int) -> list[ChunkLinearView]:
        w, b = self.merge_parameters()[2 * side: 2 * side + 2]
        views, w_off, b_off = [], 0, 0
        for s in self.sizes_list:
            n = s * self.rank
            views.append(ChunkLinearView(w[w_off:w_off + n * s].view(n, s), b[b_off:b_off + n], s, n))
            w_off, b_off = w_off + n * s, b_off + n
        return views

    @property
    def merge_linears0(self) -> list[ChunkLinearView]:
        return self._chunk_views(0)

    @property
    def merge_linears1(self) -> list[ChunkLinearView]:
        return self._chunk_views(1)

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        x0 = self.linear0(x[0])
        x1 = self.linear1(x[1])
        if self.dropout_input > 0:
            x0 = F.dropout(x0, p=self.dropout_input, training=self.training)
            x1 = F.dropout(x1, p=self.dropout_input, training=self.training)
        w0, b0, w1, b1 = self.merge_parameters()
        if self.pos_norm == "before_cat":
            z = block_merge(x0, x1, w0, b0, w1, b1, sizes=self.sizes_list, rank=self.rank)
        else:
            z = block_merge_sum(x0, x1, w0, b0, w1, b1, sizes=self.sizes_list, rank=self.rank)
            z = torch.sqrt(F.relu(z)) - torch.sqrt(F.relu(-z))
            z = F.normalize(z, p=2)
        if self.dropout_pre_lin > 0:
            z = F.dropout(z, p=self.dropout_pre_lin, training=self.training)
        z = self.linear_out(z)
        if self.dropout_output > 0:
            z = F.dropout(z, p=self.dropout_output, training=self.training)
        return z

    def extra_repr(self) -> str:
        return (f"input_dims={self.input_dims}, output_dim={self.output_dim}, mm_dim={self.mm_dim}, "
                f"chunks={self.chunks}, rank={self.rank}, shared={self.shared}, pos_norm={self.pos_norm!r}")


# ------------------------------------------------------------------------------------ state-dict hooks
def _chunk_keys(module: Block, prefix: str, side: int) -> list[tuple[str, str]]:
    return [(f"{prefix}merge_linears{side}.{c}.weight", f"{prefix}merge_linears{side}.{c}.bias")
            for c in range(len(module.sizes_list))]


def _state_dict_post_hook(module: Block, state_dict, prefix: str, local_metadata) -> None:
    """Replace the flat parameters by block.bootstrap's per-chunk keys, in the original's key order."""
    flat = {n: state_dict.pop(prefix + n) for n in _FLAT if prefix + n in state_dict}
    if not flat:
        return
    own = OrderedDict((k, state_dict.pop(k)) for k in list(state_dict) if k.startswith(prefix))
    tail = [k for k in own if k.startswith(prefix + "linear_out.")]
    for k, v in own.items():
        if k not in tail:
            state_dict[k] = v
    w0, b0 = flat["merge_weight0"], flat["merge_bias0"]
    w1, b1 = (w0, b0) if module.shared else (flat["merge_weight1"], flat["merge_bias1"])
    for side, (w, b) in enumerate(((w0, b0), (w1, b1))):
        w_off, b_off = 0, 0
        for (kw, kb), s in zip(_chunk_keys(module, prefix, side), module.sizes_list):
            n = s * module.rank
            state_dict[kw] = w[w_off:w_off + n * s].view(n, s)
            state_dict[kb] = b[b_off:b_off + n]
            w_off, b_off = w_off + n * s, b_off + n
    for k in tail:
        state_dict[k] = own[k]
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:  # what the original's per-chunk nn.Linear modules would have recorded
        for side in (0, 1):
            meta[f"{prefix}merge_linears{side}"] = {"version": 1}
            for c in range(len(module.sizes_list)):
                meta[f"{prefix}merge_linears{side}.{c}"] = {"version": nn.Linear._version}


def _load_state_dict_pre_hook(module: Block, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
    """Assemble the flat parameters from block.bootstrap's per-chunk keys (absent chunks keep their values and
    are reported missing; a wrong shape is reported as nn.Module reports it)."""
    sides = (0,) if module.shared else (0, 1)
    if module.shared:  # the original's shared module appears under both names; the copies are the same tensors
        for kw, kb in _chunk_keys(module, prefix, 1):
            state_dict.pop(kw, None)
            state_dict.pop(kb, None)
    for side in sides:
        keys = _chunk_keys(module, prefix, side)
        if not any(k in state_dict for pair in keys for k in pair):
            if any(prefix + n in state_dict for n in _FLAT[2 * side: 2 * side + 2]):
                continue  # already flat
            missing_keys.extend(k for pair in keys for k in pair)
            for name in _FLAT[2 * side: 2 * side + 2]:  # keep the current values, do not report flat names
                state_dict[prefix + name] = getattr(module, name).detach()
            continue
        current = module._chunk_views(side)
        ws, bs = [], []
        for (kw, kb), view in zip(keys, current):
            for key, cur, out in ((kw, view.weight, ws), (kb, view.bias, bs)):
                if key not in state_dict:
                    missing_keys.append(key)
                    out.append(cur.detach().reshape(-1))
                    continue
                val = state_dict.pop(key)
                if tuple(val.shape) != tuple(cur.shape):
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(val.shape)} from "
                                      f"checkpoint, the shape in current model is {tuple(cur.shape)}.")
                    val = cur.detach()
                out.append(val.reshape(-1).to(device=cur.device))
        state_dict[prefix + _FLAT[2 * side]] = torch.cat(ws)
        state_dict[prefix + _FLAT[2 * side + 1]] = torch.cat(bs)
