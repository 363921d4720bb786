"""What every reader shares: label parsing, streaming decoding with line numbers, column-name variants,
the seeded split for sources that publish none, and the warning type for kept-but-noteworthy conditions.

Conventions (the data check groups on them):
- ``Skipped.reason`` is ``"<kind>: <details>"``; ``kind`` (the part before the first colon) is stable,
  e.g. ``"too few metadata fields: 3 of 15"``, ``"label outside {0,1}: '2'"``, ``"invalid UTF-8: ..."``.
- ``Skipped.source`` and ``Record.source`` are ``"path:line"`` (1-based line of the post's first line).
- Conditions that keep the posts but deserve a look (no image column, a seeded split, image folders
  absent) are emitted as ``DatasetWarning`` through :mod:`warnings`, so a training run shows them on
  stderr and the data check collects them.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections.abc import Iterator, Sequence

from .. import safe_io
from ..records import FAKE, REAL, DatasetSplits, Record, Skipped

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")

_FAKE_WORDS = {"1", "fake", "rumor", "rumour"}
_REAL_WORDS = {"0", "real", "nonrumor", "non-rumor", "nonrumour", "non-rumour"}
# "true"/"false" and booleans are refused: they may mean "is fake" or "is true news".


class DatasetWarning(UserWarning):
    """A condition a reader kept going through but that the user should know about."""


def warn(message: str) -> None:
    warnings.warn(message, DatasetWarning, stacklevel=3)


def where(path: str | os.PathLike, line: int) -> str:
    return f"{os.fspath(path)}:{line}"


_NUMERIC_LABELS = {"0": REAL, "1": FAKE, "0.0": REAL, "1.0": FAKE}


class JsonNumber(str):
    """A JSON number kept as written (``loads_keeping_numbers``): a label of ``1e-400`` or ``-0`` stays those
    characters rather than becoming 0.0, and an integer of thousands of digits is never converted."""

    def __repr__(self) -> str:  # shown as the number it is, not as a quoted string
        return str(self)


def loads_keeping_numbers(text: str) -> object:
    """``json.loads`` with every number kept as its ``JsonNumber`` text."""
    return json.loads(text, parse_int=JsonNumber, parse_float=JsonNumber, parse_constant=JsonNumber)


# A manifest names its images relative to its own folder (or absolute, inside it); a path that leaves the folder
# (absolute elsewhere, or ``..`` past it) is refused unless this variable is set to 1: a manifest written by
# someone else cannot make the tool open /etc/shadow or another user's files. Symbolic links inside the folder
# are followed as usual: only the path as written is checked.
IMAGES_ANYWHERE_ENV = "CMC_FAST_IMAGES_ANYWHERE"


def images_anywhere() -> bool:
    return os.environ.get(IMAGES_ANYWHERE_ENV, "") == "1"


def image_outside(name: str, folder: str) -> str | None:
    """Why the image path ``name`` written in a manifest in ``folder`` is refused (None: it is inside)."""
    if images_anywhere():
        return None
    base = os.path.normpath(os.path.abspath(folder))
    joined = os.path.normpath(os.path.join(base, name))  # an absolute name stands as it is
    if os.path.commonpath([base, joined]) != base:
        return f"image path {name!r} leaves the manifest's folder {base}"
    return None


def outside_reason(names: Sequence[str], folder: str) -> str | None:
    """The first refusal of ``image_outside`` among ``names``, with how to allow it."""
    for name in names:
        why = image_outside(name, folder)
        if why:
            return f"image outside the manifest's folder: {why} (set {IMAGES_ANYWHERE_ENV}=1 to allow)"
    return None


def unencodable_key(obj: dict, keys: Sequence[str]) -> str | None:
    """The first of ``keys`` whose string value cannot be written as UTF-8 (a lone surrogate such as the JSON
    escape ``"\\ud800"`` parses to one), else None."""
    for key in keys:
        value = obj.get(key)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return key
    return None


def parse_label(value: object) -> int | None:
    """1 = fake, 0 = real. Accepts exactly 0/1 (a JSON integer, 0.0/1.0, or the ASCII strings "0", "1", "0.0",
    "1.0") and the fake/real (rumor/non-rumor) words in any case, spaces around ignored; ``None`` for anything
    else (the caller records the post as skipped). Strict on purpose: "1e-400" (0.0 once parsed), "-0", a
    full-width "１" or an Arabic-Indic "١" would each be read as some label by ``float``; none is what a label
    column means."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return int(value) if value in (0, 1) else None
    text = str(value).strip().lower()
    if text in _FAKE_WORDS:
        return FAKE
    if text in _REAL_WORDS:
        return REAL
    return _NUMERIC_LABELS.get(text)


def label_reason(value: object) -> str:
    return f"label outside {{0,1}}: {value!r} (expected 0/1 or fake/real; 1 = fake)"


def utf8_error(raw: bytes) -> str | None:
    """``None`` when ``raw`` is valid UTF-8, else a short description of the first bad byte."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8: byte 0x{raw[exc.start]:02x} at byte {exc.start + 1}"
    return None


def surrogate_error(text: str, what: str) -> str | None:
    """For text read with ``errors="surrogateescape"``: describe the first undecodable byte, if any."""
    for i, ch in enumerate(text):
        if "\udc80" <= ch <= "\udcff":
            return f"invalid UTF-8: byte 0x{ord(ch) - 0xDC00:02x} at character {i + 1} of {what}"
    return None


def read_lines(path: str | os.PathLike, limit: int | None = None) -> Iterator[tuple[int, bytes | None, bool]]:
    """Stream ``(line_number, raw_line_without_newline, had_newline)``; a UTF-8 BOM on line 1 is removed. With
    ``limit``, a line over that many bytes is skipped through unread and given as ``None``."""
    with safe_io.open_regular(path, allow_empty=True) as f:  # a pipe or device as a manifest: one line, no hang
        lines = safe_io.bounded_lines(f, limit) if limit is not None else enumerate(f, 1)
        for number, raw in lines:
            if raw is None:
                yield number, None, True
                continue
            had_newline = raw.endswith(b"\n")
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield number, raw, had_newline


def natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def resolve_column(header: Sequence[str], variants: Sequence[str]) -> str | None:
    """The first header name matching one of ``variants`` (case, spaces and dashes ignored)."""
    norm = {re.sub(r"[\s\-]+", "_", h.strip().lower()): h for h in header}
    for v in variants:
        if v in norm:
            return norm[v]
    return None


def stratified_split(records: list[Record], test_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic label-stratified train/test split for sources without a published one.

    Depends only on the records' order, ``test_fraction`` and ``seed`` (not on the training seed), so
    runs with different training seeds evaluate on the same test posts."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = random.Random(seed)
    test_ids: set[int] = set()
    for label in (FAKE, REAL):
        group = [i for i, r in enumerate(records) if r.label == label]
        rng.shuffle(group)
        n_test = round(len(group) * test_fraction) if len(group) > 1 else 0
        test_ids.update(group[:n_test])
    train, test = [], []
    for i, r in enumerate(records):
        if i in test_ids:
            r.split = "test"
            test.append(r)
        else:
            r.split = "train"
            train.append(r)
    return train, test


def require_dir(root: str | os.PathLike | None, dataset: str, layout: str) -> str:
    if root is None or str(root) == "":
        raise ValueError(f"{dataset}: --data-root is required (expected {layout})")
    path = os.fspath(root)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{dataset}: data root {path} does not exist (expected {layout})")
    return path


def image_files_in(folder: str) -> list[str]:
    """Image files directly in ``folder``, natural order; ``[]`` when it is absent."""
    try:
        names = [e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [os.path.join(folder, n) for n in sorted(names, key=natural_key)]


def has_local_image(record: Record) -> bool:
    return any(os.path.isfile(p) for p in record.image_paths)


def drop_posts_without_images(splits: DatasetSplits) -> DatasetSplits:
    """For image-using variants: move posts with no image file on disk into ``skipped`` (reason
    ``"no local image: ..."``). Text-only variants keep ``splits`` as loaded."""
    kept: dict[str, list[Record]] = {"train": [], "test": []}
    skipped = list(splits.skipped)
    for split in ("train", "test"):
        for r in getattr(splits, split):
            if has_local_image(r):
                kept[split].append(r)
            else:
                detail = "no image listed" if not r.image_paths else "none of " + ", ".join(r.image_paths) + " exists"
                skipped.append(Skipped(r.id, f"no local image: {detail}", r.source))
    return DatasetSplits(splits.name, kept["train"], kept["test"], skipped, splits.root)


def load_json_object(path: str, record_id: str, skipped: list[Skipped]) -> dict | None:
    """A JSON object from ``path`` (a leading BOM allowed), or ``None`` with the reason appended to ``skipped``:
    unreadable file, invalid UTF-8 (line and byte), invalid JSON (line and column), not an object."""
    try:
        raw = bytes(safe_io.read_bytes(path, safe_io.JSON_LIMIT))
    except safe_io.FileRefused as exc:
        skipped.append(Skipped(record_id, f"unreadable file: {str(exc).removeprefix(f'{path}: ')}", where(path, 1)))
        return None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        skipped.append(Skipped(record_id, f"invalid UTF-8: byte 0x{raw[exc.start]:02x} at byte {col}",
                               where(path, line)))
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        skipped.append(Skipped(record_id, f"invalid JSON: {exc.msg} at column {exc.colno}", where(path, exc.lineno)))
        return None
    except (RecursionError, ValueError):  # nested too deeply, an integer of thousands of digits
        skipped.append(Skipped(record_id, "invalid JSON: nested too deeply or a number too long", where(path, 1)))
        return None
    if not isinstance(doc, dict):
        skipped.append(Skipped(record_id, f"invalid JSON: expected an object, got {type(doc).__name__}",
                               where(path, 1)))
        return None
    return doc
