"""The CMC trainer: every stage and variant of the paper, in one file.

    finetune-t / finetune-v   one modality, cross-entropy only
    stage 1 (cmc-t, cmc-v)    both networks trained mutually: L_T = CE_T + alpha L_{V->T}, L_V = CE_V + beta L_{T->V}
    stage 2 (cmc)             both networks frozen, BLOCK fusion trained on their features
    cmc-shared                encoders and BLOCK trained jointly, in one stage

Every stage selects its checkpoint on a validation split carved from the training set and scores the test
split once, at the end. Each epoch writes an atomic checkpoint; a killed run resumes from the last one.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from cmc_fast.checkpoint import load_checkpoint, save_checkpoint, write_json, write_text
from cmc_fast.config import Config
from cmc_fast.data import PreparedData, SplitData, prepare
from cmc_fast.distill import CrossModalNCE
from cmc_fast.encoders import NgramEncoder, TextEncoder, build_image_encoder, load_text_model, tiny_text_encoder
from cmc_fast.errors import UsageError
from cmc_fast.fusion import Block
from cmc_fast.metrics import classification_metrics
from cmc_fast.pretrain import pretrain_mlm
from cmc_fast.report import markdown_report, plot_history, text_table

log = logging.getLogger("cmc_fast")
IMAGE_VARIANTS = ("finetune-v", "cmc-t", "cmc-v", "cmc", "cmc-shared")


class Classifier(nn.Module):
    """An encoder with a linear fake/real head; returns (logits, pooled features)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.out_dim, 2)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.encoder(*inputs)
        return self.head(feat), feat


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def lr_factor(schedule: str, total_steps: int, warmup: float = 0.06) -> Callable[[int], float]:
    """The learning-rate multiplier at optimiser step s: 1 ("constant"), or a linear warm-up over the first
    ``warmup`` of the steps followed by a linear or cosine decay to 0 at ``total_steps``."""
    warm = max(1, round(warmup * total_steps))

    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        done = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 1.0 - done if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


def batches(n: int, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
            drop_last: bool = False, weights: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Row indices in batches: in order, a seeded permutation, or (``weights``) n rows drawn with replacement
    with probability proportional to their weight."""
    if weights is not None:
        order = torch.multinomial(weights, n, replacement=True, generator=generator)
    else:
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    out = list(order.split(batch_size))
    # A ragged last batch recompiles a compiled step and gives BatchNorm a tiny batch: drop it when training.
    if drop_last and len(out) > 1 and out[-1].numel() < batch_size:
        out.pop()
    return out


@dataclass
class Stage:
    """One training stage: what it trains, how one batch's loss is computed and how it is scored.

    ``loss_fn(rows, pixels) -> (loss, logs)`` for a batch of row indices of ``train_split`` and, for stages that
    see images, their augmented pixels (fetched eagerly by ``step``, outside any compiled region, because the
    image source may decode files); ``evaluate(split)`` ->
    {head: metrics}; ``select``: the heads that each keep a best-on-validation checkpoint; ``heads`` maps each
    head to the modules its checkpoint restores."""

    name: str
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    train_split: SplitData
    val_split: SplitData
    test_split: SplitData
    loss_fn: Callable
    evaluate: Callable[[SplitData], dict[str, dict]]
    select: tuple[str, ...]
    epochs: int
    heads: dict[str, set[str]] = field(default_factory=dict)
    uses_images: bool = False

    def step(self, rows: torch.Tensor) -> tuple[torch.Tensor, dict]:
        pixels = self.train_split.pixels(rows, train=True) if self.uses_images else None
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss, logs = self.loss_fn(rows, pixels)
        loss.backward()
        for opt in self.optimizers.values():
            opt.step()
        return loss.detach(), logs

    def best_modules(self, head: str) -> dict[str, nn.Module]:
        keep = self.heads.get(head, set(self.modules))
        return {k: m for k, m in self.modules.items() if k in keep}


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, *, resume: bool = False, evaluate_only: bool = False):
        self.cfg = cfg.validate()
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.resume, self.evaluate_only = resume or evaluate_only, evaluate_only
        self.device = resolve_device(cfg.device)
        self.amp_dtype = torch.bfloat16 if cfg.amp else None
        self.results: dict[str, dict] = {}
        self.timings: dict[str, dict] = {}
        self.history: dict[str, list[dict]] = {}  # stage -> per-epoch train loss and validation accuracy
        self.notes: list[str] = []
        self.data: PreparedData | None = None
        self.text_tokenizer = None
        self._pretrained_text: TextEncoder | None = None  # loaded once up front, handed to the first stage
        self._text_mlm_state: dict | None = None  # the tiny text model after masked-LM pre-training (once per run)
        self.text_mlm_history: list[dict] = []

    # --------------------------------------------------------------------------------------- setup
    def _autocast(self):
        enabled = self.amp_dtype is not None
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=enabled)

    def _maybe_compile(self, fn: Callable) -> Callable:
        return torch.compile(fn) if self.cfg.compile else fn

    def _setup(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir.mkdir(exist_ok=True)
        self._setup_logging()
        write_json(_config_dict(cfg), self.run_dir / "config.json")
        if cfg.text_model not in ("tiny", "ngram"):
            self._pretrained_text, self.text_tokenizer = load_text_model(cfg.text_model)  # fail fast, before data
        # surface a missing image checkpoint before any data work
        if any(v in IMAGE_VARIANTS for v in cfg.variants()):
            build_image_encoder(cfg.image_model, cfg.image_weights, tuple(cfg.image_size))
        t0 = time.perf_counter()
        use_images = any(v in IMAGE_VARIANTS for v in cfg.variants())
        self.data = prepare(cfg, tokenizer=self.text_tokenizer, use_images=use_images)
        self.text_tokenizer = self.data.tokenizer
        log.info("data ready in %.1fs: %s", time.perf_counter() - t0, self.data.summary)
        write_json([vars(s) for s in self.data.skipped], self.run_dir / "skipped.json")
        if self.data.skipped:
            log.info("%d posts skipped or dropped for image variants; see %s", len(self.data.skipped),
                     self.run_dir / "skipped.json")
        dev = self.device
        self.text_splits = {s.name: s.to(dev) for s in (self.data.fit, self.data.val, self.data.test)}
        if use_images:
            self.mm_splits = {n: s.with_images().to(dev) for n, s in self.text_splits.items()}
            for name, split in self.mm_splits.items():
                if len(split) == 0 or (name == "fit" and split.labels.unique().numel() < 2):
                    raise UsageError(
                        f"--dataset {cfg.dataset}: the {name} split has {len(split)} posts with a decodable image "
                        f"(and needs both labels for training); image variants cannot run. Run a text-only variant "
                        f"(--variant finetune-t) or provide the images (see `cmc-fast data check`).")

    def _setup_logging(self) -> None:
        log.setLevel(logging.INFO)
        for h in list(log.handlers):
            if getattr(h, "_cmc_run", False):
                log.removeHandler(h)
        fh = logging.FileHandler(self.run_dir / "log.txt", encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        fh._cmc_run = True
        log.addHandler(fh)

    def _text_encoder(self) -> TextEncoder:
        cfg = self.cfg
        if cfg.text_model == "tiny":
            dropout = 0.1 if cfg.tiny_text_dropout is None else cfg.tiny_text_dropout
            encoder = tiny_text_encoder(len(self.text_tokenizer), cfg.max_len, cfg.tiny_text_dim,
                                        cfg.tiny_text_layers, dropout)
            if cfg.text_pretrain_epochs and not self.evaluate_only:  # (evaluation loads trained weights anyway)
                encoder.model.load_state_dict(self._text_mlm(encoder))
            return encoder
        if cfg.text_model == "ngram":
            dropout = 0.3 if cfg.tiny_text_dropout is None else cfg.tiny_text_dropout
            return NgramEncoder(len(self.text_tokenizer), cfg.tiny_text_dim, dropout=dropout)
        # a fresh copy per stage: stages must not share (and silently co-train) one set of weights
        encoder, self._pretrained_text = self._pretrained_text, None
        return encoder if encoder is not None else load_text_model(cfg.text_model)[0]

    def _text_mlm(self, encoder: TextEncoder) -> dict:
        """The tiny text model's weights after masked-LM pre-training on the fit texts, starting from
        ``encoder``: computed once per run and saved, so every stage and a resumed run start from the same."""
        if self._text_mlm_state is not None:
            return self._text_mlm_state
        path = self.ckpt_dir / "text-mlm.pt"
        if self.resume and path.exists():
            saved = load_checkpoint(path, map_location=self.device)
            log.info("text-mlm: pre-trained weights loaded from %s", path)
        else:
            cfg, fit, val = self.cfg, self.text_splits["fit"], self.text_splits["val"]  # already on the device
            model = encoder.model.to(self.device)
            cuda = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
                if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(cfg.seed)  # dropout inside: the stages' random stream stays as without it
                state, history = pretrain_mlm(model, fit.ids, fit.mask, self.text_tokenizer,
                                              epochs=cfg.text_pretrain_epochs, lr=cfg.text_pretrain_lr,
                                              batch_size=max(cfg.batch_size, 64), seed=cfg.seed,
                                              progress=cfg.progress, held_out=(val.ids, val.mask))
            saved = {"encoder": state, "history": history}
            save_checkpoint(saved, path)
        self._text_mlm_state, self.text_mlm_history = saved["encoder"], saved["history"]
        return self._text_mlm_state

    def _text_net(self) -> Classifier:
        return Classifier(self._text_encoder()).to(self.device)

    def _image_net(self) -> Classifier:
        cfg = self.cfg
        encoder = build_image_encoder(cfg.image_model, cfg.image_weights, tuple(cfg.image_size))
        return Classifier(encoder).to(self.device)

    def _text_optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.cfg.text_lr)

    def _image_optimizer(self, params) -> torch.optim.Optimizer:
        c = self.cfg
        return torch.optim.SGD(params, lr=c.image_lr, momentum=c.image_momentum, weight_decay=c.image_weight_decay)

    # -------------------------------------------------------------------------------- generic loop
    def run_stage(self, stage: Stage) -> dict[str, float]:
        """Train ``stage`` for its epochs; keep a best checkpoint per head in ``stage.select`` (scored by
        validation accuracy) and load each best state at the end. Returns the best validation accuracies."""
        name, modules, optimizers, epochs = stage.name, stage.modules, stage.optimizers, stage.epochs
        last_path = self.ckpt_dir / f"{name}.last.pt"
        best = {k: -1.0 for k in stage.select}
        start, gen = 0, torch.Generator().manual_seed(self.cfg.seed * 1000 + zlib.crc32(name.encode()) % 1000)
        steps_per_epoch = len(batches(len(stage.train_split), self.cfg.batch_size, shuffle=False, drop_last=True))
        factor = lr_factor(self.cfg.lr_schedule, epochs * steps_per_epoch)
        schedulers = {} if self.cfg.lr_schedule == "constant" else {
            key: torch.optim.lr_scheduler.LambdaLR(opt, factor) for key, opt in optimizers.items()}
        if self.resume and last_path.exists():
            state = load_checkpoint(last_path)
            for key, mod in modules.items():
                mod.load_state_dict(state["modules"][key])
            for key, opt in optimizers.items():
                opt.load_state_dict(state["optimizers"][key])
            for key, sched in schedulers.items():
                sched.load_state_dict(state["schedulers"][key])
            start, best = state["epoch"], state["best"]
            self.history[name] = state.get("history", [])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if torch.cuda.is_available() and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            if start < epochs:
                log.info("%s: resuming at epoch %d/%d", name, start + 1, epochs)
        if self.evaluate_only and start < epochs:
            raise UsageError(f"--run {self.run_dir}: stage {name} stopped at epoch {start}/{epochs}; finish it with "
                             f"`cmc-fast train --resume {self.run_dir}`")
        history = self.history.setdefault(name, [])
        step_times: list[float] = []
        if self.cfg.compile:
            from torch._dynamo.utils import counters

            counters["graph_break"].clear()  # a break means part of the step runs eagerly: reported below
        sample_weights = stage.train_split.sampling_weights(self.cfg.group_sampling)
        t_stage = time.perf_counter()
        for epoch in range(start, epochs):
            for mod in modules.values():
                mod.train()
            rows_list = batches(len(stage.train_split), self.cfg.batch_size, shuffle=True, generator=gen,
                                drop_last=True, weights=sample_weights)
            bar = tqdm(rows_list, desc=f"{name} {epoch + 1}/{epochs}", leave=False, disable=not self.cfg.progress,
                       dynamic_ncols=True)
            running, seen = 0.0, 0
            for rows in bar:
                t0 = time.perf_counter()
                loss, logs = stage.step(rows.to(self.device))
                for sched in schedulers.values():
                    sched.step()
                lv = float(loss)  # synchronises, so the step time below is the real one
                step_times.append(time.perf_counter() - t0)
                if not math.isfinite(lv):
                    raise FloatingPointError(f"{name}: loss became {lv} at epoch {epoch + 1}; lower the learning rate")
                running, seen = running + lv, seen + 1
                bar.set_postfix(loss=f"{running / seen:.4f}", **{k: f"{float(v):.3f}" for k, v in logs.items()})
            for mod in modules.values():
                mod.eval()
            val = stage.evaluate(stage.val_split)
            for key in stage.select:
                if val[key]["accuracy"] > best[key]:
                    best[key] = val[key]["accuracy"]
                    save_checkpoint({"modules": {k: m.state_dict() for k, m in modules.items()}, "epoch": epoch + 1,
                                     "val": val[key]}, self.ckpt_dir / f"{name}.best-{key}.pt")
            history.append({"epoch": epoch + 1, "train_loss": running / max(seen, 1),
                            "val_accuracy": {k: v["accuracy"] for k, v in val.items()}})
            log.info("%s epoch %d/%d: train loss %.4f, val %s", name, epoch + 1, epochs, running / max(seen, 1),
                     ", ".join(f"{k} acc {v['accuracy']:.4f}" for k, v in val.items()))
            save_checkpoint({
                "modules": {k: m.state_dict() for k, m in modules.items()},
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
                "epoch": epoch + 1, "best": best, "history": history, "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            }, last_path)
        if step_times:
            steady = sorted(step_times[1:])[len(step_times[1:]) // 2] if len(step_times) > 1 else step_times[0]
            self.timings[name] = {"train_seconds": time.perf_counter() - t_stage, "steps": len(step_times),
                                  "first_step_s": step_times[0], "steady_step_s": steady,
                                  "compile_s_est": max(0.0, step_times[0] - steady) if self.cfg.compile else 0.0}
            if self.cfg.compile:
                breaks = dict(counters["graph_break"])
                self.timings[name]["graph_breaks"] = sum(breaks.values())
                if breaks:
                    self.notes.append(f"{name}: torch.compile broke the graph {sum(breaks.values())} time(s): "
                                      f"{'; '.join(list(breaks)[:3])}")
        for key in stage.select:
            self._load_best(name, key, stage.best_modules(key))
        return best

    def _load_best(self, name: str, key: str, modules: dict[str, nn.Module]) -> None:
        path = self.ckpt_dir / f"{name}.best-{key}.pt"
        if not path.exists():
            raise UsageError(f"--run {self.run_dir}: stage {name} has no checkpoint {path.name}; finish it with "
                             f"`cmc-fast train --resume {self.run_dir}`")
        state = load_checkpoint(path, map_location=self.device)
        for k, mod in modules.items():
            mod.load_state_dict(state["modules"][k])
            mod.eval()

    # ------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def _predict(self, split: SplitData, forward: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> dict[str, dict]:
        preds: dict[str, list[torch.Tensor]] = {}
        for rows in batches(len(split), max(64, self.cfg.batch_size), shuffle=False):
            with self._autocast():
                out = forward(rows.to(self.device))
            for key, logits in out.items():
                preds.setdefault(key, []).append(logits.argmax(1).cpu())
        return {k: classification_metrics(torch.cat(v), split.labels.cpu()) for k, v in preds.items()}

    def _text_forward(self, split: SplitData, net: Classifier, rows: torch.Tensor):
        return net(split.ids[rows], split.mask[rows])

    def _image_forward(self, split: SplitData, net: Classifier, rows: torch.Tensor, train: bool):
        return net(split.pixels(rows, train=train))

    def _record(self, variant: str, test: dict, val_acc: float, stage: str) -> None:
        self.results[variant] = {"test": test, "val_accuracy": val_acc,
                                 "train_seconds": self.timings.get(stage, {}).get("train_seconds", float("nan")),
                                 "stage": stage}
        log.info("%s: test accuracy %.4f (n=%d)", variant, test["accuracy"], test["n"])

    # ------------------------------------------------------------------------------- stage plans
    # Each *_stage method builds a Stage (models, optimizers, loss, evaluation) without training it, so
    # benchmarks and the profiler can run the very same step the trainer runs.
    def finetune_stage(self, modality: str) -> Stage:
        """finetune-t / finetune-v: one network, cross-entropy only."""
        splits = self.text_splits if modality == "text" else self.mm_splits
        fit = splits["fit"]
        if modality == "text":
            net = self._text_net()
            opt = self._text_optimizer(net.parameters())
            fwd = lambda split, rows, pixels: self._text_forward(split, net, rows)  # noqa: E731
        else:
            net = self._image_net()
            opt = self._image_optimizer(net.parameters())
            fwd = lambda split, rows, pixels: net(pixels)  # noqa: E731

        def compute(rows, pixels):
            with self._autocast():
                logits, _ = fwd(fit, rows, pixels)
            return F.cross_entropy(logits.float(), fit.labels[rows]), {}

        def evaluate(split):
            def forward(rows):
                pixels = split.pixels(rows, train=False) if modality == "image" else None
                return {modality: fwd(split, rows, pixels)[0]}
            return self._predict(split, forward)

        name = "finetune-t" if modality == "text" else "finetune-v"
        return Stage(name, {"net": net}, {"opt": opt}, fit, splits["val"], splits["test"],
                     self._maybe_compile(compute), evaluate, (modality,), self.cfg.epochs,
                     heads={modality: {"net"}}, uses_images=modality == "image")

    def _distiller(self, text_net: Classifier, image_net: Classifier, fit: SplitData) -> CrossModalNCE:
        cfg = self.cfg
        k = min(cfg.nce_k, len(fit) - 1)
        if k < cfg.nce_k and not any("nce_k lowered" in n for n in self.notes):
            self.notes.append(f"nce_k lowered from {cfg.nce_k} to {k}: the bank holds {len(fit)} samples")
        return CrossModalNCE(text_net.encoder.out_dim, image_net.encoder.out_dim, fit.labels, proj_dim=cfg.proj_dim,
                             k=k, tau=cfg.nce_t, momentum=cfg.nce_momentum,
                             negatives=cfg.negatives).to(self.device)

    def _with_partition(self, compiled: Callable, distiller: CrossModalNCE, text_net: Classifier,
                        image_net: Classifier, fit: SplitData) -> Callable:
        """Estimate Z once, eagerly, on the first batch (CRD), then run the (possibly compiled) loss."""
        def loss_fn(rows, pixels):
            if not distiller.partition_ready:
                with torch.no_grad(), self._autocast():
                    _, t_feat = self._text_forward(fit, text_net, rows)
                    _, v_feat = image_net(pixels)
                distiller.init_partition(t_feat.float(), v_feat.float(), rows)
            return compiled(rows, pixels)
        return loss_fn

    def stage1_stage(self) -> Stage:
        """Mutual training with cross-modal NCE distillation; the text and image heads are each selected at
        their own best validation epoch."""
        cfg, splits = self.cfg, self.mm_splits
        fit = splits["fit"]
        text_net, image_net = self._text_net(), self._image_net()
        distiller = self._distiller(text_net, image_net, fit)
        opt_t = self._text_optimizer([*text_net.parameters(), *distiller.embed_t.parameters()])
        opt_v = self._image_optimizer([*image_net.parameters(), *distiller.embed_v.parameters()])

        def compute(rows, pixels):
            with self._autocast():
                t_logits, t_feat = self._text_forward(fit, text_net, rows)
                v_logits, v_feat = image_net(pixels)
            y = fit.labels[rows]
            ce_t, ce_v = F.cross_entropy(t_logits.float(), y), F.cross_entropy(v_logits.float(), y)
            # NCE in float32 outside autocast: exp(s / tau) reaches ~1.6e6
            l_v2t, l_t2v = distiller(t_feat.float(), v_feat.float(), rows)
            # each term's gradient reaches only its own network, so one backward of the sum is exact
            loss = ce_t + cfg.alpha * l_v2t + ce_v + cfg.beta * l_t2v
            return loss, {"ce_t": ce_t.detach(), "ce_v": ce_v.detach(), "nce": (l_v2t + l_t2v).detach()}

        def evaluate(split):
            return self._predict(split, lambda rows: {"text": self._text_forward(split, text_net, rows)[0],
                                                      "image": self._image_forward(split, image_net, rows, False)[0]})

        loss_fn = self._with_partition(self._maybe_compile(compute), distiller, text_net, image_net, fit)
        return Stage("stage1", {"text": text_net, "image": image_net, "distiller": distiller},
                     {"text": opt_t, "image": opt_v}, fit, splits["val"], splits["test"], loss_fn, evaluate,
                     ("text", "image"), cfg.epochs, heads={"text": {"text"}, "image": {"image"}}, uses_images=True)

    @torch.no_grad()
    def _features(self, text_net: Classifier, image_net: Classifier, split: SplitData) -> tuple[torch.Tensor, ...]:
        ts, vs = [], []
        for rows in batches(len(split), max(64, self.cfg.batch_size), shuffle=False):
            rows = rows.to(self.device)
            with self._autocast():
                ts.append(self._text_forward(split, text_net, rows)[1].float())
                vs.append(self._image_forward(split, image_net, rows, False)[1].float())
        return torch.cat(ts), torch.cat(vs)

    def _block(self, text_dim: int, image_dim: int) -> Block:
        c = self.cfg
        return Block([text_dim, image_dim], 2, mm_dim=c.mm_dim, chunks=c.chunks, rank=c.rank,
                     dropout_input=c.fusion_dropout).to(self.device)

    def stage2_stage(self, text_net: Classifier, image_net: Classifier) -> Stage:
        """BLOCK fusion on frozen stage-1 networks. Their features are computed once (eval mode, no
        augmentation): the encoders are frozen, so recomputing them every epoch would change nothing but time."""
        for net in (text_net, image_net):
            net.eval().requires_grad_(False)
        feats = {s.name: self._features(text_net, image_net, s) for s in self.mm_splits.values()}
        fit = self.mm_splits["fit"]
        fit_t, fit_v = feats[fit.name]
        block = self._block(fit_t.shape[1], fit_v.shape[1])
        opt = torch.optim.Adam(block.parameters(), lr=self.cfg.fusion_lr)

        def compute(rows, pixels):
            with self._autocast():
                logits = block([fit_t[rows], fit_v[rows]])
            return F.cross_entropy(logits.float(), fit.labels[rows]), {}

        def evaluate(split):
            t, v = feats[split.name]
            return self._predict(split, lambda rows: {"fused": block([t[rows], v[rows]])})

        return Stage("stage2", {"block": block}, {"fusion": opt}, fit, self.mm_splits["val"], self.mm_splits["test"],
                     self._maybe_compile(compute), evaluate, ("fused",), self.cfg.fusion_epochs,
                     heads={"fused": {"block"}})

    def shared_stage(self) -> Stage:
        """cmc-shared: both encoders, the distillation and BLOCK trained jointly in one stage, with
        L = CE_fused + CE_T + alpha L_{V->T} + CE_V + beta L_{T->V}."""
        cfg, splits = self.cfg, self.mm_splits
        fit = splits["fit"]
        text_net, image_net = self._text_net(), self._image_net()
        distiller = self._distiller(text_net, image_net, fit)
        block = self._block(text_net.encoder.out_dim, image_net.encoder.out_dim)
        opt_t = self._text_optimizer([*text_net.parameters(), *distiller.embed_t.parameters()])
        opt_v = self._image_optimizer([*image_net.parameters(), *distiller.embed_v.parameters()])
        opt_f = torch.optim.Adam(block.parameters(), lr=cfg.fusion_lr)

        def compute(rows, pixels):
            with self._autocast():
                t_logits, t_feat = self._text_forward(fit, text_net, rows)
                v_logits, v_feat = image_net(pixels)
                fused = block([t_feat, v_feat])
            y = fit.labels[rows]
            ce_f = F.cross_entropy(fused.float(), y)
            ce_t, ce_v = F.cross_entropy(t_logits.float(), y), F.cross_entropy(v_logits.float(), y)
            l_v2t, l_t2v = distiller(t_feat.float(), v_feat.float(), rows)
            loss = ce_f + ce_t + cfg.alpha * l_v2t + ce_v + cfg.beta * l_t2v
            return loss, {"ce_fused": ce_f.detach()}

        def evaluate(split):
            def fwd(rows):
                _, t = self._text_forward(split, text_net, rows)
                _, v = self._image_forward(split, image_net, rows, False)
                return {"fused": block([t, v])}
            return self._predict(split, fwd)

        modules = {"text": text_net, "image": image_net, "distiller": distiller, "block": block}
        loss_fn = self._with_partition(self._maybe_compile(compute), distiller, text_net, image_net, fit)
        return Stage("cmc-shared", modules, {"text": opt_t, "image": opt_v, "fusion": opt_f}, fit, splits["val"],
                     splits["test"], loss_fn, evaluate, ("fused",), cfg.epochs, heads={"fused": set(modules)},
                     uses_images=True)

    # ---------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, dict]:
        t0 = time.perf_counter()
        self._setup()
        variants = self.cfg.variants()
        for modality, variant in (("text", "finetune-t"), ("image", "finetune-v")):
            if variant in variants:
                stage = self.finetune_stage(modality)
                best = self.run_stage(stage)
                self._record(variant, stage.evaluate(stage.test_split)[modality], best[modality], stage.name)
        if {"cmc-t", "cmc-v", "cmc"} & set(variants):
            stage = self.run_stage_and_score(self.stage1_stage(), {"text": "cmc-t", "image": "cmc-v"})
            if "cmc" in variants:
                self.run_stage_and_score(self.stage2_stage(stage.modules["text"], stage.modules["image"]),
                                         {"fused": "cmc"})
        if "cmc-shared" in variants:
            self.run_stage_and_score(self.shared_stage(), {"fused": "cmc-shared"})
        self.results = {v: r for v, r in self.results.items() if v in variants}
        self._write_outputs(time.perf_counter() - t0)
        return self.results

    def run_stage_and_score(self, stage: Stage, variants: dict[str, str]) -> Stage:
        """Train (or, resumed, reload) a stage and score each of its heads once on the test split."""
        best = self.run_stage(stage)
        test = stage.evaluate(stage.test_split)
        for head, variant in variants.items():
            self._record(variant, test[head], best[head], stage.name)
        return stage

    def _write_outputs(self, seconds: float) -> None:
        name = "evaluate" if self.evaluate_only else "metrics"
        payload = {"results": self.results, "timings": self.timings, "history": self.history,
                   "text_mlm": self.text_mlm_history, "data": self.data.summary,
                   "device": str(self.device), "wall_seconds": seconds, "notes": self.notes}
        write_json(payload, self.run_dir / f"{name}.json")
        if not self.evaluate_only:
            if not plot_history(self.history, self.run_dir / "curves.png"):
                self.notes.append("curves.png not written: install the plots extra (pip install cmc-fast[plots])")
            write_text(markdown_report(_config_dict(self.cfg), self.results, self.data.summary, self.notes,
                                       self.timings), self.run_dir / "report.md")
        log.info("done in %.1fs\n%s", seconds, text_table(self.results))


def _config_dict(cfg: Config) -> dict:
    from dataclasses import asdict

    return asdict(cfg)
