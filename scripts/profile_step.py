"""Profile the training step of one CMC stage with torch.profiler and print where the time goes.

    python scripts/profile_step.py --stage stage1 [--amp] [--compile] [--steps 20] [--trace out.json]

Uses the synthetic preset (tiny encoders) unless --dataset/--data-root say otherwise. On a GPU the fused NCE
and BLOCK kernels show up as their own rows (cmc_fast::...).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cmc_fast.config import preset
from cmc_fast.trainer import build_stage
from cmc_fast.variants import STAGE_VARIANT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=sorted(STAGE_VARIANT), default="stage1")
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--data-root")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--trace", help="write a Chrome trace here")
    args = ap.parse_args()

    cfg = preset(args.dataset)
    cfg = dataclasses.replace(cfg, data_root=args.data_root, amp=args.amp, compile=args.compile)
    tr, stage = build_stage(cfg, args.stage)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randperm(len(stage.train_split), generator=gen)[: cfg.batch_size] for _ in range(args.steps + 3)]
    stage.train()
    t0 = time.perf_counter()
    float(stage.step(rows[0])[0])  # compiles (with --compile) and warms up outside the profile
    print(f"first step: {time.perf_counter() - t0:.3f}s")
    for r in rows[1:3]:
        stage.step(r)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if tr.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for r in rows[3:]:
            loss, _ = stage.step(r)
        float(loss)
    print(f"steady state: {(time.perf_counter() - t0) / args.steps * 1e3:.2f} ms/step over {args.steps} steps "
          f"on {tr.device}")
    sort = "cuda_time_total" if tr.device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25))
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"trace written to {args.trace}")


if __name__ == "__main__":
    main()
