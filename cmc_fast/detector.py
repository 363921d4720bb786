"""A trained detector applied to new posts: ``Detector.from_run(DIR, variant="cmc")``,
``Detector.from_bundle(DIR)`` and ``detector.predict(texts, images)``.

A detector holds the networks of one variant, as the run scored them on its test split:

    finetune-t / finetune-t-all   the text classifier                         (finetune-t.best-text.pt ...)
    finetune-v                    the image classifier
    cmc-t / cmc-v                 stage 1's text / image network at its own best epoch
    cmc                           both stage-1 networks and stage 2's BLOCK
    cmc-shared                    its text and image encoders and BLOCK, one checkpoint

Every post is scored the way ``evaluate`` scores the test split (eval mode, the run's tokenizer and max_len,
images decoded by the run's image backend at its size, argmax of the logits for the label), so ``predict`` on
the test split reproduces ``evaluate``'s metrics. A post whose image is missing or does not decode is scored
by the variant's text branch when it has a trained one (cmc: cmc-t) and says so; otherwise it is not scored.

Loading never unpickles: run checkpoints are read with ``torch.load(weights_only=True)``, bundles are
safetensors + JSON (``bundle.py``). The variants and the checkpoints their networks come from are
``variants.VARIANTS``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from cmc_fast.bundle import read_bundle
from cmc_fast.checkpoint import load_checkpoint
from cmc_fast.checkpoint_manager import CheckpointManager
from cmc_fast.config import Config, read_run_config
from cmc_fast.data_pipeline.image_files import Limits
from cmc_fast.data_pipeline.image_source import finish_batch
from cmc_fast.data_pipeline.images import decode_uint8
from cmc_fast.data_pipeline.text import VocabTokenizer, encode_texts
from cmc_fast.encoders import TextEncoder, load_text_model
from cmc_fast.errors import UsageError
from cmc_fast.models import amp_dtype, build_parts, resolve_device
from cmc_fast.variants import VARIANTS, by_row

VOCAB_FILE = "vocab.json"  # a run's tiny/ngram vocabulary (written by the trainer)


def variant_key(variant: str) -> str:
    """The variant's name, given it or its table row (``finetune-t (all posts)``)."""
    found = by_row(variant)
    if found is None:
        raise UsageError(f"--variant: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return found.name


def branch_heads_trained(cfg: Config, variant: str) -> bool:
    """Whether the text/image networks' own heads were trained: cmc-shared's are not under --shared-loss fused
    (only the fused cross-entropy reaches them), so their p(fake) would be noise."""
    return not (variant == "cmc-shared" and cfg.shared_loss == "fused")


@dataclass
class Prediction:
    """One row per post. ``label``: 1 fake, 0 real, -1 not scored. Probabilities are p(fake); NaN where a
    branch is absent, untrained, or (image) had no decodable image."""

    p_fake: np.ndarray  # float64 [n]
    label: np.ndarray  # int64 [n]
    p_fake_text: np.ndarray  # float64 [n]
    p_fake_image: np.ndarray  # float64 [n]
    scored_by: list[str | None] = field(default_factory=list)  # the model that gave p_fake
    image_error: list[str | None] = field(default_factory=list)  # why a post's image was not used

    def __len__(self) -> int:
        return len(self.label)

    @classmethod
    def concat(cls, parts: list[Prediction]) -> Prediction:
        if not parts:
            empty = np.zeros(0)
            return cls(empty, np.zeros(0, dtype=np.int64), empty.copy(), empty.copy())
        return cls(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("p_fake", "label", "p_fake_text",
                                                                                 "p_fake_image")),
                   [s for p in parts for s in p.scored_by], [e for p in parts for e in p.image_error])


# ------------------------------------------------------------------------------------------ loading
def run_tokenizer(run_dir: Path, cfg: Config) -> tuple[object, TextEncoder | None]:
    """The tokenizer the run encoded its texts with: its saved vocabulary (tiny / ngram), or the Hugging Face
    model's own (returned with the model, loaded once)."""
    if cfg.text_model not in ("tiny", "ngram"):
        encoder, tokenizer = load_text_model(cfg.text_model, cfg.text_pooling)
        return tokenizer, encoder
    if not os.path.lexists(run_dir / VOCAB_FILE):  # whatever it is, read through safe_io (a pipe: one line)
        raise UsageError(f"--run: {run_dir / VOCAB_FILE} not found; the run's vocabulary is needed to read its texts")
    return VocabTokenizer.load(run_dir / VOCAB_FILE), None


def run_variants(run_dir: Path) -> list[str]:
    """The variants whose best checkpoints are all in the run (the names the report's table uses)."""
    return [v.row for v in VARIANTS.values()
            if all(CheckpointManager(run_dir / "checkpoints", p.stage).best_path(p.head).is_file()
                   for p in v.parts.values())]


def load_run_states(run_dir: Path, variant: str) -> dict[str, dict]:
    """part -> state dict, from the run's best checkpoints, loaded without unpickling."""
    states, cache = {}, {}
    for part, where in VARIANTS[variant].parts.items():
        path = CheckpointManager(run_dir / "checkpoints", where.stage).best_path(where.head)
        if not os.path.lexists(path):
            have = run_variants(run_dir)
            raise UsageError(f"--variant {variant}: {path} not found; the run did not train this variant or has not "
                             "finished it. The run's variants: "
                             + (", ".join(have) + f" (pass --variant {have[0]})" if have else "none finished"))
        if path not in cache:
            cache[path] = load_checkpoint(path)  # pickle-free; a damaged or foreign file: one line naming it
        states[part] = cache[path]["modules"][where.module]
    return states


# ------------------------------------------------------------------------------------------ detector
class Detector:
    def __init__(self, cfg: Config, variant: str, tokenizer, parts: dict[str, nn.Module], *,
                 device: str | torch.device = "auto", source: str = ""):
        self.cfg, self.variant, self.tokenizer, self.source = cfg, variant, tokenizer, source
        self.device = resolve_device(str(device))
        self.notes: list[str] = []
        self.amp_dtype = amp_dtype(cfg, self.device, self.notes)  # as the run scored its test split
        self.parts = {k: m.to(self.device).eval() for k, m in parts.items()}
        self.text_net, self.image_net = self.parts.get("text"), self.parts.get("image")
        self.block = self.parts.get("block")
        self.branch_heads = branch_heads_trained(cfg, variant)

    # ---- loading
    @classmethod
    def from_run(cls, run_dir: str | Path, variant: str = "cmc", *, device: str = "auto") -> Detector:
        run_dir = Path(run_dir)
        cfg, key = read_run_config(run_dir, "--run"), variant_key(variant)
        states = load_run_states(run_dir, key)
        tokenizer, pretrained = run_tokenizer(run_dir, cfg)
        parts = build_parts(cfg, key, tokenizer, pretrained=pretrained)
        for part, module in parts.items():
            module.load_state_dict(states[part])
        return cls(cfg, key, tokenizer, parts, device=device, source=str(run_dir))

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, *, device: str = "auto") -> Detector:
        cfg, key, tokenizer, parts = read_bundle(Path(bundle_dir))
        return cls(cfg, key, tokenizer, parts, device=device, source=str(bundle_dir))

    # ---- scoring
    @property
    def uses_images(self) -> bool:
        return self.image_net is not None

    @property
    def text_fallback(self) -> str | None:
        """The model a post without a usable image is scored by, when the variant has one."""
        if self.image_net is None:
            return None
        if self.text_net is not None and self.branch_heads:
            return VARIANTS[self.variant].text_branch or f"{self.variant} text branch"
        return None

    def predict(self, texts, images=None, *, batch_size: int = 64) -> Prediction:
        """p(fake), label and each branch's p(fake) for ``texts`` and their ``images`` (paths; None: no image)."""
        texts = list(texts)
        images = [None] * len(texts) if images is None else list(images)
        if len(images) != len(texts):
            raise ValueError(f"images: {len(images)} given for {len(texts)} texts; pass one path (or None) per text")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        return Prediction.concat([self._predict_batch(texts[i:i + batch_size], images[i:i + batch_size])
                                  for i in range(0, len(texts), batch_size)])

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = encode_texts(texts, self.tokenizer, self.cfg.max_len)
        return ids.to(self.device), mask.to(self.device)

    def pixels(self, images: list) -> tuple[torch.Tensor, np.ndarray, dict[int, str]]:
        """The normalised images that decoded, [ok.sum(), 3, H, W] on the device (decoded where training decodes:
        the run's backend on this device, within its bounds), which decoded, and why the others did not."""
        paths = [None if p is None or p == "" else str(p) for p in images]
        res = decode_uint8(paths, tuple(self.cfg.image_size), self.cfg.image_backend, device=self.device,
                           limits=Limits(self.cfg.max_image_bytes, self.cfg.max_image_pixels))  # the run's bounds
        ok = res.ok.cpu().numpy().astype(bool)
        decoded = res.pixels.to(self.device)
        if not ok.all():  # only the decoded rows are normalised and scored
            decoded = decoded[torch.from_numpy(ok).to(self.device)]
        return finish_batch(decoded, None, train=False), ok, dict(res.errors)

    @torch.no_grad()
    def features(self, texts: list[str], images: list) -> tuple[torch.Tensor | None, torch.Tensor | None, np.ndarray]:
        """(text features, image features of the posts whose image decoded, which did) on the CPU, float32: what
        each head (and BLOCK) reads."""
        t_feat = v_feat = None
        ok = np.zeros(len(texts), dtype=bool)
        with self._autocast():
            if self.text_net is not None:
                t_feat = self.text_net(*self.encode(texts))[1].float().cpu()
            if self.image_net is not None:
                x, ok, _ = self.pixels(images)
                if ok.any():
                    v_feat = self.image_net(x)[1].float().cpu()
        return t_feat, v_feat, ok

    def _autocast(self):
        enabled = self.amp_dtype is not None
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=enabled)

    @torch.no_grad()
    def _predict_batch(self, texts: list[str], images: list) -> Prediction:
        n = len(texts)
        logits = torch.zeros(n, 2)
        p_text, p_image = np.full(n, np.nan), np.full(n, np.nan)
        ok, errors = np.zeros(n, dtype=bool), {}
        t_logits = t_feat = None
        with self._autocast():
            if self.text_net is not None:
                t_logits, t_feat = self.text_net(*self.encode(texts))
                t_logits = t_logits.float().cpu()
                if self.branch_heads:
                    p_text = torch.softmax(t_logits, 1)[:, 1].double().numpy()
            if self.image_net is not None:
                x, ok, errors = self.pixels(images)
                rows = torch.from_numpy(ok)
                if ok.any():
                    v_logits, v_feat = self.image_net(x)
                    if self.branch_heads:
                        p_image[ok] = torch.softmax(v_logits.float().cpu(), 1)[:, 1].double().numpy()
                    main = self._fuse(t_feat[rows.to(self.device)], v_feat) if self.block is not None else v_logits
                    logits[rows] = main.float().cpu()
        return self._assemble(logits, t_logits, ok, errors, p_text, p_image)

    def _fuse(self, t_feat: torch.Tensor, v_feat: torch.Tensor) -> torch.Tensor:
        """BLOCK's logits as the run computed them: stage 2 fused float32 features of its frozen networks,
        cmc-shared fuses its encoders' outputs as they come (bfloat16 under --amp)."""
        if self.variant == "cmc":
            t_feat, v_feat = t_feat.float(), v_feat.float()
        return self.block([t_feat, v_feat])

    def _assemble(self, logits, t_logits, ok, errors, p_text, p_image) -> Prediction:
        """Each post's final p(fake): the variant's own output, or its text branch's for posts without a usable
        image (when it has a trained one), or nothing."""
        n = len(ok)
        scored = ok.copy() if self.uses_images else np.ones(n, dtype=bool)
        if not self.uses_images:
            logits = t_logits
        fallback = self.text_fallback
        if fallback is not None and not ok.all():
            logits[torch.from_numpy(~ok)] = t_logits[torch.from_numpy(~ok)]
            scored[:] = True
        p = torch.softmax(logits, 1)[:, 1].double().numpy()
        label = logits.argmax(1).numpy().astype(np.int64)  # argmax, as evaluate scores
        p[~scored], label[~scored] = np.nan, -1
        scored_by = [(self.variant if (ok[i] or not self.uses_images) else fallback) if scored[i] else None
                     for i in range(n)]
        image_error = [None if (ok[i] or not self.uses_images) else errors.get(i, "no image") for i in range(n)]
        return Prediction(p, label, p_text, p_image, scored_by, image_error)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every part's weights under ``<part>.``, on the CPU, each its own contiguous tensor (safetensors stores
        no shared or strided storage; BLOCK's per-chunk views share its flat parameters)."""
        return {f"{part}.{k}": v.detach().cpu().contiguous().clone()
                for part, module in self.parts.items() for k, v in module.state_dict().items()}
