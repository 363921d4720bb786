"""Command line: ``cmc-fast train``, ``cmc-fast evaluate``, ``cmc-fast data check``.

User mistakes and bad files (``UsageError``; a loss that stopped being finite) end with one line naming the
argument or file and what is wrong, exit code 2, no traceback; the line also goes to the run folder's ``log.txt``
once the folder is held. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from cmc_fast.config import DATASETS, NEGATIVES, VARIANTS, Config, preset
from cmc_fast.errors import UsageError
from cmc_fast.rundir import claim


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
              "text_pretrain_epochs", "text_pretrain_lr", "shared_loss", "log_every", "max_image_bytes",
              "max_image_pixels")


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
    tr.add_argument("--max-image-bytes", type=int, metavar="N", help="image files larger than N bytes are skipped "
                    "and reported (default 64 MiB)")
    tr.add_argument("--max-image-pixels", type=int, metavar="N", help="images whose header says more than N pixels "
                    "are skipped and reported before decoding (default 40 million)")
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


def _read_run_config(run_dir: Path, flag: str) -> Config:
    path = run_dir / "config.json"
    if not path.is_file():
        raise UsageError(f"{flag}: {run_dir} is not a cmc-fast run directory (no config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag}: {path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag}: {path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{flag}: {path}: expected a JSON object of config keys")
    return Config.from_dict(data, source=f"{flag}: {path}")


def _train(args: argparse.Namespace, held: list[Path]) -> int:
    from cmc_fast.trainer import Trainer

    if args.resume:
        run_dir = Path(args.resume)
        cfg = _read_run_config(run_dir, "--resume")
        applied = _resume_flags(args, cfg)
        with claim(run_dir, flag="--resume", allow_foreign=True) as notes:
            held.append(run_dir)
            _say(run_dir, notes + applied)
            return _run(Trainer(cfg, run_dir, resume=True))
    cfg = config_from_args(args)
    run_dir = Path(cfg.out or f"runs/{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg.out = str(run_dir)
    with claim(run_dir, flag="--out") as notes:
        held.append(run_dir)
        _say(run_dir, notes)
        return _run(Trainer(cfg, run_dir))


# flags a resumed run applies (where and how it runs, not what it trains); every other flag is refused
_RESUME_APPLIES = ("device", "threads", "no_progress")


def _resume_flags(args: argparse.Namespace, cfg: Config) -> list[str]:
    """Apply ``_RESUME_APPLIES`` to the saved config (returned as notes); refuse any other flag given beside
    ``--resume``: the run continues with its saved configuration, so such a flag would be silently ignored."""
    defaults = vars(build_parser().parse_args(["train"]))
    given = {k: v for k, v in vars(args).items() if k in defaults and k != "resume" and v != defaults[k]}
    refused = sorted(f"--{k.replace('_', '-')}" for k in given if k not in _RESUME_APPLIES)
    if refused:
        raise UsageError(f"--resume continues {args.resume} with its saved config.json; {', '.join(refused)} "
                         "would change what it trains: drop them, or start a new run with --out")
    cfg.progress = not args.no_progress and sys.stderr.isatty()
    notes = []
    for name in ("device", "threads"):
        if name in given:
            notes.append(f"resume: --{name} {given[name]} applied (saved: {getattr(cfg, name)})")
            setattr(cfg, name, given[name])
    cfg.validate()
    return notes


def _say(run_dir: Path, lines: list[str], prefix: str = "cmc-fast: ") -> None:
    """Each line on stderr and appended to the held run folder's log.txt (in the trainer's log format)."""
    level = logging.ERROR if "error" in prefix else logging.INFO
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    for line in lines:
        print(f"{prefix}{line}", file=sys.stderr)
    try:
        with open(run_dir / "log.txt", "a", encoding="utf-8") as f:
            for line in lines:
                record = logging.makeLogRecord({"msg": line, "levelno": level,
                                                "levelname": logging.getLevelName(level)})
                f.write(fmt.format(record) + "\n")
    except OSError:
        pass  # the line is on stderr; a folder that cannot take it was already reported


def _run(trainer) -> int:
    from cmc_fast.report import text_table

    results = trainer.run()
    for line in getattr(trainer, "warnings", []):
        print(f"cmc-fast: warning: {line}", file=sys.stderr)
    print(text_table(results))
    print(f"\nrun directory: {trainer.run_dir} (report.md, metrics.json, checkpoints/)")
    return 0


def _evaluate(args: argparse.Namespace, held: list[Path]) -> int:
    from cmc_fast.trainer import Trainer

    run_dir = Path(args.run)
    cfg = _read_run_config(run_dir, "--run")
    cfg.progress = False
    if args.device:
        cfg.device = args.device
    with claim(run_dir, flag="--run", allow_foreign=True) as notes:
        held.append(run_dir)
        _say(run_dir, notes)
        return _run(Trainer(cfg, run_dir, evaluate_only=True))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    held: list[Path] = []  # the run folder once claimed: where the error line is logged too
    try:
        if args.command == "train":
            return _train(args, held)
        if args.command == "evaluate":
            return _evaluate(args, held)
        if args.command == "data":
            if args._data_check is None:
                raise UsageError("data check is not available in this installation")
            return args._data_check.run(args)
    except (UsageError, FloatingPointError) as exc:  # a user's mistake, a bad file, a loss that diverged
        line = " ".join(str(exc).split())
        if held:
            _say(held[0], [line], prefix="cmc-fast: error: ")
        else:
            print(f"cmc-fast: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cmc-fast: interrupted; continue with `cmc-fast train --resume DIR`", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
