"""Shared benchmark plumbing: run with ``pytest bench --benchmark-only``.

Each benchmark calls ``record(benchmark, group=..., provider=..., floor_s=..., **extra)`` after timing; at the end
of the session every row goes through ``cmc_fast.benchmark.write_results`` (the writer the GPU check uses too) to
``bench/results/<device>.json`` and its readable ``<device>.md`` (median and IQR, floor, peak memory, ...).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cmc_fast.benchmark import device_name, write_results  # noqa: E402

# CMC_FAST_BENCH_RESULTS: write them somewhere else (GPU figures come from scripts/gpu_check.py, via gpu_results.py).
RESULTS_DIR = os.environ.get("CMC_FAST_BENCH_RESULTS") or os.path.join(os.path.dirname(__file__), "results")
_ROWS: list[dict] = []


@pytest.fixture
def record():
    def _record(benchmark, *, group: str, provider: str, floor_s: float | None = None, **extra) -> None:
        stats = benchmark.stats.stats if benchmark.stats is not None else None
        if stats is None:  # --benchmark-disable: nothing was timed
            return
        if floor_s is not None and not torch.cuda.is_available():
            # floors are GPU figures (HBM bandwidth, tensor-core rate): a CPU time over them means nothing
            extra["gpu_floor_s"], floor_s = floor_s, None
        row = {"group": group, "provider": provider, "median_s": stats.median, "q1_s": stats.q1, "q3_s": stats.q3,
               "iqr_s": stats.iqr, "mean_s": stats.mean, "min_s": stats.min, "rounds": stats.rounds,
               "floor_s": floor_s, "measured_over_floor": (stats.median / floor_s) if floor_s else None, **extra}
        stat_keys = ("median_s", "q1_s", "q3_s", "iqr_s", "mean_s", "min_s")
        benchmark.extra_info.update({k: v for k, v in row.items() if k not in stat_keys})
        _ROWS.append(row)

    return _record


def pytest_sessionfinish(session, exitstatus):
    if _ROWS:  # a run of some benchmarks updates their rows and keeps the others' (each row carries its date)
        write_results(_ROWS, RESULTS_DIR, device=device_name())
