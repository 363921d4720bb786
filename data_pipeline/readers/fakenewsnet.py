"""FakeNewsNet's 2018 release (Shu et al.): one JSON file per article, label from the folder.

::

    ROOT/FakeNewsContent/*.json, ROOT/RealNewsContent/*.json            (e.g. .../fakenewsnet_v1/PolitiFact)
    or ROOT/<Subset>/{Fake,Real}NewsContent/*.json                       (e.g. .../fakenewsnet_v1)

Text = title + newline + body text. The release has no image files (``top_img`` is a URL), so every
record has ``image_paths=[]``: this dataset serves the text-only variants.

The release publishes no train/test split. The reader makes one: label-stratified, 80 % train and
20 % test, shuffled by ``random.Random(split_seed)`` (``split_seed`` defaults to 0, independent of the
training seed, so every run evaluates on the same test articles); 120 + 120 PolitiFact articles give
96 + 96 train and 24 + 24 test. ``test_fraction`` and ``split_seed`` are loader options.

When ROOT holds several subsets (PolitiFact, BuzzFeed), ``subset=`` picks one; the default is the only
one present, else PolitiFact.
"""

from __future__ import annotations

import os

from ..records import FAKE, REAL, DatasetSplits, Record, Skipped
from .common import (
    load_json_object,
    natural_key,
    require_dir,
    stratified_split,
    warn,
    where,
)

FOLDERS = (("FakeNewsContent", FAKE), ("RealNewsContent", REAL))
LAYOUT = "FakeNewsNet 2018 JSON: FakeNewsContent/*.json and RealNewsContent/*.json (or <Subset>/ holding them)"


def _subset_dir(root: str, subset: str | None) -> str:
    def is_subset(path: str) -> bool:
        return any(os.path.isdir(os.path.join(path, folder)) for folder, _ in FOLDERS)

    if subset is None and is_subset(root):
        return root
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and is_subset(e.path)) if os.path.isdir(root) else []
    if subset is not None:
        match = [s for s in found if s.lower() == subset.lower()]
        if not match:
            raise FileNotFoundError(f"fakenewsnet: no subset {subset!r} under {root} "
                                    f"(found: {', '.join(found) or 'none'}; expected {LAYOUT})")
        return os.path.join(root, match[0])
    if not found:
        raise FileNotFoundError(f"fakenewsnet: {root} holds no FakeNewsContent/ or RealNewsContent/ "
                                f"(expected {LAYOUT})")
    if len(found) == 1:
        return os.path.join(root, found[0])
    if "PolitiFact" in found:
        warn(f"fakenewsnet: {root} holds subsets {', '.join(found)}; reading PolitiFact (choose with subset=)")
        return os.path.join(root, "PolitiFact")
    raise ValueError(f"fakenewsnet: {root} holds several subsets ({', '.join(found)}); choose one with subset=")


def read_article(path: str, label: int, skipped: list[Skipped]) -> Record | None:
    """One FakeNewsNet article JSON -> Record (split unset), or a ``skipped`` entry."""
    name = os.path.basename(path)
    article_id = name[: -len("-Webpage.json")] if name.endswith("-Webpage.json") else os.path.splitext(name)[0]
    doc = load_json_object(path, article_id, skipped)
    if doc is None:
        return None
    title, body = doc.get("title"), doc.get("text")
    if title is None and body is None:
        skipped.append(Skipped(article_id, "missing field: neither 'title' nor 'text'", where(path, 1)))
        return None
    full = "\n".join(str(p).strip() for p in (title, body) if p is not None and str(p).strip())
    return Record(id=article_id, text=full, image_paths=[], label=label, split="", source=where(path, 1))


def read_fakenewsnet(root: str | os.PathLike | None, *, subset: str | None = None, test_fraction: float = 0.2,
                     split_seed: int = 0, **_: object) -> DatasetSplits:
    root = require_dir(root, "fakenewsnet", LAYOUT)
    base = _subset_dir(root, subset)
    records: list[Record] = []
    skipped: list[Skipped] = []
    for folder, label in FOLDERS:
        path = os.path.join(base, folder)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"fakenewsnet: {path} not found (expected {LAYOUT})")
        names = sorted((e.name for e in os.scandir(path) if e.is_file() and e.name.endswith(".json")), key=natural_key)
        for name in names:
            rec = read_article(os.path.join(path, name), label, skipped)
            if rec is not None:
                records.append(rec)
    train, test = stratified_split(records, test_fraction, split_seed)
    warn(f"fakenewsnet: the release has no train/test split; made a label-stratified one with "
         f"test_fraction={test_fraction}, split_seed={split_seed} ({len(train)} train, {len(test)} test); "
         f"no local images (text-only variants)")
    return DatasetSplits("fakenewsnet", train, test, skipped, base)
