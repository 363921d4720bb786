"""Run configuration: one flat dataclass, with a named preset per dataset (gpt-fast style).

The presets live beside the datasets' readers in ``data_pipeline.registry``: the ``weibo``/``politifact``/
``gossipcop`` presets hold the authors' released training values (DESIGN section 1). A Config is validated once,
where it is assembled (the command line, a saved ``config.json``), and changed only by ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType

from cmc_fast.data_pipeline import registry, safe_io
from cmc_fast.data_pipeline.image_files import Limits
from cmc_fast.errors import UsageError
from cmc_fast.variants import CHOICES as VARIANT_CHOICES

NEGATIVES = ("uniform", "opposite-class")
SHARED_LOSSES = ("fused", "fused+distill")
DATASETS = tuple(registry.DATASETS)


def option(default, help: str = "", *, choices: tuple[str, ...] | None = None, flag: str | None = None,
           metavar: str | None = None, cli: bool = True):
    """A Config field and its command-line flag, defined once: ``help`` and ``choices`` are what ``--help`` shows
    and what ``validate`` checks; ``flag`` renames the flag (default ``--field-name``, ``--no-field-name`` for a
    boolean that defaults to True); ``cli=False`` keeps a field off the command line."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "flag": flag,
                                                        "metavar": metavar, "cli": cli})


def config_flag(f: dataclasses.Field) -> str:
    """The command-line flag of a Config field: its metadata's, ``--no-x`` for a boolean x that defaults to True,
    else ``--x`` (underscores as dashes)."""
    name = f.name.replace("_", "-")
    return f.metadata.get("flag") or (f"--no-{name}" if f.default is True else f"--{name}")


TEXT_POOLINGS = ("auto", "pooler", "mean", "cls")


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = option("synthetic", "the dataset (picks its preset)", choices=DATASETS)
    data_root: str | None = option(None, "dataset directory (synthetic: where to generate it)", metavar="DIR")
    val_fraction: float = option(0.1, "share of the training set carved out for validation")
    val_split: str = option("grouped", "grouped: near-duplicate posts (reposts of one story) stay on one side of the "
                            "fit/validation cut, so selection cannot reward memorising them; random: a plain "
                            "label-stratified split", choices=("grouped", "random"))
    group_sampling: float = option(0.0, "sample a training post of a near-duplicate group of size s with weight "
                                   "s^-P (0: uniform; 1: every story counts once, labels keep their share)",
                                   metavar="P")
    max_len: int = option(250, "text tokens kept (head + tail)")
    image_size: tuple[int, int] = option((256, 128), "H,W of the training images (the authors' direct bicubic "
                                         "resize)", metavar="H,W")
    image_backend: str = option("auto", "image decoder", choices=("auto", "dali", "torchvision", "pil"))
    image_cache: bool = option(True, "decode images from the files every epoch instead of once into the uint8 "
                               "cache", flag="--image-stream")
    # image files are read only when regular and within these bounds, by every backend alike (image_files.py)
    max_image_bytes: int = option(64 << 20, "image files larger than N bytes are skipped and reported (default "
                                  "64 MiB)", metavar="N")
    max_image_pixels: int = option(40_000_000, "images whose header declares more than N pixels are skipped and "
                                   "reported before decoding (default 40 million)", metavar="N")
    synthetic_train: int = option(1200, "posts generated for --dataset synthetic (training)", cli=False)
    synthetic_test: int = option(400, "posts generated for --dataset synthetic (test)", cli=False)
    # models
    text_model: str = option("tiny", "tiny (small BERT), ngram (fastText-style bag of n-grams), a local Hugging Face "
                             "directory, or a cached hub id")
    text_pooling: str = option("auto", "how a Hugging Face text model's token states become one vector: auto (the "
                               "pooling a sentence-transformers checkpoint declares, e.g. all-MiniLM-L6-v2's mean; "
                               "otherwise BERT's pooler output, as the paper), pooler, mean (masked mean) or cls (the "
                               "first token's state); a run saves what auto chose", choices=TEXT_POOLINGS)
    image_model: str = option("vgg19", "image network (tiny implies --image-weights none)",
                              choices=("tiny", "vgg19", "resnet50"))
    image_weights: str | None = option("imagenet", "imagenet (torch cache), a .pth file, or none")
    tiny_text_dim: int = option(128, "width of the tiny / ngram text model")
    tiny_text_layers: int = option(2, "layers of the tiny text model")
    tiny_text_dropout: float | None = option(None, "dropout of the tiny / ngram text model (default 0.1 / 0.3)")
    text_pretrain_epochs: int = option(0, "masked-LM pre-training of the tiny text model on the training texts "
                                       "first (0: off)")
    text_pretrain_lr: float = option(1e-3, "AdamW learning rate of that pre-training")
    # stage 1 (mutual distillation)
    variant: str = option("all", f"'all' or a comma list of {', '.join(VARIANT_CHOICES)}")
    epochs: int = option(30, "stage-1 (and single-modality, cmc-shared) epochs")
    batch_size: int = option(32, "training batch size")
    text_lr: float = option(2e-5, "text network learning rate")
    image_lr: float = option(3e-4, "image network learning rate (SGD)")
    image_momentum: float = option(0.9, "image network SGD momentum")
    image_weight_decay: float = option(5e-4, "image network SGD weight decay")
    proj_dim: int = option(128, "dimension of the NCE projections phi1/phi2")
    nce_k: int = option(1500, "negatives per anchor")
    nce_t: float = option(0.07, "NCE temperature tau")
    nce_momentum: float = option(0.5, "memory-bank momentum")
    alpha: float = option(0.3, "weight of L_{V->T} in the text objective")
    beta: float = option(0.3, "weight of L_{T->V} in the image objective")
    negatives: str = option("uniform", "uniform over all posts (the paper) or from the other class (the authors' "
                            "code; noise prior K/N_other)", choices=NEGATIVES)
    bank_dtype: str = option("float32", "memory banks' storage: bfloat16 halves their memory (updates mix and "
                             "normalise in float32)", choices=("float32", "bfloat16"))
    lr_schedule: str = option("constant", "per-step learning rate of every optimiser: constant (the authors'), or "
                              "linear warm-up (--warmup) then linear / cosine decay to 0",
                              choices=("constant", "linear", "cosine"))
    warmup: float = option(0.06, "share of a stage's optimiser steps spent warming the learning rate up (linear and "
                           "cosine schedules)")
    text_weight_decay: float = option(0.0, "text network weight decay (Adam: AdamW's decoupled decay when > 0; "
                                      "SGD: L2)")
    text_optimizer: str = option("adam", "text network optimiser: adam, or sgd with --text-momentum (fastText's: on a "
                                 "bag of n-grams Adam's per-weight step gives a rare n-gram the step of a common one)",
                                 choices=("adam", "sgd"))
    text_momentum: float = option(0.9, "text network SGD momentum (--text-optimizer sgd)")
    min_steps: int = option(0, "minimum optimiser steps of each stage: its epochs are raised to reach them (small "
                            "data sets get enough updates)")
    max_epochs: int = option(0, "the most epochs --min-steps may raise a stage to (0: no cap): on a few hundred "
                             "posts the minimum steps would otherwise be tens of passes over the same posts",
                             metavar="N")
    patience: int = option(0, "stop a stage after N epochs without a better validation score on any head (0: run "
                           "every epoch)", metavar="N")
    select_metric: str = option("accuracy", "validation metric that picks each head's checkpoint and drives "
                                "--patience", choices=("accuracy", "macro-f1", "auc"))
    select_min_val: int = option(100, "a validation split of fewer posts keeps each stage's last epoch instead of "
                                 "choosing one on it (--patience is then off): one post moves its accuracy by more "
                                 "than 1%%, and the best of a few epochs on so few posts is the luckiest (0: always "
                                 "choose)", metavar="N")
    class_weights: str = option("auto", "weight the cross-entropy by inverse class frequency of the fit split: "
                                "balanced, none, or auto (balanced when the rarer class is under 40%% of the fit "
                                "posts)", choices=("auto", "balanced", "none"))
    recipe: str = option("auto", "auto: learning rate, schedule, epochs and minimum steps chosen for the encoder "
                         "kinds (flags you give win); none: the dataset preset and the defaults only",
                         choices=("auto", "none"))
    baseline: bool = option(True, "no TF-IDF + logistic-regression baseline row (needs scikit-learn)")
    shared_loss: str = option("fused", "cmc-shared: fused (the paper's CMC-shared baseline: BLOCK over both "
                              "encoders, one stage, fused CE, no distillation) or fused+distill (adds CE_T, CE_V and "
                              "both NCE terms)", choices=SHARED_LOSSES)
    # stage 2 (BLOCK fusion)
    fusion_epochs: int = option(30, "stage-2 (BLOCK) epochs")
    fusion_lr: float = option(2e-5, "BLOCK learning rate (Adam)")
    mm_dim: int = option(256, "BLOCK's multimodal dimension")
    chunks: int = option(18, "BLOCK chunks")
    rank: int = option(15, "BLOCK rank")
    fusion_dropout: float = option(0.1, "BLOCK input dropout")
    # system
    amp: bool = option(False, "bfloat16 autocast (the NCE loss stays float32); skipped with a warning on a CPU "
                       "without AMX-BF16")
    compile: bool = option(False, "torch.compile each stage's forward + loss")
    device: str = option("auto", "auto, cpu or cuda[:N]")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice). Tiny models on a shared machine "
                                 "run faster with 1")
    seed: int = option(0, "random seed (data split, initialisation, batches)")
    log_every: int = option(50, "training steps between reads of the loss and logs (one host sync each; none "
                            "inside a step)")
    out: str | None = option(None, "run directory (default runs/<dataset>-<time>)", metavar="DIR")
    progress: bool = option(True, "no progress bars")

    def validate(self) -> Config:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UsageError(msg)

        check_types(asdict(self), "--")
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            need(choices is None or value in choices,
                 f"--{f.name.replace('_', '-')}: must be one of {', '.join(choices or ())}, got {value!r}")
        variants = self.variants()
        need(all(v in VARIANT_CHOICES for v in variants),
             f"--variant: unknown variant {self.variant!r}; choose 'all' or a comma list of "
             f"{', '.join(VARIANT_CHOICES)}")
        need(0.0 <= self.warmup < 1.0, f"--warmup: must be in [0, 1), got {self.warmup}")
        need(0.0 <= self.text_weight_decay < math.inf, f"--text-weight-decay: must be >= 0, got "
             f"{self.text_weight_decay}")
        need(0.0 <= self.text_momentum < 1.0, f"--text-momentum: must be in [0, 1), got {self.text_momentum}")
        for name in ("min_steps", "max_epochs", "patience", "select_min_val"):
            need(getattr(self, name) >= 0, f"--{_flag(name)}: must be >= 0, got {getattr(self, name)}")
        for name in ("epochs", "fusion_epochs", "batch_size", "nce_k", "proj_dim", "mm_dim", "chunks", "rank",
                     "tiny_text_dim", "tiny_text_layers", "log_every"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        need(self.tiny_text_dropout is None or 0.0 <= self.tiny_text_dropout < 1.0,
             f"--tiny-text-dropout: must be in [0, 1), got {self.tiny_text_dropout}")
        need(self.text_pretrain_epochs >= 0, f"--text-pretrain-epochs: must be >= 0, got {self.text_pretrain_epochs}")
        need(self.text_pretrain_epochs == 0 or self.text_model == "tiny",
             f"--text-pretrain-epochs: masked-LM pre-training is for --text-model tiny, not {self.text_model!r}")
        for name in ("text_lr", "image_lr", "fusion_lr", "text_pretrain_lr"):
            need(0.0 < getattr(self, name) < math.inf, f"--{_flag(name)}: must be a positive number, got "
                 f"{getattr(self, name)}")
        for name in ("alpha", "beta"):
            need(0.0 <= getattr(self, name) < math.inf, f"--{name}: must be >= 0, got {getattr(self, name)}")
        need(self.seed >= 0, f"--seed: must be >= 0, got {self.seed}")
        try:
            Limits(self.max_image_bytes, self.max_image_pixels)  # the image-limits gate; its error names the flag
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        need(self.threads is None or self.threads >= 1, f"--threads: must be >= 1, got {self.threads}")
        need(self.max_len >= 3, f"--max-len: must be >= 3, got {self.max_len}")
        need(0.0 <= self.group_sampling <= 1.0, f"--group-sampling: must be in [0, 1], got {self.group_sampling}")
        need(0.0 < self.val_fraction < 1.0, f"--val-fraction: must be in (0, 1), got {self.val_fraction}")
        need(self.nce_t > 0, f"--nce-t: must be > 0, got {self.nce_t}")
        need(0.0 <= self.nce_momentum < 1.0, f"--nce-momentum: must be in [0, 1), got {self.nce_momentum}")
        need(self.chunks <= self.mm_dim, f"--chunks ({self.chunks}) must not exceed --mm-dim ({self.mm_dim})")
        need(len(self.image_size) == 2 and min(self.image_size) >= 8,
             f"--image-size: need H,W >= 8, got {self.image_size}")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"--device: choose auto, cpu or cuda[:N], got {self.device!r}")
        need(self.synthetic_train >= 4 and self.synthetic_test >= 2,
             f"--synthetic-n: need at least 4 training and 2 test posts, got {self.synthetic_train},"
             f"{self.synthetic_test}")
        self._check_upper_bounds(need)
        return self

    def _check_upper_bounds(self, need) -> None:
        """Sizes a file or a flag may ask for, bounded before anything is allocated (``UPPER_BOUNDS``), the image
        batch within a quarter of this machine's memory, and ``--threads`` within its cores."""
        for name, most in UPPER_BOUNDS.items():
            need(getattr(self, name) <= most, f"--{_flag(name)}: must be <= {most}, got {getattr(self, name)}")
        need(max(self.image_size) <= MAX_IMAGE_SIDE,
             f"--image-size: each side must be <= {MAX_IMAGE_SIDE}, got {self.image_size}")
        batch_bytes = self.batch_size * 3 * self.image_size[0] * self.image_size[1] * 4
        memory = machine_memory()
        need(memory is None or batch_bytes <= memory // 4,
             f"--image-size {self.image_size[0]},{self.image_size[1]} at --batch-size {self.batch_size}: one float32 "
             f"image batch takes {batch_bytes >> 20} MiB, over a quarter of this machine's "
             f"{(memory or 0) >> 20} MiB; use smaller images or batches")
        need(self.threads is None or self.threads <= usable_cores(),
             f"--threads: must be <= the {usable_cores()} cores this process may use, got {self.threads}")

    def variants(self) -> list[str]:
        if self.variant == "all":
            return list(VARIANT_CHOICES)
        return [v.strip() for v in self.variant.split(",") if v.strip()]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config", *, validate: bool = True) -> Config:
        """A configuration from a JSON object (a run's or bundle's ``config.json``, a ``--config`` file): keys and
        types checked, then (``validate``) every value as ``train`` checks its flags, before anything is built.
        A saved ``threads`` over this machine's cores is lowered to them (where a run runs, not what it trains)."""
        if not isinstance(data, dict):
            raise UsageError(f"{source}: expected a JSON object of config keys")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise UsageError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
        check_types(data, f"{source}: key ")
        values = dict(data)
        if values.get("image_size") is not None:
            values["image_size"] = tuple(values["image_size"])
        if validate and isinstance(values.get("threads"), int) and values["threads"] > usable_cores():
            values["threads"] = usable_cores()
        cfg = cls(**values)
        if not validate:
            return cfg
        try:
            return cfg.validate()
        except UsageError as exc:
            raise UsageError(f"{source}: {exc}") from None

    @classmethod
    def read_overrides(cls, path: str | Path) -> dict:
        """The keys of a ``--config`` JSON file, checked against the dataclass's fields (names and types)."""
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"--config: file not found: {p}")
        data = read_json_object(p, "--config", "config keys")
        cls.from_dict(data, source=f"--config: {p}", validate=False)  # names and types; values once merged
        if data.get("image_size") is not None:
            data["image_size"] = tuple(data["image_size"])
        return data


def read_json_object(path: Path, flag: str, what: str) -> dict:
    """The JSON object in ``path``; a file that cannot be read, is not JSON or not an object ends in a UsageError
    naming ``flag`` and the file (with the line of a JSON error)."""
    try:  # a regular file within safe_io's JSON limit: a pipe, a device or a bomb is refused unread
        data = safe_io.read_json(path)
    except safe_io.FileRefused as exc:
        raise UsageError(f"{flag}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{flag}: {path}: expected a JSON object of {what}")
    return data


def read_run_config(run_dir: str | Path, flag: str, *, resume: bool = False) -> Config:
    """A run directory's saved configuration (``train --resume``, ``evaluate``, ``predict``, ``tsne``), validated
    as ``train`` validates its own. Only ``--resume`` continues the run's writing: for the others (which read a
    run) the synthetic set is regenerated under the cache (it is deterministic in its settings), never in the
    ``data_root`` the file names, which may be any folder of the user's."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not os.path.lexists(path):
        raise UsageError(f"{flag}: {run_dir} is not a cmc-fast run directory (no config.json)")
    saved = read_json_object(path, flag, "config keys")
    # runs saved before --text-pooling pooled a Hugging Face model by its pooler output, whatever it declares
    saved.setdefault("text_pooling", "pooler")
    cfg = Config.from_dict(saved, source=f"{flag}: {path}")
    if cfg.dataset == "synthetic" and not resume:
        return dataclasses.replace(cfg, data_root=None)
    return cfg


# the largest value of each size a configuration may ask for: far above any real use (the authors' BERT takes 512
# tokens, BLOCK's mm_dim is 1000 in the paper), far below what would exhaust memory before a check could say so
UPPER_BOUNDS = {"max_len": 8192, "tiny_text_dim": 4096, "tiny_text_layers": 64, "proj_dim": 4096, "mm_dim": 16384,
                "chunks": 1024, "rank": 1024, "nce_k": 1 << 20, "batch_size": 1 << 16, "epochs": 100_000,
                "fusion_epochs": 100_000, "text_pretrain_epochs": 100_000, "log_every": 1 << 30, "seed": 2**32 - 1,
                "synthetic_train": 1_000_000, "synthetic_test": 1_000_000, "max_image_bytes": 4 << 30,
                "max_image_pixels": 1 << 30}
MAX_IMAGE_SIDE = 4096


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def machine_memory() -> int | None:
    """Physical memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _type_ok(value: object, kind: object) -> bool:
    """``value`` fits the field annotation ``kind`` (JSON's view: a list is a tuple, an int is a float, a bool is
    neither)."""
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple:
        return (isinstance(value, (list, tuple)) and len(value) == len(args)
                and all(_type_ok(v, a) for v, a in zip(value, args, strict=True)))
    if args:  # a union such as int | None
        return any(_type_ok(value, a) for a in args)
    return True


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def _describe(kind: object) -> str:
    if kind in _TYPE_WORDS:
        return _TYPE_WORDS[kind]
    if typing.get_origin(kind) is tuple:
        return f"a list of {len(typing.get_args(kind))} integers, e.g. [256, 128]"
    return " or ".join(_describe(a) for a in typing.get_args(kind)) or str(kind)


def check_types(values: dict, prefix: str) -> None:
    """Raise ``UsageError`` naming the first key whose value does not have its field's type (``"3"`` for an
    int, ``64`` for a pair, ``1.5`` for an int)."""
    hints = typing.get_type_hints(Config)
    for name, value in values.items():
        kind = hints.get(name)
        if kind is None or _type_ok(value, kind):
            continue
        where = f"--{_flag(name)}" if prefix == "--" else f"{prefix}{name!r}"
        shown = json.dumps(value) if _jsonable(value) else repr(value)
        raise UsageError(f"{where}: must be {_describe(kind)}, got {shown}")


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# dataset -> its preset's values (``registry.DATASETS``' own, read-only)
PRESETS = MappingProxyType({name: entry.preset for name, entry in registry.DATASETS.items()})


def preset(dataset: str) -> Config:
    if dataset not in PRESETS:
        raise UsageError(f"--dataset: unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return Config(**PRESETS[dataset])
