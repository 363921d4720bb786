"""A stage's checkpoints: ``<stage>.last.pt`` (everything a resume needs) and ``<stage>.best-<head>.pt`` (the
modules of each head at its best validation epoch).

Order of writes. A new best is first written beside its final name (``<stage>.best-<head>.e<epoch>.pending.pt``),
then the last checkpoint, whose record names each head's best epoch, then the pending file is renamed over the
best one. A kill before the last checkpoint leaves a pending file its record does not name (removed on resume);
a kill after it leaves one it names (renamed on resume). So the best file a run uses is always the one its
record describes.

Everything saved loads with ``torch.load(..., weights_only=True)``: tensors, dicts, lists, numbers and strings,
the random states as uint8 tensors. Loads map to the CPU first (``map_location``): a run trained on a GPU resumes
or is evaluated on a CPU-only machine, and a CUDA random state is restored only for the devices present.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from cmc_fast.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger("cmc_fast")


def capture_rng(generator: torch.Generator) -> dict:
    """The batch-order generator's state, torch's CPU state and every initialised CUDA device's state."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "cuda_rng": list(cuda)}


def restore_rng(state: dict, generator: torch.Generator) -> None:
    """The inverse of ``capture_rng``; CUDA states only for devices this machine has (a GPU run resumed on a
    CPU, or on fewer GPUs, keeps what it can)."""
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    saved = state.get("cuda_rng") or []
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, cuda_state in enumerate(saved[:present]):
        torch.cuda.set_rng_state(cuda_state, index)
    if len(saved) > present:
        log.info("resume: %d CUDA random state(s) saved, %d device(s) here; the rest are not restored",
                 len(saved), present)


class CheckpointManager:
    def __init__(self, ckpt_dir: str | Path, stage: str):
        self.dir, self.stage = Path(ckpt_dir), stage
        self.last_path = self.dir / f"{stage}.last.pt"

    def best_path(self, head: str) -> Path:
        return self.dir / f"{self.stage}.best-{head}.pt"

    def _pending_path(self, head: str, epoch: int) -> Path:
        return self.dir / f"{self.stage}.best-{head}.e{epoch}.pending.pt"

    def save(self, record: dict, new_best: dict[str, dict]) -> None:
        """Write ``record`` (must hold ``best_epoch``: head -> epoch) as the last checkpoint, and each head's
        new best state (head -> {"modules", "epoch", "val"}) in the order the module docstring gives."""
        staged = {head: self._pending_path(head, state["epoch"]) for head, state in new_best.items()}
        for head, state in new_best.items():
            if record["best_epoch"].get(head) != state["epoch"]:
                raise ValueError(f"{self.stage}: the record's best epoch of {head} is not the one being saved")
            save_checkpoint(state, staged[head])
        save_checkpoint(record, self.last_path)
        for head, path in staged.items():
            self._promote(path, head)

    def _promote(self, pending: Path, head: str) -> None:
        os.replace(pending, self.best_path(head))

    def load_last(self) -> dict | None:
        """The last checkpoint's record (on the CPU), after settling any pending best file; None without one."""
        if not self.last_path.exists():
            self._settle_pending({})
            return None
        record = load_checkpoint(self.last_path, map_location="cpu")
        self._settle_pending(record.get("best_epoch", {}))
        return record

    def _settle_pending(self, best_epoch: dict[str, int]) -> None:
        pattern = re.compile(rf"^{re.escape(self.stage)}\.best-(.+)\.e(\d+)\.pending\.pt$")
        for path in sorted(self.dir.glob(f"{self.stage}.best-*.pending.pt")):
            match = pattern.match(path.name)
            if match and best_epoch.get(match.group(1)) == int(match.group(2)):
                self._promote(path, match.group(1))
            else:
                path.unlink()

    def load_best(self, head: str, modules: dict[str, nn.Module]) -> dict:
        """Load ``head``'s best state into ``modules`` (eval mode); returns the saved {epoch, val}."""
        path = self.best_path(head)
        state = load_checkpoint(path, map_location="cpu")
        for key, module in modules.items():
            module.load_state_dict(state["modules"][key])
            module.eval()
        return {"epoch": state["epoch"], "val": state["val"]}
