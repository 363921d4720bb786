"""scripts/gpu_check.py's dry run on the CPU: the JSONL schema, the summary, stops in the middle of a section (SIGTERM
and an exhausted budget) that keep every finished line, the autotune adapter, and scripts/gpu_results.py."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gc = _load("gpu_check")
gr = _load("gpu_results")
COMMON = {"schema": int, "section": str, "name": str, "status": str, "kind": str, "elapsed_s": float, "dry_run": bool}


def strict_lines(path: Path) -> list[dict]:
    """Every line must parse (no tolerance here: a stop must never leave a cut line)."""
    return [json.loads(raw) for raw in path.read_text().splitlines()]


def check_schema(lines: list[dict]) -> None:
    for line in lines:
        for key, kind in COMMON.items():
            assert isinstance(line[key], kind) or (kind is float and isinstance(line[key], int)), (key, line)
        assert line["schema"] == gc.SCHEMA and line["status"] in gc.STATUSES and line["dry_run"] is True
        if line["kind"] == "bench" and line["status"] == "ok":
            assert all(k in line for k in gr._ROW_KEYS), line
            assert line["median_s"] > 0 and line["rounds"] >= 1
        if line["kind"] == "section":
            assert line["section"] in gc.EXPECTED_S and line["seconds"] >= 0
    elapsed = [x["elapsed_s"] for x in lines]
    assert elapsed == sorted(elapsed)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-check")
    assert gc.main(["--dry-run", "--out", str(out)]) == 0
    return out


def test_dry_run_schema_and_summary(dry_run):
    lines = strict_lines(dry_run / gc.JSONL)
    check_schema(lines)
    assert lines[0]["kind"] == "env" and lines[0]["device"] == "cpu (dry run)"
    sections = [x for x in lines if x["kind"] == "section"]
    assert [x["section"] for x in sections] == [name for name, _ in gc.SECTIONS]
    assert all(x["status"] == "ok" for x in sections), sections
    assert not [x for x in lines if x["status"] in ("fail", "error")]
    checks = [x for x in lines if x["section"] == "correctness" and x["kind"] == "result" and x["status"] != "info"]
    assert len(checks) >= 10 and all(x["worst_rel_err"] <= x["allowed"] for x in checks)
    ops = {x["name"].split()[0] for x in checks}
    assert ops == {"nce_loss", "nce_partition", "bank_update_", "block_merge"}
    timed = {x["section"] for x in lines if x["kind"] == "bench"}
    assert timed == {"timings", "compiled", "train", "images"}
    summary = (dry_run / gc.SUMMARY).read_text()
    assert summary.startswith("# GPU check: cpu (dry run) (DRY RUN")
    for name, _ in gc.SECTIONS[1:]:
        assert f"## {name}" in summary
    assert "| dali mixed (nvJPEG) | owed |" in summary  # never a DALI row without DALI proven on a GPU
    assert summary == gc.summary_markdown(gc.read_lines(dry_run / gc.JSONL))


def test_dry_run_makes_the_gpu_runs_calls(dry_run):
    """The dry run goes through the calls the GPU run makes (a changed API fails here, on a CPU): the kernels through
    Triton's interpreter where it runs (the test suite sets TRITON_INTERPRET), BLOCK fused and bmm at each float32
    matmul precision, choose_block_path at every benchmark shape, bench/'s BLOCK providers and group names, and the
    floors of kernels/block.py and kernels/nce.py."""
    lines = strict_lines(dry_run / gc.JSONL)
    interpreted = gc.interpreter_usable()
    block = [x for x in lines if x["section"] == "correctness" and x["name"].startswith("block_merge ")]
    assert {(x["name"].split()[1], x["name"].split()[-2]) for x in block} == {
        (path, precision) for path in ("fused", "bmm") for precision in ("highest", "high", "medium")}
    assert {x["kernels"] for x in block} == {"bmm", "triton" if interpreted else "reference"}
    picks = [x for x in lines if x["name"].startswith("choose_block_path")]
    bench = gc._bench_module("bench_block")
    assert len(picks) == len(bench.CONFIGS) * 2 * len(bench.DTYPES)
    assert all(x["path"] in ("fused", "bmm") and x["path_compiled"] in ("fused", "bmm") for x in picks)
    assert all(x["est_fused_s"] > 0 and x["est_bmm_s"] > 0 for x in picks)

    rows = [x for x in lines if x["kind"] == "bench" and x["group"].startswith("block_merge")]
    by_section = {s: {x["provider"] for x in rows if x["section"] == s} for s in ("timings", "compiled")}
    fused = "fused" if interpreted else "fused (dry run: reference, no interpreter)"
    assert by_section == {"timings": {fused, "auto", "loop", "bmm"}, "compiled": {"compile", "bmm-compile"}}
    assert {x["group"].split()[-1] for x in rows} == {"float32", "float32-tf32"}  # bench/bench_block's dtype ids
    assert all(x["floor_s"] is None and x["gpu_floor_s"] > 0 and x["floor_gpu"] == "H100 SXM" for x in rows)
    assert all(x["path"] == "reference" for x in rows if x["provider"] == "auto")  # on a CPU the dispatch says so
    nce = [x for x in lines if x["kind"] == "bench" and x["group"].startswith("nce")]
    assert {x["provider"] for x in nce} >= {"triton" if interpreted else "triton (dry run: reference, no "
                                            "interpreter)", "eager", "compile"}
    assert all(x["l2_gather_bytes"] > 0 and x["hbm_bytes"] > 0 and "hbm_us_spec" in x["spec_floors_us"] for x in nce)


def _slow_section(stop: str):
    """A section that writes one result, then (for ``sigterm``) has a SIGTERM sent to this process, and waits."""
    def section(ctx):
        ctx.emit("timings", "first result", "ok", value=1.5)
        if stop == "sigterm":
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        time.sleep(30)
        ctx.emit("timings", "never reached", "ok")

    return section


@pytest.mark.parametrize("stop", ["sigterm", "budget"])
def test_stop_mid_section_keeps_every_finished_line(tmp_path, monkeypatch, stop):
    sections = dict(gc.SECTIONS)
    sections["timings"] = _slow_section(stop)
    monkeypatch.setattr(gc, "SECTIONS", list(sections.items()))
    # budget: 1.5 s from the start, so the slow section (first after the clock starts) is cut by the budget's end
    budget, sections = ("60", "env,timings,compiled") if stop == "sigterm" else ("1.5", "timings,compiled")
    before = signal.getsignal(signal.SIGTERM)
    rc = gc.main(["--dry-run", "--out", str(tmp_path), "--budget-s", budget, "--sections", sections])
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored

    lines = strict_lines(tmp_path / gc.JSONL)
    check_schema(lines)
    names = [(x["section"], x["name"], x["status"]) for x in lines]
    assert ("timings", "first result", "ok") in names and ("timings", "never reached", "ok") not in names
    stopped = next(x for x in lines if x["section"] == "timings" and x["kind"] == "section")
    assert stopped["status"] == "stopped"
    summary = (tmp_path / gc.SUMMARY).read_text()
    assert "| timings | stopped |" in summary and "| first result | ok |" in summary
    if stop == "sigterm":
        assert rc == 143 and "SIGTERM" in stopped["note"]
        assert not [x for x in lines if x["section"] == "compiled"]  # nothing runs after a SIGTERM
    else:
        assert rc == 3 and "over time" in stopped["note"]
        skipped = next(x for x in lines if x["section"] == "compiled")
        assert skipped["status"] == "skipped" and "budget" in skipped["note"]
        assert "| compiled | skipped |" in summary


def test_cut_last_line_is_left_out(tmp_path):
    path = tmp_path / gc.JSONL
    good = {"schema": 1, "section": "env", "name": "environment", "status": "info", "kind": "env",
            "elapsed_s": 0.1, "dry_run": False, "device": "NVIDIA H200"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(good)[:25])
    assert gc.read_lines(path) == [good]
    assert gc.summary_markdown(gc.read_lines(path)).startswith("# GPU check: NVIDIA H200\n")


def test_bad_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    for argv, says in ((["--dry-run"], "--out"), (["--out", "x", "--budget-s", "0"], "--budget-s"),
                       (["--out", "x", "--sections", "env,nonsense"], "nonsense")):
        with pytest.raises(SystemExit):
            gc.parse_args(argv)
        assert says in capsys.readouterr().err
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gc.parse_args([]).out == str(tmp_path)  # $OUT by default
    results = gc.Results(tmp_path, True, time.monotonic())
    with pytest.raises(ValueError, match="status 'great'"):
        results.emit("env", "x", "great")
    results.close()


# ------------------------------------------------------------------------------------- the autotune adapter
try:
    import triton
    import triton.language as tl
    from triton.runtime.autotuner import Autotuner  # noqa: F401
except ImportError:  # pragma: no cover - Triton ships for Linux only
    triton = None

if triton is not None:
    def _small_tiles(configs, named_args, **kwargs):
        """Keeps the configs whose BLOCK is at most the row length, as a register prune would."""
        return [c for c in configs if c.kwargs["BLOCK"] <= named_args["n"]]

    def _tuned(kernel):
        configs = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in [(16, 1), (32, 2), (64, 4)]]
        return triton.autotune(configs=configs, key=["n"], prune_configs_by={"early_config_prune": _small_tiles})(
            triton.jit(kernel))

    def _scale(x_ptr, out_ptr, used_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        for start in range(0, n, BLOCK):
            mask = start + offs < n
            tl.store(out_ptr + start + offs, 2.0 * tl.load(x_ptr + start + offs, mask=mask), mask=mask)
        tl.store(used_ptr, BLOCK)

    def _shift(x_ptr, out_ptr, used_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        for start in range(0, n, BLOCK):
            mask = start + offs < n
            tl.store(out_ptr + start + offs, tl.load(x_ptr + start + offs, mask=mask) + 1.0, mask=mask)
        tl.store(used_ptr, BLOCK)

    _scale_kernel, _shift_kernel = _tuned(_scale), _tuned(_shift)

    def _op(x):
        """Two autotuned launches in one op, as BLOCK's forward and backward: (2x + 1, BLOCKs used)."""
        mid, out, used = torch.empty_like(x), torch.empty_like(x), torch.zeros(2, dtype=torch.int32)
        _scale_kernel[(1,)](x, mid, used, x.numel())
        _shift_kernel[(1,)](mid, out, used[1:], x.numel())
        return out, used.tolist()


@pytest.mark.skipif(triton is None, reason="needs Triton")
def test_adapter_finds_prunes_and_restricts_autotuners():
    module = types.ModuleType("fake_ops")
    module.scale, module.shift, module.not_a_kernel = _scale_kernel, _shift_kernel, 3
    tuners = gc.autotuned_kernels([module])
    assert tuners == [("fake_ops.scale", _scale_kernel), ("fake_ops.shift", _shift_kernel)]
    x = torch.randn(40)
    configs = {label: tuner.configs for label, tuner in tuners}

    probe = []
    kept = gc.kept_configs(tuners, lambda: probe.append(_op(x)))
    assert {k: [c.kwargs["BLOCK"] for c in v] for k, v in kept.items()} == {"fake_ops.scale": [16, 32],
                                                                           "fake_ops.shift": [16, 32]}
    assert torch.equal(probe[0][0], 2 * x + 1) and probe[0][1] == [16, 16]  # ran, each with its first kept config
    assert all("run" not in vars(t) and t.configs is configs[label] for label, t in tuners)
    for config in kept["fake_ops.shift"]:  # (the other autotuner pinned too: autotuning times on a GPU only)
        with gc.only_config(_shift_kernel, config), gc.only_config(_scale_kernel, kept["fake_ops.scale"][1]):
            out, used = _op(x)
        assert used[1] == config.kwargs["BLOCK"] and torch.equal(out, 2 * x + 1)  # that config ran, and ran right
    assert _shift_kernel.configs is configs["fake_ops.shift"]
    assert gc.kept_configs(tuners, lambda: torch.ones(1)) == {}  # a call that launches no autotuner
    assert gc.describe_config(kept["fake_ops.scale"][0]) == "BLOCK=16, num_warps=1, num_stages=3"


@pytest.mark.skipif(triton is None, reason="needs Triton")
def test_adapter_scans_the_real_op_modules():
    from cmc_fast.kernels import block, nce

    for label, tuner in gc.autotuned_kernels([nce, block]):
        assert label.split(".")[0] in ("nce", "block") and hasattr(tuner, "configs") and tuner.configs


# ---------------------------------------------------------------------------------------------- the reader
def test_reader_writes_bench_tables(dry_run, tmp_path):
    jsonl = dry_run / gc.JSONL
    with pytest.raises(SystemExit, match="dry-run"):
        gr.convert(jsonl, tmp_path)
    slug = gr.slug("cpu (dry run)")
    old = {"group": "kept group", "provider": "x", "mean_s": 1.0, "median_s": 1.0, "min_s": 1.0, "rounds": 1,
           "floor_s": None, "measured_over_floor": None, "date": "2026-11-01"}
    lines = gc.read_lines(jsonl)
    bench = [x for x in lines if x["kind"] == "bench" and x["status"] == "ok"]
    stale = dict(old, group=bench[0]["group"], provider=bench[0]["provider"], median_s=99.0)
    (tmp_path / f"{slug}.json").write_text(json.dumps({"device": "cpu (dry run)", "rows": [old, stale]}))

    paths = gr.convert(jsonl, tmp_path, allow_dry_run=True)

    assert [p.name for p in paths] == [f"{slug}.json", f"{slug}.md", f"{slug}-gpu-check.md"]
    payload = json.loads(paths[0].read_text())
    assert payload["device"] == "cpu (dry run)" and payload["torch"] == torch.__version__
    rows = payload["rows"]
    assert rows[0] == old and len(rows) == 1 + len(bench)  # the stale row of the same group/provider is replaced
    assert {r["median_s"] for r in rows[1:]} == {x["median_s"] for x in bench}
    assert all(r["date"] == lines[0]["date"] for r in rows[1:])
    table = paths[1].read_text()
    assert table.startswith("# Benchmarks on cpu (dry run)") and "| provider | median ms |" in table
    assert f"## {bench[0]['group']}" in table and "## kept group" in table
    for provider in ("fused", "auto -> reference", "loop", "bmm", "compile", "bmm-compile"):  # BLOCK's new rows
        assert f"| {provider} |" in table or f"| {provider} (dry run" in table, provider
    assert {r["provider"] for r in rows if r.get("path")} == {"auto"}  # the JSON keeps provider and path apart
    assert paths[2].read_text() == gc.summary_markdown(lines)


def test_lines_are_plain_json(tmp_path):
    """numpy/torch scalars, NaN/inf and unknown objects never break a line (json.dumps with allow_nan=False)."""
    import numpy as np

    results = gc.Results(tmp_path, True, time.monotonic())
    results.emit("env", "x", "info", a=np.float64(1.25), b=torch.tensor(3), c=float("nan"), d=(1, float("inf")),
                 e=torch.device("cpu"), f={"g": np.int64(2)})
    results.close()
    (line,) = strict_lines(tmp_path / gc.JSONL)
    assert (line["a"], line["b"], line["c"], line["d"], line["e"], line["f"]) == (1.25, 3, "nan", [1, "inf"], "cpu",
                                                                                {"g": 2})


def test_dali_is_proven_before_it_is_measured(tmp_path, monkeypatch):
    """No DALI row unless one image went through a DALI pipeline on the GPU and came back decoded by DALI."""
    from cmc_fast.data_pipeline import decoders, image_backend, images

    results = gc.Results(tmp_path, False, time.monotonic())
    ctx = gc.Ctx(results, False, torch.device("cuda"), time.monotonic() + 60, {"driver": "575.51"})
    batch = lambda ok, fallback: images.ImageBatch(torch.zeros(1, 3, 2, 2, dtype=torch.uint8),  # noqa: E731
                                                   torch.tensor([ok]), {}, fallback, "dali")
    monkeypatch.setattr(image_backend, "dali_available", lambda: False)
    assert "not installed" in gc.dali_unusable_reason(ctx, "x.jpg")
    monkeypatch.setattr(image_backend, "dali_available", lambda: True)

    def unbuildable(*args, **kwargs):
        raise decoders.DaliUnusableError("a DALI GPU pipeline could not be built: driver too old")

    monkeypatch.setattr(images, "decode_uint8", unbuildable)
    reason = gc.dali_unusable_reason(ctx, "x.jpg")
    assert "driver 575.51" in reason and ">= 580" in reason and "could not be built" in reason
    monkeypatch.setattr(images, "decode_uint8", lambda *a, **k: batch(True, {0: "dali failed: x"}))
    assert "not decoded by DALI" in gc.dali_unusable_reason(ctx, "x.jpg")
    monkeypatch.setattr(images, "decode_uint8", lambda *a, **k: batch(True, {}))
    assert gc.dali_unusable_reason(ctx, "x.jpg") is None
    results.close()


@pytest.mark.skipif(triton is None, reason="needs Triton")
def test_l2_gather_probe_sums_the_rows_it_is_given():
    """The L2 gather bandwidth probe (CUDA only in the run) reads exactly the rows named: under the interpreter its
    per-program sums equal torch's gather, fp32 and bf16 banks."""
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for dtype in (torch.float32, torch.bfloat16):
        bank = torch.randn(50, 16, generator=gen).to(dtype)
        idx = torch.randint(0, 50, (3 * 64,), generator=gen, dtype=torch.int32)
        sums = gc.l2_gather_sums(bank, idx, rows_per_program=64)
        want = bank[idx.long()].double().view(3, -1).sum(1)
        torch.testing.assert_close(sums.double(), want, rtol=1e-5, atol=1e-4)
