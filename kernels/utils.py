"""Small launch helpers shared by the Triton ops."""

from __future__ import annotations

import contextlib
import functools

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # Triton ships for Linux only: elsewhere every op runs its reference
    from . import _no_triton as triton

    tl = libdevice = triton.language


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host integers (``triton.cdiv`` without needing Triton)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def launch_settings(n: int, max_block: int = 65536) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for a row of ``n`` elements handled by one program (Liger's heuristic)."""
    block = next_power_of_2(n)
    if block > max_block:
        raise ValueError(f"row of {n} elements exceeds the largest block ({max_block})")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


def contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every launcher passes its inputs through this: under torch.compile a gradient can arrive as an
    expanded (stride-0) view, which a kernel indexing contiguous memory would silently misread."""
    return tuple(t if t.is_contiguous() else t.contiguous() for t in tensors)


def device_guard(t: torch.Tensor):  # (anything with a torch.device ``device``)
    """``t``'s CUDA device made current for a launch: Triton launches on the current device, not its tensors', so a
    data-parallel rank whose tensors sit on cuda:1 would launch on cuda:0 and fault. Nothing for CPU tensors
    (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def on_tensor_device(launcher):
    """Decorator for a Triton launcher: it runs under ``device_guard`` of its first tensor argument (the first
    argument with a ``device``)."""

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        first = next(a for a in (*args, *kwargs.values()) if isinstance(getattr(a, "device", None), torch.device))
        with device_guard(first):
            return launcher(*args, **kwargs)

    return launch
