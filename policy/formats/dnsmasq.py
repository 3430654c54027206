"""dnsmasq configuration lines (dnsmasq(8) 2.90).

* ``address=/d1/d2/.../[addr]``: every domain covers the name and its subdomains
  (SUBTREE). No address, ``#``, ``0.0.0.0``, ``::`` or a loopback address: a plain block;
  any other address: Local-Data with an A/AAAA record.
* ``local=/d/`` and ``server=/d/`` (no server): answered locally = NXDOMAIN: a block.
  ``server=/d/addr`` and ``server=/d/#`` are forwarding: ``unsupported["forwarding"]``.
* Domain forms: ``/.d/`` = ``/d/``; ``/*.d/`` strict subdomains (BELOW); ``/*d/`` a glob
  (``PatternRule("glob", "*d")``: d, anything ending in d, and their subdomains).
* Problems: ``/#/`` (every domain), an empty domain (``//``), missing slashes, IP literals,
  single labels, bad names and addresses. Other options are ``unsupported`` and skipped.
"""

from __future__ import annotations

import re

from policy.rules import Action, ParsedSource, PatternRule, Scope

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
)
from .hosts import address_record, is_sink
from .names import FAST_NAME, check_name, ip_literal

_RX = re.compile(
    rf"address=/({FAST_NAME})/(?:#|0\.0\.0\.0|::|127\.0\.0\.1)?+[ \t]*+\n|{CATCH_ALL}")
_OPTION = re.compile(r"[a-z][a-z0-9-]*(?:=.*)?")


def _line(ps: ParsedSource, rows: list[Row], lineno: int, text: str) -> None:
    s = text.strip()
    if not s or s[0] == "#":
        if s:
            comment_header(ps, s)
        ps.ignored += 1
        return
    key, eq, value = s.partition("=")
    key = key.strip()
    if key not in ("address", "server", "local"):
        if _OPTION.fullmatch(s):
            ps.unsupported["dnsmasq-option"] += 1
            ps.skipped[lineno] = f"dnsmasq option {key!r} is not a blocking rule"
        else:
            ps.problem(lineno, "not a dnsmasq option line")
        return
    value = value.strip()
    if not value.startswith("/") or value.count("/") < 2:
        if key == "server" and value and "/" not in value:
            ps.unsupported["forwarding"] += 1
            ps.skipped[lineno] = "server= without a domain sets an upstream: not a rule"
        else:
            ps.problem(lineno, f"{key}= needs /domain/ between slashes")
        return
    parts = value.split("/")
    domains, addr_text = parts[1:-1], parts[-1].strip()
    if "#" in domains:
        ps.problem(lineno, "'/#/' matches every domain: never accepted from a feed")
        return
    if key == "local" and addr_text:
        ps.problem(lineno, "local= takes no address")
        return
    record = None
    if key == "server" and addr_text:
        ps.unsupported["forwarding"] += 1
        ps.skipped[lineno] = "conditional forwarding (server=/d/addr): not a blocking rule"
        return
    if key == "address" and addr_text and addr_text != "#":
        addr = ip_literal(addr_text)
        if addr is None:
            ps.problem(lineno, f"{addr_text!r} is not an IP address")
            return
        if not is_sink(addr):
            record = (address_record(addr),)
    for d in domains:
        d = d.strip()
        if not d:
            ps.problem(lineno, "empty domain (would mean every unqualified name)")
            continue
        scope = Scope.SUBTREE
        if d.startswith("*."):
            d, scope = d[2:], Scope.BELOW
        elif d.startswith("*"):
            glob = None if "*" in d[1:] else check_name(d[1:])[0]
            if glob is None:
                ps.problem(lineno, f"{d!r} is not a valid domain pattern")
                continue
            if record is not None:
                ps.problem(lineno, f"{d!r}: a pattern cannot carry an address here")
                continue
            ps.patterns.append(PatternRule("glob", "*" + glob, Action.DEFAULT, lineno))
            continue
        elif d.startswith("."):
            d = d[1:]
        name, why = check_name(d)
        if name is None:
            ps.problem(lineno, f"{d!r} is not a valid name: {why}")
        elif record is None:
            rows.append(Row(lineno, name, scope))
        else:
            rows.append(Row(lineno, name, scope, Action.LOCAL_DATA, None, record))


def parse(data: bytes, path: str = "", origin: str | None = None, *,
          fast: bool = True) -> ParsedSource:
    ps = ParsedSource(path=path, format="dnsmasq")
    text, bad = decode(data)
    with no_gc():
        sc = scan(text, _RX, 0, fast)
        sc = reroute(text, sc, too_long(sc, 0))
        rows: list[Row] = []
        for lineno, line in sc.careful:
            if line == BAD_UTF8:
                ps.problem(lineno, bad[lineno])
            else:
                _line(ps, rows, lineno, line)
        names = sc.groups[0]
        n = len(names)
        assemble(ps, Fast(sc.fast_lines, names, bytes([Scope.SUBTREE]) * n, bytes(n)), rows)
    return ps
