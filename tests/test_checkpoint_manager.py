"""The checkpoint manager: the order of writes (a kill never leaves a best file its record does not describe),
loads without pickle, and random states restored only for the CUDA devices present."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from cmc_fast import checkpoint_manager
from cmc_fast.checkpoint_manager import CheckpointManager, capture_rng, restore_rng


def _epoch(manager: CheckpointManager, net: nn.Module, epoch: int, best_epoch: int | None) -> None:
    with torch.no_grad():
        net.weight.fill_(float(epoch))  # the weights say which epoch they are from
    record = {"modules": {"net": net.state_dict()}, "epoch": epoch, "best_epoch": {"head": best_epoch or 1}}
    new_best = {} if best_epoch != epoch else {"head": {"modules": {"net": net.state_dict()}, "epoch": epoch,
                                                        "val": {"accuracy": 0.5}}}
    manager.save(record, new_best)


def _best_weight(manager: CheckpointManager) -> float:
    net = nn.Linear(2, 2)
    manager.load_best("head", {"net": net})
    return float(net.weight[0, 0].detach())


def test_a_kill_before_the_last_checkpoint_drops_the_new_best(tmp_path, monkeypatch):
    manager, net = CheckpointManager(tmp_path, "s"), nn.Linear(2, 2)
    _epoch(manager, net, 1, 1)
    real_save = checkpoint_manager.save_checkpoint

    def killed_before_last(state, path):
        if path.name == "s.last.pt":
            raise KeyboardInterrupt
        real_save(state, path)

    monkeypatch.setattr(checkpoint_manager, "save_checkpoint", killed_before_last)
    with pytest.raises(KeyboardInterrupt):
        _epoch(manager, net, 2, 2)
    assert list(tmp_path.glob("*.pending.pt"))  # the new best was staged
    record = manager.load_last()
    assert record["epoch"] == 1 and record["best_epoch"] == {"head": 1}
    assert not list(tmp_path.glob("*.pending.pt"))
    assert _best_weight(manager) == 1.0  # the best the record describes


def test_a_kill_after_the_last_checkpoint_keeps_the_new_best(tmp_path, monkeypatch):
    manager, net = CheckpointManager(tmp_path, "s"), nn.Linear(2, 2)
    _epoch(manager, net, 1, 1)
    real_promote = CheckpointManager._promote

    def killed_before_rename(self, pending, head):
        raise KeyboardInterrupt

    monkeypatch.setattr(CheckpointManager, "_promote", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        _epoch(manager, net, 2, 2)
    monkeypatch.setattr(CheckpointManager, "_promote", real_promote)
    assert _best_weight(manager) == 1.0  # not renamed yet ...
    record = manager.load_last()
    assert record["epoch"] == 2 and record["best_epoch"] == {"head": 2}
    assert _best_weight(manager) == 2.0  # ... and settled by the next load
    assert not list(tmp_path.glob("*.pending.pt"))


def test_every_saved_file_loads_with_weights_only(tmp_path):
    manager, net = CheckpointManager(tmp_path, "s"), nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(3, 2)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    record = {"modules": {"net": net.state_dict()}, "optimizers": {"o": opt.state_dict()},
              "schedulers": {"o": sched.state_dict()}, "epoch": 1, "best_epoch": {"head": 1},
              "rng": capture_rng(torch.Generator().manual_seed(3)), "history": [{"epoch": 1, "train_loss": 0.5}]}
    manager.save(record, {"head": {"modules": {"net": net.state_dict()}, "epoch": 1, "val": {"accuracy": 1.0}}})
    for path in tmp_path.iterdir():
        torch.load(path, weights_only=True)


def test_cuda_random_states_restored_only_for_devices_present(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    state = capture_rng(gen)
    state["cuda_rng"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]  # a 2-GPU run
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append(i))
    expected = torch.randn(4, generator=gen)
    restore_rng(state, gen)
    assert restored == [0]
    assert torch.equal(torch.randn(4, generator=gen), expected)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # a CPU-only machine
    restored.clear()
    restore_rng(state, gen)
    assert restored == []
