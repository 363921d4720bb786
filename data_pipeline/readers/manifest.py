"""A user's own dataset: a JSONL or CSV manifest.

Each post (one JSON object a line, or one CSV row) has::

    text   (or content)            the post's text; may be empty
    image  (or image_path, images) a path relative to the manifest (absolute paths kept), or a list of them;
                                   absent / null / "" = no image (the post serves text-only variants)
    label                          1 / "fake" or 0 / "real"
    id     (optional)              default: "<manifest file name>:<line>"
    split  (optional)              "train" or "test"; default "train"

``--data-root`` is the manifest file, or a directory holding ``manifest.jsonl`` / ``manifest.csv`` (or a
single ``.jsonl`` / ``.csv``). Image paths are kept whether or not the file exists: the data check and
the decoder report missing ones by path. Lines that are not valid UTF-8 or not valid JSON, rows without
a text or label, labels outside {0,1} and unknown splits are skipped with ``file:line`` and the reason.
"""

from __future__ import annotations

import json
import os

from .. import safe_io
from ..records import DatasetSplits, Record, Skipped
from .common import (
    JsonNumber,
    label_reason,
    loads_keeping_numbers,
    outside_reason,
    parse_label,
    read_lines,
    require_dir,
    unencodable_key,
    utf8_error,
    where,
)
from .spotfake import read_csv

LAYOUT = ("a manifest file (.jsonl or .csv with text, image, label and optional id, split), or a directory "
          "holding manifest.jsonl or manifest.csv")
TEXT_KEYS = ("text", "content")
IMAGE_KEYS = ("image", "image_path", "images", "image_paths")
_SPLITS = {"train": "train", "test": "test"}


# what to do when a manifest has no held-out posts (train and data check say it)
NO_TEST_SPLIT_HELP = ('give the held-out posts "split": "test" in the manifest, or put them in test.jsonl (or '
                      "test.csv) beside train.jsonl in one folder and pass the folder as --data-root")


def find_manifests(root: str) -> list[tuple[str, str | None]]:
    """The manifest file(s) under ``root``, each with the split its file name imposes (None: each post's own
    ``split``, default train): the file itself, manifest.jsonl/.csv, a folder's only .jsonl/.csv, or a folder
    holding train.jsonl (or .csv) and test.jsonl (or .csv)."""
    if os.path.isfile(root):
        return [(root, None)]
    for name in ("manifest.jsonl", "manifest.csv", "manifest.json"):
        if os.path.isfile(os.path.join(root, name)):
            return [(os.path.join(root, name), None)]
    candidates = sorted(e.name for e in os.scandir(root) if e.is_file() and e.name.lower().endswith((".jsonl", ".csv")))
    if len(candidates) == 1:
        return [(os.path.join(root, candidates[0]), None)]
    by_split = {os.path.splitext(c)[0].lower(): c for c in candidates}
    if len(candidates) == 2 and set(by_split) == {"train", "test"}:
        return [(os.path.join(root, by_split[split]), split) for split in ("train", "test")]
    if candidates:
        raise ValueError(f"manifest: {root} holds several candidate files ({', '.join(candidates)}); pass the "
                         "manifest file itself as --data-root, or keep only train.jsonl and test.jsonl (or .csv) "
                         "in the folder")
    raise FileNotFoundError(f"manifest: no manifest.jsonl or manifest.csv in {root} (expected {LAYOUT})")


def _first(obj: dict, keys: tuple[str, ...]) -> tuple[str | None, object]:
    for k in keys:
        if k in obj:
            return k, obj[k]
    return None, None


def _id_of(raw: bytes) -> str:
    """The id of a line that is not valid UTF-8, when the rest of it parses (for the report only)."""
    try:
        obj = loads_keeping_numbers(raw.decode("utf-8", errors="replace"))
    except (json.JSONDecodeError, RecursionError):
        return ""
    return str(obj.get("id", "")).strip() if isinstance(obj, dict) else ""


def read_jsonl(path: str, skipped: list[Skipped]) -> list[Record]:
    base = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    records: list[Record] = []
    for number, raw, _ in read_lines(path, safe_io.LINE_LIMIT):
        src = where(path, number)
        if raw is None:
            skipped.append(Skipped(f"{name}:{number}", f"line too long: over {safe_io.LINE_LIMIT} bytes", src))
            continue
        if not raw.strip():
            continue
        err = utf8_error(raw)
        if err:
            skipped.append(Skipped(_id_of(raw) or f"{name}:{number}", err, src))
            continue
        try:
            obj = loads_keeping_numbers(raw.decode("utf-8"))
        except json.JSONDecodeError as exc:
            skipped.append(Skipped(f"{name}:{number}", f"invalid JSON: {exc.msg} at column {exc.colno}", src))
            continue
        except RecursionError:
            skipped.append(Skipped(f"{name}:{number}", "invalid JSON: nested too deeply", src))
            continue
        if not isinstance(obj, dict):
            skipped.append(Skipped(f"{name}:{number}", f"invalid JSON: expected an object, got {type(obj).__name__}",
                                   src))
            continue
        bad_key = unencodable_key(obj, ("id", *TEXT_KEYS, *IMAGE_KEYS, "label", "split"))
        if bad_key:
            skipped.append(Skipped(f"{name}:{number}", f"invalid text: {bad_key} holds a lone surrogate (not "
                                   "valid Unicode)", src))
            continue
        post_id = str(obj["id"]).strip() if obj.get("id") not in (None, "") else f"{name}:{number}"
        text_key, text = _first(obj, TEXT_KEYS)
        if text_key is None:
            skipped.append(Skipped(post_id, "missing field: text", src))
            continue
        if "label" not in obj:
            skipped.append(Skipped(post_id, "missing field: label", src))
            continue
        label = parse_label(obj["label"])
        if label is None:
            skipped.append(Skipped(post_id, label_reason(obj["label"]), src))
            continue
        split_value = obj.get("split")
        split = "train" if split_value in (None, "") else _SPLITS.get(str(split_value).strip().lower())
        if split is None:
            skipped.append(Skipped(post_id, f"unknown split: {split_value!r} (expected train or test)", src))
            continue
        _, image = _first(obj, IMAGE_KEYS)
        if image is None or image == "":
            images = []
        elif isinstance(image, str) and not isinstance(image, JsonNumber):
            images = [image]
        elif isinstance(image, list) and all(isinstance(p, str) and not isinstance(p, JsonNumber) for p in image):
            images = [p for p in image if p]
        else:
            skipped.append(Skipped(post_id, f"invalid image: expected a path or a list of paths, got {image!r}", src))
            continue
        outside = outside_reason(images, base)
        if outside:
            skipped.append(Skipped(post_id, outside, src))
            continue
        paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in images]
        records.append(Record(post_id, "" if text is None else str(text).strip(), paths, label, split, src))
    return records


def read_manifest(root: str | os.PathLike | None, **_: object) -> DatasetSplits:
    root = require_dir(root, "manifest", LAYOUT)
    files = find_manifests(root)
    skipped: list[Skipped] = []
    records: list[Record] = []
    for path, split in files:
        if path.lower().endswith(".csv"):
            found = read_csv(path, "manifest", skipped, [os.path.dirname(os.path.abspath(path))],
                             split_from_name=False)
            for r in found:
                r.split = r.split or "train"
        else:
            found = read_jsonl(path, skipped)
        for r in found:
            r.split = split or r.split  # train.jsonl / test.jsonl: the file decides
        records += found
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split == "test"]
    # (no test split: train refuses and data check calls it a problem, each naming NO_TEST_SPLIT_HELP)
    return DatasetSplits("manifest", train, test, skipped, files[0][0] if len(files) == 1 else root)
