"""PolitiFact and GossipCop with images: the SpotFake+ CSV layout and FakeNewsNet's per-article JSON layout.

CSV layout (SpotFake+ and its descendants; column names vary, matched case-insensitively)::

    ROOT/<anything>train*.csv, ROOT/<anything>test*.csv     (or one CSV: split column, else a seeded split)
    ROOT/images/<file>  or  ROOT/<file>                     images beside the CSV or in images/

    text  : content | text | clean_text | news_text | body | article | post_text | tweet_text | statement
            (a title | headline column, when present, is put before it)
    image : image | image_name | image_id | image_file | image_path | img | images | top_img | image_url
    label : label | labels | class | target | is_fake | fake      (1 / fake, 0 / real)
    id    : id | news_id | article_id | post_id | tweet_id        (optional; else file:line)
    split : split | subset | set                                  (optional: train / test)

When ROOT holds CSVs of both datasets, those whose name contains the dataset's name are read. CSVs named
``*_fake.csv`` / ``*_real.csv`` without a label column take their label from the name. A missing text or
label column skips every row of that file with ``"missing column: ..."`` (naming what was looked for
and what the header has); a missing image column keeps the rows without images and warns.

Per-article JSON layout (FakeNewsNet's downloader, with images fetched beside each article)::

    ROOT[/politifact|/gossipcop]/{fake,real}/<article id>/news content.json  + image files in that folder
    (or in its images/ subfolder; the one named like ``top_img`` comes first)

Neither layout publishes a test split unless the CSV names or a split column give one; otherwise the reader
makes a label-stratified 80/20 one seeded by ``split_seed`` (default 0, independent of the training seed).
"""

from __future__ import annotations

import ast
import csv
import io
import os
import sys

from .. import safe_io
from ..records import FAKE, REAL, DatasetSplits, Record, Skipped
from .common import (
    IMAGE_EXTENSIONS,
    image_files_in,
    label_reason,
    load_json_object,
    natural_key,
    outside_reason,
    parse_label,
    require_dir,
    resolve_column,
    stratified_split,
    surrogate_error,
    warn,
    where,
)

TEXT_COLS = ("content", "text", "clean_text", "news_text", "body", "article", "post_text", "tweet_text", "statement")
TITLE_COLS = ("title", "headline")
IMAGE_COLS = ("image", "image_name", "image_id", "image_file", "image_path", "img", "images", "top_img", "image_url")
LABEL_COLS = ("label", "labels", "class", "target", "is_fake", "fake")
ID_COLS = ("id", "news_id", "article_id", "post_id", "tweet_id")
SPLIT_COLS = ("split", "subset", "set")
_SPLIT_WORDS = {"train": "train", "training": "train", "test": "test", "testing": "test"}

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # news bodies exceed the 128 KiB default


def _layout(name: str) -> str:
    return (f"the SpotFake+ CSV layout (a CSV with text/content, image and label columns, images beside it or in "
            f"images/) or FakeNewsNet's per-article layout ({name}/{{fake,real}}/<id>/news content.json "
            f"with the article's image beside it)")


def split_image_value(value: str) -> list[str]:
    """An image cell -> file names: one name, ``a|b`` / ``a;b`` lists, or a Python/JSON list literal."""
    value = value.strip()
    if not value or value.lower() in ("null", "none", "nan"):
        return []
    if value.startswith("["):
        try:
            items = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            items = None
        if isinstance(items, list):
            return [str(v).strip() for v in items if str(v).strip()]
    for sep in ("|", ";"):
        if sep in value:
            return [v.strip() for v in value.split(sep) if v.strip() and v.strip().lower() != "null"]
    return [value]


def resolve_image(name: str, dirs: list[str]) -> str:
    """The file an image cell names: looked up in ``dirs`` in order, a URL by its last part, a name without
    extension with each image extension tried. Missing everywhere: the path in the first dir (reported
    missing by the data check and the decoder)."""
    if "://" in name:
        name = name.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    if os.path.isabs(name):
        return name
    has_ext = name.lower().endswith(IMAGE_EXTENSIONS)
    for d in dirs:
        path = os.path.join(d, name)
        if os.path.isfile(path):
            return path
        if not has_ext:
            for ext in IMAGE_EXTENSIONS:
                if os.path.isfile(path + ext):
                    return path + ext
    return os.path.join(dirs[0], name)


def _csv_files(root: str, dataset: str) -> list[str]:
    if os.path.isfile(root):
        return [root]
    names = sorted((e.name for e in os.scandir(root) if e.is_file() and e.name.lower().endswith(".csv")),
                   key=natural_key)
    mine = [n for n in names if dataset in n.lower()]
    return [os.path.join(root, n) for n in (mine or names)]


def _split_of_file(path: str) -> str | None:
    name = os.path.basename(path).lower()
    if "train" in name:
        return "train"
    if "test" in name:
        return "test"
    return None


def _label_of_file(path: str) -> int | None:
    stem = os.path.splitext(os.path.basename(path).lower())[0]
    if stem.endswith("fake"):
        return FAKE
    if stem.endswith("real"):
        return REAL
    return None


def image_dirs(csv_path: str, image_root: str) -> list[str]:
    """Where a SpotFake+ CSV's images may lie: images/ beside it, beside it, then the same under the root."""
    base = os.path.dirname(os.path.abspath(csv_path))
    dirs = [os.path.join(base, "images"), base, os.path.join(image_root, "images"), image_root]
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d))) or [base]


def read_csv(path: str, dataset: str, skipped: list[Skipped], dirs: list[str],
             split_from_name: bool = True) -> list[Record]:
    """Stream one CSV. Image cells are looked up in ``dirs`` (see ``resolve_image``). Records get the split
    column's value, else (``split_from_name``) the file name's train/test, else ""."""
    file_split = _split_of_file(path) if split_from_name else None
    file_label = _label_of_file(path) if split_from_name else None
    records: list[Record] = []
    with io.TextIOWrapper(safe_io.open_regular(path, allow_empty=True), encoding="utf-8-sig",
                          errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            skipped.append(Skipped("", "empty file: no header row", where(path, 1)))
            return records
        except csv.Error as exc:
            skipped.append(Skipped("", f"malformed CSV: {exc}", where(path, 1)))
            return records
        cols = {
            "text": resolve_column(header, TEXT_COLS), "title": resolve_column(header, TITLE_COLS),
            "image": resolve_column(header, IMAGE_COLS), "label": resolve_column(header, LABEL_COLS),
            "id": resolve_column(header, ID_COLS), "split": resolve_column(header, SPLIT_COLS),
        }
        missing = []
        if cols["text"] is None and cols["title"] is None:
            missing.append(f"text (looked for {', '.join(TEXT_COLS + TITLE_COLS)})")
        if cols["label"] is None and file_label is None:
            missing.append(f"label (looked for {', '.join(LABEL_COLS)}, or a file name ending in _fake/_real)")
        missing_reason = ("missing column: " + "; ".join(missing) + f"; header has: {', '.join(header)}"
                          if missing else None)
        if cols["image"] is None and not missing:
            warn(f"{dataset}: {path} has no image column (looked for {', '.join(IMAGE_COLS)}; header has: "
                 f"{', '.join(header)}); its posts have no image")
        index = {h: i for i, h in enumerate(header)}
        line = reader.line_num
        while True:
            start = line + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                skipped.append(Skipped("", f"malformed CSV: {exc}", where(path, start)))
                break
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            src = where(path, start)

            def cell(key: str, row: list[str] = row) -> str:
                col = cols[key]
                return row[index[col]] if col is not None else ""

            post_id = cell("id").strip() if cols["id"] and len(row) > index[cols["id"]] else ""
            post_id = post_id or f"{os.path.basename(path)}:{start}"
            if missing_reason:
                skipped.append(Skipped(post_id, missing_reason, src))
                continue
            if len(row) != len(header):
                kind = "too few fields" if len(row) < len(header) else "too many fields"
                skipped.append(Skipped(post_id, f"{kind}: {len(row)} of {len(header)} columns", src))
                continue
            cells = zip(header, row, strict=True)
            bad = next((e for e in (surrogate_error(c, f"column {h!r}") for h, c in cells) if e), None)
            if bad:
                skipped.append(Skipped(post_id, bad, src))
                continue
            label = parse_label(cell("label")) if cols["label"] else file_label
            if label is None:
                skipped.append(Skipped(post_id, label_reason(cell("label")), src))
                continue
            split = file_split
            if cols["split"] and cell("split").strip():
                split = _SPLIT_WORDS.get(cell("split").strip().lower())
                if split is None:
                    skipped.append(Skipped(post_id, f"unknown split: {cell('split')!r} (expected train or test)", src))
                    continue
            text = "\n".join(p.strip() for p in (cell("title"), cell("text")) if p.strip())
            names = split_image_value(cell("image")) if cols["image"] else []
            outside = outside_reason([n for n in names if "://" not in n], dirs[0]) if dataset == "manifest" else None
            if outside:
                skipped.append(Skipped(post_id, outside, src))
                continue
            images = [resolve_image(n, dirs) for n in names]
            records.append(Record(post_id, text, list(dict.fromkeys(images)), label, split or "", src))
    return records


ARTICLE_FILES = ("news content.json", "news_content.json", "news article.json")


def _article_dirs(root: str, dataset: str) -> list[tuple[str, int]]:
    """(article folder, label) for FakeNewsNet's per-article layout under ROOT or ROOT/<dataset>."""
    for base in (root, os.path.join(root, dataset)):
        out = []
        for folder, label in (("fake", FAKE), ("real", REAL)):
            path = os.path.join(base, folder)
            if os.path.isdir(path):
                out += [(e.path, label) for e in sorted(os.scandir(path), key=lambda e: natural_key(e.name))
                        if e.is_dir()]
        if out:
            return out
    return []


def read_article_dir(folder: str, label: int, skipped: list[Skipped]) -> Record | None:
    article_id = os.path.basename(folder)
    path = next((os.path.join(folder, n) for n in ARTICLE_FILES if os.path.isfile(os.path.join(folder, n))), None)
    if path is None:
        skipped.append(Skipped(article_id, f"missing file: no {' or '.join(ARTICLE_FILES)}", folder))
        return None
    doc = load_json_object(path, article_id, skipped)
    if doc is None:
        return None
    body = "\n".join(str(doc[k]).strip() for k in ("title", "text") if doc.get(k) and str(doc[k]).strip())
    images = image_files_in(folder) + image_files_in(os.path.join(folder, "images"))
    top = doc.get("top_img")
    if isinstance(top, str) and top:
        name = top.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        images.sort(key=lambda p: os.path.basename(p) != name)  # stable: top_img first
    return Record(article_id, body, images, label, "", where(path, 1))


def read_spotfake(dataset: str, root: str | os.PathLike | None, *, test_fraction: float = 0.2, split_seed: int = 0,
                  **_: object) -> DatasetSplits:
    root = require_dir(root, dataset, _layout(dataset))
    skipped: list[Skipped] = []
    records: list[Record] = []
    csvs = _csv_files(root, dataset)
    if not csvs and os.path.isdir(os.path.join(root, dataset)):
        csvs = _csv_files(os.path.join(root, dataset), dataset)
    if csvs:
        image_root = root if os.path.isdir(root) else os.path.dirname(root)
        for path in csvs:
            records += read_csv(path, dataset, skipped, image_dirs(path, image_root))
    else:
        articles = _article_dirs(root, dataset)
        if not articles:
            raise FileNotFoundError(f"{dataset}: {root} holds no CSV and no {{fake,real}}/<id>/ article folders "
                                    f"(expected {_layout(dataset)})")
        for folder, label in articles:
            rec = read_article_dir(folder, label, skipped)
            if rec is not None:
                records.append(rec)
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split == "test"]
    unsplit = [r for r in records if r.split == ""]
    if unsplit:
        if test:  # a published test split exists: unsplit rows train
            for r in unsplit:
                r.split = "train"
            train += unsplit
        else:
            extra_train, test = stratified_split(unsplit, test_fraction, split_seed)
            train += extra_train
            warn(f"{dataset}: no published test split; made a label-stratified one with test_fraction="
                 f"{test_fraction}, split_seed={split_seed} ({len(test)} test posts)")
    return DatasetSplits(dataset, train, test, skipped, root)
