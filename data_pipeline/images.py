"""Image decoding to the training batch contract.

``decode_uint8(paths, size)`` -> ``ImageBatch``: uint8 [n, 3, H, W] resized directly to ``size`` = (H, W)
with bicubic interpolation (the authors' geometry: no crop, aspect ratio not kept), a ``ok`` mask of
which samples decoded and, for each that did not, its error. ``normalize`` applies ImageNet statistics.
A bad image never raises: it is reported and its slot is left zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageBatch:
    pixels: torch.Tensor  # uint8 [n, 3, H, W] or float [n, 3, H, W] once normalised
    ok: torch.Tensor  # bool [n]
    errors: dict[int, str] = field(default_factory=dict)  # position -> "path: what went wrong"


def _decode_pil(path: str, size: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def decode_uint8(paths: Sequence[str | None], size: tuple[int, int]) -> ImageBatch:
    """Decode and resize each path with PIL; ``None`` entries (no image) are reported as missing."""
    h, w = size
    out = torch.zeros((len(paths), 3, h, w), dtype=torch.uint8)
    ok = torch.zeros(len(paths), dtype=torch.bool)
    errors: dict[int, str] = {}
    for i, path in enumerate(paths):
        if path is None:
            errors[i] = "no image"
            continue
        try:
            out[i] = torch.from_numpy(_decode_pil(path, size))
            ok[i] = True
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-sample report
            errors[i] = f"{path}: {type(exc).__name__}: {exc}"
    return ImageBatch(out, ok, errors)


def normalize(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [n, 3, H, W] -> ImageNet-normalised float, on the tensor's device."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device, dtype=dtype).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=pixels.device, dtype=dtype).view(1, 3, 1, 1) * 255.0
    return (pixels.to(dtype) - mean) / std
