"""No host sync inside a training step: every stage's steps, run through ``loop.train_epoch``, read their logs
from the device once per log interval and otherwise never wait for it.

On a CPU the test counts Python calls of the methods that sync a CUDA device (``.item()``, ``float()``,
``int()``, ``bool()``, ``.tolist()``, ``.cpu()`` on tensors), whoever makes them (our code, transformers,
torch), with two exceptions that never reach a GPU: torch's optimisers reading their step counter (a CPU tensor
by torch's design, on every device) and the kernels' CPU reference of the first-batch Z (on CUDA the Triton
op keeps Z on the device). On CUDA the same steps run under ``torch.cuda.set_sync_debug_mode("error")``, which
also catches syncs made inside C++.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from tiny import tiny_config

from cmc_fast.loop import StageClock, StepLog, batches, train_epoch
from cmc_fast.trainer import build_stage
from cmc_fast.variants import STAGE_VARIANT

SYNC_METHODS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__")
NOT_A_DEVICE_SYNC = {("optimizer.py", "_get_value"), ("reference.py", "nce_partition_reference")}
STAGES = list(STAGE_VARIANT)


class SyncCounter:
    """Patches the sync-prone tensor methods; ``calls`` lists (method, file:line) of the calls made meanwhile,
    ``start_calls`` those made inside a stage's on_fit_start (the once-per-stage first-batch Z)."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.start_calls: list[tuple[str, str]] = []
        self.in_start = False
        self._originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def _counting(self, name):
        original = self._originals[name]

        def method(tensor, *args, **kwargs):
            frame = sys._getframe(1)
            if (frame.f_code.co_filename.rsplit("/", 1)[-1], frame.f_code.co_name) not in NOT_A_DEVICE_SYNC:
                where = self.start_calls if self.in_start else self.calls
                where.append((name, f"{frame.f_code.co_filename}:{frame.f_lineno}"))
            return original(tensor, *args, **kwargs)
        return method

    def watch_start(self, stage) -> None:
        hook = stage.on_fit_start

        def on_fit_start(batch):
            self.in_start = True
            try:
                hook(batch)
            finally:
                self.in_start = False
        stage.on_fit_start = on_fit_start

    def __enter__(self):
        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, self._counting(name))
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)


def _epoch_of(stage_name: str, tmp_path, device: str, log_every: int = 4):
    cfg = tiny_config(tmp_path, batch_size=8, log_every=log_every, device=device)
    _, stage = build_stage(cfg, stage_name, str(tmp_path / "run"))
    host_batches = batches(len(stage.train_split), cfg.batch_size, shuffle=True,
                           generator=torch.Generator().manual_seed(0), drop_last=True)
    return stage, host_batches


@pytest.mark.parametrize("stage_name", STAGES)
def test_training_steps_sync_at_most_once_per_log_interval(stage_name, tmp_path):
    stage, host_batches = _epoch_of(stage_name, tmp_path, "cpu")
    steps, every = len(host_batches), stage.cfg.log_every
    assert steps >= 2 * every  # several intervals, so a per-step sync would show
    with SyncCounter() as counter:
        counter.watch_start(stage)
        steplog = train_epoch(stage, host_batches, {}, StageClock(), 0, first_fit_step=True)
    # reads after the first step (its time), then every log_every steps and at the end of the epoch
    assert steplog.reads <= 1 + math.ceil(steps / every)
    assert len(counter.calls) <= steplog.reads, counter.calls
    assert steplog.steps == steps and math.isfinite(steplog.last["loss"])
    # the first-batch Z (stage 1, cmc-shared with distillation) stays on the device too
    assert not counter.start_calls, counter.start_calls


def test_the_counter_sees_a_sync():
    with SyncCounter() as counter:
        x = torch.ones(3)
        float(x.sum()), x.tolist(), bool(x.all())
    assert [c[0] for c in counter.calls] == ["__float__", "tolist", "__bool__"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (sync debug mode)")
@pytest.mark.parametrize("stage_name", STAGES)
def test_training_steps_do_not_sync_a_cuda_device(stage_name, tmp_path, monkeypatch):
    stage, host_batches = _epoch_of(stage_name, tmp_path, "cuda", log_every=4)
    # warm up (lazy CUDA init, cuBLAS handles, Triton compiles and autotuning) outside the checked steps
    train_epoch(stage, host_batches[:2], {}, StageClock(), 0, first_fit_step=True)
    torch.cuda.synchronize()
    real_read = StepLog.read

    def read_outside_debug_mode(self):  # the log read is the one sync allowed: lift the check around it
        torch.cuda.set_sync_debug_mode("default")
        try:
            return real_read(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(StepLog, "read", read_outside_debug_mode)
    torch.cuda.set_sync_debug_mode("error")
    try:
        steplog = train_epoch(stage, host_batches[2:], {}, StageClock(), 1, first_fit_step=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert steplog.reads <= 1 + math.ceil(steplog.steps / stage.cfg.log_every)
