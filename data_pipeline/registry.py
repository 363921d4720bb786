"""The dataset registry: every dataset name ``cmc-fast`` accepts, its reader and its preset.

``load_dataset(name, root)`` returns ``DatasetSplits`` (records with id, text, image paths, label 1 = fake, split)
for every name in ``DATASETS``. A dataset's ``preset`` holds the run settings that are facts of the dataset (which
encoders, K, text length; ``cmc_fast.config.preset`` turns it into a configuration). Imports nothing from
``cmc_fast``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .records import DatasetSplits

__all__ = ["DATASETS", "Dataset", "load_dataset"]


def _synthetic(root: str | None, *, seed: int = 0, n_train: int = 1200, n_test: int = 400,
               **_: object) -> DatasetSplits:
    from .synthetic import generate

    return generate(n_train=n_train, n_test=n_test, seed=seed, root=root)


def _weibo(root: str | None, *, seed: int = 0, **options: object) -> DatasetSplits:
    from .readers.weibo import read_weibo

    return read_weibo(root, **options)


def _politifact(root: str | None, *, seed: int = 0, **options: object) -> DatasetSplits:
    from .readers.spotfake import read_spotfake

    return read_spotfake("politifact", root, **options)


def _gossipcop(root: str | None, *, seed: int = 0, **options: object) -> DatasetSplits:
    from .readers.spotfake import read_spotfake

    return read_spotfake("gossipcop", root, **options)


def _fakenewsnet(root: str | None, *, seed: int = 0, **options: object) -> DatasetSplits:
    from .readers.fakenewsnet import read_fakenewsnet

    return read_fakenewsnet(root, **options)


def _manifest(root: str | None, *, seed: int = 0, **options: object) -> DatasetSplits:
    from .readers.manifest import read_manifest

    return read_manifest(root, **options)


@dataclass(frozen=True)
class Dataset:
    load: Callable[..., DatasetSplits]  # (root, *, seed, ...) -> DatasetSplits
    preset: Mapping[str, object] = field(default_factory=dict)  # Config field -> value

    def __post_init__(self):
        object.__setattr__(self, "preset", MappingProxyType(dict(self.preset)))


# The authors' release for Weibo: Chinese BERT-wwm + VGG19, batch 32, 30 epochs, K = 1500; the English sets' BERT
# reads 512 tokens. Synthetic is sized so the whole six-variant job runs in about two minutes on a 2-core CPU: its
# tiny randomly initialised encoders need far larger learning rates than fine-tuning BERT/VGG does.
_ENGLISH = dict(text_model="bert-base-uncased", image_model="vgg19", nce_k=1000, max_len=512)

# name -> its reader and preset. Seeded train/test splits (fakenewsnet, CSVs without a test file) use the
# ``split_seed`` option (default 0), not the training ``seed``, so runs with different seeds are evaluated on the
# same test posts.
DATASETS: Mapping[str, Dataset] = MappingProxyType({
    "synthetic": Dataset(_synthetic, dict(
        dataset="synthetic", synthetic_train=800, synthetic_test=400, text_model="tiny", image_model="tiny",
        image_weights=None, max_len=40, image_size=(64, 64), epochs=6, fusion_epochs=8, batch_size=32, text_lr=1e-3,
        image_lr=0.03, nce_k=256, fusion_lr=1e-3, mm_dim=128, chunks=8, rank=8, tiny_text_dim=64, min_steps=0,
        lr_schedule="constant")),
    "weibo": Dataset(_weibo, dict(dataset="weibo", text_model="hfl/chinese-bert-wwm-ext", image_model="vgg19",
                                  nce_k=1500, max_len=250)),
    "politifact": Dataset(_politifact, dict(dataset="politifact", **_ENGLISH)),
    "gossipcop": Dataset(_gossipcop, dict(dataset="gossipcop", **_ENGLISH)),
    "fakenewsnet": Dataset(_fakenewsnet, dict(dataset="fakenewsnet", **_ENGLISH)),
    "manifest": Dataset(_manifest, dict(dataset="manifest")),
})


def load_dataset(name: str, root: str | None = None, **options: object) -> DatasetSplits:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[name].load(root, **options)
