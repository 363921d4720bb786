"""Near-duplicate groups and the grouped validation split, against brute-force references."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from cmc_fast.data_pipeline.near_duplicates import near_duplicate_groups, shingles
from cmc_fast.data_pipeline.records import FAKE, REAL, Record, split_validation

WEIBO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "weibo"
ALPHABET = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自之着去"


def _stories(rng: random.Random, n_stories: int, copies: int, length: int) -> list[str]:
    """``n_stories`` random texts, each with ``copies`` lightly edited reposts (a prefix, one changed char)."""
    texts = []
    for _ in range(n_stories):
        base = "".join(rng.choice(ALPHABET) for _ in range(length))
        texts.append(base)
        for _ in range(copies):
            edit = list(base)
            edit[rng.randrange(length)] = rng.choice(ALPHABET)
            texts.append(rng.choice(["转发求证：", "", "扩散！ "]) + "".join(edit) + rng.choice(["", " http://t.cn/x"]))
    rng.shuffle(texts)
    return texts


def _brute_force_groups(texts: list[str], threshold: float) -> list[int]:
    """Connected components of the exact Jaccard >= threshold graph, every pair checked."""
    sets = [shingles(t) for t in texts]
    label = list(range(len(texts)))

    def root(i: int) -> int:
        while label[i] != i:
            i = label[i]
        return i

    for i in range(len(texts)):
        for j in range(i):
            a, b = sets[i], sets[j]
            same = (not a and not b) or (a and b and len(a & b) >= threshold * len(a | b))
            if same:
                ri, rj = root(i), root(j)
                label[max(ri, rj)] = min(ri, rj)
    return [root(i) for i in range(len(texts))]


def _partition(groups: list[int]) -> set[frozenset[int]]:
    out: dict[int, set[int]] = {}
    for i, g in enumerate(groups):
        out.setdefault(g, set()).add(i)
    return {frozenset(v) for v in out.values()}


@pytest.mark.parametrize("seed,n_stories,copies,length", [(0, 30, 3, 60), (1, 80, 1, 25), (2, 5, 20, 120)])
def test_groups_match_brute_force(seed, n_stories, copies, length):
    rng = random.Random(seed)
    texts = _stories(rng, n_stories, copies, length) + ["", "  ", "短"]
    got = near_duplicate_groups(texts)
    assert _partition(got) == _partition(_brute_force_groups(texts, 0.5))
    assert len(set(got)) < len(texts)  # the reposts were found, not just singletons


def test_pairs_below_threshold_are_never_joined():
    rng = random.Random(3)
    base = "".join(rng.choice(ALPHABET) for _ in range(80))
    half = base[:40] + "".join(rng.choice(ALPHABET) for _ in range(40))  # Jaccard well under 0.9, over 0.2
    a, b = shingles(base), shingles(half)
    jaccard = len(a & b) / len(a | b)
    assert 0.2 < jaccard < 0.9
    assert near_duplicate_groups([base, half], threshold=0.9) == [0, 1]
    assert near_duplicate_groups([base, half], threshold=0.2) == [0, 0]
    with pytest.raises(ValueError, match="threshold"):
        near_duplicate_groups([base], threshold=0.0)


def _records(texts: list[str], rng: random.Random) -> list[Record]:
    return [Record(f"p{i}", t, [], rng.choice([FAKE, REAL]), "train") for i, t in enumerate(texts)]


@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_grouped_split_keeps_groups_whole(fraction):
    rng = random.Random(7)
    texts = _stories(rng, 60, 4, 50) + [f"独立的帖子{i}" + "".join(rng.choice(ALPHABET) for _ in range(30))
                                        for i in range(300)]
    records = _records(texts, rng)
    groups = near_duplicate_groups(texts)
    fit, val = split_validation(records, fraction, seed=5, groups=groups)
    assert len(fit) + len(val) == len(records)
    assert {r.id for r in fit}.isdisjoint(r.id for r in val)
    assert all(r.split == "val" for r in val)
    group_of = {r.id: g for r, g in zip(records, groups)}
    assert {group_of[r.id] for r in fit}.isdisjoint(group_of[r.id] for r in val)
    for label in (FAKE, REAL):  # close to the fraction of each label
        n = sum(r.label == label for r in records)
        assert abs(sum(r.label == label for r in val) - fraction * n) <= 0.05 * n
    again = split_validation(records, fraction, seed=5, groups=groups)
    assert [r.id for r in again[1]] == [r.id for r in val]
    other = split_validation(records, fraction, seed=6, groups=groups)
    assert [r.id for r in other[1]] != [r.id for r in val]


def test_without_groups_the_split_is_the_plain_stratified_one():
    rng = random.Random(11)
    records = _records([f"text {i}" for i in range(101)], rng)
    fit, val = split_validation(records, 0.2, seed=3)
    # reference: shuffle each label's records with one seeded RNG, fake first, take round(n * fraction)
    ref_rng, want = random.Random(3), set()
    for label in (FAKE, REAL):
        same = [r.id for r in records if r.label == label]
        ref_rng.shuffle(same)
        want |= set(same[:round(len(same) * 0.2)])
    assert {r.id for r in val} == want
    assert [r.id for r in fit] == [r.id for r in records if r.id not in want]  # source order kept
    with pytest.raises(ValueError, match="group ids"):
        split_validation(records, 0.2, seed=3, groups=[0, 1])


@pytest.mark.skipif(not WEIBO.is_dir(), reason=f"real Weibo data not found at {WEIBO}")
def test_weibo_grouped_validation_has_no_copies_of_fit_posts():
    from cmc_fast.data_pipeline.registry import load_dataset

    with pytest.warns(Warning):
        ds = load_dataset("weibo", str(WEIBO))
    groups = near_duplicate_groups([r.text for r in ds.train])
    fit, val = split_validation(ds.train, 0.1, seed=0, groups=groups)
    assert 0.09 * len(ds.train) <= len(val) <= 0.11 * len(ds.train)
    # recomputed on fit + val together: no validation post shares a group with a fit post
    joint = near_duplicate_groups([r.text for r in fit] + [r.text for r in val])
    assert set(joint[:len(fit)]).isdisjoint(joint[len(fit):])
    # whereas a random split puts reposts of training stories into validation
    rfit, rval = split_validation(ds.train, 0.1, seed=0)
    joint = near_duplicate_groups([r.text for r in rfit] + [r.text for r in rval])
    fit_groups = set(joint[:len(rfit)])
    assert sum(g in fit_groups for g in joint[len(rfit):]) > 0.1 * len(rval)


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_group_sampling_weights(power):
    from cmc_fast.data import SplitData
    from cmc_fast.loop import batches

    gen = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 40, (500,), generator=gen)
    labels = (groups % 3 == 0).long()  # a group never mixes labels here
    split = SplitData("fit", [None] * 500, torch.zeros(500, 4, dtype=torch.long), torch.ones(500, 4, dtype=torch.long),
                      labels, None, torch.arange(500), torch.zeros(500, dtype=torch.bool), groups)
    weights = split.sampling_weights(power)
    # reference, one post at a time: weight size^-power, then each label rescaled to its own post count
    size = {g: int((groups == g).sum()) for g in groups.tolist()}
    raw = [size[g] ** -power for g in groups.tolist()]
    for label in (0, 1):
        idx = [i for i in range(500) if labels[i] == label]
        scale = len(idx) / sum(raw[i] for i in idx)
        for i in idx:
            assert weights[i].item() == pytest.approx(raw[i] * scale, rel=1e-9)
    assert split.sampling_weights(0.0) is None
    assert split.subset(torch.arange(0, 500, 2)).groups.tolist() == groups[::2].tolist()
    # the sampler draws rows in proportion to the weights: each group's share of 200 epochs
    drawn = torch.cat([torch.cat(batches(500, 32, shuffle=True, generator=gen, weights=weights))
                       for _ in range(200)])
    share = torch.bincount(groups[drawn], minlength=40).double() / len(drawn)
    want = torch.zeros(40, dtype=torch.float64).index_add_(0, groups, weights) / weights.sum()
    assert torch.allclose(share, want, atol=0.01)


def test_prepare_keeps_reposts_out_of_validation_and_carries_groups(tmp_path):
    """End to end through the manifest reader and ``cmc_fast.data.prepare``: no validation post has a repost in
    the fit split, and the fit split's group ids are the reader-order groups."""
    import json

    from cmc_fast.config import Config
    from cmc_fast.data import prepare

    rng = random.Random(21)
    texts = _stories(rng, 40, 5, 40) + ["".join(rng.choice(ALPHABET) for _ in range(30)) for _ in range(160)]
    rows = [{"id": f"m{i}", "text": t, "label": i % 2, "split": "train"} for i, t in enumerate(texts)]
    rows += [{"id": f"t{i}", "text": t, "label": i % 2, "split": "test"} for i, t in enumerate(texts[:10])]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    cfg = Config(dataset="manifest", data_root=str(tmp_path), text_model="tiny", max_len=32, val_fraction=0.2,
                 group_sampling=1.0, progress=False).validate()
    data = prepare(cfg, use_images=False)
    by_id = dict(zip((r["id"] for r in rows), near_duplicate_groups(texts)))
    fit_groups = [by_id[r.id] for r in data.fit.records]
    assert data.fit.groups.tolist() == fit_groups
    assert set(fit_groups).isdisjoint(by_id[r.id] for r in data.val.records)
    assert data.summary["train_posts_with_near_duplicates"] >= 200
    assert data.summary["val_split"] == "grouped" and data.val.groups is None
    # power 1: within a label, weight x group size is one constant (every story counts once)
    weights, labels = data.fit.sampling_weights(1.0), data.fit.labels
    sizes = torch.tensor([fit_groups.count(g) for g in fit_groups], dtype=torch.float64)
    for label in (0, 1):
        per_story = (weights * sizes)[labels == label]
        assert torch.allclose(per_story, per_story[0].expand_as(per_story))
        assert float(weights[labels == label].sum()) == pytest.approx(int((labels == label).sum()))
    random_cfg = Config(**{**cfg.__dict__, "val_split": "random", "group_sampling": 0.0})
    plain = prepare(random_cfg, use_images=False)
    assert plain.fit.groups is None and "train_near_duplicate_groups" not in plain.summary


def test_groups_larger_than_the_quota_still_give_each_label_validation_posts():
    """24 posts = 8 stories x 3 copies, fraction 0.2: every group (3) exceeds each label's quota (2)."""
    rng = random.Random(4)
    bases = ["".join(rng.choice(ALPHABET) for _ in range(40)) for _ in range(8)]
    records = [Record(f"p{i}", f"{bases[i % 8]} ({i})", [], (i % 8) % 2, "train") for i in range(24)]
    groups = near_duplicate_groups([r.text for r in records])
    assert len(set(groups)) == 8
    fit, val = split_validation(records, 0.2, seed=0, groups=groups)
    assert sorted(r.label for r in val) == [0, 0, 0, 1, 1, 1]  # one whole story of each label
    group_of = {r.id: g for r, g in zip(records, groups)}
    assert {group_of[r.id] for r in fit}.isdisjoint(group_of[r.id] for r in val)
