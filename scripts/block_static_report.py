"""Write the static sm_90 report of the fused BLOCK kernels: bench/results/block-sm90-static.{json,md}.

    python scripts/block_static_report.py [--gpu "H100 SXM"] [--out bench/results]   (without TRITON_INTERPRET)

Builds every kernel one forward + backward runs at the 12 benchmark shapes (``kernels.block_sm90.BENCH_SHAPES`` x
``BENCH_DTYPES``) with Triton's bundled ptxas/cuobjdump and records, per kernel, registers, spills, the SASS
loads, what one warp executes (every loop weighted by its trips) and the issue bound beside the floor; per call,
their sums. Counts of the code, not times: GPU timings are owed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_widths(sass_file: str) -> dict[str, int]:
    """Global loads and async copies in the SASS by width (LDG.E.128, LDGSTS.E.BYPASS.128, LDG.E.U16, ...)."""
    with open(sass_file) as f:
        ops = re.findall(r"\b((?:LDG|LDGSTS)\.[A-Z0-9.]+)", f.read())
    out: dict[str, int] = {}
    for op in ops:
        out[op] = out.get(op, 0) + 1
    return dict(sorted(out.items()))


def split_floor_us(shape, gpu: str) -> float:
    """The floor of float32 at "highest" as the kernels run it (3xTF32: three TF32 products per product, bytes at
    HBM), microseconds: below ``block_merge_floor``'s FP32 (FFMA) figure wherever TF32 / 3 > FP32's rate."""
    from cmc_fast.kernels import block_plan as kp
    from cmc_fast.kernels.gpus import GPUS
    from cmc_fast.kernels.reference import block_chunk_sizes

    b, dim, chunks, rank = shape
    sizes, spec = block_chunk_sizes(dim, chunks), GPUS[gpu]
    flops = 3 * 12 * b * rank * sum(s * s for s in sizes)
    nbytes = kp.block_merge_bytes(b, sizes, rank, 4, 4, backward=True)
    return round(1e6 * max(flops / spec["tf32"], nbytes / spec["hbm"]), 2)


def add_split_floor(rep: dict) -> None:
    """fp32 "highest" entries: the 3xTF32 floor and the bound's ratio to it beside the FP32 one."""
    if rep["dtype"] == "fp32" and rep["precision"] == "highest":
        floor = split_floor_us(tuple(int(v) for v in rep["shape"].split(",")), rep["gpu"])
        rep["call_floor_3xtf32_us"] = floor
        rep["bound_over_3xtf32_floor"] = round(rep["call_issue_bound_us"] / floor, 2)


def build(gpu: str, sass_root: str) -> list[dict]:
    import triton
    from cmc_fast.kernels import block_sm90, sm90_report

    reports = []
    for shape in block_sm90.BENCH_SHAPES:
        for dtype, precision in block_sm90.BENCH_DTYPES:
            sass_dir = os.path.join(sass_root, f"{'-'.join(map(str, shape))}-{dtype}-{precision}")
            rows = sm90_report.report("block", shape, sass_dir, dtype=dtype, precision=precision, gpu=gpu)
            for r in rows:
                r["global_loads"] = _load_widths(r["sass"])
                r["sass"] = os.path.basename(r["sass"])
            b, dim, chunks, rank = shape
            bound = sum(r["issue_bound_us"] for r in rows)
            floor = block_sm90.hopper_floors(shape, dtype, precision)[f"{gpu} fwd+bwd us"]
            reports.append({"shape": ",".join(map(str, shape)), "dtype": dtype, "precision": precision,
                            "gpu": gpu, "triton": triton.__version__, "call_issue_bound_us": round(bound, 3),
                            "call_floor_us": floor, "bound_over_floor": round(bound / floor, 2), "kernels": rows})
            add_split_floor(reports[-1])
    return reports


def loop_loads(executed: dict) -> str:
    """Each SASS loop's own global loads by width and how many passes one program makes through it, e.g.
    ``features x20: LDG.E.128 5, LDG.E.64 10``; loops the compiler unrolled are straight code and not listed."""
    parts = []
    for name, ops in executed.get("loop_loads", {}).items():
        widths = ", ".join(f"{k} {v}" for k, v in sorted(ops.items()) if k != "runs")
        parts.append(f"{name} x{ops['runs']}: {widths or 'none'}")
    return "; ".join(parts) or "no loop"


def markdown(reports: list[dict], gpu: str, commit: str) -> str:
    lines = ["# BLOCK fused kernels: static sm_90 report", "",
             "Built for sm_90 without a GPU (Triton's bundled ptxas + cuobjdump) by `python scripts/"
             "block_static_report.py`, commit " + commit + ". Counts of the code, not times: GPU timings are owed. "
             f"`executed/warp`: instructions one warp of a program executes, every SASS loop weighted by its trip "
             f"count (nested loops included; both sides of a branch counted). `bound us`: the issue bound of the "
             f"kernel's launches in one forward+backward on the {gpu} (one instruction a cycle per scheduler, 4 "
             f"an SM, programs rounded up per SM, clock from `kernels/gpus.GPUS`): a lower bound, not a "
             f"prediction. `floor us`: the kernel's share of the merge's floor (FLOPs at the precision's rate, bytes "
             f"at HBM; `block_sm90.kernel_floors`). `call floor`: `block_merge_floor` of the whole forward+backward. "
             f"float32 at \"highest\" runs 3xTF32 dots (`block_plan.dot_precision`); its floor here is the FP32 "
             f"(FFMA) rate's, and `3xTF32 floor` beside it is what three TF32 products per product cost (bytes at "
             f"HBM): the stricter of the two wherever TF32 / 3 outruns FP32. `in loops`: the global loads of each "
             f"SASS loop's own body by width (`hopper_build.executed_mix`'s `loop_loads`). Scalar ones left in loops "
             f"that run more than once a program: where a per-step tile gives a thread one element (dx's [64, 2] g "
             f"and t at 3xTF32, dW's [32, 4] dz, dx's bf16 bias of 128 on 128 threads: Triton's coalescing caps a "
             f"thread at elements / threads), dx's feature-major bias at 3xTF32 (`BlockPlan.rank_major`: rank-major "
             f"issued more there), and every load at (256, 18, 15), whose rows of 15 elements start unaligned.",
             "", "| shape B,DIM,CHUNKS,RANK | dtype | precision | call issue bound us | call floor us | ratio |",
             "|---|---|---|---:|---:|---:|"]
    for rep in reports:
        split = rep.get("call_floor_3xtf32_us")
        split = f" (3xTF32 floor {split}: {rep['bound_over_3xtf32_floor']}x)" if split else ""
        lines.append(f"| {rep['shape']} | {rep['dtype']} | {rep['precision']} | {rep['call_issue_bound_us']} | "
                     f"{rep['call_floor_us']}{split} | {rep['bound_over_floor']} |")
    for rep in reports:
        lines += ["", f"## {rep['shape']}, {rep['dtype']}, precision {rep['precision']}", "",
                  f"issue bound {rep['call_issue_bound_us']} us against the floor {rep['call_floor_us']} us "
                  f"({rep['bound_over_floor']}x)", "",
                  "| kernel | warps | regs | spill | shared B | programs | executed/warp | tensor | fp32 | loads | "
                  "bound us | floor us | global loads | in loops (passes a program) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for r in rep["kernels"]:
            e = r["executed_per_warp"]
            loads = ", ".join(f"{k} {v}" for k, v in r["global_loads"].items())
            lines.append(f"| {r['kernel']} | {r['num_warps']} | {r['registers']} | {r['spilled']} | {r['shared']} | "
                         f"{r['programs']} | {e['total']} | {e['tensor']} | {e['fp32']} | {e['loads']} | "
                         f"{r['issue_bound_us']} | {r['floor_us']} | {loads} | {loop_loads(e)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="H100 SXM")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run without TRITON_INTERPRET (code generation)", file=sys.stderr)
        return 2
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as sass_root:
        reports = build(args.gpu, sass_root)
    stem = os.path.join(args.out, "block-sm90-static")
    with open(stem + ".json", "w") as f:
        json.dump({"what": "static sm_90 report of the fused BLOCK kernels (no GPU: Triton's bundled ptxas and "
                           "cuobjdump); issue bounds and floors in microseconds",
                   "command": "python scripts/block_static_report.py", "commit_built": commit, "reports": reports},
                  f, indent=1, default=str)
        f.write("\n")
    with open(stem + ".md", "w") as f:
        f.write(markdown(reports, args.gpu, commit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
