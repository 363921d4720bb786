"""Which implementation an op runs: Triton for CUDA tensors, the PyTorch reference for CPU tensors.

``CMC_FAST_KERNELS=triton|reference|auto`` (default ``auto``) overrides it. ``triton`` on CPU tensors only
works under ``TRITON_INTERPRET=1`` (set before importing ``kernels``): that is how the kernels are tested on
machines without a GPU.
"""

from __future__ import annotations

import os

import torch

_CHOICES = ("auto", "triton", "reference")


def kernel_mode() -> str:
    mode = os.environ.get("CMC_FAST_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _CHOICES:
        raise ValueError(f"CMC_FAST_KERNELS={mode!r} is not one of {', '.join(_CHOICES)}")
    return mode


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """True when the op on tensor ``t`` should run its Triton kernel."""
    mode = kernel_mode()
    if mode == "reference":
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("CMC_FAST_KERNELS=triton but triton is not installed (pip install triton)")
        if t.device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                "CMC_FAST_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 set before importing kernels")
        return True
    return t.device.type == "cuda" and triton_available()
