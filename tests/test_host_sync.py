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

import contextlib
import math
import sys

import pytest
import torch
from tiny import tiny_config

from cmc_fast.loop import StageClock, StepLog, batches, train_epoch
from cmc_fast.stages import STAGE_VARIANT, build_stage

SYNC_METHODS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__")
NOT_A_DEVICE_SYNC = {("optimizer.py", "_get_value"), ("reference.py", "nce_partition_reference")}
STAGES = list(STAGE_VARIANT)


@contextlib.contextmanager
def counted_host_syncs():
    """Patches the sync-prone tensor methods; yields the list of (method, file:line) calls made meanwhile."""
    calls: list[tuple[str, str]] = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def counting(name):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if (caller.co_filename.rsplit("/", 1)[-1], caller.co_name) not in NOT_A_DEVICE_SYNC:
                calls.append((name, f"{caller.co_filename}:{sys._getframe(1).f_lineno}"))
            return originals[name](self, *args, **kwargs)
        return method

    try:
        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, counting(name))
        yield calls
    finally:
        for name, original in originals.items():
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
    with counted_host_syncs() as calls:
        steplog = train_epoch(stage, host_batches, {}, StageClock(), 0, first_fit_step=True)
    # reads after the first step (its time), then every log_every steps and at the end of the epoch
    assert steplog.reads <= 1 + math.ceil(steps / every)
    assert len(calls) <= steplog.reads, calls
    assert steplog.steps == steps and math.isfinite(steplog.last["loss"])


def test_the_counter_sees_a_sync():
    with counted_host_syncs() as calls:
        x = torch.ones(3)
        float(x.sum()), x.tolist(), bool(x.all())
    assert [c[0] for c in calls] == ["__float__", "tolist", "__bool__"]


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
