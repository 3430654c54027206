"""hosts files: ``address name [name...]`` (StevenBlack, abuse.ch URLhaus/ThreatFox host files).

Every name is an exact-name rule. A sink address (``0.0.0.0``, ``::``, any loopback such as
``127.0.0.1`` / ``::1``) makes plain blocks (``Action.DEFAULT``); any other address is a
real mapping and becomes Local-Data with an A/AAAA record. ``#`` starts a comment anywhere.
The preamble names (``localhost``, ``broadcasthost``, ``ip6-*``, ``0.0.0.0``...) never
become rules; a line made only of them counts as ignored. A line without an address column,
an address without a name, IP literals, wildcards or malformed names are problems (a bad name
does not hide the good names of the same line).
"""

from __future__ import annotations

import ipaddress
import re

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
)
from .names import FAST_NAME, SPECIAL_HOSTS, check_name, ip_literal

# names starting with "localhost" (localhost.localdomain...) go to the careful path,
# which knows the preamble names
_RX = re.compile(
    rf"(?:0\.0\.0\.0|127\.0\.0\.1)[ \t]++(?!(?i:localhost))({FAST_NAME})[ \t]*+\n|{CATCH_ALL}")


def address_record(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> LocalRecord:
    """The A/AAAA Local-Data record for a real address (zone id dropped)."""
    packed = addr.packed
    return LocalRecord(1 if addr.version == 4 else 28, packed, None,
                       str(ipaddress.ip_address(packed)))


def is_sink(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return addr.is_unspecified or addr.is_loopback


def hosts_line(ps: ParsedSource, rows: list[Row], lineno: int, text: str) -> None:
    """One line in hosts syntax (comment already removed or not); shared with AdBlock."""
    cut = text.find("#")
    if cut >= 0:
        if not text[:cut].strip():
            comment_header(ps, text.strip())
            ps.ignored += 1
            return
        text = text[:cut]
    parts = text.split()
    if not parts:
        ps.ignored += 1
        return
    addr = ip_literal(parts[0])
    if addr is None:
        ps.problem(lineno, f"no address column: {parts[0]!r} is not an IP address "
                           "(hosts syntax is 'address name...')")
        return
    if len(parts) == 1:
        ps.problem(lineno, "address without a host name")
        return
    sink = is_sink(addr)
    record = None if sink else (address_record(addr),)
    special = 0
    for token in parts[1:]:
        low = token.lower()
        if low.endswith("."):
            low = low[:-1]
        if low in SPECIAL_HOSTS:
            special += 1
            continue
        name, why = check_name(token)
        if name is None:
            ps.problem(lineno, f"{token!r} is not a valid name: {why}")
        elif record is None:
            rows.append(Row(lineno, name, Scope.EXACT))
        else:
            rows.append(Row(lineno, name, Scope.EXACT, Action.LOCAL_DATA, None, record))
    if special == len(parts) - 1:
        ps.ignored += 1


def parse(data: bytes, path: str = "", origin: str | None = None, *,
          fast: bool = True) -> ParsedSource:
    ps = ParsedSource(path=path, format="hosts")
    text, bad = decode(data)
    with no_gc():
        sc = scan(text, _RX, 0, fast)
        sc = reroute(text, sc, too_long(sc, 0))
        rows: list[Row] = []
        for lineno, line in sc.careful:
            if line == BAD_UTF8:
                ps.problem(lineno, bad[lineno])
            else:
                hosts_line(ps, rows, lineno, line)
        names = sc.groups[0]
        fast_lines = sc.fast_lines
        n = len(names)
        assemble(ps, Fast(fast_lines, names, bytes([Scope.EXACT]) * n, bytes(n)), rows)
    return ps
