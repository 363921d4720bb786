"""Images/s and CPU time per image backend on the 268 real Weibo JPEGs: decode + bicubic resize to 224x224, in
batches of 64 (one pass = 268 images), plus the PIL DataLoader baseline with one worker per core and, on CUDA, the
GPU decode paths. Run: ``pytest bench/bench_images.py --benchmark-only``.

CPU time is process CPU seconds per pass (all threads; DataLoader workers' decode time included), so
``cpu_s / wall_s`` is the number of cores a backend keeps busy.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from cmc_fast.data_pipeline.decoders import decode_pil_path, usable_cores
from cmc_fast.data_pipeline.image_backend import available_backends
from cmc_fast.data_pipeline.image_source import CachedImages
from cmc_fast.data_pipeline.images import decode_uint8
from torch.utils.data import DataLoader, Dataset

SIZE = (224, 224)
BATCH = 64
GROUP = "images: decode+resize 268 Weibo JPEGs to 224x224, batch 64"
# Measured on the 2-core development machine before this module existed (decode + resize to 224, one pass over
# the 268 images): recorded beside each row as ``before_images_per_s``.
BEFORE = {"pil": 318.0, "torchvision": 560.0, "dali": 549.0}
_MEASURED: dict[str, float] = {}
SHARED_DATA = os.path.abspath(os.environ.get("CMC_FAST_SHARED_DATA")
                              or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture(scope="module")
def weibo() -> list[str]:
    root = os.path.join(SHARED_DATA, "weibo")
    if not os.path.isdir(root):
        pytest.skip(f"real data not found at {root} (../shared/data beside the checkout, or CMC_FAST_SHARED_DATA)")
    paths = [os.path.join(root, d, f) for d in ("rumor_images", "nonrumor_images")
             for f in sorted(os.listdir(os.path.join(root, d)))]
    if not paths:
        pytest.skip("no Weibo images")
    return paths


def _run(benchmark, record, fn, *, provider: str, n: int, rounds: int = 3, group: str = GROUP, **extra) -> None:
    cpu: list[float] = []

    def timed():
        c0 = time.process_time()
        spent = fn()  # a pass may return CPU seconds spent outside this process (DataLoader workers)
        cpu.append(time.process_time() - c0 + (spent or 0.0))

    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:
        return
    wall = benchmark.stats.stats.median
    cpu_s = statistics.median(cpu[1:]) if len(cpu) > 1 else cpu[0]
    record(benchmark, group=group, provider=provider, images_per_s=round(n / wall, 1), cpu_s=round(cpu_s, 3),
           cpu_ms_per_image=round(1e3 * cpu_s / n, 3), cores_busy=round(cpu_s / wall, 2),
           load_avg_1m=round(os.getloadavg()[0], 2), **extra)
    _MEASURED[provider] = n / wall
    print(f"\n[{provider}] {n / wall:.0f} images/s, {1e3 * cpu_s / n:.2f} CPU ms/image "
          f"({cpu_s / wall:.2f} cores busy), load average {os.getloadavg()[0]:.1f}")


def _passes(paths: list[str], backend: str, device: str | None, workers: int | None = None):
    def one_pass():
        for i in range(0, len(paths), BATCH):
            decode_uint8(paths[i:i + BATCH], SIZE, backend=backend, device=device, workers=workers)
        if device == "cuda":
            torch.cuda.synchronize()

    return one_pass


@pytest.mark.parametrize("backend,threads", [("pil", 1), ("pil", "all"), ("torchvision", 1),
                                             ("torchvision", "all"), ("dali", "all")])
def test_cpu_backend(benchmark, record, weibo, backend, threads):
    """One thread is the pre-project measurement's setting for PIL and torchvision; "all" is what training uses
    (``workers`` defaults to the usable cores). DALI's CPU pipeline always runs one thread per core."""
    if backend not in available_backends():
        pytest.skip(f"{backend} not installed")
    n_threads = usable_cores() if threads == "all" else threads
    label = f"{n_threads} thread{'s' if n_threads > 1 else ''}"
    what = {"pil": f"pil ({label})", "torchvision": f"torchvision cpu ({label})", "dali": f"dali cpu ({label})"}
    _run(benchmark, record, _passes(weibo, backend, None, n_threads), provider=what[backend], n=len(weibo),
         threads=n_threads, before_images_per_s=BEFORE[backend], before_threads=2 if backend == "dali" else 1)


class _PilDataset(Dataset):
    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        c0 = time.process_time()
        img = decode_pil_path(self.paths[i], SIZE)
        return img, time.process_time() - c0


def test_pil_dataloader(benchmark, record, weibo):
    """The usual PyTorch input pipeline: one worker process per core, a batch of 64 per worker at a time. A pass
    holds at least two batches per worker (the 268 images repeated: 5 batches would leave 11 of 16 workers idle)."""
    workers = usable_cores()
    paths = weibo * -(-2 * workers * BATCH // len(weibo))
    loader = DataLoader(_PilDataset(paths), batch_size=BATCH, num_workers=workers, persistent_workers=True)

    def one_pass() -> float:
        return float(sum(float(spent.sum()) for _, spent in loader))  # the workers' decode CPU seconds

    _run(benchmark, record, one_pass, provider=f"pil DataLoader ({workers} workers)", n=len(paths),
         threads=workers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_gpu_backend(benchmark, record, weibo, backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} not installed")
    name = {"torchvision": "torchvision decode_jpeg(device='cuda')", "dali": "dali mixed (nvJPEG)"}[backend]
    loader = next((v for k, v in _MEASURED.items() if k.startswith("pil DataLoader")), None)
    _run(benchmark, record, _passes(weibo, backend, "cuda"), provider=f"{name} on {torch.cuda.get_device_name(0)}",
         n=len(weibo), rounds=5, pil_dataloader_images_per_s=loader)
    if loader:
        gpu = _MEASURED[f"{name} on {torch.cuda.get_device_name(0)}"]
        print(f"[{name}] {gpu / loader:.1f}x the PIL DataLoader ({loader:.0f} images/s); the goal is 4x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fancy", [True, False])
def test_gpu_dali_bare(benchmark, record, weibo, fancy):
    """DALI "mixed" on its own: the contract's pipeline without its byte sniffing, fallbacks and copy into torch:
    what the pipeline itself costs, and whether libjpeg-style (fancy) chroma upsampling, which the contract uses
    so GPU pixels match the CPU backends, keeps nvJPEG off its faster paths (the hardware decoder)."""
    if "dali" not in available_backends():
        pytest.skip("dali not installed")
    import numpy as np
    from cmc_fast.data_pipeline.decoders import dali_pipeline

    blobs = [np.fromfile(p, dtype=np.uint8) for p in weibo]
    # the contract's own pipeline (uint8 CHW out), fed directly
    dali = dali_pipeline((*SIZE, BATCH, torch.cuda.current_device(), False, usable_cores()), libjpeg_chroma=fancy)

    def one_pass():
        for i in range(0, len(blobs), BATCH):
            dali.feed_input("encoded", blobs[i:i + BATCH])
            dali.run()
        torch.cuda.synchronize()  # the whole device: DALI works on its own stream

    label = "libjpeg-style chroma" if fancy else "nvJPEG default chroma"
    _run(benchmark, record, one_pass, provider=f"dali mixed, bare pipeline ({label}) on "
         f"{torch.cuda.get_device_name(0)}", n=len(weibo), rounds=5, jpeg_fancy_upsampling=fancy)


def test_cached_batches(benchmark, record, weibo):
    """Later epochs with the uint8 cache: gather 64 records, copy, normalise, flip."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = CachedImages.build([[p] for p in weibo], SIZE, "auto", device=device, progress=False)
    order = torch.randperm(len(weibo), generator=torch.Generator().manual_seed(0))

    def one_pass():
        for i in range(0, len(order), BATCH):
            cache.batch(order[i:i + BATCH], train=True, device=device)
        if device == "cuda":
            torch.cuda.synchronize()

    _run(benchmark, record, one_pass, provider=f"CachedImages.batch -> {device}", n=len(weibo), rounds=5,
         group="images: cached uint8 -> normalised float batches (224x224, batch 64)")
