"""The image-limits gate: what an image file may be before any decoder sees a byte, decided once, alike for every
backend (PIL, torchvision, DALI on the CPU or a GPU) and for ``cmc-fast data check``.

``Limits`` holds the bounds and validates them once (an error names the flag: ``--max-image-bytes``,
``--max-image-pixels``). ``read_image_file`` reads a file within them: only regular files are opened (``os.stat``
first: a named pipe, a device such as ``/dev/zero`` or a directory is refused unopened; the open itself is
non-blocking and the opened file is checked again), a file over ``max_bytes`` is refused by its size, and the rest
is read in one call of at most ``max_bytes + 1`` bytes (``safe_io.read_bytes``). ``admit`` then checks the bytes
in hand: their size, the width and height their header declares (JPEG frame header, PNG IHDR, GIF, BMP, WebP, the
images inside an ICO/CUR; PIL's lazy open for other formats) against ``max_pixels``, so a decompression bomb (a
small file declaring 16000 x 16000) is refused by every backend alike, a JPEG's scans against its decode budget,
and what the JPEG sniffer (``jpeg.sniff``) says the bytes are, which picks the decoder. ``open_image`` is both.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, fields

from PIL import Image

from . import safe_io
from .jpeg import JPEG_MAGIC, jpeg_dimensions, jpeg_scans, sniff

# the command-line flag that sets each bound; bounds without one are named by their field
FLAGS = {"max_bytes": "--max-image-bytes", "max_pixels": "--max-image-pixels"}


@dataclass(frozen=True)
class Limits:
    """What an image file may be before any decoder sees it; the same for every backend. Each bound must be >= 1:
    ``ValueError`` naming the flag (or field) otherwise."""

    max_bytes: int = 64 << 20  # 64 MiB: a 50-megapixel photo at high JPEG quality is ~25 MB
    max_pixels: int = 40_000_000  # 120 MB decoded as RGB; below PIL's own bomb warning (89.5 million)
    # a JPEG's scans (SOS markers): libjpeg's progressive script writes 10 (6 for greyscale), mozjpeg's up to ~20;
    # each scan is another pass over the whole image, so a file repeating its last scan thousands of times stalls
    # any decoder (2,000 repeats of a 4000x4000: 29 s in PIL) within both limits above
    max_jpeg_scans: int = 64
    # the decode work of a JPEG, scans x pixels, at most this many full passes over a max_pixels image
    max_scan_passes: int = 16

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 1:
                raise ValueError(f"{FLAGS.get(f.name, f'image limit {f.name}')}: must be >= 1, got {value!r}")


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Admission:
    """What the gate decided about one image: its bytes (None when unread), what they are (``jpeg.sniff``; "" when
    unread) and why no decoder may take them (None: admitted)."""

    data: bytes | bytearray | None
    kind: str
    problem: str | None


def file_problem(path: str, limits: Limits = DEFAULT_LIMITS) -> str | None:
    """Why ``path`` will not be read (missing, not a regular file, empty, over the byte limit), from ``os.stat``
    alone: nothing is opened."""
    return safe_io.file_problem(path, limits.max_bytes, FLAGS["max_bytes"])


def read_image_file(path: str | None, limits: Limits = DEFAULT_LIMITS) -> tuple[bytearray | None, str | None]:
    """(bytes, None) or (None, why). Regular files only, within ``limits.max_bytes``, read in one bounded call
    into one buffer (``safe_io.read_bytes``: the open is non-blocking and checked again)."""
    if path is None:
        return None, "no image"
    try:
        return safe_io.read_bytes(path, limits.max_bytes, FLAGS["max_bytes"]), None
    except safe_io.FileRefused as exc:
        return None, str(exc)


def open_image(path: str | None, limits: Limits = DEFAULT_LIMITS) -> Admission:
    """``path`` read within ``limits`` (``read_image_file``), then through ``admit``."""
    data, err = read_image_file(path, limits)
    if data is None:
        return Admission(None, "", err)
    return admit(str(path), data, limits)


def admit(name: str, data: bytes | bytearray | None, limits: Limits = DEFAULT_LIMITS) -> Admission:
    """The one check of encoded bytes against ``limits``, decided from the bytes and header alone before any
    decoder runs: missing or empty; over the byte limit; more pixels than allowed (a 16-bit PNG's pixels count
    twice: decoded they take twice the memory); an ICO/CUR holding an image over the limit; a JPEG with more
    scans, or more scan-passes over its pixels, than ``limits`` allow. Errors start with ``name``."""
    if data is None:
        return Admission(None, "", "no image")
    if not data:
        return Admission(None, "", f"{name}: empty file (0 bytes)")
    return Admission(data, sniff(data), _problem(name, data, limits))


def _problem(name: str, data: bytes, limits: Limits) -> str | None:
    if len(data) > limits.max_bytes:
        return safe_io.size_problem(name, len(data), limits.max_bytes, FLAGS["max_bytes"])
    dims = _ico_dimensions(data) if data[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") else None
    dims = dims or header_dimensions(data)
    if dims is None:
        return None
    w, h = dims
    depth = _png_depth(data)
    if w * h * depth > limits.max_pixels:
        bits = " at 16 bits (counted twice)" if depth == 2 else ""
        return (f"{name}: {w}x{h} = {w * h} pixels{bits} in its header, over the pixel limit of {limits.max_pixels} "
                f"({FLAGS['max_pixels']}); not decoded")
    if data[:3] == JPEG_MAGIC:
        scans = jpeg_scans(data)
        if scans > limits.max_jpeg_scans or scans * w * h > limits.max_scan_passes * limits.max_pixels:
            return (f"{name}: JPEG of {w}x{h} pixels in {scans} scans, over the decode budget ({limits.max_jpeg_scans}"
                    f" scans, {limits.max_scan_passes} passes over {limits.max_pixels} pixels); not decoded")
    return None


def pixels_problem(width: int, height: int, limits: Limits = DEFAULT_LIMITS) -> str | None:
    """Why an image of this size, as a decoder opened it, is over ``limits.max_pixels`` (None: within)."""
    if width * height > limits.max_pixels:
        return f"{width}x{height} pixels, over the pixel limit of {limits.max_pixels} ({FLAGS['max_pixels']})"
    return None


def header_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the encoded image's header declares them, without decoding (None when not found).
    JPEG, PNG, GIF, BMP and WebP are parsed here; other formats through PIL's lazy open (header only)."""
    le, be = "little", "big"
    if data[:3] == JPEG_MAGIC:
        return jpeg_dimensions(data)
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

