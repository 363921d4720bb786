"""BLOCK's cost model and dispatch (kernels/block_plan.py) and the static report's loop weighting
(kernels/hopper_build.py, kernels/gpus.py): SASS loops weighted by their trips, the issue bound, and the dispatch's
picks at the benchmark's 12 shapes against the bounds the report computes (kernels/block_bounds.json, checked against
a fresh sm_90 build by kernels/block_sm90.py in a child process without the interpreter)."""

from __future__ import annotations

import json

import cmc_fast.kernels.block_plan as kp
import pytest
import torch
from cmc_fast.kernels import block_sm90, gpus
from cmc_fast.kernels import hopper_build as hb
from cmc_fast.kernels.reference import block_chunk_sizes

# a made-up listing: straight code, an outer loop [0x20, 0x90] holding an inner loop [0x40, 0x60], straight code
_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   FFMA R5, R4, R4, R5 ;
        /*0040*/                   HMMA.16816.F32.BF16 R8, R12, R14, R8 ;
        /*0050*/                   ISETP.NE.AND P0, PT, R0, RZ, PT ;
        /*0060*/               @P0 BRA 0x40 ;
        /*0070*/                   STS [R1], R8 ;
        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0090*/               @P0 BRA 0x20 ;
        /*00a0*/                   STG.E desc[UR4][R2.64], R8 ;
        /*00b0*/                   EXIT ;
"""


def test_sass_loops_nest_and_weight_by_trips():
    """Every instruction counts once per pass of each loop around it: the inner body (3) x 5 x 3, the rest of the
    outer body (5) x 3, the straight code (4) once -- 45 + 15 + 4 = 64 per warp."""
    ins = hb.sass_instructions(_SASS)
    tree = hb.sass_loops(ins)
    assert [(n["start"], n["end"]) for n in tree] == [(0x20, 0x90)]
    assert [(n["start"], n["end"]) for n in tree[0]["inner"]] == [(0x40, 0x60)]
    mix = hb.executed_mix(ins, (hb.Loop("outer", 3, (hb.Loop("inner", 5),)),))
    assert mix["total"] == 3 * 5 * 3 + 3 * 5 + 4
    assert mix["tensor"] == 15 and mix["loads"] == 3 and mix["fp32"] == 3 and mix["barriers"] == 3
    assert mix["stores"] == 3 + 1
    assert mix["loops"] == {"outer": 8, "inner": 3}
    # the global load is the outer body's own (3 passes), the inner body (15 passes) has none
    assert mix["loop_loads"] == {"outer": {"runs": 3, "LDG.E.128": 1}, "inner": {"runs": 15}}


def test_sass_loops_unrolled_and_mismatched():
    """A declared loop the compiler may unroll (constant trips) matches nothing when the SASS lacks it; a structure
    that matches nothing else is an error naming the kernel (no figure for code that does not run)."""
    ins = hb.sass_instructions(_SASS)
    unrolled = hb.executed_mix(ins, (hb.Loop("outer", 2, (hb.Loop("k", 4, unrollable=True),
                                                          hb.Loop("inner", 5))),))
    assert unrolled["total"] == 2 * 5 * 3 + 2 * 5 + 4
    with pytest.raises(ValueError, match="demo: the SASS has 1 loops"):
        hb.executed_mix(ins, (hb.Loop("a", 2), hb.Loop("b", 2)), "demo")


def test_issue_bound():
    """One instruction a cycle per scheduler, 4 schedulers an SM, programs rounded up per SM: 200 programs of 8 warps
    on 132 SMs put 16 warps on the busiest SM, 4 a scheduler."""
    assert gpus.issue_bound_s(1000, 8, 200, 132, 1e9) == pytest.approx(4 * 1000 / 1e9)
    assert gpus.issue_bound_s(1000, 4, 132, 132, 2e9) == pytest.approx(1000 / 2e9)
    assert gpus.issue_bound_s(1000, 2, 100, 132, 1e9) == pytest.approx(1000 / 1e9)  # 2 warps: 2 schedulers idle


def test_kernel_floors_sum_to_the_floor():
    """The kernels' shares of the floor cover the merge's floor (each kernel is bound by its own FLOPs or bytes)."""
    sizes = block_chunk_sizes(1600, 20)
    for dtype, precision in ((torch.float32, "highest"), (torch.float32, "high"), (torch.bfloat16, "highest")):
        for gpu in gpus.GPUS:
            parts = block_sm90.kernel_floors(64, sizes, 15, dtype, precision, gpu)
            floor = kp.block_merge_floor(64, sizes, 15, dtype=dtype, precision=precision, gpu=gpu, backward=True)
            assert floor * (1 - 1e-12) <= sum(parts.values()) <= 3 * floor, (dtype, precision, gpu)


def test_chunk_layout():
    assert kp.chunk_layout([80] * 20) == {"S": 80, "ALIGN": 16}
    assert kp.chunk_layout([15] * 17 + [1]) == {"S": 0, "ALIGN": 1}
    assert kp.chunk_layout([24, 40]) == {"S": 0, "ALIGN": 8}


# ------------------------------------------------------------------------------------------- the dispatch
def _bench_cases():
    for b, dim, chunks, rank in block_sm90.BENCH_SHAPES:
        for dtype, precision in block_sm90.BENCH_DTYPES:
            yield b, block_chunk_sizes(dim, chunks), rank, dtype, precision


def test_bounds_table_covers_the_bench_shapes():
    table = kp._bounds_table()
    assert len(list(_bench_cases())) == 12
    for b, sizes, rank, dtype, precision in _bench_cases():
        entry = table[kp._bounds_key(b, sizes, rank, dtype, precision)]
        assert {k["kernel"] for k in entry} >= {"_block_fwd_kernel", "_block_bwd_dx_kernel", "_block_bwd_dw_kernel"}
        assert all(k["instructions_per_warp"] > 0 and k["programs"] > 0 for k in entry)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("gpu", ["H100 SXM", "H100 PCIe", "H200"])
def test_dispatch_picks_follow_the_bounds(monkeypatch, gpu, compiled):
    """At every bench shape the dispatch picks the fused kernels exactly where their issue bound (plus launches)
    beats the bmm path's GEMM-floor estimate: it never picks a path whose own estimate loses."""
    monkeypatch.setenv("CMC_FAST_KERNELS", "auto")
    monkeypatch.setattr(kp, "triton_available", lambda: True)
    picks = []
    for b, sizes, rank, dtype, precision in _bench_cases():
        t = torch.bfloat16 if dtype == "bf16" else torch.float32
        fused = kp.estimate_fused(b, sizes, rank, t, precision, gpu)
        bmm = kp.estimate_bmm(b, sizes, rank, t, precision, gpu, compiled)
        assert fused is not None and fused > kp.fused_issue_bound(b, sizes, rank, t, precision, gpu) > 0
        got = kp.choose_block_path(sizes, rank, b, t, "cuda", compiled=compiled, precision=precision, gpu=gpu)
        assert got == ("fused" if fused < bmm else "bmm"), (b, sizes[0], dtype, precision, fused, bmm)
        picks.append(got)
    assert set(picks) <= {"fused", "bmm"}


def test_dispatch_without_a_bound_takes_bmm(monkeypatch):
    """A shape the bounds table lacks (B=32) is counted once by the op file's counter; where nothing can count it
    (no counter, or no compiler: the counter raises) it has no bound and takes the bmm path; the kernels that do
    not fit: the bmm path."""
    monkeypatch.setenv("CMC_FAST_KERNELS", "auto")
    monkeypatch.setattr(kp, "triton_available", lambda: True)
    sizes = block_chunk_sizes(1600, 20)
    table_64 = kp._bounds_table()[kp._bounds_key(64, sizes, 15, "bf16", "highest")]
    calls = []

    def counter(shape, dtype, precision):  # what the op file's counter returns: B=64's counts, halved programs
        calls.append((shape, dtype, precision))
        return [dict(k, programs=max(1, k["programs"] // 2)) for k in table_64]

    def no_compiler(shape, dtype, precision):
        raise RuntimeError("no ptxas here")

    previous = kp._count_missing
    try:
        kp.count_missing_shapes_with(counter)
        bound_32 = kp.fused_issue_bound(32, sizes, 15, torch.bfloat16, "highest")
        assert kp.fused_issue_bound(32, sizes, 15, torch.bfloat16, "highest") == bound_32  # counted once, cached
        assert calls == [((32, 1600, 20, 15), "bf16", "highest")]
        assert 0 < bound_32 <= kp.fused_issue_bound(64, sizes, 15, torch.bfloat16, "highest")  # 64: the table's
        assert len(calls) == 1
        fused, bmm = (kp.estimate_fused(32, sizes, 15, torch.bfloat16, "highest"),
                      kp.estimate_bmm(32, sizes, 15, torch.bfloat16, "highest"))
        assert kp.choose_block_path(sizes, 15, 32, torch.bfloat16, "cuda", precision="highest",
                                    gpu="H100 SXM") == ("fused" if fused < bmm else "bmm")
        for missing in (None, no_compiler):
            kp.count_missing_shapes_with(missing)
            assert kp.fused_issue_bound(32, sizes, 15, torch.bfloat16, "highest") is None
            assert kp.choose_block_path(sizes, 15, 32, torch.bfloat16, "cuda", precision="highest",
                                        gpu="H100 SXM") == "bmm"
        assert kp.choose_block_path([300, 20], 15, 64, torch.bfloat16, "cuda", gpu="H100 SXM") == "bmm"
        assert kp.choose_block_path([20], 200, 64, torch.bfloat16, "cuda", gpu="H100 SXM") == "bmm"
    finally:
        kp.count_missing_shapes_with(previous)


def test_the_op_file_counts_missing_shapes():
    """Importing the op file hands the plan its counter: the sm_90 build of its own kernels."""
    from cmc_fast.kernels import block

    assert kp._count_missing is block._count_fused_kernels


def test_device_timing_reads_the_device(monkeypatch):
    """The issue bound takes the device's own SM count (an H100 PCIe: 114) and, by its name, its GPUS entry."""
    class Props:
        multi_processor_count = 114

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 PCIe")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: Props())
    gpus._gpu_name_of.cache_clear()
    gpus.device_timing.cache_clear()
    try:
        assert gpus.gpu_name("cuda:0") == "H100 PCIe"
        assert gpus.device_timing("cuda:0") == {"sms": 114, "clock_hz": gpus.GPUS["H100 PCIe"]["clock_hz"]}
    finally:
        gpus._gpu_name_of.cache_clear()
        gpus.device_timing.cache_clear()


_RECOUNT = r"""
import json
from cmc_fast.kernels import block, block_plan as kp
from cmc_fast.kernels.block_sm90 import kernel_counts
from cmc_fast.kernels.reference import block_chunk_sizes
out = {}
for shape, dtype, precision in SHAPES:
    sizes = block_chunk_sizes(shape[1], shape[2])
    key = kp._bounds_key(shape[0], sizes, shape[3], dtype, precision)
    out[key] = kernel_counts(shape, dtype, precision, kernels=block)
print("COUNTS" + json.dumps(out))
"""


def _recount(run_without_interpreter, cases):
    text = run_without_interpreter(_RECOUNT.replace("SHAPES", repr(cases)), timeout=1500)
    return json.loads(text.split("COUNTS", 1)[1])


def test_bounds_table_is_what_the_report_counts(run_without_interpreter):
    """The committed table holds what a fresh sm_90 build counts (B=64, 1600/20/15, bf16 and fp32 "high"): the
    dispatch's bound is the report's, not a number typed in."""
    counts = _recount(run_without_interpreter, [((64, 1600, 20, 15), "bf16", "highest"),
                                                ((64, 1600, 20, 15), "fp32", "high")])
    table = kp._bounds_table()
    for key, entry in counts.items():
        assert table[key] == entry, key


@pytest.mark.slow
def test_bounds_table_is_what_the_report_counts_everywhere(run_without_interpreter):
    counts = _recount(run_without_interpreter, [(s, d, p) for s in block_sm90.BENCH_SHAPES
                                                for d, p in block_sm90.BENCH_DTYPES])
    table = kp._bounds_table()
    for key, entry in counts.items():
        assert table[key] == entry, key
