"""The compact QNAME index: a million names in ~16 MB, looked up in a few hundred ns.

Layout (three flat arrays; ``keys`` and ``meta`` sorted together by key):

* ``keys``  int64 — ``hash(name)`` of each rule's normalised name (signed, as Python
  gives it: the lookup uses it unchanged);
* ``meta``  uint64 — what the rule is, packed: bits 0-7 source position, 8-9 scope
  (1 = the name itself, 2 = names below it), 10-13 action, 14-25 family number,
  32-63 line number in the source (26-31 are free: a verdict reference,
  policy/engine.py, keeps the match depth there);
* ``dir``   uint32 — 2**k + 1 bucket starts. Bucket b holds the entries whose key's top
  k bits, read as a signed number (``key >> (64 - k)``, -2**(k-1) <= b < 2**(k-1)), are
  b: they are ``keys[dir[b]:dir[b + 1]]``, with Python's negative indexes doing the rest
  (buckets 0, 1, ... from the front, -1, -2, ... from the back, and between them one
  sentinel, the end of the last bucket). k ~ log2(n): a bucket holds one entry on average.

A lookup hashes the name and each parent suffix (``www.evil.example``, ``evil.example``,
``example``), and for each reads one bucket. The index stores no names: a hit is a 64-bit
hash match (a false hit on a 1M index has odds around 1 in 10^13 per lookup), and the
rule's details are read from ``meta`` and, for logs, from the source file by line.

``hash`` is Python's own string hash: fast, but seeded per interpreter. Indexes are
therefore built in the same process or in a process forked from it (policy/build.py
forks), never loaded from a file written by another interpreter.

Entries with the same key are ordered by source position, so the first entry that
covers the needed scope is the one with the highest precedence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SOURCE_BITS, SCOPE_SHIFT, ACTION_SHIFT, FAMILY_SHIFT, LINE_SHIFT = 8, 8, 10, 14, 32
MAX_SOURCES = 1 << SOURCE_BITS
MAX_FAMILIES = 1 << 12


def pack_meta(source: np.ndarray, scope: np.ndarray, action: np.ndarray, family: np.ndarray,
              line: np.ndarray) -> np.ndarray:
    return (source.astype(np.uint64)
            | (scope.astype(np.uint64) << np.uint64(SCOPE_SHIFT))
            | (action.astype(np.uint64) << np.uint64(ACTION_SHIFT))
            | (family.astype(np.uint64) << np.uint64(FAMILY_SHIFT))
            | (line.astype(np.uint64) << np.uint64(LINE_SHIFT)))


@dataclass(frozen=True, slots=True)
class Hit:
    source: int
    scope_used: int  # 1: matched the name itself, 2: matched as a parent (wildcard)
    action: int
    family: int
    line: int
    matched: str  # the rule's name (the suffix that matched)


def unpack(meta: int, depth: int, matched: str) -> Hit:
    return Hit(meta & 0xFF, 1 if depth == 0 else 2, (meta >> ACTION_SHIFT) & 0xF,
               (meta >> FAMILY_SHIFT) & 0xFFF, meta >> LINE_SHIFT, matched)


def _label_range(names: list[str]) -> tuple[int, int]:
    """(fewest, most) labels among ``names``, counted with numpy over the joined text."""
    text = np.frombuffer("\n".join(names).encode("ascii", "replace"), dtype=np.uint8)
    marks = np.flatnonzero((text == 46) | (text == 10))  # '.' and '\n'
    newlines = np.flatnonzero(text[marks] == 10)
    # dots in line i = marks between newline i-1 and newline i
    ends = np.append(newlines, len(marks))
    starts = np.concatenate(([0], newlines + 1))
    dots = ends - starts
    return int(dots.min()) + 1, int(dots.max()) + 1


class IndexBuilder:
    """Collects columns of every source, then sorts them into the three arrays."""

    def __init__(self) -> None:
        self._keys: list[np.ndarray] = []
        self._meta: list[np.ndarray] = []
        self._min_labels = 255
        self._max_labels = 0

    def add(self, source: int, names: list[str], scopes: bytes | bytearray,
            actions: bytes | bytearray, lines: np.ndarray | memoryview,
            families: np.ndarray | None = None) -> None:
        n = len(names)
        if n == 0:
            return
        fewest, most = _label_range(names)
        self._min_labels = min(self._min_labels, fewest)
        self._max_labels = max(self._max_labels, most)
        keys = np.fromiter(map(hash, names), dtype=np.int64, count=n)
        fam = families if families is not None else np.zeros(n, dtype=np.uint16)
        meta = pack_meta(np.full(n, source, dtype=np.uint8),
                         np.frombuffer(bytes(scopes), dtype=np.uint8),
                         np.frombuffer(bytes(actions), dtype=np.uint8), fam,
                         np.asarray(lines, dtype=np.uint32))
        self._keys.append(keys)
        self._meta.append(meta)

    def label_range(self) -> tuple[int, int]:
        """(fewest, most) labels in any rule name added so far (lookups skip the rest)."""
        return (self._min_labels, self._max_labels) if self._max_labels else (1, 0)

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(keys, meta, dir, k): sorted, de-duplicated on (key, source, scope)."""
        if len(self._keys) == 1:
            keys, meta = self._keys[0], self._meta[0]
        elif self._keys:
            keys = np.concatenate(self._keys)
            meta = np.concatenate(self._meta)
        else:
            keys = np.zeros(0, dtype=np.int64)
            meta = np.zeros(0, dtype=np.uint64)
        self._keys, self._meta = [], []
        if len(keys):
            # Sort by key, then source (precedence), then scope, then line (first wins).
            # A quicksort on the key alone, then the few runs of equal keys put in order.
            order = np.argsort(keys, kind="quicksort")
            keys, meta = keys[order], meta[order]
            same = keys[1:] == keys[:-1]
            if same.any():  # (no equal keys, the usual case: nothing to order or drop)
                run = np.flatnonzero(np.concatenate(([False], same)) |
                                     np.concatenate((same, [False])))
                m = meta[run]
                sub = np.lexsort((m >> np.uint64(LINE_SHIFT),
                                  (m >> np.uint64(SCOPE_SHIFT)) & np.uint64(3),
                                  m & np.uint64(0xFF), keys[run]))
                meta[run] = m[sub]
                source = meta & np.uint64(0xFF)
                scope = (meta >> np.uint64(SCOPE_SHIFT)) & np.uint64(3)
                keep = np.ones(len(keys), dtype=bool)
                keep[1:] = ~same | (source[1:] != source[:-1]) | (scope[1:] != scope[:-1])
                keys, meta = keys[keep], meta[keep]
        k = max(1, math.ceil(math.log2(max(len(keys), 2))))
        half = 1 << (k - 1)
        # the start of each bucket, in key order (-half ... half - 1): a count per bucket,
        # summed up; then laid out for negative indexes (the module's docstring)
        counts = np.bincount((keys >> np.int64(64 - k)).astype(np.intp) + half,
                             minlength=1 << k)
        starts = np.zeros(1 << k, dtype=np.uint32)
        np.cumsum(counts[:-1], out=starts[1:])
        directory = np.empty((1 << k) + 1, dtype=np.uint32)
        directory[:half] = starts[half:]  # buckets 0 ... half - 1
        directory[half] = len(keys)  # the end of bucket half - 1
        directory[half + 1:] = starts[:half]  # buckets -half ... -1
        return np.ascontiguousarray(keys), np.ascontiguousarray(meta), directory, k


class NameIndex:
    """Read side: lookups over three buffers (numpy arrays or views of a mapped file)."""

    __slots__ = ("keys", "meta", "dir", "shift", "size", "min_labels", "max_labels", "_owners")

    def __init__(self, keys: memoryview, meta: memoryview, directory: memoryview, k: int,
                 labels: tuple[int, int] = (1, 127), owners: tuple[object, ...] = ()) -> None:
        self.keys = keys
        self.meta = meta
        self.dir = directory
        self.shift = 64 - k
        self.size = len(keys)
        # Rule names have between min_labels and max_labels labels: suffixes outside that
        # range cannot match and are not probed.
        self.min_labels, self.max_labels = labels
        self._owners = owners  # keep the mapping/arrays alive

    @classmethod
    def from_arrays(cls, keys: np.ndarray, meta: np.ndarray, directory: np.ndarray, k: int,
                    labels: tuple[int, int] = (1, 127)) -> NameIndex:
        return cls(memoryview(keys.data).cast("B").cast("q"),
                   memoryview(meta.data).cast("B").cast("Q"),
                   memoryview(directory.data).cast("B").cast("I"), k, labels,
                   (keys, meta, directory))

    def __len__(self) -> int:
        return self.size

    def hits(self, name: str, final: int = -1) -> list[tuple[int, int, str]] | None:
        """Every rule covering ``name``: (meta, depth, rule name), depth 0 = the name itself.

        Walks the name and its parents; at depth 0 a rule must cover the name itself
        (scope bit 1), above it the names below it (scope bit 2). A rule of source
        ``final`` on the name itself ends the walk: the caller knows nothing can take
        precedence over it (policy/engine.py), so the parents are not looked up.
        """
        if not self.size:
            return None
        keys, meta, directory, shift = self.keys, self.meta, self.dir, self.shift
        out: list[tuple[int, int, str]] | None = None
        labels = name.count(".") + 1
        last = labels - self.min_labels  # the shortest suffix a rule can have
        depth = labels - self.max_labels  # the longest: deeper labels are skipped
        suffix = name
        need = 1
        if depth > 0:
            for _ in range(depth):
                suffix = suffix[suffix.find(".") + 1:]
            need = 2
        else:
            depth = 0
        while depth <= last:
            h = hash(suffix)
            b = h >> shift
            i = directory[b]
            end = directory[b + 1]
            while i < end:
                k = keys[i]
                if k == h:
                    m = meta[i]
                    if (m >> SCOPE_SHIFT) & need:
                        if depth == 0 and m & 0xFF == final:
                            return [(m, 0, suffix)]
                        if out is None:
                            out = []
                        out.append((m, depth, suffix))
                elif k > h:
                    break
                i += 1
            if depth == last:
                return out
            suffix = suffix[suffix.find(".") + 1:]
            depth += 1
            need = 2
        return out
