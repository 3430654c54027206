"""The compact name index against a plain set: every name and parent it holds is found,
nothing else is, for sizes from one name (one bit of bucket) to tens of thousands."""

from __future__ import annotations

import random

import numpy as np
import pytest

from policy.index import IndexBuilder, NameIndex


def index_of(names: list[str]) -> NameIndex:
    builder = IndexBuilder()
    n = len(names)
    builder.add(0, names, bytes([3]) * n, bytes([1]) * n, np.arange(1, n + 1, dtype=np.uint32))
    keys, meta, directory, k = builder.finish()
    return NameIndex.from_arrays(keys, meta, directory, k, builder.label_range())


@pytest.mark.parametrize("size", [1, 2, 3, 5, 17, 1000, 30000])
def test_hits_are_exactly_the_listed_suffixes(size: int) -> None:
    rnd = random.Random(size)
    names = sorted({".".join("".join(rnd.choices("abc", k=rnd.randint(1, 5)))
                             for _ in range(rnd.randint(2, 4))) for _ in range(size)})
    index = index_of(names)
    listed = set(names)
    # hash signs and top bits spread over every bucket, first and last included
    keys = [hash(n) for n in names]
    assert size < 1000 or (min(keys) < 0 < max(keys))
    queries = names + [f"www.{n}" for n in names[:500]] + \
        [f"{n}.zz" for n in names[:200]] + ["nothing.listed.example", "a", "q.r.s.t.u.v.w.x"]
    for q in queries:
        labels = q.split(".")
        want = [(0 if i == 0 else 1, ".".join(labels[i:])) for i in range(len(labels))
                if ".".join(labels[i:]) in listed]
        got = index.hits(q) or []
        assert [(min(d, 1), rule) for _, d, rule in got] == want, q


def test_an_empty_index_finds_nothing() -> None:
    assert index_of([]).hits("a.example") is None
