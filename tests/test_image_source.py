"""ImageSource: cached and streaming give the same ordered batches; first decodable candidate; memmap cache reuse."""

from __future__ import annotations

import io
import os

import cmc_fast.data_pipeline.image_source as image_source_module
import numpy as np
import pytest
import torch
from cmc_fast.data_pipeline.image_backend import available_backends
from cmc_fast.data_pipeline.image_source import CachedImages, ImageSource, StreamingImages, finish_batch, image_source
from cmc_fast.data_pipeline.images import decode_uint8, normalize
from PIL import Image

SIZE = (40, 32)
FAST = available_backends()[0]


def _jpeg(seed: int, h: int, w: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w])
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def records(tmp_path) -> list[list[str]]:
    """12 records: plain JPEGs of different sizes, plus ones whose first candidate is bad or missing."""
    def put(name: str, data: bytes) -> str:
        path = tmp_path / name
        path.write_bytes(data)
        return str(path)

    good = [put(f"img{i}.jpg", _jpeg(i, 30 + 9 * i, 50 + 4 * i)) for i in range(8)]
    trunc = put("trunc.jpg", _jpeg(99, 64, 64)[:900])
    empty = put("empty.jpg", b"")
    return [
        [good[0]], [good[1]], [trunc, good[2]], [good[3], good[4]],  # 2: first candidate truncated
        [], [str(tmp_path / "missing.jpg"), good[5]], [good[6]], [empty],  # 4: none; 5: missing first; 7: empty
        [trunc], [good[7]], [empty, str(tmp_path / "gone.jpg")], [good[1]],  # 8, 10: nothing decodable
    ]


def test_protocol_and_errors(records):
    for src in (CachedImages.build(records, SIZE, FAST, progress=False),
                StreamingImages.build(records, SIZE, FAST, validate=True, progress=False)):
        assert isinstance(src, ImageSource) and len(src) == 12
        assert src.ok.tolist() == [True, True, True, True, False, True, True, False, False, True, False, True]
        assert src.errors[4] == "no image"
        assert "empty file (0 bytes)" in src.errors[7]
        assert "trunc.jpg" in src.errors[8] and "JPEG without end marker" in src.errors[8]
        assert "empty file" in src.errors[10] and "gone.jpg: cannot read" in src.errors[10]
        assert set(src.errors) == {4, 7, 8, 10}


def test_cached_equals_streaming_in_order(records):
    cached = CachedImages.build(records, SIZE, FAST, progress=False)
    streaming = StreamingImages(records, SIZE, FAST)
    idx = torch.tensor([9, 2, 4, 0, 5, 11, 8, 3, 2])  # repeats, failures, multi-candidate records
    a = cached.batch(idx, train=False, device="cpu")
    b = streaming.batch(idx, train=False, device="cpu")
    assert a.shape == (9, 3, *SIZE) and a.dtype == torch.float32
    assert torch.equal(a, b)
    # row i is record idx[i]: its first decodable candidate, normalised; failed records are zero rows
    chosen = {0: records[0][0], 2: records[2][1], 3: records[3][0], 5: records[5][1], 9: records[9][0],
              11: records[11][0]}
    for i, r in enumerate(idx.tolist()):
        if r in chosen:
            ref = normalize(decode_uint8([chosen[r]], SIZE, backend=FAST).pixels)[0]
            assert torch.equal(a[i], ref), (i, r)
        else:
            assert not a[i].any(), (i, r)
    assert cached.chosen[2] == records[2][1] and cached.chosen[4] is None
    assert streaming.ok.tolist() == cached.ok.tolist() and streaming.errors == cached.errors


def test_train_flip_on_device_and_same_rng(records):
    cached = CachedImages.build(records, SIZE, FAST, progress=False)
    streaming = StreamingImages(records, SIZE, FAST)
    idx = torch.arange(12)
    plain = cached.batch(idx, train=False, device="cpu")
    torch.manual_seed(3)
    a = cached.batch(idx, train=True, device="cpu")
    torch.manual_seed(3)
    b = streaming.batch(idx, train=True, device="cpu")
    assert torch.equal(a, b)
    flipped = [torch.equal(a[i], plain[i].flip(-1)) and not torch.equal(a[i], plain[i]) for i in range(12)]
    kept = [torch.equal(a[i], plain[i]) for i in range(12)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped)


def test_memmap_cache_reused(records, tmp_path, monkeypatch):
    path = str(tmp_path / "cache" / "images.u8")
    first = CachedImages.build(records, SIZE, FAST, path, progress=False)
    assert not first.reused and os.path.getsize(path) == 12 * 3 * SIZE[0] * SIZE[1]
    assert os.path.exists(path + ".json")

    def no_decoding(*_a, **_k):
        raise AssertionError("a reused cache must not decode")

    monkeypatch.setattr(image_source_module, "decode_uint8", no_decoding)
    again = CachedImages.build(records, SIZE, FAST, path, progress=False)
    assert again.reused and isinstance(again.pixels, torch.Tensor)
    assert torch.equal(again.pixels, first.pixels) and again.errors == first.errors
    assert again.ok.tolist() == first.ok.tolist() and again.chosen == first.chosen
    idx = torch.tensor([3, 9, 2])
    assert torch.equal(again.batch(idx, train=False, device="cpu"), first.batch(idx, train=False, device="cpu"))
    monkeypatch.undo()
    # a different key (size, backend, or a changed file) rebuilds
    assert not CachedImages.build(records, (24, 24), FAST, path, progress=False).reused
    os.utime(records[0][0], ns=(1, 1))
    rebuilt = CachedImages.build(records, (24, 24), FAST, path, progress=False)
    assert not rebuilt.reused and rebuilt.pixels.shape == (12, 3, 24, 24)


def test_factory_and_empty(tmp_path):
    assert isinstance(image_source([], SIZE, "pil"), StreamingImages)
    src = image_source([], SIZE, "pil", cache_path=str(tmp_path / "e.u8"), progress=False)
    assert isinstance(src, CachedImages) and len(src) == 0
    assert image_source([], SIZE, "pil", cache_path=str(tmp_path / "e.u8"), progress=False).reused


def test_finish_batch_zeroes_failed_rows():
    px = torch.full((3, 3, 4, 4), 200, dtype=torch.uint8)
    out = finish_batch(px, torch.tensor([True, False, True]), train=False, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and not out[1].any() and out[0].abs().sum() > 0


def test_real_weibo_cached_equals_streaming(shared_data):
    root = os.path.join(shared_data, "weibo", "rumor_images")
    recs = [[os.path.join(root, f)] for f in sorted(os.listdir(root))][:64]
    cached = CachedImages.build(recs, (256, 128), "torchvision", progress=False)
    streaming = StreamingImages(recs, (256, 128), "torchvision")
    idx = torch.randperm(len(recs), generator=torch.Generator().manual_seed(0))[:32]
    assert bool(cached.ok.all())
    assert torch.equal(cached.batch(idx, train=False, device="cpu"), streaming.batch(idx, train=False, device="cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_batches(records):
    cached = CachedImages.build(records, SIZE, FAST, device="cuda", progress=False)
    streaming = StreamingImages(records, SIZE, FAST)
    idx = torch.tensor([9, 2, 4, 0, 5])
    a = cached.batch(idx, train=False, device="cuda")
    b = streaming.batch(idx, train=False, device="cuda")  # decodes on the GPU
    assert a.is_cuda and b.is_cuda
    # nvJPEG may split a batch between the hardware and the CUDA decoder, which can round an IDCT differently
    d = (a - b).abs()
    assert d.mean().item() < 0.01 and d.max().item() < 0.2, (d.mean().item(), d.max().item())
