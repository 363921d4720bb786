"""The GPU check: one process on a CUDA machine (H100/H200), a thin driver over ``cmc_fast.benchmark`` (timing,
peak memory, the result writer). ``bash scripts/gpu_check.sh`` sets the environment and runs::

    python3 scripts/gpu_check.py [--dry-run] [--budget-s S] [--out DIR] [--sections env,correctness,...]

Sections in order (``SECTIONS``): ``env``; ``correctness``: pytest on the kernel tests (tests/test_nce_kernel.py,
tests/test_block_kernel.py) on this GPU, counted; ``timings``: the L2 gather probe, NCE (auto/gather/dense/eager)
and BLOCK (fused/auto/loop/bmm) at bench/'s shapes and names: wall median and IQR, kernel time apart from host
overhead, peak memory, floors; ``compiled``: torch.compile of the PyTorch references; ``train``: the trainer's own
stage-1 step via ``trainer.build_stage`` (eager fp32, AMP, AMP + compile); ``images``: the Weibo JPEGs
(CMC_FAST_SHARED_DATA or ../shared/data) through PIL, torchvision on the GPU, and DALI once proven. Each row's
``launched`` is what ran, asked of the plan modules (NCE form, slots and splits; BLOCK path).

The budget (``--budget-s``, default 420 s) is shared out by ``benchmark.run_sections``: a section starts with half
its expected seconds left and is stopped at 1.5 times them. Each row is written atomically as it is measured to
``DIR/gpu-results.{json,md}``; ``python scripts/gpu_results.py DIR/gpu-results.json`` merges them into
``bench/results/<device>.{json,md}``. ``--dry-run``: every section on the CPU with the same calls at tiny shapes
(Triton's interpreter, one kernel test per file, compile's ``eager`` backend); the test suite runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__" and "--dry-run" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported, as tests/conftest.py

import torch
import triton
import triton.language as tl

from cmc_fast import benchmark as hb

ROOT = Path(__file__).resolve().parent.parent
RESULTS_NAME = "gpu-results"
KERNEL_TESTS = ("tests/test_nce_kernel.py", "tests/test_block_kernel.py")
DRY_RUN_TESTS = {"tests/test_nce_kernel.py": "::test_partition[1-16-1-None]",  # one small test each, interpreted
                 "tests/test_block_kernel.py": "::test_kernel_forward_backward[1-1]"}


# ========================================================================================= the run
@dataclass
class Run:
    out: Path
    dry_run: bool
    device: torch.device
    deadline: float
    meta: dict = field(default_factory=dict)  # env, correctness, ...: written beside the rows
    rows: list[dict] = field(default_factory=list)
    sections: list[dict] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, section: str, group: str, provider: str, fields: dict) -> None:
        self.rows.append({"group": group, "provider": provider, "section": section, **fields})
        print(f"{section}: {group} | {provider}: median {fields.get('median_s', 0) * 1e3:.3f} ms "
              f"{fields.get('launched') or ''}", flush=True)
        self.save()

    def save(self) -> None:
        hb.write_results(self.rows, self.out, device=self.meta.get("env", {}).get("device", "?"), merge=False,
                         name=RESULTS_NAME, dry_run=self.dry_run, sections=self.sections, **self.meta)


# =========================================================================================== env
def section_env(run: Run) -> None:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=10) if shutil.which("nvidia-smi") else None
    info = {"device": run.meta["env"]["device"], "python": platform.python_version(),
            **{m: _version(m) for m in ("triton", "torchvision", "nvidia-dali-cuda130")}, "torch": torch.__version__,
            "cuda_runtime": torch.version.cuda, "cpu_cores": len(os.sched_getaffinity(0)),
            "driver": smi.stdout.strip() if smi and smi.returncode == 0 else None}
    if run.device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(sms=props.multi_processor_count, memory_bytes=props.total_memory,
                    capability=f"{props.major}.{props.minor}")
    run.meta["env"] = info


def _version(distribution: str) -> str | None:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(distribution)
    return None


# =================================================================================== correctness
TEST_LINE = re.compile(r"^(?:\S*/)?(test_\w+\.py)::(\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
OUTCOME = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped",
           "XFAIL": "skipped"}


def count_test_line(result: dict, line: str) -> None:
    """One line of ``pytest -v`` into ``result[module]``'s counts (tests, passed, failed, errors, skipped) and the
    failing tests' names; any other line is left alone."""
    found = TEST_LINE.match(line)
    if not found:
        return
    module, name, outcome = found.group(1), found.group(2), OUTCOME[found.group(3)]
    counts = result.setdefault(module, {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0,
                                        "failing": []})
    counts["tests"] += 1
    counts[outcome] += 1
    if outcome in ("failed", "errors"):
        counts["failing"].append(name)


def section_correctness(run: Run) -> None:
    """The kernel tests themselves, run by pytest on this device, counted line by line as they finish: a stop at
    the section's cap keeps the counts so far (``exit_code`` stays None)."""
    targets = [f + (DRY_RUN_TESTS[f] if run.dry_run else "") for f in KERNEL_TESTS]
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *targets]
    result = run.meta["correctness"] = {"command": " ".join(cmd[1:]), "exit_code": None}
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            for line in proc.stdout:
                count_test_line(result, line)
        finally:
            if proc.poll() is None:
                proc.kill()
        result["exit_code"] = proc.wait()


def correctness_failed(meta: dict) -> bool:
    result = meta.get("correctness", {})
    modules = [v for v in result.values() if isinstance(v, dict)]
    return result.get("exit_code") not in (0, None) or any(m["failed"] or m["errors"] for m in modules)


# ======================================================================================= timings
NCE_CASES = [(64, 128, 16384, 9528), (64, 128, 1500, 9528), (256, 128, 16384, 9528)]  # bench/bench_nce.py's
BLOCK_CASES = [((1600, 20, 15), 64, "float32"), ((1600, 20, 15), 64, "bfloat16"), ((1600, 20, 15), 64,
               "float32-tf32"), ((256, 18, 15), 64, "float32"), ((1600, 20, 15), 256, "float32")]
BLOCK_DTYPES = {"float32": (torch.float32, "highest"), "float32-tf32": (torch.float32, "high"),
                "bfloat16": (torch.bfloat16, "highest")}  # bench/bench_block.py's dtype ids


def nce_cases(run: Run) -> list[tuple]:
    if run.dry_run:
        return [(4, 16, 32, 128, torch.float32)]
    return [(*c, t) for c in NCE_CASES for t in (torch.float32, torch.bfloat16)]


def block_cases(run: Run) -> list[tuple]:
    return [((64, 4, 3), 4, "float32")] if run.dry_run else BLOCK_CASES


def nce_launched(taken: list[str], bank, b, d, k1, n) -> str:
    """The NCE form ``nce_loss`` took (``nce_plan.nce_paths_taken``) and, for a Triton launch, its grid as the plan
    module sizes it: the tile, the resident programs (slots) the launcher measured and the splits chosen for them."""
    from cmc_fast.kernels import nce_plan
    from cmc_fast.kernels.dispatch import triton_interpreted, use_triton

    form = "gather" if any(t.startswith("gather") for t in taken) else "dense" if taken else "reference"
    if form == "reference" or not use_triton(bank):  # the op's own dispatch rule
        return f"{form} (PyTorch)"
    elem, interpreted = bank.element_size(), bank.device.type != "cuda" or triton_interpreted()
    if form == "gather":
        launch, kernel = nce_plan._fwd_launch(d, elem, interpreted, None, k1), "_nce_fwd_kernel"
        tiles, width, block = b, k1, launch.block_k
    else:
        launch, kernel = nce_plan._dense_launch(b, d, n, interpreted, elem), "_nce_dense_kernel"
        tiles, width, block = -(-b // launch.block_b), max(n, 1), launch.block_n
    slots = 1 if interpreted else next((v for key, v in reversed(nce_plan._SLOTS.items()) if key[0] == kernel), None)
    if slots is None:
        return f"{form} (Triton; slots not recorded)"
    splits, chunk = nce_plan._choose_splits(tiles, width, block, slots, 1 if interpreted else None)
    return f"{form} (Triton) tiles={tiles} slots={slots} splits={splits} chunk={chunk}"


@triton.jit
def _gather_sum_kernel(bank_ptr, idx_ptr, out_ptr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Each program sums the ROWS bank rows its indices name (the sum keeps every load live)."""
    pid = tl.program_id(0)
    offs_r, offs_d = tl.arange(0, BLOCK_R), tl.arange(0, D)
    acc = tl.zeros([BLOCK_R, D], dtype=tl.float32)
    for start in range(0, ROWS, BLOCK_R):
        rows = tl.load(idx_ptr + pid * ROWS + start + offs_r).to(tl.int64)
        acc += tl.load(bank_ptr + rows[:, None] * D + offs_d[None, :]).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


def l2_gather_probe(run: Run, dtype) -> None:
    """The L2 gather rate ``kernels/gpus.GPUS`` owes (NVIDIA publishes none), which the NCE gather's floor divides
    by: random rows of the NCE benchmark's 9528 x 128 bank (L2-resident), 256 consecutive indices a program, checked
    against torch's gather. A lower bound of what L2 serves (a simple probe, 4 warps, 32 rows a step)."""
    (n, d), rows = ((9528, 128), 1 << 20) if not run.dry_run else ((64, 16), 1024)
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(n, d, generator=g).to(run.device, dtype)
    idx = torch.randint(0, n, (rows,), generator=g, dtype=torch.int32).to(run.device)
    out = torch.empty(rows // 256, device=run.device, dtype=torch.float32)
    launch = lambda: _gather_sum_kernel[(rows // 256,)](bank, idx, out, ROWS=256, D=d, BLOCK_R=32)  # noqa: E731
    launch()
    want = bank[idx.long()].double().view(-1, 256, d).sum((1, 2))
    if not torch.allclose(out.double(), want, rtol=1e-4, atol=1e-3):
        raise AssertionError("the L2 gather probe's sums differ from torch's gather")
    fields = hb.measure(launch, run.device)
    nbytes = rows * d * bank.element_size()
    fields.update(bytes=nbytes, bytes_per_s=nbytes / (fields["kernel_s"] or fields["median_s"]), launched="probe")
    if run.device.type == "cuda":  # the NCE floors divide by it
        run.meta.setdefault("l2_gather_bytes_per_s", {})[bank.element_size()] = fields["bytes_per_s"]
    run.add("timings", f"L2 gather: {rows} random rows of a {n}x{d} bank", str(dtype)[6:], fields)


def time_nce(run: Run, section: str, provider: str, b, d, k, n, dtype, loss_fn: Callable) -> None:
    """One NCE forward + backward of ``loss_fn``; the floor: the L2-gathered bytes (``nce_plan.floor_bytes``) over
    this run's L2 gather rate, else ``kernels/gpus.GPUS``'s figure."""
    from cmc_fast.kernels.gpus import GPUS
    from cmc_fast.kernels.nce_plan import floor_bytes, nce_paths_taken

    anchor, bank, idx, z = hb.nce_case(b, d, k, n, dtype, run.device)
    nce_paths_taken(reset=True)
    fields = hb.measure(lambda: torch.autograd.grad(loss_fn(anchor, bank, idx, tau=hb.NCE_TAU, z=z, n_data=n),
                                                    anchor), run.device)
    fields["launched"] = nce_launched(nce_paths_taken(reset=True), bank, b, d, k + 1, n)
    elem, name = bank.element_size(), run.meta["env"]["device"]
    rate = run.meta.get("l2_gather_bytes_per_s", {}).get(elem)
    rate = rate or GPUS.get("H200" if "H200" in name else "H100 SXM", {}).get("l2_measured")
    floor = floor_bytes(b, d, k, n, elem, 4)["l2_gather"] / rate if rate else None
    fields.update(floor_s=floor if run.device.type == "cuda" else None, gpu_floor_s=floor)
    fields["measured_over_floor"] = fields["median_s"] / fields["floor_s"] if fields["floor_s"] else None
    run.add(section, f"nce fwd+bwd B={b} d={d} K={k} N={n} bank={str(dtype)[6:]}", provider, fields)


def time_block(run: Run, section: str, provider: str, config, batch, dtype_id, wrap=None) -> None:
    from cmc_fast.kernels.block_plan import block_merge_floor, choose_block_path
    from cmc_fast.kernels.gpus import gpu_name
    from cmc_fast.kernels.reference import block_chunk_sizes

    dtype, precision = BLOCK_DTYPES[dtype_id]
    sizes, rank = block_chunk_sizes(config[0], config[1]), config[2]
    base = {"compile": "loop", "bmm-compile": "bmm"}.get(provider, provider)
    fn, leaves, grad = hb.block_case(base, batch, sizes, rank, dtype, run.device, wrap or (lambda name, f: f))
    gpu = gpu_name(run.device)
    floor = block_merge_floor(batch, sizes, rank, dtype=dtype, precision=precision, gpu=gpu, backward=True)
    with hb.env_var("CMC_FAST_KERNELS", "triton" if provider == "fused" else "auto"), \
            hb.matmul_precision(precision):
        fields = hb.measure(lambda: torch.autograd.grad(fn(), leaves, grad), run.device)
        path = choose_block_path(sizes, rank, batch, dtype, run.device) if base not in ("loop", "bmm") else base
    fields.update(floor_s=floor if run.device.type == "cuda" else None, gpu_floor_s=floor, floor_gpu=gpu,
                  precision=precision, launched=path + (" (compiled)" if wrap else ""))
    fields["measured_over_floor"] = fields["median_s"] / fields["floor_s"] if fields["floor_s"] else None
    mm, chunks, rank = config
    run.add(section, f"block_merge fwd+bwd mm={mm} chunks={chunks} rank={rank} B={batch} {dtype_id}", provider, fields)


def section_timings(run: Run) -> None:
    """The L2 gather probe (the NCE floor's rate), then NCE and BLOCK cases in turn, the most decisive first, so a
    stop at the cap leaves both ops measured."""
    from cmc_fast.kernels.reference import nce_loss_reference

    from cmc_fast import ops

    for dtype in (torch.float32, torch.bfloat16):
        l2_gather_probe(run, dtype)
    nce, block = nce_cases(run), block_cases(run)
    for i in range(max(len(nce), len(block))):
        for case in nce[i:i + 1]:
            for provider in ("auto", "gather", "dense", "eager"):  # auto: as the trainer calls it
                forced = provider in ("gather", "dense")
                with hb.env_var("CMC_FAST_KERNELS", "triton" if forced else "auto"), \
                        hb.env_var("CMC_FAST_NCE", provider if forced else "auto"):
                    loss_fn = nce_loss_reference if provider == "eager" else ops.nce_loss
                    time_nce(run, "timings", provider, *case, loss_fn)
        for case in block[i:i + 1]:
            for provider in ("fused", "auto", "loop", "bmm"):
                time_block(run, "timings", provider, *case)


def section_compiled(run: Run) -> None:
    """torch.compile (static shapes) of the PyTorch references; ``first_call_s`` holds the compile."""
    from cmc_fast.kernels.reference import nce_loss_reference

    backend = "eager" if run.dry_run else "inductor"
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)

    def wrap(name, fn):
        return torch.compile(fn, dynamic=False, backend=backend)

    compiled_ref = torch.compile(nce_loss_reference, fullgraph=True, dynamic=False, backend=backend)
    for case in nce_cases(run)[::2][:2]:  # two shapes, float32
        time_nce(run, "compiled", "compile", *case, compiled_ref)
    for case in block_cases(run)[:1] + block_cases(run)[3:4]:
        for provider in ("compile", "bmm-compile"):
            time_block(run, "compiled", provider, *case, wrap=wrap)


# ========================================================================================== train
TRAIN_VARIANTS = [("eager fp32, kernels=reference", False, False, "reference"),
                  ("amp bf16, kernels=auto", True, False, "auto"),
                  ("amp bf16 + compile, kernels=auto", True, True, "auto")]


def train_config(run: Run, amp: bool, compiled: bool):
    """The synthetic preset at the paper's K = 16384 over a ~9.5k-post bank, batch 64 (tiny in the dry run)."""
    from cmc_fast.config import preset

    cfg = preset("synthetic")
    size = (dict(nce_k=16384, batch_size=64, synthetic_train=10600) if not run.dry_run else
            dict(nce_k=16, batch_size=8, synthetic_train=64, synthetic_test=8, image_size=(32, 32)))
    return dataclasses.replace(cfg, amp=amp, compile=compiled, data_root=str(run.out / "synthetic-data"), **size)


def section_train(run: Run) -> None:
    """The trainer's own stage-1 step: ``build_stage`` builds the stage the trainer runs (model, optimisers, learning
    rates, AMP and compile as configured); ``stage.step`` on random training rows is timed."""
    for label, amp, compiled, mode in TRAIN_VARIANTS[:1] if run.dry_run else TRAIN_VARIANTS:
        torch._dynamo.reset()
        with hb.env_var("CMC_FAST_KERNELS", mode):
            train_variant(run, label, train_config(run, amp, compiled))
        if run.device.type == "cuda":
            torch.cuda.empty_cache()


def train_variant(run: Run, label: str, cfg) -> None:
    from cmc_fast.kernels.nce_plan import nce_paths_taken

    from cmc_fast.trainer import build_stage

    _, stage = build_stage(cfg, "stage1", tempfile.mkdtemp(prefix="gpu-check-", dir=run.out))
    stage.train()
    gen, n = torch.Generator().manual_seed(0), len(stage.train_split)

    def step():
        return float(stage.step(torch.randperm(n, generator=gen)[:cfg.batch_size])[0])  # float() synchronises

    nce_paths_taken(reset=True)
    fields = hb.measure(step, run.device, rounds=2 if run.dry_run else 10,
                        kernel_timer=lambda fn: (hb.profiler_kernel_seconds(fn, 3), "profiler"))
    fields["launched"] = "; ".join(nce_paths_taken(reset=True)) or "no NCE call"
    run.add("train", f"train step stage1 K={cfg.nce_k} N={n} batch {cfg.batch_size} (synthetic preset)", label,
            fields)


# ========================================================================================= images
def weibo_jpegs(run: Run) -> list[str]:
    """The Weibo JPEGs (CMC_FAST_SHARED_DATA or ../shared/data); in the dry run 8 generated ones when none is there."""
    for root in filter(None, (os.environ.get("CMC_FAST_SHARED_DATA"), str(ROOT.parent / "shared" / "data"))):
        folders = [Path(root, "weibo", d) for d in ("rumor_images", "nonrumor_images")]
        paths = sorted(str(p) for f in folders if f.is_dir() for p in f.iterdir() if p.is_file())
        if paths:
            return paths[:16] if run.dry_run else paths
    if not run.dry_run:
        return []
    from PIL import Image

    folder = run.out / "dry-run-jpegs"
    folder.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(2)
    for i in range(8):
        pixels = torch.randint(0, 256, (48 + 8 * i, 64, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return sorted(str(p) for p in folder.iterdir())


def dali_unusable_reason(run: Run, path: str) -> str | None:
    """None once one image went through a DALI ``mixed`` pipeline on this GPU, else why DALI is not measured."""
    from cmc_fast.data_pipeline import image_backend, images

    if run.device.type != "cuda" or not image_backend.dali_available():
        return "no CUDA device" if run.device.type != "cuda" else "DALI is not installed"
    try:
        res = images.decode_uint8([path], (224, 224), backend="dali", device=run.device)
    except Exception as exc:  # noqa: BLE001 - reported: DALI is then not measured
        return f"one image through a mixed pipeline failed (driver {run.meta['env'].get('driver')}): {exc}"
    ok = bool(res.ok.all()) and not res.fallback
    return None if ok else f"one image through a mixed pipeline was not decoded by DALI: {res.errors or res.fallback}"


def section_images(run: Run) -> None:
    from cmc_fast.data_pipeline.decoders import usable_cores
    from cmc_fast.data_pipeline.image_backend import available_backends
    from cmc_fast.data_pipeline.images import decode_uint8

    paths = weibo_jpegs(run)
    group = f"images: decode+resize {len(paths)} Weibo JPEGs to 224x224, batch 64"
    if not paths:
        run.meta["images"] = "owed: no JPEGs here (set CMC_FAST_SHARED_DATA to a folder holding weibo/)"
        return
    reason = dali_unusable_reason(run, paths[0])
    run.meta["dali"] = reason or "proven: one image went through a mixed pipeline"
    backends = [("pil", None), ("torchvision", run.device)] + ([("dali", run.device)] if reason is None else [])
    for backend, device in [(b, dev) for b, dev in backends if b in available_backends()]:
        def one_pass(backend=backend, device=device):
            for i in range(0, len(paths), 64):
                res = decode_uint8(paths[i:i + 64], (224, 224), backend=backend, device=device)
                if res.backend != backend:
                    raise RuntimeError(f"asked for {backend}, decoded by {res.backend}")
            hb.synchronizer(run.device)()

        fields = hb.measure(one_pass, run.device, rounds=2 if run.dry_run else 3, kernel_time=False)
        cpu = hb.summarize(hb.wall_samples(one_pass, rounds=2, warmup=0, clock=time.process_time))["median_s"]
        fields.update(images_per_s=round(len(paths) / fields["median_s"], 1), launched=backend,
                      cpu_ms_per_image=round(1e3 * cpu / len(paths), 3), workers=usable_cores())
        run.add("images", group, f"{backend} ({(device or torch.device('cpu')).type})", fields)


SECTIONS: list[tuple[str, Callable[[Run], None], float]] = [
    ("env", section_env, 5), ("correctness", section_correctness, 90), ("timings", section_timings, 70),
    ("compiled", section_compiled, 120), ("train", section_train, 100), ("images", section_images, 30)]


# ========================================================================================= driver
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [n for n, _, _ in SECTIONS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny shapes, the interpreter (tests)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for the whole run")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="results folder (default: $OUT)")
    parser.add_argument("--sections", default=",".join(names), help="comma-separated subset, run in the fixed order")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sections.split(",")) - set(names))
    for bad, why in ((not args.out, "--out: no folder given and $OUT is not set"),
                     (args.budget_s <= 0, f"--budget-s: must be > 0, got {args.budget_s}"),
                     (unknown, f"--sections: unknown {unknown}; choose from {names}")):
        if bad:
            parser.error(why)
    return args


def main(argv: list[str] | None = None) -> int:
    """0 when every section ran and every kernel test passed, 1 when a test failed or a section raised, 3 when a
    section was stopped or skipped for time, 143 after a SIGTERM (everything finished is written in every case)."""
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or --dry-run here")
    if not args.dry_run and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("TRITON_INTERPRET is set: these would be interpreter figures (gpu_check.sh unsets it)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.dry_run else "cuda")
    name = "cpu (dry run)" if args.dry_run else hb.device_name(device)
    run = Run(out, args.dry_run, device, time.monotonic() + args.budget_s,
              {"budget_s": args.budget_s, "env": {"device": name}})
    wanted = set(args.sections.split(","))

    def record(entry: dict) -> None:
        run.sections.append(entry)
        run.save()

    try:  # the dry run's sections start on a fiftieth of their GPU seconds and may take the whole budget
        hb.run_sections([(n, functools.partial(fn, run), s) for n, fn, s in SECTIONS if n in wanted], record,
                        deadline=run.deadline, scale=0.02 if args.dry_run else 1.0, capped=not args.dry_run)
    except hb.Terminated:
        return 143
    print((out / f"{RESULTS_NAME}.md").read_text()[-6000:], flush=True)  # a device tool returns the output's end
    if correctness_failed(run.meta) or any(s["status"] == "error" for s in run.sections):
        return 1
    return 3 if any(s["status"] in ("stopped", "skipped") for s in run.sections) else 0


if __name__ == "__main__":
    sys.exit(main())
