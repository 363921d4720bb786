"""The static sm_90 report of the Triton ops, from the command line (no GPU needed; run it without TRITON_INTERPRET).

    python -m cmc_fast.kernels.sm90_report report --op nce --shape B,D,K,N [--bank-dtype fp32] [--nce-path dense]
        --sass-dir DIR [--json]
    python -m cmc_fast.kernels.sm90_report report --op block --shape B,DIM,CHUNKS,RANK [--dtype bf16]
        [--precision highest] [--gpu "H100 SXM"] --sass-dir DIR [--json]
    python -m cmc_fast.kernels.sm90_report bounds      (rewrites kernels/block_bounds.json, BLOCK's dispatch table)

``report`` builds every specialisation one call of the op runs at the shape (the op's ``hopper_specs``:
kernels/nce_sm90.py, kernels/block_sm90.py), writes each one's SASS into DIR and prints, per specialisation,
registers, spills, shared memory, the grid against the resident slots of a 132-SM H100/H200 and the instruction
mix (``kernels/hopper_build.report_spec``), then the op's floors per GPU (``hopper_floors``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from . import block, block_sm90, nce_sm90
from .block_plan import BOUNDS_FILE
from .hopper_build import report_spec

# op -> (hopper_specs, hopper_floors); options come from the command line (NCE: bank_dtype, nce_path; BLOCK: dtype,
# precision, gpu)
REPORTERS = {"nce": (nce_sm90.hopper_specs, nce_sm90.hopper_floors),
             "block": (functools.partial(block_sm90.hopper_specs, kernels=block), block_sm90.hopper_floors)}


def report(op: str, shape: tuple[int, ...], sass_dir: str, **options) -> list[dict]:
    """Build every specialisation of ``op`` at ``shape`` and return their report rows (SASS written to sass_dir)."""
    if op not in REPORTERS:
        raise ValueError(f"op must be one of {sorted(REPORTERS)}, got {op!r}")
    os.makedirs(sass_dir, exist_ok=True)
    specs = REPORTERS[op][0](shape, **options)
    return [report_spec(s, sass_dir, i) for i, s in enumerate(specs)]


_COLUMNS = [("kernel", 24), ("path", 22), ("num_warps", 5), ("registers", 5), ("spilled", 5), ("shared", 6),
            ("programs", 8), ("waves", 6), ("last_wave_fill", 5), ("rows_per_iteration", 5)]
_MIX_COLUMNS = ["total", "loads", "shuffles", "barriers", "mufu", "fp32", "tensor"]


def format_table(rows: list[dict]) -> str:
    """A plain-text table; the instruction mix is per gathered row where the kernel gathers rows, else per warp
    and pass (``loop/warp``)."""
    head = ["kernel", "path", "warps", "regs", "spill", "shared", "programs", "waves", "last", "rows",
            "mix"] + _MIX_COLUMNS
    lines = [" | ".join(head)]
    for r in rows:
        cells = [str(r.get(k)) for k, _ in _COLUMNS]
        per_row = r.get("per_gathered_row")
        mix = per_row or r["loop_instructions_per_warp"]
        cells.append("per row" if per_row else "loop/warp")
        cells += [str(mix.get(k)) for k in _MIX_COLUMNS]
        lines.append(" | ".join(cells))
    return "\n".join(lines) + format_bounds(rows)


def format_bounds(rows: list[dict]) -> str:
    """Rows with declared loops: instructions one warp executes (loops weighted by their trips), the issue bound
    of the kernel's launches in one call beside their floor, and the totals of the call."""
    timed = [r for r in rows if "executed_per_warp" in r]
    if not timed:
        return ""
    lines = ["", "executed per warp (loops x trips) | launches | issue bound us | floor us | loop bodies"]
    for r in timed:
        lines.append(f"{r['kernel']}: {r['executed_per_warp']['total']} | {r['launches']} | "
                     f"{r.get('issue_bound_us')} | {r.get('floor_us')} | {r['executed_per_warp']['loops']}")
    if all("issue_bound_us" in r for r in timed):
        bound, floor = (round(sum(r[k] for r in timed), 3) for k in ("issue_bound_us", "floor_us"))
        lines.append(f"one call: issue bound {bound} us, floor {floor} us ({timed[0].get('timing_gpu')})")
    return "\n".join(lines)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must be comma-separated integers, got {text!r}") from None
    if any(x < 0 for x in shape):
        raise argparse.ArgumentTypeError(f"--shape must be non-negative, got {text!r}")
    return shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmc_fast.kernels.sm90_report",
                                     description="Static sm_90 cost report of the Triton ops (no GPU needed)")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="build every specialisation a launch at --shape runs; SASS + table")
    rep.add_argument("--op", required=True, choices=sorted(REPORTERS))
    rep.add_argument("--shape", required=True, type=_parse_shape, help="e.g. B,D,K,N for nce")
    rep.add_argument("--sass-dir", required=True, help="directory the SASS files are written to")
    rep.add_argument("--json", action="store_true", help="print a JSON list, one object per specialisation")
    rep.add_argument("--bank-dtype", choices=["fp32", "bf16", "fp16"], help="nce: the bank's dtype")
    rep.add_argument("--nce-path", choices=["gather", "dense"], help="nce: the form of the loss (default gather)")
    rep.add_argument("--dtype", help="block: the operands' dtype")
    rep.add_argument("--precision", help="block: the matmul precision")
    rep.add_argument("--gpu", help="block: the GPU of the issue bound and floors (a key of kernels.gpus.GPUS)")
    sub.add_parser("bounds", help="rebuild BLOCK's dispatch table kernels/block_bounds.json (the bench shapes)")
    args = parser.parse_args(argv)
    if args.command == "bounds":
        block_sm90.write_bounds_table(block)
        print(f"wrote {BOUNDS_FILE}")
        return 0
    options = {k: v for k, v in (("bank_dtype", args.bank_dtype), ("nce_path", args.nce_path), ("dtype", args.dtype),
                                 ("precision", args.precision), ("gpu", args.gpu)) if v is not None}
    rows = report(args.op, args.shape, args.sass_dir, **options)
    floors = REPORTERS[args.op][1](args.shape, **options)
    if args.json:
        print(json.dumps(rows, indent=1, default=str))  # default: constexprs such as Triton dtypes
    else:
        print(format_table(rows))
        if floors:
            print("\nfloors:\n" + "\n".join(f"  {k}: {v}" for k, v in floors.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
