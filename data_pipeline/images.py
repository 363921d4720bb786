"""Image decoding to the training batch contract, with three backends: DALI, torchvision and PIL.

Contract (every backend, every device)
--------------------------------------
``decode_uint8(paths, size, backend=...)`` / ``decode(paths, size, backend=..., normalize=True)`` /
``decode_encoded(blobs, size, ...)`` -> ``ImageBatch``:

- ``pixels``: [n, 3, H, W], row i = input i (order kept). uint8 RGB from ``decode_uint8``; float, ImageNet
  normalised (``(x - 255 * mean) / (255 * std)``) from ``decode(normalize=True)``. On ``device``.
- ``ok``: bool [n], which samples decoded. A sample that did not has an all-zero slot.
- ``errors``: position -> ``"path: what went wrong"`` for each sample that did not decode.
- ``fallback``: position -> why PIL decoded it instead of the fast backend (informational).

Geometry: the authors' direct resize of the whole image to ``size = (H, W)`` (no crop, aspect ratio not
kept), bicubic with antialiasing (the cubic kernel widened by the scale factor when shrinking) in all
three: PIL ``Image.BICUBIC``, torchvision ``InterpolationMode.BICUBIC, antialias=True``, DALI
``INTERP_CUBIC, antialias=True``. No EXIF orientation is applied (PIL's ``Image.open`` does not; DALI is told
``adjust_orientation=False``). Greyscale is replicated to three channels. On the 268 real Weibo JPEGs the three
CPU decoders (libjpeg-turbo / libjpeg) agree bit-exactly before resizing; after the resize to 224x224
torchvision matches PIL to 0.035 and DALI to 0.13 mean absolute difference in 0-255 units (max 15 and 18, on a
few sharp edges), all of it from the resamplers' kernels and rounding (tests/test_images.py asserts tolerances).

Backends (``image_backend.py`` chooses one, ``decoders.py`` holds them): ``pil``, ``torchvision``, ``dali`` and
``auto``. CPU threads: ``workers`` (default: the usable cores, at most 16) images are decoded side by side by the
PIL and torchvision CPU paths and is DALI's ``num_threads``; threads change no pixel.

Bounds: decided once, before any backend sees a byte
----------------------------------------------------
Every file goes through the image-limits gate (``image_files``: ``Limits``, ``open_image``, ``admit``): regular
files only, within ``max_bytes`` (default 64 MiB), a header within ``max_pixels`` (default 40 million) and a JPEG
within its scan budget, so a decompression bomb is refused alike by PIL, torchvision and DALI (and by
``cmc-fast data check``). Refused files get ``ok=False`` and an error naming the path and the limit
(``--max-image-bytes`` / ``--max-image-pixels``).

Bad images: never raise from a batch call
-----------------------------------------
Each input's bytes are sniffed first (``jpeg.sniff``); only clean 8-bit baseline/progressive JPEGs (1 or 3
components, a header that holds together up to the first scan, EOI at the end) go to the fast backend, and if its
batched call raises, the chunk is bisected until the failing samples are isolated (a DALI pipeline that failed on a
sample is rebuilt; one that cannot be built at all raises ``DaliUnusableError`` once, and DALI is not used again in
the process: ``auto`` then picks torchvision, after one small probe pipeline on CUDA). Everything else, and
whatever the fast backend failed on, is handed to PIL, which decodes by content. Outcomes:

============================  ======================================================================
input                         outcome
============================  ======================================================================
``None`` (no image)           ok=False, error "no image"
missing / unreadable file     ok=False, error "<path>: cannot read: FileNotFoundError: ..."
0-byte file                   ok=False, error "<path>: empty file (0 bytes)"
pipe, device, directory       ok=False, error "<path>: not a regular file (named pipe); ..." (never opened)
over the byte limit           ok=False, error "<path>: N bytes, over the byte limit of M (--max-image-bytes)"
over the pixel limit          ok=False, error "<path>: WxH pixels ... over the pixel limit ..." (not decoded)
truncated JPEG                ok=False, error "<path>: JPEG without end marker (truncated?); PIL: ..."
                              (PIL refuses truncated data; a JPEG with bytes after its end marker
                              is decoded by PIL instead)
broken JPEG header            (a segment, Huffman/quantisation table or scan header that does not hold
                              together, a second SOI) decoded by PIL, ok=False with its error if it
                              refuses; never by the fast backends (DALI 2.4's CPU decoder on several
                              threads crashed the process on such files in fuzzing)
corrupt JPEG (fast fails)     fast backend isolates it; PIL tries; ok=False with both messages if
                              PIL fails too, else decoded by PIL
damaged scan, markers intact  all decoders conceal the damage (libjpeg: "Corrupt JPEG data"): ok=True;
                              where libjpeg-turbo gives up ("broken data stream": ok=False with PIL and
                              torchvision) DALI may conceal more and return pixels (16 of 240 fuzzed)
PNG/GIF/WebP/BMP/TIFF .jpg   decoded by PIL by content (GIF: first frame; alpha dropped; 16-bit grey
                              keeps its top 8 bits), ok=True
CMYK (4-component) JPEG       decoded by PIL (CMYK -> RGB), ok=True
greyscale JPEG                decoded by the fast backend to RGB (channel replicated), ok=True
not an image at all           ok=False, error "<path>: unrecognised format; PIL: cannot identify..."
============================  ======================================================================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .decoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode_dali,
    decode_torchvision,
    each_sample,
    pil_decode,
    short_error,
    usable_cores,
)
from .image_backend import resolve_backend
from .image_files import DEFAULT_LIMITS, Admission, Limits, admit, open_image

DEFAULT_CHUNK = 64  # images per backend call (and the DALI pipeline's batch size)


@dataclass
class ImageBatch:
    pixels: torch.Tensor  # uint8 [n, 3, H, W] or float [n, 3, H, W] once normalised
    ok: torch.Tensor  # bool [n]
    errors: dict[int, str] = field(default_factory=dict)  # position -> "path: what went wrong"
    fallback: dict[int, str] = field(default_factory=dict)  # position -> why PIL decoded it
    backend: str = "pil"  # the backend that was asked for, resolved


_FAST: dict[str, Callable[..., tuple[torch.Tensor, dict[int, str]]]] = {
    "torchvision": decode_torchvision,
    "dali": decode_dali,
}

# why a sniffed kind (``jpeg.sniff``) is decoded by PIL rather than the fast backend
_PIL_REASON = {
    "jpeg-cmyk": "CMYK JPEG",
    "jpeg-no-eoi": "JPEG without end marker (truncated?)",
    "jpeg-other": "JPEG variant the fast decoders do not take",
    "png": "PNG content",
    "gif": "GIF content",
    "webp": "WebP content",
    "bmp": "BMP content",
    "tiff": "TIFF content",
    "unknown": "unrecognised format",
}


def normalize(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [n, 3, H, W] -> ImageNet-normalised float, on the tensor's device."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device, dtype=dtype).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=pixels.device, dtype=dtype).view(1, 3, 1, 1) * 255.0
    return pixels.to(dtype, copy=True).sub_(mean).div_(std)  # one buffer, two in-place passes


def assign_rows(out: torch.Tensor, positions: list[int], pixels: torch.Tensor) -> None:
    """out[positions] = pixels. On the CPU through numpy where it can: torch's OpenMP-parallel copies of a few MB
    cost more than the decode itself on a small, busy machine."""
    if out.device.type == "cpu" and out.dtype in (torch.uint8, torch.float32, torch.float16):
        if positions == list(range(positions[0], positions[0] + len(positions))):
            out.numpy()[positions[0]:positions[0] + len(positions)] = pixels.numpy()
        else:
            out.numpy()[positions] = pixels.numpy()
    else:
        out[torch.as_tensor(positions, device=out.device)] = pixels


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or int(size[0]) <= 0 or int(size[1]) <= 0:
        raise ValueError(f"size must be (H, W) with positive ints, got {size!r}")
    return int(size[0]), int(size[1])



def _route(images: Sequence[Admission], backend: str) -> tuple[dict[int, str], list[int], list[tuple[int, str]]]:
    """Where each input goes: ``errors`` (what the image-limits gate refused: one decision for every backend, before
    decoding), ``fast`` (clean JPEGs for a fast backend), ``to_pil`` ((position, why PIL) for the rest)."""
    errors: dict[int, str] = {}
    fast: list[int] = []
    to_pil: list[tuple[int, str]] = []
    for i, image in enumerate(images):
        if image.problem:
            errors[i] = image.problem
        elif image.kind == "jpeg" and backend != "pil":
            fast.append(i)
        elif image.kind == "jpeg":
            to_pil.append((i, ""))
        else:
            to_pil.append((i, _PIL_REASON.get(image.kind, f"{image.kind} content")))
    return errors, fast, to_pil


def _decode_loaded(names: Sequence[str], loaded: Sequence[Admission], size: Sequence[int], backend: str, *,
                   normalize_output: bool, device: torch.device | str | None,
                   dtype: torch.dtype, chunk: int, workers: int | None, limits: Limits | None = None,
                   out: torch.Tensor | None = None) -> ImageBatch:
    """Decode ``loaded`` (each image as the gate, ``image_files.admit``, left it) into ``out`` (allocated when
    None: zeros [n, 3, H, W])."""
    h, w = _check_size(size)
    limits = limits or DEFAULT_LIMITS
    workers = usable_cores() if workers is None else max(1, int(workers))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    name = resolve_backend(backend, dev)
    n = len(loaded)
    out_dtype = dtype if normalize_output else torch.uint8
    out = torch.zeros((n, 3, h, w), dtype=out_dtype, device=dev) if out is None else out
    ok = torch.zeros(n, dtype=torch.bool)
    fallback: dict[int, str] = {}
    errors, fast, to_pil = _route(loaded, name)

    def put(positions: list[int], pixels: torch.Tensor) -> None:
        if not positions:
            return
        if normalize_output and not pixels.is_floating_point():
            pixels = normalize(pixels.to(dev, non_blocking=True), dtype=torch.float32)
        assign_rows(out, positions, pixels.to(dev, out_dtype, non_blocking=True))
        ok[positions] = True

    if fast:
        decode_fast = _FAST[name]
        for start in range(0, len(fast), chunk):
            part = fast[start:start + chunk]
            pixels, failures = decode_fast([loaded[i].data for i in part], (h, w), dev, normalize_output, chunk,
                                            workers)
            if failures:
                good = [j for j in range(len(part)) if j not in failures]
                pixels = pixels[torch.as_tensor(good, dtype=torch.long, device=pixels.device)]
                to_pil += [(part[j], f"{name} failed: {msg}") for j, msg in failures.items()]
                part = [part[j] for j in good]
            put(part, pixels)

    if to_pil:
        to_pil.sort()
        buf = np.empty((len(to_pil), 3, h, w), dtype=np.uint8)

        def one(k: int) -> None:
            buf[k] = pil_decode(loaded[to_pil[k][0]].data, (h, w), limits)

        done: list[int] = []
        for k, result in enumerate(each_sample(one, len(to_pil), workers)):
            i, why = to_pil[k]
            if isinstance(result, Exception):
                errors[i] = f"{names[i]}: {why + '; ' if why else ''}PIL: {short_error(result)}"
                continue
            if why:
                fallback[i] = why
            done.append(k)
        put([to_pil[k][0] for k in done], torch.from_numpy(buf[done]))
    return ImageBatch(out, ok, dict(sorted(errors.items())), dict(sorted(fallback.items())), name)


# encoded bytes one decode call holds at once: files are read one at a time into groups of at most this much (a
# file larger than it forms a group alone), each decoded into its rows of the output before the next is read, so
# 64 posts naming one 50 MB file cost 50 MB of encoded bytes at a time, not 3.2 GB
READ_BUDGET = 256 << 20


def _read_groups(paths: Sequence[str | None], budget: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of ``paths`` whose files' sizes (``os.stat``) sum to at most ``budget``."""
    groups, start, total = [], 0, 0
    for i, path in enumerate(paths):
        try:
            size = os.stat(path).st_size if path is not None else 0
        except (OSError, ValueError):
            size = 0
        if i > start and total + size > budget:
            groups.append((start, i))
            start, total = i, 0
        total += size
    groups.append((start, len(paths)))
    return groups


def _decode_paths(paths: Sequence[str | None], size: Sequence[int], backend: str, *, normalize_output: bool,
                  device: torch.device | str | None, dtype: torch.dtype, chunk: int, workers: int | None,
                  limits: Limits, budget: int | None = None) -> ImageBatch:
    """Read and decode ``paths`` group by group (``_read_groups``) into one output tensor."""
    groups = _read_groups(paths, READ_BUDGET if budget is None else budget)
    names = [str(p) for p in paths]
    if len(groups) == 1:
        loaded = [open_image(p, limits) for p in paths]
        return _decode_loaded(names, loaded, size, backend, normalize_output=normalize_output, device=device,
                              dtype=dtype, chunk=chunk, workers=workers, limits=limits)
    h, w = _check_size(size)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    out = torch.zeros((len(paths), 3, h, w), dtype=dtype if normalize_output else torch.uint8, device=dev)
    ok = torch.zeros(len(paths), dtype=torch.bool)
    errors: dict[int, str] = {}
    fallback: dict[int, str] = {}
    name = backend
    for start, stop in groups:
        loaded = [open_image(p, limits) for p in paths[start:stop]]
        part = _decode_loaded(names[start:stop], loaded, size, backend, normalize_output=normalize_output,
                              device=device, dtype=dtype, chunk=chunk, workers=workers, limits=limits,
                              out=out[start:stop])
        del loaded
        ok[start:stop] = part.ok
        errors.update({start + i: e for i, e in part.errors.items()})
        fallback.update({start + i: e for i, e in part.fallback.items()})
        name = part.backend
    return ImageBatch(out, ok, errors, fallback, name)


def decode_uint8(paths: Sequence[str | None], size: Sequence[int], backend: str = "pil", *,
                 device: torch.device | str | None = None, chunk: int = DEFAULT_CHUNK,
                 workers: int | None = None, limits: Limits | None = None) -> ImageBatch:
    """Decode and resize each path to uint8 [n, 3, H, W]; ``None`` entries (no image) are reported as missing.

    ``backend``: ``pil`` (default, the reference), ``torchvision``, ``dali`` or ``auto``. ``device``: where
    decoding runs and the output lives (CUDA: nvJPEG through DALI "mixed" or torchvision); CPU by default.
    ``workers``: CPU threads decoding side by side (default: the usable cores, at most 16). ``limits``: what a
    file may be (``DEFAULT_LIMITS`` when None; see "Bounds")."""
    return _decode_paths(paths, size, backend, normalize_output=False, device=device, dtype=torch.uint8, chunk=chunk,
                         workers=workers, limits=limits or DEFAULT_LIMITS)


def decode(paths: Sequence[str | None], size: Sequence[int], backend: str = "auto", *, normalize: bool = True,
           device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
           chunk: int = DEFAULT_CHUNK, workers: int | None = None, limits: Limits | None = None) -> ImageBatch:
    """Like ``decode_uint8`` but, with ``normalize=True``, float ``dtype`` ImageNet-normalised pixels (DALI
    normalises inside its pipeline). Failed samples stay all zero."""
    return _decode_paths(paths, size, backend, normalize_output=normalize, device=device, dtype=dtype, chunk=chunk,
                         workers=workers, limits=limits or DEFAULT_LIMITS)


def decode_encoded(blobs: Sequence[bytes | None], size: Sequence[int], backend: str = "auto", *,
                   names: Sequence[str] | None = None, normalize: bool = False,
                   device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                   chunk: int = DEFAULT_CHUNK, workers: int | None = None,
                   limits: Limits | None = None) -> ImageBatch:
    """The same contract for encoded bytes already in memory; ``names`` label error messages."""
    labels = list(names) if names is not None else [f"<sample {i}>" for i in range(len(blobs))]
    limits = limits or DEFAULT_LIMITS
    loaded = [admit(label, b, limits) for label, b in zip(labels, blobs, strict=True)]
    return _decode_loaded(labels, loaded, size, backend, normalize_output=normalize, device=device, dtype=dtype,
                          chunk=chunk, workers=workers, limits=limits)


__all__ = ["DEFAULT_CHUNK", "READ_BUDGET", "ImageBatch", "assign_rows", "decode", "decode_encoded", "decode_uint8",
           "normalize"]
