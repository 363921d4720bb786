"""``cmc-fast export``: a finished run's variant written as a bundle (the format: ``bundle.py``), with its model
card (data, variant, the run's test metrics, the command that trained it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from cmc_fast.bundle import CARD, CONFIG, FORMAT, FORMAT_VERSION, WEIGHTS
from cmc_fast.checkpoint import write_json, write_text
from cmc_fast.config import Config, config_flag, preset
from cmc_fast.data_pipeline import safe_io
from cmc_fast.detector import Detector
from cmc_fast.errors import UsageError
from cmc_fast.recipes import ENCODER_KEYS, recipe_base
from cmc_fast.variants import VARIANTS


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
    dataset's preset (the CLI's own flag names, ``config.config_flag``); fields a flag cannot express go through
    ``--config``."""
    base, tuned = preset(cfg.dataset), recipe_base(cfg)  # encoders against the preset, the rest their recipe
    flags, rest = [f"--dataset {cfg.dataset}"], {}
    skip = ("dataset", "out", "progress", "synthetic_train", "synthetic_test")
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if f.name in skip or value == getattr(base if f.name in ENCODER_KEYS else tuned, f.name):
            continue
        if f.name in _LOCAL_PATHS and value is not None and value not in _NAMED.get(f.name, ()):
            flags.append(f"{config_flag(f)} {_LOCAL_PATHS[f.name]}")  # a path of the machine it was trained on
        elif f.name == "image_weights" and value is None:
            flags.append(f"{config_flag(f)} none")
        elif not f.metadata.get("cli", True) or value is None:
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
    if rest:  # bash's process substitution: the command stays one line that runs as it is
        flags.append(f"--config <(echo '{json.dumps(rest)}')")
    return "cmc-fast train " + " ".join(flags)


# fields that hold a path of the machine a run was trained on: the model card shows a placeholder instead
_LOCAL_PATHS = {"data_root": "DATA_DIR", "text_model": "TEXT_MODEL_DIR", "image_weights": "IMAGE_WEIGHTS_FILE"}
_NAMED = {"text_model": ("tiny", "ngram"), "image_weights": ("imagenet",)}  # names, not paths


def _card_value(key: str, value):
    """A data summary's value as the card shows it: a path by its last part, a float rounded to 4 places."""
    if key == "root" and isinstance(value, str):
        return Path(value).name
    return round(value, 4) if isinstance(value, float) else value


def model_card(run_dir: Path, detector: Detector) -> str:
    metrics_path = run_dir / "metrics.json"
    metrics = safe_io.read_json(metrics_path) if os.path.lexists(metrics_path) else {}
    metrics = metrics if isinstance(metrics, dict) else {}
    row = metrics.get("results", {}).get(VARIANTS[detector.variant].row, {})
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
             "## Data", "", "```", *[f"{k}: {_card_value(k, v)}" for k, v in metrics.get("data", {}).items()],
             "```", "",
             "## Test metrics of the run (fake = positive class)", ""]
    if test:
        lines += ["| metric | value |", "|---|---:|", *[f"| {k} | {v:.4f} |" if isinstance(v, float) else
                                                      f"| {k} | {v} |" for k, v in test.items()], "",
                  f"Scored on {row.get('posts', 'the test split')}; validation accuracy "
                  f"{_card_value('val_accuracy', row.get('val_accuracy'))}."]
    else:
        lines.append(f"(no metrics.json row for {detector.variant} in {run_dir})")
    if metrics.get("notes"):
        lines += ["", "## Warnings of the run", "", *[f"- {note}" for note in metrics["notes"]]]
    lines += ["", "## How it was trained", "", "```bash", train_command(cfg), "```", "",
              "(Reconstructed from the run's config.json, which `config.json` here holds in full under `config`; "
              "replace DATA_DIR and the other capitalised placeholders by your own paths.)"]
    return "\n".join(lines) + "\n"
