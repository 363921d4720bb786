"""The one record type every reader yields, and the splits a dataset is loaded into."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

FAKE, REAL = 1, 0


@dataclass
class Record:
    """One post. ``label``: 1 = fake, 0 = real. ``image_paths``: candidates in order, the first that
    decodes is used. ``split``: "train" or "test" as the source publishes it."""

    id: str
    text: str
    image_paths: list[str]
    label: int
    split: str
    source: str = ""  # "file:line" it was read from, for error messages and reports


@dataclass
class Skipped:
    """A post a reader or loader dropped, and why (written to the run directory)."""

    id: str
    reason: str
    source: str = ""


@dataclass
class DatasetSplits:
    """What a reader returns: the published train and test splits plus what it dropped."""

    name: str
    train: list[Record]
    test: list[Record]
    skipped: list[Skipped] = field(default_factory=list)
    root: str = ""

    def summary(self) -> dict:
        def counts(recs: list[Record]) -> dict:
            fake = sum(r.label == FAKE for r in recs)
            return {"posts": len(recs), "fake": fake, "real": len(recs) - fake}

        return {"dataset": self.name, "root": self.root, "train": counts(self.train), "test": counts(self.test),
                "skipped": len(self.skipped)}


def split_validation(train: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Carve a seeded, label-stratified validation split out of the training records.

    Model selection uses it; the test split is never looked at until the end (the authors' release
    selected checkpoints on the test set)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {fraction}")
    rng = random.Random(seed)
    fit, val = [], []
    for label in (FAKE, REAL):
        group = [r for r in train if r.label == label]
        rng.shuffle(group)
        n_val = max(1, round(len(group) * fraction)) if len(group) > 1 else 0
        val += group[:n_val]
        fit += group[n_val:]
    order = {id(r): i for i, r in enumerate(train)}
    fit.sort(key=lambda r: order[id(r)])
    val.sort(key=lambda r: order[id(r)])
    return fit, [dataclasses.replace(r, split="val") for r in val]
