"""The decoders behind the batch calls (``images.py``): PIL for one file or bytes, and the fast backends for a
chunk of clean JPEG bytes (``jpeg.sniff`` said "jpeg"; ``image_files.admit`` let them through):

- torchvision: ``torchvision.io.decode_jpeg`` then ``transforms.v2.functional.resize``. On CUDA the whole chunk is
  decoded in one batched nvJPEG call (``device='cuda'``) and resized on the GPU. (torchvision 0.29 deprecates its
  decoders in favour of TorchCodec; they still work and the warning is silenced here.)
- DALI: a pipeline ``fn.external_source`` (encoded bytes) -> ``fn.decoders.image`` (device "mixed" = nvJPEG on
  CUDA, "cpu" = libjpeg-turbo with ``device_id=None`` otherwise) -> ``fn.resize`` -> ``fn.transpose`` to CHW
  (uint8) or ``fn.crop_mirror_normalize`` (float, ImageNet statistics inside the pipeline). Built once per (size,
  chunk size, device, output kind) and reused; GPU output goes to torch device-to-device (``feed_ndarray``),
  never through the host. A pipeline that cannot be built at all raises ``DaliUnusableError`` once, and DALI is
  not used again in the process for that kind of device.

A fast decoder returns (pixels [k, 3, H, W] on the device, failures {j: message}); when its batched call raises,
the chunk is bisected until the failing samples are isolated (``isolate_failures``). CPU threads: ``workers``
samples are decoded side by side (``each_sample``); threads change no pixel.
"""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from .image_files import DEFAULT_LIMITS, Limits, open_image, pixels_problem

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def short_error(exc: BaseException) -> str:
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



def pil_decode(data: bytes, size: tuple[int, int], limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Encoded bytes -> uint8 [3, H, W] with PIL; the size PIL opens is checked against ``limits`` before decoding."""
    with Image.open(io.BytesIO(data)) as im:  # lazy: the header only, so the size is checked before decoding
        too_big = pixels_problem(im.size[0], im.size[1], limits)
        if too_big:
            raise ValueError(too_big)
        return _pil_resized(im, size)


def decode_pil_path(path: str, size: tuple[int, int], limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """One file -> uint8 [3, H, W] with PIL (raises ValueError on failure; for DataLoader-style datasets)."""
    image = open_image(path, limits)
    if image.problem:
        raise ValueError(image.problem)
    return torch.from_numpy(pil_decode(image.data, size, limits))


# ---------------------------------------------------------------------------------------------------------
# fast backends: decode a chunk of clean JPEG bytes -> (pixels [k, 3, H, W] on device, failures {j: message})


def isolate_failures(run: Callable[[list[int]], None], k: int) -> dict[int, str]:
    """Call ``run`` on all k samples; when it raises, bisect until each failing sample is alone."""
    failures: dict[int, str] = {}

    def go(idx: list[int]) -> None:
        try:
            run(idx)
        except DaliUnusableError:  # no sample's fault: bisecting would only rebuild what cannot be built
            raise
        except Exception as exc:  # noqa: BLE001 - isolated below, reported per sample
            if len(idx) == 1:
                failures[idx[0]] = short_error(exc)
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


def each_sample(fn: Callable[[int], object], n: int, workers: int) -> list[object]:
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


def decode_torchvision(blobs: list[bytes], size: tuple[int, int], device: torch.device, normalize: bool,
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

            return out, isolate_failures(run, len(blobs))
        # the resize returns channels-last strides; numpy's single-threaded strided copy is far cheaper here than
        # torch's OpenMP-parallel one (which on a busy 2-core machine costs more than the decode)
        out_np = out.numpy()

        def one(j: int) -> None:
            out_np[j] = _tv_resize(decode_jpeg(encoded[j], mode=ImageReadMode.RGB), size).numpy()

        results = each_sample(one, len(encoded), workers)
        return out, {j: short_error(r) for j, r in enumerate(results) if isinstance(r, Exception)}


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


def dali_pipeline(key: tuple, libjpeg_chroma: bool = True):
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
                                f"be built (DALI {_dali_version()}): {short_error(exc)}; use --image-backend "
                                f"torchvision{hint}")
        warnings.warn(_DALI_UNUSABLE[kind], RuntimeWarning, stacklevel=2)
        raise DaliUnusableError(_DALI_UNUSABLE[kind]) from exc
    _DALI_PIPES[cache_key] = pipe
    return pipe


def _dali_version() -> str:
    import nvidia.dali

    return getattr(nvidia.dali, "__version__", "?")


def decode_dali(blobs: list[bytes], size: tuple[int, int], device: torch.device, normalize: bool,
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
        pipe = dali_pipeline(key)
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
        failures = isolate_failures(run, len(blobs))
    return out, failures
