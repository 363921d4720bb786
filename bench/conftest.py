"""Shared benchmark plumbing: run with ``pytest bench --benchmark-only``.

Each benchmark calls ``record(benchmark, group=..., provider=..., floor_s=..., **extra)`` after timing;
at the end of the session every row is written, with the device's name, to
``bench/results/<device>.json`` and a readable ``<device>.md`` (mean time, measured/floor, peak memory).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# CMC_FAST_BENCH_RESULTS: somewhere else (scripts/gpu_check.sh keeps a GPU machine's rows there across calls).
RESULTS_DIR = os.environ.get("CMC_FAST_BENCH_RESULTS") or os.path.join(os.path.dirname(__file__), "results")
_ROWS: list[dict] = []


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak_memory(fn, device: torch.device) -> int | None:
    """Peak extra device memory (bytes) of one call of ``fn``, on CUDA; None on CPU (not measured there)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.fixture
def record():
    def _record(benchmark, *, group: str, provider: str, floor_s: float | None = None, **extra) -> None:
        stats = benchmark.stats.stats if benchmark.stats is not None else None
        if stats is None:  # --benchmark-disable: nothing was timed
            return
        if floor_s is not None and not torch.cuda.is_available():
            # floors are GPU figures (HBM bandwidth, tensor-core rate): a CPU time over them means nothing
            extra["gpu_floor_s"], floor_s = floor_s, None
        row = {"group": group, "provider": provider, "mean_s": stats.mean, "median_s": stats.median,
               "min_s": stats.min, "rounds": stats.rounds, "floor_s": floor_s,
               "measured_over_floor": (stats.median / floor_s) if floor_s else None, **extra}
        benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("mean_s", "median_s", "min_s")})
        _ROWS.append(row)

    return _record


def pytest_sessionfinish(session, exitstatus):
    if not _ROWS:
        return
    os.makedirs(RESULTS_DIR, exist_ok=True)
    name = device_name()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    now = _dt.datetime.now().isoformat(timespec="seconds")
    for row in _ROWS:
        row.setdefault("date", now)
    # A run of some benchmarks updates their rows and keeps the others' (each row carries its own date).
    json_path = os.path.join(RESULTS_DIR, f"{slug}.json")
    fresh = {(r["group"], r["provider"]) for r in _ROWS}
    try:
        with open(json_path) as f:
            kept = [r for r in json.load(f)["rows"] if (r["group"], r["provider"]) not in fresh]
    except (OSError, ValueError, KeyError):
        kept = []
    rows = kept + _ROWS
    payload = {"device": name, "torch": torch.__version__, "date": now,
               "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"), "rows": rows}
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=2)
    with open(os.path.join(RESULTS_DIR, f"{slug}.md"), "w") as f:
        f.write(markdown(payload))


def markdown(payload: dict) -> str:
    """The readable table per group; image rows also show images/s and CPU ms per image."""
    rows = payload["rows"]
    lines = [f"# Benchmarks on {payload['device']}", "", f"torch {payload['torch']}, {payload['date']}", ""]
    for group in dict.fromkeys(r["group"] for r in rows):
        members = [r for r in rows if r["group"] == group]
        images = any("images_per_s" in r for r in members)
        gpu = any("gpu_time_s" in r for r in members)  # NCE rows: GPU time alone beside the synchronised step
        extra = (" images/s | CPU ms/image |" if images else "") + (" GPU ms |" if gpu else "")
        lines += [f"## {group}", "",
                  f"| provider | median ms | floor ms | measured/floor | peak MiB |{extra} measured |",
                  "|---|---:|---:|---:|---:|" + ("---:|---:|" if images else "") + ("---:|" if gpu else "") + "---|"]
        for r in members:
            floor = f"{r['floor_s'] * 1e3:.4f}" if r.get("floor_s") else "-"
            ratio = f"{r['measured_over_floor']:.1f}x" if r.get("measured_over_floor") else "-"
            peak = f"{r['peak_bytes'] / 2**20:.1f}" if r.get("peak_bytes") is not None else "-"
            rate = (f" {r.get('images_per_s', '-')} | {r.get('cpu_ms_per_image', '-')} |" if images else "")
            if gpu:
                rate += f" {r['gpu_time_s'] * 1e3:.3f} |" if r.get("gpu_time_s") is not None else " - |"
            lines.append(f"| {r['provider']} | {r['median_s'] * 1e3:.3f} | {floor} | {ratio} | {peak} |{rate} "
                         f"{r['date']} |")
        lines.append("")
    return "\n".join(lines)
