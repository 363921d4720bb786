"""What encoded image bytes are, read from their first bytes and a JPEG's header, without decoding.

``sniff`` says which decoder may take a file: only clean 8-bit baseline/progressive JPEGs (1 or 3 components, a
header that holds together up to the first scan, an end marker at the end) go to the fast backends (nvJPEG,
libjpeg-turbo through torchvision or DALI); everything else goes to PIL, which decodes by content.
``jpeg_dimensions`` and ``jpeg_scans`` give what the image-limits gate (``image_files.admit``) weighs a JPEG by.
"""

from __future__ import annotations

JPEG_MAGIC = b"\xff\xd8\xff"


def sniff(data: bytes) -> str:
    """Classify encoded bytes by content: ``jpeg`` (what the fast backends take), ``jpeg-cmyk``,
    ``jpeg-no-eoi``, ``jpeg-other`` (12-bit, arithmetic, lossless, odd structure), ``png``, ``gif``, ``webp``,
    ``bmp``, ``tiff``, ``empty`` or ``unknown``."""
    if not data:
        return "empty"
    if data[:3] == JPEG_MAGIC:
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


def jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
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


def jpeg_scans(data: bytes) -> int:
    """The scans (SOS markers) of a JPEG: each is another pass of the decoder over the whole image."""
    return data.count(b"\xff\xda")  # 0xFF is byte-stuffed inside scans: this pair only starts one
