"""The fused NCE kernels (kernels/nce.py) against the PyTorch reference and against float64 from the formula.

Without CUDA the Triton path runs in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), forced by
CMC_FAST_KERNELS=triton or by calling the launchers directly. Inputs are fresh random tensors per test from a
seeded generator (never zeros). Shapes cover K+1 in {1, 17, 1501}, d in {16, 96, 128}, B in {1, 3, 64} with a
covering set rather than the full product (the interpreter costs ~30 ms a program).

Tolerances, per bank dtype (the bank is cast to float32 exactly inside the kernel and the float64 check uses the
bank's stored values, so the bank's dtype changes what is gathered, not the arithmetic; the anchor's dtype, which
the gradient is returned in, sets the gradient tolerance):
  loss  vs float64:  rtol 2e-6 (kernel, log-space with an accurate log1p); for the reference rtol 3e-5 plus
                     atol (K+1) * 1.2e-7: its log(noise / (P + noise + eps)) and log(P / (P + c)) take the log of a
                     float32 ratio near 1, so each term carries up to ~1 ulp of 1.0 (2^-23) absolute error
  grad  vs float64:  max |err| <= GRAD_TOL[dtype] * max |grad|  (float32 anchors 1e-5, float16 2e-3, bfloat16 1e-2)
  bank update:       max |err| <= BANK_TOL[dtype]  (float32 1e-6; float16 1e-3, bfloat16 8e-3: one rounding)
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from cmc_fast.kernels import nce as nce_mod
from cmc_fast.kernels import nce_plan
from cmc_fast.kernels.reference import bank_update_reference_, nce_loss_reference, nce_partition_reference

from cmc_fast import ops

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
TAU, EPS = 0.07, 1e-7

LOSS_RTOL_KERNEL, LOSS_RTOL_REFERENCE = 2e-6, 3e-5
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
BANK_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

needs_triton_path = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                       reason="no CUDA and TRITON_INTERPRET is not set")
BANK_DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="no bfloat16 in the Triton interpreter")),
]


@pytest.fixture
def triton_path(monkeypatch):
    if not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    monkeypatch.setenv("CMC_FAST_KERNELS", "triton")


@pytest.fixture
def reference_path(monkeypatch):
    monkeypatch.setenv("CMC_FAST_KERNELS", "reference")


# --------------------------------------------------------------------------------------------- helpers
def make_inputs(b, d, k1, n, seed, *, bank_dtype=torch.float32, anchor_dtype=torch.float32, pool=None):
    """Unit anchors and bank rows, idx [b, k1] with column 0 a distinct positive per row; negatives uniform over
    ``pool`` slots (default all n; a small pool forces repeated indices within a row)."""
    g = torch.Generator().manual_seed(seed)
    anchor = F.normalize(torch.randn(b, d, generator=g), dim=1).to(anchor_dtype)
    bank = F.normalize(torch.randn(n, d, generator=g), dim=1).to(bank_dtype)
    pos = torch.randperm(n, generator=g)[:b] if b <= n else torch.randint(0, n, (b,), generator=g)
    neg = torch.randint(0, pool or n, (b, k1 - 1), generator=g)
    idx = torch.cat([pos[:, None], neg], dim=1)
    return anchor.to(DEVICE), bank.to(DEVICE), idx.to(DEVICE)


def z_of(anchor, bank, idx, n):
    """A realistic frozen partition: the first-batch estimate (computed in float64 from the formula)."""
    s = (bank.detach().double()[idx] @ anchor.detach().double().unsqueeze(2)).squeeze(2) / TAU
    return float(torch.exp(s).mean() * n)


def loss64(anchor, bank, idx, *, z, n, tau=TAU, eps=EPS):
    """(loss, dL/danchor) in float64, straight from DESIGN section 1, on the stored values of anchor and bank."""
    a = anchor.detach().double().cpu().requires_grad_()
    rows = bank.detach().double().cpu()[idx.cpu()]
    s = (rows @ a.unsqueeze(2)).squeeze(2) / tau
    z = z.double().cpu() if isinstance(z, torch.Tensor) else z
    p = torch.exp(s) / z
    noise = (idx.shape[1] - 1) / n
    log_pos = torch.log(p[:, 0] / (p[:, 0] + noise + eps))
    log_neg = torch.log(noise / (p[:, 1:] + noise + eps)).sum(1)
    loss = -(log_pos + log_neg).mean()
    (g,) = torch.autograd.grad(loss, a)
    return loss.detach(), g


def run_public(anchor, bank, idx, *, z, n, upstream=1.0):
    """ops.nce_loss forward + backward (scaled by ``upstream``); returns (loss, anchor.grad)."""
    a = anchor.detach().clone().requires_grad_()
    loss = ops.nce_loss(a, bank, idx, tau=TAU, z=z, n_data=n)
    (loss * upstream).backward()
    return loss.detach(), a.grad


def assert_grad_close(got, want, dtype, what="", atol=0.0):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape
    assert torch.isfinite(got).all(), f"{what}: non-finite gradient"
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= GRAD_TOL[dtype] * scale + atol, f"{what}: max |grad err| {err:.3g} > {GRAD_TOL[dtype]} * {scale:.3g}"


def assert_loss_close(got, want, rtol, what="", atol=0.0):
    got, want = float(torch.as_tensor(got).detach()), float(torch.as_tensor(want).detach())
    assert abs(got - want) <= rtol * abs(want) + atol, f"{what}: loss {got!r} vs {want!r} ({abs(got - want):.3g})"


def ref_atol(k1):
    """The reference's absolute loss error budget (see the module docstring)."""
    return k1 * 1.2e-7


def ref_grad_atol(b, k1):
    """The same ~2^-23 per term, through dL/ds (1/B each) and ds/da = M/tau with unit bank rows."""
    return k1 * 1.2e-7 / (b * TAU)


# ----------------------------------------------------------------------------------- loss and gradient
# A covering set of (B, d, K+1): every value of each axis appears, and each pair of axes a few times.
SHAPES = [(1, 16, 1), (3, 96, 17), (64, 128, 1501), (1, 128, 17), (3, 16, 1501), (64, 96, 1), (3, 128, 1)]


@pytest.mark.parametrize("b,d,k1", SHAPES, ids=[f"B{b}-d{d}-K1_{k}" for b, d, k in SHAPES])
def test_loss_and_grad_match_reference_and_float64(triton_path, b, d, k1):
    n = 7531 if k1 == 1501 else 500
    anchor, bank, idx = make_inputs(b, d, k1, n, seed=1000 * b + 10 * d + k1)
    z = torch.tensor(z_of(anchor, bank, idx, n), device=DEVICE)
    loss, grad = run_public(anchor, bank, idx, z=z, n=n)
    want_loss, want_grad = loss64(anchor, bank, idx, z=z, n=n)

    a_ref = anchor.clone().requires_grad_()
    ref = nce_loss_reference(a_ref, bank, idx, tau=TAU, z=z, n_data=n)
    ref.backward()

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_loss_close(loss, want_loss, LOSS_RTOL_KERNEL, "kernel vs float64")
    assert_loss_close(loss, ref, LOSS_RTOL_REFERENCE, "kernel vs reference", atol=ref_atol(k1))
    assert_grad_close(grad, want_grad, torch.float32, "kernel vs float64")
    assert_grad_close(grad, a_ref.grad, torch.float32, "kernel vs reference", atol=ref_grad_atol(b, k1))


@pytest.mark.parametrize("b,d,k1", [(3, 96, 1501), (64, 128, 1501), (3, 16, 17)])
def test_reference_itself_matches_float64(b, d, k1):
    n = 7531
    anchor, bank, idx = make_inputs(b, d, k1, n, seed=7 + b + d + k1)
    z = z_of(anchor, bank, idx, n)
    a = anchor.clone().requires_grad_()
    ref = nce_loss_reference(a, bank, idx, tau=TAU, z=z, n_data=n)
    ref.backward()
    want_loss, want_grad = loss64(anchor, bank, idx, z=z, n=n)
    assert_loss_close(ref, want_loss, LOSS_RTOL_REFERENCE, "reference vs float64", atol=ref_atol(k1))
    assert_grad_close(a.grad, want_grad, torch.float32, "reference vs float64", atol=ref_grad_atol(b, k1))
    assert abs(nce_partition_reference(anchor, bank, idx, tau=TAU, n_data=n) - z) <= 1e-5 * z


@pytest.mark.parametrize("splits,block_k", [(3, 16), (7, 32), (1, 16)])
def test_several_splits_and_tiles(triton_path, splits, block_k):
    """Split boundaries and tile tails that do not line up with K+1 (launcher called directly)."""
    b, d, k1, n = 3, 96, 1501, 7531
    anchor, bank, idx = make_inputs(b, d, k1, n, seed=splits * 100 + block_k)
    z = torch.tensor(z_of(anchor, bank, idx, n), device=DEVICE)
    loss, grad = nce_mod.nce_fwd_triton(anchor, bank, idx, z, TAU, n, EPS, True, block_k=block_k, splits=splits)
    want_loss, want_grad = loss64(anchor, bank, idx, z=z, n=n)
    assert_loss_close(loss, want_loss, LOSS_RTOL_KERNEL, f"splits={splits}")
    assert_grad_close(grad, want_grad, torch.float32, f"splits={splits}")


def test_repeated_indices_within_a_row(triton_path):
    b, d, k1, n = 3, 96, 17, 50
    anchor, bank, idx = make_inputs(b, d, k1, n, seed=11, pool=4)  # 16 negatives from 4 slots
    idx[:, 5] = idx[:, 0]  # the positive's own slot also drawn as a negative
    assert all(len(set(r.tolist())) < k1 for r in idx)
    z = torch.tensor(z_of(anchor, bank, idx, n), device=DEVICE)
    loss, grad = run_public(anchor, bank, idx, z=z, n=n)
    want_loss, want_grad = loss64(anchor, bank, idx, z=z, n=n)
    assert_loss_close(loss, want_loss, LOSS_RTOL_KERNEL)
    assert_grad_close(grad, want_grad, torch.float32)


@pytest.mark.parametrize("z", [1.0, "batch"], ids=["z1", "zbatch"])
def test_scores_at_the_exp_limit(triton_path, z):
    """anchor == its positive bank row (and that row drawn as negatives too): s = 1/0.07 = 14.3, exp(s) = 1.6e6.
    With z = 1, P = 1.6e6 saturates the weights (w -> 1) -- the float32 edge of the formula."""
    b, d, k1, n = 3, 128, 17, 200
    anchor, bank, idx = make_inputs(b, d, k1, n, seed=21)
    anchor = bank[idx[:, 0]].clone()
    idx[:, 1:4] = idx[:, :1]
    z = z_of(anchor, bank, idx, n) if z == "batch" else z
    loss, grad = run_public(anchor, bank, idx, z=z, n=n)
    want_loss, want_grad = loss64(anchor, bank, idx, z=z, n=n)
    s_max = (bank[idx] @ anchor.unsqueeze(2)).max().item() / TAU
    assert s_max > 14.28
    assert_loss_close(loss, want_loss, LOSS_RTOL_KERNEL)
    assert_grad_close(grad, want_grad, torch.float32)
    ref = nce_loss_reference(anchor, bank, idx, tau=TAU, z=z, n_data=n)
    assert_loss_close(loss, ref, LOSS_RTOL_REFERENCE, atol=ref_atol(k1))


def test_past_float32_exp_overflow_stays_finite(triton_path):
    """Unnormalised anchors push s past 88 where exp overflows in float32: the reference's loss is inf; the
    kernel works in log space and still matches float64."""
    b, d, k1, n = 3, 16, 17, 100
    anchor, bank, idx = make_inputs(b, d, k1, n, seed=31)
    anchor = bank[idx[:, 0]].clone() * 7.0  # s_pos = 7 / 0.07 = 100
    idx[:, 2] = idx[:, 0]
    z = 50.0
    assert not torch.isfinite(nce_loss_reference(anchor, bank, idx, tau=TAU, z=z, n_data=n))
    loss, grad = run_public(anchor, bank, idx, z=z, n=n)
    want_loss, want_grad = loss64(anchor, bank, idx, z=z, n=n)
    assert_loss_close(loss, want_loss, LOSS_RTOL_KERNEL)
    assert_grad_close(grad, want_grad, torch.float32)


@pytest.mark.parametrize("bank_dtype", BANK_DTYPES)
def test_half_banks(triton_path, bank_dtype):
    """float16 (and, on CUDA, bfloat16) banks and anchors: float32 accumulation, gradient in the anchor's dtype."""
    b, d, k1, n = 3, 96, 1501, 7531
    anchor, bank, idx = make_inputs(b, d, k1, n, seed=41, bank_dtype=bank_dtype, anchor_dtype=bank_dtype)
    z = torch.tensor(z_of(anchor, bank, idx, n), device=DEVICE)
    loss, grad = run_public(anchor, bank, idx, z=z, n=n)
    assert loss.dtype == torch.float32 and grad.dtype == bank_dtype
    want_loss, want_grad = loss64(anchor, bank, idx, z=z, n=n)
    assert_loss_close(loss, want_loss, LOSS_RTOL_KERNEL)
    assert_grad_close(grad, want_grad, bank_dtype)
    a_ref = anchor.clone().requires_grad_()
    nce_loss_reference(a_ref, bank, idx, tau=TAU, z=z, n_data=n).backward()
    assert_grad_close(grad, a_ref.grad, bank_dtype, "kernel vs reference", atol=ref_grad_atol(b, k1))


def test_upstream_gradient_noncontiguous_inputs_int32_and_float_z(triton_path):
    """Backward scales by grad_output; a transposed (non-contiguous) anchor, a strided bank view, int32 idx and a
    Python-float z all give the same numbers as the plain case."""
    b, d, k1, n = 3, 16, 17, 300
    anchor, bank, idx = make_inputs(b, d, k1, n, seed=51)
    z = z_of(anchor, bank, idx, n)
    base_loss, base_grad = run_public(anchor, bank, idx, z=torch.tensor(z, device=DEVICE), n=n)

    anchor_t = anchor.t().contiguous().t()  # same values, column-major
    wide = torch.randn(n, 2 * d, device=DEVICE)
    wide[:, ::2] = bank  # bank view with strides (2d, 2)
    bank_view = wide[:, ::2]
    assert not anchor_t.is_contiguous() and not bank_view.is_contiguous()
    loss, grad = run_public(anchor_t, bank_view, idx.int(), z=z, n=n, upstream=-2.5)
    assert_loss_close(loss, base_loss, 1e-6)
    assert_grad_close(grad, -2.5 * base_grad, torch.float32)


@pytest.mark.parametrize("d,bank_dtype", [(120, torch.float32), (512, torch.float32), (120, torch.float16),
                                           (1024, torch.float16)])
def test_wide_and_unaligned_d(triton_path, d, bank_dtype):
    """d not a multiple of 16 (masked gather) and d up to 1024 (several lanes' chunks per row), with the GPU tile
    (tile height from the launcher's heuristic, several splits)."""
    b, k1, n = 3, 257, 2000
    anchor, bank, idx = make_inputs(b, d, k1, n, seed=d + 3, bank_dtype=bank_dtype)
    z = torch.tensor(z_of(anchor, bank, idx, n), device=DEVICE)
    launch = nce_plan._fwd_launch(d, bank.element_size(), interpreted=False)
    loss, grad = nce_mod.nce_fwd_triton(anchor, bank, idx, z, TAU, n, EPS, True, block_k=launch.block_k, splits=3)
    want_loss, want_grad = loss64(anchor, bank, idx, z=z, n=n)
    assert_loss_close(loss, want_loss, LOSS_RTOL_KERNEL, f"d={d}")
    assert_grad_close(grad, want_grad, torch.float32, f"d={d}")
    loss_pub, grad_pub = run_public(anchor, bank, idx.int(), z=z, n=n)  # the public op, int32 indices
    assert_loss_close(loss_pub, want_loss, LOSS_RTOL_KERNEL, f"d={d} public")
    assert_grad_close(grad_pub, want_grad, torch.float32, f"d={d} public")


def test_int32_indices_match_int64(triton_path):
    b, d, k1, n = 3, 128, 1501, 7531
    anchor, bank, idx = make_inputs(b, d, k1, n, seed=97)
    z = torch.tensor(z_of(anchor, bank, idx, n), device=DEVICE)
    loss64_idx, grad64_idx = run_public(anchor, bank, idx, z=z, n=n)
    loss32, grad32 = run_public(anchor, bank, idx.to(torch.int32), z=z, n=n)
    assert float(loss32) == float(loss64_idx)
    assert torch.equal(grad32, grad64_idx)
    want_loss, _ = loss64(anchor, bank, idx, z=z, n=n)
    assert_loss_close(loss32, want_loss, LOSS_RTOL_KERNEL)


@pytest.mark.parametrize("form", ["gather", "dense"])
@pytest.mark.parametrize("path", ["triton", "reference"])
def test_empty_batch_gives_what_the_reference_gives(monkeypatch, path, form):
    """B = 0: the reference's mean over no rows is nan and the gradient is [0, d]; the kernel path gives the same,
    never uninitialised memory; both forms of the loss."""
    monkeypatch.setenv("CMC_FAST_NCE", form)
    if path == "triton" and not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    monkeypatch.setenv("CMC_FAST_KERNELS", path)
    anchor, bank, _ = make_inputs(1, 16, 17, 100, seed=98)
    anchor = anchor[:0].clone()
    idx = torch.zeros((0, 17), dtype=torch.int64, device=DEVICE)
    want = nce_loss_reference(anchor, bank, idx, tau=TAU, z=5.0, n_data=100)
    loss, grad = run_public(anchor, bank, idx, z=5.0, n=100)
    assert torch.isnan(want) and torch.isnan(loss)
    assert grad.shape == (0, 16)


@pytest.mark.parametrize("bad", [100, -1])
@pytest.mark.parametrize("form", ["gather", "dense"])
def test_out_of_range_index_is_never_silent(monkeypatch, bad, form):
    """The reference path always raises a clear IndexError; the kernel path does under CMC_FAST_CHECK_INDEX=1. Both
    forms of the loss (the dense one checks in its histogram)."""
    monkeypatch.setenv("CMC_FAST_NCE", form)
    anchor, bank, idx = make_inputs(3, 16, 17, 100, seed=99)
    idx[1, 7] = bad
    monkeypatch.setenv("CMC_FAST_KERNELS", "reference")
    with pytest.raises(IndexError, match=f"idx holds {bad}, outside the bank's 100 rows"):
        ops.nce_loss(anchor, bank, idx, tau=TAU, z=5.0, n_data=100)
    with pytest.raises(IndexError, match="outside the bank's 100 rows"):
        ops.nce_partition(anchor, bank, idx, tau=TAU, n_data=100)
    if not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    monkeypatch.setenv("CMC_FAST_KERNELS", "triton")
    monkeypatch.setenv("CMC_FAST_CHECK_INDEX", "1")
    with pytest.raises(IndexError, match=f"idx holds {bad}, outside the bank's 100 rows"):
        ops.nce_loss(anchor, bank, idx, tau=TAU, z=5.0, n_data=100)
    with pytest.raises(IndexError, match="outside the bank's 100 rows"):
        ops.nce_partition(anchor, bank, idx, tau=TAU, n_data=100)


def test_tiny_negative_terms_keep_their_digits(triton_path):
    """Where the accurate log1p matters: every negative's P/c is below 2^-24, so 1 + P/c rounds to 1 in float32 and
    log(1 + x) would drop each term's -log1p(P/c) (~2e-8 x 32768 negatives ~ 7e-4 of loss per row). The kernel's
    log1p keeps them: its loss matches float64 to 4e-5 absolute -- about 20 float32 ulps of this loss (~17.5), the
    room summing one ~17 positive term with 32768 tiny ones in float32 takes -- against the ~7e-4 log(1 + x) loses
    (checked by hand: with log(1 + x) in the kernel this test fails)."""
    b, d, k1, n, tau = 2, 16, 32769, 40000, 1.0
    anchor, bank, idx = make_inputs(b, d, k1, n, seed=111)
    s = (bank.double()[idx] @ anchor.double().unsqueeze(2)).squeeze(2) / tau
    c = (k1 - 1) / n + EPS
    z = float(torch.exp(s).max()) / (c * 5e-8)  # P/c = exp(s)/(z c) <= 5e-8 < 2^-24 = 5.96e-8
    loss = ops.nce_loss(anchor, bank, idx, tau=tau, z=z, n_data=n)
    want, _ = loss64(anchor, bank, idx, z=z, n=n, tau=tau)
    dropped = float((torch.exp(s[:, 1:]) / (z * c)).sum(1).mean())  # what log(1 + x) would lose
    tol = 4e-5
    assert dropped > 10 * tol
    assert abs(float(loss) - float(want)) <= tol, (float(loss), float(want), dropped)


def test_no_grad_and_z_float_vs_tensor(triton_path):
    b, d, k1, n = 3, 128, 17, 400
    anchor, bank, idx = make_inputs(b, d, k1, n, seed=61)
    z = z_of(anchor, bank, idx, n)
    with torch.no_grad():
        l_nograd = ops.nce_loss(anchor.clone().requires_grad_(), bank, idx, tau=TAU, z=z, n_data=n)
    l_tensor = ops.nce_loss(anchor, bank, idx, tau=TAU, z=torch.tensor(z, device=DEVICE), n_data=n)
    want, _ = loss64(anchor, bank, idx, z=z, n=n)
    assert not l_nograd.requires_grad
    assert_loss_close(l_nograd, want, LOSS_RTOL_KERNEL)
    assert_loss_close(l_tensor, want, LOSS_RTOL_KERNEL)


def test_reference_path_closed_form_gradient_matches_autograd(reference_path):
    """The op's reference implementation returns the gradient in closed form (autograd cannot run inside a
    custom op): it must equal autograd through nce_loss_reference."""
    b, d, k1, n = 3, 96, 1501, 7531
    anchor, bank, idx = make_inputs(b, d, k1, n, seed=71)
    z = z_of(anchor, bank, idx, n)
    loss, grad = run_public(anchor, bank, idx, z=z, n=n, upstream=0.3)
    a = anchor.clone().requires_grad_()
    ref = nce_loss_reference(a, bank, idx, tau=TAU, z=z, n_data=n)
    (ref * 0.3).backward()
    assert float(loss) == float(ref.detach())  # same arithmetic, bit for bit
    assert_grad_close(grad, a.grad, torch.float32, atol=ref_grad_atol(b, k1))


def test_bad_arguments_raise():
    anchor, bank, idx = make_inputs(3, 16, 17, 100, seed=81)
    with pytest.raises(ValueError):
        ops.nce_loss(anchor, bank, idx[:2], tau=TAU, z=1.0, n_data=100)
    with pytest.raises(ValueError):
        ops.nce_loss(anchor[:, :8], bank, idx, tau=TAU, z=1.0, n_data=100)
    with pytest.raises(TypeError):
        ops.nce_loss(anchor, bank, idx.float(), tau=TAU, z=1.0, n_data=100)
    with pytest.raises(ValueError):
        ops.bank_update_(bank, idx[:, 0], anchor[:2], 0.5)


# ------------------------------------------------------------------------------------------- partition
@pytest.mark.parametrize("b,d,k1,splits", [(3, 96, 1501, 5), (1, 16, 1, None), (64, 128, 17, None)])
def test_partition(triton_path, b, d, k1, splits):
    n = 7531
    anchor, bank, idx = make_inputs(b, d, k1, n, seed=91 + k1)
    want = z_of(anchor, bank, idx, n)
    got_kernel = nce_mod.nce_partition_triton(anchor, bank, idx, TAU, n, splits=splits)
    got_public = ops.nce_partition(anchor, bank, idx, tau=TAU, n_data=n)
    assert isinstance(got_public, float)
    assert abs(float(got_kernel) - want) <= 2e-6 * want
    assert abs(got_public - want) <= 2e-6 * want
    assert abs(nce_partition_reference(anchor, bank, idx, tau=TAU, n_data=n) - want) <= 1e-5 * want


# ----------------------------------------------------------------------------------------- bank update
def bank_case(n, d, idx_list, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype).to(DEVICE)
    index = torch.tensor(idx_list, dtype=torch.int64, device=DEVICE)
    feats = F.normalize(torch.randn(len(idx_list), d, generator=g), dim=1).to(DEVICE)
    return bank, index, feats


@pytest.mark.parametrize("dtype", BANK_DTYPES)
@pytest.mark.parametrize("d", [16, 96, 128])
def test_bank_update_matches_reference_with_repeats(triton_path, dtype, d):
    idx_list = [3, 7, 3, 11, 7, 7, 0, 19]  # 3 and 7 repeat: the last occurrence (positions 2 and 5) wins
    bank, index, feats = bank_case(20, d, idx_list, seed=d, dtype=dtype)
    before = bank.clone()
    ref = bank.clone()
    bank_update_reference_(ref, index, feats, 0.5)
    ops.bank_update_(bank, index, feats, 0.5)
    tol = BANK_TOL[dtype]
    assert (bank.float() - ref.float()).abs().max().item() <= tol
    # explicit: rows from the pre-call bank, last occurrence wins, untouched rows unchanged
    for row, pos in [(3, 2), (7, 5), (11, 3), (0, 6), (19, 7)]:
        want = F.normalize(0.5 * before[row].float() + 0.5 * feats[pos].float(), dim=0)
        assert (bank[row].float() - want).abs().max().item() <= tol, f"row {row}"
    untouched = [r for r in range(20) if r not in idx_list]
    assert torch.equal(bank[untouched], before[untouched])
    # a loser's value is not what landed
    loser = F.normalize(0.5 * before[3].float() + 0.5 * feats[0].float(), dim=0)
    assert (bank[3].float() - loser).abs().max().item() > 10 * tol


def test_bank_update_deterministic_and_strided(triton_path):
    g = torch.Generator().manual_seed(5)
    index = torch.randint(0, 40, (64,), generator=g).to(DEVICE)  # many repeats
    assert index.unique().numel() < 64
    bank, _, feats = bank_case(40, 96, [0] * 64, seed=6, dtype=torch.float32)
    results = []
    for _ in range(3):
        b = bank.clone()
        ops.bank_update_(b, index, feats, 0.5)
        results.append(b)
    assert torch.equal(results[0], results[1]) and torch.equal(results[1], results[2])
    ref = bank.clone()
    bank_update_reference_(ref, index, feats, 0.5)
    assert (results[0] - ref).abs().max().item() <= BANK_TOL[torch.float32]
    # a strided view of a wider buffer is updated in place, its neighbours untouched
    wide = torch.randn(40, 2 * 96, device=DEVICE)
    wide[:, 1::2] = bank
    keep = wide[:, ::2].clone()
    ops.bank_update_(wide[:, 1::2], index, feats, 0.5)
    assert (wide[:, 1::2] - ref).abs().max().item() <= BANK_TOL[torch.float32]
    assert torch.equal(wide[:, ::2], keep)


# ------------------------------------------------------------------------------- torch.library / compile
def test_opcheck_registrations():
    """Schema, fake (meta) and autograd registrations of the ops are consistent (torch.library.opcheck)."""
    anchor, bank, idx = make_inputs(3, 16, 17, 100, seed=101)
    anchor.requires_grad_()
    z = torch.tensor(z_of(anchor, bank, idx, 100), device=DEVICE)
    torch.library.opcheck(torch.ops.cmc_fast.nce_fwd.default, (anchor, bank, idx, z, TAU, 100, EPS, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.cmc_fast.bank_update_.default, (bank.clone(), idx[:, 0], anchor.detach(), 0.5),
                          test_utils=("test_schema", "test_faketensor"))


class _Step(torch.nn.Module):
    def __init__(self, n, d_in, d, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Linear(d_in, d)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(d, d_in, generator=g) * 0.2)
            self.proj.bias.copy_(torch.randn(d, generator=g) * 0.1)
        self.register_buffer("bank", F.normalize(torch.randn(n, d, generator=g), dim=1))
        self.register_buffer("z", torch.tensor(float(n)))

    def forward(self, x, index, idx):
        a = F.normalize(self.proj(x), dim=1)
        loss = ops.nce_loss(a, self.bank, idx, tau=TAU, z=self.z, n_data=self.bank.shape[0])
        ops.bank_update_(self.bank, index, a.detach(), 0.5)
        return loss


@pytest.mark.parametrize("form", ["gather", "dense", "auto"])
@pytest.mark.parametrize("mode", ["auto", "triton"])
def test_compiled_step_fullgraph_matches_eager(monkeypatch, mode, form):
    """torch.compile(fullgraph=True) of a step with nce_loss and bank_update_ compiles without graph breaks --
    fullgraph raises on any -- and its loss, AOT-compiled backward and bank update match eager, twice in a row
    (step 2 reads the bank step 1 updated). auto: the ops' reference implementation on CPU, Triton on CUDA;
    triton: the Triton launchers, in the interpreter on CPU (the op is opaque to the compiler either way); both
    forms of the loss (the dense one adds the histogram op to the graph) and the form chosen by shape at trace time."""
    if mode == "triton" and not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    monkeypatch.setenv("CMC_FAST_KERNELS", mode)
    monkeypatch.setenv("CMC_FAST_NCE", form)
    n, d_in, d, b, k1 = 64, 24, 16, 6, 17
    eager, compiled = _Step(n, d_in, d, seed=3).to(DEVICE), _Step(n, d_in, d, seed=3).to(DEVICE)
    fwd = torch.compile(compiled, fullgraph=True)
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        x = torch.randn(b, d_in, generator=g).to(DEVICE)
        index = torch.tensor([1, 5, 9, 5, 20, 33], device=DEVICE)  # a repeat: last occurrence wins in both
        idx = torch.cat([index[:, None], torch.randint(0, n, (b, k1 - 1), generator=g).to(DEVICE)], dim=1)
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
        l_eager = eager(x, index, idx)
        l_eager.backward()
        l_comp = fwd(x, index, idx)
        l_comp.backward()
        assert torch.allclose(l_eager, l_comp, rtol=1e-5, atol=0), (l_eager, l_comp)
        assert torch.allclose(eager.proj.weight.grad, compiled.proj.weight.grad, rtol=1e-4, atol=1e-6)
        assert torch.allclose(eager.bank, compiled.bank, rtol=0, atol=1e-6)
    assert not torch.equal(eager.bank, _Step(n, d_in, d, seed=3).to(DEVICE).bank)  # the bank did move


# ------------------------------------------------------------------------------- GPU build, without a GPU
_HOPPER_BUILD = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)  # code generation does not work in interpreter mode
import torch
import cmc_fast.kernels.nce as kn
import cmc_fast.kernels.nce_plan as plan
from cmc_fast.kernels.bank import _bank_update_kernel
from cmc_fast.kernels.hopper_build import build_checked
from cmc_fast.kernels.nce_sm90 import _dense_spec_args, _fwd_spec_args

F = "*fp32"
# The loss kernel as the launcher configures it on a GPU, specialised as the JIT would specialise that launch on a
# contiguous bank (nce_sm90._fwd_spec_args): fp32 with the gradient (its most registers) and 2-byte banks, aligned and
# unaligned d, up to 1024.
for bank_type, elem in (("fp32", 4), ("bf16", 2), ("fp16", 2)):
    for d in (16, 120, 128, 250, 256, 512, 1024):
        launch = plan._fwd_launch(d, elem, interpreted=False)
        consts = {"COMPUTE_GRAD": True, "LIBDEVICE": True, "BLOCK_K": launch.block_k, "N_CHUNKS": launch.n_chunks,
                  "CHUNK_D": launch.chunk_d, "EVEN_D": d == launch.n_chunks * launch.chunk_d, "stride_bd": 1}
        types, divisible = _fwd_spec_args(d, 16385, 1024, bank_type)
        build_checked(kn._nce_fwd_kernel, types, consts, launch.num_warps, divisible)
PARTITION = {"anchor_ptr": F, "bank_ptr": F, "idx_ptr": "*i64", "part_ptr": F, "inv_tau": "fp32"}
for block_d in (128, 512, 2048):
    build_checked(kn._nce_partition_kernel, PARTITION,
                  {"BLOCK_K": plan._block_k(block_d, 1024, torch.device("cuda")), "BLOCK_D": block_d})
build_checked(kn._nce_finalize_kernel, {"part_loss_ptr": F, "part_grad_ptr": F, "loss_ptr": F, "grad_ptr": F,
                                        "loss_scale": "fp32", "grad_scale": "fp32"},
              {"COMPUTE_GRAD": True, "BLOCK_S": 16, "BLOCK_D": 128, "BLOCK_P": 1024})
# The dense form: its loss kernel as the launcher configures it on a GPU (up to d = 128, DENSE_MAX_D) for each bank
# dtype, and the histogram.
for bank_type, elem in (("fp32", 4), ("bf16", 2), ("fp16", 2)):
    for d in (16, 50, 64, 128):
        launch = plan._dense_launch(64, d, 9528, interpreted=False, elem=elem)
        consts = {**plan._dense_consts(launch, need_grad=True, libdevice_log1p=True), "stride_bd": 1}
        types, divisible = _dense_spec_args(d, 9528, 16385, 1024, bank_type)
        build_checked(kn._nce_dense_kernel, types, consts, launch.num_warps, divisible)
build_checked(kn._nce_counts_kernel, {"idx_ptr": "*i32", "counts_ptr": "*i32"}, {"BLOCK_K": 1024})
build_checked(_bank_update_kernel, {"bank_ptr": "*bf16", "index_ptr": "*i64", "feats_ptr": F, "momentum": "fp32"},
              {"BLOCK_N": 1024, "BLOCK_D": 128})
print("BUILD OK")
"""


@pytest.mark.skipif(CUDA, reason="on a GPU the kernels run for real in the tests above")
def test_kernels_compile_for_hopper_without_spilling(run_without_interpreter):
    """The interpreter checks neither libdevice functions, nor types across branches, nor registers: build every
    kernel for sm_90 with Triton's bundled ptxas (no GPU needed), specialised as the JIT would specialise the launch
    -- the loss kernel with the launcher's tile for fp32, bf16 and fp16 banks at d = 16 to 1024, aligned and not --
    and check none spills a byte and each fits a block's shared memory."""
    assert "BUILD OK" in run_without_interpreter(_HOPPER_BUILD)


def test_launcher_reads_occupancy_from_the_device(monkeypatch):
    """The launcher sizes its grid by the compiled kernel's registers and shared memory against the device's own SM
    limits (``gpus.resident_blocks``): worked by hand from the occupancy rules (registers allocated per warp in
    units of 256, 1 KB of shared memory reserved per block, at most 32 blocks), on an sm_90 SM and on one with half
    its registers; a handle that says nothing: 2 a SM, with a warning."""
    from cmc_fast.kernels import gpus

    class Compiled:
        name = "k"
        metadata = type("Meta", (), {"shared": 512})()

        def __init__(self, regs):
            self.n_regs = regs

        def _init_handles(self):
            pass

    class Props:
        regs_per_multiprocessor = 65536
        max_threads_per_multi_processor = 2048
        shared_memory_per_multiprocessor = 233472

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: Props())
    cuda = torch.device("cuda", 0)
    # 120 regs -> 3840 a warp, x 4 warps: 4 blocks by registers; 231 -> 7424 a warp: 2 blocks
    assert [nce_plan._resident_programs(Compiled(r), 4, cuda) for r in (120, 231)] == [4, 2]
    assert gpus.resident_blocks(32, 16, 1) == 32  # the block limit (64 by threads and registers)
    assert gpus.resident_blocks(255, 100_000, 8) == 1  # 8192 registers a warp x 8 warps: the whole SM
    assert gpus.resident_blocks(40, 150_000, 4) == 1 and gpus.resident_blocks(40, 240_000, 4) == 0  # shared memory
    Props.regs_per_multiprocessor = 32768
    assert nce_plan._resident_programs(Compiled(120), 4, cuda) == 2
    broken = Compiled(120)
    broken._init_handles = lambda: (_ for _ in ()).throw(AttributeError("no handle"))
    with pytest.warns(RuntimeWarning, match="cannot read the occupancy"):
        assert nce_plan._resident_programs(broken, 4, cuda) == 2


@pytest.mark.parametrize("b,k1,block_k,slots", [(64, 16385, 32, 528), (64, 16385, 64, 264), (64, 1501, 32, 528),
                                                (3, 16385, 32, 528), (1, 17, 32, 528), (256, 16385, 32, 528)])
def test_splits_fill_the_last_wave(b, k1, block_k, slots):
    """The launcher's split count: chunks of whole tiles covering K+1 exactly once, and when K+1 is long enough a
    grid whose last wave fills >= 90% of the resident slots."""
    n_split, chunk = nce_plan._choose_splits(b, k1, block_k, slots)
    assert chunk % block_k == 0 and chunk % 16 == 0
    assert (n_split - 1) * chunk < k1 <= n_split * chunk
    programs = b * n_split
    fill = (programs % slots or slots) / slots
    if b * (k1 // max(16, block_k)) >= slots:  # enough tiles to fill one wave
        assert programs >= 0.9 * slots and fill >= 0.9, (programs, slots, fill)


# ------------------------------------------------------------------------------------- the dense form
# S = A M^T / tau over the whole bank, negatives weighted by their histogram C (kernels/nce.py _nce_dense_kernel,
# the PyTorch form reference.nce_dense_reference). Same idx, same loss: checked against the float64 gather formula.
def _random_dense_cases(seed, count):
    """Fresh shapes from a seeded generator, with the edge cases named: (b, d, k1, n, pool, n_data)."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    cases = [
        (pick(2, 5), 16 * pick(1, 3), pick(40, 90), pick(8, 20), None, None),  # K+1 > N: every row drawn often
        (pick(1, 4), pick(17, 40), pick(2, 9), pick(300, 700), None, None),  # K+1 << N, d not a multiple of 16
        (pick(3, 6), 32, pick(30, 60), 200, 7, None),  # a pool of 7 rows: repeated indices in every row
        (pick(2, 5), 16, pick(20, 50), 120, None, pick(40, 70)),  # opposite-class: n_data = the pool, not N
        (1, 16, 1, 33, None, None),  # K = 0: the positive alone
    ]
    return cases[:count]


DENSE_CASES = _random_dense_cases(seed=2101, count=5)
DENSE_IDS = ["K1_gt_N", "K1_lt_N", "repeats", "pool_n_data", "K0"]


def _dense_inputs(b, d, k1, n, pool, seed, bank_dtype=torch.float32):
    anchor, bank, idx = make_inputs(b, d, k1, n, seed, bank_dtype=bank_dtype, pool=pool)
    if k1 > 2:
        idx[0, 1 + seed % (k1 - 1)] = idx[0, 0]  # the positive also drawn as a negative
    return anchor, bank, idx


@pytest.mark.parametrize("b,d,k1,n,pool,n_data", DENSE_CASES, ids=DENSE_IDS)
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_dense_matches_float64(monkeypatch, impl, b, d, k1, n, pool, n_data):
    """ops.nce_loss forced to the dense form (CMC_FAST_NCE=dense), PyTorch and Triton, forward and backward, int32
    and int64 idx, against the float64 formula of the gather on the same idx."""
    if impl == "triton" and not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    monkeypatch.setenv("CMC_FAST_KERNELS", impl)
    monkeypatch.setenv("CMC_FAST_NCE", "dense")
    n_data = n_data or n
    anchor, bank, idx = _dense_inputs(b, d, k1, n, pool, seed=b * 1000 + k1)
    z = torch.tensor(z_of(anchor, bank, idx, n_data), device=DEVICE)
    want_loss, want_grad = loss64(anchor, bank, idx, z=z, n=n_data)
    for index_dtype in (torch.int32, torch.int64):
        loss, grad = run_public(anchor, bank, idx.to(index_dtype), z=z, n=n_data, upstream=1.7)
        assert_loss_close(loss, want_loss, LOSS_RTOL_KERNEL, f"dense {impl} vs float64")
        assert_grad_close(grad, 1.7 * want_grad, torch.float32, f"dense {impl} vs float64")


@pytest.mark.parametrize("splits,bank_dtype", [(1, torch.float32), (3, torch.float32), (2, torch.float16)])
def test_dense_kernel_splits_and_tiles(triton_path, splits, bank_dtype):
    """The launcher called directly: the bank cut into several slices (tails not on a tile boundary), B not a
    multiple of the anchor tile, an opposite-class n_data; a 2-byte bank (exact in tf32: the anchors and weights split
    by hand into two tf32 products); loss and gradient against float64 on the bank's stored values."""
    b, d, k1, n, n_data = 19, 40, 301, 999, 420
    anchor, bank, idx = _dense_inputs(b, d, k1, n, None, seed=splits, bank_dtype=bank_dtype)
    z = torch.tensor(z_of(anchor, bank, idx, n_data), device=DEVICE)
    counts = nce_mod.nce_counts_triton(idx, n)
    loss, grad = nce_mod.nce_dense_triton(anchor, bank, idx, counts, z, TAU, n_data, EPS, True, splits=splits)
    want_loss, want_grad = loss64(anchor, bank, idx, z=z, n=n_data)
    assert_loss_close(loss, want_loss, LOSS_RTOL_KERNEL, "dense kernel vs float64")
    assert_grad_close(grad, want_grad, torch.float32, "dense kernel vs float64")


def test_dense_reference_half_banks_and_tiny_terms(reference_path, monkeypatch):
    """The PyTorch dense form with bfloat16 and float16 banks (the interpreter has no bfloat16: the kernel's are
    checked on a GPU), and a Z so large every negative term is tiny (P << K/N): their digits survive."""
    monkeypatch.setenv("CMC_FAST_NCE", "dense")
    for bank_dtype in (torch.bfloat16, torch.float16):
        anchor, bank, idx = _dense_inputs(4, 64, 257, 400, None, seed=77, bank_dtype=bank_dtype)
        for z in (z_of(anchor, bank, idx, 400), 1e12):
            loss, grad = run_public(anchor, bank, idx, z=z, n=400)
            want_loss, want_grad = loss64(anchor, bank, idx, z=z, n=400)
            assert_loss_close(loss, want_loss, LOSS_RTOL_KERNEL, f"dense {bank_dtype} z={z}")
            assert_grad_close(grad, want_grad, torch.float32, f"dense {bank_dtype} z={z}")


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_counts_are_the_negatives_histogram(monkeypatch, impl):
    """C[i, r] = how often r appears in idx[i, 1:] (the positive only where also drawn), counted here by a Python
    loop; repeated indices, K+1 > N and int32/int64 idx."""
    if impl == "triton" and not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    monkeypatch.setenv("CMC_FAST_KERNELS", impl)
    g = torch.Generator().manual_seed(31)
    n = 13
    idx = torch.randint(0, n, (5, 1 + 1500), generator=g)
    idx[2, 5] = idx[2, 0]
    want = torch.zeros(5, n, dtype=torch.int32)
    for i, row in enumerate(idx.tolist()):
        for r in row[1:]:
            want[i, r] += 1
    for index_dtype in (torch.int32, torch.int64):
        got = ops.nce_counts(idx.to(DEVICE, index_dtype), n)
        assert got.dtype == torch.int32 and torch.equal(got.cpu(), want)
    assert ops.nce_counts(idx[:, :1].to(DEVICE), n).sum() == 0  # K = 0: no negatives


def test_counts_argument_is_checked_and_shared(reference_path, monkeypatch):
    monkeypatch.setenv("CMC_FAST_NCE", "dense")
    anchor, bank, idx = _dense_inputs(3, 16, 33, 50, None, seed=3)
    counts = ops.nce_counts_for(anchor, bank, idx)
    assert counts is not None and counts.shape == (3, 50)
    a = anchor.clone().requires_grad_()
    shared = ops.nce_loss(a, bank, idx, tau=TAU, z=10.0, n_data=50, counts=counts)
    assert torch.equal(shared, ops.nce_loss(a, bank, idx, tau=TAU, z=10.0, n_data=50))
    with pytest.raises(ValueError, match=r"counts must be the int32 \[B, N\] = \[3, 50\]"):
        ops.nce_loss(a, bank, idx, tau=TAU, z=10.0, n_data=50, counts=counts.float())
    monkeypatch.setenv("CMC_FAST_NCE", "gather")
    assert ops.nce_counts_for(anchor, bank, idx) is None
    monkeypatch.setenv("CMC_FAST_NCE", "sparse")
    with pytest.raises(ValueError, match="CMC_FAST_NCE='sparse' is not one of auto, gather, dense"):
        ops.nce_loss(a, bank, idx, tau=TAU, z=10.0, n_data=50)


# ------------------------------------------------------------------------------------ the choice by shape
def test_choice_rule_by_shape(monkeypatch):
    """Dense at every shape of the paper (B*(K+1) well above N), the gather for a bank far larger than B*(K+1) or
    a [B, N] working set past the cap, for K = 0 and past the dense kernel's widest d; CMC_FAST_NCE forces one."""
    from cmc_fast.kernels import nce_plan as plan

    monkeypatch.delenv("CMC_FAST_NCE", raising=False)
    for device in ("cpu", "cuda"):
        for b, k, n in [(64, 16384, 9528), (256, 16384, 9528), (64, 1500, 7531)]:
            assert plan.nce_path(b, 128, k + 1, n, 4, device) == "dense", (device, b, k, n)
        assert plan.nce_path(256, 128, 16385, 1_000_000, 4, device) == "gather"  # 1 GB of counts
        assert plan.nce_path(64, 128, 65, 500_000, 4, device) == "gather"  # B*(K+1) << N, within the cap
        assert plan.nce_path(64, 128, 1, 100, 4, device) == "gather"  # K = 0: nothing to histogram
        assert plan.nce_path(64, 2048, 16385, 9528, 4, device) == "gather"
    monkeypatch.setenv("CMC_FAST_NCE", "dense")
    assert plan.nce_path(256, 128, 16385, 1_000_000, 4, "cpu") == "dense"
    monkeypatch.setenv("CMC_FAST_NCE", "gather")
    assert plan.nce_path(64, 128, 16385, 9528, 4, "cpu") == "gather"


@pytest.mark.parametrize("seed", [1, 2])
def test_auto_choice_matches_float64_and_is_recorded(reference_path, monkeypatch, seed):
    """Left to the rule, on fresh random shapes on both sides of it: whichever form runs gives the float64 loss and
    gradient, and the run's record names the form that ran."""
    from cmc_fast.kernels import nce_plan as plan

    monkeypatch.delenv("CMC_FAST_NCE", raising=False)
    g = torch.Generator().manual_seed(seed)
    b, d = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(16, 48, (1,), generator=g))
    ops.nce_paths_taken(reset=True)
    seen = set()
    for k1, n in [(int(torch.randint(200, 400, (1,), generator=g)), 60), (2, 3000)]:  # dense side, gather side
        anchor, bank, idx = _dense_inputs(b, d, k1, n, None, seed=seed + k1)
        z = z_of(anchor, bank, idx, n)
        loss, grad = run_public(anchor, bank, idx, z=z, n=n)
        want_loss, want_grad = loss64(anchor, bank, idx, z=z, n=n)
        path = plan.nce_path(b, d, k1, n, 4, DEVICE.type)
        seen.add(path)
        rtol = LOSS_RTOL_KERNEL if path == "dense" else LOSS_RTOL_REFERENCE
        assert_loss_close(loss, want_loss, rtol, path, atol=0 if path == "dense" else ref_atol(k1))
        assert_grad_close(grad, want_grad, torch.float32, path, atol=0 if path == "dense" else ref_grad_atol(b, k1))
    assert seen == {"dense", "gather"}
    taken = ops.nce_paths_taken(reset=True)
    assert any(line.startswith(f"dense (auto) at B={b} d={d}") for line in taken), taken
    assert any(line.startswith(f"gather (auto) at B={b} d={d} K=1 N=3000") for line in taken), taken
    assert ops.nce_paths_taken() == []


def test_dense_ops_registrations():
    """Schema, fake (meta) and autograd registrations of the dense ops (torch.library.opcheck)."""
    anchor, bank, idx = _dense_inputs(3, 16, 17, 40, None, seed=5)
    anchor.requires_grad_()
    z = torch.tensor(z_of(anchor, bank, idx, 40), device=DEVICE)
    counts = ops.nce_counts(idx, 40)
    torch.library.opcheck(torch.ops.cmc_fast.nce_dense_fwd.default,
                          (anchor, bank, idx, counts, z, TAU, 40, EPS, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.cmc_fast.nce_counts.default, (idx, 40),
                          test_utils=("test_schema", "test_faketensor"))
