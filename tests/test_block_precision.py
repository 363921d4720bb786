"""float32 at "highest" runs the fused BLOCK kernels' dots as 3xTF32 (``tl.dot(input_precision="tf32x3")``, see
``kernels.block_plan.dot_precision``). Does that keep PyTorch's "highest" promise (float32 accuracy)? The CPU
interpreter computes every float32 dot in float32 whatever the precision, so here its dot is replaced by an
emulation of what the sm_90 code computes: TF32 keeps 10 of float32's 23 mantissa bits (the tensor cores read
the top 19 bits of a register: truncation); "tf32x3" is Triton's split (``F32DotTC``): big = cvt.rna.tf32(a)
(nearest, ties away), small = a - big (exact), then small*big + big*small + big*big, three TF32 products summed in
float32 (small*small dropped). Products of two TF32 values are exact in float32, so the emulation's only other
rounding is float32 accumulation; the tensor cores' own accumulation order is not modelled (owed to a GPU).

Each check: the kernels' forward and six gradients against the float64 oracle, within FACTOR x the error of
PyTorch's float32 reference (CPU, "highest") on the same data -- the bar the other float32 tests use -- and, so the
emulation is seen to bite, plain TF32 under the same emulation several times further off.
"""

from __future__ import annotations

import cmc_fast.kernels.block as kb
import cmc_fast.kernels.block_plan as kp
import numpy as np
import pytest
import torch
from cmc_fast.kernels.reference import block_chunk_sizes
from test_block_kernel import check_all, fro_err, make_inputs, ref_with_grads  # pytest puts tests/ on the path

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="emulates the interpreter's dot (CPU only)")

_LOW13 = np.uint32(0x1FFF)


def _tf32_truncate(a: np.ndarray) -> np.ndarray:
    """What a TF32 tensor-core operand keeps of a float32 register: the top 19 bits."""
    return (np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) & ~_LOW13).view(np.float32)


def _tf32_round(a: np.ndarray) -> np.ndarray:
    """cvt.rna.tf32.f32: nearest TF32 value, ties away from zero (a carry into the exponent is the right result)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & ~_LOW13).view(np.float32)


def _emulated_matmul(a: np.ndarray, b: np.ndarray, acc: np.ndarray, precision: str) -> np.ndarray:
    """acc + a @ b as the sm_90 code computes it at ``precision`` ("tf32" or "tf32x3"), float32 throughout."""
    if precision == "tf32x3":
        a_big, b_big = _tf32_round(a), _tf32_round(b)
        a_small, b_small = _tf32_truncate(a - a_big), _tf32_truncate(b - b_big)
        small = np.matmul(a_small, b_big, dtype=np.float32) + np.matmul(a_big, b_small, dtype=np.float32)
        return np.matmul(a_big, b_big, dtype=np.float32) + (acc + small)
    return np.matmul(_tf32_truncate(a), _tf32_truncate(b), dtype=np.float32) + acc


def _emulated_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import TensorHandle

    names = {ir.INPUT_PRECISION.TF32: "tf32", ir.INPUT_PRECISION.TF32x3: "tf32x3"}
    if a.data.dtype != np.float32 or b.data.dtype != np.float32 or input_precision not in names:
        return _ORIGINAL_DOT(self, a, b, d, input_precision, max_num_imprecise_acc)
    out = _emulated_matmul(a.data, b.data, d.data.astype(np.float32), names[input_precision])
    return TensorHandle(out.astype(np.float32), d.dtype.scalar)


_ORIGINAL_DOT = None


@pytest.fixture
def emulated_tf32(monkeypatch):
    """The interpreter's dot computes TF32 and 3xTF32 as the sm_90 code does (see the module docstring)."""
    global _ORIGINAL_DOT
    from triton.runtime import interpreter

    _ORIGINAL_DOT = interpreter.InterpreterBuilder.create_dot
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", _emulated_dot)


def _errors(sizes, rank, batch, seed, precision):
    """Forward and gradient errors (Frobenius, against float64) of the kernels under ``precision``."""
    args, grad = make_inputs(batch, sizes, rank, seed=seed)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        out, t, norm = kb.block_merge_forward_triton(*args, sizes=sizes, rank=rank)
        grads = kb.block_merge_backward_triton(grad, *args, t, norm, sizes=sizes, rank=rank)
    finally:
        torch.set_float32_matmul_precision(before)
    truth, truth_grads = ref_with_grads(args, grad, sizes, rank, dtype=torch.float64)
    return [fro_err(out, truth)] + [fro_err(g, tg) for g, tg in zip(grads, truth_grads)]


def test_emulation_is_tf32():
    """The emulated dot itself: TF32 of known values, and 3xTF32 of random matrices within float32's error of
    float64 while TF32 is ~2^-11 off."""
    assert _tf32_round(np.float32([1 + 2 ** -11, 1 + 3 * 2 ** -12, -(1 + 2 ** -11)])).tolist() == [
        1 + 2 ** -10, 1 + 2 ** -10, -(1 + 2 ** -10)]  # ties away from zero, 3/4 of an ulp up
    assert _tf32_truncate(np.float32([1 + 3 * 2 ** -12, -(1 + 2 ** -9 + 2 ** -11)])).tolist() == [1, -(1 + 2 ** -9)]
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((32, 64), dtype=np.float32), rng.standard_normal((64, 32), dtype=np.float32)
    truth = a.astype(np.float64) @ b.astype(np.float64)
    zero = np.zeros((32, 32), np.float32)
    errs = {p: np.abs(_emulated_matmul(a, b, zero, p) - truth).max() / np.abs(truth).max()
            for p in ("tf32", "tf32x3")}
    fp32 = np.abs((a @ b) - truth).max() / np.abs(truth).max()
    assert errs["tf32x3"] <= 4 * fp32 + 1e-7, (errs, fp32)
    assert errs["tf32"] >= 30 * errs["tf32x3"], errs


CASES = {
    "83-7": (block_chunk_sizes(83, 7), 4, 37),  # six chunks of 12 and one of 11, a partial batch tile
    "24-40": ([24, 40], 15, 37),  # unequal chunks of a common 8 (ALIGN 8)
    "256-18": (block_chunk_sizes(256, 18), 15, 20),  # chunks of 15 and a last of 1 (ALIGN 1, META sizes)
}


@pytest.mark.parametrize("case", list(CASES))
def test_tf32x3_meets_highest(emulated_tf32, case):
    """The kernels at "highest" (3xTF32, dx split over two programs) forward and backward against float64: within
    the float32 tests' bar of PyTorch's float32 reference; plain TF32 ("high") is several times further off in the
    forward, so the emulation tells them apart."""
    sizes, rank, batch = CASES[case]
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        assert kp.dot_precision(torch.float32) == "tf32x3"
        args, grad = make_inputs(batch, sizes, rank, seed=300 + len(sizes))
        check_all(sizes, rank, args, grad)  # the launchers' own plan: 3xTF32 tiles, dx_split 2
    finally:
        torch.set_float32_matmul_precision(before)
    x3 = _errors(sizes, rank, batch, 300 + len(sizes), "highest")
    tf32 = _errors(sizes, rank, batch, 300 + len(sizes), "high")
    assert tf32[0] >= 10 * x3[0], (x3, tf32)


@pytest.mark.slow
def test_tf32x3_gpu_plan_1600(emulated_tf32):
    """BLOCK's default shape (chunks of 80 at compile time) with the sm_90 plan's tiles (interpreted=False), 3xTF32
    emulated: forward and gradients against float64 within the float32 bar."""
    sizes, rank, batch = block_chunk_sizes(1600, 20), 15, 64
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        args, grad = make_inputs(batch, sizes, rank, seed=161)
        check_all(sizes, rank, args, grad, interpreted=False, tf32x3=True)
    finally:
        torch.set_float32_matmul_precision(before)
