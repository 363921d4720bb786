"""The training stages of CMC, one class each, with the hooks ``fit`` (loop.py) calls:

    on_fit_start(batch)        once, on the first batch of a fit that starts at epoch 0 (stage 1: Z)
    loss(rows, pixels)         one batch's loss and its logs, all on the device (compiled under --compile)
    training_step(batch)       zero_grad, loss, backward, optimiser steps; no host sync
    head_logits(split, batch)  {head: logits}; ``evaluate`` scores every head on a split
    heads                      {head: the modules its best-on-validation checkpoint restores}

    FinetuneStage   finetune-t / finetune-v   one network, cross-entropy only
    MutualStage     stage 1 (cmc-t, cmc-v)    L_T = CE_T + alpha L_{V->T}, L_V = CE_V + beta L_{T->V}
    FusionStage     stage 2 (cmc)             both networks frozen, BLOCK trained on their features
    SharedStage     cmc-shared                encoders and BLOCK trained jointly in one stage

``trainer.build_stage`` builds one of them for a configured run without training it: what the profiler and the
step benchmarks drive, so they time exactly the step the trainer runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cmc_fast import distributed
from cmc_fast.config import Config
from cmc_fast.data import SplitData
from cmc_fast.metrics import classification_metrics, roc_curve, selection_rule
from cmc_fast.models import Classifier, ModelBuilder


@dataclass(frozen=True)
class StageContext:
    """What every stage shares, assembled once the run's data is ready: the configuration, the device, the
    autocast dtype (None: float32) and the builders."""

    cfg: Config
    device: torch.device
    amp_dtype: torch.dtype | None
    build: ModelBuilder

    def autocast(self):
        enabled = self.amp_dtype is not None
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=enabled)

    def maybe_compile(self, fn: Callable) -> Callable:
        return torch.compile(fn) if self.cfg.compile else fn


@dataclass
class Batch:
    rows: torch.Tensor  # int64 [b]: rows of the split, on the training device (ids, labels, bank slots)
    host_rows: torch.Tensor  # int64 [b]: the same rows on the CPU (the image cache gathers there)
    pixels: torch.Tensor | None = None  # float [b, 3, H, W] on the device, for stages that see images


def eval_batches(n: int, batch_size: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(host rows, device rows) in order, for scoring: one copy of all row indices to the device."""
    host = torch.arange(n)
    return list(zip(host.split(batch_size), host.to(device).split(batch_size)))


class Stage:
    """What a stage trains (``modules``, ``optimizers``), on which splits, for how many epochs, and its hooks (module
    docstring). ``heads`` names each scored output once: head -> the modules its best checkpoint restores."""

    name: str = "stage"
    uses_images: bool = False
    log_names: tuple[str, ...] = ()  # the logs ``loss`` returns beside the loss

    def __init__(self, ctx: StageContext, splits: dict[str, SplitData], epochs: int):
        self.ctx, self.cfg, self.device = ctx, ctx.cfg, ctx.device
        self.train_split, self.val_split, self.test_split = splits["fit"], splits["val"], splits["test"]
        self.epochs = planned_epochs(epochs, len(self.train_split), ctx.cfg.batch_size, ctx.cfg.min_steps,
                                     ctx.cfg.max_epochs)
        self.class_weight = class_weight(ctx.cfg.class_weights, self.train_split.labels)
        # --select-metric, or "last" where the validation split is too small to choose an epoch on
        self.selection = selection_rule(ctx.cfg.select_metric, ctx.cfg.select_min_val, len(self.val_split))
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.heads: dict[str, tuple[str, ...]] = {}
        self._compiled_loss: Callable | None = None
        self._started = False  # whether ``step`` has run on_fit_start
        self.scores: dict[str, dict] = {}  # head -> test p(fake), pred, label (``evaluate(keep_scores=True)``)

    # ---- hooks a stage overrides
    def on_fit_start(self, batch: Batch) -> None:
        """Once, on the first batch of a fit that starts at epoch 0, before its training step."""

    def loss(self, rows: torch.Tensor, pixels: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def head_logits(self, split: SplitData, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ---- shared machinery
    def batch(self, split: SplitData, host_rows: torch.Tensor, rows: torch.Tensor, *, train: bool) -> Batch:
        pixels = split.pixels(host_rows, train=train, device=self.device) if self.uses_images else None
        return Batch(rows, host_rows, pixels)

    def training_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimiser step on ``batch``; returns the detached loss and logs, still on the device."""
        if self._compiled_loss is None:
            self._compiled_loss = self.ctx.maybe_compile(self.loss)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss, logs = self._compiled_loss(batch.rows, batch.pixels)
        loss.backward()
        for opt in self.optimizers.values():
            opt.step()
        return loss.detach(), logs

    def step(self, host_rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A training step on rows given on the CPU, the first one preceded by ``on_fit_start`` (benchmarks and
        the profiler; ``fit`` calls the hooks itself)."""
        batch = self.batch(self.train_split, host_rows, host_rows.to(self.device), train=True)
        if not self._started:
            self.on_fit_start(batch)
            self._started = True
        return self.training_step(batch)

    def train(self) -> None:
        for mod in self.modules.values():
            mod.train()

    def eval(self) -> None:
        for mod in self.modules.values():
            mod.eval()

    @torch.no_grad()
    def evaluate(self, split: SplitData, *, keep_scores: bool = False) -> dict[str, dict]:
        """Every head's metrics on ``split`` (predictions stay on the device until the end; under data parallelism
        each rank scores every world-th batch and the results are gathered). ``keep_scores``: also keep each head's
        p(fake) and predicted label in ``self.scores`` (the report's ROC/PR curves)."""
        heads = list(self.heads)

        def scores(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # [b, heads, 2]: label, p(fake)
            with self.ctx.autocast():
                out = self.head_logits(split, self.batch(split, *batch, train=False))
            return torch.stack([torch.stack([out[h].argmax(1).float(), torch.softmax(out[h].float(), 1)[:, 1]], 1)
                                for h in heads], dim=1)

        order = eval_batches(len(split), max(64, self.cfg.batch_size), self.device)
        both = torch.cat(distributed.sharded_batches(scores, order)).cpu()
        preds, labels = both[..., 0].long(), split.labels.cpu()
        if keep_scores:
            self.scores = {h: {"p_fake": both[:, j, 1], "pred": preds[:, j], "label": labels}
                           for j, h in enumerate(heads)}
        out = {}
        for j, h in enumerate(heads):
            out[h] = classification_metrics(preds[:, j], labels)
            out[h]["auc"] = roc_curve(both[:, j, 1].tolist(), labels.tolist())[2]
        return out

    def cross_entropy(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The fit split's cross-entropy on ``rows``, weighted by ``--class-weights``."""
        return F.cross_entropy(logits.float(), self.train_split.labels[rows], weight=self.class_weight)


def planned_epochs(epochs: int, n_fit: int, batch_size: int, min_steps: int, max_epochs: int = 0) -> int:
    """``epochs``, raised until the stage takes ``min_steps`` optimiser steps (``fit`` drops a ragged last batch,
    so an epoch is max(1, n // batch) steps), but by ``min_steps`` to no more than ``max_epochs`` (0: no cap);
    ``epochs`` itself is never lowered."""
    per_epoch = max(1, n_fit // batch_size)
    raised = -(-min_steps // per_epoch)
    return max(epochs, min(raised, max_epochs) if max_epochs else raised)


def imbalanced(labels: torch.Tensor, share: float = 0.4) -> bool:
    """The rarer class is under ``share`` of ``labels`` (what ``--class-weights auto`` and the collapse note
    read)."""
    counts = torch.bincount(labels.cpu(), minlength=2)
    return bool(counts.sum() > 0 and counts.min() < share * counts.sum())


def class_weight(mode: str, labels: torch.Tensor) -> torch.Tensor | None:
    """Per-class cross-entropy weights n / (2 n_c) (scikit-learn's "balanced") for ``balanced``, and for
    ``auto`` when the split is imbalanced; None (unweighted) otherwise."""
    if mode == "none" or (mode == "auto" and not imbalanced(labels)):
        return None
    counts = torch.bincount(labels.cpu(), minlength=2).double().clamp_min(1)
    return (counts.sum() / (2 * counts)).float().to(labels.device)


def _text_logits_and_features(net: Classifier, split: SplitData, rows: torch.Tensor):
    return net(split.ids[rows], split.mask[rows])


def _estimate_partition(stage: MutualStage | SharedStage, batch: Batch) -> None:
    """Z estimated once, eagerly, on the first batch (CRD), then frozen in the distiller's buffers (no host
    sync: the estimate stays on the device)."""
    with torch.no_grad(), stage.ctx.autocast():
        _, t_feat = _text_logits_and_features(stage.text_net, stage.train_split, batch.rows)
        _, v_feat = stage.image_net(batch.pixels)
    distiller = stage.modules["distiller"]  # (stage.distiller may be its DDP wrapper)
    # Z from the first *global* batch: every rank's slice gathered; rank 0's estimate (its negatives) everywhere
    gather = distributed.all_gather_cat
    distiller.init_partition(gather(t_feat.float()), gather(v_feat.float()), gather(batch.rows))
    distributed.broadcast_(distiller.z_v2t)
    distributed.broadcast_(distiller.z_t2v)


def _mutual_loss(stage: MutualStage | SharedStage, t_logits: torch.Tensor, t_feat: torch.Tensor,
                 v_logits: torch.Tensor, v_feat: torch.Tensor, rows: torch.Tensor, first: torch.Tensor | None = None):
    """(first +) CE_T + alpha L_{V->T} + CE_V + beta L_{T->V}, with CE_T, CE_V and L_{V->T} + L_{T->V}. The NCE runs
    in float32 outside autocast (exp(s / tau) reaches ~1.6e6); each term's gradient reaches only its own network,
    so one backward of the sum is exact."""
    cfg = stage.cfg
    ce_t, ce_v = stage.cross_entropy(t_logits, rows), stage.cross_entropy(v_logits, rows)
    l_v2t, l_t2v = stage.distiller(t_feat.float(), v_feat.float(), rows)
    start = ce_t if first is None else first + ce_t  # summed in this order: float addition is not associative
    return start + cfg.alpha * l_v2t + ce_v + cfg.beta * l_t2v, ce_t, ce_v, l_v2t + l_t2v


class FinetuneStage(Stage):
    """finetune-t / finetune-v: one network, cross-entropy only."""

    def __init__(self, ctx: StageContext, splits: dict[str, SplitData], modality: str, name: str):
        super().__init__(ctx, splits, ctx.cfg.epochs)
        self.name, self.modality, self.uses_images = name, modality, modality == "image"
        build = ctx.build
        net = build.text_net() if modality == "text" else build.image_net()
        opt = build.text_optimizer(net.parameters()) if modality == "text" else build.image_optimizer(net.parameters())
        self.net = net
        self.modules, self.optimizers, self.heads = {"net": net}, {"opt": opt}, {modality: ("net",)}

    def _logits(self, split: SplitData, rows: torch.Tensor, pixels: torch.Tensor | None) -> torch.Tensor:
        if self.modality == "text":
            return _text_logits_and_features(self.net, split, rows)[0]
        return self.net(pixels)[0]

    def loss(self, rows, pixels):
        with self.ctx.autocast():
            logits = self._logits(self.train_split, rows, pixels)
        return self.cross_entropy(logits, rows), {}

    def head_logits(self, split, batch):
        return {self.modality: self._logits(split, batch.rows, batch.pixels)}


class MutualStage(Stage):
    """Stage 1: mutual training with cross-modal NCE distillation; the text and image heads are each selected
    at their own best validation epoch."""

    name, uses_images, log_names = "stage1", True, ("ce_t", "ce_v", "nce")

    def __init__(self, ctx: StageContext, splits: dict[str, SplitData]):
        super().__init__(ctx, splits, ctx.cfg.epochs)
        build = ctx.build
        self.text_net, self.image_net = build.text_net(), build.image_net()
        self.distiller = build.distiller(self.text_net, self.image_net, self.train_split)
        d = self.distiller
        self.modules = {"text": self.text_net, "image": self.image_net, "distiller": d}
        self.optimizers = {"text": build.text_optimizer([*self.text_net.parameters(), *d.embed_t.parameters()]),
                           "image": build.image_optimizer([*self.image_net.parameters(), *d.embed_v.parameters()])}
        self.heads = {"text": ("text",), "image": ("image",)}

    def on_fit_start(self, batch: Batch) -> None:
        _estimate_partition(self, batch)

    def loss(self, rows, pixels):
        with self.ctx.autocast():
            t_logits, t_feat = _text_logits_and_features(self.text_net, self.train_split, rows)
            v_logits, v_feat = self.image_net(pixels)
        loss, ce_t, ce_v, nce = _mutual_loss(self, t_logits, t_feat, v_logits, v_feat, rows)
        return loss, {"ce_t": ce_t.detach(), "ce_v": ce_v.detach(), "nce": nce.detach()}

    def head_logits(self, split, batch):
        return {"text": _text_logits_and_features(self.text_net, split, batch.rows)[0],
                "image": self.image_net(batch.pixels)[0]}


class FusionStage(Stage):
    """Stage 2: BLOCK fusion on frozen stage-1 networks. Their features are computed once (eval mode, no
    augmentation): the encoders are frozen, so recomputing them every epoch would change nothing but time."""

    name = "stage2"

    def __init__(self, ctx: StageContext, splits: dict[str, SplitData], text_net: Classifier, image_net: Classifier):
        super().__init__(ctx, splits, ctx.cfg.fusion_epochs)
        for net in (text_net, image_net):
            net.eval().requires_grad_(False)
        self.features = {s.name: self._features(text_net, image_net, s) for s in splits.values()}
        fit_t, fit_v = self.features[self.train_split.name]
        self.block = ctx.build.block(fit_t.shape[1], fit_v.shape[1])
        self.modules, self.heads = {"block": self.block}, {"fused": ("block",)}
        self.optimizers = {"fusion": ctx.build.fusion_optimizer(self.block.parameters())}

    @torch.no_grad()
    def _features(self, text_net: Classifier, image_net: Classifier, split: SplitData) -> tuple[torch.Tensor, ...]:
        def features(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # [b, text dim + image dim]
            host_rows, rows = batch
            with self.ctx.autocast():
                t = _text_logits_and_features(text_net, split, rows)[1].float()
                v = image_net(split.pixels(host_rows, train=False, device=self.device))[1].float()
            return torch.cat([t, v], dim=1)

        # sharded over the ranks under data parallelism (each batch computed as one process computes it)
        order = eval_batches(len(split), max(64, self.cfg.batch_size), self.device)
        both = torch.cat(distributed.sharded_batches(features, order))
        t_dim = text_net.encoder.out_dim
        return both[:, :t_dim].contiguous(), both[:, t_dim:].contiguous()

    def loss(self, rows, pixels):
        fit_t, fit_v = self.features[self.train_split.name]
        with self.ctx.autocast():
            logits = self.block([fit_t[rows], fit_v[rows]])
        return self.cross_entropy(logits, rows), {}

    def head_logits(self, split, batch):
        t, v = self.features[split.name]
        return {"fused": self.block([t[batch.rows], v[batch.rows]])}


class SharedStage(Stage):
    """cmc-shared. ``--shared-loss fused`` (default, the paper's CMC-shared baseline): both encoders' features
    fused by BLOCK, the whole framework trained in one stage on the fused cross-entropy, no distillation.
    ``fused+distill``: L = CE_fused + CE_T + alpha L_{V->T} + CE_V + beta L_{T->V}."""

    name, uses_images = "cmc-shared", True

    def __init__(self, ctx: StageContext, splits: dict[str, SplitData]):
        super().__init__(ctx, splits, ctx.cfg.epochs)
        build, distill = ctx.build, ctx.cfg.shared_loss == "fused+distill"
        self.log_names = ("ce_fused",) if distill else ()
        self.ddp_find_unused = not distill  # fused only: the two classifier heads take no gradient
        self.text_net, self.image_net = build.text_net(), build.image_net()
        self.distiller = build.distiller(self.text_net, self.image_net, self.train_split) if distill else None
        self.block = build.block(self.text_net.encoder.out_dim, self.image_net.encoder.out_dim)
        text_params, image_params = [*self.text_net.parameters()], [*self.image_net.parameters()]
        self.modules = {"text": self.text_net, "image": self.image_net}
        if self.distiller is not None:
            self.modules["distiller"] = self.distiller
            text_params += [*self.distiller.embed_t.parameters()]
            image_params += [*self.distiller.embed_v.parameters()]
        self.modules["block"] = self.block
        self.optimizers = {"text": build.text_optimizer(text_params), "image": build.image_optimizer(image_params),
                           "fusion": build.fusion_optimizer(self.block.parameters())}
        self.heads = {"fused": tuple(self.modules)}

    def on_fit_start(self, batch: Batch) -> None:
        if self.distiller is not None:
            _estimate_partition(self, batch)

    def loss(self, rows, pixels):
        with self.ctx.autocast():
            t_logits, t_feat = _text_logits_and_features(self.text_net, self.train_split, rows)
            v_logits, v_feat = self.image_net(pixels)
            fused = self.block([t_feat, v_feat])
        ce_f = self.cross_entropy(fused, rows)
        if self.distiller is None:
            return ce_f, {}
        loss = _mutual_loss(self, t_logits, t_feat, v_logits, v_feat, rows, first=ce_f)[0]
        return loss, {"ce_fused": ce_f.detach()}

    def head_logits(self, split, batch):
        _, t = _text_logits_and_features(self.text_net, split, batch.rows)
        _, v = self.image_net(batch.pixels)
        return {"fused": self.block([t, v])}
