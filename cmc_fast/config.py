"""Run configuration: one flat dataclass, with named presets per dataset (gpt-fast style).

The ``weibo``/``politifact``/``gossipcop`` presets hold the authors' released training values (DESIGN
section 1); ``synthetic`` is sized so the whole six-variant job runs in about two minutes on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cmc_fast.errors import UsageError

VARIANTS = ("finetune-t", "finetune-v", "cmc-t", "cmc-v", "cmc-shared", "cmc")
NEGATIVES = ("uniform", "opposite-class")
SHARED_LOSSES = ("fused", "fused+distill")
DATASETS = ("synthetic", "weibo", "politifact", "gossipcop", "fakenewsnet", "manifest")


@dataclass
class Config:
    # data
    dataset: str = "synthetic"
    data_root: str | None = None
    val_fraction: float = 0.1
    # "grouped": near-duplicate posts (reposts of one story) stay on one side of the fit/validation cut, so
    # selection cannot reward memorising them; "random": a plain label-stratified split
    val_split: str = "grouped"
    # sampling weight of a training post in a near-duplicate group of size s: s^-group_sampling (0: uniform;
    # 1: every story counts once however often it was reposted, labels keep their share of the epoch)
    group_sampling: float = 0.0
    max_len: int = 250
    image_size: tuple[int, int] = (256, 128)  # (H, W), the authors' direct bicubic resize
    image_backend: str = "auto"
    image_cache: bool = True  # decode once into a memory-mapped uint8 cache; False streams from the files
    synthetic_train: int = 1200  # posts generated for --dataset synthetic
    synthetic_test: int = 400
    # models
    text_model: str = "tiny"  # "tiny" (small BERT), "ngram" (fastText-style), a local HF directory or cached hub id
    image_model: str = "vgg19"  # "tiny", "vgg19", "resnet50"
    image_weights: str | None = "imagenet"  # "imagenet" (torch cache), a .pth file, or None for random init
    tiny_text_dim: int = 128
    tiny_text_layers: int = 2
    tiny_text_dropout: float | None = None  # None: 0.1 for tiny (BERT's value), 0.3 for ngram
    # masked-LM pre-training of the tiny text model on the fit split's texts before its first stage (0: off)
    text_pretrain_epochs: int = 0
    text_pretrain_lr: float = 1e-3
    # stage 1 (mutual distillation)
    variant: str = "all"
    epochs: int = 30
    batch_size: int = 32
    text_lr: float = 2e-5  # Adam
    image_lr: float = 3e-4  # SGD
    image_momentum: float = 0.9
    image_weight_decay: float = 5e-4
    proj_dim: int = 128
    nce_k: int = 1500
    nce_t: float = 0.07
    nce_momentum: float = 0.5
    alpha: float = 0.3
    beta: float = 0.3
    negatives: str = "uniform"
    # memory banks' storage: "float32" or "bfloat16" (half the memory; updates mix and normalise in float32)
    bank_dtype: str = "float32"
    # per-step learning-rate schedule of every optimiser: "constant" (the authors'), or 6% linear warm-up then
    # "linear" / "cosine" decay to 0 at the stage's last step
    lr_schedule: str = "constant"
    # cmc-shared: "fused" (the paper's CMC-shared baseline: BLOCK over both encoders, one stage, fused CE, no
    # distillation) or "fused+distill" (adds CE_T, CE_V and both NCE terms)
    shared_loss: str = "fused"
    # stage 2 (BLOCK fusion)
    fusion_epochs: int = 30
    fusion_lr: float = 2e-5
    mm_dim: int = 256
    chunks: int = 18
    rank: int = 15
    fusion_dropout: float = 0.1
    # system
    amp: bool = False
    compile: bool = False
    device: str = "auto"
    # torch CPU threads (None: torch's default). Tiny models on a shared machine run faster with 1: two
    # OpenMP threads waiting on a descheduled sibling make small matmuls orders of magnitude slower
    threads: int | None = None
    seed: int = 0
    # training steps between reads of the loss and logs (each read is one host sync; none inside a step)
    log_every: int = 50
    out: str | None = None
    progress: bool = True

    def validate(self) -> Config:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UsageError(msg)

        need(self.dataset in DATASETS,
             f"--dataset: unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        variants = self.variants()
        need(all(v in VARIANTS for v in variants),
             f"--variant: unknown variant {self.variant!r}; choose 'all' or a comma list of {', '.join(VARIANTS)}")
        need(self.lr_schedule in ("constant", "linear", "cosine"),
             f"--lr-schedule: choose constant, linear or cosine, got {self.lr_schedule!r}")
        need(self.shared_loss in SHARED_LOSSES,
             f"--shared-loss: must be one of {', '.join(SHARED_LOSSES)}, got {self.shared_loss!r}")
        need(self.bank_dtype in ("float32", "bfloat16"),
             f"--bank-dtype: choose float32 or bfloat16, got {self.bank_dtype!r}")
        need(self.negatives in NEGATIVES, f"--negatives: must be one of {', '.join(NEGATIVES)}, got {self.negatives!r}")
        need(self.image_model in ("tiny", "vgg19", "resnet50"),
             f"--image-model: unknown model {self.image_model!r}; choose one of tiny, vgg19, resnet50")
        need(self.image_backend in ("auto", "dali", "torchvision", "pil"),
             f"--image-backend: choose one of auto, dali, torchvision, pil, got {self.image_backend!r}")
        for name in ("epochs", "fusion_epochs", "batch_size", "nce_k", "proj_dim", "mm_dim", "chunks", "rank",
                     "tiny_text_dim", "tiny_text_layers", "log_every"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        need(self.tiny_text_dropout is None or 0.0 <= self.tiny_text_dropout < 1.0,
             f"--tiny-text-dropout: must be in [0, 1), got {self.tiny_text_dropout}")
        need(self.text_pretrain_epochs >= 0, f"--text-pretrain-epochs: must be >= 0, got {self.text_pretrain_epochs}")
        need(self.text_pretrain_epochs == 0 or self.text_model == "tiny",
             f"--text-pretrain-epochs: masked-LM pre-training is for --text-model tiny, not {self.text_model!r}")
        need(self.threads is None or self.threads >= 1, f"--threads: must be >= 1, got {self.threads}")
        need(self.max_len >= 3, f"--max-len: must be >= 3, got {self.max_len}")
        need(self.val_split in ("grouped", "random"), f"--val-split: choose grouped or random, got {self.val_split!r}")
        need(0.0 <= self.group_sampling <= 1.0, f"--group-sampling: must be in [0, 1], got {self.group_sampling}")
        need(0.0 < self.val_fraction < 1.0, f"--val-fraction: must be in (0, 1), got {self.val_fraction}")
        need(self.nce_t > 0, f"--nce-t: must be > 0, got {self.nce_t}")
        need(0.0 <= self.nce_momentum < 1.0, f"--nce-momentum: must be in [0, 1), got {self.nce_momentum}")
        need(self.chunks <= self.mm_dim, f"--chunks ({self.chunks}) must not exceed --mm-dim ({self.mm_dim})")
        need(len(self.image_size) == 2 and min(self.image_size) >= 8,
             f"--image-size: need H,W >= 8, got {self.image_size}")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"--device: choose auto, cpu or cuda[:N], got {self.device!r}")
        return self

    def variants(self) -> list[str]:
        if self.variant == "all":
            return list(VARIANTS)
        return [v.strip() for v in self.variant.split(",") if v.strip()]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> Config:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise UsageError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
        values = dict(data)
        # a run directory written before grouped validation existed carved its split at random: keep it so
        values.setdefault("val_split", "random")
        # and one written before --shared-loss trained cmc-shared with the distillation terms
        values.setdefault("shared_loss", "fused+distill")
        if "image_size" in values and values["image_size"] is not None:
            values["image_size"] = tuple(values["image_size"])
        return cls(**values)

    @classmethod
    def read_overrides(cls, path: str | Path) -> dict:
        """The keys of a ``--config`` JSON file, checked against the dataclass's fields."""
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"--config: file not found: {p}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UsageError(f"--config: {p}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        if not isinstance(data, dict):
            raise UsageError(f"--config: {p}: expected a JSON object of config keys")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            valid = ", ".join(sorted(names))
            raise UsageError(f"--config: {p}: unknown key(s) {', '.join(unknown)}; valid keys: {valid}")
        if data.get("image_size") is not None:
            data["image_size"] = tuple(data["image_size"])
        return data


def _synthetic() -> dict:
    # Tiny randomly initialised encoders need far larger learning rates than fine-tuning BERT/VGG does.
    return dict(dataset="synthetic", synthetic_train=800, synthetic_test=400, text_model="tiny", image_model="tiny",
                image_weights=None, max_len=40,
                image_size=(64, 64), epochs=6, fusion_epochs=8, batch_size=32, text_lr=1e-3, image_lr=0.03,
                nce_k=256, fusion_lr=1e-3, mm_dim=128, chunks=8, rank=8, tiny_text_dim=64)


PRESETS: dict[str, dict] = {
    "synthetic": _synthetic(),
    # The authors' release for Weibo: Chinese BERT-wwm + VGG19, batch 32, 30 epochs, K = 1500.
    "weibo": dict(dataset="weibo", text_model="hfl/chinese-bert-wwm-ext", image_model="vgg19", nce_k=1500,
                  max_len=250),
    "politifact": dict(dataset="politifact", text_model="bert-base-uncased", image_model="vgg19", nce_k=1000,
                       max_len=512),
    "gossipcop": dict(dataset="gossipcop", text_model="bert-base-uncased", image_model="vgg19", nce_k=1000,
                      max_len=512),
    "fakenewsnet": dict(dataset="fakenewsnet", text_model="bert-base-uncased", image_model="vgg19", nce_k=1000,
                        max_len=512),
    "manifest": dict(dataset="manifest"),
}


def preset(dataset: str) -> Config:
    if dataset not in PRESETS:
        raise UsageError(f"--dataset: unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return Config(**PRESETS[dataset])


