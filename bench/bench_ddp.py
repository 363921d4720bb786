"""Data-parallel training steps/s: 1 process against 2 (or more) on this machine, the same global batch.

    python bench/bench_ddp.py [--stage stage1] [--steps 20] [--world 1,2] [--batch-size 32]

Each world size starts its ranks as torchrun would (RANK, WORLD_SIZE, ... in the environment; gloo on the CPU,
NCCL on GPUs, one GPU per rank), builds the stage exactly as the trainer does (synthetic preset), wraps it in
DDP and times ``--steps`` global steps after 3 warm-up steps, between two barriers. On the CPU each rank runs
``--threads`` torch threads (default 1: on a shared 2-core VM, two OpenMP threads of one process measured up to
10x slower than one when a sibling is descheduled). Writes ``bench/results/ddp-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _worker(args: argparse.Namespace) -> None:
    import torch

    from cmc_fast import distributed
    from cmc_fast.config import preset
    from cmc_fast.trainer import build_stage

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = preset("synthetic")
    cfg = dataclasses.replace(cfg, data_root=args.data_root, batch_size=args.batch_size, synthetic_train=256,
                              threads=args.threads if not torch.cuda.is_available() else None)
    _, stage = build_stage(cfg, args.stage, tempfile.mkdtemp(prefix="cmc-ddp-bench-"))
    distributed.wrap(stage)
    stage.train()
    gen = torch.Generator().manual_seed(0)
    n = len(stage.train_split)

    def step() -> torch.Tensor:
        rows = distributed.local_slice(torch.randperm(n, generator=gen)[: cfg.batch_size])
        return stage.step(rows)[0]

    for _ in range(3):
        float(step())
    distributed.barrier("bench start")
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    float(loss)
    distributed.barrier("bench end")
    seconds = time.perf_counter() - t0
    if distributed.is_main():
        Path(args.result).write_text(json.dumps({"world": world, "steps": args.steps, "seconds": seconds,
                                                 "steps_per_s": args.steps / seconds, "threads": cfg.threads}))
    distributed.shutdown()


def _launch(world: int, args: argparse.Namespace, result: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--worker", "--stage", args.stage, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--data-root", args.data_root,
           "--result", str(result)]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"world {world}: ranks exited with {codes}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="stage1", choices=["finetune-t", "finetune-v", "stage1", "stage2",
                                                               "cmc-shared"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--world", default="1,2", help="comma list of process counts")
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-root", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="cmc-ddp-bench-"))
    os.environ.setdefault("CMC_FAST_CACHE", str(tmp / "cache"))
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args.data_root = str(tmp / "data")
    rows = [_launch(int(w), args, tmp / f"world{w}.json") for w in args.world.split(",")]
    base = rows[0]["steps_per_s"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"cpu-{platform.machine()}-{os.cpu_count()}cores"
    lines = [f"# DDP steps/s, {args.stage}, global batch {args.batch_size}, {device}", "",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.steps} timed steps after 3 warm-up "
             "steps; one run each.", "", "| processes | threads each | steps/s | vs 1 process |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['world']} | {r['threads']} | {r['steps_per_s']:.2f} | {r['steps_per_s'] / base:.2f}x |")
    print("\n".join(lines))
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    out = ROOT / "bench" / "results" / f"ddp-{slug}"
    out.with_suffix(".json").write_text(json.dumps({"stage": args.stage, "device": device, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
