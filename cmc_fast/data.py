"""Turns a dataset's records into tensors the trainer indexes by row: token ids, masks, labels and a
uint8 image cache. When any variant uses images, every variant's row uses the posts whose image decoded (the
text-only model on every post is a row of its own); a text-only run uses every post.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from cmc_fast.data_pipeline.cache import cache_root
from cmc_fast.data_pipeline.image_files import Limits
from cmc_fast.data_pipeline.image_source import CachedImages, ImageSource, StreamingImages
from cmc_fast.data_pipeline.near_duplicates import group_summary, near_duplicate_groups
from cmc_fast.data_pipeline.readers.manifest import NO_TEST_SPLIT_HELP
from cmc_fast.data_pipeline.records import DatasetSplits, Record, Skipped, split_validation
from cmc_fast.data_pipeline.registry import load_dataset
from cmc_fast.data_pipeline.text import VocabTokenizer, encode_texts
from cmc_fast.errors import UsageError
from cmc_fast.variants import VARIANTS


@dataclass
class SplitData:
    name: str
    records: list[Record]
    ids: torch.Tensor  # int64 [n, L]
    mask: torch.Tensor  # int64 [n, L]
    labels: torch.Tensor  # int64 [n]
    images: ImageSource | None = None  # shared by the splits; row image_rows[i] is record i's image
    image_rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    has_image: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    groups: torch.Tensor | None = None  # int64 [n] near-duplicate group of each record (fit split), for sampling

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, rows: torch.Tensor, name: str | None = None) -> SplitData:
        rows = rows.cpu()
        dev = self.ids.device
        return SplitData(name or self.name, [self.records[i] for i in rows.tolist()], self.ids[rows.to(dev)],
                         self.mask[rows.to(dev)], self.labels[rows.to(dev)], self.images, self.image_rows[rows],
                         self.has_image[rows], None if self.groups is None else self.groups[rows])

    def sampling_weights(self, power: float) -> torch.Tensor | None:
        """Per-record sampling weights that count a near-duplicate group of size s as s^(1 - power) posts
        (power 1: each story once however often it was reposted), rescaled so each label keeps its share of
        the epoch. None (uniform) for power 0 or without groups."""
        if power == 0 or self.groups is None or len(self) == 0:
            return None
        _, inverse, counts = torch.unique(self.groups, return_inverse=True, return_counts=True)
        weights = counts[inverse].double().pow(-power)
        labels = self.labels.cpu()
        for label in labels.unique():
            same = labels == label
            weights[same] *= same.sum() / weights[same].sum()
        return weights

    def with_images(self) -> SplitData:
        return self.subset(torch.nonzero(self.has_image).view(-1), name=f"{self.name}+image")

    def to(self, device: torch.device) -> SplitData:
        return SplitData(self.name, self.records, self.ids.to(device), self.mask.to(device), self.labels.to(device),
                         self.images, self.image_rows, self.has_image, self.groups)

    def pixels(self, host_rows: torch.Tensor, *, train: bool, device: torch.device | str,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ImageNet-normalised images [b, 3, H, W] of the records ``host_rows`` (row indices on the CPU, where
        the image cache gathers: no device round trip), on ``device``, randomly flipped when training."""
        if self.images is None:
            raise RuntimeError(f"split {self.name} was loaded without images")
        return self.images.batch(self.image_rows[host_rows], train=train, device=device, dtype=dtype)


@dataclass
class PreparedData:
    fit: SplitData
    val: SplitData
    test: SplitData
    tokenizer: object
    skipped: list[Skipped]
    summary: dict


def build_image_source(cfg, records: list[Record], tag: str) -> ImageSource:
    """Every record's first decodable image, decoded once into a memory-mapped uint8 cache at training
    resolution (``cfg.image_cache``, reused by later runs while its key matches), or streamed from the files
    on every batch (validated once up front, so which posts have an image is known before training)."""
    paths = [list(r.image_paths) for r in records]
    size = tuple(cfg.image_size)
    limits = Limits(cfg.max_image_bytes, cfg.max_image_pixels)  # over-limit files end up in skipped.json
    if cfg.image_cache:
        cache_dir = cache_root() / "images"
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = cache_dir / f"{cfg.dataset}-{tag}-{size[0]}x{size[1]}.u8"
        return CachedImages.build(paths, size, cfg.image_backend, str(path), progress=cfg.progress, limits=limits)
    return StreamingImages.build(paths, size, cfg.image_backend, validate=True, progress=cfg.progress, limits=limits)


def read_dataset(cfg) -> DatasetSplits:
    """The dataset's records, refused in one line when unreadable or when its train or test split is empty."""
    try:
        ds = load_dataset(cfg.dataset, cfg.data_root, seed=cfg.seed, n_train=cfg.synthetic_train,
                          n_test=cfg.synthetic_test)
    except (OSError, ValueError) as exc:  # missing, not a folder (a pipe, a device), a bad file (safe_io)
        raise UsageError(f"--data-root: {' '.join(str(exc).split())}") from None
    where = ds.root or cfg.data_root
    if not ds.train:
        why = ""
        if ds.skipped:  # every post dropped: say for what, e.g. images outside a manifest's folder
            why = (f": all {len(ds.skipped)} were skipped, e.g. {ds.skipped[0].source or ds.skipped[0].id}: "
                   f"{ds.skipped[0].reason}")
        raise UsageError(f"--dataset {cfg.dataset}: no training posts under {where}{why}")
    if not ds.test:
        raise UsageError(f"--dataset {cfg.dataset}: no test split under {where}: its {len(ds.train)} posts are all "
                         f"training posts; {NO_TEST_SPLIT_HELP}")
    return ds


def refuse_imageless(cfg, ds: DatasetSplits, variants: list[str]) -> None:
    """Image variants asked of a dataset none of whose posts names an image (e.g. PolitiFact's text release):
    said before image weights are looked for or any image is decoded."""
    image_variants = [v for v in variants if VARIANTS[v].uses_images]
    if image_variants and not any(r.image_paths for r in (*ds.train, *ds.test)):
        raise UsageError(f"--dataset {cfg.dataset}: none of the {len(ds.train) + len(ds.test)} posts under "
                         f"{ds.root or cfg.data_root} names an image, so {', '.join(image_variants)} cannot train; "
                         "this is text-only data: run --variant finetune-t")


def prepare(cfg, tokenizer=None, use_images: bool = True, ds: DatasetSplits | None = None) -> PreparedData:
    """Load (unless ``ds``, the records ``read_dataset`` returned, is given), split (seeded validation carved from
    train), tokenise and decode. ``tokenizer=None`` builds the tiny model's vocabulary from the fit split."""
    if ds is None:
        ds = read_dataset(cfg)
    groups = None
    if cfg.val_split == "grouped" or cfg.group_sampling > 0:
        groups = near_duplicate_groups([r.text for r in ds.train])
    fit, val = split_validation(ds.train, cfg.val_fraction, cfg.seed, groups if cfg.val_split == "grouped" else None)
    if tokenizer is None:
        # tokens seen once stay out, so [UNK] is trained on something like what unseen test tokens look like
        tokenizer = VocabTokenizer.build([r.text for r in fit], min_freq=2)
    skipped = list(ds.skipped)
    everything = fit + val + ds.test
    source = None
    if use_images:
        listing = "\n".join(f"{r.id}\t{'|'.join(r.image_paths)}" for r in everything)
        digest = hashlib.sha1(listing.encode()).hexdigest()[:12]
        source = build_image_source(cfg, everything, digest)
        for i, msg in sorted(source.errors.items()):
            skipped.append(Skipped(everything[i].id, f"dropped for image variants: {msg}", everything[i].source))
    group_of = {id(r): g for r, g in zip(ds.train, groups)} if groups is not None else None
    splits, offset = [], 0
    for name, recs in (("fit", fit), ("val", val), ("test", ds.test)):
        ids, mask = _encode(tokenizer, [r.text for r in recs], cfg.max_len)
        labels = torch.tensor([r.label for r in recs], dtype=torch.long)
        rows = torch.arange(offset, offset + len(recs))
        has_image = source.ok[rows].clone() if source is not None else torch.zeros(len(recs), dtype=torch.bool)
        fit_groups = None
        if name == "fit" and group_of is not None:  # fit records are the reader's own objects (val's are copies)
            fit_groups = torch.tensor([group_of[id(r)] for r in recs], dtype=torch.long)
        splits.append(SplitData(name, recs, ids, mask, labels, source, rows, has_image, fit_groups))
        offset += len(recs)
    summary = {"dataset": ds.name, "root": ds.root, "read_skipped": len(ds.skipped), "val_split": cfg.val_split}
    if groups is not None:
        stats = group_summary(groups)
        summary["train_near_duplicate_groups"] = stats["groups"]
        summary["train_posts_with_near_duplicates"] = stats["posts_with_near_duplicates"]
        summary["group_sampling"] = cfg.group_sampling
    for s in splits:
        summary[f"{s.name}_posts"] = len(s)
        summary[f"{s.name}_fake"] = int(s.labels.sum())
        summary[f"{s.name}_with_image"] = int(s.has_image.sum())
    return PreparedData(*splits, tokenizer=tokenizer, skipped=skipped, summary=summary)


def _encode(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from cmc_fast.data_pipeline.token_cache import cached_encode
    except ImportError:
        return encode_texts(texts, tokenizer, max_len)
    if isinstance(tokenizer, VocabTokenizer):
        key = "vocab-" + hashlib.sha1("\n".join(tokenizer.vocab).encode("utf-8")).hexdigest()[:16]
    else:
        key = f"{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}-{len(tokenizer)}"
    return cached_encode(texts, tokenizer, max_len, cache_dir=None, tokenizer_key=key)


def check_splits(cfg, data: PreparedData, image_splits: dict[str, SplitData] | None, variants: list[str]) -> None:
    """Refuse, before any training, a run whose fit, validation or test split is empty for one of its variants
    (text variants: all posts; image variants: the posts whose image decoded), or whose fit split lacks a label;
    the message says which split, for which variants, and why."""
    image_variants = [v for v in variants if VARIANTS[v].uses_images]
    plans = [("posts", {"fit": data.fit, "val": data.val, "test": data.test}, variants)]
    if image_splits is not None and image_variants:
        plans.append(("posts with a decodable image", image_splits, image_variants))
    for what, splits, users in plans:
        for name, split in splits.items():
            label_counts = torch.bincount(split.labels.cpu(), minlength=2).tolist()
            if len(split) and (name != "fit" or min(label_counts) > 0):
                continue
            problem = (f"the {name} split has no {what}" if len(split) == 0 else
                       f"the fit split's {len(split)} {what} are all {'fake' if label_counts[1] else 'real'}")
            why = _why_images(data) if what != "posts" else _why_split(cfg, data)
            raise UsageError(f"--variant {','.join(users)}: {problem}; {why}")


def _why_images(data: PreparedData) -> str:
    dropped = sum(1 for s in data.skipped if s.reason.startswith("dropped for image variants"))
    return (f"{dropped} posts have no decodable image (see skipped.json or `cmc-fast data check`); run --variant "
            "finetune-t, or provide the images")


def _why_split(cfg, data: PreparedData) -> str:
    n_train = len(data.fit) + len(data.val)
    why = (f"--val-fraction {cfg.val_fraction} of {n_train} training posts left {len(data.fit)} to fit and "
           f"{len(data.val)} to validate")
    groups = data.summary.get("train_near_duplicate_groups")
    if cfg.val_split == "grouped" and groups is not None:
        why += (f" (--val-split grouped keeps each of the {groups} near-duplicate groups whole; --val-split "
                "random cuts post by post)")
    return why + "; change --val-fraction, or add training posts"
