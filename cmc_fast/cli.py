"""Command line: ``cmc-fast train``, ``evaluate``, ``predict``, ``export``, ``tsne``, ``data check``: every
subcommand's flags and handler are here; the modules they drive know nothing of the command line.

User mistakes and bad files (``UsageError``; a loss that stopped being finite) end with one line naming the
argument or file and what is wrong, exit code 2, no traceback; the line also goes to the run folder's ``log.txt``
(through ``rundir.log_to``, its one writer) once the folder is held. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import time
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path

from cmc_fast.config import DATASETS, Config, config_flag, preset, read_run_config
from cmc_fast.data_pipeline import check as data_check
from cmc_fast.data_pipeline import safe_io
from cmc_fast.data_pipeline.safe_io import FileRefused
from cmc_fast.errors import CollectiveFailure, UsageError
from cmc_fast.recipes import configure, sized_by_data
from cmc_fast.rundir import RunLogHandler, claim, clear_run, log_to, refuse_existing_run

log = logging.getLogger("cmc_fast")


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

    pr = sub.add_parser("predict", help="score new posts (JSONL/CSV manifest) with a trained run or bundle")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="DIR", help="a finished run directory")
    src.add_argument("--bundle", metavar="DIR", help="a bundle written by `cmc-fast export`")
    pr.add_argument("--input", required=True, metavar="FILE", help="JSONL or CSV with text, image, optional id")
    pr.add_argument("--variant", default=None, help="with --run: the variant to score with (default cmc)")
    pr.add_argument("--out", metavar="FILE.jsonl", help="where the JSON lines go (default stdout)")
    pr.add_argument("--batch-size", type=int, default=64, help="posts scored at a time (memory is bounded by it)")
    pr.add_argument("--device", default="auto",
                    help="auto (default: CUDA when present, as training), cpu or cuda[:N]")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")

    ex = sub.add_parser("export", help="write a trained variant as a pickle-free bundle (safetensors + JSON)")
    ex.add_argument("--run", required=True, metavar="DIR", help="a finished run directory")
    ex.add_argument("--out", required=True, metavar="BUNDLE", help="a new folder for the bundle")
    ex.add_argument("--variant", default="cmc", help="the variant to export (default cmc)")

    ts = sub.add_parser("tsne", help="the paper's Fig. 2: t-SNE of fine-tuned vs CMC features (PNG + JSON)")
    ts.add_argument("--run", required=True, metavar="DIR", help="a finished run (fine-tuned and/or CMC variants)")
    ts.add_argument("--split", default="test", choices=("test", "train"), help="whose posts (default test)")
    ts.add_argument("--out", metavar="DIR", help="where tsne.png and tsne.json go (default the run directory)")
    ts.add_argument("--max-points", type=int, default=1000, help="posts sampled at most (t-SNE is quadratic)")
    ts.add_argument("--seed", type=int, default=0)
    ts.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    data_check.add_arguments(data_sub.add_parser("check", help="parse a dataset and report what is usable"))
    for subparsers in (sub, data_sub):  # every subcommand's --help opens with what it does and shows defaults
        for action in subparsers._choices_actions:
            command = subparsers.choices[action.dest]
            command.description = command.description or action.help
            command.formatter_class = _HelpFormatter
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated configuration ``train``'s flags ask for (``assemble_config``)."""
    return assemble_config(args)[0]


def assemble_config(args: argparse.Namespace, train_posts: int | None = None) -> tuple[Config, dict]:
    """The dataset's preset, then ``--config FILE``, then every flag given (the tiny image model, having no
    pretrained weights, implies --image-weights none unless weights were asked for), validated; and how
    ``recipes.configure`` chose the training values (the report states the recipe that ran), for a training split
    of ``train_posts`` posts where the data has been read."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    overrides = Config.read_overrides(args.config) if args.config else {}
    dataset = given.get("dataset") or overrides.get("dataset", "synthetic")
    cfg, recipe = configure(dataset, {**overrides, **given}, train_posts)
    changes: dict = {"progress": cfg.progress and sys.stderr.isatty()}
    no_weights = isinstance(cfg.image_weights, str) and cfg.image_weights.lower() == "none"
    if no_weights or (cfg.image_model == "tiny" and "image_weights" not in given and "image_weights" not in overrides):
        changes["image_weights"] = None
    if args.synthetic_n:
        changes["synthetic_train"], changes["synthetic_test"] = args.synthetic_n
    return dataclasses.replace(cfg, **changes).validate(), recipe


@contextlib.contextmanager
def _hold(run_dir: Path, logs: contextlib.ExitStack, **claim_options) -> Iterator[list[str]]:
    """``rundir.claim`` by the process that writes the run folder: rank 0 of a torchrun job (the others write
    nothing there), or the only process. Once held, the folder's log.txt takes the toolkit's log until the command
    ends (``logs`` closes it after its error line, if any)."""
    from cmc_fast import distributed

    if distributed.rank_from_env() != 0:
        yield []
        return
    with claim(run_dir, **claim_options) as notes:
        logs.enter_context(log_to(run_dir))
        yield notes


def _train(args: argparse.Namespace, logs: contextlib.ExitStack) -> int:
    from cmc_fast import distributed
    from cmc_fast.trainer import Trainer

    if args.resume:
        if args.overwrite:
            raise UsageError("--overwrite: deletes the run --resume would continue; give one of the two")
        run_dir = Path(args.resume)
        cfg, applied = _resumed_config(args, read_run_config(run_dir, "--resume", resume=True))
        with _hold(run_dir, logs, flag="--resume", allow_foreign=True) as notes:
            _say(notes + applied)
            return _run(Trainer(cfg, run_dir, resume=True))
    cfg, recipe = assemble_config(args)
    if cfg.out is None and distributed.launched():
        raise UsageError("--out: required under torchrun (every process must name the same run directory)")
    run_dir = Path(cfg.out or f"runs/{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = dataclasses.replace(cfg, out=str(run_dir))
    refuse_existing_run(run_dir, overwrite=args.overwrite)
    trainer = Trainer(cfg, run_dir, recipe=recipe)
    trainer.check_inputs()  # arguments and data, before any folder is made
    if sized_by_data(cfg):  # the n-gram recipe follows the size of the training split, read just now
        sized, recipe = assemble_config(args, train_posts=len(trainer.records.train))
        trainer.reconfigure(dataclasses.replace(sized, out=cfg.out), recipe)
    with _hold(run_dir, logs, flag="--out") as notes:
        if distributed.rank_from_env() == 0:
            # again, now that no one else can start there
            refuse_existing_run(run_dir, overwrite=args.overwrite, held=True)
            notes += clear_run(run_dir) if args.overwrite else []
        _say(notes)
        return _run(trainer)


# flags a resumed run applies (where and how it runs, not what it trains); every other flag is refused
_RESUME_APPLIES = ("device", "threads", "progress")


def _resumed_config(args: argparse.Namespace, saved: Config) -> tuple[Config, list[str]]:
    """The saved config with ``_RESUME_APPLIES`` applied (and the notes saying so); any other flag given beside
    ``--resume`` is refused: the run continues with its saved configuration, so such a flag would be silently
    ignored. (Config flags not typed are absent from ``args``; --config and --synthetic-n default to None.)"""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    given = {k: v for k, v in vars(args).items() if k in fields or (k in ("config", "synthetic_n") and v is not None)}
    refused = sorted(config_flag(fields[k]) if k in fields else f"--{k.replace('_', '-')}"
                     for k in given if k not in _RESUME_APPLIES)
    if refused:
        raise UsageError(f"--resume continues {args.resume} with its saved config.json; {', '.join(refused)} "
                         "would change what it trains: drop them, or start a new run with --out")
    applied = {name: given[name] for name in ("device", "threads") if name in given}
    notes = [f"resume: --{name} {value} applied (saved: {getattr(saved, name)})" for name, value in applied.items()]
    cfg = dataclasses.replace(saved, progress=getattr(args, "progress", True) and sys.stderr.isatty(), **applied)
    return (cfg.validate() if applied else cfg), notes


def _say(lines: list[str], level: int = logging.INFO) -> None:
    """Each line on stderr, and in the held run folder's log.txt (when one is held)."""
    console = "cmc-fast: error: " if level >= logging.ERROR else "cmc-fast: "
    for line in lines:
        print(f"{console}{line}", file=sys.stderr)
        if any(isinstance(h, RunLogHandler) for h in log.handlers):
            log.log(level, line)


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
    if distributed.rank_from_env() == 0:
        log.addHandler(console)
    try:
        results = trainer.run()
    except RuntimeError as exc:  # say which rank failed before the group goes (cli.main prints the message)
        if distributed.is_collective_failure(exc):
            raise CollectiveFailure(distributed.failure_message(exc)) from exc
        raise
    finally:
        log.removeHandler(console)
        distributed.shutdown()
    if distributed.rank_from_env() == 0:
        print(text_table(results))
        print(f"\nrun directory: {trainer.run_dir} (report.md, metrics.json, checkpoints/)")
    return 0


def _evaluate(args: argparse.Namespace, logs: contextlib.ExitStack) -> int:
    from cmc_fast.trainer import Trainer

    run_dir = Path(args.run)
    cfg = dataclasses.replace(read_run_config(run_dir, "--run"), progress=False)
    if args.device:
        cfg = dataclasses.replace(cfg, device=args.device).validate()
    with _hold(run_dir, logs, flag="--run", allow_foreign=True) as notes:
        _say(notes)
        return _run(Trainer(cfg, run_dir, evaluate_only=True, figures=args.figures))


def _predict(args: argparse.Namespace) -> int:
    from cmc_fast.detector import Detector
    from cmc_fast.predict import predict_file

    path = Path(args.input)
    if not os.path.lexists(path):
        raise UsageError(f"--input: file not found: {path}")
    problem = safe_io.file_problem(path, allow_empty=True)  # a pipe, a device, a folder: refused unopened
    if problem:
        raise UsageError(f"--input: {problem}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.bundle and args.variant:
        raise UsageError("--variant: a bundle holds one variant already; use it with --run")
    progress = not args.no_progress and sys.stderr.isatty()
    with contextlib.ExitStack() as stack:
        # --out is checked before the model loads, written beside itself and renamed once complete: never the
        # input, never two writers at once, left as it was when the run fails
        inputs = (path, *_model_files(Path(args.run or args.bundle)))
        out = (stack.enter_context(safe_io.replacing_output(args.out, "--out", inputs=inputs)) if args.out
               else sys.stdout)
        detector = (Detector.from_bundle(args.bundle, device=args.device) if args.bundle else
                    Detector.from_run(args.run, args.variant or "cmc", device=args.device))
        summary = predict_file(detector, path, out, batch_size=args.batch_size, progress=progress)
    print(f"{detector.variant} ({detector.source}): {summary.line()}", file=sys.stderr)
    if detector.uses_images and summary.posts and summary.text_only == summary.posts:
        print(f"cmc-fast: error: no image of {path} could be used, so no post was scored by {detector.variant} "
              "itself, only by its text branch (see the lines above; image paths are relative to the input file)",
              file=sys.stderr)
        return 1
    return 1 if summary.failed else 0


def _model_files(folder: Path) -> list[Path]:
    """The files of a run or bundle folder and its sub-folders (one level): none may be ``--out``."""
    if not folder.is_dir():
        return []
    subfolders = [d for d in folder.iterdir() if d.is_dir() and not d.is_symlink()]
    return [*folder.iterdir(), *(f for d in subfolders for f in d.iterdir())]


def _export(args: argparse.Namespace) -> int:
    from cmc_fast.export import export_bundle

    out = Path(args.out)
    fresh = not out.exists()
    try:
        export_bundle(args.run, out, args.variant)
    except BaseException:
        if fresh and out.exists():  # never leave half a bundle behind
            shutil.rmtree(out)
        raise
    print(f"bundle written: {out} (model.safetensors, config.json, tokenizer/, README.md)")
    return 0


def _tsne(args: argparse.Namespace) -> int:
    from cmc_fast.tsne import make_tsne

    if args.max_points < 5:
        raise UsageError(f"--max-points: must be >= 5, got {args.max_points}")
    png, js = make_tsne(args.run, args.split, args.out, max_points=args.max_points, seed=args.seed,
                        device=args.device)
    print(f"t-SNE written: {png} and {js}")
    return 0


def _dispatch(args: argparse.Namespace, logs: contextlib.ExitStack) -> int:
    if args.command == "train":
        return _train(args, logs)
    if args.command == "evaluate":
        return _evaluate(args, logs)
    if args.command == "data":
        return data_check.run(args)
    return {"predict": _predict, "export": _export, "tsne": _tsne}[args.command](args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a bad flag or choice (2; its one line is already printed)
        return int(exc.code or 0)
    with contextlib.ExitStack() as logs:  # the run folder's log.txt once held: where the error line is logged too
        try:
            with _dataset_warnings_in_our_words():
                return _dispatch(args, logs)
        except (UsageError, FileRefused, FloatingPointError) as exc:  # a user's mistake, a bad file, a diverged loss
            _say([" ".join(str(exc).split())], logging.ERROR)
            return 2
        except CollectiveFailure as exc:
            print(f"cmc-fast: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("cmc-fast: interrupted; continue with `cmc-fast train --resume DIR`", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
