"""The image-limits gate (``image_files``): the limits are validated in one place, alike for ``train``'s flags,
``data check``'s flags and the library; and every backend, ``decode_pil_path``, the training sources and
``data check`` refuse the same over-limit file with the same reason, on fresh random images."""

from __future__ import annotations

import argparse
import io
import os

import numpy as np
import pytest
from cmc_fast.data_pipeline import check
from cmc_fast.data_pipeline.check import check_images
from cmc_fast.data_pipeline.decoders import decode_pil_path
from cmc_fast.data_pipeline.image_backend import available_backends
from cmc_fast.data_pipeline.image_files import Limits, admit
from cmc_fast.data_pipeline.image_source import CachedImages, StreamingImages
from cmc_fast.data_pipeline.images import decode, decode_encoded, decode_uint8
from PIL import Image

from cmc_fast.config import Config
from cmc_fast.errors import UsageError

BACKENDS = ["auto", *available_backends()]  # auto, then every concrete backend installed here (pil always)


@pytest.fixture
def rng():
    return np.random.default_rng(int.from_bytes(os.urandom(4), "little"))


def _random_image(rng, fmt: str, **save) -> tuple[bytes, tuple[int, int]]:
    w, h = int(rng.integers(17, 90)), int(rng.integers(17, 90))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt, **save)
    return buf.getvalue(), (w, h)


def _scans(data: bytes) -> int:
    """Start-of-scan segments counted by walking the JPEG's markers (PIL's own parser is not exposed)."""
    n, i = 0, 2
    while i + 4 <= len(data):
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xD9:
            break
        if marker != 0xDA:
            i += 2 + length
            continue
        n += 1
        i += 2 + length
        while not (data[i] == 0xFF and data[i + 1] not in (0x00, *range(0xD0, 0xD8))):  # skip the entropy-coded data
            i += 1
    return n


def _cases(rng, tmp_path):
    """(name, file bytes, limits it just fits, limits one unit tighter, words the refusal must hold)."""
    jpeg, (w, h) = _random_image(rng, "JPEG", quality=int(rng.integers(60, 96)))
    png, (pw, ph) = _random_image(rng, "PNG")
    progressive, (qw, qh) = _random_image(rng, "JPEG", quality=90, progressive=True)
    last, end = progressive.rindex(b"\xff\xda"), progressive.rindex(b"\xff\xd9")
    repeats = int(rng.integers(2, 9))
    bomb = progressive[:end] + progressive[last:end] * repeats + progressive[end:]  # the last scan, repeated
    scans = _scans(bomb)
    assert scans == _scans(progressive) + repeats
    return [
        ("bytes.jpg", jpeg, Limits(max_bytes=len(jpeg)), Limits(max_bytes=len(jpeg) - 1),
         [f"{len(jpeg)} bytes", f"byte limit of {len(jpeg) - 1}", "--max-image-bytes"]),
        ("pixels.jpg", jpeg, Limits(max_pixels=w * h), Limits(max_pixels=w * h - 1),
         [f"{w}x{h}", f"pixel limit of {w * h - 1}", "--max-image-pixels"]),
        ("pixels.png", png, Limits(max_pixels=pw * ph), Limits(max_pixels=pw * ph - 1),
         [f"{pw}x{ph}", f"pixel limit of {pw * ph - 1}", "--max-image-pixels"]),
        ("scans.jpg", bomb, Limits(max_jpeg_scans=scans), Limits(max_jpeg_scans=scans - 1),
         [f"{qw}x{qh}", f"{scans} scans"]),
    ]


def test_every_path_refuses_an_over_limit_file_with_the_same_reason(rng, tmp_path):
    for name, data, fits, tight, words in _cases(rng, tmp_path):
        path = tmp_path / name
        path.write_bytes(data)
        p = str(path)
        for backend in BACKENDS:
            assert decode_uint8([p], (12, 12), backend, limits=fits).ok.all(), (name, backend)
        reasons = {}
        for backend in BACKENDS:
            reasons[f"decode_uint8 {backend}"] = decode_uint8([p], (12, 12), backend, limits=tight).errors.get(0)
            reasons[f"decode {backend}"] = decode([p], (12, 12), backend, limits=tight).errors.get(0)
            reasons[f"decode_encoded {backend}"] = decode_encoded([data], (12, 12), backend, names=[p],
                                                                  limits=tight).errors.get(0)
            sources = (CachedImages.build([[p]], (12, 12), backend, progress=False, limits=tight),
                       StreamingImages.build([[p]], (12, 12), backend, validate=True, progress=False, limits=tight))
            for source in sources:
                assert not source.ok.any()
                reasons[f"{type(source).__name__} {backend}"] = source.errors[0]
        with pytest.raises(ValueError) as refused:
            decode_pil_path(p, (12, 12), tight)
        reasons["decode_pil_path"] = str(refused.value)
        for decoding in (True, False):
            report = check_images([p], backend="pil", decode=decoding, limits=tight)
            (finding,) = report["unreadable"]
            reasons[f"data check decode={decoding}"] = f"{finding['path']}: {finding['error']}"
        reason = admit(p, data, tight).problem
        assert reason is not None and all(word in reason for word in words), (name, reason)
        wrong = {where: r for where, r in reasons.items() if r is None or not r.endswith(reason)}
        assert not wrong, (name, reason, wrong)


@pytest.mark.parametrize("field, flag", [("max_bytes", "--max-image-bytes"), ("max_pixels", "--max-image-pixels"),
                                         ("max_jpeg_scans", "max_jpeg_scans"),
                                         ("max_scan_passes", "max_scan_passes")])
def test_limits_below_one_are_refused_naming_the_flag(rng, field, flag):
    bad = int(rng.integers(-10**6, 1))
    with pytest.raises(ValueError, match=f"{flag}: must be >= 1, got {bad}"):
        Limits(**{field: bad})
    assert Limits(**{field: 1}) is not None


@pytest.mark.parametrize("field, flag", [("max_image_bytes", "max_bytes"), ("max_image_pixels", "max_pixels")])
def test_train_and_data_check_refuse_bad_limits_with_the_gates_words(rng, capsys, field, flag):
    bad = int(rng.integers(-10**6, 1))
    with pytest.raises(ValueError) as gate:
        Limits(**{flag: bad})
    with pytest.raises(UsageError) as train:
        Config(**{field: bad}).validate()
    assert str(train.value) == str(gate.value)
    args = argparse.Namespace(dataset="synthetic", data_root=None, json=True, image_backend=None, no_decode=True,
                              require_images=False, max_image_bytes=64 << 20, max_image_pixels=40_000_000, show=5)
    setattr(args, field, bad)
    capsys.readouterr()
    assert check.run(args) == 2
    assert capsys.readouterr().err.strip() == f"cmc-fast data check: {gate.value}"
