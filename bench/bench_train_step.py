"""Training step time of each stage: eager vs torch.compile, with and without AMP, kernels vs reference.

CPU runs use the synthetic preset's tiny encoders (a smoke-sized measurement); on CUDA the same step runs on
the GPU. The first (compiling) step is excluded: pytest-benchmark's warm-up round takes it.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from cmc_fast.benchmark import bench_device
from cmc_fast.config import preset
from cmc_fast.trainer import build_stage

ON_GPU = bench_device().type == "cuda"
# Compiling the CPU step takes minutes on 2 cores: opt in with CMC_BENCH_CPU_COMPILE=1.
VARIANTS = [("eager", False, False)]
if ON_GPU or os.environ.get("CMC_BENCH_CPU_COMPILE") == "1":
    VARIANTS += [("compile", True, False)]
if ON_GPU:
    VARIANTS += [("amp", False, True), ("amp+compile", True, True)]


@pytest.mark.parametrize("stage_name", ["stage1", "stage2"])
@pytest.mark.parametrize("kernels_mode", ["auto", "reference"] if ON_GPU else ["auto"])
@pytest.mark.parametrize("label, compiled, amp", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_train_step(benchmark, record, tmp_path, monkeypatch, stage_name, kernels_mode, label, compiled, amp):
    monkeypatch.setenv("CMC_FAST_KERNELS", kernels_mode)
    cfg = preset("synthetic")
    cfg = dataclasses.replace(cfg, compile=compiled, amp=amp, data_root=os.environ.get("CMC_FAST_BENCH_DATA"))
    torch._dynamo.reset()
    tr, stage = build_stage(cfg, stage_name, str(tmp_path / "run"))
    stage.train()
    gen = torch.Generator().manual_seed(0)
    n = len(stage.train_split)

    def step():
        rows = torch.randperm(n, generator=gen)[: cfg.batch_size]  # on the CPU: stage.step moves them
        loss, _ = stage.step(rows)
        return float(loss)  # synchronise

    benchmark.pedantic(step, rounds=10 if not ON_GPU else 30, warmup_rounds=2, iterations=1)
    record(benchmark, group=f"train step {stage_name} (synthetic preset, batch {cfg.batch_size})",
           provider=f"{label}, kernels={kernels_mode}")


@pytest.mark.parametrize("nce_form", ["gather", "dense"])
def test_stage1_step_nce_forms(benchmark, record, tmp_path, monkeypatch, nce_form):
    """One stage-1 step at the paper's K = 16384 with a ~9.5k-row bank and batch 64 (synthetic preset, tiny
    encoders), the NCE loss forced to each form: before (gather, as every step ran until issue 21) and after (dense,
    what ``choose_nce_path`` picks at this shape). Both forms draw the same idx."""
    monkeypatch.setenv("CMC_FAST_KERNELS", "auto")
    monkeypatch.setenv("CMC_FAST_NCE", nce_form)
    cfg = preset("synthetic")
    cfg = dataclasses.replace(cfg, nce_k=16384, batch_size=64, synthetic_train=10600,  # the fit split keeps ~9.5k
                              data_root=os.environ.get("CMC_FAST_BENCH_DATA"))
    torch._dynamo.reset()
    tr, stage = build_stage(cfg, "stage1", str(tmp_path / "run"))
    stage.train()
    gen = torch.Generator().manual_seed(0)
    n = len(stage.train_split)

    def step():
        rows = torch.randperm(n, generator=gen)[: cfg.batch_size]
        loss, _ = stage.step(rows)
        return float(loss)

    benchmark.pedantic(step, rounds=10 if not ON_GPU else 30, warmup_rounds=2, iterations=1)
    record(benchmark, group=f"train step stage1 K=16384 N={n} batch 64 (synthetic preset)",
           provider=f"nce={nce_form}")
