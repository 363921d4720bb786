"""Command line: ``cmc-fast train``, ``evaluate``, ``predict``, ``export``, ``tsne``, ``data check``.

User mistakes end with one line naming the argument and the valid choices, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
import typing
from pathlib import Path

from cmc_fast.config import Config, preset
from cmc_fast.errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints the whole usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _pair(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers A,B (e.g. 256,128), got {text!r}") from None
    return a, b


def config_flag(f: dataclasses.Field) -> str:
    """The command-line flag of a Config field: its metadata's, ``--no-x`` for a boolean x that defaults to True,
    else ``--x`` (underscores as dashes)."""
    name = f.name.replace("_", "-")
    return f.metadata.get("flag") or (f"--no-{name}" if f.default is True else f"--{name}")


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field, from the field's own definition (type, help, choices). Flags not given stay out
    of the parsed namespace (argparse.SUPPRESS), so only what the user typed overrides the preset."""
    types = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if not f.metadata.get("cli", True):
            continue
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help") or None}
        kind = types[f.name]
        if kind is bool:
            kwargs["action"] = "store_false" if f.default is True else "store_true"
        else:
            optional = type(None) in typing.get_args(kind)  # X | None: parse as X
            base = next(t for t in typing.get_args(kind) if t is not type(None)) if optional else kind
            kwargs["type"] = _pair if typing.get_origin(base) is tuple else base
            kwargs["choices"] = f.metadata.get("choices")
            kwargs["metavar"] = f.metadata.get("metavar") or (
                "{" + ",".join(kwargs["choices"]) + "}" if kwargs["choices"] else None)
        parser.add_argument(config_flag(f), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cmc-fast", description="CMC multi-modal fake-news detection, fast.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tr = sub.add_parser("train", help="train the CMC variants and write a run directory")
    _add_config_options(tr)
    tr.add_argument("--config", help="JSON file of config keys, applied over the dataset's preset")
    tr.add_argument("--resume", metavar="DIR", help="continue the killed run in DIR with its saved config")
    tr.add_argument("--synthetic-n", type=_pair, metavar="TRAIN,TEST", help="posts generated for --dataset synthetic")

    ev = sub.add_parser("evaluate", help="re-score a finished run's checkpoints on its test split")
    ev.add_argument("--run", required=True, metavar="DIR")
    ev.add_argument("--device", default=None)

    for module in ("predict", "bundle", "tsne"):  # predict, export, tsne: each module parses its own flags
        importlib.import_module(f"cmc_fast.{module}").add_parser(sub)

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
    """The dataset's preset, then ``--config FILE``, then every flag given (the tiny image model, having no
    pretrained weights, implies --image-weights none unless weights were asked for)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    overrides = Config.read_overrides(args.config) if args.config else {}
    dataset = given.get("dataset") or overrides.get("dataset", "synthetic")
    cfg = dataclasses.replace(preset(dataset), **{**overrides, **given})
    if isinstance(cfg.image_weights, str) and cfg.image_weights.lower() == "none":
        cfg.image_weights = None
    if cfg.image_model == "tiny" and "image_weights" not in given and "image_weights" not in overrides:
        cfg.image_weights = None
    if args.synthetic_n:
        cfg.synthetic_train, cfg.synthetic_test = args.synthetic_n
    cfg.progress = cfg.progress and sys.stderr.isatty()
    return cfg.validate()


def _train(args: argparse.Namespace) -> int:
    from cmc_fast.trainer import Trainer

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").is_file():
            raise UsageError(f"--resume: {run_dir} is not a cmc-fast run directory (no config.json)")
        cfg = Config.from_dict(json.loads((run_dir / "config.json").read_text()), source=str(run_dir / "config.json"))
        cfg.progress = getattr(args, "progress", True) and sys.stderr.isatty()
        return _run(Trainer(cfg, run_dir, resume=True))
    cfg = config_from_args(args)
    run_dir = Path(cfg.out or f"runs/{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg.out = str(run_dir)
    return _run(Trainer(cfg, run_dir))


def _run(trainer) -> int:
    from cmc_fast.report import text_table

    results = trainer.run()
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a bad flag or choice (2; its one line is already printed)
        return int(exc.code or 0)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if hasattr(args, "_command"):
            return args._command(args)
        if args.command == "data":
            if args._data_check is None:
                raise UsageError("data check is not available in this installation")
            return args._data_check.run(args)
    except UsageError as exc:
        print(f"cmc-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cmc-fast: interrupted; continue with `cmc-fast train --resume DIR`", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
