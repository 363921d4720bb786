"""BLOCK merge: the fused Triton kernels against the PyTorch reference and against float64.

Without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by the root conftest) on CPU
tensors; with one, on CUDA tensors. Data are fresh seeded random draws per test (never zeros, except where a test
plants exact zeros on purpose).

Tolerances, against the float64 truth, as ||a - truth|| / ||truth|| (Frobenius) and, for the worst element,
max|a - truth| / max|truth|. Gradients through the signed sqrt scale like 1/sqrt|z|; random data always hold a few
near-zero z, whose gradients no float32 computation gets right to 1e-4 (the reference's own float32 error reaches
3e-3 on some seeds). So each check is: within the tolerance below, or within FACTOR x the error of the reference
run in the same dtype on the same data, and never beyond HARD_CAP; worst element within WORST_FACTOR x the
reference's worst + slack (1e-6 fp32, 1e-2 fp16/bf16).
  float32  forward 1e-5, gradients 1e-4, FACTOR 4, WORST_FACTOR 10
  float16  forward 2e-2, gradients 5e-2, FACTOR 2, WORST_FACTOR 3
  bfloat16 (GPU only) forward 5e-2, gradients 1e-1, FACTOR 2, WORST_FACTOR 3
"""

from __future__ import annotations

import warnings

import cmc_fast.kernels.block as kb
import pytest
import torch
from cmc_fast.kernels.reference import block_chunk_sizes, block_merge_reference

from cmc_fast import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MM, CHUNKS = 83, 7  # ceil(83/7) = 12: six chunks of 12 and an uneven last chunk of 11
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-2, 5e-2), torch.bfloat16: (5e-2, 1e-1)}  # (out, grads)
FACTOR = {torch.float32: 4.0, torch.float16: 2.0, torch.bfloat16: 2.0}
WORST_FACTOR = {torch.float32: 10.0, torch.float16: 3.0, torch.bfloat16: 3.0}
HARD_CAP = 0.2  # a wrong formula is off by O(1)


# --------------------------------------------------------------------------------------------- helpers
def make_inputs(batch: int, sizes: list[int], rank: int, seed: int, dtype=torch.float32, w_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    mm = sum(sizes)
    x0 = torch.randn(batch, mm, generator=gen)
    x1 = torch.randn(batch, mm, generator=gen)
    scale = torch.cat([torch.full((rank * s * s,), s ** -0.5) for s in sizes])  # nn.Linear-like magnitudes
    w0 = torch.randn(scale.numel(), generator=gen) * scale
    w1 = torch.randn(scale.numel(), generator=gen) * scale
    b0 = 0.3 * torch.randn(rank * mm, generator=gen)
    b1 = 0.3 * torch.randn(rank * mm, generator=gen)
    grad = torch.randn(batch, mm, generator=gen)
    w_dtype = w_dtype or dtype
    xs = [t.to(DEVICE, dtype) for t in (x0, x1)]
    ws = [t.to(DEVICE, w_dtype) for t in (w0, b0, w1, b1)]
    return (*xs, *ws), grad.to(DEVICE, dtype)


def merge_float64(x0, x1, w0, b0, w1, b1, sizes, rank):
    """An independent float64 BLOCK merge (einsum over [rank, s, s] weight blocks), for the reference's own check."""
    x0, x1, w0, b0, w1, b1 = (t.double() for t in (x0, x1, w0, b0, w1, b1))
    outs, col, wo, bo = [], 0, 0, 0
    for s in sizes:
        a = w0[wo:wo + rank * s * s].view(rank, s, s)
        b = w1[wo:wo + rank * s * s].view(rank, s, s)
        y0 = torch.einsum("bk,rjk->brj", x0[:, col:col + s], a) + b0[bo:bo + rank * s].view(rank, s)
        y1 = torch.einsum("bk,rjk->brj", x1[:, col:col + s], b) + b1[bo:bo + rank * s].view(rank, s)
        z = (y0 * y1).sum(1)
        t = torch.sign(z) * z.abs().sqrt()
        outs.append(t / t.norm(dim=1, keepdim=True).clamp_min(1e-12))
        col, wo, bo = col + s, wo + rank * s * s, bo + rank * s
    return torch.cat(outs, 1)


def ref_with_grads(args, grad, sizes, rank, fn=block_merge_reference, dtype=None):
    """Output and the six gradients of ``fn`` by autograd, optionally in another dtype (float64: the truth)."""
    leaves = [(a.to(dtype) if dtype else a).detach().clone().requires_grad_() for a in args]
    out = fn(*leaves, sizes=sizes, rank=rank)
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return out.detach(), list(grads)


def rel_err(a: torch.Tensor, truth: torch.Tensor) -> float:
    """max|a - truth| / max|truth|: the worst element, dominated by the few near-zero z."""
    return ((a.double() - truth.double()).abs().max() / truth.double().abs().max().clamp_min(1e-30)).item()


def fro_err(a: torch.Tensor, truth: torch.Tensor) -> float:
    """||a - truth|| / ||truth|| (Frobenius): the error of the tensor as a whole."""
    return ((a.double() - truth.double()).norm() / truth.double().norm().clamp_min(1e-30)).item()


def check_close(got, ref, truth, tol: float, slack: float, name: str) -> None:
    """``got`` against the float64 truth: as a whole within ``tol`` or within FACTOR x the same-dtype reference's
    own error (the data's conditioning bounds what any implementation reaches), never beyond ``HARD_CAP``; its worst
    element within WORST_FACTOR x the reference's worst + slack."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    factor = FACTOR[got.dtype]
    e_fro, r_fro = fro_err(got, truth), fro_err(ref, truth)
    assert e_fro <= min(max(tol, factor * r_fro), HARD_CAP), \
        f"{name}: error {e_fro:.2e} vs float64 (tolerance {tol:.0e}, reference's error {r_fro:.2e})"
    e_got, e_ref = rel_err(got, truth), rel_err(ref, truth)
    assert e_got <= WORST_FACTOR[got.dtype] * e_ref + slack, \
        f"{name}: worst element {e_got:.2e} much worse than the reference's {e_ref:.2e}"


NAMES = ("x0", "x1", "w0", "b0", "w1", "b1")


def check_all(sizes, rank, args, grad, dtype=torch.float32, **launch):
    """Kernel forward and backward (launchers called directly) against the reference and float64."""
    tol_f, tol_g = TOL[dtype]
    slack = 1e-6 if dtype == torch.float32 else 1e-2
    out = kb.block_merge_forward_triton(*args, sizes=sizes, rank=rank, **launch)
    grads = kb.block_merge_backward_triton(grad, *args, sizes=sizes, rank=rank, **launch)
    ref_out, ref_grads = ref_with_grads(args, grad, sizes, rank, fn=lambda *a, **k: kb._reference(
        *a, k["sizes"], k["rank"], True))
    t_out, t_grads = ref_with_grads(args, grad, sizes, rank, dtype=torch.float64)
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    check_close(out, ref_out, t_out, tol_f, slack, "out")
    for name, g, rg, tg, a in zip(NAMES, grads, ref_grads, t_grads, args):
        assert g.dtype == a.dtype and g.shape == a.shape, name
        check_close(g, rg, tg, tol_g, slack, f"d{name}")
    return out, grads


# ------------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("rank", [1, 15])
def test_reference_against_float64(rank):
    sizes = block_chunk_sizes(MM, CHUNKS)
    args, grad = make_inputs(37, sizes, rank, seed=10 + rank)
    truth = merge_float64(*args, sizes, rank)
    ref64 = block_merge_reference(*(a.double() for a in args), sizes=sizes, rank=rank)
    torch.testing.assert_close(ref64, truth, rtol=1e-12, atol=1e-12)  # the same function, computed twice
    ref_out, ref_grads = ref_with_grads(args, grad, sizes, rank)
    assert rel_err(ref_out, truth) < 1e-5
    ind_out, ind_grads = ref_with_grads(args, grad, sizes, rank, fn=lambda *a, sizes, rank: merge_float64(
        *a, sizes, rank), dtype=torch.float64)
    t_out, t_grads = ref_with_grads(args, grad, sizes, rank, dtype=torch.float64)
    for name, g, ig, tg in zip(NAMES, ref_grads, ind_grads, t_grads):
        torch.testing.assert_close(tg, ig, rtol=1e-9, atol=1e-9, msg=f"d{name}: reference != einsum in float64")
        assert rel_err(g, tg) < 1e-4, f"d{name}: float32 reference vs float64 {rel_err(g, tg):.2e}"


def test_chunk_sizes_uneven_last():
    assert block_chunk_sizes(MM, CHUNKS) == [12] * 6 + [11]
    assert block_chunk_sizes(256, 18) == [15] * 17 + [1]
    assert block_chunk_sizes(1600, 20) == [80] * 20


# ------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("batch", [1, 37])
@pytest.mark.parametrize("rank", [1, 15])
def test_kernel_forward_backward(batch, rank):
    sizes = block_chunk_sizes(MM, CHUNKS)
    args, grad = make_inputs(batch, sizes, rank, seed=100 * batch + rank)
    check_all(sizes, rank, args, grad)


def test_kernel_several_batch_tiles_and_padding():
    """GPU tile shapes forced: BLOCK_B=16 gives 3 batch tiles (the last partial) for B=37; BLOCK_S=32 pads chunks
    of 12 with 20 masked lanes, and with BLOCK_J=16 the weight-gradient grid has an empty row tile per chunk."""
    sizes = block_chunk_sizes(MM, CHUNKS)
    args, grad = make_inputs(37, sizes, 3, seed=7)
    check_all(sizes, 3, args, grad, block_b=16, block_s=32, block_j=16)


def test_kernel_irregular_chunk_sizes():
    """Arbitrary per-chunk sizes and offsets (block.bootstrap's redistributed sizes are not uniform either); the
    chunk of 20 spans two row tiles of 16 (the epilogue's two sweeps, the second tile partial); B=19 > BLOCK_B."""
    sizes = [20, 5, 16, 1, 3]
    args, grad = make_inputs(19, sizes, 2, seed=8)
    check_all(sizes, 2, args, grad, block_b=16)
    args, grad = make_inputs(19, sizes, 2, seed=9, dtype=torch.float16)
    check_all(sizes, 2, args, grad, dtype=torch.float16)  # the fp32 scratch of a 16-bit output


@pytest.mark.parametrize("rank", [1, 4])
def test_kernel_z_exactly_zero(rank):
    """Signed sqrt at z == 0: autograd of the reference gives 0 there (relu masks sqrt's inf); so must the kernel.

    (a) a zero row of x0 in chunk 2 with chunk 2's b0 zero: y0 = 0, the whole chunk's z = 0, its norm 0 < eps;
    (b) zero rows of chunk 4's W0 and b0 at j in {1, 5} for every r: z[:, j] = 0 for every sample, norm > 0."""
    sizes = block_chunk_sizes(MM, CHUNKS)
    args, grad = make_inputs(37, sizes, rank, seed=20 + rank)
    x0, x1, w0, b0, w1, b1 = args
    col2, s = 2 * 12, 12
    x0[5, col2:col2 + s] = 0
    b0[rank * col2: rank * (col2 + s)] = 0
    w_off4, b_off4 = rank * 4 * s * s, rank * 4 * s
    zeroed = [b_off4 + r * s + j for r in range(rank) for j in (1, 5)]
    b0[zeroed] = 0
    for i in zeroed:
        row = i - b_off4
        w0[w_off4 + row * s: w_off4 + (row + 1) * s] = 0
    ref_out, ref_grads = ref_with_grads(args, grad, sizes, rank)
    assert all(torch.isfinite(g).all() for g in ref_grads)
    out, grads = check_all(sizes, rank, args, grad)
    assert (out[5, col2:col2 + s] == 0).all() and (out[:, 4 * s + 1] == 0).all()
    dx0, dx1, dw0, db0, dw1, db1 = grads
    assert (dx0[5, col2:col2 + s] == 0).all() and (dx1[5, col2:col2 + s] == 0).all()
    assert (db0[zeroed] == 0).all() and (ref_grads[3][zeroed] == 0).all()
    assert (db1[zeroed] == 0).all() and (ref_grads[5][zeroed] == 0).all()


def test_kernel_float16_and_mixed_weights():
    """float16 activations with float16 weights, and with float32 (AMP master) weights: fp32 accumulation."""
    sizes = block_chunk_sizes(MM, CHUNKS)
    args, grad = make_inputs(37, sizes, 4, seed=30, dtype=torch.float16)
    check_all(sizes, 4, args, grad, dtype=torch.float16)
    args, grad = make_inputs(37, sizes, 4, seed=31, dtype=torch.float16, w_dtype=torch.float32)
    out, grads = check_all(sizes, 4, args, grad, dtype=torch.float16)
    assert out.dtype == torch.float16 and grads[2].dtype == torch.float32


@cuda_only
def test_kernel_bfloat16_gpu():
    sizes = block_chunk_sizes(1600, 20)
    args, grad = make_inputs(64, sizes, 15, seed=32, dtype=torch.bfloat16)
    check_all(sizes, 15, args, grad, dtype=torch.bfloat16)
    args, grad = make_inputs(64, sizes, 15, seed=33, dtype=torch.bfloat16, w_dtype=torch.float32)
    check_all(sizes, 15, args, grad, dtype=torch.bfloat16)


@cuda_only
@pytest.mark.parametrize("config", [(1600, 20, 15), (256, 18, 15)])
def test_kernel_paper_shapes_gpu(config):
    mm, chunks, rank = config
    sizes = block_chunk_sizes(mm, chunks)
    args, grad = make_inputs(256, sizes, rank, seed=34)
    check_all(sizes, rank, args, grad)


def test_kernel_without_normalisation():
    """``block_merge_sum`` (pos_norm='after_cat'): the raw rank sums and their gradients."""
    sizes = block_chunk_sizes(MM, CHUNKS)
    args, grad = make_inputs(37, sizes, 3, seed=40)
    out = kb.block_merge_forward_triton(*args, sizes=sizes, rank=3, normalize=False)
    grads = kb.block_merge_backward_triton(grad, *args, sizes=sizes, rank=3, normalize=False)
    ref_out, ref_grads = ref_with_grads(args, grad, sizes, 3, fn=kb.block_merge_sum_reference)
    t_out, t_grads = ref_with_grads(args, grad, sizes, 3, fn=kb.block_merge_sum_reference, dtype=torch.float64)
    check_close(out, ref_out, t_out, 1e-5, 1e-6, "z")
    for name, g, rg, tg in zip(NAMES, grads, ref_grads, t_grads):
        check_close(g, rg, tg, 1e-4, 1e-6, f"d{name}")


def test_kernel_expanded_gradient():
    """Under compile the output gradient can arrive as a stride-0 view: the launcher must not misread it."""
    sizes = block_chunk_sizes(MM, CHUNKS)
    args, _ = make_inputs(9, sizes, 2, seed=50)
    row = torch.randn(1, MM, generator=torch.Generator().manual_seed(51)).to(DEVICE)
    expanded = row.expand(9, MM)
    assert expanded.stride(0) == 0
    got = kb.block_merge_backward_triton(expanded, *args, sizes=sizes, rank=2)
    want = kb.block_merge_backward_triton(expanded.contiguous(), *args, sizes=sizes, rank=2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    _, ref = ref_with_grads(args, expanded.contiguous(), sizes, 2)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)


def test_launcher_checks():
    sizes = block_chunk_sizes(MM, CHUNKS)
    args, _ = make_inputs(4, sizes, 2, seed=60)
    with pytest.raises(ValueError, match=">= 16"):
        kb.block_merge_forward_triton(*args, sizes=sizes, rank=2, block_b=8)
    with pytest.raises(ValueError, match=">= 16"):
        kb.block_merge_forward_triton(*args, sizes=sizes, rank=2, block_s=8, block_b=16)
    wide, _ = make_inputs(4, [40, 43], 2, seed=61)
    with pytest.raises(ValueError, match="power of two"):
        kb.block_merge_forward_triton(*wide, sizes=[40, 43], rank=2, block_s=32, block_b=16)
    with pytest.raises(ValueError, match="elements"):
        kb.block_merge_forward_triton(*args, sizes=sizes, rank=3)
    with pytest.raises(ValueError, match="features"):
        kernels.block_merge(*args, sizes=[12] * 6 + [10], rank=2)
    empty = kb.block_merge_forward_triton(*(a[:0] if i < 2 else a for i, a in enumerate(args)), sizes=sizes, rank=2)
    assert empty.shape == (0, MM)


# ------------------------------------------------------------------------------------- op and dispatch
def test_op_runs_triton_when_forced(monkeypatch):
    """``kernels.block_merge`` (the torch.library op) takes the Triton path under CMC_FAST_KERNELS=triton, forward
    and backward, with the reference's results."""
    monkeypatch.setenv("CMC_FAST_KERNELS", "triton")
    calls = []
    for name in ("block_merge_forward_triton", "block_merge_backward_triton"):
        fn = getattr(kb, name)
        monkeypatch.setattr(kb, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    sizes = block_chunk_sizes(MM, CHUNKS)
    args, grad = make_inputs(37, sizes, 3, seed=70)
    leaves = [a.clone().requires_grad_() for a in args]
    out = kernels.block_merge(*leaves, sizes=sizes, rank=3)
    grads = torch.autograd.grad(out, leaves, grad)
    assert calls == ["block_merge_forward_triton", "block_merge_backward_triton"]
    ref_out, ref_grads = ref_with_grads(args, grad, sizes, 3)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-4 * rg.abs().max().item())


def test_interpreter_problem_names_old_triton_with_new_numpy(monkeypatch):
    """Triton < 3.7's interpreter cannot take loop bounds from memory under numpy >= 2.4: detected by probing
    numpy, named in a RuntimeError from the op instead of a TypeError deep in the interpreter."""
    import numpy as np
    import triton
    from cmc_fast.kernels import dispatch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            int(np.zeros(1))
        strict_numpy = False
    except TypeError:
        strict_numpy = True
    for version, expect in (("3.6.0", strict_numpy), ("3.7.0", False), ("3.8.0+git1", False)):
        monkeypatch.setattr(triton, "__version__", version)
        dispatch.interpreter_problem.cache_clear()
        problem = dispatch.interpreter_problem()
        assert bool(problem) == expect, (version, problem)
        if problem:
            assert version in problem and "triton >= 3.7" in problem
    if strict_numpy and DEVICE == "cpu":
        monkeypatch.setattr(triton, "__version__", "3.6.0")
        dispatch.interpreter_problem.cache_clear()
        monkeypatch.setenv("CMC_FAST_KERNELS", "triton")
        sizes = block_chunk_sizes(MM, CHUNKS)
        args, _ = make_inputs(4, sizes, 3, seed=71)
        with pytest.raises(RuntimeError, match="numpy >= 2.4 refuses"):
            kernels.block_merge(*args, sizes=sizes, rank=3)
    dispatch.interpreter_problem.cache_clear()


def test_op_cpu_is_the_reference(monkeypatch):
    """On CPU tensors (auto) the op is the reference: the same values and the reference's own autograd."""
    monkeypatch.setenv("CMC_FAST_KERNELS", "reference")
    sizes = block_chunk_sizes(MM, CHUNKS)
    args, grad = make_inputs(37, sizes, 15, seed=80)
    args = [a.cpu() for a in args]
    leaves = [a.clone().requires_grad_() for a in args]
    out = kernels.block_merge(*leaves, sizes=sizes, rank=15)
    grads = torch.autograd.grad(out, leaves, grad.cpu())
    ref_out, ref_grads = ref_with_grads(args, grad.cpu(), sizes, 15)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-6, atol=1e-6 * rg.abs().max().item())


@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_opcheck(monkeypatch, mode):
    """torch.library's own checks: schema, fake tensor, autograd registration, AOT dispatch."""
    monkeypatch.setenv("CMC_FAST_KERNELS", mode)
    sizes = [5, 4]
    args, _ = make_inputs(3, sizes, 2, seed=90)
    leaves = [a.clone().requires_grad_() for a in args]
    torch.library.opcheck(torch.ops.cmc_fast.block_merge.default, (*leaves, sizes, 2, True))


def test_compiled_fullgraph_with_expanded_grad(monkeypatch):
    """torch.compile(fullgraph=True) over the op with the Triton path forced: no graph break, fake tensors and AOT
    autograd through the registration, and ``.sum()``'s backward hands the kernel an expanded (stride-0) gradient.
    (backend aot_eager: Inductor's CPU codegen adds a minute here and nothing for this op, which stays opaque;
    tests/test_fusion.py compiles a whole stage-2 step with Inductor.)"""
    monkeypatch.setenv("CMC_FAST_KERNELS", "triton")
    strides = []
    fn = kb.block_merge_backward_triton
    monkeypatch.setattr(kb, "block_merge_backward_triton", lambda g, *a, **k: strides.append(g.stride()) or fn(
        g, *a, **k))
    torch._dynamo.reset()
    sizes = block_chunk_sizes(MM, CHUNKS)
    args, _ = make_inputs(8, sizes, 2, seed=95)

    def f(*a):
        return kernels.block_merge(*a, sizes=sizes, rank=2).sum()

    leaves = [a.clone().requires_grad_() for a in args]
    grads = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves), leaves)
    assert strides and 0 in strides[-1], f"expected an expanded gradient, got strides {strides}"
    _, want = ref_with_grads(args, torch.ones(8, MM, device=DEVICE), sizes, 2)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * w.abs().max().item())
    torch._dynamo.reset()


def test_floor_formula():
    sizes = block_chunk_sizes(1600, 20)
    fwd = kb.block_merge_floor(64, sizes, 15)
    both = kb.block_merge_floor(64, sizes, 15, backward=True)
    assert fwd == pytest.approx(4 * 64 * 15 * 20 * 80 * 80 / 60e12)
    assert both == pytest.approx(3 * fwd)


# ------------------------------------------------------------------------------- GPU build, without a GPU
_HOPPER_BUILD = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)  # code generation does not work in interpreter mode
import cmc_fast.kernels.block as kb
from cmc_fast.kernels.hopper_build import build_checked

PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
for x_dtype, w_dtype, max_size in [("fp32", "fp32", 80), ("bf16", "fp32", 80), ("fp16", "fp16", 15)]:
    bb, bs, bj, warps = kb._tiles(64, max_size, None, None, None)
    prec = "tf32" if max_size == 15 else "ieee"
    xp, wp = PTR[x_dtype], PTR[w_dtype]
    types = {"X0": xp, "X1": xp, "OUT": xp, "G": xp, "DX0": xp, "DX1": xp, "T": "*fp32", "DZ": "*fp32",
             "META": "*i64", **{n: wp for n in ("W0", "B0", "W1", "B1", "DW0", "DB0", "DW1", "DB1")}}
    for fn, normalize in ((kb._block_fwd_kernel, True), (kb._block_fwd_kernel, False),
                          (kb._block_bwd_dx_kernel, True), (kb._block_bwd_dw_kernel, None)):
        consts = {"BLOCK_B": bb, "BLOCK_S": bs, "BLOCK_J": bj, "PREC": prec, "NORMALIZE": normalize}
        build_checked(fn, types, {k: v for k, v in consts.items() if k in fn.arg_names}, warps)
print("BUILD OK")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real in the tests above")
def test_kernels_compile_for_hopper(run_without_interpreter):
    """The interpreter checks neither tl.dot's 16-minimum nor types across branches nor resources: compile the
    four kernel variants for sm_90 (Triton's bundled ptxas; no GPU needed) with the launcher's tiles for B=64
    (fp32 with chunks of 80, bf16 activations with fp32 weights, fp16 with chunks of 15) and check each fits a
    block's 227 KiB of shared memory and spills no register."""
    assert "BUILD OK" in run_without_interpreter(_HOPPER_BUILD)
