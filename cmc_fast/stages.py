"""Build one training stage of a configured run without training it: what the profiler and the step
benchmarks drive, so they time exactly the step the trainer runs."""

from __future__ import annotations

import tempfile

from cmc_fast.config import Config
from cmc_fast.trainer import Stage, Trainer

STAGE_VARIANT = {"finetune-t": "finetune-t", "finetune-v": "finetune-v", "stage1": "cmc-t", "stage2": "cmc",
                 "cmc-shared": "cmc-shared"}


def build_stage(cfg: Config, stage: str, run_dir: str | None = None) -> tuple[Trainer, Stage]:
    """(trainer, stage) for ``stage`` in STAGE_VARIANT; stage2 gets freshly initialised (untrained) encoders."""
    if stage not in STAGE_VARIANT:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGE_VARIANT)}")
    cfg.variant, cfg.progress = STAGE_VARIANT[stage], False
    tr = Trainer(cfg, run_dir or tempfile.mkdtemp(prefix="cmc-stage-"))
    tr._setup()
    if stage in ("finetune-t", "finetune-v"):
        return tr, tr.finetune_stage("text" if stage == "finetune-t" else "image")
    if stage == "stage1":
        return tr, tr.stage1_stage()
    if stage == "stage2":
        return tr, tr.stage2_stage(tr._text_net(), tr._image_net())
    return tr, tr.shared_stage()
