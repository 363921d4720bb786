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


def split_validation(train: list[Record], fraction: float, seed: int,
                     groups: list[int] | None = None) -> tuple[list[Record], list[Record]]:
    """Carve a seeded, label-stratified validation split out of the training records.

    Model selection uses it; the test split is never looked at until the end (the authors' release
    selected checkpoints on the test set). ``groups`` (one id per record, e.g. from
    ``near_duplicates.near_duplicate_groups``) keeps every group whole on one side: groups are visited in a
    seeded order and go to validation, labelled by their majority, while they fit that label's quota, so
    validation holds about ``fraction`` of each label and no post with a near-copy in the fit split."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {fraction}")
    if groups is not None and len(groups) != len(train):
        raise ValueError(f"split_validation: {len(groups)} group ids for {len(train)} records")
    rng = random.Random(seed)
    members: dict[int, list[int]] = {}
    for i in range(len(train)):
        members.setdefault(groups[i] if groups is not None else i, []).append(i)

    def majority(m: list[int]) -> int:  # the label most of a group's posts carry (ties: its first post's)
        fake = sum(train[i].label == FAKE for i in m)
        return FAKE if 2 * fake > len(m) else REAL if 2 * fake < len(m) else train[m[0]].label

    owner = {g: majority(m) for g, m in members.items()}
    val_idx: set[int] = set()
    for label in (FAKE, REAL):
        own = [m for g, m in members.items() if owner[g] == label]
        total = sum(len(m) for m in own)
        quota = max(1, round(total * fraction)) if total > 1 else 0
        rng.shuffle(own)
        taken = 0
        for m in own:
            if taken + len(m) <= quota:
                val_idx.update(m)
                taken += len(m)
        if taken == 0 and quota and len(own) > 1:
            # every group is larger than the quota (few posts, many copies): the smallest still goes, so a
            # label with two or more stories is never missing from validation
            val_idx.update(min(own, key=len))
    fit = [r for i, r in enumerate(train) if i not in val_idx]
    val = [dataclasses.replace(r, split="val") for i, r in enumerate(train) if i in val_idx]
    return fit, val
