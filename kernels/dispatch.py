"""Which implementation an op runs: Triton for CUDA tensors, the PyTorch reference for CPU tensors.

``CMC_FAST_KERNELS=triton|reference|auto`` (default ``auto``) overrides it; ``bmm`` forces BLOCK's batched-bmm path
(``kernels.block_plan.choose_block_path``) and means ``auto`` for the other ops. ``triton`` on CPU tensors only
works under ``TRITON_INTERPRET=1`` (set before importing ``cmc_fast.kernels``): that is how the kernels are tested on
machines without a GPU.

``CMC_FAST_CHECK_INDEX=1`` is a debug switch: the Triton launchers then check every gather index against the bank's
rows before launching (a clear IndexError instead of an out-of-bounds read; it costs a device sync per call, so it is
off by default). The reference paths always check.
"""

from __future__ import annotations

import functools
import os
import re
import warnings

import torch

if __package__ != "cmc_fast.kernels":
    # `import kernels.nce` with a checkout's root on sys.path would load a second copy of the op modules, and a
    # second registration of the cmc_fast:: custom ops leaves the first copy's handles dangling (random crashes).
    raise ImportError(f"{__name__}: the folder kernels/ is the package cmc_fast.kernels; import it by that name")

_CHOICES = ("auto", "triton", "reference", "bmm")


def kernel_mode() -> str:
    mode = os.environ.get("CMC_FAST_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _CHOICES:
        raise ValueError(f"CMC_FAST_KERNELS={mode!r} is not one of {', '.join(_CHOICES)}")
    return mode


def index_checks() -> bool:
    """CMC_FAST_CHECK_INDEX=1: the Triton launchers validate gather indices (debug switch, see the module doc)."""
    return os.environ.get("CMC_FAST_CHECK_INDEX", "0") not in ("", "0")


def check_index_range(idx: torch.Tensor, n: int, *, sync: bool) -> None:
    """A clear IndexError for an index outside [0, N). ``sync=False`` (the reference path by default) asserts
    without a host sync: on the CPU the assert fails at once and the culprit is then named; on a GPU it is a
    device-side assert at the next sync -- never silent, where a negative index would otherwise wrap around.
    ``sync=True`` (CMC_FAST_CHECK_INDEX=1) reads the range on the host, naming the culprit on every device."""
    if idx.numel() == 0:
        return
    if not sync:
        try:
            torch._assert_async(((idx >= 0) & (idx < n)).all(), f"idx holds values outside the bank's {n} rows")
            return
        except RuntimeError:  # raised at once on the CPU: name the culprit below
            pass
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise IndexError(f"idx holds {bad}, outside the bank's {n} rows (valid: 0 to {n - 1})")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run these kernels here, or None. Before 3.7 it turns a loop bound loaded from
    memory into an int with ``int()`` of a 1-element array, which numpy >= 2.4 refuses (a TypeError mid-kernel);
    compiled GPU kernels are not affected."""
    import numpy as np
    import triton

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy 1.25-2.3 only warn
        try:
            int(np.zeros(1))
            return None
        except TypeError:
            pass
    if tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2]) >= (3, 7):
        return None
    return (f"Triton {triton.__version__}'s interpreter cannot run these kernels with numpy {np.__version__} (it "
            "converts 1-element arrays with int(), which numpy >= 2.4 refuses): use triton >= 3.7 or numpy < 2.4 "
            "for TRITON_INTERPRET=1, or CMC_FAST_KERNELS=reference")


def use_triton(t: torch.Tensor) -> bool:
    """True when the op on tensor ``t`` should run its Triton kernel."""
    mode = kernel_mode()
    if mode == "reference":
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("CMC_FAST_KERNELS=triton but triton is not installed (pip install triton)")
        if t.device.type != "cuda":
            if not triton_interpreted():
                raise RuntimeError(
                    "CMC_FAST_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 set before importing kernels")
            problem = interpreter_problem()
            if problem:
                raise RuntimeError(problem)
        return True
    return t.device.type == "cuda" and triton_available()
