"""The benchmark harness (cmc_fast/benchmark.py) and the GPU check over it (scripts/gpu_check.py): the statistics
against a scripted clock, kernel time apart from host overhead with the CUDA calls stubbed, the writer's JSON round
trip and its Markdown from the same rows, the section runner's order and budget, and the driver end to end on the
CPU (``--dry-run``), with scripts/gpu_results.py over its file."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from cmc_fast import benchmark as hb

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gc = _load("gpu_check")
gr = _load("gpu_results")


# ============================================================================================ statistics
@pytest.mark.parametrize("n", [1, 2, 7, 20])
def test_summarize_matches_numpy_percentiles(n):
    xs = [random.uniform(1e-4, 1.0) for _ in range(n)]
    s = hb.summarize(xs)
    q1, med, q3 = np.percentile(xs, [25, 50, 75])  # linear interpolation: the inclusive method
    assert s["median_s"] == pytest.approx(med) and s["q1_s"] == pytest.approx(q1) and s["q3_s"] == pytest.approx(q3)
    assert s["iqr_s"] == pytest.approx(q3 - q1) and s["mean_s"] == pytest.approx(np.mean(xs))
    assert s["min_s"] == min(xs) and s["rounds"] == n
    with pytest.raises(ValueError):
        hb.summarize([])


class ScriptedClock:
    """A clock that advances only when the timed function runs, by the next scripted duration."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def __call__(self) -> float:
        return self.now

    def work(self) -> None:
        self.now += self.durations[self.calls]
        self.calls += 1


def test_measure_times_the_first_call_apart_and_skips_warmup():
    rounds = [random.uniform(0.01, 0.1) for _ in range(9)]
    first, warm = 5.0, 99.0  # the warm-up call must never reach the statistics
    clock = ScriptedClock([first, warm, *rounds])
    row = hb.measure(clock.work, "cpu", rounds=9, warmup=1, clock=clock)
    assert clock.calls == 11
    assert row["first_call_s"] == first and row["rounds"] == 9
    assert row["median_s"] == pytest.approx(float(np.median(rounds)))
    assert row["iqr_s"] == pytest.approx(float(np.subtract(*np.percentile(rounds, [75, 25]))))
    assert row["kernel_s"] is None and row["host_overhead_s"] is None and row["peak_bytes"] is None


@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA calls measure() makes, stubbed: synchronize does nothing, one call allocates 3 MiB at peak."""
    allocated = {"now": 1 << 20, "peak": 1 << 20}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: allocated.update(peak=allocated["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: allocated["peak"])
    return allocated


def test_measure_on_cuda_separates_kernel_time_from_host_overhead(fake_cuda):
    rounds = [random.uniform(1e-4, 2e-4) for _ in range(5)]
    clock = ScriptedClock([1.0, 0.0, *rounds, 0.0])
    kernel = min(rounds) / 3

    def call():
        clock.work()
        fake_cuda["peak"] = fake_cuda["now"] + (3 << 20)

    row = hb.measure(call, "cuda", rounds=5, clock=clock, kernel_timer=lambda fn: (kernel, "cuda-graph"))
    assert row["kernel_s"] == kernel and row["kernel_method"] == "cuda-graph"
    assert row["host_overhead_s"] == pytest.approx(float(np.median(rounds)) - kernel)
    assert row["peak_bytes"] == 3 << 20


def test_kernel_time_falls_back_to_the_profiler_when_capture_fails(fake_cuda, monkeypatch):
    def not_capturable(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(hb, "cuda_graph_seconds", not_capturable)
    monkeypatch.setattr(hb, "profiler_kernel_seconds", lambda fn: 4.5e-5)
    seconds, method = hb.kernel_seconds(lambda: None)
    assert seconds == 4.5e-5 and method.startswith("profiler") and "RuntimeError" in method
    monkeypatch.setattr(hb, "cuda_graph_seconds", lambda fn: 2e-5)
    assert hb.kernel_seconds(lambda: None) == (2e-5, "cuda-graph")


# ================================================================================================ writer
def _random_rows(n: int, groups=("nce a", "block b")) -> list[dict]:
    return [{"group": random.choice(groups), "provider": f"p{i}", "median_s": random.uniform(1e-5, 1.0),
             "iqr_s": random.uniform(0, 1e-3), "peak_bytes": random.randrange(1 << 30), "floor_s": None,
             "launched": random.choice(["gather", "dense", None])} for i in range(n)]


def _tables(md: str) -> dict[str, list[dict]]:
    """{group: [{header: cell}]} parsed back out of the Markdown."""
    out, group, header = {}, None, None
    for line in md.splitlines():
        if line.startswith("## "):
            group, header = line[3:], None
        elif group and line.startswith("| ") and header is None:
            header = [c.strip() for c in line.strip("|").split("|")]
        elif group and line.startswith("| "):
            out.setdefault(group, []).append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return out


def test_writer_round_trips_json_and_renders_markdown_from_the_same_rows(tmp_path):
    rows = _random_rows(8)
    json_path, md_path = hb.write_results(rows, tmp_path, device="Some GPU 80GB", note="x")
    payload = hb.read_results(json_path)
    assert payload["device"] == "Some GPU 80GB" and payload["note"] == "x"
    assert [{k: r[k] for k in rows[0]} for r in payload["rows"]] == hb.plain(rows)
    tables = _tables(md_path.read_text())
    assert set(tables) == {r["group"] for r in rows}
    for group, cells in tables.items():
        members = [r for r in payload["rows"] if r["group"] == group]
        assert [c["provider"] for c in cells] == [r["provider"] for r in members]
        for cell, r in zip(cells, members):
            assert float(cell["median ms"]) == pytest.approx(r["median_s"] * 1e3, abs=1e-3)
            assert float(cell["peak MiB"]) == pytest.approx(r["peak_bytes"] / 2**20, abs=0.05)


def test_writer_merges_by_group_and_provider(tmp_path):
    old = _random_rows(4, groups=("g",))
    hb.write_results(old, tmp_path, device="d")
    fresh = [dict(old[1], median_s=123.0), {"group": "h", "provider": "new", "median_s": 1.0}]
    json_path, _ = hb.write_results(fresh, tmp_path, device="d")
    rows = hb.read_results(json_path)["rows"]
    assert [(r["group"], r["provider"]) for r in rows] == [("g", "p0"), ("g", "p2"), ("g", "p3"), ("g", "p1"),
                                                          ("h", "new")]
    assert rows[3]["median_s"] == 123.0
    json_path, _ = hb.write_results(fresh[:1], tmp_path, device="d", merge=False)
    assert len(hb.read_results(json_path)["rows"]) == 1
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # the atomic writer left no temporary


def test_plain_values_are_json():
    row = hb.plain({"a": 1.23456789, "b": float("nan"), "c": (1, float("inf")), "d": torch.tensor(2.5),
                    "e": np.float32(0.5), "f": torch.device("cpu")})
    assert json.loads(json.dumps(row, allow_nan=False)) == {"a": 1.23457, "b": "nan", "c": [1, "inf"], "d": 2.5,
                                                            "e": 0.5, "f": "cpu"}


# ======================================================================================= section runner
def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_sections_run_in_order_within_the_budget():
    ran, record = [], []

    def section(name, work=None):
        def run():
            ran.append(name)
            if work:
                work()
        return run

    def boom():
        raise ValueError("broken section")

    sections = [("a", section("a"), 0.1), ("slow", section("slow", lambda: _spin(30)), 0.2),
                ("broken", section("broken", boom), 0.1), ("huge", section("huge"), 1000.0), ("z", section("z"), 0.1)]
    t0 = time.monotonic()
    hb.run_sections(sections, record.append, deadline=time.monotonic() + 20)
    assert time.monotonic() - t0 < 15  # the slow section was stopped, not waited for
    assert [e["section"] for e in record] == ["a", "slow", "broken", "huge", "z"]
    assert [e["status"] for e in record] == ["ok", "stopped", "error", "skipped", "ok"]
    assert ran == ["a", "slow", "broken", "z"]  # the section over the budget never started
    assert "ValueError" in record[2]["note"] and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_sigterm_stops_the_section_records_it_and_runs_no_more():
    record, ran = [], []

    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)
        _spin(30)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(hb.Terminated):
        hb.run_sections([("t", terminated, 10.0), ("after", lambda: ran.append(1), 0.1)], record.append,
                        deadline=time.monotonic() + 60)
    assert [(e["section"], e["status"]) for e in record] == [("t", "stopped")] and not ran
    assert signal.getsignal(signal.SIGTERM) == before


# ================================================================================================ driver
def test_pytest_lines_are_counted_per_module():
    result = {}
    lines = ["tests/test_x.py::test_a PASSED                      [ 10%]",
             "tests/test_x.py::test_b[1-2] FAILED                 [ 20%]",
             "tests/test_x.py::test_c SKIPPED (needs CUDA)        [ 30%]",
             "tests/test_x.py::test_d ERROR                       [ 40%]",
             "tests/test_y.py::test_e PASSED                      [ 50%]",
             "FAILED tests/test_x.py::test_b[1-2] - assert 1 == 2",  # the summary repeats a failure: not counted
             "collected 5 items"]
    for line in lines:
        gc.count_test_line(result, line)
    assert result["test_x.py"] == {"tests": 4, "passed": 1, "failed": 1, "errors": 1, "skipped": 1,
                                   "failing": ["test_b[1-2]", "test_d"]}
    assert result["test_y.py"]["passed"] == 1
    assert gc.correctness_failed({"correctness": {"exit_code": None, **result}})
    assert not gc.correctness_failed({"correctness": {"exit_code": 0, "test_y.py": result["test_y.py"]}})


def test_dali_is_proven_before_it_is_measured(tmp_path, monkeypatch):
    from cmc_fast.data_pipeline import decoders, image_backend, images

    run = gc.Run(tmp_path, False, torch.device("cuda"), time.monotonic() + 60, {"env": {"driver": "575.51"}})
    batch = lambda ok, fallback: images.ImageBatch(torch.zeros(1, 3, 2, 2, dtype=torch.uint8),  # noqa: E731
                                                   torch.tensor([ok]), {}, fallback, "dali")
    monkeypatch.setattr(image_backend, "dali_available", lambda: False)
    assert "not installed" in gc.dali_unusable_reason(run, "x.jpg")
    monkeypatch.setattr(image_backend, "dali_available", lambda: True)

    def unbuildable(*args, **kwargs):
        raise decoders.DaliUnusableError("a DALI GPU pipeline could not be built")

    monkeypatch.setattr(images, "decode_uint8", unbuildable)
    assert "575.51" in gc.dali_unusable_reason(run, "x.jpg")
    monkeypatch.setattr(images, "decode_uint8", lambda *a, **k: batch(True, {0: "dali failed: x"}))
    assert gc.dali_unusable_reason(run, "x.jpg") is not None
    monkeypatch.setattr(images, "decode_uint8", lambda *a, **k: batch(True, {}))
    assert gc.dali_unusable_reason(run, "x.jpg") is None


def test_bad_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    for argv in ([], ["--out", str(tmp_path), "--budget-s", "0"], ["--out", str(tmp_path), "--sections", "nope"]):
        with pytest.raises(SystemExit) as exc:
            gc.parse_args(argv)
        assert exc.value.code == 2


def test_dry_run_sections_write_as_they_go_and_merge_into_bench_results(tmp_path):
    """In process, the cheap sections: env and images (real JPEGs if here, else generated ones)."""
    out = tmp_path / "out"
    assert gc.main(["--dry-run", "--out", str(out), "--sections", "images,env"]) == 0
    payload = hb.read_results(out / "gpu-results.json")
    assert payload["dry_run"] is True and [s["section"] for s in payload["sections"]] == ["env", "images"]
    assert {r["launched"] for r in payload["rows"]} <= {"pil", "torchvision", "dali"} and payload["rows"]
    assert all(r["images_per_s"] > 0 and r["median_s"] > 0 for r in payload["rows"])
    with pytest.raises(SystemExit):
        gr.main([str(out / "gpu-results.json"), "--results", str(tmp_path / "bench")])
    json_path, _ = gr.convert(out / "gpu-results.json", tmp_path / "bench", allow_dry_run=True)
    merged = hb.read_results(json_path)["rows"]
    assert [(r["group"], r["provider"]) for r in merged] == [(r["group"], r["provider"]) for r in payload["rows"]]


@pytest.mark.slow
def test_dry_run_end_to_end_on_the_cpu(tmp_path):
    """Every section, in order, as a GPU run makes its calls: the kernel tests pass under the interpreter, each NCE
    row names the form it launched, the trainer's step ran through build_stage."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = __import__("subprocess").run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(tmp_path),
                                         "--budget-s", "900"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = hb.read_results(tmp_path / "gpu-results.json")
    assert [s["section"] for s in payload["sections"]] == ["env", "correctness", "timings", "compiled", "train",
                                                            "images"]
    assert all(s["status"] == "ok" for s in payload["sections"])
    modules = {k: v for k, v in payload["correctness"].items() if k.endswith(".py")}
    assert set(modules) == {"test_nce_kernel.py", "test_block_kernel.py"}
    assert all(m["passed"] >= 1 and not m["failed"] and not m["errors"] for m in modules.values())
    rows = {(r["section"], r["provider"]): r for r in payload["rows"]}
    assert rows[("timings", "gather")]["launched"].startswith("gather (Triton)")
    assert rows[("timings", "dense")]["launched"].startswith("dense (Triton)")
    assert rows[("timings", "fused")]["launched"] == "fused"
    assert rows[("train", "eager fp32, kernels=reference")]["launched"].startswith(("dense", "gather"))


def test_launched_reports_the_slots_the_launcher_measured_and_splits_covering_k(monkeypatch):
    """On a GPU (the dispatch stubbed to say Triton runs, not interpreted), the NCE grid reported is built from the
    slots the launcher recorded, and its splits cover the K+1 columns (or the bank's rows) exactly once."""
    from cmc_fast.kernels import dispatch, nce_plan

    monkeypatch.setattr(dispatch, "use_triton", lambda t: True)
    monkeypatch.setattr(dispatch, "triton_interpreted", lambda: False)
    for form, kernel, width in (("gather", "_nce_fwd_kernel", 16385), ("dense", "_nce_dense_kernel", 9528)):
        slots = random.choice([264, 528, 396])
        monkeypatch.setitem(nce_plan._SLOTS, (kernel, 0, (), (), ()), slots)
        bank = types.SimpleNamespace(device=torch.device("cuda"), element_size=lambda: 4)  # an fp32 bank on CUDA
        text = gc.nce_launched([f"{form} (auto) at ..."], bank, 64, 128, 16385, 9528)
        fields = dict(kv.split("=") for kv in text.split() if "=" in kv)
        assert text.startswith(f"{form} (Triton)") and int(fields["slots"]) == slots
        splits, chunk = int(fields["splits"]), int(fields["chunk"])
        assert (splits - 1) * chunk < width <= splits * chunk
