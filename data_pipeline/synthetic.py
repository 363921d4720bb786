"""A deterministic synthetic fake-news dataset with real JPEG files.

Each post carries a label signal in its text, its image, or both: a third of the posts are readable only
from the text, a third only from the image, a third from either. So a fused model can beat either
modality alone, which is the point of CMC. A few labels are flipped so no model reaches 100%.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from .cache import cache_root
from .records import DatasetSplits, Record

_FAKE_WORDS = ["shocking", "secret", "miracle", "banned", "exposed", "hoax", "conspiracy", "unbelievable"]
_REAL_WORDS = ["reported", "official", "according", "statement", "confirmed", "agency", "published", "data"]
_NEUTRAL = [
    'city', 'people', 'today', 'week', 'news', 'said', 'year', 'time', 'new', 'first', 'world', 'market',
    'police', 'school', 'local', 'health', 'government', 'team', 'water', 'road', 'park', 'weather', 'food',
    'family', 'price', 'event', 'river', 'train', 'game',
]
_VERSION = "v1"


def default_root() -> Path:
    return cache_root() / "synthetic"


def _text(rng: random.Random, label: int, informative: bool) -> str:
    words = rng.choices(_NEUTRAL, k=rng.randint(8, 16))
    if informative:
        cue = _FAKE_WORDS if label == 1 else _REAL_WORDS
        for w in rng.choices(cue, k=rng.randint(1, 3)):
            words.insert(rng.randrange(len(words) + 1), w)
    return " ".join(words)


def _image(rng: np.random.Generator, label: int, informative: bool, size: int) -> bytes:
    """Noise background with a patch whose colour carries the label when ``informative``."""
    img = rng.integers(60, 196, size=(size, size, 3), dtype=np.int16)
    if informative:
        colour = (220, 40, 40) if label == 1 else (40, 60, 220)
    else:  # an uninformative patch: a colour neither class uses
        colour = tuple(int(c) for c in rng.choice([(40, 200, 40), (200, 200, 40), (128, 128, 128)]))
    ph, pw = rng.integers(size // 3, size // 2 + 1, size=2)
    y, x = rng.integers(0, size - ph), rng.integers(0, size - pw)
    img[y:y + ph, x:x + pw] = colour
    img += rng.integers(-25, 26, size=img.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def generate(n_train: int = 1200, n_test: int = 400, seed: int = 0, root: str | Path | None = None,
             image_size: int = 64, label_noise: float = 0.05) -> DatasetSplits:
    """Generate (or reuse, when already on disk) the synthetic dataset. Deterministic in its arguments."""
    if n_train < 4 or n_test < 2:
        raise ValueError(f"synthetic dataset needs n_train >= 4 and n_test >= 2, got {n_train}, {n_test}")
    key = hashlib.sha1(f"{_VERSION}-{n_train}-{n_test}-{seed}-{image_size}-{label_noise}".encode()).hexdigest()[:10]
    out = Path(root) if root is not None else default_root() / key
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    splits: dict[str, list[Record]] = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            label = i % 2
            view = rng.randrange(3)  # 0: text only, 1: image only, 2: both carry the label
            shown = label if rng.random() >= label_noise else 1 - label
            text = _text(rng, label, view != 1)
            jpeg = _image(np_rng, label, view != 0, image_size)
            path = img_dir / f"{split}_{i:06d}.jpg"
            if not path.exists() or path.stat().st_size != len(jpeg):
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(jpeg)
                os.replace(tmp, path)
            splits[split].append(Record(id=f"{split}-{i}", text=text, image_paths=[str(path)], label=shown,
                                        split=split, source=f"synthetic:{split}:{i}"))
    return DatasetSplits(name="synthetic", train=splits["train"], test=splits["test"], root=str(out))
