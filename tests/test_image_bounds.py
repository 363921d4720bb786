"""Image files are read with bounds decided once for every backend: regular files only, a byte limit, a pixel
limit read from the header before decoding. Hostile inputs (``/dev/zero``, a named pipe, an 8 GB sparse file, a
16000 x 16000 decompression bomb) run in a child process with a hang guard and a peak-memory reading: without
the bounds the first three read gigabytes or hang, and the bomb decodes to 768 MB."""

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from cmc_fast.data_pipeline.check import check_images
from cmc_fast.data_pipeline.image_backend import available_backends
from cmc_fast.data_pipeline.image_files import Limits, header_dimensions, read_image_file
from cmc_fast.data_pipeline.image_source import CachedImages, StreamingImages
from cmc_fast.data_pipeline.images import decode_encoded, decode_uint8
from PIL import Image

BOMB_SIDE = 16000
FAST = [b for b in ("torchvision", "dali") if b in available_backends()]
BACKENDS = ["pil", *FAST]


def _jpeg(w: int = 24, h: int = 16, seed: int = 0) -> bytes:
    import numpy as np

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def jpeg_bomb(side: int = BOMB_SIDE) -> bytes:
    """A few hundred bytes whose frame header declares side x side pixels (the scan data is a small image's):
    a decoder allocates the declared size and fills it."""
    data = bytearray(_jpeg())
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    data[i + 5:i + 7] = side.to_bytes(2, "big")
    data[i + 7:i + 9] = side.to_bytes(2, "big")
    return bytes(data)


def png_bomb(side: int = BOMB_SIDE) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:20] = side.to_bytes(4, "big")
    data[20:24] = side.to_bytes(4, "big")
    return bytes(data)


@pytest.fixture
def hostile(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    sparse = tmp_path / "sparse.jpg"
    with open(sparse, "wb") as f:
        f.write(_jpeg()[:64])
        f.truncate(8 << 30)  # 8 GB, no blocks on disk
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(jpeg_bomb())
    good = tmp_path / "good.jpg"
    good.write_bytes(_jpeg())
    return {"dev_zero": "/dev/zero", "fifo": str(fifo), "sparse": str(sparse), "folder": str(folder),
            "bomb": str(bomb), "good": str(good)}


def test_the_bomb_declares_its_size_and_a_small_image_decodes(tmp_path):
    assert header_dimensions(jpeg_bomb()) == (BOMB_SIDE, BOMB_SIDE)
    assert header_dimensions(png_bomb()) == (BOMB_SIDE, BOMB_SIDE)
    assert header_dimensions(_jpeg(24, 16)) == (24, 16)
    for fmt, size in (("GIF", (30, 20)), ("BMP", (31, 21)), ("WEBP", (33, 22)), ("TIFF", (34, 23))):
        buf = io.BytesIO()
        Image.new("RGB", size, (1, 2, 3)).save(buf, fmt)
        assert header_dimensions(buf.getvalue()) == size, fmt


@pytest.mark.parametrize("name, reason", [("dev_zero", "a character device"), ("fifo", "a named pipe"),
                                          ("folder", "a directory"), ("sparse", "over the byte limit")])
def test_what_is_not_read(hostile, name, reason):
    data, err = read_image_file(hostile[name])
    assert data is None and reason in err and hostile[name] in err


def test_the_byte_limit_is_the_flag(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(_jpeg())
    size = path.stat().st_size
    assert read_image_file(str(path), Limits(max_bytes=size))[0] == path.read_bytes()
    data, err = read_image_file(str(path), Limits(max_bytes=size - 1))
    assert data is None and f"{size} bytes, over the byte limit of {size - 1} (--max-image-bytes)" in err


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: nvJPEG paths not exercised"))])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [jpeg_bomb, png_bomb], ids=["jpeg", "png"])
def test_the_bomb_is_refused_by_every_backend_before_decoding(tmp_path, backend, make, device):
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(make())
    good = tmp_path / "good.jpg"
    good.write_bytes(_jpeg())
    res = decode_uint8([str(bomb), str(good)], (32, 32), backend=backend, device=device)
    assert res.ok.tolist() == [False, True]
    assert "over the pixel limit of 40000000 (--max-image-pixels)" in res.errors[0] and str(bomb) in res.errors[0]
    res = decode_encoded([make()], (32, 32), backend=backend, names=["b"], device=device)
    assert not res.ok[0] and "pixel limit" in res.errors[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_pixel_limit_is_the_flag(tmp_path, backend):
    path = tmp_path / "a.jpg"
    path.write_bytes(_jpeg(24, 16))
    assert decode_uint8([str(path)], (8, 8), backend=backend, limits=Limits(max_pixels=24 * 16)).ok.all()
    res = decode_uint8([str(path)], (8, 8), backend=backend, limits=Limits(max_pixels=24 * 16 - 1))
    assert not res.ok[0] and "24x16 = 384 pixels" in res.errors[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_sources_and_data_check_report_the_same_reasons(hostile, backend):
    names = ["dev_zero", "fifo", "sparse", "folder", "bomb", "good"]
    paths = [[hostile[n]] for n in names]
    cached = CachedImages.build(paths, (16, 16), backend, progress=False)
    streamed = StreamingImages.build(paths, (16, 16), backend, validate=True, progress=False)
    report = check_images([hostile[n] for n in names], backend=backend)
    unreadable = {u["path"]: u["error"] for u in report["unreadable"]}
    for src in (cached, streamed):
        assert src.ok.tolist() == [False] * 5 + [True]
    for i, reason in enumerate(["a character device", "a named pipe", "over the byte limit", "a directory",
                                "over the pixel limit"]):
        assert reason in cached.errors[i] and reason in streamed.errors[i]
        assert reason in unreadable[hostile[names[i]]]
    assert hostile["good"] not in unreadable


def test_hostile_files_take_bounded_time_and_memory(hostile):
    """In a child: every backend and ``data check`` over the hostile files, after a warm-up decode of a good image
    on each backend (imports and pools are in the baseline). A hang (the FIFO) is caught by the timeout; reading
    /dev/zero or the sparse file, or decoding the bomb (768 MB of pixels), would lift the peak RSS by far more
    than the 256 MB allowed."""
    code = textwrap.dedent(f"""
        import json, resource
        from cmc_fast.data_pipeline import images
        from cmc_fast.data_pipeline.check import check_images
        def peak_mb():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        paths = {json.dumps([hostile[n] for n in ("dev_zero", "fifo", "sparse", "bomb", "good")])}
        backends = {json.dumps(BACKENDS)}
        for backend in backends:
            images.decode_uint8(paths[-1:], (32, 32), backend=backend)
        check_images(paths[-1:], backend="pil")
        out = {{"baseline_mb": peak_mb()}}
        for backend in backends:
            out[backend] = images.decode_uint8(paths, (32, 32), backend=backend).ok.tolist()
        out["check"] = sorted(u["path"] for u in check_images(paths, backend="pil")["unreadable"])
        out["peak_mb"] = peak_mb()
        print(json.dumps(out))
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for backend in BACKENDS:
        assert out[backend] == [False, False, False, False, True], backend
    assert out["check"] == sorted([hostile[n] for n in ("dev_zero", "fifo", "sparse", "bomb")])
    assert out["peak_mb"] - out["baseline_mb"] < 256, out


def test_train_and_data_check_report_over_limit_images_alike(tmp_path, hostile, capsys, monkeypatch):
    """End to end: a manifest whose posts point at the hostile files; ``train`` drops those posts for image
    variants with the reason in skipped.json, ``data check`` lists the same files with the same reasons.
    (/dev/zero is outside the manifest's folder: allowed here by the opt-in, so the reader's bounds are tested.)"""
    from cmc_fast.cli import main

    monkeypatch.setenv("CMC_FAST_IMAGES_ANYWHERE", "1")

    bad = ["dev_zero", "fifo", "sparse", "bomb"]
    posts = [{"text": f"post {i} about topic {i % 5}", "label": i % 2, "image": hostile[bad[i]] if i < 4 else
              str(tmp_path / f"img{i}.jpg")} for i in range(40)]
    posts += [{"text": f"test post {i}", "label": i % 2, "split": "test", "image": str(tmp_path / f"t{i}.jpg")}
              for i in range(8)]
    for p in posts[4:]:
        with open(p["image"], "wb") as f:
            f.write(_jpeg(seed=len(p["text"])))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(p) for p in posts) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "manifest", "--data-root", str(manifest), "--variant", "finetune-v",
                 "--image-model", "tiny", "--image-weights", "none", "--epochs", "1", "--batch-size", "8",
                 "--image-size", "16,16", "--val-split", "random", "--no-progress", "--out", str(out)]) == 0
    skipped = {s["id"]: s["reason"] for s in json.loads((out / "skipped.json").read_text())}
    capsys.readouterr()
    assert main(["data", "check", "--dataset", "manifest", "--data-root", str(manifest), "--json"]) == 0
    unreadable = {u["path"]: u["error"] for u in json.loads(capsys.readouterr().out)["images"]["unreadable_list"]}
    assert len(unreadable) == len(bad)
    for i, name in enumerate(bad):
        reason = {"dev_zero": "a character device", "fifo": "a named pipe", "sparse": "over the byte limit",
                  "bomb": "over the pixel limit"}[name]
        assert reason in skipped[f"m.jsonl:{i + 1}"] and reason in unreadable[hostile[name]]
    # the flags: every 24x16 image is over a 100-pixel limit
    assert main(["data", "check", "--dataset", "manifest", "--data-root", str(manifest), "--json",
                 "--max-image-pixels", "100"]) == 0
    unreadable = json.loads(capsys.readouterr().out)["images"]["unreadable_list"]
    assert len(unreadable) == len(posts) and sum("24x16 = 384 pixels" in u["error"] for u in unreadable) == 44

