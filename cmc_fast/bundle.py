"""The bundle format: a trained variant as a folder someone else can load without pickles (``export.py`` writes
one, ``cmc-fast export --run DIR --out BUNDLE``; ``read_bundle`` reads it).

    BUNDLE/model.safetensors   every network's weights: ``text.*``, ``image.*``, ``block.*``
    BUNDLE/config.json         the format, the variant and the run's configuration
    BUNDLE/tokenizer/          vocab.json (tiny / ngram) or the Hugging Face tokenizer's files
    BUNDLE/text_model/         a Hugging Face text model's config.json (the architecture; weights are above)
    BUNDLE/README.md           the model card: data, variant, the run's test metrics, the command that trained it

Reading a bundle parses JSON and safetensors only: nothing in it is unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

from cmc_fast.config import Config
from cmc_fast.data_pipeline import safe_io
from cmc_fast.errors import UsageError
from cmc_fast.models import build_parts
from cmc_fast.variants import VARIANTS, by_row

FORMAT, FORMAT_VERSION = "cmc-fast-bundle", 1
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"


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
    found = by_row(str(meta.get("variant")))
    if found is None:
        raise UsageError(f"--bundle: {bundle_dir / CONFIG}: unknown variant {meta.get('variant')!r}; this cmc-fast "
                         f"reads {', '.join(VARIANTS)}")
    variant = found.name
    tokenizer = _read_tokenizer(bundle_dir, cfg)
    hf_dir = None
    if cfg.text_model not in ("tiny", "ngram") and "text" in found.parts:
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
