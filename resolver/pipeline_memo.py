"""Bounded memo dicts shared by the pipeline and the fast path."""

from __future__ import annotations

import itertools
from typing import Any

#: Query-policy verdicts remembered per question (per policy version).
MEMO_LIMIT = 100000


def evict_oldest(d: dict[Any, Any], fraction: int = 4) -> None:
    """Drop the oldest quarter of a dict (insertion order): a full memo keeps its
    newer part instead of starting from nothing."""
    for key in list(itertools.islice(d, max(1, len(d) // fraction))):
        del d[key]
