"""The runner: sets a run up (directory, log, data, builders), runs the variant plan through ``fit`` and writes
the report. The pieces it drives:

    variants.py            the variants: the stage and head that score each one, the table's order
    models.py              device, precision, networks, optimisers, distiller, BLOCK
    stages.py              one class per stage (finetune, stage 1, stage 2, cmc-shared) with named hooks
    loop.py                ``fit``: the loop, log reads every N steps, validation, resume
    checkpoint_manager.py  last and best checkpoints, their order of writes, random states

The run's inputs are assembled once, in order, and handed on: the device and autocast dtype, the text model and
its tokenizer, the records, the prepared splits; then one ``ModelBuilder`` and one ``StageContext`` from them.
``build_stage`` sets a run up the same way and builds one stage without training it.

Every row of the table is scored on the same posts: the test posts with a decodable image (the posts all six
variants can use). When some posts have no image, the text-only model trained and scored on all posts is its
own row, ``finetune-t (all posts)``. Every stage selects its checkpoint on a validation split carved from the
training set and scores the test split once, at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from cmc_fast import distributed, ops
from cmc_fast.checkpoint import write_json, write_text
from cmc_fast.checkpoint_manager import CheckpointManager
from cmc_fast.config import Config
from cmc_fast.data import PreparedData, SplitData, check_splits, prepare, read_dataset, refuse_imageless
from cmc_fast.data_pipeline.records import DatasetSplits
from cmc_fast.data_pipeline.text import VocabTokenizer
from cmc_fast.encoders import TextEncoder, build_image_encoder, load_text_model
from cmc_fast.errors import UsageError
from cmc_fast.loop import fit
from cmc_fast.models import ModelBuilder, amp_dtype, resolve_device
from cmc_fast.recipes import ENCODER_KEYS, describe
from cmc_fast.report import markdown_report, plot_history, plot_test_figures, text_table
from cmc_fast.rundir import log_to
from cmc_fast.stages import (
    FinetuneStage,
    FusionStage,
    MutualStage,
    SharedStage,
    Stage,
    StageContext,
    class_weight,
    imbalanced,
)
from cmc_fast.variants import ALL_POSTS_ROW, BASELINE_ROW, STAGE_VARIANT, VARIANTS, rows_of

log = logging.getLogger("cmc_fast")


class Trainer:
    """One run of a validated ``Config`` (validated where it was assembled: the command line, a saved
    ``config.json``, ``build_stage``) into ``run_dir``."""

    def __init__(self, cfg: Config, run_dir: str | Path, *, resume: bool = False, evaluate_only: bool = False,
                 figures: bool = False, recipe: dict | None = None):
        self.cfg = cfg
        self.recipe = recipe  # how recipes.configure chose the training values (None: as the config says)
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.resume, self.evaluate_only = resume or evaluate_only, evaluate_only
        self.figures = figures  # evaluate: redraw curves.png and the test figures (train always draws them)
        self.device = resolve_device(distributed.local_device(cfg.device))
        # refused before joining the group: a rank leaving while another is still connecting would crash it
        world = distributed.world_from_env()
        if world > 1 and (cfg.batch_size % world or cfg.batch_size < 2 * world):
            raise UsageError(f"--batch-size {cfg.batch_size}: the global batch must split evenly over the {world} "
                             f"processes, at least 2 rows each")
        distributed.init_from_env(self.device)  # torchrun: join the process group (nothing otherwise)
        self.notes: list[str] = []
        self.results: dict[str, dict] = {}
        self.timings: dict[str, dict] = {}
        self.history: dict[str, list[dict]] = {}  # stage -> per-epoch train loss and validation accuracy
        self.chosen: dict[str, dict[str, tuple]] = {}  # stage -> variant -> (epoch of its checkpoint, head)
        self.scores: dict[str, dict] = {}  # variant -> test p(fake), predicted and true labels (report figures)
        self.use_images = any(VARIANTS[v].uses_images for v in cfg.variants())
        # check_inputs: the dataset as read, and a Hugging Face text model's (encoder, tokenizer)
        self.records: DatasetSplits | None = None
        self.pretrained_text: tuple[TextEncoder, object] | None = None
        # setup: the data, then the context every stage shares, each built once, complete
        self.data: PreparedData | None = None
        self.text_splits: dict[str, SplitData] = {}
        self.mm_splits: dict[str, SplitData] | None = None  # the posts with an image (None: no image variant)
        self.ctx: StageContext | None = None

    def reconfigure(self, cfg: Config, recipe: dict) -> None:
        """The recipe chosen again once ``check_inputs`` has read the data (``recipes.sized_by_data``): the same
        encoders and data, other training values. Before ``setup``, which writes config.json."""
        if self.data is not None or any(getattr(cfg, k) != getattr(self.cfg, k) for k in ENCODER_KEYS):
            raise RuntimeError("reconfigure: only before setup, and with the same encoders")
        self.cfg, self.recipe = cfg, recipe

    # ---------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir.mkdir(exist_ok=True)
        dtype = amp_dtype(cfg, self.device, self.notes)
        if distributed.is_main() and not self.evaluate_only:  # evaluate writes only evaluate.json (and log lines)
            write_json(asdict(cfg), self.run_dir / "config.json")
        self.check_inputs()
        with distributed.main_first("data preparation"):  # rank 0 writes the image cache
            self._prepare_data()
        encoder = self.pretrained_text[0] if self.pretrained_text else None
        build = ModelBuilder(cfg, self.device, self.ckpt_dir, tokenizer=self.data.tokenizer,
                             fit_text=self.text_splits["fit"], val_text=self.text_splits["val"],
                             pretrained_text=encoder, resume=self.resume, evaluate_only=self.evaluate_only,
                             notes=self.notes)
        self.ctx = StageContext(cfg, self.device, dtype, build)

    def check_inputs(self) -> None:
        """What the run needs that can be checked without its folder (the CLI calls this before making one, so a
        failed command leaves none): the text model, the dataset's records (read once, kept for setup), images in
        them where image variants are asked for (before image weights are looked for), the image weights."""
        if self.records is not None:
            return
        cfg = self.cfg
        if cfg.text_model not in ("tiny", "ngram"):  # a Hugging Face model: loaded before any data work
            self.pretrained_text = load_text_model(cfg.text_model, cfg.text_pooling)
            encoder = self.pretrained_text[0]
            # saved as chosen: a resumed run, predict and a bundle build the same encoder whatever "auto" meets
            self.cfg = dataclasses.replace(cfg, text_pooling=encoder.pooling)
            self.notes.append(f"text model pooled by {encoder.pooling} ({encoder.pooling_source})")
        with distributed.main_first("reading the dataset"):  # rank 0 writes the synthetic data
            records = read_dataset(cfg)
        if self.use_images:
            refuse_imageless(cfg, records, cfg.variants())
            build_image_encoder(cfg.image_model, cfg.image_weights, tuple(cfg.image_size))
        self.records = records

    def _prepare_data(self) -> None:
        """Split, tokenise (a Hugging Face model's tokenizer, or the tiny models' vocabulary built from the fit
        split) and decode the records, once."""
        cfg, t0 = self.cfg, time.perf_counter()
        tokenizer = self.pretrained_text[1] if self.pretrained_text else None
        self.data = prepare(cfg, tokenizer=tokenizer, use_images=self.use_images, ds=self.records)
        if isinstance(self.data.tokenizer, VocabTokenizer) and not self.evaluate_only and distributed.is_main():
            write_json(self.data.tokenizer.vocab, self.run_dir / "vocab.json")
        log.info("data ready in %.1fs: %s", time.perf_counter() - t0, self.data.summary)
        if distributed.is_main() and not self.evaluate_only:
            write_json([vars(s) for s in self.data.skipped], self.run_dir / "skipped.json")
        if self.data.skipped and distributed.is_main():
            log.info("%d posts skipped or dropped for image variants; see %s", len(self.data.skipped),
                     self.run_dir / "skipped.json")
        self.text_splits = {s.name: s.to(self.device) for s in (self.data.fit, self.data.val, self.data.test)}
        if self.use_images:
            self.mm_splits = {n: s.with_images().to(self.device) for n, s in self.text_splits.items()}
        check_splits(cfg, self.data, self.mm_splits, cfg.variants())  # before any training: which split, and why

    # ------------------------------------------------------------------------------------------ plan
    def run(self) -> dict[str, dict]:
        t0 = time.perf_counter()
        with log_to(self.run_dir) if distributed.is_main() else nullcontext():  # rank 0 alone writes log.txt
            self.setup()
            self.run_plan()
            if distributed.is_main():
                self._write_outputs(time.perf_counter() - t0)
        distributed.barrier("end of run")
        return self.results

    def run_plan(self) -> None:
        """Each requested variant's stage, trained (or reloaded) and scored; the all-posts row runs last."""
        variants, ctx = set(self.cfg.variants()), self.ctx
        shared = self.mm_splits or self.text_splits  # the posts every row is scored on
        if "finetune-t" in variants:
            self.fit_and_score(FinetuneStage(ctx, shared, "text", "finetune-t"))
        if "finetune-v" in variants:
            self.fit_and_score(FinetuneStage(ctx, shared, "image", "finetune-v"))
        if {"cmc-t", "cmc-v", "cmc"} & variants:
            stage1 = self.fit_and_score(MutualStage(ctx, shared))
            if "cmc" in variants:
                self.fit_and_score(FusionStage(ctx, shared, stage1.text_net, stage1.image_net))
        if "cmc-shared" in variants:
            self.fit_and_score(SharedStage(ctx, shared))
        if "finetune-t" in variants and self._some_posts_lack_an_image():
            self.fit_and_score(FinetuneStage(ctx, self.text_splits, "text", "finetune-t-all"))
        keep = variants | ({ALL_POSTS_ROW} if "finetune-t" in variants else set()) | {BASELINE_ROW}
        if self.cfg.baseline and distributed.is_main():
            self.score_baseline(shared)
        self.results = {v: r for v, r in self.results.items() if v in keep}

    def _some_posts_lack_an_image(self) -> bool:
        return self.mm_splits is not None and any(
            len(self.mm_splits[name]) != len(split) for name, split in self.text_splits.items())

    def posts_scored(self, stage: Stage) -> str:
        """Which test posts a stage's rows are scored on, in words, with their count."""
        return self.posts_scored_split(stage.test_split)

    def posts_scored_split(self, test_split: SplitData) -> str:
        n = len(test_split)
        if self.mm_splits is None or test_split is self.text_splits["test"]:
            return f"all {n} test posts"
        whole = len(self.text_splits["test"])
        return f"the {n} test posts with an image" + (" (all of them)" if n == whole else f" (of {whole})")

    def fit_and_score(self, stage: Stage) -> Stage:
        """Train (or, resumed, reload) ``stage`` and score each of its heads once on the test split, as the rows
        of the variants it scores."""
        variants = rows_of(stage.name)
        compile_counters = _graph_break_counters(self.cfg.compile)
        ops.nce_paths_taken(reset=True)
        result = fit(stage, CheckpointManager(self.ckpt_dir, stage.name), resume=self.resume,
                     evaluate_only=self.evaluate_only, run_dir=str(self.run_dir))
        self.history[stage.name] = result.history
        self.chosen[stage.name] = {variants[h]: (result.best_epoch.get(h), h) for h in variants}
        if result.clock.steps and not self.evaluate_only:  # evaluate reports no training time as its own
            self.timings[stage.name] = result.clock.summary(self.cfg.compile)
            self._note_graph_breaks(stage.name, compile_counters)
        self._note_collapse(stage, result.history, variants)
        nce_paths = ops.nce_paths_taken(reset=True)
        if nce_paths:  # which form of the NCE loss ran (dense or gather, chosen by shape or CMC_FAST_NCE)
            self.notes.append(f"{stage.name}: NCE loss form: " + "; ".join(nce_paths))
        self._note_class_weights(stage)
        test = stage.evaluate(stage.test_split, keep_scores=True)
        posts = self.posts_scored(stage)
        for head, variant in variants.items():
            chosen = result.best_val.get(head, {})
            self.results[variant] = {"test": test[head], "val_accuracy": chosen.get("accuracy", result.best[head]),
                                     "val_score": {self.cfg.select_metric: result.best[head]},
                                     "epoch": result.best_epoch.get(head), "epochs_run": len(result.history),
                                     "selection": {"rule": stage.selection, "val_posts": len(stage.val_split)},
                                     "stopped_early": result.stopped_early,
                                     "train_seconds": self._pipeline_seconds(variant, stage.name),
                                     "stage": stage.name, "posts": posts}
            self.scores[variant] = stage.scores[head]
            log.info("%s: test accuracy %.4f on %s", variant, test[head]["accuracy"], posts)
        return stage

    def _pipeline_seconds(self, variant: str, stage: str) -> float | None:
        """The training seconds of every stage the variant's model went through (cmc: stage 1, then stage 2);
        None under evaluate, which trains nothing."""
        if self.evaluate_only:
            return None
        stages = VARIANTS[variant].stages if variant in VARIANTS else (stage,)
        return sum(self.timings.get(s, {}).get("train_seconds", float("nan")) for s in stages)

    def _note_collapse(self, stage: Stage, history: list[dict], variants: dict[str, str]) -> None:
        """A head whose validation predictions were one class in every epoch of its run collapsed: its scores are
        a constant guess. Said in the report's notes and as a log warning (the CLI shows those on the console)."""
        n, labels = len(stage.val_split), stage.val_split.labels
        if not history or n == 0 or labels.unique().numel() < 2:
            return
        for head in stage.heads:
            counts = [h.get("val_predicted_fake", {}).get(head) for h in history]
            one = "fake" if all(c == n for c in counts) else "real" if all(c == 0 for c in counts) else None
            if one:
                note = (f"{variants.get(head, head)} ({stage.name}): every validation post predicted {one} in all "
                        f"{len(history)} epoch(s): the model collapsed to one class and its scores are a constant "
                        f"guess ({self._collapse_cause(stage)})")
                self.notes.append(note)
                log.warning(note)

    def _collapse_cause(self, stage: Stage) -> str:
        counts = torch.bincount(stage.train_split.labels.cpu(), minlength=2).tolist()
        if not imbalanced(stage.train_split.labels):
            return "a learning rate, --alpha or --beta too large?"
        weighting = ("the cross-entropy was class-weighted already" if stage.class_weight is not None
                     else "try --class-weights balanced")
        return (f"the fit split is imbalanced, {counts[1]} fake / {counts[0]} real: {weighting}, and --select-metric "
                "macro-f1 or auc; or a learning rate too large")

    def _note_class_weights(self, stage: Stage) -> None:
        weight = stage.class_weight
        if weight is None or any(n.startswith(f"class weights ({self.cfg.class_weights})") for n in self.notes):
            return
        counts = torch.bincount(stage.train_split.labels.cpu(), minlength=2).tolist()
        note = (f"class weights ({self.cfg.class_weights}): cross-entropy weighted real {weight[0]:.2f}, fake "
                f"{weight[1]:.2f} for a fit split of {counts[1]} fake / {counts[0]} real posts")
        self.notes.append(note)
        log.info(note)

    def score_baseline(self, splits: dict[str, SplitData]) -> None:
        """The TF-IDF + logistic-regression row on the posts every row uses (fit, validation and test splits)."""
        from cmc_fast.baseline import tfidf_logistic_regression

        t0 = time.perf_counter()
        out = tfidf_logistic_regression(*([r.text for r in splits[n].records] for n in ("fit", "val", "test")),
                                        *(splits[n].labels.cpu() for n in ("fit", "val", "test")),
                                        select_metric=self.cfg.select_metric, seed=self.cfg.seed,
                                        balanced=class_weight(self.cfg.class_weights, splits["fit"].labels) is not None)
        if isinstance(out, str):
            self.notes.append(f"{BASELINE_ROW} row missing: {out}")
            log.warning("%s row missing: %s", BASELINE_ROW, out)
            return
        self.results[BASELINE_ROW] = {"test": out["test"], "val_accuracy": out["val"]["accuracy"],
                                      "val_score": {self.cfg.select_metric: out["val_score"]},
                                      "train_seconds": time.perf_counter() - t0, "stage": "baseline",
                                      "posts": self.posts_scored_split(splits["test"]), "model": out["model"]}
        self.scores[BASELINE_ROW] = out["scores"]
        log.info("%s (%s): test accuracy %.4f", BASELINE_ROW, out["model"], out["test"]["accuracy"])

    def _note_graph_breaks(self, stage: str, counters) -> None:
        if counters is None:
            return
        breaks = dict(counters["graph_break"])
        self.timings[stage]["graph_breaks"] = sum(breaks.values())
        if breaks:
            self.notes.append(f"{stage}: torch.compile broke the graph {sum(breaks.values())} time(s): "
                              f"{'; '.join(list(breaks)[:3])}")

    # --------------------------------------------------------------------------------------- outputs
    def recipe_line(self) -> str:
        return describe(self.recipe, self.cfg)

    def _write_outputs(self, seconds: float) -> None:
        name = "evaluate" if self.evaluate_only else "metrics"
        payload = {"results": self.results, "timings": self.timings, "history": self.history,
                   "text_mlm": self.ctx.build.text_mlm_history, "data": self.data.summary, "device": str(self.device),
                   "shared_loss": self.cfg.shared_loss, "wall_seconds": seconds, "notes": self.notes,
                   "recipe": self.recipe_line(), "select_metric": self.cfg.select_metric}
        if self.evaluate_only and self.figures:
            self._write_figures()
        write_json(payload, self.run_dir / f"{name}.json")
        if not self.evaluate_only:
            figures = self._write_figures()
            write_text(markdown_report(asdict(self.cfg), self.results, self.data.summary, self.notes, self.timings,
                                       figures, recipe=self.recipe_line()), self.run_dir / "report.md")
        log.info("done in %.1fs\n%s", seconds, text_table(self.results))

    def _write_figures(self) -> list[str]:
        """curves.png and the test figures in the run folder; the names written (a note when plots are absent)."""
        if not plot_history(self.history, self.run_dir / "curves.png", self.chosen):
            self.notes.append("figures not written: install the plots extra (pip install 'cmc-fast[plots]')")
            return []
        return plot_test_figures(self.scores, self.run_dir)


def _graph_break_counters(compiled: bool):
    """torch.compile's graph-break counters, cleared (a break means part of the step runs eagerly)."""
    if not compiled:
        return None
    from torch._dynamo.utils import counters

    counters["graph_break"].clear()
    return counters


def build_stage(cfg: Config, stage: str, run_dir: str | None = None) -> tuple[Trainer, Stage]:
    """(trainer, stage) for ``stage`` in ``variants.STAGE_VARIANT``, set up on ``cfg``'s data without training:
    what the profiler and the step benchmarks drive, so they time exactly the step the trainer runs. stage2 gets
    freshly initialised (untrained) encoders."""
    if stage not in STAGE_VARIANT:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGE_VARIANT)}")
    cfg = dataclasses.replace(cfg, variant=STAGE_VARIANT[stage], progress=False).validate()
    tr = Trainer(cfg, run_dir or tempfile.mkdtemp(prefix="cmc-stage-"))
    tr.setup()
    ctx, splits = tr.ctx, tr.mm_splits
    if stage in ("finetune-t", "finetune-v"):
        modality = "text" if stage == "finetune-t" else "image"
        return tr, FinetuneStage(ctx, splits if modality == "image" else tr.text_splits, modality, stage)
    if stage == "stage1":
        return tr, MutualStage(ctx, splits)
    if stage == "stage2":
        return tr, FusionStage(ctx, splits, ctx.build.text_net(), ctx.build.image_net())
    return tr, SharedStage(ctx, splits)
