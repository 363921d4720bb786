"""Near-duplicate groups of posts, so a validation split cannot be passed by memorising the training split.

Fake-news sets are full of reposts of one story ("转发求证：" + the same rumour, the same text with a new link).
A random validation split puts copies of a training post into validation, and then validation rewards
memorisation that the published test split (other events, other stories) does not: on the att-RNN Weibo split a
random 10% validation split scores 0.94-0.97 for every text model while the test split scores 0.78-0.80.

Method: character n-gram shingles of the normalised text, MinHash signatures with locality-sensitive banding to
find candidate pairs in linear time (Broder 1997; Leskovec et al., *Mining of Massive Datasets*, ch. 3), each
candidate confirmed by its exact Jaccard similarity, and union-find over the confirmed pairs. Deterministic
(crc32 shingle hashes, seeded permutations), numpy only.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter

import numpy as np

_MERSENNE = (1 << 61) - 1
_MAX_REPRESENTATIVES = 8  # bounds the exact checks per bucket (a bucket of 500 reposts costs 500)
_SPACE_OR_URL = re.compile(r"https?://\S+|www\.\S+|\s+")


def shingles(text: str, n: int = 3) -> frozenset[str]:
    """Character n-grams of the text lower-cased with URLs and white space removed (short texts: the text)."""
    t = _SPACE_OR_URL.sub("", text.lower())
    if len(t) <= n:
        return frozenset([t]) if t else frozenset()
    return frozenset(t[i:i + n] for i in range(len(t) - n + 1))


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def near_duplicate_groups(texts: list[str], threshold: float = 0.5, n: int = 3, bands: int = 32,
                          rows: int = 4) -> list[int]:
    """A group id per text: texts whose shingle sets have Jaccard similarity >= ``threshold`` share a group,
    transitively. Candidate pairs come from ``bands`` x ``rows`` MinHash banding (pairs at Jaccard s are found
    with probability 1 - (1 - s^rows)^bands: 0.87 at s = 0.5, 0.9998 at s = 0.7 with the defaults); each is
    confirmed exactly, so no two posts below the threshold are ever joined directly. Empty texts form one group
    of their own. Group ids are the smallest index in the group."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    sets = [shingles(t, n) for t in texts]
    uf = _UnionFind(len(texts))
    empty = [i for i, s in enumerate(sets) if not s]
    for i in empty[1:]:
        uf.union(empty[0], i)
    rng = np.random.default_rng(0x5EED)
    k = bands * rows
    a = rng.integers(1, _MERSENNE, size=k, dtype=np.uint64)
    b = rng.integers(0, _MERSENNE, size=k, dtype=np.uint64)
    # bucket -> representatives: one member of each distinct group seen in it, a few at most
    buckets: dict[tuple[int, bytes], list[int]] = {}
    for i, s in enumerate(sets):
        if not s:
            continue
        h = np.fromiter((zlib.crc32(g.encode()) for g in s), dtype=np.uint64, count=len(s))
        # (a*h + b) mod p with a < 2^61, h < 2^32: the product wraps in uint64, which still gives a good
        # min-wise family while staying vectorised
        sig = ((a[:, None] * h[None, :] + b[:, None]) % np.uint64(_MERSENNE)).min(axis=1)
        for band in range(bands):
            reps = buckets.setdefault((band, sig[band * rows:(band + 1) * rows].tobytes()), [])
            joined = False
            for r in reps:
                if uf.find(r) == uf.find(i):
                    joined = True
                elif len(s & sets[r]) >= threshold * len(s | sets[r]):
                    uf.union(r, i)
                    joined = True
            if not joined and len(reps) < _MAX_REPRESENTATIVES:
                reps.append(i)
    return [uf.find(i) for i in range(len(texts))]


def group_summary(groups: list[int]) -> dict[str, int]:
    """How many groups, how many posts share theirs with another post, and the largest group's size."""
    sizes = Counter(groups).values()
    return {"groups": len(sizes), "posts_with_near_duplicates": sum(n for n in sizes if n > 1),
            "largest_group": max(sizes, default=0)}
