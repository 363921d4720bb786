"""A stand-in for ``triton`` where it cannot be installed (it ships for Linux only: macOS and Windows users run
the PyTorch references). With it the kernel definitions of this package evaluate, so the ops, their fake and
autograd registrations and the references import as usual; nothing here can launch, and
``dispatch.use_triton`` never picks a kernel while Triton is missing."""

from __future__ import annotations


def jit(fn=None, **kwargs):
    """``@triton.jit`` and ``@triton.jit(...)``: the function itself (the package's kernels use nothing else of
    Triton at definition time)."""
    return fn if fn is not None else (lambda f: f)


class _Missing:
    """``tl.<anything>`` and ``libdevice.<anything>``: fine to name at definition time, an error if called."""

    def __getattr__(self, name: str):
        return self

    def __call__(self, *args, **kwargs):
        raise RuntimeError("Triton is not installed: this op runs its PyTorch reference (CMC_FAST_KERNELS=auto)")


language = libdevice = _Missing()
__version__ = "0 (not installed)"
