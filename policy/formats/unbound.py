"""Unbound ``local-zone:`` / ``local-data:`` lines (unbound.conf(5), 1.17).

* ``local-zone: "zone." type`` covers the zone and every name below it (SUBTREE); quotes
  and the trailing dot are optional. Blocking types (``always_nxdomain``, ``always_nodata``,
  ``always_refuse``, ``always_deny``, ``always_null``, ``static``, ``deny``, ``refuse``,
  ``redirect``, ``inform_deny``, ``inform_redirect``) -> ``Action.DEFAULT``;
  ``inform`` (resolve and log) -> ``Action.LOG_ONLY``.
* ``transparent`` / ``typetransparent`` / ``always_transparent`` below a zone this source
  blocks carve an allow-list hole -> ``Action.PASSTHRU``; elsewhere they change nothing
  (``skipped``). ``nodefault`` / ``noview`` are skipped.
* ``local-data: "name. [ttl] [IN] TYPE data"``: inside a blocking zone of this source it
  only decorates the block (``redirect`` target...) and is ignored; otherwise it answers
  that exact name: Local-Data, all records of one owner merged into one entry.
* Problems: unknown or missing zone type, the root zone, a TLD, bad names, bad records,
  ``include:`` (never followed). Other options are ``unsupported["unbound-option"]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import compress

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.ttl

from policy.rules import Action, LocalRecord, ParsedSource, Scope

from ._common import (
    BAD_UTF8,
    CATCH_ALL,
    Fast,
    Row,
    assemble,
    comment_header,
    decode,
    no_gc,
    reroute,
    scan,
    too_long,
    wire,
)
from .names import FAST_NAME, check_name

_BLOCK_TYPES = ("always_nxdomain", "always_refuse", "always_nodata", "always_deny",
                "always_null", "static", "deny", "refuse", "redirect", "inform_deny",
                "inform_redirect")
_TRANSPARENT = ("transparent", "typetransparent", "always_transparent")
_RX = re.compile(  # the quoted form; unquoted zones take the careful path
    rf"[ \t]*+local-zone:[ \t]*+\"({FAST_NAME})\.?+\"[ \t]++"
    rf"(?:{'|'.join(_BLOCK_TYPES)})[ \t]*+\n|{CATCH_ALL}")
_RR = re.compile(r"(\S+)\s+((?:(?:[0-9]+|IN|CH|HS)\s+){0,2})(\S+)\s*(.*)", re.IGNORECASE)


@dataclass
class _Deferred:
    transparent: list[tuple[int, str, str]] = field(default_factory=list)  # line, name, type
    data: list[tuple[int, str, LocalRecord]] = field(default_factory=list)  # line, owner, rr
    log_zones: list[tuple[int, str]] = field(default_factory=list)


def _strip_comment(s: str) -> str:
    if "#" not in s:
        return s
    quote = ""
    for i, c in enumerate(s):
        if quote:
            if c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c == "#":
            return s[:i]
    return s


def _fields(value: str) -> list[str]:
    return [a or b or c for a, b, c in re.findall(r'"([^"]*)"|\'([^\']*)\'|(\S+)', value)]


def _record(value: str) -> tuple[str, LocalRecord]:
    """``"name. [ttl] [IN] TYPE data"`` -> (owner, record); raises ValueError."""
    v = value.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
        v = v[1:-1]
    m = _RR.fullmatch(v.strip())
    if not m:
        raise ValueError("expected 'name [ttl] [class] type data'")
    owner, extra, rtype, rdata = m.groups()
    ttl = None
    for tok in extra.split():
        if tok.isdigit():
            ttl = dns.ttl.from_text(tok)
        elif tok.upper() != "IN":
            raise ValueError(f"class {tok} is not supported")
    name, why = check_name(owner)
    if name is None:
        raise ValueError(f"{owner!r} is not a valid name: {why}")
    try:
        rdtype = dns.rdatatype.from_text(rtype)
        rd = dns.rdata.from_text(dns.rdataclass.IN, rdtype, rdata, origin=dns.name.root)
    except dns.exception.DNSException as e:
        raise ValueError(f"bad {rtype} record: {e}") from None
    return name, LocalRecord(int(rdtype), wire(rd), ttl, rd.to_text())


def _line(ps: ParsedSource, rows: list[Row], later: _Deferred, lineno: int, text: str) -> None:
    s = text.strip()
    if not s or s[0] == "#":
        if s:
            comment_header(ps, s)
        ps.ignored += 1
        return
    s = _strip_comment(s).strip()
    key, colon, value = s.partition(":")
    key, value = key.strip().lower(), value.strip()
    if not colon:
        ps.problem(lineno, "not an unbound 'name: value' line")
        return
    if not value:
        ps.ignored += 1  # clause header (server:, remote-control:...)
        return
    if key == "local-zone":
        f = _fields(value)
        if len(f) < 2:
            ps.problem(lineno, "local-zone without a zone type")
            return
        if len(f) > 2:
            ps.problem(lineno, "local-zone takes a zone and a type")
            return
        zone, ztype = f[0], f[1].lower()
        if zone.strip(".") == "":
            ps.problem(lineno, "the root zone: would block every name")
            return
        name, why = check_name(zone)
        if name is None:
            why = "a whole TLD" if why == "single-label name" else why
            ps.problem(lineno, f"{zone!r} is not accepted: {why}")
            return
        if ztype in _BLOCK_TYPES:
            rows.append(Row(lineno, name, Scope.SUBTREE))
        elif ztype == "inform":
            rows.append(Row(lineno, name, Scope.SUBTREE, Action.LOG_ONLY))
            later.log_zones.append((lineno, name))
        elif ztype in _TRANSPARENT:
            later.transparent.append((lineno, name, ztype))
        elif ztype in ("nodefault", "noview"):
            ps.unsupported["unbound-zone-type"] += 1
            ps.skipped[lineno] = f"local-zone type {ztype}: no policy"
        else:
            ps.problem(lineno, f"unknown local-zone type {ztype!r}")
    elif key == "local-data":
        try:
            owner, rr = _record(value)
        except ValueError as e:
            ps.problem(lineno, f"invalid local-data: {e}")
            return
        later.data.append((lineno, owner, rr))
    elif key in ("include", "include-toplevel"):
        ps.problem(lineno, f"{key}: is refused: a downloaded feed must not pull in other files")
    else:
        ps.unsupported["unbound-option"] += 1
        ps.skipped[lineno] = f"unbound option {key!r} is not a policy rule"


def _ancestors(name: str) -> list[str]:
    out = [name]
    while True:
        dot = name.find(".")
        if dot < 0:
            return out
        name = name[dot + 1:]
        out.append(name)


def _resolve(ps: ParsedSource, fast: Fast, rows: list[Row], later: _Deferred) -> None:
    """Turn transparent zones and local-data into rows, knowing every zone of the source."""
    if not later.transparent and not later.data:
        return
    needed: set[str] = set()
    for _, n, _ in later.transparent:
        needed.update(_ancestors(n))
    for _, n, _ in later.data:
        needed.update(_ancestors(n))
    declared: list[tuple[int, str, str]] = []  # line, name, "block" | "log" | "transparent"
    for i in compress(range(len(fast.names)), map(needed.__contains__, fast.names)):
        declared.append((fast.lines[i], fast.names[i], "block"))
    for r in rows:
        if r.name in needed:
            declared.append((r.line, r.name, "log" if r.action == Action.LOG_ONLY else "block"))
    for line, n, _ in later.transparent:
        declared.append((line, n, "transparent"))
    zone: dict[str, tuple[str, int]] = {}
    for line, n, kind in sorted(declared):
        zone.setdefault(n, (kind, line))  # unbound keeps the first declaration
    for line, n, _ in later.transparent:
        if zone[n][1] != line:
            ps.skipped[line] = f"duplicate local-zone (line {zone[n][1]} wins)"
            continue
        parent = next((zone[a] for a in _ancestors(n)[1:] if a in zone), None)
        if parent is not None and parent[0] == "block":
            rows.append(Row(line, n, Scope.SUBTREE, Action.PASSTHRU))
        else:
            ps.skipped[line] = "transparent zone with nothing blocked above it: no policy"
    merged: dict[str, list] = {}
    for line, owner, rr in later.data:
        enclosing = next((zone[a] for a in _ancestors(owner) if a in zone), None)
        if enclosing is not None and enclosing[0] == "block":
            ps.ignored += 1  # data of a blocking zone (redirect target...): the block rules
            continue
        if owner in merged:
            entry = merged[owner]
            if rr not in entry[1]:
                entry[1].append(rr)
            ps.skipped[line] = f"merged into the rule on line {entry[0]}"
        else:
            merged[owner] = [line, [rr]]
    for owner, (line, rrs) in merged.items():
        rows.append(Row(line, owner, Scope.EXACT, Action.LOCAL_DATA, None, tuple(rrs)))


def parse(data: bytes, path: str = "", origin: str | None = None, *,
          fast: bool = True) -> ParsedSource:
    ps = ParsedSource(path=path, format="unbound")
    text, bad = decode(data)
    with no_gc():
        sc = scan(text, _RX, 0, fast)
        sc = reroute(text, sc, too_long(sc, 0))
        rows: list[Row] = []
        later = _Deferred()
        for lineno, line in sc.careful:
            if line == BAD_UTF8:
                ps.problem(lineno, bad[lineno])
            else:
                _line(ps, rows, later, lineno, line)
        names = sc.groups[0]
        n = len(names)
        fcols = Fast(sc.fast_lines, names, bytes([Scope.SUBTREE]) * n, bytes(n))
        _resolve(ps, fcols, rows, later)
        assemble(ps, fcols, rows)
    return ps
