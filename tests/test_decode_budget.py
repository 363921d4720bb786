"""Decoding within a budget (issue 23): a JPEG's scans counted from its bytes, 16-bit and ICO-embedded images
checked against the pixel limit before any decoder runs, and the files of one decode call read in groups within a
byte budget, each into its rows of the one output (pixels identical to reading them all at once)."""

import io
import struct

import numpy as np
import pytest
import torch
from cmc_fast.data_pipeline import images
from cmc_fast.data_pipeline.image_backend import available_backends
from cmc_fast.data_pipeline.image_files import Limits, admit, read_image_file
from cmc_fast.data_pipeline.images import decode_encoded, decode_uint8
from PIL import Image


def _progressive(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90, progressive=True)
    return buf.getvalue()


def _repeat_last_scan(data: bytes, times: int) -> bytes:
    """The file with its last scan (SOS header and entropy-coded data, up to EOI) written ``times`` more times:
    a valid JPEG every decoder accepts, costing a full pass over the image per repeat."""
    last = data.rindex(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * times + data[end:]


def test_a_jpeg_repeating_its_last_scan_is_refused_from_its_bytes_alone():
    plain = _progressive()
    scans = plain.count(b"\xff\xda")
    assert 2 <= scans <= 12  # what PIL's progressive encoder writes
    assert admit("ok.jpg", plain).problem is None
    bomb = _repeat_last_scan(plain, 200)
    assert Image.open(io.BytesIO(bomb)).size == (64, 48)  # still a JPEG PIL opens
    why = admit("bomb.jpg", bomb).problem
    assert why is not None and f"in {scans + 200} scans" in why and "not decoded" in why
    batch = decode_encoded([plain, bomb], (16, 16), "pil", names=["ok.jpg", "bomb.jpg"])
    assert batch.ok.tolist() == [True, False] and "scans" in batch.errors[1]


def test_the_scan_budget_scales_with_the_image():
    plain = _progressive(64, 48)
    few = _repeat_last_scan(plain, 20)
    n = few.count(b"\xff\xda")
    # 64 x 48 pixels in n scans: within 16 passes of a limit of 64 * 48 * n / 16 pixels, over one slightly smaller
    fits = Limits(max_pixels=64 * 48 * n // 16)
    tight = Limits(max_pixels=64 * 48 * n // 16 - 1)
    assert admit("a.jpg", few, fits).problem is None
    assert "scans" in admit("a.jpg", few, tight).problem


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG")
    return buf.getvalue()


def test_a_16_bit_png_counts_its_pixels_twice():
    rng = np.random.default_rng(1)
    deep = _png(rng.integers(0, 65536, (100, 120), dtype=np.uint16))
    shallow = _png(rng.integers(0, 256, (100, 120), dtype=np.uint8))
    assert deep[24] == 16 and shallow[24] == 8  # IHDR bit depth
    limits = Limits(max_pixels=100 * 120 + 1)
    assert admit("8.png", shallow, limits).problem is None
    assert "at 16 bits" in admit("16.png", deep, limits).problem
    # within the limit, it decodes to its top 8 bits as before
    grey = np.asarray(Image.open(io.BytesIO(deep)))
    batch = decode_encoded([deep], (100, 120), "pil", limits=Limits(max_pixels=100 * 120 * 2))
    assert batch.ok.all()
    want = torch.from_numpy((grey.astype(np.int64) >> 8).astype(np.uint8))
    assert torch.equal(batch.pixels[0, 0], want) and torch.equal(batch.pixels[0, 2], want)


def _ico_with(embedded: bytes, listed: int = 16) -> bytes:
    """An ICO whose directory lists one ``listed`` x ``listed`` image, holding ``embedded`` (a PNG of any size)."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", listed, listed, 0, 0, 1, 32, len(embedded), 6 + 16)
    return header + entry + embedded


def test_an_ico_is_checked_by_its_embedded_image_not_its_directory(monkeypatch):
    big = _png(np.zeros((300, 300, 3), dtype=np.uint8))
    ico = _ico_with(big)
    limits = Limits(max_pixels=100 * 100)

    def no_decoding(*args, **kwargs):
        raise AssertionError("PIL opened an image already over the limit")

    monkeypatch.setattr(Image, "open", no_decoding)
    why = admit("icon.ico", ico, limits).problem
    assert why is not None and "300x300" in why
    batch = decode_encoded([ico], (16, 16), "pil", names=["icon.ico"], limits=limits)
    assert not batch.ok[0] and "300x300" in batch.errors[0]


def test_an_ico_within_the_limit_still_decodes():
    small = _png(np.full((32, 32, 3), 200, dtype=np.uint8))
    batch = decode_encoded([_ico_with(small, 32)], (8, 8), "pil")
    assert batch.ok.all() and int(batch.pixels.float().mean()) == 200


def test_files_are_read_in_groups_within_the_byte_budget(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    paths = []
    for i in range(7):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(path, "JPEG", quality=95)
        paths.append(str(path))
    paths.insert(3, None)  # a post without an image keeps its row
    whole = decode_uint8(paths, (24, 24), "pil")
    sizes = [0 if p is None else (tmp_path / p).stat().st_size for p in paths]
    budget = 2 * max(sizes)
    held = []
    real = images._decode_loaded

    def watched(names, loaded, *args, **kwargs):
        held.append(sum(len(image.data) for image in loaded if image.data is not None))
        return real(names, loaded, *args, **kwargs)

    monkeypatch.setattr(images, "_decode_loaded", watched)
    monkeypatch.setattr(images, "READ_BUDGET", budget)
    grouped = decode_uint8(paths, (24, 24), "pil")
    assert len(held) >= 3 and max(held) <= budget
    assert torch.equal(grouped.pixels, whole.pixels) and torch.equal(grouped.ok, whole.ok)
    assert grouped.errors == whole.errors == {3: "no image"}


def test_files_are_read_into_one_buffer_each(tmp_path):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (8, 8)).save(path, "JPEG")
    data, err = read_image_file(str(path))
    assert err is None and isinstance(data, bytearray)  # torchvision wraps it as it is, no second copy


@pytest.mark.parametrize("backend", [b for b in ("torchvision",) if b in available_backends()])
def test_a_fast_backend_decodes_the_grouped_files_as_pil_does(tmp_path, monkeypatch, backend):
    rng = np.random.default_rng(3)
    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path, "JPEG", quality=95)
        paths.append(str(path))
    whole = decode_uint8(paths, (32, 32), backend)
    monkeypatch.setattr(images, "READ_BUDGET", 1)  # one file a group
    assert torch.equal(decode_uint8(paths, (32, 32), backend).pixels, whole.pixels)
