"""Small launch helpers shared by the Triton ops."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # Triton ships for Linux only: elsewhere every op runs its reference
    from . import _no_triton as triton

    tl = libdevice = triton.language


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
