"""Turns a dataset's records into tensors the trainer indexes by row: token ids, masks, labels and a
uint8 image cache. Text-only variants use every post; image-using variants use the posts whose image decoded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from cmc_fast.errors import UsageError
from data_pipeline import Record, Skipped, load_dataset, split_validation
from data_pipeline.images import decode_uint8, normalize
from data_pipeline.text import VocabTokenizer, encode_texts


@dataclass
class SplitData:
    name: str
    records: list[Record]
    ids: torch.Tensor  # int64 [n, L]
    mask: torch.Tensor  # int64 [n, L]
    labels: torch.Tensor  # int64 [n]
    images: torch.Tensor | None = None  # uint8 [n, 3, H, W], rows align with records
    has_image: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, rows: torch.Tensor, name: str | None = None) -> SplitData:
        keep = rows.tolist()
        return SplitData(name or self.name, [self.records[i] for i in keep], self.ids[rows], self.mask[rows],
                         self.labels[rows], None if self.images is None else self.images[rows], self.has_image[rows])

    def with_images(self) -> SplitData:
        return self.subset(torch.nonzero(self.has_image).view(-1), name=f"{self.name}+image")

    def to(self, device: torch.device) -> SplitData:
        return SplitData(self.name, self.records, self.ids.to(device), self.mask.to(device), self.labels.to(device),
                         None if self.images is None else self.images.to(device), self.has_image)

    def pixels(self, rows: torch.Tensor, *, train: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Normalised images for ``rows``, with a random horizontal flip per sample when training."""
        assert self.images is not None, "this split was loaded without images"
        x = normalize(self.images[rows], dtype)
        if train:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x


@dataclass
class PreparedData:
    fit: SplitData
    val: SplitData
    test: SplitData
    tokenizer: object
    skipped: list[Skipped]
    summary: dict


def decode_images(records: list[Record], size: tuple[int, int], backend: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      dict[int, str]]:
    """Decode each record's first image once, at training resolution, into uint8. Tries later candidates when
    the first fails."""
    try:
        from data_pipeline.image_source import CachedImages  # the full backend set, when present
    except ImportError:
        CachedImages = None
    paths = [list(r.image_paths) for r in records]
    if CachedImages is not None:
        src = CachedImages.build(paths, size=size, backend=backend)
        return src.pixels, src.ok, dict(src.errors)
    batch = decode_uint8([p[0] if p else None for p in paths], size)
    return batch.pixels, batch.ok, batch.errors


def prepare(cfg, tokenizer=None, use_images: bool = True) -> PreparedData:
    """Load, split (seeded validation carved from train), tokenise and decode. ``tokenizer=None`` builds the
    tiny model's vocabulary from the fit split."""
    try:
        ds = load_dataset(cfg.dataset, cfg.data_root, seed=cfg.seed, n_train=cfg.synthetic_train,
                          n_test=cfg.synthetic_test)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--data-root: {exc}") from None
    if not ds.train:
        raise ValueError(f"dataset {cfg.dataset!r} at {ds.root or cfg.data_root}: no training posts")
    if not ds.test:
        raise ValueError(f"dataset {cfg.dataset!r} at {ds.root or cfg.data_root}: no test posts")
    fit, val = split_validation(ds.train, cfg.val_fraction, cfg.seed)
    if tokenizer is None:
        tokenizer = VocabTokenizer.build([r.text for r in fit])
    skipped = list(ds.skipped)
    splits = []
    for name, recs in (("fit", fit), ("val", val), ("test", ds.test)):
        ids, mask = _encode(tokenizer, [r.text for r in recs], cfg.max_len)
        labels = torch.tensor([r.label for r in recs], dtype=torch.long)
        split = SplitData(name, recs, ids, mask, labels, has_image=torch.zeros(len(recs), dtype=torch.bool))
        if use_images:
            split.images, split.has_image, errors = decode_images(recs, tuple(cfg.image_size), cfg.image_backend)
            for i, msg in sorted(errors.items()):
                skipped.append(Skipped(recs[i].id, f"dropped for image variants: {msg}", recs[i].source))
        splits.append(split)
    summary = {"dataset": ds.name, "root": ds.root, "read_skipped": len(ds.skipped)}
    for s in splits:
        summary[f"{s.name}_posts"] = len(s)
        summary[f"{s.name}_fake"] = int(s.labels.sum())
        summary[f"{s.name}_with_image"] = int(s.has_image.sum())
    return PreparedData(*splits, tokenizer=tokenizer, skipped=skipped, summary=summary)


def _encode(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from data_pipeline.token_cache import cached_encode
    except ImportError:
        return encode_texts(texts, tokenizer, max_len)
    if isinstance(tokenizer, VocabTokenizer):
        key = "vocab-" + hashlib.sha1("\n".join(tokenizer.vocab).encode("utf-8")).hexdigest()[:16]
    else:
        key = f"{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}-{len(tokenizer)}"
    return cached_encode(texts, tokenizer, max_len, cache_dir=None, tokenizer_key=key)
