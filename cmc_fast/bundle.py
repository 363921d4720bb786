"""A trained variant as a folder someone else can load without pickles: ``cmc-fast export --run DIR --out BUNDLE``.

    BUNDLE/model.safetensors   every network's weights: ``text.*``, ``image.*``, ``block.*``
    BUNDLE/config.json         the format, the variant and the run's configuration
    BUNDLE/tokenizer/          vocab.json (tiny / ngram) or the Hugging Face tokenizer's files
    BUNDLE/text_model/         a Hugging Face text model's config.json (the architecture; weights are above)
    BUNDLE/README.md           the model card: data, variant, the run's test metrics, the command that trained it

Reading a bundle parses JSON and safetensors only: nothing in it is unpickled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path

from cmc_fast.checkpoint import write_json, write_text
from cmc_fast.config import Config, preset
from cmc_fast.detector import Detector, build_parts, variant_key
from cmc_fast.errors import UsageError

FORMAT, FORMAT_VERSION = "cmc-fast-bundle", 1
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"


# ----------------------------------------------------------------------------------------------- write
def export_bundle(run_dir: str | Path, out: str | Path, variant: str = "cmc") -> Path:
    """Write ``variant`` of the finished run in ``run_dir`` as a bundle at ``out`` (a new or empty folder)."""
    from safetensors.torch import save_file

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out: {out} exists and is not empty; choose a new folder")
    detector = Detector.from_run(run_dir, variant)
    out.mkdir(parents=True, exist_ok=True)
    save_file(detector.state_dict(), str(out / WEIGHTS), metadata={"format": FORMAT, "variant": detector.variant})
    write_json({"format": FORMAT, "format_version": FORMAT_VERSION, "variant": detector.variant,
                "parts": sorted(detector.parts), "config": dataclasses.asdict(detector.cfg)}, out / CONFIG)
    _write_tokenizer(detector, out)
    write_text(model_card(run_dir, detector), out / CARD)
    _readable(out)
    return out


def _readable(out: Path) -> None:
    """Files as the umask allows (atomic writes create them 0600): a bundle is made to be handed on."""
    umask = os.umask(0)
    os.umask(umask)
    for path in out.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _write_tokenizer(detector: Detector, out: Path) -> None:
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    if hasattr(detector.tokenizer, "vocab") and detector.cfg.text_model in ("tiny", "ngram"):
        write_json(detector.tokenizer.vocab, tok_dir / "vocab.json")
        return
    detector.tokenizer.save_pretrained(str(tok_dir))
    if detector.text_net is not None:  # the architecture, to build the model without its original checkpoint
        detector.text_net.encoder.model.config.save_pretrained(str(out / "text_model"))


def train_command(cfg: Config) -> str:
    """A ``cmc-fast train`` command that trains this configuration: the flag of every field that differs from its
    dataset's preset (the CLI's own flag names, ``cli.config_flag``); fields a flag cannot express go through
    ``--config``."""
    from cmc_fast.cli import config_flag
    from cmc_fast.recipes import ENCODER_KEYS, recipe_base

    base, tuned = preset(cfg.dataset), recipe_base(cfg)  # encoders against the preset, the rest their recipe
    flags, rest = [f"--dataset {cfg.dataset}"], {}
    skip = ("dataset", "out", "progress", "synthetic_train", "synthetic_test")
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if f.name in skip or value == getattr(base if f.name in ENCODER_KEYS else tuned, f.name):
            continue
        if not f.metadata.get("cli", True) or value is None:
            rest[f.name] = value
        elif isinstance(value, bool):  # a boolean flag sets the opposite of the field's default
            if value == (f.default is not True):
                flags.append(config_flag(f))
            else:
                rest[f.name] = value
        elif isinstance(value, tuple | list):
            flags.append(f"{config_flag(f)} {','.join(map(str, value))}")
        else:
            flags.append(f"{config_flag(f)} {value}")
    if (cfg.synthetic_train, cfg.synthetic_test) != (base.synthetic_train, base.synthetic_test):
        flags.append(f"--synthetic-n {cfg.synthetic_train},{cfg.synthetic_test}")
    if rest:
        flags.append(f"--config <a JSON file holding {json.dumps(rest)}>")
    return "cmc-fast train " + " ".join(flags)


def model_card(run_dir: Path, detector: Detector) -> str:
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    row = metrics.get("results", {}).get({"finetune-t-all": "finetune-t (all posts)"}.get(detector.variant,
                                                                                          detector.variant), {})
    test = row.get("test", {})
    cfg = detector.cfg
    lines = [f"# cmc-fast detector: {detector.variant} on {cfg.dataset}", "",
             "A multi-modal fake-news detector (CMC, cross-modal knowledge distillation) exported by "
             "`cmc-fast export`. Load it with `Detector.from_bundle(DIR)` or `cmc-fast predict --bundle DIR`; "
             "loading reads safetensors and JSON only (nothing is unpickled).", "",
             "## Model", "",
             f"- variant: `{detector.variant}` (parts: {', '.join(sorted(detector.parts))})",
             f"- text model: `{cfg.text_model}`; image model: `{cfg.image_model}` at {cfg.image_size[0]}x"
             f"{cfg.image_size[1]} (H x W); max_len {cfg.max_len}",
             f"- posts without a usable image: scored by {detector.text_fallback or 'nothing (not scored)'}", "",
             "## Data", "", "```", *[f"{k}: {v}" for k, v in metrics.get("data", {}).items()], "```", "",
             "## Test metrics of the run (fake = positive class)", ""]
    if test:
        lines += ["| metric | value |", "|---|---:|", *[f"| {k} | {v:.4f} |" if isinstance(v, float) else
                                                      f"| {k} | {v} |" for k, v in test.items()], "",
                  f"Scored on {row.get('posts', 'the test split')}; validation accuracy {row.get('val_accuracy')}."]
    else:
        lines.append(f"(no metrics.json row for {detector.variant} in {run_dir})")
    lines += ["", "## How it was trained", "", "```", train_command(cfg), "```", "",
              "(Reconstructed from the run's config.json, which `config.json` here holds in full under `config`.)"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ read
def read_bundle(bundle_dir: Path):
    """(config, variant, tokenizer, parts with their weights loaded) from a bundle; JSON and safetensors only."""
    from safetensors.torch import load_file

    meta = _read_meta(bundle_dir)
    cfg = Config.from_dict(meta["config"], source=str(bundle_dir / CONFIG))
    variant = variant_key(meta["variant"])
    tokenizer = _read_tokenizer(bundle_dir, cfg)
    hf_dir = bundle_dir / "text_model"
    parts = build_parts(cfg, variant, tokenizer, str(hf_dir) if hf_dir.is_dir() else None)
    weights = load_file(str(bundle_dir / WEIGHTS))
    for name, module in parts.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    unknown = sorted({k.split(".", 1)[0] for k in weights} - set(parts))
    if unknown:
        raise UsageError(f"--bundle: {bundle_dir / WEIGHTS} holds weights of parts {unknown} that "
                         f"{variant} does not use")
    return cfg, variant, tokenizer, parts


def _read_meta(bundle_dir: Path) -> dict:
    for name in (CONFIG, WEIGHTS):
        if not (bundle_dir / name).is_file():
            raise UsageError(f"--bundle: {bundle_dir} is not a cmc-fast bundle (no {name})")
    try:
        meta = json.loads((bundle_dir / CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--bundle: {bundle_dir / CONFIG} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UsageError(f"--bundle: {bundle_dir / CONFIG} is not a {FORMAT} config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"--bundle: format version {meta.get('format_version')} is not the {FORMAT_VERSION} "
                         f"this cmc-fast reads")
    return meta


def _read_tokenizer(bundle_dir: Path, cfg: Config):
    tok_dir = bundle_dir / "tokenizer"
    if cfg.text_model in ("tiny", "ngram"):
        from cmc_fast.data_pipeline.text import VocabTokenizer

        return VocabTokenizer.load(tok_dir / "vocab.json")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


# ------------------------------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    ex = sub.add_parser("export", help="write a trained variant as a pickle-free bundle (safetensors + JSON)")
    ex.add_argument("--run", required=True, metavar="DIR", help="a finished run directory")
    ex.add_argument("--out", required=True, metavar="BUNDLE", help="a new folder for the bundle")
    ex.add_argument("--variant", default="cmc", help="the variant to export (default cmc)")
    ex.set_defaults(_command=run_export)


def run_export(args: argparse.Namespace) -> int:
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
