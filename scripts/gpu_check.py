"""One GPU run that brings back the decisive numbers, each kept the moment it exists (issue 13).

On a CUDA machine with an H100/H200, in the repository root (``bash scripts/gpu_check.sh`` sets the environment
and calls this)::

    python3 scripts/gpu_check.py [--dry-run] [--budget-s S] [--out DIR]     # DIR: $OUT where set

One process, at most ``--budget-s`` seconds (default 420: 7 minutes, every compile included). Each result is one
JSON line appended to ``DIR/gpu-results.jsonl`` and flushed as soon as it is measured; ``DIR/gpu-results.md`` is
rewritten from that file after every section. A SIGTERM, the end of the budget or a section overrunning its cap
stops the work in hand: every line already written stays valid, a ``stopped`` line says where it stopped, and
the summary is written. ``python scripts/gpu_results.py DIR/gpu-results.jsonl`` turns the file into
``bench/results/<device>.{json,md}``, the form of the CPU rows there.

Sections, most decisive first (``SECTIONS``): the environment and copy bandwidth; correctness on CUDA of every
kernel op against float64 at small shapes, once per autotune configuration the prune keeps (``kept_configs``),
BLOCK through the fused kernels and the bmm path with float32 at each matmul precision (highest, high, medium),
bf16 and AMP, and ``choose_block_path``'s pick at every BLOCK benchmark shape; NCE and BLOCK timings at the
benchmark shapes with bench/'s providers and group names (kernel GPU time by ``triton.testing.do_bench``, wall time,
peak memory, first call = autotune + compile apart, floors; BLOCK: fused, auto with its path, the eager chunk loop,
eager bmm); compiled rivals (NCE compile; BLOCK compile of the loop and bmm-compile; each compile's cold cost
apart); a stage-1 training step with BERT-base- and VGG19-sized encoders, randomly initialised; images (nvJPEG
through torchvision against the PIL DataLoader on all cores; DALI only once one image went through a ``mixed``
pipeline). A section starts when at least half its expected seconds are left and is stopped at 1.5 times them
(or the budget's end), so an overrun leaves time for the next.

``--dry-run`` runs every section on the CPU in ~20 s with the same calls wherever a CPU can make them: tiny shapes,
the Triton kernels through Triton's interpreter (the references where it cannot run), the bmm path, the floors
(kept as ``gpu_floor_s``, never set against a CPU time), ``choose_block_path``, compile with the ``eager`` backend,
the same JSON schema and budget logic. The test suite runs it, so an API the GPU run calls wrongly fails on a CPU.
Its lines say ``"dry_run": true`` and are never GPU figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__" and "--dry-run" in sys.argv[1:]:
    # the dry run launches the kernels through Triton's interpreter, as the test suite does (tests/conftest.py). It
    # must be set before Triton is first imported: triton.jit reads it when Triton's own helpers (tl.cdiv, ...) and
    # the kernels are decorated. ``interpreter_usable`` checks that it was.
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # Triton ships for Linux only; the L2 gather probe below is its one kernel of this script's own
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = 1
STATUSES = ("ok", "fail", "info", "skipped", "stopped", "error", "owed")
JSONL, SUMMARY = "gpu-results.jsonl", "gpu-results.md"
DEFAULT_BUDGET_S = 420.0

# Expected seconds per section on an H100/H200 and how each was estimated. No GPU was at hand when they were
# written: they are counts times unit costs, to be replaced by the ``elapsed_s`` of the first run's section lines.
# Unit costs: a Triton compile 1-2 s (issue 13), an Inductor forward+backward compile of a small graph ~15 s and of
# the 20-chunk BLOCK loop ~30 s (Inductor's CPU build of the same graph takes ~90 s on 2 cores: bench_block.py),
# a do_bench measurement ~0.3 s (25 ms warm-up + 100 ms of repeats, plus its L2 flushes).
EXPECTED_S = {
    "env": (5, "CUDA context ~2 s, nvidia-smi ~1 s"),
    "bandwidth": (10, "two do_bench runs over 1 GiB buffers; two L2 gathers (a Triton compile ~1.5 s each, 0.5 GB "
                      "gathered per call)"),
    "correctness": (65, "NCE: 9 checks, each its own Triton specialisation (~1.5 s to compile) ~15 s; BLOCK fused: "
                        "5 modes (fp32 at highest/high/medium, bf16, AMP) = 4 specialisations (medium is high's) x 3 "
                        "kernels = 12 compiles ~18 s, plus the bmm path in the same 5 modes (cuBLAS, ~0.5 s each); "
                        "one more run per kept config where an op autotunes (none does at this writing); float64 "
                        "references on the CPU < 0.2 s each; choose_block_path's 12 picks < 0.1 s"),
    "timings": (55, "NCE 4 cases x 3 providers and BLOCK 7 cases x 4 providers (fused, auto, loop, bmm), each a "
                    "first call, do_bench (~0.3 s) and 20 synchronised calls: ~40 x 0.6 s; the fused BLOCK kernels' "
                    "compiles for fp32, TF32, bf16, the forward alone and the second configuration ~25 s"),
    "compiled": (120, "Inductor fwd+bwd: NCE reference 2 shapes x ~15 s; BLOCK at both configurations, B=64, fp32: "
                      "the chunk loop 2 x ~30 s and block_merge_bmm (one baddbmm pair per run of equal chunks) "
                      "2 x ~15 s"),
    "train": (120, "BERT-base + VGG19 built once on the CPU ~5 s; 4 variants x (3 untimed + 10 timed steps at "
                   "~0.1-0.3 s) ~15 s; one Inductor compile of both encoders' forward+backward ~60 s"),
    "images": (40, "nvJPEG + PIL DataLoader (16 workers): 3 passes each over 268 JPEGs at ~1000-3000 images/s, "
                   "worker start ~5 s, DALI proof ~3 s"),
}
# Together 415 s of the 420 s budget, the train section the least decisive of the timed ones: when an earlier
# section overruns, train is cut at the time left (images keep their start share) or skipped; the device
# call's 540 s limit leaves 2 minutes beyond the budget.
START_FRACTION, CAP_FACTOR = 0.5, 1.5  # a section starts with >= half its seconds left, stops at 1.5x them


# =========================================================================================== stopping and writing
class Stop(BaseException):
    """Raised in the main thread by SIGTERM (``terminated``) or the section's alarm (``over time``). A
    BaseException, so library code's ``except Exception`` cannot swallow it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Terminated(Stop):
    pass


class OverTime(Stop):
    pass


_HOLD: dict = {"depth": 0, "pending": None}  # stops that arrived while a line was being written


def _stop(exc: Stop) -> None:
    if _HOLD["depth"]:
        _HOLD["pending"] = _HOLD["pending"] or exc
        return
    raise exc


def _on_sigterm(signum, frame):
    _stop(Terminated("SIGTERM"))


def _on_alarm(signum, frame):
    _stop(OverTime("over time"))


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """No stop lands inside a line being written: a SIGTERM or alarm arriving meanwhile is raised once the line is
    flushed. (Python runs signal handlers in the main thread between bytecodes, whichever thread the signal hit, so
    this is done in the handler rather than with the OS signal mask.)"""
    _HOLD["depth"] += 1
    try:
        yield
    finally:
        _HOLD["depth"] -= 1
        if not _HOLD["depth"] and _HOLD["pending"] is not None:
            pending, _HOLD["pending"] = _HOLD["pending"], None
            raise pending


class Results:
    """The JSONL file (one flushed line per result) and the Markdown summary rebuilt from it."""

    def __init__(self, out: Path, dry_run: bool, t0: float):
        out.mkdir(parents=True, exist_ok=True)
        self.path, self.summary_path = out / JSONL, out / SUMMARY
        self.dry_run, self.t0 = dry_run, t0
        self._f = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - open for the whole run, closed by close()

    def emit(self, section: str, name: str, status: str, kind: str = "result", **fields) -> dict:
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        line = {"schema": SCHEMA, "section": section, "name": name, "status": status, "kind": kind,
                "elapsed_s": round(time.monotonic() - self.t0, 3), "dry_run": self.dry_run,
                **{k: _plain(v) for k, v in fields.items()}}
        text = json.dumps(line, allow_nan=False)
        with signals_held():
            self._f.write(text + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        print(f"[{line['elapsed_s']:7.1f}s] {section}/{name}: {status} {_brief(fields)}", flush=True)
        return line

    def write_summary(self) -> None:
        with signals_held():
            text = summary_markdown(read_lines(self.path))
            tmp = self.summary_path.with_suffix(".md.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.summary_path)

    def close(self) -> None:
        self._f.close()


def _plain(v):
    """JSON-safe: floats rounded to 6 significant digits, NaN/inf as strings, tuples as lists, numpy/torch scalars
    as Python numbers, anything else unknown as its str()."""
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):  # numpy and torch scalars
        v = v.item()
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


def _brief(fields: dict) -> str:
    keys = [k for k in fields if k not in ("group", "note", "traceback", "expected_how")][:5]
    return " ".join(f"{k}={fields[k]}" for k in keys)


def read_lines(path: Path) -> list[dict]:
    """Every complete line of a results file (a line cut by a kill mid-write is left out)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


# ============================================================================================= the summary
def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)[:60]
    return str(v).replace("|", "/").replace("\n", " ")[:120]


_COMMON = ("schema", "section", "kind", "elapsed_s", "dry_run")


def summary_markdown(lines: list[dict]) -> str:
    """Environment first, then one table per section in the order the sections ran."""
    env = next((x for x in lines if x.get("kind") == "env"), {})
    dry = any(x.get("dry_run") for x in lines)
    out = ["# GPU check: " + str(env.get("device", "?")) + (" (DRY RUN on the CPU: not GPU figures)" if dry else ""),
           ""]
    out += [f"- {k}: {_cell(v)}" for k, v in env.items() if k not in _COMMON + ("name", "status")]
    sections = [x for x in lines if x.get("kind") == "section"]
    if sections:
        out += ["", "| section | status | seconds | expected s | note |", "|---|---|---:|---:|---|"]
        out += [f"| {s['section']} | {s['status']} | {_cell(s.get('seconds'))} | {_cell(s.get('expected_s'))} | "
                f"{_cell(s.get('note'))} |" for s in sections]
    for name in dict.fromkeys(x["section"] for x in lines if x.get("kind") not in ("env", "section")):
        rows = [x for x in lines if x["section"] == name and x.get("kind") not in ("env", "section")]
        skip = _COMMON + ("traceback", "group", "provider")  # a timing's name is "group | provider"
        cols = list(dict.fromkeys(k for r in rows for k in r if k not in skip))
        out += ["", f"## {name}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


# ============================================================================================ the context
@dataclass
class Ctx:
    results: Results
    dry_run: bool
    device: object  # torch.device
    deadline: float  # time.monotonic() at which the budget ends
    facts: dict = field(default_factory=dict)  # what later sections use: measured copy bandwidth, ...

    def emit(self, section: str, name: str, status: str, **fields) -> dict:
        return self.results.emit(section, name, status, **fields)

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _sync(ctx: Ctx) -> None:
    import torch

    if ctx.device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """CMC_FAST_KERNELS for the duration (the ops read it at every call)."""
    before = os.environ.get("CMC_FAST_KERNELS")
    os.environ["CMC_FAST_KERNELS"] = mode
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CMC_FAST_KERNELS", None)
        else:
            os.environ["CMC_FAST_KERNELS"] = before


def _kernels_mode(ctx: Ctx) -> str:
    """CMC_FAST_KERNELS that runs the Triton kernels: ``triton`` on CUDA; in the dry run ``triton`` too where
    Triton's interpreter can run them (the kernels were decorated under TRITON_INTERPRET=1, as in the test suite and
    a ``--dry-run`` started without them imported), so the dry run launches the kernels the GPU run launches, at
    tiny shapes; else ``reference``."""
    if not ctx.dry_run:
        return "triton"
    return "triton" if interpreter_usable() else "reference"


def interpreter_usable() -> bool:
    """True when the op modules' kernels are Triton interpreter functions and the interpreter can run them here."""
    from cmc_fast.kernels import block
    from cmc_fast.kernels.dispatch import interpreter_problem, triton_available, triton_interpreted

    if not (triton_available() and triton_interpreted()):
        return False
    import triton.language.standard as triton_helpers
    from triton.runtime.interpreter import InterpretedFunction

    decorated = all(isinstance(f, InterpretedFunction) for f in (block._block_fwd_kernel, triton_helpers.cdiv))
    return decorated and interpreter_problem() is None


if triton is not None:
    @triton.jit
    def _gather_sum_kernel(
        bank_ptr,  # [N, D] fp32/bf16, contiguous: the L2-resident bank
        idx_ptr,  # [programs * ROWS] int32: the rows each program gathers, ROWS consecutive indices a program
        out_ptr,  # [programs] fp32: each program's sum (keeps every load live)
        ROWS: tl.constexpr,
        D: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, D)
        acc = tl.zeros([BLOCK_R, D], dtype=tl.float32)
        for start in range(0, ROWS, BLOCK_R):
            rows = tl.load(idx_ptr + pid * ROWS + start + offs_r).to(tl.int64)
            acc += tl.load(bank_ptr + rows[:, None] * D + offs_d[None, :]).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


_BENCH: dict[str, object] = {}


def _load_path(name: str, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _bench_module(name: str):
    """bench/<name>.py, for its shapes, providers and floors (one definition of each). The bench modules import
    ``conftest`` (bench/conftest.py), which under pytest is tests/conftest.py: bench's is put in place for the
    import only. It sets TRITON_INTERPRET on a CPU when imported: the environment is restored too."""
    if name not in _BENCH:
        saved, interpret = sys.modules.get("conftest"), os.environ.get("TRITON_INTERPRET")
        try:
            if "conftest" not in _BENCH:
                _BENCH["conftest"] = _load_path("bench_conftest", ROOT / "bench" / "conftest.py")
            sys.modules["conftest"] = _BENCH["conftest"]
            _BENCH[name] = _load_path(name, ROOT / "bench" / f"{name}.py")
        finally:
            if saved is None:
                sys.modules.pop("conftest", None)
            else:
                sys.modules["conftest"] = saved
            if interpret is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = interpret
    return _BENCH[name]


# =============================================================================================== timing
def time_fn(ctx: Ctx, fn: Callable[[], object]) -> dict:
    """As bench/'s rows: ``median_s`` (with ``mean_s``, ``min_s``, ``rounds``) the wall time of a call synchronised
    after each, and on CUDA ``gpu_time_s`` the device time alone (``triton.testing.do_bench``: CUDA events, L2
    flushed between calls, median), in seconds."""
    gpu = None
    if ctx.device.type == "cuda":
        from triton.testing import do_bench

        gpu = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    walls = _walls(ctx, fn, 20 if ctx.device.type == "cuda" else 3)
    return {"median_s": statistics.median(walls), "mean_s": statistics.fmean(walls), "min_s": min(walls),
            "rounds": len(walls), "gpu_time_s": gpu}


def _device_s(t: dict) -> float:
    """The device time of a timing where there is one (CUDA), else its wall time."""
    return t["gpu_time_s"] or t["median_s"]


def _walls(ctx: Ctx, fn: Callable[[], object], n: int) -> list[float]:
    walls = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        _sync(ctx)
        walls.append(time.perf_counter() - t)
    return walls


def first_call_s(ctx: Ctx, fn: Callable[[], object]) -> float:
    """The first call on its own: autotuning and compiling, timed apart from the steady state."""
    t = time.perf_counter()
    fn()
    _sync(ctx)
    return time.perf_counter() - t


def peak_bytes(ctx: Ctx, fn: Callable[[], object]) -> int | None:
    """Peak device memory of one call beyond what was allocated before it (bench's own measure); None on the CPU."""
    _bench_module("bench_nce")  # loads bench/conftest.py in its place
    return _BENCH["conftest"].peak_memory(fn, ctx.device)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 on the CPU; inf when out is not finite."""
    import torch

    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


# ======================================================================= autotuned kernels: the one adapter
def autotuned_kernels(modules) -> list[tuple[str, object]]:
    """Every ``triton.runtime.autotuner.Autotuner`` defined at the top level of the given modules, as
    (``module.attribute``, autotuner). Found by type, not by name: the kernels' names and configs change."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return []
    return [(f"{m.__name__.rsplit('.', 1)[-1]}.{k}", v) for m in modules for k, v in vars(m).items()
            if isinstance(v, Autotuner)]


def _pruned(tuner, args: tuple, kwargs: dict) -> list:
    """``tuner``'s own prune (early prune and perf model) for a launch with these arguments."""
    tuner.nargs = dict(zip(tuner.arg_names, args))
    try:
        return list(tuner.prune_configs(kwargs))
    except TypeError:  # Triton releases whose prune_configs takes the named arguments too
        return list(tuner.prune_configs(kwargs, tuner.nargs))


def kept_configs(tuners: list[tuple[str, object]], call: Callable[[], object]) -> dict[str, list]:
    """{label: configs its prune keeps} for each autotuner ``call`` launches. ``call`` runs once, each launch of an
    autotuner with the first config it keeps (so nothing is timed, and every later launch in the op is seen)."""
    kept: dict[str, list] = {}

    def recorder(label, tuner):
        def run(*args, **kwargs):
            configs = kept.setdefault(label, _pruned(tuner, args, kwargs))
            with only_config(tuner, configs[0]):
                return type(tuner).run(tuner, *args, **kwargs)

        return run

    for label, tuner in tuners:
        tuner.run = recorder(label, tuner)  # an instance attribute shadows Autotuner.run for this object only
    try:
        call()
    finally:
        for _, tuner in tuners:
            vars(tuner).pop("run", None)
    return kept


@contextlib.contextmanager
def only_config(tuner, config) -> Iterator[None]:
    """``tuner`` restricted to ``config`` (a single config is launched as is: no prune, no timing), restored after."""
    saved = tuner.configs
    tuner.configs = [config]
    try:
        yield
    finally:
        tuner.configs = saved


def describe_config(config) -> str:
    if config is None:
        return "untuned"
    extra = [f"num_warps={config.num_warps}", f"num_stages={config.num_stages}"]
    return ", ".join([f"{k}={v}" for k, v in config.kwargs.items()] + extra)


def for_each_config(ctx: Ctx, call: Callable[[], object]) -> Iterator[str]:
    """Yields once per configuration ``call`` can run with, the op restricted to it meanwhile: once per config kept
    by the prune of each autotuner it launches (the others autotune as usual), or once when it launches none."""
    from cmc_fast.kernels import block, nce

    if ctx.device.type != "cuda":  # the interpreter runs no autotuner, the dry run's references none
        yield (f"{'interpreter' if _kernels_mode(ctx) == 'triton' else 'reference'} (dry run)" if ctx.dry_run
               else "untuned")
        return
    tuners = dict(autotuned_kernels([nce, block]))
    kept = kept_configs(list(tuners.items()), call)
    if not kept:
        yield "untuned"
    for label, configs in kept.items():
        for config in configs:
            with only_config(tuners[label], config):
                yield f"{label}: {describe_config(config)}"


# ================================================================================================ sections
def section_env(ctx: Ctx) -> None:
    import torch

    info = {"device": "cpu (dry run)" if ctx.dry_run else torch.cuda.get_device_name(0),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
            "triton": _version("triton"), "torchvision": _version("torchvision"), "dali": _version("nvidia.dali"),
            "numpy": _version("numpy"), "cpu_cores": len(os.sched_getaffinity(0)), "budget_s": ctx.facts["budget_s"]}
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(sms=props.multi_processor_count, l2_bytes=getattr(props, "L2_cache_size", None),
                    memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                    driver=_nvidia_smi("driver_version"), clocks_sm_mhz=_nvidia_smi("clocks.sm"))
    ctx.facts["driver"], ctx.facts["device_name"] = info.get("driver"), info["device"]
    ctx.results.emit("env", "environment", "info", kind="env", **info)


def _version(module: str) -> str | None:
    try:
        return __import__(module, fromlist=["__version__"]).__version__
    except Exception:  # noqa: BLE001 - absent or broken: recorded as None
        return None


def _nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def section_bandwidth(ctx: Ctx) -> None:
    """Device-to-device copy (bytes read + written) and pinned host-to-device copy: the ceilings of the floors."""
    import torch

    n = (1 << 30) if not ctx.dry_run else (1 << 20)
    src = torch.randn(n // 4, device=ctx.device)
    dst = torch.empty_like(src)
    t = time_fn(ctx, lambda: dst.copy_(src))
    ctx.facts["copy_bytes_per_s"] = 2 * n / _device_s(t)
    ctx.emit("bandwidth", "device-to-device copy", "ok", bytes=2 * n, bytes_per_s=2 * n / _device_s(t), **t)
    host = torch.randn(n // 4).pin_memory() if ctx.device.type == "cuda" else torch.randn(n // 4)
    t = time_fn(ctx, lambda: dst.copy_(host, non_blocking=True))
    ctx.emit("bandwidth", "host-to-device copy (pinned)", "ok", bytes=n, bytes_per_s=n / _device_s(t), **t)
    src = dst = host = None  # 2 GiB freed before the gathers (the lambdas above are done with them)
    if ctx.device.type == "cuda":
        for dtype in (torch.float32, torch.bfloat16):
            _measure_l2_gather(ctx, dtype)


# The L2 gather bandwidth that kernels/gpus.GPUS owes (NVIDIA publishes none): random rows of a bank that
# fits in L2 (the NCE benchmark's 9528 x 128, 4.9 MB in fp32 against 50-60 MB of L2), summed so that nothing but the
# rows and their indices is read; the NCE loss's L2 floor is its gathered bytes over this rate. It is this simple
# probe's rate (4096 programs of 4 warps, 32 rows a step), a lower bound of what L2 can serve: a kernel that keeps
# more loads in flight may come in under the floor built on it. Built for sm_90 (kernels/hopper_build, vectorised
# specialisation): 55 registers fp32 / 56 bf16, no spills, 16 B of shared memory.
L2_BANK, L2_ROWS, L2_ROWS_PER_PROGRAM = (9528, 128), 1 << 20, 256


def l2_gather_sums(bank, idx, rows_per_program: int = L2_ROWS_PER_PROGRAM):
    """Per-program sums of the bank rows ``idx`` names (``rows_per_program`` consecutive indices a program)."""
    import torch

    programs = idx.numel() // rows_per_program
    out = torch.empty(programs, device=bank.device, dtype=torch.float32)
    _gather_sum_kernel[(programs,)](bank, idx, out, ROWS=rows_per_program, D=bank.shape[1], BLOCK_R=32, num_warps=4)
    return out


def _measure_l2_gather(ctx: Ctx, dtype) -> None:
    import torch

    g = _gen()
    bank = torch.randn(*L2_BANK, generator=g).to(ctx.device, dtype)
    idx = torch.randint(0, L2_BANK[0], (L2_ROWS,), generator=g, dtype=torch.int32).to(ctx.device)
    sums = l2_gather_sums(bank, idx)
    head = idx[:4 * L2_ROWS_PER_PROGRAM].long()  # four programs' sums, checked against torch's gather
    want = bank[head].double().view(4, -1).sum(1)
    err = rel_err(sums[:4], want)
    t = time_fn(ctx, lambda: l2_gather_sums(bank, idx))
    nbytes = L2_ROWS * L2_BANK[1] * bank.element_size()
    elem = bank.element_size()
    ctx.facts.setdefault("l2_gather_bytes_per_s", {})[elem] = nbytes / _device_s(t)
    ctx.emit("bandwidth", f"L2 gather: {L2_ROWS} random rows of a {L2_BANK[0]}x{L2_BANK[1]} {str(dtype)[6:]} bank "
             f"({bank.numel() * elem / 2**20:.1f} MiB)", "ok" if err < 1e-4 else "fail", bytes=nbytes,
             bytes_per_s=nbytes / _device_s(t), sum_rel_err=err, **t)


# ------------------------------------------------------------------------------------------- correctness
@dataclass
class Check:
    """One op at one shape: ``run()`` gives its outputs on the device, ``ref`` the float64 ones, ``tol`` the
    relative error (Frobenius) accepted for each output. With ``ref_factor`` an output also passes within that
    factor times the error of the PyTorch reference run in the same dtype on the same device, never beyond
    HARD_CAP, as tests/test_block_kernel.py judges BLOCK: gradients through the signed sqrt scale like 1/sqrt|z|,
    and random data always hold a few near-zero z that no float32 (let alone bf16) computation gets right to 1e-4."""

    op: str
    run: Callable[[], list]
    ref: list
    tol: tuple[float, ...]
    names: tuple[str, ...]
    ref_factor: float | None = None
    kernels: str | None = None  # CMC_FAST_KERNELS to run it under (None: the section's)


HARD_CAP = 0.2  # a wrong formula is off by O(1)


def _gen(seed: int | None = None):
    import torch

    return torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))


def nce_check(ctx: Ctx, b: int, d: int, k: int, n: int, bank_dtype, need_grad: bool = True,
              idx_dtype=None) -> Check:
    """NCE loss (and anchor gradient) on fresh random unit vectors, against the DESIGN formula in float64."""
    import torch
    import torch.nn.functional as F

    from cmc_fast import ops

    g, tau = _gen(), 0.07
    anchor = F.normalize(torch.randn(b, d, generator=g), dim=1)
    bank = F.normalize(torch.randn(n, d, generator=g), dim=1).to(bank_dtype)  # the rounded bank is the input
    idx = torch.cat([torch.randperm(n, generator=g)[:b, None], torch.randint(0, n, (b, k), generator=g)], 1)
    z = float(torch.exp(bank[idx].double() @ anchor.double().unsqueeze(2) / tau).mean() * n)
    a64 = anchor.double().requires_grad_()
    s = (bank[idx].double() @ a64.unsqueeze(2)).squeeze(2) / tau
    p, noise, eps = torch.exp(s) / z, k / n, 1e-7
    loss64 = -(torch.log(p[:, 0] / (p[:, 0] + noise + eps)) + torch.log(noise / (p[:, 1:] + noise + eps)).sum(1)).mean()
    (grad64,) = torch.autograd.grad(loss64, a64)
    a_dev, bank_dev, idx_dev = anchor.to(ctx.device), bank.to(ctx.device), idx.to(ctx.device, idx_dtype or idx.dtype)

    def run():
        a = a_dev.clone().requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad):
            loss = ops.nce_loss(a, bank_dev, idx_dev, tau=tau, z=z, n_data=n)
        return [loss, torch.autograd.grad(loss, a)[0]] if need_grad else [loss]

    ref = [loss64, grad64] if need_grad else [loss64]
    op = (f"nce_loss B={b} d={d} K={k} bank={str(bank_dtype).replace('torch.', '')} idx={str(idx_dev.dtype)[6:]}"
          + ("" if need_grad else " no-grad"))
    return Check(op, run, ref, (1e-4,) * len(ref), ("loss", "grad")[:len(ref)])


def nce_partition_check(ctx: Ctx, b: int, d: int, k: int, n: int) -> Check:
    import torch
    import torch.nn.functional as F

    from cmc_fast import ops

    g = _gen()
    anchor, bank = F.normalize(torch.randn(b, d, generator=g), dim=1), F.normalize(torch.randn(n, d, generator=g), 1)
    idx = torch.randint(0, n, (b, k + 1), generator=g)
    z64 = torch.exp(bank[idx].double() @ anchor.double().unsqueeze(2) / 0.07).mean() * n
    args = (anchor.to(ctx.device), bank.to(ctx.device), idx.to(ctx.device))
    run = lambda: [torch.tensor(ops.nce_partition(*args, tau=0.07, n_data=n))]  # noqa: E731
    return Check(f"nce_partition B={b} d={d} K={k}", run, [z64], (1e-4,), ("z",))


def bank_update_check(ctx: Ctx, n: int, d: int, rows: int, bank_dtype) -> Check:
    import torch
    import torch.nn.functional as F

    from cmc_fast import ops

    g = _gen()
    bank = F.normalize(torch.randn(n, d, generator=g), dim=1).to(bank_dtype)
    index = torch.randperm(n, generator=g)[:rows]  # distinct rows: no last-occurrence rule to mirror
    feats = torch.randn(rows, d, generator=g)
    want = bank.double().clone()
    want[index] = F.normalize(bank[index].double() * 0.5 + feats.double() * 0.5, dim=1)

    def run():
        dev_bank = bank.to(ctx.device).clone()
        ops.bank_update_(dev_bank, index.to(ctx.device), feats.to(ctx.device), 0.5)
        return [dev_bank]

    tol = 1e-5 if bank_dtype == torch.float32 else 1e-2  # bf16 storage rounds each element (2^-9 relative)
    return Check(f"bank_update_ N={n} d={d} rows={rows} bank={str(bank_dtype).replace('torch.', '')}", run, [want],
                 (tol,), ("bank",))


# tests/test_block_kernel.py's (forward, gradients) tolerances per tl.dot input precision: IEEE fp32 at "highest",
# TF32 at "high"/"medium" (~10-bit mantissas), 16-bit inputs
BLOCK_TOL = {"ieee": (1e-5, 1e-4), "tf32": (5e-3, 2e-2), "16-bit": (5e-2, 1e-1)}


def block_check(ctx: Ctx, batch: int, sizes: list[int], rank: int, x_dtype, w_dtype, precision: str,
                path: str) -> Check:
    """BLOCK merge forward and every gradient against the reference's autograd in float64, through ``path``:
    ``fused`` (the Triton kernels, CMC_FAST_KERNELS=triton) or ``bmm`` (``block_merge_bmm``, CMC_FAST_KERNELS=bmm),
    under float32 matmul precision ``precision``."""
    import torch
    from cmc_fast.kernels.block import block_merge
    from cmc_fast.kernels.block_plan import dot_precision
    from cmc_fast.kernels.reference import block_merge_reference

    g, mm = _gen(), sum(sizes)
    x0, x1 = (torch.randn(batch, mm, generator=g).to(x_dtype) for _ in range(2))
    n_w = rank * sum(s * s for s in sizes)
    ws = [(torch.randn(n_w, generator=g) * max(sizes) ** -0.5).to(w_dtype), (0.1 * torch.randn(rank * mm, generator=g)
          ).to(w_dtype), (torch.randn(n_w, generator=g) * max(sizes) ** -0.5).to(w_dtype),
          (0.1 * torch.randn(rank * mm, generator=g)).to(w_dtype)]
    grad = torch.randn(batch, mm, generator=g).to(x_dtype)
    leaves64 = [t.double().requires_grad_() for t in (x0, x1, *ws)]
    out64 = block_merge_reference(*leaves64, sizes=sizes, rank=rank)
    grads64 = torch.autograd.grad(out64, leaves64, grad.double())
    mode = {"fused": _kernels_mode(ctx), "bmm": "bmm"}[path]  # CMC_FAST_KERNELS for the path

    def run():
        leaves = [t.to(ctx.device).requires_grad_() for t in (x0, x1, *ws)]
        with _matmul_precision(precision):
            out = block_merge(*leaves, sizes=sizes, rank=rank)
            grads = torch.autograd.grad(out, leaves, grad.to(ctx.device))
        return [out, *grads]

    dot = dot_precision(x_dtype, precision) if x_dtype == torch.float32 else "16-bit"
    out_tol, grad_tol = BLOCK_TOL[dot]
    op = (f"block_merge {path} B={batch} chunks={len(sizes)} max={max(sizes)} rank={rank} x={str(x_dtype)[6:]} "
          f"w={str(w_dtype)[6:]} {precision} ({dot})")
    return Check(op, run, [out64.detach(), *grads64], (out_tol,) + (grad_tol,) * 6,
                 ("out", "dx0", "dx1", "dw0", "db0", "dw1", "db1"), ref_factor=4.0 if x_dtype == torch.float32 else 2.0,
                 kernels=mode)


@contextlib.contextmanager
def _matmul_precision(precision: str) -> Iterator[None]:
    """torch.set_float32_matmul_precision for the duration: the fused kernels' tl.dot precision and cuBLAS's (the
    bmm path and the references) follow it."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def correctness_checks(ctx: Ctx) -> Iterator[tuple[Check, bool]]:
    """(check, every kept config) in priority order: the benchmark's d = 128 regime over every kept config, then
    single cases for the other paths (no gradient, unaligned d, the untuned d > 256 path, partition, update, BLOCK).
    Built lazily: each check's float64 reference is computed just before it runs."""
    import torch

    bf16, fp32 = torch.bfloat16, torch.float32
    small = ctx.dry_run
    yield nce_check(ctx, 8, 128, 300 if not small else 20, 1000 if not small else 64, fp32), True
    yield nce_check(ctx, 8, 128, 300 if not small else 20, 1000 if not small else 64, bf16), True
    yield nce_check(ctx, 8, 128, 300 if not small else 20, 1000 if not small else 64, fp32, need_grad=False), False
    yield nce_check(ctx, 8, 128, 300 if not small else 20, 1000 if not small else 64, fp32,
                    idx_dtype=torch.int32), True  # the trainer's and the benchmark's index type
    yield nce_check(ctx, 8, 100, 200 if not small else 20, 500 if not small else 64, fp32), True  # 16 B loads off
    yield nce_check(ctx, 4, 384, 100 if not small else 10, 300 if not small else 32, fp32), False  # untuned path
    yield nce_partition_check(ctx, 8, 128, 300 if not small else 20, 1000 if not small else 64), False
    yield bank_update_check(ctx, 1000 if not small else 64, 128, 32, fp32), False
    yield bank_update_check(ctx, 1000 if not small else 64, 128, 32, bf16), False
    sizes = [80, 80, 96] if not small else [16, 24]
    # float32 at each float32 matmul precision (IEEE dots, then TF32 twice), bf16, and AMP (bf16 x, fp32 weights).
    # bf16 BLOCK on CUDA only, as in tests/test_block_kernel.py: the CPU's bf16 reference rounds every product and
    # rank sum to bf16 (errors of 0.1-0.5 against float64), nothing a check could be judged by
    modes = [(fp32, fp32, "highest"), (fp32, fp32, "high"), (fp32, fp32, "medium"), (bf16, bf16, "highest"),
             (bf16, fp32, "highest")]
    for x_dtype, w_dtype, precision in modes[:3] if small else modes:
        for path in ("fused", "bmm"):
            yield block_check(ctx, 24, sizes, 5 if not small else 3, x_dtype, w_dtype, precision, path), path == "fused"


def section_correctness(ctx: Ctx) -> None:
    """Every check (each kept autotune config where it has any), then ``choose_block_path``'s picks."""
    mode = _kernels_mode(ctx)
    for check, every_config in correctness_checks(ctx):
        run_mode = check.kernels or mode

        def launch(check=check, run_mode=run_mode):
            with kernel_mode(run_mode):
                return check.run()

        labels = for_each_config(ctx, launch) if every_config else iter(["as launched"])
        for label in labels:
            _run_check(ctx, check, label, mode)
    record_block_dispatch(ctx)


def record_block_dispatch(ctx: Ctx) -> None:
    """``kernels.block_plan.choose_block_path``'s pick (CMC_FAST_KERNELS=auto) at every shape of bench/bench_block.py,
    eager and under torch.compile, with the two estimates it compares. A static rule: the dry run asks it for CUDA
    (H100 SXM constants, this machine having no GPU) and records the same picks a GPU run of that kind makes; the
    timings section measures whether they are right."""
    from cmc_fast.kernels.block_plan import choose_block_path, estimate_bmm, estimate_fused
    from cmc_fast.kernels.gpus import gpu_name
    from cmc_fast.kernels.reference import block_chunk_sizes

    bench = _bench_module("bench_block")
    device = "cuda"  # the rule on CPU tensors is always the reference: ask for the GPU's pick
    gpu = gpu_name(ctx.device)
    with kernel_mode("auto"):
        for (mm, chunks, rank), batch, dtype_id in _block_bench_shapes(bench):
            dtype, precision = bench.DTYPES[dtype_id]
            sizes = block_chunk_sizes(mm, chunks)
            pick = {how: choose_block_path(sizes, rank, batch, dtype, device, compiled=how == "compiled",
                                           precision=precision, gpu=gpu) for how in ("eager", "compiled")}
            ctx.emit("correctness", f"choose_block_path mm={mm} chunks={chunks} rank={rank} B={batch} {dtype_id}",
                     "info", gpu=gpu, path=pick["eager"], path_compiled=pick["compiled"],
                     est_fused_s=estimate_fused(batch, sizes, rank, dtype, precision, gpu),
                     est_bmm_s=estimate_bmm(batch, sizes, rank, dtype, precision, gpu),
                     est_bmm_compiled_s=estimate_bmm(batch, sizes, rank, dtype, precision, gpu, compiled=True))


def _block_bench_shapes(bench) -> list[tuple]:
    """((mm, chunks, rank), batch, dtype id) of every BLOCK benchmark on a GPU (bench/bench_block.py's lists)."""
    return [(c, b, d) for c in bench.CONFIGS for b in (64, 256) for d in bench.DTYPES]


def _run_check(ctx: Ctx, check: Check, label: str, mode: str) -> None:
    t, mode = time.perf_counter(), check.kernels or mode
    try:
        with kernel_mode(mode):
            outs = check.run()
        _sync(ctx)
    except Exception as exc:  # noqa: BLE001 - one op failing must not hide the others
        error = f"{type(exc).__name__}: {exc}"[:300]
        ctx.emit("correctness", check.op, "error", config=label, kernels=mode, error=error)
        return
    errs = [rel_err(o, r) for o, r in zip(outs, check.ref, strict=True)]
    allowed = list(check.tol)
    ref_errs = None
    if check.ref_factor:
        with kernel_mode("reference"):
            ref_errs = [rel_err(o, r) for o, r in zip(check.run(), check.ref, strict=True)]
        allowed = [min(max(tol, check.ref_factor * r), HARD_CAP) for tol, r in zip(check.tol, ref_errs, strict=True)]
    ok = all(e <= a for e, a in zip(errs, allowed, strict=True))
    worst = max(range(len(errs)), key=lambda i: errs[i] / allowed[i])
    ctx.emit("correctness", check.op, "ok" if ok else "fail", config=label, kernels=mode,
             worst=check.names[worst], worst_rel_err=errs[worst], allowed=allowed[worst],
             rel_errs=dict(zip(check.names, errs, strict=True)),
             same_dtype_reference_rel_errs=ref_errs and dict(zip(check.names, ref_errs, strict=True)),
             seconds=time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------- timings
def nce_cases(ctx: Ctx) -> list[tuple]:
    import torch

    if ctx.dry_run:
        return [(4, 16, 32, 128, torch.float32)]
    nce = _bench_module("bench_nce")
    return [(*c, t) for c in nce.CASES for t in nce.DTYPES]


def section_timings(ctx: Ctx) -> None:
    """NCE and BLOCK cases taken in turn, each op's most decisive first (NCE: the largest K; BLOCK: ``block_cases``'s
    order), so a stop at the cap leaves both ops measured. Each case: the kernel op (its first call, autotune +
    compile, apart), then its rivals (NCE: eager, bmm; BLOCK: auto, loop, bmm)."""
    nce = sorted(nce_cases(ctx), key=lambda c: -c[2])  # K = 16384 first
    block = block_cases(ctx)
    for i in range(max(len(nce), len(block))):
        for case in nce[i:i + 1]:
            for provider in ("kernel", "eager", "bmm"):
                _time_nce(ctx, provider, *case)
        for case in block[i:i + 1]:
            for provider in BLOCK_EAGER_PROVIDERS:
                _time_block(ctx, provider, *case)


def _nce_provider(ctx: Ctx, provider: str):
    from cmc_fast.kernels.reference import nce_fwd_torch, nce_loss_reference

    from cmc_fast import ops

    if provider == "kernel":  # bench/bench_nce.py's provider names, so the rows merge with its rows
        mode = _kernels_mode(ctx)
        return ops.nce_loss, "triton" if mode == "triton" else "triton (dry run: reference, no interpreter)"
    if provider == "eager":
        return nce_loss_reference, "eager"

    def bmm(anchor, bank, idx, *, tau, z, n_data, eps=1e-7):  # the closed-form loss + gradient, one bmm each
        return nce_fwd_torch(anchor.detach(), bank, idx, z, tau, n_data, eps, True)

    return bmm, "bmm (closed-form gradient)"


def _time_nce(ctx: Ctx, provider: str, b, d, k, n, dtype) -> None:
    import torch

    nce = _bench_module("bench_nce")
    nce.DEVICE = ctx.device
    anchor, bank, idx, z = nce.make_case(b, d, k, n, dtype)
    fn, label = _nce_provider(ctx, provider)

    def step():
        loss = fn(anchor, bank, idx, tau=nce.TAU, z=z, n_data=n)
        if isinstance(loss, tuple):  # bmm: (loss, grad) already
            return loss
        return loss, torch.autograd.grad(loss, anchor)[0]

    group = f"nce fwd+bwd B={b} d={d} K={k} N={n} bank={str(dtype).replace('torch.', '')}"
    with kernel_mode(_kernels_mode(ctx)):
        _emit_timing(ctx, "timings", group, label, step, **nce_floors(ctx, b, d, k, n, dtype, idx.element_size()))


def nce_floors(ctx: Ctx, b, d, k, n, dtype, idx_elem: int) -> dict:
    """kernels/nce.py's floor bytes (``floor_bytes``: the L2-gathered rows and what must cross HBM) over this run's
    own measurements: the L2 gather bandwidth and the copy bandwidth of the bandwidth section; ``floor_s`` the
    larger of the two floors. Beside them ``spec_floors_us``, kernels/nce.py's ``hopper_floors`` for this GPU (H200
    by its name, else H100 SXM: the specified HBM bandwidth, "owed" where no figure exists). The dry run computes
    both (the same calls) but keeps no measured floor: a CPU's bandwidths are no GPU's."""
    import torch
    from cmc_fast.kernels.nce_plan import floor_bytes
    from cmc_fast.kernels.nce_sm90 import hopper_floors

    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = floor_bytes(b, d, k, n, elem, idx_elem)
    gpu = "H200" if "H200" in str(ctx.facts.get("device_name", "")) else "H100 SXM"
    spec = hopper_floors((b, d, k, n), {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype])
    l2 = None if ctx.dry_run else ctx.facts.get("l2_gather_bytes_per_s", {}).get(elem)
    hbm = None if ctx.dry_run else ctx.facts.get("copy_bytes_per_s")
    out = {"l2_gather_bytes": nbytes["l2_gather"], "hbm_bytes": nbytes["hbm"],
           "l2_floor_s": nbytes["l2_gather"] / l2 if l2 else None,
           "hbm_floor_s": nbytes["hbm"] / hbm if hbm else None, "floor_gpu": gpu, "spec_floors_us": spec[gpu]}
    known = [f for f in (out["l2_floor_s"], out["hbm_floor_s"]) if f]
    out["floor_s"] = max(known) if known else None
    return out


def _emit_timing(ctx: Ctx, section: str, group: str, provider: str, step: Callable, *, floor_s=None, **extra):
    first = first_call_s(ctx, step)
    t = time_fn(ctx, step)
    # measured/floor as bench/ computes it (the synchronised wall time), and the device time's beside it
    fields = dict(group=group, provider=provider, first_call_s=first, **t, floor_s=floor_s,
                  measured_over_floor=(t["median_s"] / floor_s) if floor_s else None,
                  gpu_time_over_floor=(t["gpu_time_s"] / floor_s) if floor_s and t["gpu_time_s"] else None,
                  peak_bytes=peak_bytes(ctx, step), **extra)
    ctx.results.emit(section, f"{group} | {provider}", "ok", kind="bench", **fields)


# bench/bench_block.py's providers that need no compile, the decisive ones first: the fused kernels (forced), the
# dispatch's pick (``path`` recorded), the eager chunk loop (the original), the eager bmm path. The compiled ones
# ("compile", "bmm-compile") run in the compiled section.
BLOCK_EAGER_PROVIDERS = ("fused", "auto", "loop", "bmm")
BLOCK_COMPILED_PROVIDERS = ("compile", "bmm-compile")


def block_cases(ctx: Ctx) -> list[tuple]:
    """(mode, (mm, chunks, rank), B, bench/bench_block.py dtype id), most decisive first: both configurations at
    B=64 in float32 (issue 12's criterion; the compiled section takes these two), then bf16, TF32, the forward
    alone, B=256."""
    if ctx.dry_run:
        return [("fwd+bwd", (64, 4, 3), 4, "float32"), ("fwd+bwd", (64, 4, 3), 4, "float32-tf32")]
    return [("fwd+bwd", (1600, 20, 15), 64, "float32"), ("fwd+bwd", (1600, 20, 15), 64, "bfloat16"),
            ("fwd+bwd", (1600, 20, 15), 64, "float32-tf32"), ("fwd+bwd", (256, 18, 15), 64, "float32"),
            ("fwd", (1600, 20, 15), 64, "float32"), ("fwd+bwd", (1600, 20, 15), 256, "float32"),
            ("fwd+bwd", (256, 18, 15), 64, "bfloat16")]


def block_group(mode: str, config: tuple, batch: int, dtype_id: str) -> str:
    """bench/bench_block.py's group name, so these rows merge with (and replace) its rows in bench/results."""
    mm, chunks, rank = config
    return f"block_merge {mode} mm={mm} chunks={chunks} rank={rank} B={batch} {dtype_id}"


def block_floor_fields(ctx: Ctx, batch: int, sizes: list[int], rank: int, dtype, precision: str,
                       backward: bool) -> dict:
    """``kernels.block_plan.block_merge_floor`` for this GPU (H200 by its name, else H100 SXM) at the row's dtype and
    precision, as bench/bench_block.py records it. Computed in the dry run too, kept there as ``gpu_floor_s`` with
    ``floor_s`` empty (a CPU's time over a GPU floor means nothing)."""
    from cmc_fast.kernels.block_plan import block_merge_floor
    from cmc_fast.kernels.gpus import gpu_name

    gpu = gpu_name(ctx.device)
    floor = block_merge_floor(batch, sizes, rank, dtype=dtype, precision=precision, gpu=gpu, backward=backward)
    if ctx.device.type == "cuda":
        return {"floor_s": floor, "floor_gpu": gpu}
    return {"floor_s": None, "gpu_floor_s": floor, "floor_gpu": gpu}


def _block_provider_mode(ctx: Ctx, provider: str) -> str:
    """CMC_FAST_KERNELS as bench/bench_block.py sets it: ``triton`` for ``fused`` (the interpreter in the dry run,
    where usable), ``auto`` for the others (the loop and bmm providers do not read it)."""
    return _kernels_mode(ctx) if provider == "fused" else "auto"


def _time_block(ctx: Ctx, provider: str, mode: str, config: tuple, batch: int, dtype_id: str) -> None:
    import torch
    from cmc_fast.kernels.block_plan import choose_block_path
    from cmc_fast.kernels.reference import block_chunk_sizes

    bench = _bench_module("bench_block")
    bench.DEVICE = ctx.device
    dtype, precision = bench.DTYPES[dtype_id]
    sizes = block_chunk_sizes(config[0], config[1])
    rank, kernels = config[2], _block_provider_mode(ctx, provider)
    fn, leaves, grad = bench.make_case(provider, batch, sizes, rank, dtype)
    step = fn if mode == "fwd" else (lambda: torch.autograd.grad(fn(), leaves, grad))
    extra = block_floor_fields(ctx, batch, sizes, rank, dtype, precision, mode != "fwd")
    with kernel_mode(kernels), _matmul_precision(precision):
        if provider == "auto":
            extra["path"] = choose_block_path(sizes, rank, batch, dtype, ctx.device)
        label = provider if kernels != "reference" else f"{provider} (dry run: reference, no interpreter)"
        _emit_timing(ctx, "timings", block_group(mode, config, batch, dtype_id), label, step, kernels=kernels,
                     precision=precision, **extra)


# -------------------------------------------------------------------------------------------- compiled
def section_compiled(ctx: Ctx) -> None:
    """torch.compile of the references (dynamic=False, the best case for compile): the compile's cold cost as
    ``first_call_s``, then the steady state, per shape (each shape compiles anew)."""
    import torch

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    backend = "eager" if ctx.dry_run else "inductor"
    nce_all, block_all = nce_cases(ctx), block_cases(ctx)
    jobs = [("nce", nce_all[i]) for i in (0, 2) if i < len(nce_all)]
    # BLOCK: both configurations at B=64 in float32 (issue 12's criterion), each compile of each provider apart
    jobs += [(provider, block_all[i]) for i in (0, 3) if i < len(block_all) for provider in BLOCK_COMPILED_PROVIDERS]
    for kind, case in jobs:
        if kind == "nce":
            _compiled_nce(ctx, backend, *case)
        else:
            _compiled_block(ctx, backend, kind, *case)


def _compiled_nce(ctx: Ctx, backend: str, b, d, k, n, dtype) -> None:
    import torch
    from cmc_fast.kernels.reference import nce_loss_reference

    nce = _bench_module("bench_nce")
    nce.DEVICE = ctx.device
    anchor, bank, idx, z = nce.make_case(b, d, k, n, dtype)
    fn = torch.compile(nce_loss_reference, fullgraph=True, dynamic=False, backend=backend)

    def step():
        loss = fn(anchor, bank, idx, tau=nce.TAU, z=z, n_data=n)
        return torch.autograd.grad(loss, anchor)

    group = f"nce fwd+bwd B={b} d={d} K={k} N={n} bank={str(dtype).replace('torch.', '')}"
    _emit_timing(ctx, "compiled", group, "compile", step, backend=backend,
                 **nce_floors(ctx, b, d, k, n, dtype, idx.element_size()))


def _compiled_block(ctx: Ctx, backend: str, provider: str, mode: str, config: tuple, batch: int,
                    dtype_id: str) -> None:
    """bench/bench_block.py's ``compile`` (the chunk loop) or ``bmm-compile`` (``block_merge_bmm``) provider,
    compiled afresh here with ``backend`` (the bench's cache would hold Inductor's default)."""
    import torch
    from cmc_fast.kernels.reference import block_chunk_sizes, block_merge_bmm

    bench = _bench_module("bench_block")
    bench.DEVICE = ctx.device
    dtype, precision = bench.DTYPES[dtype_id]
    sizes = block_chunk_sizes(config[0], config[1])
    rank = config[2]
    fn, leaves, grad = bench.make_case("loop" if provider == "compile" else "bmm", batch, sizes, rank, dtype)
    if provider == "compile":
        compiled = torch.compile(bench.loop_merge, dynamic=False, backend=backend)
        xs, params = leaves[:2], leaves[2:]
        groups = [params[i * len(sizes):(i + 1) * len(sizes)] for i in range(4)]
        run = lambda: compiled(*xs, *groups, rank)  # noqa: E731
    else:
        compiled = torch.compile(block_merge_bmm, dynamic=False, backend=backend)
        run = lambda: compiled(*leaves, sizes=sizes, rank=rank)  # noqa: E731
    step = run if mode == "fwd" else (lambda: torch.autograd.grad(run(), leaves, grad))
    extra = block_floor_fields(ctx, batch, sizes, rank, dtype, precision, mode != "fwd")
    with _matmul_precision(precision):
        _emit_timing(ctx, "compiled", block_group(mode, config, batch, dtype_id), provider, step, backend=backend,
                     precision=precision, **extra)


# ------------------------------------------------------------------------------------------- train step
def stage1_models(ctx: Ctx):
    """(text encoder, image encoder, heads, CrossModalNCE, batch maker, B) at the paper's sizes: BERT-base (hidden
    768, 12 layers, Chinese BERT-wwm's 21128 tokens, 250 tokens a post) and VGG19 on 256 x 128 images, K = 1500 over
    Weibo's 7531 training posts, B = 32; randomly initialised. Tiny stand-ins in the dry run."""
    import torch
    from transformers import BertConfig, BertModel

    from cmc_fast.distill import CrossModalNCE
    from cmc_fast.encoders import TextEncoder, TinyCNN, TorchvisionEncoder, tiny_text_encoder

    if ctx.dry_run:
        b, seq, vocab, size, n, k = 4, 16, 100, (32, 32), 64, 16
        text, image = tiny_text_encoder(vocab, seq, dim=32, layers=1), TinyCNN(8)
    else:
        b, seq, vocab, size, n, k = 32, 250, 21128, (256, 128), 7531, 1500
        text = TextEncoder(BertModel(BertConfig(vocab_size=vocab)), pooling="pooler")
        image = TorchvisionEncoder("vgg19", size)
    labels = torch.randint(0, 2, (n,), generator=_gen(0))
    nce = CrossModalNCE(text.out_dim, image.out_dim, labels, k=k)
    heads = torch.nn.ModuleList([torch.nn.Linear(text.out_dim, 2), torch.nn.Linear(image.out_dim, 2)])
    g = _gen(1)

    def batch():
        ids = torch.randint(1, vocab, (b, seq), generator=g)
        return (ids.to(ctx.device), torch.ones(b, seq, dtype=torch.long, device=ctx.device),
                torch.randn(b, 3, *size, generator=g).to(ctx.device), torch.randint(0, n, (b,), generator=g).to(
                    ctx.device), labels[:b].to(ctx.device))

    return [m.to(ctx.device) for m in (text, image, heads, nce)], batch, b


def stage1_step_fn(ctx: Ctx, models, amp: bool, compiled: bool) -> Callable:
    """One stage-1 step: L = CE_T + CE_V + 0.3 L_{V->T} + 0.3 L_{T->V}, one backward, Adam (text, 2e-5) and SGD
    (image, 3e-4) steps (DESIGN section 1)."""
    import torch
    import torch.nn.functional as F

    text, image, heads, nce = models
    opt_t = torch.optim.Adam([*text.parameters(), *heads[0].parameters(), *nce.embed_t.parameters()], lr=2e-5)
    opt_v = torch.optim.SGD([*image.parameters(), *heads[1].parameters(), *nce.embed_v.parameters()], lr=3e-4,
                            momentum=0.9)

    def loss_fn(ids, mask, pixels, index, y):
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
            t, v = text(ids, mask), image(pixels)
            ce = F.cross_entropy(heads[0](t).float(), y) + F.cross_entropy(heads[1](v).float(), y)
        l_v2t, l_t2v = nce(t.float(), v.float(), index)
        return ce + 0.3 * (l_v2t + l_t2v)

    backend = "eager" if ctx.dry_run else "inductor"
    forward = torch.compile(loss_fn, backend=backend) if compiled else loss_fn

    def step(data):
        opt_t.zero_grad(set_to_none=True)
        opt_v.zero_grad(set_to_none=True)
        loss = forward(*data)
        loss.backward()
        opt_t.step()
        opt_v.step()
        return loss.detach()

    return step


# The three (eager fp32; AMP; AMP + compile + kernels) first, then AMP + kernels without compile, which
# splits the last one's gain between the kernels and the compiler.
TRAIN_VARIANTS = [("eager fp32, kernels=reference", False, False, "reference"),
                  ("amp bf16, kernels=reference", True, False, "reference"),
                  ("amp bf16 + compile, kernels=triton", True, True, "triton"),
                  ("amp bf16, kernels=triton", True, False, "triton")]


def section_train(ctx: Ctx) -> None:
    """Each variant starts from a copy of the same randomly initialised models (built once: ~5 s of CPU init)."""
    import copy

    import torch

    models, batch, b = stage1_models(ctx)
    batches = [batch() for _ in range(3)]
    for label, amp, compiled, mode in TRAIN_VARIANTS:
        torch._dynamo.reset()
        _train_variant(ctx, copy.deepcopy(models), batches, b, label, amp, compiled,
                       mode if not ctx.dry_run else "reference")
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def _train_variant(ctx: Ctx, models: list, batches: list, b: int, label: str, amp: bool, compiled: bool,
                   mode: str) -> None:
    """Z from a first batch (untimed), the first step (compile + autotune) timed apart, then 10 steps over 3
    batches already on the device."""
    import torch

    step = stage1_step_fn(ctx, models, amp, compiled)
    turn = iter(range(1 << 30))
    with kernel_mode(mode):
        with torch.no_grad():
            data = batches[0]
            models[3].init_partition(models[0](*data[:2]).float(), models[1](data[2]).float(), data[3])
        first = first_call_s(ctx, lambda: step(batches[0]))
        step(batches[1])
        peak = peak_bytes(ctx, lambda: step(batches[2]))
        walls = _walls(ctx, lambda: step(batches[next(turn) % 3]), 3 if ctx.dry_run else 10)
    what = "BERT-base + VGG19" if not ctx.dry_run else "tiny encoders"
    ctx.emit("train", f"stage1 step B={b} | {label}", "ok", kind="bench",
             group=f"train step stage1 B={b} ({what}, random init)",
             provider=label + (" (dry run: reference kernels)" if ctx.dry_run and "triton" in label else ""),
             first_call_s=first, median_s=statistics.median(walls), mean_s=statistics.fmean(walls),
             min_s=min(walls), rounds=len(walls), floor_s=None, measured_over_floor=None, peak_bytes=peak)


# ----------------------------------------------------------------------------------------------- images
def weibo_jpegs(ctx: Ctx) -> list[str]:
    """The Weibo JPEGs of CMC_FAST_SHARED_DATA or ../shared/data;
    in the dry run 8 small generated ones when none is there."""
    roots = [os.environ.get("CMC_FAST_SHARED_DATA"), str(ROOT.parent / "shared" / "data")]
    for root in filter(None, roots):
        folders = [Path(root, "weibo", d) for d in ("rumor_images", "nonrumor_images")]
        paths = sorted(str(p) for f in folders if f.is_dir() for p in f.iterdir() if p.is_file())
        if paths:
            return paths[:16] if ctx.dry_run else paths
    if not ctx.dry_run:
        return []
    import torch
    from PIL import Image

    folder = ctx.results.path.parent / "dry-run-jpegs"  # beside the results: nothing left elsewhere
    folder.mkdir(exist_ok=True)
    g = _gen(2)
    for i in range(8):
        pixels = torch.randint(0, 256, (48 + 8 * i, 64, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return sorted(str(p) for p in folder.iterdir())


def section_images(ctx: Ctx) -> None:
    paths = weibo_jpegs(ctx)
    if not paths:
        ctx.emit("images", "Weibo JPEGs", "owed", note="no JPEGs here: set CMC_FAST_SHARED_DATA to a folder "
                 "holding weibo/")
        return
    workers = 0 if ctx.dry_run else _bench_module("bench_images").usable_cores()
    _time_images(ctx, f"pil DataLoader ({workers} workers)", _pil_loader_pass(paths, workers), len(paths))
    device = ctx.device.type
    _time_images(ctx, f"torchvision decode_jpeg(device='{device}')", _decode_pass(ctx, paths, "torchvision"),
                 len(paths))
    reason = dali_unusable_reason(ctx, paths[0])
    if reason:
        ctx.emit("images", "dali mixed (nvJPEG)", "owed", note=reason, driver=ctx.facts.get("driver"))
        return
    ctx.emit("images", "dali proof: one image through a mixed pipeline", "ok", driver=ctx.facts.get("driver"),
             dali=_version("nvidia.dali"))
    _time_images(ctx, "dali mixed (nvJPEG)", _decode_pass(ctx, paths, "dali"), len(paths))


def dali_unusable_reason(ctx: Ctx, path: str) -> str | None:
    """None once one image went through a DALI ``mixed`` pipeline on this GPU, else why DALI cannot be measured."""
    from cmc_fast.data_pipeline import images

    if ctx.device.type != "cuda":
        return "no CUDA device (dry run): DALI's mixed pipeline needs one"
    if not images.dali_available():
        return "DALI is not installed in this image (the optional second command stages it)"
    driver = ctx.facts.get("driver") or ""
    try:
        res = images.decode_uint8([path], (224, 224), backend="dali", device=ctx.device)
    except Exception as exc:  # noqa: BLE001 - reported: DALI is then not measured
        return f"one image through a mixed pipeline failed (driver {driver}; the CUDA 13 wheel needs >= 580): {exc}"
    if not bool(res.ok.all()) or res.fallback:
        return f"one image through a mixed pipeline was not decoded by DALI: {res.errors or res.fallback}"
    return None


def _decode_pass(ctx: Ctx, paths: list[str], backend: str) -> Callable[[], float]:
    from cmc_fast.data_pipeline.images import decode_uint8

    def one_pass() -> float:
        for i in range(0, len(paths), 64):
            res = decode_uint8(paths[i:i + 64], (224, 224), backend=backend, device=ctx.device)
            if res.backend != backend:
                raise RuntimeError(f"asked for {backend}, decoded by {res.backend}")
        _sync(ctx)
        return 0.0

    return one_pass


def _pil_loader_pass(paths: list[str], workers: int) -> Callable[[], float]:
    from torch.utils.data import DataLoader

    dataset = _bench_module("bench_images")._PilDataset(paths)
    loader = DataLoader(dataset, batch_size=64, num_workers=workers, persistent_workers=workers > 0)
    return lambda: float(sum(float(spent.sum()) for _, spent in loader))  # the workers' decode CPU seconds


def _time_images(ctx: Ctx, provider: str, one_pass: Callable[[], float], n: int) -> None:
    walls, cpu = [], []
    for _ in range(4 if not ctx.dry_run else 2):  # the first pass warms up (workers, pipelines, nvJPEG handles)
        c0, t0 = time.process_time(), time.perf_counter()
        spent = one_pass()
        walls.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0 + spent)
    wall, cpu_s = statistics.median(walls[1:]), statistics.median(cpu[1:])
    ctx.results.emit("images", provider, "ok", kind="bench", group="images: decode+resize Weibo JPEGs to 224x224, "
                     "batch 64", provider=provider, median_s=wall, mean_s=statistics.fmean(walls[1:]),
                     min_s=min(walls[1:]), rounds=len(walls) - 1, floor_s=None, measured_over_floor=None,
                     first_call_s=walls[0], images=n, images_per_s=round(n / wall, 1),
                     cpu_ms_per_image=round(1e3 * cpu_s / n, 3), cores_busy=round(cpu_s / wall, 2))


SECTIONS: list[tuple[str, Callable[[Ctx], None]]] = [
    ("env", section_env), ("bandwidth", section_bandwidth), ("correctness", section_correctness),
    ("timings", section_timings), ("compiled", section_compiled), ("train", section_train),
    ("images", section_images)]


# ================================================================================================== driver
def run_section(ctx: Ctx, name: str, fn: Callable[[Ctx], None]) -> None:
    """Start ``name`` only with at least START_FRACTION of its expected seconds left; stop it at CAP_FACTOR times
    them or at the budget's end. Always ends with the section's own line and a fresh summary. A SIGTERM is
    re-raised after both are written."""
    expected = EXPECTED_S[name][0] * (0.02 if ctx.dry_run else 1.0)
    left = ctx.left()
    if left < START_FRACTION * expected or left <= 0:
        ctx.results.emit(name, "section", "skipped", kind="section", seconds=0.0, expected_s=expected,
                         note=f"budget: {max(left, 0):.0f} s left, the section expects {expected:.0f} s")
        ctx.results.write_summary()
        return
    cap = max(0.05, min(left, CAP_FACTOR * expected if not ctx.dry_run else left))
    t0, status, note = time.monotonic(), "ok", ""
    signal.setitimer(signal.ITIMER_REAL, cap)
    try:
        fn(ctx)
    except Stop as stop:
        status = "stopped"
        note = f"{stop.reason} after {time.monotonic() - t0:.1f} s (cap {cap:.0f} s)"
        if isinstance(stop, Terminated):
            _close_section(ctx, name, status, t0, expected, note)
            raise
    except Exception as exc:  # noqa: BLE001 - one section failing must not cost the others
        status, note = "error", f"{type(exc).__name__}: {exc}"[:300]
        ctx.results.emit(name, "error", "error", error=note, traceback=traceback.format_exc()[-2000:])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    _close_section(ctx, name, status, t0, expected, note)


def _close_section(ctx: Ctx, name: str, status: str, t0: float, expected: float, note: str) -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
    ctx.results.emit(name, "section", status, kind="section", seconds=time.monotonic() - t0, expected_s=expected,
                     note=note)
    ctx.results.write_summary()


def _run_guarded(ctx: Ctx, name: str, fn: Callable[[Ctx], None]) -> None:
    """run_section, and an alarm that fired just as its section ended (after the section's own handling) costs
    nothing but a fresh summary."""
    try:
        run_section(ctx, name, fn)
    except OverTime:
        _final_summary(ctx.results)


def _final_summary(results: Results) -> None:
    with contextlib.suppress(Stop):  # a second SIGTERM while writing it: the file is replaced atomically
        results.write_summary()


def _setup_device(dry_run: bool):
    import torch

    if dry_run:
        return torch.device("cpu")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("TRITON_INTERPRET is set: these would be interpreter figures (bash scripts/gpu_check.sh "
                         "unsets it)")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or --dry-run here")
    return torch.device("cuda")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny shapes, references (the tests)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="results folder (default: $OUT)")
    parser.add_argument("--sections", default=",".join(n for n, _ in SECTIONS),
                        help="comma-separated subset, in the fixed order")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out: no folder given and $OUT is not set")
    if args.budget_s <= 0:
        parser.error(f"--budget-s: must be > 0, got {args.budget_s}")
    unknown = set(args.sections.split(",")) - {n for n, _ in SECTIONS}
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {[n for n, _ in SECTIONS]}")
    return args


def main(argv: list[str] | None = None) -> int:
    """0 when every section ran, 1 when a check failed or a section raised, 3 when a section was stopped or skipped
    for time, 143 after a SIGTERM (everything finished is written in every case)."""
    args = parse_args(argv)
    t0 = time.monotonic()
    device = _setup_device(args.dry_run)
    results = Results(Path(args.out), args.dry_run, t0)
    ctx = Ctx(results, args.dry_run, device, t0 + args.budget_s, {"budget_s": args.budget_s})
    wanted = set(args.sections.split(","))
    before = {s: signal.signal(s, h) for s, h in ((signal.SIGTERM, _on_sigterm), (signal.SIGALRM, _on_alarm))}
    try:
        for name, fn in SECTIONS:
            if name in wanted:
                _run_guarded(ctx, name, fn)
    except Terminated:
        _final_summary(results)
        return 143
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in before.items():
            signal.signal(s, h)
        results.close()
    lines = read_lines(results.path)
    print(results.summary_path.read_text()[-6000:], flush=True)  # the device tool returns the output's end
    if any(x["status"] in ("fail", "error") for x in lines):
        return 1
    return 3 if any(x["kind"] == "section" and x["status"] in ("stopped", "skipped") for x in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
