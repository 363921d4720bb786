"""Image backends: one batch contract, agreement on the real Weibo images, and every bad-image kind's outcome."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from cmc_fast.data_pipeline import decoders, image_backend, images
from cmc_fast.data_pipeline.image_backend import available_backends, dali_available, resolve_backend
from cmc_fast.data_pipeline.images import ImageBatch, decode, decode_encoded, decode_uint8, normalize
from cmc_fast.data_pipeline.jpeg import sniff
from PIL import Image

BACKENDS = available_backends()  # concrete backends here: dali (when installed), torchvision, pil
FAST = [b for b in BACKENDS if b != "pil"]
needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI not installed (optional 'dali' extra)")

# Agreement tolerances, 0-255 units, over all pixels of the 268 real Weibo JPEGs at 224x224 (measured on this
# code: torchvision-PIL mean 0.035 / p99.9 2 / max 15, DALI-PIL 0.134 / 3 / 18, DALI-torchvision 0.128 / 3 / 18).
# The decoders agree bit-exactly before resizing; all of it is the resamplers' kernels and rounding, the maxima
# a handful of pixels on sharp edges.
TOL = {"mean": 0.5, "image_mean": 1.0, "p999": 6, "max": 40}


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def weibo_paths(shared_data: str) -> list[str]:
    root = os.path.join(shared_data, "weibo")
    paths = [os.path.join(root, d, f) for d in ("rumor_images", "nonrumor_images")
             for f in sorted(os.listdir(os.path.join(root, d)))]
    if len(paths) != 268:
        pytest.skip(f"expected the 268 public Weibo images under {root}, found {len(paths)}")
    return paths


def diff_stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Absolute differences in 0-255 units: overall mean, the worst image's mean, 99.9th percentile, maximum."""
    d = (a.to(torch.int16) - b.to(torch.int16)).abs().to(torch.uint8)
    counts = torch.bincount(d.flatten(), minlength=256)
    levels = torch.arange(256)
    cum = counts.cumsum(0)
    return {"mean": float((counts * levels).sum()) / d.numel(),
            "image_mean": d.reshape(d.shape[0], -1).float().mean(1).max().item() if d.dim() == 4 else 0.0,
            "p999": int(torch.searchsorted(cum, torch.tensor(0.999 * float(cum[-1])).ceil().long())),
            "max": int(levels[counts > 0].max())}


# ---------------------------------------------------------------------------------------------------------
# real images


_DECODED: dict[str, tuple[list[str], dict[str, ImageBatch]]] = {}


@pytest.fixture
def weibo_decoded(shared_data) -> tuple[list[str], dict[str, ImageBatch]]:
    """All 268 images through every backend, decoded once per session (``shared_data`` is function-scoped)."""
    if shared_data not in _DECODED:
        paths = weibo_paths(shared_data)
        _DECODED[shared_data] = (paths, {b: decode_uint8(paths, (224, 224), backend=b) for b in BACKENDS})
    return _DECODED[shared_data]


def test_real_weibo_all_decode(weibo_decoded):
    paths, out = weibo_decoded
    for backend, res in out.items():
        assert res.pixels.shape == (268, 3, 224, 224) and res.pixels.dtype == torch.uint8, backend
        assert bool(res.ok.all()), (backend, res.errors)
        assert res.errors == {} and res.fallback == {}, backend  # incl. the one greyscale JPEG: fast path


@pytest.mark.parametrize("pair", [("torchvision", "pil"), ("dali", "pil"), ("dali", "torchvision")])
def test_real_weibo_backends_agree(weibo_decoded, pair, capsys):
    _, out = weibo_decoded
    if pair[0] not in out or pair[1] not in out:
        pytest.skip(f"{pair[0]} not available here")
    stats = diff_stats(out[pair[0]].pixels, out[pair[1]].pixels)
    with capsys.disabled():
        print(f"\n[agreement 224x224, 268 Weibo JPEGs] {pair[0]} vs {pair[1]}: mean abs diff {stats['mean']:.4f}, "
              f"worst image mean {stats['image_mean']:.3f}, p99.9 {stats['p999']:.0f}, max {stats['max']:.0f}")
    for key, tol in TOL.items():
        assert stats[key] <= tol, (pair, key, stats)


@pytest.mark.parametrize("backend", FAST)
def test_real_weibo_trainer_geometry_and_normalised(shared_data, backend):
    """The trainer's 256x128 (H x W) geometry on a slice, and the float contract (DALI normalises in-pipeline)."""
    paths = weibo_paths(shared_data)[::18]
    ref = decode_uint8(paths, (256, 128), backend="pil")
    got = decode_uint8(paths, (256, 128), backend=backend)
    assert got.pixels.shape == (len(paths), 3, 256, 128)
    stats = diff_stats(got.pixels, ref.pixels)
    assert stats["mean"] <= TOL["mean"] and stats["max"] <= TOL["max"], stats
    flt = decode(paths, (256, 128), backend=backend, normalize=True)
    assert flt.pixels.dtype == torch.float32 and bool(flt.ok.all())
    torch.testing.assert_close(flt.pixels, normalize(got.pixels), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# bad images, built here


def _picture(h: int = 90, w: int = 120) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8)
    rgb[20:40, 30:70] = (250, 20, 30)
    return Image.fromarray(rgb, "RGB")


def _grey16(im: Image.Image) -> Image.Image:
    """The picture's greyscale at 16 bits (v * 257: top byte = low byte = v), as a 16-bit PNG stores it."""
    return Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257)


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def _undecodable_jpeg(good: bytes) -> bytes:
    """Markers intact (passes the sniff, goes to the fast backend) but a component names an undefined
    quantisation table: every decoder refuses it."""
    data = bytearray(good)
    i = 2
    while data[i + 1] != 0xC0:
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    data[i + 12] = 3  # first component's quantisation table selector
    return bytes(data)


@pytest.fixture
def bad_files(tmp_path) -> dict[str, str]:
    pic = _picture()
    good = _jpeg(pic)
    files = {
        "good": good,
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "png": (lambda b: (pic.save(b, format="PNG"), b.getvalue())[1])(io.BytesIO()),
        "gif": (lambda b: (pic.save(b, format="GIF"), b.getvalue())[1])(io.BytesIO()),
        "tiff": (lambda b: (pic.save(b, format="TIFF"), b.getvalue())[1])(io.BytesIO()),
        "webp": (lambda b: (pic.save(b, format="WEBP", lossless=True), b.getvalue())[1])(io.BytesIO()),
        "png16": (lambda b: (_grey16(pic).save(b, format="PNG"), b.getvalue())[1])(io.BytesIO()),
        "cmyk": _jpeg(pic.convert("CMYK")),
        "gray": _jpeg(pic.convert("L")),
        "text": b"this is not an image at all",
        "undecodable": _undecodable_jpeg(good),
    }
    paths = {}
    for name, data in files.items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        paths[name] = str(path)
    paths["missing"] = str(tmp_path / "missing.jpg")
    return paths


# kind -> (ok, where it is decoded: "fast" | "pil" | None, words the error or fallback note must contain)
OUTCOMES = {
    "good": (True, "fast", None),
    "truncated": (False, None, "JPEG without end marker"),
    "empty": (False, None, "empty file (0 bytes)"),
    "png": (True, "pil", "PNG content"),
    "gif": (True, "pil", "GIF content"),
    "tiff": (True, "pil", "TIFF content"),
    "webp": (True, "pil", "WebP content"),
    "png16": (True, "pil", "PNG content"),
    "cmyk": (True, "pil", "CMYK JPEG"),
    "gray": (True, "fast", None),
    "text": (False, None, "unrecognised format"),
    "undecodable": (False, None, "PIL:"),
    "missing": (False, None, "cannot read: FileNotFoundError"),
}


def test_sniff(bad_files):
    kinds = {k: sniff(read(p)) for k, p in bad_files.items() if k != "missing"}
    assert kinds == {"good": "jpeg", "truncated": "jpeg-no-eoi", "empty": "empty", "png": "png", "gif": "gif",
                     "cmyk": "jpeg-cmyk", "gray": "jpeg", "text": "unknown", "undecodable": "jpeg", "tiff": "tiff",
                     "webp": "webp", "png16": "png"}
    assert sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp" and sniff(b"BM\x00\x00") == "bmp"


def _segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each header segment of a clean JPEG, up to and including the scan header."""
    out, i = [], 2
    while True:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        out.append((marker, i, i + 2 + length))
        if marker == 0xDA:
            return out
        i += 2 + length


def test_sniff_sends_broken_headers_to_pil():
    """The header is walked up to the scan: 4 bytes inserted at the start of a table, frame or scan header, a second
    SOI, a Huffman table whose counts do not match its symbols or with a DC symbol over 15 -> "jpeg-other" (PIL),
    while clean JPEGs of every kind the fast backends take stay "jpeg". (Fuzzing showed DALI's multi-threaded CPU
    decoder crashing the process on such headers.)"""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    pic = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    clean = [_jpeg(pic), _jpeg(pic, progressive=True), _jpeg(pic.convert("L")), _jpeg(pic, subsampling=0),
             _jpeg(pic, exif=exif.tobytes()), _jpeg(pic, optimize=True)]
    for data in clean:
        assert sniff(data) == "jpeg"
        for marker, start, _ in _segments(data):
            if marker in (0xDB, 0xC4, 0xDA, 0xC0, 0xC1, 0xC2):
                broken = data[:start + 4] + b"\xff\xd8\xff\xe0" + data[start + 4:]
                assert sniff(broken) == "jpeg-other", hex(marker)
        sos = _segments(data)[-1][1]
        assert sniff(data[:sos] + b"\xff\xd8" + data[sos:]) == "jpeg-other"  # a second start of image
    data = clean[0]
    _, start, _ = next(seg for seg in _segments(data) if seg[0] == 0xC4 and data[seg[1] + 4] >> 4 == 0)
    counts = bytearray(data)
    counts[start + 5] = 255  # a code-length count no longer matches the symbols that follow
    assert sniff(bytes(counts)) == "jpeg-other"
    symbols = bytearray(data)
    symbols[start + 4 + 17] = 0xD8  # a DC table's first symbol: sizes above 15 do not exist
    assert sniff(bytes(symbols)) == "jpeg-other"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_image_outcomes(bad_files, backend):
    kinds = list(OUTCOMES) + ["good"]
    paths = [bad_files[k] for k in kinds] + [None]
    res = decode_uint8(paths, (64, 48), backend=backend)  # never raises
    assert res.pixels.shape == (len(paths), 3, 64, 48)
    assert res.errors[len(paths) - 1] == "no image" and not res.ok[-1]
    ref = decode_uint8([bad_files["good"]], (64, 48), backend="pil").pixels[0]
    for i, kind in enumerate(kinds):
        ok, where, words = OUTCOMES[kind]
        assert bool(res.ok[i]) == ok, (kind, res.errors.get(i))
        if not ok:
            assert bad_files[kind] in res.errors[i] and words in res.errors[i], (kind, res.errors[i])
            assert not res.pixels[i].any(), kind  # the slot stays zero
            continue
        assert i not in res.errors
        if where == "pil" or backend == "pil":
            assert (i in res.fallback) == (where == "pil"), kind
            if words:
                assert words in res.fallback[i]
        else:
            assert i not in res.fallback, kind
        if kind == "gray":
            assert torch.equal(res.pixels[i, 0], res.pixels[i, 1]) and torch.equal(res.pixels[i, 1], res.pixels[i, 2])
        elif kind == "png16":  # the 8-bit greyscale it was made from, not a clipped (white) image
            grey = np.asarray(_picture().convert("L").convert("RGB").resize((48, 64), Image.BICUBIC))
            assert torch.equal(res.pixels[i], torch.from_numpy(grey.copy()).permute(2, 0, 1)), kind
        elif kind in ("png", "gif", "tiff", "webp", "good"):
            # same picture as the good JPEG's: GIF through a 256-colour palette, JPEGs a few levels off at edges
            assert diff_stats(res.pixels[i], ref)["mean"] < 4, kind
    if backend != "pil":
        assert "failed" in res.errors[kinds.index("undecodable")]  # the fast backend tried, then PIL


@pytest.mark.parametrize("backend", FAST)
def test_fast_backend_recovers_after_a_failing_batch(bad_files, backend):
    """A batch that makes the fast decoder raise is bisected; the good neighbours still come from the fast backend
    and the backend (a rebuilt DALI pipeline) keeps working for the next call."""
    paths = [bad_files["good"], bad_files["gray"], bad_files["undecodable"], bad_files["good"]]
    res = decode_uint8(paths, (32, 32), backend=backend)
    assert res.ok.tolist() == [True, True, False, True] and res.fallback == {}
    again = decode_uint8([bad_files["good"]] * 3, (32, 32), backend=backend)
    assert bool(again.ok.all()) and torch.equal(again.pixels[0], res.pixels[0])


def test_fast_failure_falls_back_to_pil(bad_files, monkeypatch):
    """Whatever the fast backend fails on goes to PIL: simulate a batched decoder that refuses one sample."""
    good = read(bad_files["good"])
    gray = read(bad_files["gray"])
    calls = []

    def picky(blobs, size, device, normalize_, chunk, workers):
        def run(idx):
            calls.append(len(idx))
            if any(blobs[j] is gray for j in idx):
                raise RuntimeError("simulated decoder failure")
            for j in idx:
                out[j] = torch.from_numpy(decoders.pil_decode(blobs[j], size))

        out = torch.zeros((len(blobs), 3, *size), dtype=torch.uint8)
        return out, decoders.isolate_failures(run, len(blobs))

    monkeypatch.setitem(images._FAST, "torchvision", picky)
    res = decode_encoded([good, good, gray, good, good], (40, 40), backend="torchvision")
    assert bool(res.ok.all()) and list(res.fallback) == [2]
    assert "simulated decoder failure" in res.fallback[2]
    assert calls[0] == 5 and len(calls) > 2  # one batched call, then bisection
    assert torch.equal(res.pixels[2], decode_encoded([gray], (40, 40), backend="pil").pixels[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_order_preserved_across_chunks_and_routes(bad_files, backend):
    pics = [_jpeg(_picture(50 + 7 * k, 60 + 5 * k)) for k in range(6)]
    kinds = ["png", "good", "missing", "cmyk", "gray", "truncated"]
    blobs: list[bytes | None] = []
    for k in range(6):
        blobs += [pics[k], None if kinds[k] == "missing" else read(bad_files[kinds[k]])]
    res = decode_encoded(blobs, (24, 20), backend=backend, chunk=3)
    for i, blob in enumerate(blobs):
        single = decode_encoded([blob], (24, 20), backend=backend)
        assert bool(res.ok[i]) == bool(single.ok[0]), i
        assert torch.equal(res.pixels[i], single.pixels[0]), i


def test_decode_bytes_equals_paths(bad_files):
    paths = [bad_files[k] for k in ("good", "png", "gray")]
    blobs = [read(p) for p in paths]
    backend = BACKENDS[0]
    a = decode_uint8(paths, (33, 31), backend=backend)
    b = decode_encoded(blobs, (33, 31), backend=backend, names=paths)
    assert torch.equal(a.pixels, b.pixels) and a.fallback == b.fallback


def test_float_contract_zeroes_failures(bad_files):
    res = decode([bad_files["good"], bad_files["empty"]], (16, 16), backend="auto", normalize=True,
                 dtype=torch.bfloat16)
    assert res.pixels.dtype == torch.bfloat16 and res.ok.tolist() == [True, False]
    assert not res.pixels[1].any() and res.pixels[0].abs().sum() > 0


def test_backend_choice(monkeypatch):
    assert resolve_backend("auto") == "torchvision"  # on the CPU: DALI's CPU pipeline is not the cheaper one
    monkeypatch.setattr(image_backend, "_dali_builds_on", lambda device: True)  # tested below: the probe on CUDA
    assert resolve_backend("auto", "cuda") == BACKENDS[0]
    assert resolve_backend("PIL") == "pil"
    with pytest.raises(ValueError, match="unknown image backend"):
        resolve_backend("opencv")
    monkeypatch.setattr(image_backend, "dali_available", lambda: False)
    assert resolve_backend("auto", "cuda") == "torchvision"
    with pytest.raises(ImportError, match="cmc-fast\\[dali\\]"):
        resolve_backend("dali")
    with pytest.raises(ValueError, match="size"):
        decode_uint8([], (0, 10))
    empty = decode_uint8([], (8, 8), backend="torchvision")
    assert empty.pixels.shape == (0, 3, 8, 8) and empty.ok.shape == (0,)


@needs_dali
def test_dali_pipeline_reused(bad_files):
    decoders._DALI_PIPES.clear()
    decode_uint8([bad_files["good"]] * 5, (32, 32), backend="dali", chunk=4)  # chunks of 4 and 1: one pipeline
    decode_uint8([bad_files["good"]] * 2, (32, 32), backend="dali", chunk=4)
    assert list(decoders._DALI_PIPES) == [(32, 32, 4, None, False, decoders.usable_cores())]


@pytest.fixture
def broken_dali_build(monkeypatch):
    """Every DALI pipeline build fails (as with a driver older than the wheel needs); returns the list of builds.
    The module's pipelines and usability marks are restored afterwards."""
    from nvidia.dali.pipeline import Pipeline

    monkeypatch.setattr(decoders, "_DALI_PIPES", {})
    monkeypatch.setattr(decoders, "_DALI_UNUSABLE", {})
    builds = []

    def build(self, *args, **kwargs):
        builds.append(1)
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    monkeypatch.setattr(Pipeline, "build", build)
    return builds


@needs_dali
def test_dali_pipeline_that_cannot_be_built_is_built_once(bad_files, broken_dali_build):
    """A pipeline that cannot be built is built once, the batch call raises naming why, and DALI is marked unusable
    for that kind of device: 'dali' refuses at once. Before, each 64-image chunk rebuilt it at every step of the
    bisection (127 builds) and PIL then decoded every image under the name 'dali'."""
    paths = [bad_files["good"]] * 64 + [bad_files["gray"]] * 64  # two chunks of 64
    with (pytest.warns(RuntimeWarning, match="could not be built"),
          pytest.raises(decoders.DaliUnusableError, match="driver version is insufficient")):
        decode_uint8(paths, (32, 32), backend="dali")
    assert len(broken_dali_build) == 1
    with pytest.raises(decoders.DaliUnusableError, match="could not be built"):
        decode_uint8(paths[:3], (32, 32), backend="dali")
    with pytest.raises(decoders.DaliUnusableError, match="--image-backend torchvision"):
        resolve_backend("dali")
    assert len(broken_dali_build) == 1
    assert "driver version is insufficient" in decoders.dali_unusable_reason("cpu")
    assert ">= 580" not in decoders.dali_unusable_reason("cpu")  # the driver hint is for GPU pipelines only
    assert decoders.dali_unusable_reason("cuda") is None  # the GPU pipeline was never tried
    assert decode_uint8(paths[:2], (32, 32), backend="torchvision").backend == "torchvision"


@needs_dali
def test_auto_on_cuda_probes_dali_once(broken_dali_build):
    """'auto' on CUDA builds one small DALI pipeline before choosing DALI; when it cannot be built, torchvision is
    chosen, the probe is not repeated, and an explicit 'dali' on CUDA refuses with the reason."""
    with pytest.warns(RuntimeWarning, match="GPU pipeline could not be built"):
        assert resolve_backend("auto", "cuda:0") == "torchvision"
    assert resolve_backend("auto", "cuda") == "torchvision" and len(broken_dali_build) == 1
    with pytest.raises(decoders.DaliUnusableError, match="driver version is insufficient.*>= 580"):
        resolve_backend("dali", "cuda")
    assert resolve_backend("auto") == "torchvision" and decoders.dali_unusable_reason("cpu") is None


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_threaded_decode_equals_one_thread(bad_files, backend):
    """Threads change neither pixels nor which slot failed: a bad file between good ones stays in its place."""
    rng = np.random.default_rng(5)
    names = ["good", "gray", "png", "cmyk", "undecodable", "truncated", "empty", "gif"]
    paths = [bad_files[names[k]] for k in rng.integers(0, len(names), size=23)]
    one = decode_uint8(paths, (37, 29), backend=backend, workers=1, chunk=8)
    many = decode_uint8(paths, (37, 29), backend=backend, workers=3, chunk=8)
    assert torch.equal(one.pixels, many.pixels) and torch.equal(one.ok, many.ok)
    assert one.errors == many.errors and one.fallback == many.fallback
    assert 0 < int(one.ok.sum()) < len(paths)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", FAST)
def test_gpu_decode_matches_cpu(bad_files, backend):
    paths = [bad_files[k] for k in ("good", "gray", "png", "cmyk", "undecodable", "truncated")]
    cpu = decode_uint8(paths, (64, 48), backend=backend)
    gpu = decode_uint8(paths, (64, 48), backend=backend, device="cuda")
    assert gpu.pixels.is_cuda and gpu.ok.tolist() == cpu.ok.tolist()
    # nvJPEG vs libjpeg-turbo (torchvision's GPU path has no fancy chroma upsampling): looser than CPU-vs-CPU
    stats = diff_stats(gpu.pixels.cpu(), cpu.pixels)
    assert stats["mean"] <= 1.0 and stats["max"] <= 64, stats


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", FAST)
def test_real_weibo_gpu_agrees(weibo_decoded, backend, capsys):
    paths, out = weibo_decoded
    gpu = decode_uint8(paths, (224, 224), backend=backend, device="cuda")
    assert bool(gpu.ok.all()), gpu.errors
    stats = diff_stats(gpu.pixels.cpu(), out["pil"].pixels)
    with capsys.disabled():
        print(f"\n[agreement 224x224, 268 Weibo JPEGs] {backend} on CUDA vs pil: mean abs diff {stats['mean']:.4f}, "
              f"p99.9 {stats['p999']:.0f}, max {stats['max']:.0f}")
    assert stats["mean"] <= 1.0 and stats["max"] <= 64, stats


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_works_in_a_forked_child(bad_files, backend):
    """A DataLoader worker is a fork of a process whose decoder already ran: its thread pool and (DALI) pipeline
    wait on threads the child does not have -- a decode in the child hung forever. The child builds its own."""
    import multiprocessing as mp

    paths = [bad_files[k] for k in ("good", "gray", "png", "good")]
    parent = decode_uint8(paths, (20, 20), backend=backend, workers=2)
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:  # a hang fails the test at the timeout instead of stalling the suite
        child = pool.apply_async(_decode_in_worker, (paths, backend)).get(timeout=60)
    assert child == parent.pixels.flatten().tolist()


def _decode_in_worker(paths, backend):
    torch.set_num_threads(1)  # as DataLoader's worker loop does (OpenMP does not survive a fork)
    return decode_uint8(paths, (20, 20), backend=backend, workers=2).pixels.flatten().tolist()
