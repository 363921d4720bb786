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

Backends
--------
- ``pil``: Pillow; the plain baseline and the fallback of the others.
- ``torchvision``: ``torchvision.io.decode_jpeg`` then ``transforms.v2.functional.resize``. On CUDA the
  whole chunk is decoded in one batched nvJPEG call (``device='cuda'``) and resized on the GPU. (torchvision
  0.29 deprecates its decoders in favour of TorchCodec; they still work and the warning is silenced here.)
- ``dali``: a DALI pipeline ``fn.external_source`` (encoded bytes) -> ``fn.decoders.image`` (device "mixed"
  = nvJPEG on CUDA, "cpu" = libjpeg-turbo with ``device_id=None`` otherwise) -> ``fn.resize`` ->
  ``fn.transpose`` to CHW (uint8) or ``fn.crop_mirror_normalize`` (float, ImageNet statistics inside the
  pipeline). Built once per (size, chunk size, device, output kind) and reused; GPU output goes to torch
  device-to-device (``feed_ndarray``), never through the host. Optional: ``pip install cmc-fast[dali]``.
- ``auto``: on CUDA ``dali`` when it is importable, else ``torchvision``; on the CPU ``torchvision`` (else ``pil``).
  DALI's CPU pipeline is not chosen automatically: its bicubic ``fn.resize`` costs more CPU than decoding, and
  on the 2-core development machine the whole pipeline took ~2x torchvision's CPU time per image (see bench/).

CPU threads: ``workers`` (default: the usable cores, at most 16) images are decoded side by side by the PIL and
torchvision CPU paths (libjpeg-turbo, PIL's resampler and torch ops release the GIL) and is DALI's
``num_threads``. Threads change no pixel: each sample is decoded by the same code whichever thread runs it.

Bounds: decided once, before any backend sees a byte
----------------------------------------------------
Every file goes through ``read_image_file`` (``Limits``: ``max_bytes``, default 64 MiB; ``max_pixels``, default
40 million): only regular files are opened (``os.stat`` first: a named pipe, a device such as ``/dev/zero`` or a
directory is refused unopened; the open itself is non-blocking and the opened file is checked again), a file over
``max_bytes`` is refused by its size, and the rest is read in one call of at most ``max_bytes + 1`` bytes. Before
decoding, the width and height in the image's header (JPEG frame header, PNG IHDR, GIF, BMP, WebP; PIL's lazy
open for other formats) are checked against ``max_pixels``, so a decompression bomb (a small file declaring
16000 x 16000) is refused alike by PIL, torchvision and DALI. Refused files get ``ok=False`` and an error naming
the path and the limit (``--max-image-bytes`` / ``--max-image-pixels``).

Bad images: never raise from a batch call
-----------------------------------------
Each input's bytes are sniffed first; only clean 8-bit baseline/progressive JPEGs (1 or 3 components, a header
that holds together up to the first scan, EOI at the end) go to the fast backend, and if its batched call raises,
the chunk is bisected until the failing
samples are isolated (a DALI pipeline that failed on a sample is rebuilt; one that cannot be built at all raises
``DaliUnusableError`` once, and DALI is not used again in the process: ``auto`` then picks torchvision, after one
small probe pipeline on CUDA). Everything else, and whatever the fast
backend failed on, is handed to PIL, which decodes by content. Outcomes:

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

import functools
import importlib.util
import io
import os
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from . import safe_io

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKENDS = ("auto", "dali", "torchvision", "pil")
DEFAULT_CHUNK = 64  # images per backend call (and the DALI pipeline's batch size)


@dataclass
class ImageBatch:
    pixels: torch.Tensor  # uint8 [n, 3, H, W] or float [n, 3, H, W] once normalised
    ok: torch.Tensor  # bool [n]
    errors: dict[int, str] = field(default_factory=dict)  # position -> "path: what went wrong"
    fallback: dict[int, str] = field(default_factory=dict)  # position -> why PIL decoded it
    backend: str = "pil"  # the backend that was asked for, resolved


# ---------------------------------------------------------------------------------------------------------
# availability and backend choice


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


class DaliUnusableError(RuntimeError):
    """No DALI pipeline can be built in this process (e.g. a driver older than the DALI wheel needs)."""


# Why DALI pipelines could not be built here, per kind ("gpu": mixed, "cpu"); empty while none failed. Set by the
# first failed build of that kind, which is also the last: from then on 'dali' raises at once and 'auto' picks
# torchvision, so no sample is silently decoded by PIL under the name 'dali', and no chunk rebuilds a broken
# pipeline at every step of its bisection.
_DALI_UNUSABLE: dict[str, str] = {}


def dali_unusable_reason(device: torch.device | str | None = "cuda") -> str | None:
    """Why DALI was marked unusable on this kind of device in this process (a pipeline failed to build), or None."""
    return _DALI_UNUSABLE.get(_dali_kind(device))


def _dali_kind(device: torch.device | str | None) -> str:
    return "gpu" if device is not None and torch.device(device).type == "cuda" else "cpu"


def available_backends() -> list[str]:
    """Concrete backends installed here, in ``auto``'s order of preference on CUDA."""
    return [b for b, ok in (("dali", dali_available()), ("torchvision", torchvision_available()), ("pil", True))
            if ok]


def _dali_builds_on(device: torch.device) -> bool:
    """Whether a DALI pipeline builds on this CUDA device: one small pipeline, built once per process and device
    (``_dali_pipeline`` keeps it, or marks DALI unusable and raises at once from then on)."""
    try:
        _dali_pipeline((8, 8, 1, device.index if device.index is not None else 0, False, 1))
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


# ---------------------------------------------------------------------------------------------------------
# reading and sniffing


def sniff(data: bytes) -> str:
    """Classify encoded bytes by content: ``jpeg`` (what the fast backends take), ``jpeg-cmyk``,
    ``jpeg-no-eoi``, ``jpeg-other`` (12-bit, arithmetic, lossless, odd structure), ``png``, ``gif``, ``webp``,
    ``bmp``, ``tiff``, ``empty`` or ``unknown``."""
    if not data:
        return "empty"
    if data[:3] == b"\xff\xd8\xff":
        return _sniff_jpeg(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return "unknown"


_SOF_FAST = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive Huffman: what nvJPEG / libjpeg-turbo take


def _tables_fill(payload: bytes, marker: int) -> bool:
    """A DQT or DHT segment's tables exactly fill it, each with a valid class/destination and sizes."""
    j, n = 0, len(payload)
    while j < n:
        kind, dest = payload[j] >> 4, payload[j] & 0x0F
        if marker == 0xDB:  # DQT: precision 0 (8-bit) or 1 (16-bit), 64 entries
            if kind > 1 or dest > 3:
                return False
            j += 1 + 64 * (kind + 1)
        else:  # DHT: class 0 (DC) or 1 (AC), 16 code-length counts, then the symbols
            if kind > 1 or dest > 3 or j + 17 > n:
                return False
            symbols = sum(payload[j + 1:j + 17])
            if symbols > 256 or j + 17 + symbols > n:
                return False
            if kind == 0 and max(payload[j + 17:j + 17 + symbols], default=0) > 15:  # libjpeg: bad DC table
                return False
            j += 17 + symbols
    return j == n


def _sniff_jpeg(data: bytes) -> str:
    """Walks the header up to the first scan: every segment where its length says, tables that fill their
    segments, one frame header, a scan header whose components and tables the frame has. A header that does not
    hold together goes to PIL: fuzzing found DALI's CPU decoder, given such files on several threads, crashing the
    process (segfault); libjpeg-turbo through PIL refuses them with an error."""
    i, n = 2, len(data)
    frame: str | None = None
    frame_ids: set[int] = set()
    while i + 4 <= n:
        if data[i] != 0xFF:
            return "jpeg-other"
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD8, 0xD9):  # a second start of image, or the end before any scan
            return "jpeg-other"
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2 or i + 2 + length > n:
            return "jpeg-other"
        payload = data[i + 4:i + 2 + length]
        if marker in (0xDB, 0xC4) and not _tables_fill(payload, marker):
            return "jpeg-other"
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame
            if frame is not None or len(payload) < 6:
                return "jpeg-other"
            precision, height, width, components = (payload[0], int.from_bytes(payload[1:3], "big"),
                                                    int.from_bytes(payload[3:5], "big"), payload[5])
            if (marker not in _SOF_FAST or precision != 8 or components not in (1, 3, 4) or height == 0
                    or width == 0 or len(payload) != 6 + 3 * components):
                return "jpeg-other"
            frame = "jpeg-cmyk" if components == 4 else "jpeg"
            frame_ids = set(payload[6::3])
        if marker == 0xDA:  # start of scan: the header ends here
            if frame is None or not payload or len(payload) != 4 + 2 * payload[0] or not 1 <= payload[0] <= 4:
                return "jpeg-other"
            ns = payload[0]
            selectors, tables = payload[1:1 + 2 * ns:2], payload[2:2 + 2 * ns:2]
            ss, se, approx = payload[1 + 2 * ns], payload[2 + 2 * ns], payload[3 + 2 * ns]
            if (not set(selectors) <= frame_ids or any(t >> 4 > 3 or t & 0x0F > 3 for t in tables)
                    or ss > se or se > 63 or approx >> 4 > 13 or approx & 0x0F > 13):
                return "jpeg-other"
            if frame == "jpeg" and not data[-4096:].rstrip(b"\x00").endswith(b"\xff\xd9"):
                return "jpeg-no-eoi"
            return frame
        i += 2 + length
    return "jpeg-other"


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


@dataclass(frozen=True)
class Limits:
    """What an image file may be before any decoder sees it; the same for every backend."""

    max_bytes: int = 64 << 20  # 64 MiB: a 50-megapixel photo at high JPEG quality is ~25 MB
    max_pixels: int = 40_000_000  # 120 MB decoded as RGB; below PIL's own bomb warning (89.5 million)
    # a JPEG's scans (SOS markers): libjpeg's progressive script writes 10 (6 for greyscale), mozjpeg's up to ~20;
    # each scan is another pass over the whole image, so a file repeating its last scan thousands of times stalls
    # any decoder (2,000 repeats of a 4000x4000: 29 s in PIL) within both limits above
    max_jpeg_scans: int = 64
    # the decode work of a JPEG, scans x pixels, at most this many full passes over a max_pixels image
    max_scan_passes: int = 16

    def __post_init__(self):
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"image limits must be >= 1, got {self}")


DEFAULT_LIMITS = Limits()

def file_problem(path: str, limits: Limits = DEFAULT_LIMITS) -> str | None:
    """Why ``path`` will not be read (missing, not a regular file, empty, over the byte limit), from ``os.stat``
    alone: nothing is opened."""
    return safe_io.file_problem(path, limits.max_bytes, "--max-image-bytes")


def read_image_file(path: str | None, limits: Limits = DEFAULT_LIMITS) -> tuple[bytearray | None, str | None]:
    """(bytes, None) or (None, why). Regular files only, within ``limits.max_bytes``, read in one bounded call
    into one buffer (``safe_io.read_bytes``: the open is non-blocking and checked again)."""
    if path is None:
        return None, "no image"
    try:
        return safe_io.read_bytes(path, limits.max_bytes, "--max-image-bytes"), None
    except safe_io.FileRefused as exc:
        return None, str(exc)


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first start-of-frame header, walking the segments."""
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            i += 1 if marker == 0xFF else 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and i + 9 <= n:
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker == 0xDA or length < 2:
            return None
        i += 2 + length
    return None


def header_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the encoded image's header declares them, without decoding (None when not found).
    JPEG, PNG, GIF, BMP and WebP are parsed here; other formats through PIL's lazy open (header only)."""
    le, be = "little", "big"
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_dimensions(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], be), int.from_bytes(data[20:24], be)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], le), int.from_bytes(data[8:10], le)
    if data[:2] == b"BM" and len(data) >= 26:
        return abs(int.from_bytes(data[18:22], le, signed=True)), abs(int.from_bytes(data[22:26], le, signed=True))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":
            return 1 + int.from_bytes(data[24:27], le), 1 + int.from_bytes(data[27:30], le)
        if chunk == b"VP8L":
            bits = int.from_bytes(data[21:25], le)
            return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        if chunk == b"VP8 ":
            return int.from_bytes(data[26:28], le) & 0x3FFF, int.from_bytes(data[28:30], le) & 0x3FFF
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Exception:  # noqa: BLE001 - not an image PIL knows, or over PIL's own bomb limit: PIL says so itself
        return None


def _png_depth(data: bytes) -> int:
    """Bytes per sample of a PNG (IHDR bit depth 16: 2, else 1)."""
    return 2 if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 25 and data[24] == 16 else 1


def _ico_dimensions(data: bytes) -> tuple[int, int] | None:
    """The largest (width, height) among an ICO/CUR's images, read from each embedded image's own header (a PNG's
    IHDR, a BMP's DIB header) rather than the directory, which may say 16x16 for a 13000x13000 PNG."""
    count = int.from_bytes(data[4:6], "little")
    best = None
    for k in range(min(count, 256)):
        entry = data[6 + 16 * k:22 + 16 * k]
        if len(entry) < 16:
            return None
        offset = int.from_bytes(entry[12:16], "little")
        image = data[offset:offset + 40]
        if image[:8] == b"\x89PNG\r\n\x1a\n" and len(image) >= 24:
            dims = int.from_bytes(image[16:20], "big"), int.from_bytes(image[20:24], "big")
        elif len(image) >= 12:  # BITMAPINFOHEADER: its height counts the colour and mask halves
            dims = (abs(int.from_bytes(image[4:8], "little", signed=True)),
                    abs(int.from_bytes(image[8:12], "little", signed=True)) // 2)
        else:
            dims = (entry[0] or 256, entry[1] or 256)
        if best is None or dims[0] * dims[1] > best[0] * best[1]:
            best = dims
    return best


def pixel_problem(name: str, data: bytes, limits: Limits = DEFAULT_LIMITS) -> str | None:
    """Why ``data`` will not be decoded, decided from its bytes and header alone: over the byte limit; more pixels
    than allowed (a 16-bit PNG's pixels count twice: decoded they take twice the memory); an ICO/CUR holding an
    image over the limit; a JPEG with more scans, or more scan-passes over its pixels, than ``limits`` allow."""
    if len(data) > limits.max_bytes:
        return f"{name}: {len(data)} bytes, over the byte limit of {limits.max_bytes} (--max-image-bytes)"
    dims = _ico_dimensions(data) if data[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") else None
    dims = dims or header_dimensions(data)
    if dims is None:
        return None
    w, h = dims
    depth = _png_depth(data)
    if w * h * depth > limits.max_pixels:
        bits = " at 16 bits (counted twice)" if depth == 2 else ""
        return (f"{name}: {w}x{h} = {w * h} pixels{bits} in its header, over the pixel limit of {limits.max_pixels} "
                "(--max-image-pixels); not decoded")
    if data[:3] == b"\xff\xd8\xff":
        scans = data.count(b"\xff\xda")  # 0xFF is byte-stuffed inside scans: this pair only starts one
        if scans > limits.max_jpeg_scans or scans * w * h > limits.max_scan_passes * limits.max_pixels:
            return (f"{name}: JPEG of {w}x{h} pixels in {scans} scans, over the decode budget ({limits.max_jpeg_scans}"
                    f" scans, {limits.max_scan_passes} passes over {limits.max_pixels} pixels); not decoded")
    return None


def _short(exc: BaseException) -> str:
    """One line: the exception type and the decoder's own words, without source locations or DALI's
    pipeline boilerplate."""
    text = " ".join(str(exc).split())
    if "encountered:" in text:  # DALI: "Error in CPU operator ... traceback ... encountered: <the reason>"
        text = text.split("encountered:", 1)[1]
    text = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", text)
    text = re.sub(r"^\w+, \S+\.(?:cpp|cu|h):\d+, ", "", text)  # torchvision: "decode_jpeg, file.cpp:171, "
    text = text.replace("Current pipeline object is no longer valid.", "").strip()
    return f"{type(exc).__name__}: {text[:300]}"


# ---------------------------------------------------------------------------------------------------------
# PIL


_HIGH_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # how PIL opens 16-bit greyscale PNG / TIFF


def _to_rgb(im: Image.Image) -> Image.Image:
    # convert() copies even an RGB image (a sixth of PIL's time on the Weibo JPEGs): only convert other modes
    if im.mode == "RGB":
        return im
    if im.mode in _HIGH_BIT_GREY:  # convert() would clip 0..65535 at 255 (a white image): keep the top 8 bits
        samples = np.asarray(im)  # uint16 (I;16*) or int32 (I), no wider copy
        if samples.dtype != np.uint16:
            samples = np.clip(samples, 0, 65535)
        grey = (samples >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return im.convert("RGB")


def _pil_resized(im: Image.Image, size: tuple[int, int]) -> np.ndarray:
    rgb = _to_rgb(im)
    return np.ascontiguousarray(np.asarray(rgb.resize((size[1], size[0]), Image.BICUBIC), dtype=np.uint8)
                                .transpose(2, 0, 1))


def _pil_one(data: bytes, size: tuple[int, int], max_pixels: int = DEFAULT_LIMITS.max_pixels) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:  # lazy: the header only, so the size is checked before decoding
        if im.size[0] * im.size[1] > max_pixels:
            raise ValueError(f"{im.size[0]}x{im.size[1]} pixels, over the pixel limit of {max_pixels} "
                             "(--max-image-pixels)")
        return _pil_resized(im, size)


def decode_pil_path(path: str, size: tuple[int, int], limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """One file -> uint8 [3, H, W] with PIL (raises ValueError on failure; for DataLoader-style datasets)."""
    data, err = read_image_file(path, limits)
    err = err or pixel_problem(path, data, limits)
    if err:
        raise ValueError(err)
    return torch.from_numpy(_pil_one(data, size, limits.max_pixels))


# ---------------------------------------------------------------------------------------------------------
# fast backends: decode a chunk of clean JPEG bytes -> (pixels [k, 3, H, W] on device, failures {j: message})


def _isolating(run: Callable[[list[int]], None], k: int) -> dict[int, str]:
    """Call ``run`` on all k samples; when it raises, bisect until each failing sample is alone."""
    failures: dict[int, str] = {}

    def go(idx: list[int]) -> None:
        try:
            run(idx)
        except DaliUnusableError:  # no sample's fault: bisecting would only rebuild what cannot be built
            raise
        except Exception as exc:  # noqa: BLE001 - isolated below, reported per sample
            if len(idx) == 1:
                failures[idx[0]] = _short(exc)
                return
            mid = len(idx) // 2
            go(idx[:mid])
            go(idx[mid:])

    if k:
        go(list(range(k)))
    return failures


def usable_cores() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 16))


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _each(fn: Callable[[int], object], n: int, workers: int) -> list[object]:
    """``[fn(0), ..., fn(n-1)]`` with each exception returned in its slot, on ``workers`` threads. libjpeg-turbo,
    PIL's resize and torch ops release the GIL, so threads scale the CPU backends with the cores."""
    def safe(j: int) -> object:
        try:
            return fn(j)
        except Exception as exc:  # noqa: BLE001 - reported per sample by the caller
            return exc

    if workers <= 1 or n < 2:
        return [safe(j) for j in range(n)]
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="cmc-fast-decode")
    return list(pool.map(safe, range(n)))


def _tv_resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    return resize(img, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)


def _decode_torchvision(blobs: list[bytes], size: tuple[int, int], device: torch.device, normalize: bool,
                        chunk: int, workers: int) -> tuple[torch.Tensor, dict[int, str]]:
    from torchvision.io import ImageReadMode, decode_jpeg

    h, w = size
    out = torch.zeros((len(blobs), 3, h, w), dtype=torch.uint8, device=device)
    # files are read into a bytearray already (safe_io.read_bytes): wrapped, not copied a second time
    encoded = [torch.frombuffer(b if isinstance(b, bytearray) else bytearray(b), dtype=torch.uint8) for b in blobs]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io.*")
        warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision.*")
        if device.type == "cuda":
            def run(idx: list[int]) -> None:  # one batched nvJPEG call for the chunk, resize on the GPU
                imgs = decode_jpeg([encoded[j] for j in idx], mode=ImageReadMode.RGB, device=device)
                for j, img in zip(idx, imgs, strict=True):
                    out[j] = _tv_resize(img, size)

            return out, _isolating(run, len(blobs))
        # the resize returns channels-last strides; numpy's single-threaded strided copy is far cheaper here than
        # torch's OpenMP-parallel one (which on a busy 2-core machine costs more than the decode)
        out_np = out.numpy()

        def one(j: int) -> None:
            out_np[j] = _tv_resize(decode_jpeg(encoded[j], mode=ImageReadMode.RGB), size).numpy()

        results = _each(one, len(encoded), workers)
        return out, {j: _short(r) for j, r in enumerate(results) if isinstance(r, Exception)}


_DALI_LOCK = threading.Lock()
_DALI_PIPES: dict[tuple, object] = {}
_DALI_INHERITED: list[dict] = []  # a forked child's copies of its parent's pipelines: never used, never freed


def _start_afresh_in_forked_child() -> None:
    """A forked child (a DataLoader worker) has none of its parent's threads: a thread pool or DALI pipeline built by
    the parent would wait on them forever (a decode hung), and a lock another thread held stays locked. The child
    builds its own. The parent's pipelines stay referenced rather than destroyed: their destructors would wait on
    the same missing threads."""
    global _POOLS_LOCK, _DALI_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()
    _DALI_INHERITED.append(dict(_DALI_PIPES))
    _DALI_PIPES.clear()
    _DALI_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_start_afresh_in_forked_child)


def _dali_pipeline(key: tuple, libjpeg_chroma: bool = True):
    """The pipeline for (H, W, max batch, device id or None, normalise, CPU threads), built once and reused. The
    contract upsamples chroma as libjpeg does (GPU pixels then match the CPU backends); the benchmarks also build
    it without (``libjpeg_chroma=False``), to see what that costs nvJPEG."""
    cache_key = key if libjpeg_chroma else (*key, "nvjpeg-chroma")
    pipe = _DALI_PIPES.get(cache_key)
    if pipe is not None:
        return pipe
    from nvidia.dali import fn, pipeline_def, types

    h, w, max_batch, device_id, normalize, threads = key
    gpu = device_id is not None

    @pipeline_def(batch_size=max_batch, num_threads=threads, device_id=device_id, prefetch_queue_depth=1)
    def images(decoder_args: dict):
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, device="cpu")
        img = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                jpeg_fancy_upsampling=libjpeg_chroma, **decoder_args)
        img = fn.resize(img, resize_x=w, resize_y=h, interp_type=types.INTERP_CUBIC, antialias=True)
        if normalize:
            return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[255.0 * m for m in IMAGENET_MEAN],
                                            std=[255.0 * s for s in IMAGENET_STD])
        return fn.transpose(img, perm=[2, 0, 1])

    kind = "gpu" if gpu else "cpu"
    if kind in _DALI_UNUSABLE:
        raise DaliUnusableError(_DALI_UNUSABLE[kind])
    try:
        try:
            pipe = images({"adjust_orientation": False})  # EXIF orientation ignored, like PIL's Image.open
            pipe.build()
        except Exception as exc:  # noqa: BLE001 - DALI releases whose decoder predates the argument never rotate
            if "adjust_orientation" not in str(exc):
                raise
            pipe = images({})
            pipe.build()
    except Exception as exc:  # noqa: BLE001 - reported once, and DALI is not used again in this process
        hint = " (DALI's CUDA 13 wheel needs an NVIDIA driver >= 580)" if gpu else ""
        _DALI_UNUSABLE[kind] = (f"image backend 'dali' is unusable here: a DALI {kind.upper()} pipeline could not "
                                f"be built (DALI {_dali_version()}): {_short(exc)}; use --image-backend "
                                f"torchvision{hint}")
        warnings.warn(_DALI_UNUSABLE[kind], RuntimeWarning, stacklevel=2)
        raise DaliUnusableError(_DALI_UNUSABLE[kind]) from exc
    _DALI_PIPES[cache_key] = pipe
    return pipe


def _dali_version() -> str:
    import nvidia.dali

    return getattr(nvidia.dali, "__version__", "?")


def _decode_dali(blobs: list[bytes], size: tuple[int, int], device: torch.device, normalize: bool,
                 chunk: int, workers: int) -> tuple[torch.Tensor, dict[int, str]]:
    from nvidia.dali.plugin.pytorch import feed_ndarray

    h, w = size
    device_id = None
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    key = (h, w, max(chunk, len(blobs)), device_id, normalize, workers)  # smaller batches: the same pipeline
    out = torch.zeros((len(blobs), 3, h, w), dtype=torch.float32 if normalize else torch.uint8, device=device)
    arrays = [np.frombuffer(b, dtype=np.uint8) for b in blobs]

    def run(idx: list[int]) -> None:
        pipe = _dali_pipeline(key)
        try:
            pipe.feed_input("encoded", [arrays[j] for j in idx])
            (images,) = pipe.run()
        except Exception:
            _DALI_PIPES.pop(key, None)  # a pipeline that raised is no longer valid
            raise
        # bisection only ever runs contiguous ranges, so DALI copies straight into the output rows, now (it reuses
        # its buffers on the next run); on CUDA the copy is device-to-device on torch's current stream
        dst = out[idx[0]:idx[-1] + 1]
        assert dst.shape[0] == len(idx)
        if device_id is None:
            feed_ndarray(images.as_tensor(), dst)
        else:
            stream = torch.cuda.current_stream(device)
            feed_ndarray(images.as_tensor(), dst, cuda_stream=stream)
            stream.synchronize()  # done before the next run may reuse DALI's output buffer

    with _DALI_LOCK:
        failures = _isolating(run, len(blobs))
    return out, failures


_FAST: dict[str, Callable[..., tuple[torch.Tensor, dict[int, str]]]] = {
    "torchvision": _decode_torchvision,
    "dali": _decode_dali,
}


# ---------------------------------------------------------------------------------------------------------
# the batch calls


def normalize(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [n, 3, H, W] -> ImageNet-normalised float, on the tensor's device."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device, dtype=dtype).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=pixels.device, dtype=dtype).view(1, 3, 1, 1) * 255.0
    return pixels.to(dtype, copy=True).sub_(mean).div_(std)  # one buffer, two in-place passes


def _assign(out: torch.Tensor, positions: list[int], pixels: torch.Tensor) -> None:
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


def _route(names: Sequence[str], loaded: Sequence[tuple[bytes | None, str | None]], backend: str,
           limits: Limits) -> tuple[dict[int, str], list[int], list[tuple[int, str]]]:
    """Where each input goes: ``errors`` (unread, empty, over a limit: one decision for every backend, before
    decoding), ``fast`` (clean JPEGs for a fast backend), ``to_pil`` ((position, why PIL) for the rest)."""
    errors: dict[int, str] = {}
    fast: list[int] = []
    to_pil: list[tuple[int, str]] = []
    for i, (data, err) in enumerate(loaded):
        if data is None:
            errors[i] = err or f"{names[i]}: empty file (0 bytes)"
            continue
        too_big = pixel_problem(names[i], data, limits)
        if too_big:
            errors[i] = too_big
            continue
        kind = sniff(data)
        if kind == "empty":
            errors[i] = f"{names[i]}: empty file (0 bytes)"
        elif kind == "jpeg" and backend != "pil":
            fast.append(i)
        elif kind == "jpeg":
            to_pil.append((i, ""))
        else:
            to_pil.append((i, _PIL_REASON.get(kind, f"{kind} content")))
    return errors, fast, to_pil


def _decode_loaded(names: Sequence[str], loaded: Sequence[tuple[bytes | None, str | None]], size: Sequence[int],
                   backend: str, *, normalize_output: bool, device: torch.device | str | None,
                   dtype: torch.dtype, chunk: int, workers: int | None, limits: Limits | None = None,
                   out: torch.Tensor | None = None) -> ImageBatch:
    """Decode ``loaded`` into ``out`` (allocated when None: zeros [n, 3, H, W])."""
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
    errors, fast, to_pil = _route(names, loaded, name, limits)

    def put(positions: list[int], pixels: torch.Tensor) -> None:
        if not positions:
            return
        if normalize_output and not pixels.is_floating_point():
            pixels = normalize(pixels.to(dev, non_blocking=True), dtype=torch.float32)
        _assign(out, positions, pixels.to(dev, out_dtype, non_blocking=True))
        ok[positions] = True

    if fast:
        decode_fast = _FAST[name]
        for start in range(0, len(fast), chunk):
            part = fast[start:start + chunk]
            pixels, failures = decode_fast([loaded[i][0] for i in part], (h, w), dev, normalize_output, chunk,
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
            buf[k] = _pil_one(loaded[to_pil[k][0]][0], (h, w), limits.max_pixels)

        done: list[int] = []
        for k, result in enumerate(_each(one, len(to_pil), workers)):
            i, why = to_pil[k]
            if isinstance(result, Exception):
                errors[i] = f"{names[i]}: {why + '; ' if why else ''}PIL: {_short(result)}"
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
        loaded = [read_image_file(p, limits) for p in paths]
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
        loaded = [read_image_file(p, limits) for p in paths[start:stop]]
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
    loaded = [(b, None) if b else (None, "no image" if b is None else f"{labels[i]}: empty file (0 bytes)")
              for i, b in enumerate(blobs)]
    return _decode_loaded(labels, loaded, size, backend, normalize_output=normalize, device=device, dtype=dtype,
                          chunk=chunk, workers=workers, limits=limits)


__all__ = ["BACKENDS", "DEFAULT_CHUNK", "DEFAULT_LIMITS", "IMAGENET_MEAN", "IMAGENET_STD", "DaliUnusableError",
           "ImageBatch", "Limits", "available_backends", "dali_available", "dali_unusable_reason", "decode",
           "decode_encoded", "decode_pil_path", "decode_uint8", "file_problem", "header_dimensions", "normalize",
           "pixel_problem", "read_image_file", "resolve_backend", "sniff", "torchvision_available", "usable_cores"]
