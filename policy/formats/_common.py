"""Machinery shared by the parsers: decoding, the bulk fast path, assembling the columns.

The bulk path: one compiled regex per format, run with ``findall`` over the text (in
chunks of about a megabyte). It has one alternative for the common line form, capturing
the name and whatever else the format needs, and ends with a catch-all alternative for any
other line; every alternative ends with the newline, so ``findall`` returns exactly one
item per physical line, in order. Lines whose name group is empty go to the careful
per-line parser of the format; the others become columns without a Python call per line
(``itertools.compress``, ``operator.itemgetter``, numpy for the line numbers).

Both paths write rows in line order, and :func:`assemble` merges them by line, so a parse
with the fast path and one without it give equal :class:`ParsedSource` objects (tested).

:func:`run_end` finds where a run of lines of one plain form ends (RPZ's tier 0); in the
first build at start-up it checks the two halves of a long run in two processes.
"""

from __future__ import annotations

import array
import gc
import operator
import os
import re
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import compress, groupby
from typing import NamedTuple

import numpy as np

from policy.rules import Action, LocalRecord, ParsedSource, Scope

from .names import declared_count

#: Placeholder for a line that is not valid UTF-8 (the careful path reports it).
BAD_UTF8 = "\x00\x00not-utf-8\x00\x00"
_CHUNK = 1 << 20  # characters per findall call: bounds the memory of the tuples


class Row(NamedTuple):
    """One QNAME entry from the careful path."""

    line: int
    name: str
    scope: Scope
    action: Action = Action.DEFAULT
    family: str | None = None
    local_data: tuple[LocalRecord, ...] = ()


class Fast(NamedTuple):
    """QNAME entries from the bulk path, as columns (``scopes``/``actions`` are bytes)."""

    lines: array.array
    names: list[str]
    scopes: bytes
    actions: bytes
    families: list[str] | None = None  # "" for none; None when no entry has one


@contextmanager
def no_gc() -> Iterator[None]:
    """Suspend the cyclic GC while millions of small objects are made (none are cycles)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def decode(data: bytes) -> tuple[str, dict[int, str]]:
    """Text with LF line ends and no BOM, plus {line: message} for lines not in UTF-8.

    Lines are split on ``\\n`` only; one trailing ``\\r`` per line is dropped. A line that
    is not UTF-8 is replaced by :data:`BAD_UTF8` so line numbers stay exact.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    bad: dict[int, str] = {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        parts = data.split(b"\n")
        out = []
        for i, raw in enumerate(parts, 1):
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                out.append(BAD_UTF8)
                bad[i] = f"not valid UTF-8 (byte {e.start + 1}); line skipped"
        text = "\n".join(out)
    if "\r" in text:
        text = text.replace("\r\n", "\n")
        if text.endswith("\r"):
            text = text[:-1]
    return text, bad


def split_lines(text: str) -> list[str]:
    """Physical lines (no empty last element for a final newline)."""
    if not text:
        return []
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return lines


#: The last alternative of every bulk regex: any other line (its text is not kept)...
CATCH_ALL = r"[^\n]*+\n"
#: ... or, in regexes with several groups, any other line with its text as the last group.
CATCH_ALL_TEXT = r"([^\n]*+)\n"


def _chunks(text: str) -> Iterator[str]:
    """``text`` (ending with a newline) cut after newlines into pieces of about
    :data:`_CHUNK` characters."""
    start = 0
    n = len(text)
    while n - start > _CHUNK:
        nl = text.find("\n", start + _CHUNK)
        if nl < 0 or nl == n - 1:
            break
        yield text[start:nl + 1]
        start = nl + 1
    yield text[start:]


#: Whether a forked second process may check half of a long run of lines (see
#: :func:`run_end`). Only the child that builds the first policy sets it: the server is
#: not answering yet, so a second core would idle; later builds leave the core to it.
SECOND_PROCESS = False
SECOND_PROCESS_MIN = 1 << 22  # characters: below this a fork costs more than it saves
_PROBE = 1 << 16  # characters checked here first: a short run (a header line) forks nothing


def run_end(rx: re.Pattern[str], text: str, pos: int) -> int:
    """``rx.match(text, pos).end()`` (``pos`` if it does not match), for a regex that
    matches whole lines one after another, with nothing carried from one line to the next.

    With :data:`SECOND_PROCESS`, a long run is checked in two halves at once: a forked
    process matches from a line start near the middle while this one matches up to it.
    The halves join when the first reaches the middle; otherwise the run ended in the
    first half. (The 1M-name list: 0.18 s instead of 0.29 s on two cores.)
    """
    probe = text.rfind("\n", pos, pos + _PROBE) + 1
    if not SECOND_PROCESS or probe <= pos or len(text) - probe < SECOND_PROCESS_MIN:
        m = rx.match(text, pos)
        return m.end() if m else pos
    m = rx.match(text, pos, probe)
    if m is None or m.end() < probe:  # a short run: not worth a process
        return m.end() if m else pos
    mid = text.find("\n", (probe + len(text)) // 2) + 1
    if mid <= probe:
        m = rx.match(text, probe)
        return m.end() if m else probe
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the second half; the answer is its end, as digits
        try:
            os.close(read_end)
            m = rx.match(text, mid)
            os.write(write_end, b"%d" % (m.end() if m else mid))
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        m = rx.match(text, probe, mid)
        first = m.end() if m else probe
    finally:
        reply = b""
        while chunk := os.read(read_end, 64):
            reply += chunk
        os.close(read_end)
        os.waitpid(pid, 0)
    if first < mid:
        return first
    if reply:
        return int(reply)
    m = rx.match(text, mid)  # the second process failed: do its half here
    return m.end() if m else mid


class Scan(NamedTuple):
    fast_lines: array.array  # 1-based line numbers of fast lines, ascending
    groups: list[list[str]]  # one list per captured field, fast lines only
    careful: list[tuple[int, str]]  # (line, text) of every other line, ascending
    nlines: int  # physical lines


def _empty_positions(keys: list[str]) -> list[int]:
    """Positions of "" in ``keys``: ``list.index`` finds the shared "" by identity, in C."""
    pos = -1
    index = keys.index
    out = []
    try:
        while True:
            pos = index("", pos + 1)
            out.append(pos)
    except ValueError:
        return out


def scan(text: str, rx: re.Pattern[str], key: int = 0, use_fast: bool = True) -> Scan:
    """Run the bulk regex of a format over ``text``: one match per line, in order.

    The regex is ``fast form ending in \\n | CATCH_ALL`` without anchors: every match ends
    with the newline, so the next one starts at the next line, and ``findall`` returns one
    item per line. Single-group regexes give the name on fast lines and "" elsewhere (the
    text of the other lines is then cut out of their chunk). Regexes with several groups end
    with :data:`CATCH_ALL_TEXT`; group ``key`` (0-based) is non-empty exactly on fast lines.
    The names (group ``key``) are returned in lower case.
    """
    single = rx.groups == 1
    nfields = 1 if single else rx.groups - 1
    fast_lines = array.array("I")
    groups: list[list[str]] = [[] for _ in range(nfields)]
    if not use_fast:
        lines = split_lines(text)
        return Scan(fast_lines, groups, list(enumerate(lines, 1)), len(lines))
    careful: list[tuple[int, str]] = []
    if not text:
        return Scan(fast_lines, groups, careful, 0)
    if not text.endswith("\n"):
        text += "\n"
    base = 0
    key_of = operator.itemgetter(key)
    getters = [operator.itemgetter(g) for g in range(nfields)]
    findall = rx.findall
    for chunk in _chunks(text):
        found = findall(chunk)
        keys = found if single else list(map(key_of, found))
        n = len(found)
        slow = _empty_positions(keys)
        numbers = np.arange(base + 1, base + n + 1, dtype=np.uint32)
        if slow:
            if single:
                lines = chunk.split("\n")
                careful.extend((base + p + 1, lines[p]) for p in slow)
            else:
                last_of = operator.itemgetter(nfields)
                careful.extend((base + p + 1, last_of(found[p])) for p in slow)
            numbers = np.delete(numbers, slow)
        fast_lines.frombytes(numbers.tobytes())
        names: Iterable[str] = filter(None, keys) if slow else keys
        if chunk.lower() != chunk:  # upper case somewhere in the chunk (faster than islower)
            names = map(str.lower, names)
        if single:
            groups[0].extend(names)
        else:
            for g, get in enumerate(getters):
                if g == key:
                    groups[g].extend(names)
                elif slow:
                    groups[g].extend(compress(map(get, found), keys))
                else:
                    groups[g].extend(map(get, found))
        base += n
    return Scan(fast_lines, groups, careful, base)


def scan_lines(pairs: list[tuple[int, str]], rx: re.Pattern[str], key: int = 0) -> Scan:
    """:func:`scan` over some lines only (e.g. those a first regex left), keeping their
    line numbers."""
    if not pairs:
        return scan("", rx, key)
    sub = scan("\n".join([t for _, t in pairs]) + "\n", rx, key)
    assert sub.nlines == len(pairs)
    numbers = np.array([ln for ln, _ in pairs], dtype=np.uint32)
    fast_lines = array.array("I")
    if len(sub.fast_lines):
        pos = np.frombuffer(sub.fast_lines, dtype=np.uint32).astype(np.intp) - 1
        fast_lines.frombytes(numbers[pos].tobytes())
    careful = [(pairs[i - 1][0], t) for i, t in sub.careful]
    return Scan(fast_lines, sub.groups, careful, len(pairs))


def too_long(scan_: Scan, key: int) -> list[int]:
    """Indexes (into the fast columns) of names over 253 characters: the fast regex bounds
    labels but not whole names."""
    names = scan_.groups[key]
    if not names or max(map(len, names)) <= 253:
        return []
    return [i for i, n in enumerate(names) if len(n) > 253]


def reroute(text: str, scan_: Scan, drop: list[int]) -> Scan:
    """Move fast lines (by index into the fast columns) to the careful list."""
    if not drop:
        return scan_
    lines = split_lines(text)
    drop_set = set(drop)
    keep = [i not in drop_set for i in range(len(scan_.fast_lines))]
    moved = [(scan_.fast_lines[i], lines[scan_.fast_lines[i] - 1]) for i in drop]
    fast_lines = array.array("I", compress(scan_.fast_lines, keep))
    groups = [list(compress(g, keep)) for g in scan_.groups]
    careful = sorted(scan_.careful + moved)
    return Scan(fast_lines, groups, careful, scan_.nlines)


def assemble(ps: ParsedSource, fast: Fast | None, rows: list[Row]) -> None:
    """Write fast columns and careful rows into ``ps``, merged in line order."""
    rows = sorted(rows, key=operator.attrgetter("line"))  # stable: keeps order within a line
    if fast is None or not fast.names:
        for r in rows:
            ps.add(r.name, r.scope, r.line, r.action, r.family, r.local_data)
        return
    flines = fast.lines
    positions = [bisect_left(flines, r.line) for r in rows]
    prev = 0

    def take(upto: int) -> None:
        base = len(ps.names)
        ps.names.extend(fast.names[prev:upto])
        ps.scopes.extend(fast.scopes[prev:upto])
        ps.actions.extend(fast.actions[prev:upto])
        ps.lines.extend(flines[prev:upto])
        if fast.families is not None:
            fams = fast.families[prev:upto]
            ps.families.update(
                (base + j, f) for j, f in enumerate(fams) if f)

    if not rows:
        if not ps.names and fast.families is None:
            ps.names = fast.names
            ps.scopes = bytearray(fast.scopes)
            ps.actions = bytearray(fast.actions)
            ps.lines = flines
            return
    for pos, group in groupby(zip(positions, rows, strict=True), key=operator.itemgetter(0)):
        take(pos)
        prev = pos
        for _, r in group:
            ps.add(r.name, r.scope, r.line, r.action, r.family, r.local_data)
    take(len(fast.names))


def remove_entries(ps: ParsedSource, drop: set[int]) -> None:
    """Delete QNAME entries by index, keeping the columns aligned and the dicts re-keyed."""
    if not drop:
        return
    mask = np.ones(len(ps.names), dtype=bool)
    mask[np.fromiter(drop, dtype=np.intp, count=len(drop))] = False
    keep = mask.tolist()
    ps.names = list(compress(ps.names, keep))
    ps.scopes = bytearray(np.frombuffer(ps.scopes, dtype=np.uint8)[mask].tobytes())
    ps.actions = bytearray(np.frombuffer(ps.actions, dtype=np.uint8)[mask].tobytes())
    lines = array.array("I")
    lines.frombytes(np.frombuffer(ps.lines, dtype=np.uint32)[mask].tobytes())
    ps.lines = lines
    if ps.families or ps.local_data:
        new_index = (np.cumsum(mask) - 1).tolist()
        ps.families = {new_index[i]: f for i, f in ps.families.items() if keep[i]}
        ps.local_data = {new_index[i]: d for i, d in ps.local_data.items() if keep[i]}


def indexes_named(ps: ParsedSource, wanted: set[str] | frozenset[str]) -> list[int]:
    """Indexes of entries whose name is in ``wanted`` (a C-level scan of the names)."""
    if not wanted:
        return []
    return list(compress(range(len(ps.names)), map(wanted.__contains__, ps.names)))


def under_any(names: list[str], roots: set[str]) -> list[bool]:
    """For each name: is it one of ``roots`` or below one of them?

    A C-level pass keeps the names whose last few characters end some root; only those are
    walked up label by label in Python.
    """
    n = len(names)
    out = [False] * n
    if not roots:
        return out
    tail = min(8, min(map(len, roots)))
    candidates: Iterable[int] = range(n)
    if tail >= 4:
        tails = {r[-tail:] for r in roots}
        candidates = compress(range(n), map(tails.__contains__,
                                            map(operator.itemgetter(slice(-tail, None)), names)))
    for i in candidates:
        name = names[i]
        found = name in roots
        while not found:
            dot = name.find(".")
            if dot < 0:
                break
            name = name[dot + 1:]
            found = name in roots
        out[i] = found
    return out


def wire(rd: object) -> bytes:
    """Uncompressed wire form of a dnspython rdata."""
    data = rd.to_wire()  # type: ignore[attr-defined]
    assert isinstance(data, bytes)
    return data


def comment_header(ps: ParsedSource, line: str) -> None:
    """Record ``declared_entries`` from a header comment."""
    if ps.declared_entries is None:
        n = declared_count(line)
        if n is not None:
            ps.declared_entries = n

