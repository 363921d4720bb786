"""The dataset registry: every dataset name ``cmc-fast`` accepts.

``load_dataset(name, root)`` returns ``DatasetSplits`` (records with id, text, image paths, label 1 = fake, split)
for every name in ``DATASETS``. Imports nothing from ``cmc_fast``.
"""

from __future__ import annotations

from collections.abc import Callable

from .records import DatasetSplits


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


# name -> loader(root, *, seed, ...) -> DatasetSplits. Readers for real layouts register here. Seeded
# train/test splits (fakenewsnet, CSVs without a test file) use the ``split_seed`` option (default 0), not
# the training ``seed``, so runs with different seeds are evaluated on the same test posts.
DATASETS: dict[str, Callable[..., DatasetSplits]] = {
    "synthetic": _synthetic,
    "weibo": _weibo,
    "politifact": _politifact,
    "gossipcop": _gossipcop,
    "fakenewsnet": _fakenewsnet,
    "manifest": _manifest,
}


def load_dataset(name: str, root: str | None = None, **options: object) -> DatasetSplits:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](root, **options)
