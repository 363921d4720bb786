"""Command line: ``cmc-fast train``, ``cmc-fast evaluate``, ``cmc-fast data check``.

User mistakes end with one line naming the argument and the valid choices, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from cmc_fast.config import DATASETS, NEGATIVES, VARIANTS, Config, preset
from cmc_fast.errors import CollectiveFailure, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints the whole usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _pair(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers A,B (e.g. 256,128), got {text!r}") from None
    return a, b


# CLI flag -> Config field, for flags whose value is copied over the preset when given
_OVERRIDES = ("data_root", "variant", "epochs", "fusion_epochs", "batch_size", "text_model", "image_model",
              "image_weights", "negatives", "nce_k", "seed", "max_len", "image_size", "image_backend", "text_lr",
              "image_lr", "fusion_lr", "mm_dim", "chunks", "rank", "val_fraction", "val_split", "group_sampling",
              "device", "alpha", "beta", "tiny_text_dim", "tiny_text_layers", "threads",
              "tiny_text_dropout", "lr_schedule",
              "text_pretrain_epochs", "text_pretrain_lr", "shared_loss", "log_every", "bank_dtype")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cmc-fast", description="CMC multi-modal fake-news detection, fast.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tr = sub.add_parser("train", help="train the CMC variants and write a run directory")
    tr.add_argument("--dataset", default=None, help=f"one of {', '.join(DATASETS)} (default synthetic)")
    tr.add_argument("--data-root", default=None, help="dataset directory (synthetic: where to generate it)")
    tr.add_argument("--variant", default=None, help=f"'all' or a comma list of {', '.join(VARIANTS)}")
    tr.add_argument("--epochs", type=int, help="stage-1 (and single-modality, cmc-shared) epochs")
    tr.add_argument("--fusion-epochs", type=int, help="stage-2 (BLOCK) epochs")
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--amp", action="store_true", help="bfloat16 autocast (the NCE loss stays float32)")
    tr.add_argument("--compile", action="store_true", help="torch.compile each stage's forward + loss")
    tr.add_argument("--text-model", help="tiny (small BERT), ngram (fastText-style bag of n-grams), a local "
                    "Hugging Face directory, or a cached hub id")
    tr.add_argument("--image-model", help="tiny, vgg19 or resnet50")
    tr.add_argument("--image-weights", help="imagenet (torch cache), a .pth file, or none")
    tr.add_argument("--negatives", choices=None, help=f"one of {', '.join(NEGATIVES)}")
    tr.add_argument("--nce-k", type=int, help="negatives per anchor")
    tr.add_argument("--bank-dtype", metavar="{float32,bfloat16}",
                    help="memory banks' storage (bfloat16: half the memory, for large corpora)")
    tr.add_argument("--shared-loss", help="cmc-shared: fused (default, the paper's baseline: fused CE only) or "
                    "fused+distill (adds CE_T, CE_V and both NCE terms)")
    tr.add_argument("--log-every", type=int, help="training steps between reads of the logs (one host sync each)")
    tr.add_argument("--max-len", type=int, help="text tokens kept (head + tail)")
    tr.add_argument("--tiny-text-dim", type=int, help="width of the tiny / ngram text model")
    tr.add_argument("--tiny-text-layers", type=int, help="layers of the tiny text model")
    tr.add_argument("--tiny-text-dropout", type=float, help="dropout of the tiny / ngram text model (0.1 / 0.3)")
    tr.add_argument("--text-pretrain-epochs", type=int,
                    help="masked-LM pre-training of the tiny text model on the training texts first (0: off)")
    tr.add_argument("--text-pretrain-lr", type=float, help="AdamW learning rate of that pre-training (1e-3)")
    tr.add_argument("--image-size", type=_pair, help="H,W of the training images")
    tr.add_argument("--image-backend", help="auto, dali, torchvision or pil")
    tr.add_argument("--image-stream", action="store_true",
                    help="decode images from the files every epoch instead of once into the uint8 cache")
    tr.add_argument("--text-lr", type=float)
    tr.add_argument("--image-lr", type=float)
    tr.add_argument("--fusion-lr", type=float)
    tr.add_argument("--mm-dim", type=int)
    tr.add_argument("--chunks", type=int)
    tr.add_argument("--rank", type=int)
    tr.add_argument("--alpha", type=float)
    tr.add_argument("--beta", type=float)
    tr.add_argument("--lr-schedule", metavar="{constant,linear,cosine}",
                    help="per-step learning rate: constant (default), or warm-up then linear/cosine decay to 0")
    tr.add_argument("--val-fraction", type=float)
    tr.add_argument("--val-split", metavar="{grouped,random}",
                    help="grouped (default): near-duplicate posts never straddle the fit/validation cut")
    tr.add_argument("--group-sampling", type=float, metavar="P",
                    help="sample a training post in a near-duplicate group of size s with weight s^-P (0..1)")
    tr.add_argument("--device", help="auto, cpu or cuda[:N]")
    tr.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    tr.add_argument("--out", help="run directory (default runs/<dataset>-<time>)")
    tr.add_argument("--config", help="JSON file of config keys, applied over the dataset's preset")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--resume", metavar="DIR", help="continue the killed run in DIR with its saved config")
    tr.add_argument("--synthetic-n", type=_pair, metavar="TRAIN,TEST", help="posts generated for --dataset synthetic")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")

    ev = sub.add_parser("evaluate", help="re-score a finished run's checkpoints on its test split")
    ev.add_argument("--run", required=True, metavar="DIR")
    ev.add_argument("--device", default=None)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    check = data_sub.add_parser("check", help="parse a dataset and report what is usable")
    try:
        from cmc_fast.data_pipeline import check as data_check
    except ImportError:
        data_check = None
    if data_check is not None:
        data_check.add_arguments(check)
    check.set_defaults(_data_check=data_check)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    if args.config:
        overrides = Config.read_overrides(args.config)
        cfg = dataclasses.replace(preset(args.dataset or overrides.get("dataset", "synthetic")), **overrides)
    else:
        cfg = preset(args.dataset or "synthetic")
    for name in _OVERRIDES:
        value = getattr(args, name, None)
        if value is not None:
            if name == "image_weights" and value.lower() == "none":
                value = None
            setattr(cfg, name, value)
    if args.dataset:
        cfg.dataset = args.dataset
    if args.synthetic_n:
        cfg.synthetic_train, cfg.synthetic_test = args.synthetic_n
    cfg.amp = cfg.amp or args.amp
    cfg.compile = cfg.compile or args.compile
    cfg.image_cache = cfg.image_cache and not args.image_stream
    cfg.progress = not args.no_progress and sys.stderr.isatty()
    cfg.out = args.out or cfg.out
    return cfg.validate()


def _train(args: argparse.Namespace) -> int:
    from cmc_fast.trainer import Trainer

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").is_file():
            raise UsageError(f"--resume: {run_dir} is not a cmc-fast run directory (no config.json)")
        cfg = Config.from_dict(json.loads((run_dir / "config.json").read_text()), source=str(run_dir / "config.json"))
        cfg.progress = not args.no_progress and sys.stderr.isatty()
        return _run(Trainer(cfg, run_dir, resume=True))
    cfg = config_from_args(args)
    run_dir = Path(cfg.out or f"runs/{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg.out = str(run_dir)
    return _run(Trainer(cfg, run_dir))


def _run(trainer) -> int:
    from cmc_fast import distributed
    from cmc_fast.report import text_table

    try:
        results = trainer.run()
    except RuntimeError as exc:  # say which rank failed before the group goes (cli.main prints the message)
        if distributed.is_collective_failure(exc):
            raise CollectiveFailure(distributed.failure_message(exc)) from exc
        raise
    finally:
        distributed.shutdown()
    if distributed.rank_from_env() == 0:
        print(text_table(results))
        print(f"\nrun directory: {trainer.run_dir} (report.md, metrics.json, checkpoints/)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from cmc_fast.trainer import Trainer

    run_dir = Path(args.run)
    if not (run_dir / "config.json").is_file():
        raise UsageError(f"--run: {run_dir} is not a cmc-fast run directory (no config.json)")
    cfg = Config.from_dict(json.loads((run_dir / "config.json").read_text()), source=str(run_dir / "config.json"))
    cfg.progress = False
    if args.device:
        cfg.device = args.device
    return _run(Trainer(cfg, run_dir, evaluate_only=True))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "data":
            if args._data_check is None:
                raise UsageError("data check is not available in this installation")
            return args._data_check.run(args)
    except UsageError as exc:
        print(f"cmc-fast: error: {exc}", file=sys.stderr)
        return 2
    except CollectiveFailure as exc:
        print(f"cmc-fast: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cmc-fast: interrupted; continue with `cmc-fast train --resume DIR`", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
