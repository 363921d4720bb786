"""The benchmark harness ``bench/`` and ``scripts/gpu_check.py`` share: timing, peak memory, the one result writer,
and the NCE and BLOCK benchmark inputs.

Timing (``measure``): the first call apart (compiles, autotuning, allocator growth), warm-up calls, then the wall
time of calls synchronised one by one, summarised as median and interquartile range (``summarize``). On CUDA also
the device's own time per call, apart from the host's: the calls replayed from one CUDA graph
(``triton.testing.do_bench_cudagraph``: no Python, dispatcher or launch cost between kernels) or, where the call
cannot be captured (a host synchronisation, a CPU tensor created inside), the sum of its kernels' durations in
``torch.profiler``'s trace; ``kernel_method`` says which. ``host_overhead_s`` is the wall median minus that time.
Peak memory: ``torch.cuda.max_memory_allocated`` beyond what was allocated before one call; not measured on a CPU.

Results (``write_results``): rows of one device merged by (group, provider) into ``<dir>/<device slug>.json`` and
rendered as ``<device slug>.md`` from the same rows, both written atomically (``safe_io.atomic_write``).

Import no kernel module at the top: the caller sets ``TRITON_INTERPRET`` first where it runs on a CPU.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from cmc_fast.data_pipeline.safe_io import atomic_write

Fn = Callable[[], object]


# ============================================================================================== timing
def summarize(samples: list[float]) -> dict:
    """Median, quartiles (inclusive method: the samples' own range), interquartile range, mean, min, count."""
    if not samples:
        raise ValueError("no samples to summarize")
    xs = sorted(samples)
    q1, median, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    return {"median_s": median, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "mean_s": statistics.fmean(xs),
            "min_s": xs[0], "rounds": len(xs)}


def synchronizer(device: torch.device | str) -> Fn:
    """What waits for the device's queued work: ``torch.cuda.synchronize`` on CUDA, nothing on a CPU."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def wall_samples(fn: Fn, *, rounds: int, warmup: int = 1, sync: Fn = lambda: None,
                 clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of each of ``rounds`` calls, each synchronised, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(rounds):
        t0 = clock()
        fn()
        sync()
        out.append(clock() - t0)
    return out


def cuda_graph_seconds(fn: Fn) -> float:
    """Median device seconds per call, the calls replayed from one CUDA graph (no host work between kernels)."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e-3


def profiler_kernel_seconds(fn: Fn, calls: int = 10) -> float:
    """Device seconds per call: the summed durations of the device events (kernels, copies) ``torch.profiler``
    records over ``calls`` calls, divided by ``calls``. Gaps between kernels (host work) are not counted."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    device_us = sum(e.time_range.elapsed_us() for e in prof.events()
                    if e.device_type == torch.autograd.DeviceType.CUDA)
    return device_us * 1e-6 / calls


def kernel_seconds(fn: Fn) -> tuple[float | None, str]:
    """(device seconds per call, how measured): a CUDA graph's replay, else the profiler's kernel times."""
    try:
        return cuda_graph_seconds(fn), "cuda-graph"
    except Exception as exc:  # noqa: BLE001 - not capturable (a sync, a host tensor): the profiler then
        reason = f"{type(exc).__name__}"
        with contextlib.suppress(RuntimeError):  # the failed capture's error may surface once more here
            torch.cuda.synchronize()
    try:
        return profiler_kernel_seconds(fn), f"profiler (not capturable in a CUDA graph: {reason})"
    except Exception as exc:  # noqa: BLE001 - reported in the row, the wall time still stands
        return None, f"not measured ({type(exc).__name__}: {str(exc)[:100]})"


def peak_bytes(fn: Fn, device: torch.device | str) -> int | None:
    """Peak device memory (bytes) of one call beyond what was allocated before it, on CUDA; None on a CPU."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure(fn: Fn, device: torch.device | str, *, rounds: int | None = None, warmup: int = 1,
            kernel_time: bool = True, clock: Callable[[], float] = time.perf_counter,
            kernel_timer: Callable[[Fn], tuple[float | None, str]] = kernel_seconds) -> dict:
    """The row fields of one callable: ``first_call_s``, the wall statistics (``summarize``), on CUDA
    ``kernel_s``/``kernel_method``/``host_overhead_s`` (``kernel_time=False`` leaves them out), ``peak_bytes``."""
    cuda = torch.device(device).type == "cuda"
    sync = synchronizer(device)
    rounds = rounds or (20 if cuda else 3)
    t0 = clock()
    fn()
    sync()
    row = {"first_call_s": clock() - t0}
    row.update(summarize(wall_samples(fn, rounds=rounds, warmup=warmup, sync=sync, clock=clock)))
    kernel, method = (kernel_timer(fn) if kernel_time else (None, "not asked")) if cuda else (None, "no CUDA device")
    row.update(kernel_s=kernel, kernel_method=method,
               host_overhead_s=max(0.0, row["median_s"] - kernel) if kernel is not None else None)
    row["peak_bytes"] = peak_bytes(fn, device)
    row["peak_method"] = "torch.cuda.max_memory_allocated" if cuda else "not measured on a CPU"
    return row


@contextlib.contextmanager
def env_var(name: str, value: str | None) -> Iterator[None]:
    """``name`` set to ``value`` (unset for None) for the duration: the ops read CMC_FAST_* at every call."""
    before = os.environ.get(name)
    os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    try:
        yield
    finally:
        os.environ.pop(name, None) if before is None else os.environ.__setitem__(name, before)


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """``torch.set_float32_matmul_precision`` for the duration (cuBLAS and the fused kernels' dots follow it)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


# ====================================================================================== the budget
START_FRACTION, CAP_FACTOR = 0.5, 1.5  # a section starts with >= half its seconds left, is stopped at 1.5x them


class OverTime(BaseException):
    """A section's alarm; a BaseException, so library code's ``except Exception`` lets it through."""


class Terminated(BaseException):
    """SIGTERM."""


def _on_alarm(signum, frame):
    if _IN_SECTION[0]:  # never inside the runner's own bookkeeping
        raise OverTime


def _on_sigterm(signum, frame):
    raise Terminated


_IN_SECTION = [False]


def run_sections(sections: list[tuple[str, Fn, float]], record: Callable[[dict], None], *, deadline: float,
                 scale: float = 1.0, capped: bool = True) -> None:
    """Runs each (name, fn, expected seconds) in order within a shared budget ending at ``deadline``
    (``time.monotonic``): a section starts only with START_FRACTION of its expected seconds (times ``scale``) left and
    is stopped by SIGALRM at CAP_FACTOR times them (``capped``) or at the deadline. ``record`` gets each section's
    {section, status: ok/error/stopped/skipped, seconds, expected_s, note}. A SIGTERM stops the section in hand,
    is recorded, and re-raised as ``Terminated``."""
    before = {s: signal.signal(s, h) for s, h in ((signal.SIGTERM, _on_sigterm), (signal.SIGALRM, _on_alarm))}
    try:
        for name, fn, expected in sections:
            expected *= scale
            left = deadline - time.monotonic()
            entry = {"section": name, "status": "skipped", "seconds": 0.0, "expected_s": expected, "note": ""}
            if left <= 0 or left < START_FRACTION * expected:
                record({**entry, "note": f"budget: {max(left, 0):.1f} s left, expects {expected:.1f} s"})
                continue
            cap, t0, stop = min(left, CAP_FACTOR * expected) if capped else left, time.monotonic(), None
            try:
                _IN_SECTION[0] = True
                signal.setitimer(signal.ITIMER_REAL, max(cap, 0.01))
                fn()
                _IN_SECTION[0] = False
                entry["status"] = "ok"
            except OverTime:
                entry.update(status="stopped", note=f"over time at its cap of {cap:.1f} s")
            except Terminated as exc:
                entry.update(status="stopped", note="SIGTERM")
                stop = exc
            except Exception as exc:  # noqa: BLE001 - one section failing must not cost the others
                entry.update(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
                print(traceback.format_exc(), file=sys.stderr, flush=True)
            finally:
                _IN_SECTION[0] = False
                signal.setitimer(signal.ITIMER_REAL, 0)
            record({**entry, "seconds": time.monotonic() - t0})
            if stop is not None:
                raise stop
    finally:
        for s, h in before.items():
            signal.signal(s, h)


# ========================================================================================= the writer
def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def slug(device: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()


def plain(v):
    """JSON-safe: 6 significant digits, NaN/inf as strings, tensors and numpy scalars as numbers, tuples as lists."""
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
        v = v.item()
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    return str(v)


def read_results(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def merge_rows(kept: list[dict], fresh: list[dict]) -> list[dict]:
    """``kept`` without the rows ``fresh`` replaces (same group and provider), then ``fresh``."""
    keys = {(r["group"], r["provider"]) for r in fresh}
    return [r for r in kept if (r["group"], r["provider"]) not in keys] + list(fresh)


def write_results(rows: list[dict], results_dir: str | os.PathLike, *, device: str, merge: bool = True,
                  name: str | None = None, **meta) -> tuple[Path, Path]:
    """``<name>.json`` ({device, torch, date, **meta, rows}) and ``<name>.md`` rendered from that payload, each
    replaced atomically; ``name`` defaults to the device's slug. With ``merge``, rows already in the JSON stay
    unless a fresh row has their group and provider. Returns the two paths."""
    results_dir, name = Path(results_dir), name or slug(device)
    json_path, md_path = results_dir / f"{name}.json", results_dir / f"{name}.md"
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    fresh = [plain({**r, "date": r.get("date") or now}) for r in rows]
    kept: list[dict] = []
    if merge and json_path.is_file():
        try:
            kept = read_results(json_path)["rows"]
        except (ValueError, KeyError):
            kept = []
    payload = {"device": device, "torch": torch.__version__, "date": now,
               "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"), **plain(meta),
               "rows": merge_rows(kept, fresh)}
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    atomic_write(json_path, lambda f: f.write(text.encode()))
    md = markdown(payload)
    atomic_write(md_path, lambda f: f.write(md.encode()))
    return json_path, md_path


def _ms(v, digits: int = 3) -> str:
    return "-" if v is None or isinstance(v, str) else f"{v * 1e3:.{digits}f}"


# the table's columns: (header, cell of a row); a column shows only where a row of the group has its key
COLUMNS: list[tuple[str, str, Callable[[dict], str]]] = [
    ("median ms", "median_s", lambda r: _ms(r.get("median_s"))),
    ("IQR ms", "iqr_s", lambda r: _ms(r.get("iqr_s"))),
    ("kernel ms", "kernel_s", lambda r: _ms(r.get("kernel_s"))),
    ("host ms", "host_overhead_s", lambda r: _ms(r.get("host_overhead_s"))),
    ("first call s", "first_call_s", lambda r: "-" if r.get("first_call_s") is None else f"{r['first_call_s']:.2f}"),
    ("floor ms", "floor_s", lambda r: _ms(r.get("floor_s"), 4)),
    ("measured/floor", "measured_over_floor",
     lambda r: f"{r['measured_over_floor']:.1f}x" if r.get("measured_over_floor") else "-"),
    ("peak MiB", "peak_bytes", lambda r: "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:.1f}"),
    ("launched", "launched", lambda r: str(r.get("launched") or "-").replace("|", "/")),
    ("images/s", "images_per_s", lambda r: str(r.get("images_per_s", "-"))),
    ("CPU ms/image", "cpu_ms_per_image", lambda r: str(r.get("cpu_ms_per_image", "-"))),
]


_PAYLOAD_KEYS = ("device", "torch", "date", "rows", "sections")


def _cell(v) -> str:
    text = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return text.replace("|", "/").replace("\n", " ")[:200]


def markdown(payload: dict) -> str:
    """The payload's other fields as a list, its ``sections`` (a run's log: dicts) as a table, then one table per
    group of rows, in the rows' order: provider, each column some row of the group has, the row's date."""
    lines = [f"# Benchmarks on {payload['device']}", "", f"torch {payload['torch']}, {payload['date']}", ""]
    lines += [f"- {k}: {_cell(v)}" for k, v in payload.items() if k not in _PAYLOAD_KEYS]
    sections = payload.get("sections") or []
    keys = list(dict.fromkeys(k for s in sections for k in s))
    if keys:
        lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(s.get(k, "-")) for k in keys) + " |" for s in sections]
    lines.append("")
    rows = payload["rows"]
    for group in dict.fromkeys(r["group"] for r in rows):
        members = [r for r in rows if r["group"] == group]
        cols = [c for c in COLUMNS if any(r.get(c[1]) is not None for r in members)]
        lines += [f"## {group}", "", "| provider | " + " | ".join(h for h, _, _ in cols) + " | measured |",
                  "|---|" + "---:|" * len(cols) + "---|"]
        lines += ["| " + " | ".join([str(r["provider"]), *(cell(r) for _, _, cell in cols), str(r.get("date", ""))])
                  + " |" for r in members]
        lines.append("")
    return "\n".join(lines)


# ===================================================================================== benchmark inputs
NCE_TAU = 0.07


def nce_case(b: int, d: int, k: int, n: int, dtype: torch.dtype, device: torch.device | str):
    """(anchor [B, d] leaf, bank [N, d] ``dtype``, idx [B, K+1] int32, Z tensor) on ``device``: unit vectors, the
    positive first, int32 indices end to end as the trainer samples them; seeded by K."""
    import torch.nn.functional as F

    from cmc_fast import ops

    g = torch.Generator().manual_seed(1234 + k)
    anchor = F.normalize(torch.randn(b, d, generator=g), dim=1).to(device).requires_grad_()
    bank = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device, dtype)
    idx = torch.cat([torch.randperm(n, generator=g)[:b, None], torch.randint(0, n, (b, k), generator=g)], 1)
    idx = idx.to(device, torch.int32)
    with torch.no_grad():
        z = torch.tensor(ops.nce_partition(anchor, bank, idx, tau=NCE_TAU, n_data=n), device=device)
    return anchor, bank, idx, z


def loop_merge(x0, x1, ws0, bs0, ws1, bs1, rank: int):
    """block.bootstrap.pytorch's Block.forward merge, in substance: the eager loop over chunks."""
    import torch.nn.functional as F

    zs, begin = [], 0
    for w0, b0, w1, b1 in zip(ws0, bs0, ws1, bs1):
        s = w0.shape[1]
        m = F.linear(x0.narrow(1, begin, s), w0, b0) * F.linear(x1.narrow(1, begin, s), w1, b1)
        z = torch.sum(m.view(m.shape[0], rank, s), 1)
        z = torch.sqrt(F.relu(z)) - torch.sqrt(F.relu(-z))
        zs.append(F.normalize(z, p=2))
        begin += s
    return torch.cat(zs, 1)


def block_case(provider: str, batch: int, sizes: list[int], rank: int, dtype: torch.dtype,
               device: torch.device | str, wrap: Callable[[str, Callable], Callable] = lambda name, fn: fn):
    """(call, leaves, upstream grad) of one BLOCK merge provider on seeded inputs: ``loop`` (per-chunk weight
    tensors), ``bmm`` (``block_merge_bmm``) or ``fused``/``auto`` (``block_merge``, its path set by
    CMC_FAST_KERNELS). ``wrap(name, fn)`` replaces the loop's or bmm's function (torch.compile for the rivals)."""
    from cmc_fast.kernels.block import block_merge
    from cmc_fast.kernels.reference import block_merge_bmm

    gen = torch.Generator().manual_seed(0)
    mm = sum(sizes)
    x0, x1 = (torch.randn(batch, mm, generator=gen) for _ in range(2))
    ws = [[torch.randn(rank * s, s, generator=gen) * s ** -0.5 for s in sizes] for _ in range(2)]
    bs = [[0.1 * torch.randn(rank * s, generator=gen) for s in sizes] for _ in range(2)]
    grad = torch.randn(batch, mm, generator=gen).to(device, dtype)

    def leaf(t):
        return t.to(device, dtype).requires_grad_()

    xs = [leaf(x0), leaf(x1)]
    if provider == "loop":
        params = [[leaf(t) for t in group] for group in (ws[0], bs[0], ws[1], bs[1])]
        fn = wrap("loop", loop_merge)
        return (lambda: fn(*xs, *params, rank)), xs + [t for group in params for t in group], grad
    flat = [leaf(torch.cat([t.reshape(-1) for t in group])) for group in (ws[0], bs[0], ws[1], bs[1])]
    if provider == "bmm":
        fn = wrap("bmm", block_merge_bmm)
        return (lambda: fn(*xs, *flat, sizes=sizes, rank=rank)), xs + flat, grad
    return (lambda: block_merge(*xs, *flat, sizes=sizes, rank=rank)), xs + flat, grad
