"""cmc_fast.fusion.Block against an independent re-implementation of block.bootstrap.pytorch's Block.

``OriginalBlock`` below is written from block.bootstrap.pytorch's block/models/networks/fusions/fusions.py: per-chunk
nn.Linear modules, a Python loop over chunks. The tests check that cmc_fast's Block (flat merge weights, fused
kernel) starts from the same values for one seed, has the original's state-dict keys, shapes and order, loads the
original's state dicts (and the original loads its), and computes the same outputs and gradients, eager and under
torch.compile(fullgraph=True). Tolerances: float32 outputs 1e-5, gradients 1e-4 relative to their largest entry.
"""

from __future__ import annotations

import io

import cmc_fast.kernels.block as kb
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cmc_fast.fusion import Block, get_sizes_list

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------ the original, re-implemented
def original_sizes_list(dim, chunks):
    split_size = (dim + chunks - 1) // chunks
    sizes_list = [split_size] * chunks
    sizes_list[-1] = sizes_list[-1] - (sum(sizes_list) - dim)
    if sizes_list[-1] < 0:
        n_miss = sizes_list[-2] - sizes_list[-1]
        sizes_list[-1] = sizes_list[-2]
        for j in range(n_miss):
            sizes_list[-j - 1] -= 1
    return sizes_list


class OriginalBlock(nn.Module):
    def __init__(self, input_dims, output_dim, mm_dim=1600, chunks=20, rank=15, shared=False, dropout_input=0.0,
                 dropout_pre_lin=0.0, dropout_output=0.0, pos_norm="before_cat"):
        super().__init__()
        self.rank, self.shared, self.pos_norm = rank, shared, pos_norm
        self.dropout_input, self.dropout_pre_lin, self.dropout_output = dropout_input, dropout_pre_lin, dropout_output
        self.linear0 = nn.Linear(input_dims[0], mm_dim)
        self.linear1 = self.linear0 if shared else nn.Linear(input_dims[1], mm_dim)
        self.sizes_list = original_sizes_list(mm_dim, chunks)
        ml0s, ml1s = [], []
        for size in self.sizes_list:
            ml0 = nn.Linear(size, size * rank)
            ml0s.append(ml0)
            ml1s.append(ml0 if shared else nn.Linear(size, size * rank))
        self.merge_linears0 = nn.ModuleList(ml0s)
        self.merge_linears1 = nn.ModuleList(ml1s)
        self.linear_out = nn.Linear(mm_dim, output_dim)

    def forward(self, x):
        x0, x1 = self.linear0(x[0]), self.linear1(x[1])
        bsize = x1.size(0)
        if self.dropout_input > 0:
            x0 = F.dropout(x0, p=self.dropout_input, training=self.training)
            x1 = F.dropout(x1, p=self.dropout_input, training=self.training)
        zs, begin = [], 0
        for s, m0, m1 in zip(self.sizes_list, self.merge_linears0, self.merge_linears1):
            m = m0(x0.narrow(1, begin, s)) * m1(x1.narrow(1, begin, s))
            z = torch.sum(m.view(bsize, self.rank, -1), 1)
            if self.pos_norm == "before_cat":
                z = torch.sqrt(F.relu(z)) - torch.sqrt(F.relu(-z))
                z = F.normalize(z, p=2)
            zs.append(z)
            begin += s
        z = torch.cat(zs, 1)
        if self.pos_norm == "after_cat":
            z = torch.sqrt(F.relu(z)) - torch.sqrt(F.relu(-z))
            z = F.normalize(z, p=2)
        if self.dropout_pre_lin > 0:
            z = F.dropout(z, p=self.dropout_pre_lin, training=self.training)
        z = self.linear_out(z)
        if self.dropout_output > 0:
            z = F.dropout(z, p=self.dropout_output, training=self.training)
        return z


# --------------------------------------------------------------------------------------------- helpers
KW = dict(input_dims=[10, 12], output_dim=2, mm_dim=83, chunks=7, rank=3)


def pair(seed_orig=0, seed_ours=0, **kw):
    kw = {**KW, **kw}
    if kw.get("shared"):
        kw["input_dims"] = [10, 10]
    torch.manual_seed(seed_orig)
    orig = OriginalBlock(**kw).to(DEVICE)
    torch.manual_seed(seed_ours)
    ours = Block(**kw).to(DEVICE)
    return orig, ours


def features(batch, dims, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d, generator=gen).to(DEVICE) for d in dims]


def flat_grads_of_original(orig: OriginalBlock, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    mods = orig.merge_linears0 if side == 0 else orig.merge_linears1
    return (torch.cat([m.weight.grad.reshape(-1) for m in mods]), torch.cat([m.bias.grad.reshape(-1) for m in mods]))


def assert_grads_match(orig: OriginalBlock, ours: Block, tol=1e-4):
    def close(a, b, name):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item(), msg=name)

    for name in ("linear0", "linear1", "linear_out"):
        for p in ("weight", "bias"):
            close(getattr(getattr(ours, name), p).grad, getattr(getattr(orig, name), p).grad, f"{name}.{p}")
    sides = (0,) if ours.shared else (0, 1)
    for side in sides:
        gw, gb = flat_grads_of_original(orig, side)  # shared: both sides' contributions, as in ours
        close(getattr(ours, f"merge_weight{side}").grad, gw, f"merge_weight{side}")
        close(getattr(ours, f"merge_bias{side}").grad, gb, f"merge_bias{side}")


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("shared", [False, True])
def test_same_seed_same_state_dict(shared):
    orig, ours = pair(shared=shared)
    so, sm = orig.state_dict(), ours.state_dict()
    assert list(sm) == list(so)  # names and order
    for k in so:
        assert sm[k].shape == so[k].shape, k
        torch.testing.assert_close(sm[k], so[k], rtol=0, atol=0, msg=k)
    assert ours.n_params == sum(p.numel() for p in orig.parameters() if p.requires_grad)


@pytest.mark.parametrize("pos_norm", ["before_cat", "after_cat"])
@pytest.mark.parametrize("shared", [False, True])
def test_original_state_dict_loads_and_matches(pos_norm, shared):
    orig, ours = pair(seed_orig=1, seed_ours=2, pos_norm=pos_norm, shared=shared)
    result = ours.load_state_dict(orig.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    orig.eval(), ours.eval()
    x = features(5, [10, 10] if shared else [10, 12], seed=3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), orig(x), rtol=1e-5, atol=1e-5)
    # and back: the original loads ours (through a file, as a checkpoint would travel)
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(9)
    fresh = OriginalBlock(**{**KW, "pos_norm": pos_norm, "shared": shared,
                             "input_dims": [10, 10] if shared else [10, 12]}).to(DEVICE).eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), orig(x), rtol=0, atol=0)


@pytest.mark.parametrize("kernels_mode", ["reference", "triton"])
@pytest.mark.parametrize("pos_norm", ["before_cat", "after_cat"])
def test_forward_backward_match_original(monkeypatch, kernels_mode, pos_norm):
    monkeypatch.setenv("CMC_FAST_KERNELS", kernels_mode)
    orig, ours = pair(pos_norm=pos_norm)
    x = features(6, [10, 12], seed=4)
    target = torch.tensor([0, 1, 1, 0, 1, 0], device=DEVICE)
    out_o, out_m = orig(x), ours(x)
    torch.testing.assert_close(out_m, out_o, rtol=1e-5, atol=1e-5)
    F.cross_entropy(out_o, target).backward()
    F.cross_entropy(out_m, target).backward()
    assert_grads_match(orig, ours)


def test_shared_gradients_match_original(monkeypatch):
    monkeypatch.setenv("CMC_FAST_KERNELS", "triton")
    orig, ours = pair(shared=True)
    x = features(4, [10, 10], seed=5)
    orig(x).square().sum().backward()
    ours(x).square().sum().backward()
    assert_grads_match(orig, ours)
    assert not hasattr(ours, "merge_weight1") or ours.merge_parameters()[2] is ours.merge_weight0


def test_dropouts_match_original_in_training():
    orig, ours = pair(dropout_input=0.1, dropout_pre_lin=0.2, dropout_output=0.1)
    orig.train(), ours.train()
    x = features(8, [10, 12], seed=6)
    torch.manual_seed(123)
    out_o = orig(x)
    torch.manual_seed(123)
    out_m = ours(x)
    torch.testing.assert_close(out_m, out_o, rtol=1e-5, atol=1e-5)
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), ours(x))  # no dropout in eval


def test_irregular_sizes_from_original_chunking(monkeypatch):
    """mm_dim=7 in 5 chunks: the original levels the last chunk up, [2, 2, 1, 1, 1]; the kernel takes any sizes."""
    assert get_sizes_list(7, 5) == original_sizes_list(7, 5) == [2, 2, 1, 1, 1]
    assert get_sizes_list(1600, 20) == [80] * 20 and get_sizes_list(256, 18) == [15] * 17 + [1]
    monkeypatch.setenv("CMC_FAST_KERNELS", "triton")
    orig, ours = pair(seed_orig=3, seed_ours=4, mm_dim=7, chunks=5, rank=4)
    ours.load_state_dict(orig.state_dict())
    x = features(3, [10, 12], seed=7)
    orig(x).sum().backward()
    out = ours(x)
    out.sum().backward()
    torch.testing.assert_close(out, orig(x), rtol=1e-5, atol=1e-5)
    assert_grads_match(orig, ours)


def test_chunk_views_and_bad_state_dicts():
    orig, ours = pair()
    for c, m in enumerate(orig.merge_linears1):
        assert torch.equal(ours.merge_linears1[c].weight, m.weight.detach())
        view = ours.merge_linears1[c]
        assert (view.in_features, view.out_features) == (m.in_features, m.out_features)
    with torch.no_grad():
        ours.merge_linears0[2].bias.data.fill_(0.5)  # writes reach the flat parameter
    assert (ours.state_dict()["merge_linears0.2.bias"] == 0.5).all()

    sd = orig.state_dict()
    del sd["merge_linears1.3.weight"]
    result = ours.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["merge_linears1.3.weight"] and not result.unexpected_keys
    with pytest.raises(RuntimeError, match="Missing key.*merge_linears1.3.weight"):
        ours.load_state_dict(sd)

    torch.manual_seed(0)
    other_rank = OriginalBlock(**{**KW, "rank": 4})
    with pytest.raises(RuntimeError, match="size mismatch for merge_linears0.0.weight"):
        ours.load_state_dict(other_rank.state_dict())


def test_nested_in_a_model_keeps_prefixed_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), Block(**KW))
    keys = list(model.state_dict())
    assert "1.merge_linears0.6.weight" in keys and keys[-1] == "1.linear_out.bias"
    assert not any("merge_weight" in k for k in keys)
    model.load_state_dict(model.state_dict())


def test_attributes_exposed():
    block = Block(input_dims=[10, 12], output_dim=2, mm_dim=256, chunks=18, rank=15, dropout_input=0.1,
                  pos_norm="after_cat")
    assert (block.input_dims, block.output_dim, block.mm_dim, block.chunks, block.rank) == ([10, 12], 2, 256, 18, 15)
    assert (block.shared, block.dropout_input, block.dropout_pre_lin, block.dropout_output, block.pos_norm) == (
        False, 0.1, 0.0, 0.0, "after_cat")
    assert block.sizes_list == [15] * 17 + [1]
    with pytest.raises(ValueError, match="pos_norm"):
        Block(input_dims=[4, 4], output_dim=2, mm_dim=8, chunks=2, pos_norm="sideways")


def test_autocast_bfloat16_on_cpu():
    """Under autocast the merge gets bf16 activations and fp32 master weights; grads come back in fp32."""
    if DEVICE != "cpu":
        pytest.skip("CPU autocast path")
    _, ours = pair()
    x = features(4, [10, 12], seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert ours.merge_weight0.grad.dtype == torch.float32 and torch.isfinite(ours.merge_weight0.grad).all()


def test_compiled_stage2_step_fullgraph():
    """The trainer's stage-2 step: Block forward + cross-entropy compiled with fullgraph=True (Inductor), then the
    AOT-compiled backward. No graph break on the custom op; same loss and gradients as eager."""
    torch._dynamo.reset()
    orig, ours = pair(seed_ours=0)
    ref = Block(**KW).to(DEVICE)
    ref.load_state_dict(ours.state_dict())
    x = features(16, [10, 12], seed=9)
    y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(10)).to(DEVICE)

    def step(model, t, v, target):
        return F.cross_entropy(model([t, v]), target)

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(ours, x[0], x[1], y)
    loss.backward()
    loss_ref = step(ref, x[0], x[1], y)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-4 * p_ref.grad.abs().max().item(),
                                   msg=name)
    torch._dynamo.reset()


def test_kernel_module_used_by_block(monkeypatch):
    """The Block's merge goes through kernels.block (not a Python chunk loop)."""
    monkeypatch.setenv("CMC_FAST_KERNELS", "triton")
    calls = []
    fn = kb.block_merge_forward_triton
    monkeypatch.setattr(kb, "block_merge_forward_triton", lambda *a, **k: calls.append(1) or fn(*a, **k))
    _, ours = pair()
    ours(features(2, [10, 12], seed=11))
    assert calls == [1]
