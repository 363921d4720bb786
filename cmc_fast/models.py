"""Model builders: the device and precision a run uses, the classifiers, optimisers, distiller and BLOCK fusion
each stage trains. Nothing here trains; ``stages.py`` does that with what these build.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch
import torch.nn as nn

from cmc_fast import distributed
from cmc_fast.checkpoint import load_checkpoint, save_checkpoint
from cmc_fast.config import Config
from cmc_fast.data import SplitData
from cmc_fast.distill import CrossModalNCE
from cmc_fast.encoders import NgramEncoder, TextEncoder, build_image_encoder, load_text_model, tiny_text_encoder
from cmc_fast.errors import UsageError
from cmc_fast.fusion import Block
from cmc_fast.pretrain import pretrain_mlm
from cmc_fast.variants import VARIANTS

log = logging.getLogger("cmc_fast")


class Classifier(nn.Module):
    """An encoder with a linear fake/real head; returns (logits, pooled features)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.out_dim, 2)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.encoder(*inputs)
        return self.head(feat), feat


# ------------------------------------------------------------------------------------- device, precision
def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda:N`` checked against the devices present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        device = torch.device(name)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return device
    return torch.device(name)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU multiplies bfloat16 matrices in hardware: the ``amx_bf16`` flag (Intel AMX tiles) in
    /proc/cpuinfo; any other system counts as not native. AVX512-BF16 alone is not counted: a CPU with it but no
    AMX runs a tiny-BERT step several times slower under bf16 autocast than in float32."""
    if cpuinfo is None:
        if platform.system() != "Linux":
            return False
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return "amx_bf16" in flags


def amp_dtype(cfg: Config, device: torch.device, notes: list[str]) -> torch.dtype | None:
    """bfloat16 under ``--amp``, except on a CPU without native bf16 matrix units (one warning, float32)."""
    if not cfg.amp:
        return None
    if device.type == "cpu" and not cpu_has_native_bf16():
        msg = ("--amp skipped: this CPU has no native bfloat16 matrix unit (no amx_bf16 flag in /proc/cpuinfo), "
               "where bf16 autocast runs several times slower than float32; training in float32")
        log.warning(msg)
        notes.append(msg)
        return None
    return torch.bfloat16


# ----------------------------------------------------------------------------------------- builders
def scratch_text_encoder(cfg: Config, vocab_size: int) -> TextEncoder | NgramEncoder:
    """The tiny BERT or the n-gram model of ``--text-model tiny|ngram``, randomly initialised (training builds
    it, and so does a detector before loading the trained weights)."""
    if cfg.text_model == "tiny":
        dropout = 0.1 if cfg.tiny_text_dropout is None else cfg.tiny_text_dropout
        return tiny_text_encoder(vocab_size, cfg.max_len, cfg.tiny_text_dim, cfg.tiny_text_layers, dropout)
    dropout = 0.3 if cfg.tiny_text_dropout is None else cfg.tiny_text_dropout
    return NgramEncoder(vocab_size, cfg.tiny_text_dim, dropout=dropout)


def fusion_block(cfg: Config, text_dim: int, image_dim: int) -> Block:
    """The run's BLOCK fusion (two inputs, fake/real out), randomly initialised."""
    return Block([text_dim, image_dim], 2, mm_dim=cfg.mm_dim, chunks=cfg.chunks, rank=cfg.rank,
                 dropout_input=cfg.fusion_dropout)


def text_classifier(cfg: Config, tokenizer, hf_config_dir: str | None = None,
                    pretrained: TextEncoder | None = None) -> Classifier:
    """A trained run's text network, before its weights are loaded. A Hugging Face model is ``pretrained`` when
    given (a run: loaded with its tokenizer), else built from its config alone in ``hf_config_dir`` (a bundle),
    else loaded from ``cfg.text_model``."""
    if cfg.text_model in ("tiny", "ngram"):
        return Classifier(scratch_text_encoder(cfg, len(tokenizer)))
    if pretrained is not None:
        return Classifier(pretrained)
    if hf_config_dir is None:
        return Classifier(load_text_model(cfg.text_model, cfg.text_pooling)[0])
    from transformers import AutoConfig, AutoModel

    hf_cfg = AutoConfig.from_pretrained(hf_config_dir, local_files_only=True, trust_remote_code=False)
    # a run saves the pooling "auto" chose; "auto" here is a bundle written before --text-pooling: the pooler
    pooling = "pooler" if cfg.text_pooling == "auto" else cfg.text_pooling
    return Classifier(TextEncoder(AutoModel.from_config(hf_cfg, dtype=torch.float32), pooling=pooling))


def build_parts(cfg: Config, variant: str, tokenizer, hf_config_dir: str | None = None,
                pretrained: TextEncoder | None = None) -> dict[str, nn.Module]:
    """A trained variant's networks (``variants.VARIANTS[variant].parts``), before their trained weights are
    loaded: text / image classifiers and BLOCK."""
    names = VARIANTS[variant].parts
    parts: dict[str, nn.Module] = {}
    if "text" in names:
        parts["text"] = text_classifier(cfg, tokenizer, hf_config_dir, pretrained)
    if "image" in names:  # the trained weights replace ImageNet's: none are needed to build it
        parts["image"] = Classifier(build_image_encoder(cfg.image_model, None, tuple(cfg.image_size)))
    if "block" in names:
        parts["block"] = fusion_block(cfg, parts["text"].encoder.out_dim, parts["image"].encoder.out_dim)
    return parts


class ModelBuilder:
    """Builds every network, optimiser, distiller and fusion of a run on one device, from the run's prepared inputs
    (its tokenizer, its fit and validation texts on the device, a Hugging Face text model loaded up front). The tiny
    text model's masked-LM pre-training runs once per run (saved to ``checkpoints/text-mlm.pt``) and every text
    network starts from it."""

    def __init__(self, cfg: Config, device: torch.device, ckpt_dir: Path, *, tokenizer, fit_text: SplitData,
                 val_text: SplitData, pretrained_text: TextEncoder | None = None, resume: bool = False,
                 evaluate_only: bool = False, notes: list[str] | None = None):
        self.cfg, self.device, self.ckpt_dir = cfg, device, ckpt_dir
        self.tokenizer, self.fit_text, self.val_text = tokenizer, fit_text, val_text
        self.resume, self.evaluate_only = resume, evaluate_only
        self.notes = notes if notes is not None else []
        self._pretrained_text = pretrained_text  # handed to the first stage that builds a text network
        self._text_mlm_state: dict | None = None
        self.text_mlm_history: list[dict] = []

    def text_encoder(self) -> TextEncoder | NgramEncoder:
        cfg = self.cfg
        if cfg.text_model in ("tiny", "ngram"):
            encoder = scratch_text_encoder(cfg, len(self.tokenizer))
            if cfg.text_model == "tiny" and cfg.text_pretrain_epochs and not self.evaluate_only:
                encoder.model.load_state_dict(self.text_mlm(encoder))  # (evaluation loads trained weights anyway)
            return encoder
        # a fresh copy per stage: stages must not share (and silently co-train) one set of weights
        encoder, self._pretrained_text = self._pretrained_text, None
        return encoder if encoder is not None else load_text_model(cfg.text_model)[0]

    def text_mlm(self, encoder: TextEncoder) -> dict:
        """The tiny text model's weights after masked-LM pre-training on the fit texts, starting from
        ``encoder``: computed once per run and saved, so every stage and a resumed run start from the same."""
        if self._text_mlm_state is not None:
            return self._text_mlm_state
        path = self.ckpt_dir / "text-mlm.pt"
        if self.resume and path.exists():
            saved = load_checkpoint(path, map_location="cpu")
            log.info("text-mlm: pre-trained weights loaded from %s", path)
        else:
            saved = self._pretrain_text(encoder)  # every rank the same (seeded); rank 0 alone writes it
            if distributed.is_main():
                save_checkpoint(saved, path)
        self._text_mlm_state, self.text_mlm_history = saved["encoder"], saved["history"]
        return self._text_mlm_state

    def _pretrain_text(self, encoder: TextEncoder) -> dict:
        cfg, fit, val = self.cfg, self.fit_text, self.val_text  # already on the device
        model = encoder.model.to(self.device)
        cuda = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(cfg.seed)  # dropout inside: the stages' random stream stays as without it
            state, history = pretrain_mlm(model, fit.ids, fit.mask, self.tokenizer, epochs=cfg.text_pretrain_epochs,
                                          lr=cfg.text_pretrain_lr, batch_size=max(cfg.batch_size, 64), seed=cfg.seed,
                                          progress=cfg.progress, held_out=(val.ids, val.mask))
        return {"encoder": state, "history": history}

    def text_net(self) -> Classifier:
        return Classifier(self.text_encoder()).to(self.device)

    def image_net(self) -> Classifier:
        cfg = self.cfg
        return Classifier(build_image_encoder(cfg.image_model, cfg.image_weights, tuple(cfg.image_size))).to(
            self.device)

    def text_optimizer(self, params) -> torch.optim.Optimizer:
        if self.cfg.text_optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.cfg.text_lr, momentum=self.cfg.text_momentum,
                                   weight_decay=self.cfg.text_weight_decay)
        if self.cfg.text_weight_decay > 0:  # decoupled decay (AdamW), as pretrained transformers are fine-tuned
            return torch.optim.AdamW(params, lr=self.cfg.text_lr, weight_decay=self.cfg.text_weight_decay)
        return torch.optim.Adam(params, lr=self.cfg.text_lr)

    def image_optimizer(self, params) -> torch.optim.Optimizer:
        c = self.cfg
        return torch.optim.SGD(params, lr=c.image_lr, momentum=c.image_momentum, weight_decay=c.image_weight_decay)

    def fusion_optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.cfg.fusion_lr)

    def distiller(self, text_net: Classifier, image_net: Classifier, fit: SplitData) -> CrossModalNCE:
        cfg = self.cfg
        k = min(cfg.nce_k, len(fit) - 1)
        if k < cfg.nce_k and not any("nce_k lowered" in n for n in self.notes):
            note = f"nce_k lowered from {cfg.nce_k} to {k}: the bank holds {len(fit)} samples"
            self.notes.append(note)
            log.warning(note)  # on the console too (the CLI shows the toolkit's warnings)
        return CrossModalNCE(text_net.encoder.out_dim, image_net.encoder.out_dim, fit.labels, proj_dim=cfg.proj_dim,
                             k=k, tau=cfg.nce_t, momentum=cfg.nce_momentum, negatives=cfg.negatives,
                             bank_dtype=getattr(torch, cfg.bank_dtype)).to(self.device)

    def block(self, text_dim: int, image_dim: int) -> Block:
        return fusion_block(self.cfg, text_dim, image_dim).to(self.device)
