"""Which image decoder runs: what is installed here and what ``auto`` picks.

- ``pil``: Pillow; the plain baseline and the fallback of the others.
- ``torchvision``: ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA, libjpeg-turbo on the CPU).
- ``dali``: an NVIDIA DALI pipeline (nvJPEG on CUDA, libjpeg-turbo on the CPU). Optional:
  ``pip install cmc-fast[dali]``.
- ``auto``: on CUDA ``dali`` when it is importable and a pipeline builds there, else ``torchvision``; on the CPU
  ``torchvision`` (else ``pil``). DALI's CPU pipeline is not chosen automatically: its bicubic ``fn.resize`` costs
  more CPU than decoding, and on the 2-core development machine the whole pipeline took ~2x torchvision's CPU time
  per image (see bench/).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .decoders import DaliUnusableError, dali_pipeline, dali_unusable_reason

BACKENDS = ("auto", "dali", "torchvision", "pil")


@functools.lru_cache(maxsize=1)
def dali_available() -> bool:
    """True when ``nvidia.dali`` imports (the optional ``dali`` extra)."""
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return False
    try:
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


@functools.lru_cache(maxsize=1)
def torchvision_available() -> bool:
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
        from torchvision.transforms.v2.functional import resize  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def available_backends() -> list[str]:
    """Concrete backends installed here, in ``auto``'s order of preference on CUDA."""
    return [b for b, ok in (("dali", dali_available()), ("torchvision", torchvision_available()), ("pil", True))
            if ok]


def _dali_builds_on(device: torch.device) -> bool:
    """Whether a DALI pipeline builds on this CUDA device: one small pipeline, built once per process and device
    (``decoders.dali_pipeline`` keeps it, or marks DALI unusable and raises at once from then on)."""
    try:
        dali_pipeline((8, 8, 1, device.index if device.index is not None else 0, False, 1))
        return True
    except DaliUnusableError:
        return False


def resolve_backend(name: str, device: torch.device | str | None = None) -> str:
    """``auto`` -> on CUDA ``dali`` when installed, else ``torchvision``; on the CPU ``torchvision``; ``pil`` when
    neither works. An explicitly named backend that is not installed raises ImportError saying how to get it."""
    key = (name or "auto").lower()
    if key not in BACKENDS:
        raise ValueError(f"unknown image backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if key == "auto":
        cuda = device is not None and torch.device(device).type == "cuda"
        usable = available_backends()
        if cuda and usable[0] == "dali" and not _dali_builds_on(torch.device(device)):
            usable = usable[1:]
        return next(b for b in usable if cuda or b != "dali")
    if key == "dali" and not dali_available():
        raise ImportError("image backend 'dali' needs NVIDIA DALI: pip install 'cmc-fast[dali]' "
                          "(nvidia-dali-cuda130), or use --image-backend torchvision / auto")
    if key == "dali" and dali_unusable_reason(device):
        raise DaliUnusableError(dali_unusable_reason(device))
    if key == "torchvision" and not torchvision_available():
        raise ImportError("image backend 'torchvision' needs torchvision.io.decode_jpeg, which this "
                          "torchvision lacks; use --image-backend pil")
    return key
