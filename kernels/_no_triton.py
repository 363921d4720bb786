"""A stand-in for ``triton`` where it cannot be installed (it ships for Linux only: macOS and Windows users run
the PyTorch references). With it the kernel definitions of this package evaluate, so the ops, their fake and
autograd registrations and the references import as usual; nothing here can launch, and
``dispatch.use_triton`` never picks a kernel while Triton is missing."""

from __future__ import annotations


def _passthrough(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:  # bare @jit
        return args[0]
    return lambda fn: fn  # @jit(...), @autotune(...), @heuristics(...)


jit = autotune = heuristics = _passthrough


class Config:
    def __init__(self, kwargs=None, num_warps=4, num_stages=1, **options):
        self.kwargs, self.num_warps, self.num_stages = dict(kwargs or {}), num_warps, num_stages


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Missing:
    """``tl.<anything>`` and ``libdevice.<anything>``: fine to name at definition time, an error if called."""

    def __getattr__(self, name: str):
        return self

    def __call__(self, *args, **kwargs):
        raise RuntimeError("Triton is not installed: this op runs its PyTorch reference (CMC_FAST_KERNELS=auto)")


language = libdevice = _Missing()
__version__ = "0 (not installed)"
