"""The one training loop, ``fit``: epochs of shuffled batches through a stage's hooks, a read of the training
logs every ``log_every`` steps (the only host sync of the training steps), validation after each epoch, each
head's best checkpoint, and a last checkpoint a killed run resumes from.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from cmc_fast import distributed
from cmc_fast.checkpoint_manager import CheckpointManager, capture_rng, restore_rng
from cmc_fast.errors import UsageError
from cmc_fast.metrics import selection_score
from cmc_fast.stages import Stage

log = logging.getLogger("cmc_fast")


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


def to_device_once(host_batches: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The epoch's row indices copied to the device in one (pinned, asynchronous) transfer, split like
    ``host_batches``: no per-step copy, no per-step sync."""
    if device.type == "cpu" or not host_batches:
        return host_batches
    flat = torch.cat(host_batches).pin_memory().to(device, non_blocking=True)
    return list(flat.split([b.numel() for b in host_batches]))


@dataclass
class StepLog:
    """The loss and a stage's logs, summed on the device in float64 and read by the host only in ``read``."""

    names: tuple[str, ...]
    device: torch.device
    total: torch.Tensor | None = None
    steps: int = 0
    read_steps: int = 0  # steps covered by the last read
    reads: int = 0  # host syncs so far
    last: dict[str, float] = field(default_factory=dict)

    def add(self, loss: torch.Tensor, logs: dict[str, torch.Tensor]) -> None:
        values = torch.stack([loss.float(), *(logs[n].float() for n in self.names)]).double()
        self.total = values if self.total is None else self.total + values
        self.steps += 1

    def read(self) -> dict[str, float]:
        """Epoch means so far: one host sync. Raises on a non-finite loss."""
        total = self.total if self.total is not None else torch.zeros(1 + len(self.names), dtype=torch.float64,
                                                                       device=self.device)
        # under data parallelism each rank summed its slice's means: their mean is the global batch's mean
        sums = distributed.all_reduce_mean_(total.clone()).tolist()
        self.read_steps, self.reads = self.steps, self.reads + 1
        self.last = {n: s / max(self.steps, 1) for n, s in zip(("loss", *self.names), sums)}
        if not math.isfinite(self.last["loss"]):
            raise FloatingPointError(f"the training loss became {self.last['loss']} within the last "
                                     f"{self.steps} steps; lower the learning rate")
        return self.last


@dataclass
class StageClock:
    """Wall time of a stage's training, in a form a resume continues: the first (compiling) step apart from the
    steady steps, measured between log reads (each read waits for the device, so these are real times)."""

    train_seconds: float = 0.0
    steps: int = 0
    first_step_s: float | None = None
    interval_step_s: list[float] = field(default_factory=list)  # mean step time of each later read interval

    def summary(self, compiled: bool) -> dict:
        first = self.first_step_s or 0.0
        steady = sorted(self.interval_step_s)[len(self.interval_step_s) // 2] if self.interval_step_s else first
        return {"train_seconds": self.train_seconds, "steps": self.steps, "first_step_s": first,
                "steady_step_s": steady, "compile_s_est": max(0.0, first - steady) if compiled else 0.0}


@dataclass
class FitResult:
    best: dict[str, float]  # head -> validation score (--select-metric) of the epoch its checkpoint holds
    history: list[dict]
    clock: StageClock
    best_epoch: dict[str, int] = field(default_factory=dict)  # head -> the epoch its best checkpoint holds
    best_val: dict[str, dict] = field(default_factory=dict)  # head -> validation metrics of that epoch
    stopped_early: bool = False  # --patience ended the stage before its planned epochs


def _schedulers(stage: Stage, cfg) -> dict:
    if cfg.lr_schedule == "constant":
        return {}
    steps_per_epoch = len(batches(len(stage.train_split), cfg.batch_size, shuffle=False, drop_last=True))
    factor = lr_factor(cfg.lr_schedule, stage.epochs * steps_per_epoch, cfg.warmup)
    return {key: torch.optim.lr_scheduler.LambdaLR(opt, factor) for key, opt in stage.optimizers.items()}


def fit(stage: Stage, manager: CheckpointManager, *, resume: bool = False, evaluate_only: bool = False,
        run_dir: str = "") -> FitResult:
    """Train ``stage`` for its epochs (resuming from its last checkpoint when asked), keep each head's best
    checkpoint by its validation score (``--select-metric``; ``--patience`` epochs without a better one on any
    head end the stage early) or, on a validation split under ``--select-min-val`` posts, its last epoch
    (``stage.selection``), and load every head's kept state at the end."""
    cfg = stage.cfg
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + zlib.crc32(stage.name.encode()) % 1000)
    schedulers = _schedulers(stage, cfg)
    result = FitResult({head: -1.0 for head in stage.heads}, [], StageClock())
    with distributed.main_first(f"{stage.name}: reading the last checkpoint"):  # rank 0 settles pending files
        start = _resume(stage, manager, schedulers, gen, result) if resume else 0
    if evaluate_only and start < stage.epochs:
        raise UsageError(f"--run {run_dir}: stage {stage.name} stopped at epoch {start}/{stage.epochs}; finish it "
                         f"with `cmc-fast train --resume {run_dir}`")
    if stage.selection == "last" and start < stage.epochs and distributed.is_main():
        log.info("%s: the validation split has %d posts, under --select-min-val %d: each head keeps the stage's "
                 "last epoch%s", stage.name, len(stage.val_split), cfg.select_min_val,
                 " (--patience is off)" if cfg.patience else "", extra={"console": True})
    weights = stage.train_split.sampling_weights(cfg.group_sampling)
    wrapped = distributed.wrap(stage) if start < stage.epochs else {}
    epoch_seconds: list[float] = []  # this process's epochs (a resumed run's ETA counts only these)
    try:
        for epoch in range(start, stage.epochs):
            # every rank draws the same global order (one process's); each then trains on its slice of each batch
            host_batches = batches(len(stage.train_split), cfg.batch_size, shuffle=True, generator=gen,
                                   drop_last=True, weights=weights)
            if distributed.active():
                torch.manual_seed(distributed.epoch_seed(cfg.seed, stage.name, epoch))
                host_batches = [distributed.local_slice(b) for b in host_batches]
            t_epoch = time.perf_counter()
            steplog = train_epoch(stage, host_batches, schedulers, result.clock, epoch, first_fit_step=epoch == 0)
            _end_epoch(stage, manager, schedulers, gen, result, epoch, steplog)
            epoch_seconds.append(time.perf_counter() - t_epoch)
            if distributed.is_main():
                log.info(epoch_line(stage.name, stage.epochs, result, epoch_seconds, stage.selection),
                         extra={"console": True})
            if result.stopped_early:
                break
    finally:
        distributed.unwrap(stage, wrapped)
    for head, keys in stage.heads.items():
        manager.load_best(head, {k: stage.modules[k] for k in keys})
    return result


def epoch_line(stage: str, epochs: int, result: FitResult, epoch_seconds: list[float], rule: str) -> str:
    """The console's line for the epoch just ended (the last entry of ``result.history``): training loss, each
    head's validation accuracy with the best selection score so far (``--select-metric``) and its epoch (none
    where ``rule`` is "last"), the epoch's time and the stage's ETA. The CLI prints it on stderr, terminal or not
    (``extra={"console": True}``)."""
    last = result.history[-1]
    epoch = last["epoch"]
    heads = ", ".join(f"{head} val acc {acc:.4f}" + ("" if rule == "last" else
                                                     f" (best {rule} {result.best[head]:.4f} @ "
                                                     f"{result.best_epoch.get(head, '-')})")
                      for head, acc in last["val_accuracy"].items())
    mean = sum(epoch_seconds) / len(epoch_seconds)
    eta = f", ETA {_duration(mean * (epochs - epoch))}" if epoch < epochs else ""
    return (f"{stage} epoch {epoch}/{epochs}: loss {last['train_loss']:.4f}, {heads}, "
            f"{_duration(epoch_seconds[-1])}{eta}")


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


_RESUME_FIELDS = ("modules", "optimizers", "schedulers", "rng", "best", "history", "best_epoch", "best_val",
                  "stopped_early", "clock", "epoch")


def _resume(stage: Stage, manager: CheckpointManager, schedulers: dict, gen: torch.Generator,
            result: FitResult) -> int:
    record = manager.load_last()
    if record is None:
        return 0
    missing = [k for k in _RESUME_FIELDS if k not in record]
    if missing:  # a checkpoint from another layout: one line that says what to do, not a KeyError mid-resume
        raise UsageError(f"{manager.last_path}: cannot resume from this checkpoint (no {', '.join(missing)}: written "
                         "by another cmc-fast version); start the run again in a new --out folder or with --overwrite")
    for key, mod in stage.modules.items():
        mod.load_state_dict(record["modules"][key])
    for key, opt in stage.optimizers.items():
        opt.load_state_dict(record["optimizers"][key])
    for key, sched in schedulers.items():
        sched.load_state_dict(record["schedulers"][key])
    restore_rng(record["rng"], gen)
    result.best, result.history = dict(record["best"]), list(record["history"])
    result.best_epoch, result.best_val = dict(record["best_epoch"]), dict(record["best_val"])
    result.stopped_early = bool(record["stopped_early"])
    result.clock = StageClock(**record["clock"])
    if result.stopped_early:  # --patience ended it: the stage is finished
        return stage.epochs
    if record["epoch"] < stage.epochs:
        log.info("%s: resuming at epoch %d/%d", stage.name, record["epoch"] + 1, stage.epochs)
    return record["epoch"]


def train_epoch(stage: Stage, host_batches: list[torch.Tensor], schedulers: dict, clock: StageClock, epoch: int,
                *, first_fit_step: bool) -> StepLog:
    """One epoch of training steps. The logs stay on the device and are read after the fit's first step and
    then every ``log_every`` steps and at the end of the epoch: one host sync per read, none inside a step."""
    cfg, split = stage.cfg, stage.train_split
    stage.train()
    steplog = StepLog(tuple(stage.log_names), stage.device)
    bar = tqdm(total=len(host_batches), desc=f"{stage.name} {epoch + 1}/{stage.epochs}", leave=False,
               disable=not cfg.progress or not distributed.is_main(), dynamic_ncols=True)
    t_read = t_epoch = time.perf_counter()
    for i, (host_rows, rows) in enumerate(zip(host_batches, to_device_once(host_batches, stage.device))):
        batch = stage.batch(split, host_rows, rows, train=True)
        if first_fit_step and i == 0:
            stage.on_fit_start(batch)
        loss, logs = stage.training_step(batch)
        for sched in schedulers.values():
            sched.step()
        steplog.add(loss, logs)
        last_step = i + 1 == len(host_batches)
        if (first_fit_step and i == 0) or (i + 1) % cfg.log_every == 0 or last_step:
            covered = steplog.steps - steplog.read_steps
            means = steplog.read()
            bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()})
            bar.update(covered)
            if not last_step and distributed.is_main():
                log.info("%s epoch %d step %d/%d: %s", stage.name, epoch + 1, i + 1, len(host_batches),
                         ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
            now = time.perf_counter()
            if clock.first_step_s is None:
                clock.first_step_s = now - t_read
            else:
                clock.interval_step_s.append((now - t_read) / covered)
            t_read = now
    bar.close()
    clock.train_seconds += time.perf_counter() - t_epoch
    clock.steps += steplog.steps
    return steplog


def _end_epoch(stage: Stage, manager: CheckpointManager, schedulers: dict, gen: torch.Generator, result: FitResult,
               epoch: int, steplog: StepLog) -> None:
    """Validation, the epoch's history entry, each improved head's best state and the last checkpoint."""
    stage.eval()
    val = stage.evaluate(stage.val_split)
    new_best = {}
    for head in stage.heads:
        score = selection_score(val[head], stage.cfg.select_metric)
        if stage.selection == "last" or score > result.best[head]:
            result.best[head], result.best_val[head] = score, val[head]
            new_best[head] = {"modules": {k: m.state_dict() for k, m in stage.modules.items()}, "epoch": epoch + 1,
                              "val": val[head]}
    train_loss = steplog.last.get("loss", 0.0)
    result.history.append({"epoch": epoch + 1, "train_loss": train_loss,
                           "val_accuracy": {k: v["accuracy"] for k, v in val.items()},
                           "val_score": {k: selection_score(v, stage.cfg.select_metric) for k, v in val.items()},
                           "val_predicted_fake": {k: v["predicted_fake"] for k, v in val.items()}})
    best_epoch = {head: state["epoch"] for head, state in new_best.items()}
    patience, last_best = stage.cfg.patience, max([*result.best_epoch.values(), *best_epoch.values(), 0])
    result.stopped_early = (bool(patience) and stage.selection != "last" and epoch + 1 < stage.epochs
                            and epoch + 1 - last_best >= patience)
    if result.stopped_early and distributed.is_main():
        log.info("%s: stopped after epoch %d/%d: no better validation %s for %d epoch(s)", stage.name, epoch + 1,
                 stage.epochs, stage.cfg.select_metric, patience)
    record = {"modules": {k: m.state_dict() for k, m in stage.modules.items()},
              "optimizers": {k: o.state_dict() for k, o in stage.optimizers.items()},
              "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
              "epoch": epoch + 1, "best": result.best, "best_epoch": {**result.best_epoch, **best_epoch},
              "history": result.history, "rng": capture_rng(gen), "clock": vars(result.clock),
              "best_val": result.best_val, "stopped_early": result.stopped_early}
    distributed.barrier(f"{stage.name} epoch {epoch + 1}: end of epoch")
    if distributed.is_main():  # the modules and banks are the same on every rank: rank 0 alone writes
        manager.save(record, new_best)
    distributed.barrier(f"{stage.name} epoch {epoch + 1}: checkpoint written")
    result.best_epoch = record["best_epoch"]
