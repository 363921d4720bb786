"""Command line: ``cmc-fast train``, ``evaluate``, ``predict``, ``export``, ``tsne``, ``data check``.

User mistakes and bad files (``UsageError``; a loss that stopped being finite) end with one line naming the
argument or file and what is wrong, exit code 2, no traceback; the line also goes to the run folder's ``log.txt``
once the folder is held. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import logging
import os
import sys
import time
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path

from cmc_fast.config import DATASETS, Config, preset, read_run_config
from cmc_fast.data_pipeline import safe_io
from cmc_fast.data_pipeline.safe_io import FileRefused
from cmc_fast.errors import CollectiveFailure, UsageError
from cmc_fast.recipes import configure
from cmc_fast.rundir import claim, clear_run, refuse_existing_run


class _HelpFormatter(argparse.HelpFormatter):
    """Each flag's default after its help, unless the help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


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
        if kind is not bool and kwargs["help"]:
            kwargs["help"] += _default_text(f)
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


def _default_text(f: dataclasses.Field) -> str:
    """`` (default: X; D1, D2: Y)``: the field's default, and the dataset presets that set it otherwise."""
    def shown(value) -> str:
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    others: dict[str, list[str]] = {}
    for dataset in DATASETS if f.name != "dataset" else ():
        value = getattr(preset(dataset), f.name)
        if value != f.default:
            others.setdefault(shown(value), []).append(dataset)
    if f.default is None and not others:
        return ""  # the help says what happens when the flag is not given
    text = f"default: {shown(f.default)}" + "".join(f"; {', '.join(d)}: {v}" for v, d in others.items())
    return " (" + text.replace("%", "%%") + ")"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cmc-fast", description="CMC multi-modal fake-news detection, fast.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tr = sub.add_parser("train", help="train the CMC variants and write a run directory")
    _add_config_options(tr)
    tr.add_argument("--config", help="JSON file of config keys, applied over the dataset's preset")
    tr.add_argument("--resume", metavar="DIR", help="continue the killed run in DIR with its saved config")
    tr.add_argument("--overwrite", action="store_true",
                    help="when --out holds a run, delete everything in it first (otherwise refused)")
    tr.add_argument("--synthetic-n", type=_pair, metavar="TRAIN,TEST", help="posts generated for --dataset synthetic")

    ev = sub.add_parser("evaluate", help="re-score a finished run's checkpoints on its test split")
    ev.add_argument("--run", required=True, metavar="DIR", help="the run folder to re-score")
    ev.add_argument("--device", default=None, help="auto, cpu or cuda[:N] (default: the run's own)")
    ev.add_argument("--figures", action="store_true",
                    help="also redraw curves.png, confusion.png, roc.png and pr.png in the run folder (needs the "
                    "plots extra); otherwise evaluate writes only evaluate.json")

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
    for subparsers in (sub, data_sub):  # every subcommand's --help opens with what it does and shows defaults
        for action in subparsers._choices_actions:
            command = subparsers.choices[action.dest]
            command.description = command.description or action.help
            command.formatter_class = _HelpFormatter
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The dataset's preset, then ``--config FILE``, then every flag given (the tiny image model, having no
    pretrained weights, implies --image-weights none unless weights were asked for)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    overrides = Config.read_overrides(args.config) if args.config else {}
    dataset = given.get("dataset") or overrides.get("dataset", "synthetic")
    cfg, recipe = configure(dataset, {**overrides, **given})
    args.recipe_description = recipe  # the trainer's report states the recipe that ran
    if isinstance(cfg.image_weights, str) and cfg.image_weights.lower() == "none":
        cfg.image_weights = None
    if cfg.image_model == "tiny" and "image_weights" not in given and "image_weights" not in overrides:
        cfg.image_weights = None
    if args.synthetic_n:
        cfg.synthetic_train, cfg.synthetic_test = args.synthetic_n
    cfg.progress = cfg.progress and sys.stderr.isatty()
    return cfg.validate()


@contextlib.contextmanager
def _hold(run_dir: Path, **claim_options) -> Iterator[list[str]]:
    """``rundir.claim`` by the process that writes the run folder: rank 0 of a torchrun job (the others write
    nothing there), or the only process."""
    from cmc_fast import distributed

    if distributed.rank_from_env() != 0:
        yield []
        return
    with claim(run_dir, **claim_options) as notes:
        yield notes


def _train(args: argparse.Namespace, held: list[Path]) -> int:
    from cmc_fast import distributed
    from cmc_fast.trainer import Trainer

    if args.resume:
        if args.overwrite:
            raise UsageError("--overwrite: deletes the run --resume would continue; give one of the two")
        run_dir = Path(args.resume)
        cfg = read_run_config(run_dir, "--resume", resume=True)
        applied = _resume_flags(args, cfg)
        with _hold(run_dir, flag="--resume", allow_foreign=True) as notes:
            held.append(run_dir)
            _say(run_dir, notes + applied)
            return _run(Trainer(cfg, run_dir, resume=True))
    cfg = config_from_args(args)
    if cfg.out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--out: required under torchrun (every process must name the same run directory)")
    run_dir = Path(cfg.out or f"runs/{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg.out = str(run_dir)
    refuse_existing_run(run_dir, overwrite=args.overwrite)
    trainer = Trainer(cfg, run_dir, recipe=args.recipe_description)
    trainer.check_inputs()  # arguments and data, before any folder is made
    with _hold(run_dir, flag="--out") as notes:
        held.append(run_dir)
        if distributed.rank_from_env() == 0:
            # again, now that no one else can start there
            refuse_existing_run(run_dir, overwrite=args.overwrite, held=True)
            notes += clear_run(run_dir) if args.overwrite else []
        _say(run_dir, notes)
        return _run(trainer)


# flags a resumed run applies (where and how it runs, not what it trains); every other flag is refused
_RESUME_APPLIES = ("device", "threads", "progress")


def _resume_flags(args: argparse.Namespace, cfg: Config) -> list[str]:
    """Apply ``_RESUME_APPLIES`` to the saved config (returned as notes); refuse any other flag given beside
    ``--resume``: the run continues with its saved configuration, so such a flag would be silently ignored.
    (Config flags not typed are absent from ``args``; --config and --synthetic-n default to None.)"""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    given = {k: v for k, v in vars(args).items() if k in fields or (k in ("config", "synthetic_n") and v is not None)}
    refused = sorted(config_flag(fields[k]) if k in fields else f"--{k.replace('_', '-')}"
                     for k in given if k not in _RESUME_APPLIES)
    if refused:
        raise UsageError(f"--resume continues {args.resume} with its saved config.json; {', '.join(refused)} "
                         "would change what it trains: drop them, or start a new run with --out")
    cfg.progress = getattr(args, "progress", True) and sys.stderr.isatty()
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
        with safe_io.open_append(run_dir / "log.txt") as f:  # never through a link, never a pipe
            for line in lines:
                record = logging.makeLogRecord({"msg": line, "levelno": level,
                                                "levelname": logging.getLevelName(level)})
                f.write(fmt.format(record) + "\n")
    except (OSError, safe_io.FileRefused):
        pass  # the line is on stderr; a log that cannot take it is reported by the run that opens it


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "cmc-fast: warning: " if record.levelno >= logging.WARNING else "cmc-fast: "
        return prefix + record.getMessage()


@contextlib.contextmanager
def _dataset_warnings_in_our_words() -> Iterator[None]:
    """A reader's DatasetWarning (a kept-but-noteworthy condition) said once, as our one line, not as Python's
    warning with its source file and line."""
    from cmc_fast.data_pipeline.readers import DatasetWarning

    said: set[str] = set()
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, DatasetWarning):
            return default(message, category, filename, lineno, file, line)
        if str(message) not in said:
            said.add(str(message))
            print(f"cmc-fast: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        warnings.simplefilter("always", DatasetWarning)
        yield


def _run(trainer) -> int:
    from cmc_fast import distributed
    from cmc_fast.report import text_table

    # the toolkit's warnings (--amp skipped, a model collapsed to one class) and one line per epoch on stderr as
    # they happen, terminal or not (rank 0 alone under torchrun); they are also in log.txt and the report
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(lambda record: record.levelno >= logging.WARNING or getattr(record, "console", False))
    console.setFormatter(_ConsoleFormatter())
    toolkit_log = logging.getLogger("cmc_fast")
    if distributed.rank_from_env() == 0:
        toolkit_log.addHandler(console)
    try:
        results = trainer.run()
    except RuntimeError as exc:  # say which rank failed before the group goes (cli.main prints the message)
        if distributed.is_collective_failure(exc):
            raise CollectiveFailure(distributed.failure_message(exc)) from exc
        raise
    finally:
        toolkit_log.removeHandler(console)
        distributed.shutdown()
    if distributed.rank_from_env() == 0:
        print(text_table(results))
        print(f"\nrun directory: {trainer.run_dir} (report.md, metrics.json, checkpoints/)")
    return 0


def _evaluate(args: argparse.Namespace, held: list[Path]) -> int:
    from cmc_fast.trainer import Trainer

    run_dir = Path(args.run)
    cfg = read_run_config(run_dir, "--run")
    cfg.progress = False
    if args.device:
        cfg.device = args.device
    with _hold(run_dir, flag="--run", allow_foreign=True) as notes:
        held.append(run_dir)
        _say(run_dir, notes)
        return _run(Trainer(cfg, run_dir, evaluate_only=True, figures=args.figures))


def _dispatch(args: argparse.Namespace, held: list[Path]) -> int:
    if args.command == "train":
        return _train(args, held)
    if args.command == "evaluate":
        return _evaluate(args, held)
    if hasattr(args, "_command"):  # predict, export, tsne
        return args._command(args)
    if args.command == "data":
        if args._data_check is None:
            raise UsageError("data check is not available in this installation")
        return args._data_check.run(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a bad flag or choice (2; its one line is already printed)
        return int(exc.code or 0)
    held: list[Path] = []  # the run folder once claimed: where the error line is logged too
    try:
        with _dataset_warnings_in_our_words():
            return _dispatch(args, held)
    except (UsageError, FileRefused, FloatingPointError) as exc:  # a user's mistake, a bad file, a diverged loss
        line = " ".join(str(exc).split())
        if held:
            _say(held[0], [line], prefix="cmc-fast: error: ")
        else:
            print(f"cmc-fast: error: {line}", file=sys.stderr)
        return 2
    except CollectiveFailure as exc:
        print(f"cmc-fast: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cmc-fast: interrupted; continue with `cmc-fast train --resume DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
