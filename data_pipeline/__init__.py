"""Dataset readers, tokenisation and image decoding for cmc-fast. Imports nothing from ``cmc_fast``.

``load_dataset(name, root)`` returns ``DatasetSplits`` (records with id, text, image paths, label 1 = fake,
split) for every dataset name in ``DATASETS``.
"""

from __future__ import annotations

from collections.abc import Callable

from data_pipeline.records import FAKE, REAL, DatasetSplits, Record, Skipped, split_validation


def _synthetic(root: str | None, *, seed: int = 0, **_: object) -> DatasetSplits:
    from data_pipeline.synthetic import generate

    return generate(seed=seed, root=root)


# name -> loader(root, *, seed, ...) -> DatasetSplits. Readers for real layouts register here.
DATASETS: dict[str, Callable[..., DatasetSplits]] = {"synthetic": _synthetic}


def load_dataset(name: str, root: str | None = None, **options: object) -> DatasetSplits:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](root, **options)


__all__ = ["DATASETS", "FAKE", "REAL", "DatasetSplits", "Record", "Skipped", "load_dataset", "split_validation"]
