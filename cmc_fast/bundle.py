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
from cmc_fast.data_pipeline import safe_io
from cmc_fast.detector import RUN_PARTS, Detector, build_parts, variant_key
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


# ------------------------------------------------------------------------------------------------ read
def read_bundle(bundle_dir: Path):
    """(config, variant, tokenizer, parts with their weights loaded) from a bundle; JSON and safetensors only,
    every file through ``safe_io`` (regular files within bounds), the configuration validated as ``train``'s,
    the weights' names and shapes checked against the parts before any is loaded."""
    from safetensors.torch import load_file

    meta = _read_meta(bundle_dir)
    if not isinstance(meta.get("config"), dict):
        raise UsageError(f"--bundle: {bundle_dir / CONFIG}: 'config' must be a JSON object of config keys")
    cfg = Config.from_dict(meta["config"], source=f"--bundle: {bundle_dir / CONFIG}")
    variant = variant_key(str(meta.get("variant")))
    tokenizer = _read_tokenizer(bundle_dir, cfg)
    hf_dir = None
    if cfg.text_model not in ("tiny", "ngram") and "text" in RUN_PARTS[variant]:
        hf_dir = bundle_dir / "text_model"
        plain_hf_folder(hf_dir, "--bundle")  # the architecture comes from the bundle, never from a path it names
    parts = build_parts(cfg, variant, tokenizer, str(hf_dir) if hf_dir is not None else None)
    expected = {f"{name}.{key}": tuple(t.shape) for name, module in parts.items()
                for key, t in module.state_dict().items()}
    with safe_io.open_regular(bundle_dir / WEIGHTS) as f:  # checked, then loaded from this very file
        check_safetensors(f, bundle_dir / WEIGHTS, expected)
        fd_path = f"/proc/self/fd/{f.fileno()}"
        try:
            weights = load_file(fd_path if os.path.exists(fd_path) else str(bundle_dir / WEIGHTS))
        except Exception as exc:  # noqa: BLE001 - whatever the header check let through, one line
            raise UsageError(f"--bundle: {bundle_dir / WEIGHTS}: not a loadable safetensors file "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    for name, module in parts.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    return cfg, variant, tokenizer, parts


def _read_meta(bundle_dir: Path) -> dict:
    if not bundle_dir.is_dir():
        raise UsageError(f"--bundle: {bundle_dir} is not a folder")
    for name in (CONFIG, WEIGHTS):
        if not (bundle_dir / name).exists():
            raise UsageError(f"--bundle: {bundle_dir} is not a cmc-fast bundle (no {name})")
    meta = safe_io.read_json(bundle_dir / CONFIG)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UsageError(f"--bundle: {bundle_dir / CONFIG} is not a {FORMAT} config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"--bundle: format version {meta.get('format_version')!r} is not the {FORMAT_VERSION} "
                         f"this cmc-fast reads")
    return meta


def _read_tokenizer(bundle_dir: Path, cfg: Config):
    tok_dir = bundle_dir / "tokenizer"
    if cfg.text_model in ("tiny", "ngram"):
        from cmc_fast.data_pipeline.text import VocabTokenizer

        return VocabTokenizer.load(tok_dir / "vocab.json")
    from transformers import AutoTokenizer

    plain_hf_folder(tok_dir, "--bundle")
    try:
        return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UsageError(f"--bundle: {tok_dir}: not a usable tokenizer folder ({first})") from None


# a Hugging Face folder a bundle carries holds data only: these suffixes are code (or compiled code) Hugging Face
# would import under trust_remote_code, and an ``auto_map`` entry is what asks for it
_CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".pyd", ".dll", ".dylib")
HF_FILE_LIMIT = 256 * safe_io.MIB  # a tokenizer.json of a 250k vocabulary is ~20 MB


def plain_hf_folder(folder: Path, flag: str) -> None:
    """Refuse a tokenizer / model-config folder that is not plain data: missing, holding anything but regular
    files within ``HF_FILE_LIMIT`` (a pipe, a device, a sub-folder), a code file, or a JSON file naming custom
    code (``auto_map``). Nothing in it is opened but the JSON files, each through ``safe_io``."""
    if not folder.is_dir():
        raise UsageError(f"{flag}: {folder}: missing (a bundle of a Hugging Face text model carries it)")
    for entry in sorted(folder.iterdir()):
        if entry.name.lower().endswith(_CODE_SUFFIXES):
            raise UsageError(f"{flag}: {entry}: a bundle holds no code; refused (nothing in it was run)")
        problem = safe_io.file_problem(entry, HF_FILE_LIMIT)
        if problem:
            raise UsageError(f"{flag}: {problem}")
        if entry.suffix == ".json" and _names_code(safe_io.read_json(entry, HF_FILE_LIMIT)):
            raise UsageError(f"{flag}: {entry}: names custom code (auto_map); a bundle's tokenizer and model are "
                             "plain Hugging Face folders: refused (nothing was run)")


def _names_code(doc: object) -> bool:
    return isinstance(doc, dict) and any(k in doc for k in ("auto_map", "custom_pipelines"))


SAFETENSORS_HEADER_LIMIT = 64 * safe_io.MIB
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def check_safetensors(f, path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """The safetensors file open as ``f`` holds exactly the tensors ``expected`` names, of those shapes, within
    the file: its header (length first, bounded) is parsed and checked before any tensor is read."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise UsageError(f"--bundle: {path}: truncated ({size} bytes; no safetensors header)")
    n = int.from_bytes(head, "little")
    if n > min(SAFETENSORS_HEADER_LIMIT, size - 8):
        raise UsageError(f"--bundle: {path}: header length {n} exceeds the file ({size} bytes) or the "
                         f"{SAFETENSORS_HEADER_LIMIT}-byte limit; truncated or not a safetensors file")
    raw = f.read(n)
    try:
        header = safe_io.parse_json(raw.decode("utf-8"), str(path))
    except UnicodeDecodeError:
        raise UsageError(f"--bundle: {path}: header is not UTF-8 JSON; not a safetensors file") from None
    if not isinstance(header, dict):
        raise UsageError(f"--bundle: {path}: header is not a JSON object; not a safetensors file")
    header.pop("__metadata__", None)
    body = size - 8 - n
    for name, info in header.items():
        ok = (isinstance(info, dict) and info.get("dtype") in _DTYPE_BYTES and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"]))
        if not ok:
            raise UsageError(f"--bundle: {path}: tensor {name!r}: malformed header entry")
        begin, end = info["data_offsets"]
        count = 1
        for d in info["shape"]:
            count *= d
        if not 0 <= begin <= end <= body or end - begin != count * _DTYPE_BYTES[info["dtype"]]:
            raise UsageError(f"--bundle: {path}: tensor {name!r}: data offsets {begin}..{end} do not fit its shape "
                             f"or the file ({body} data bytes); truncated or damaged")
    missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or extra:
        what = "; ".join(f"{label} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                         for label, names in (("missing", missing), ("unexpected", extra)) if names)
        raise UsageError(f"--bundle: {path}: tensors do not match the bundle's variant and config ({what})")
    for name, shape in expected.items():
        if tuple(header[name]["shape"]) != shape:
            raise UsageError(f"--bundle: {path}: tensor {name!r} has shape {header[name]['shape']}, the config "
                             f"builds {list(shape)}")


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
