"""One domain per line.

``domains`` (Phishing Army, HaGeZi/OISD "domains", Pi-hole lists): each name is an **exact**
rule. ``wildcard-domains`` (HaGeZi ``wildcard/``, OISD ``domainswild``/``domainswild2``):
each entry, written ``*.name`` or ``name``, stands for the name **and** its subdomains.

``#`` and ``!`` comment lines, ``#`` inline comments, surrounding blanks are accepted;
hosts-file preamble names (``localhost``, ``localhost.localdomain``...) are ignored; a
line with two fields, a URL, an IP literal, a wildcard in a plain ``domains`` list, a
``*.*.`` or inner ``*`` in a wildcard list, and invalid names are problems.
"""

from __future__ import annotations

import re

from policy.rules import ParsedSource, Scope

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
from .names import FAST_NAME, SPECIAL_HOSTS, check_name

# names starting with "localhost" go to the careful path, which ignores the hosts-file
# preamble names (localhost.localdomain...) as the hosts parser does
_RX_EXACT = re.compile(rf"(?!(?i:localhost))({FAST_NAME})[ \t]*+\n|{CATCH_ALL}")
_RX_WILD = re.compile(rf"(?:\*\.)?+(?!(?i:localhost))({FAST_NAME})[ \t]*+\n|{CATCH_ALL}")


def _line(ps: ParsedSource, rows: list[Row], lineno: int, text: str, wildcard: bool) -> None:
    s = text.strip()
    if not s or s[0] in "#!":
        if s:
            comment_header(ps, s)
        ps.ignored += 1
        return
    cut = s.find("#")
    if cut >= 0:
        s = s[:cut].rstrip()
    if len(s.split()) > 1:
        ps.problem(lineno, "more than one field (a domain list has one name per line)")
        return
    if "://" in s or "/" in s:
        ps.problem(lineno, "a URL, not a domain name")
        return
    if wildcard:
        if s.startswith("*."):
            s = s[2:]
        elif s.startswith("."):
            s = s[1:]
        if "*" in s:
            ps.problem(lineno, "malformed wildcard (only a leading '*.' is allowed)")
            return
    elif "*" in s:
        ps.problem(lineno, "wildcard in a plain domain list (use format 'wildcard-domains')")
        return
    if s.lower().rstrip(".") in SPECIAL_HOSTS:
        ps.ignored += 1
        return
    name, why = check_name(s)
    if name is None:
        ps.problem(lineno, f"{s!r} is not a valid name: {why}")
        return
    rows.append(Row(lineno, name, Scope.SUBTREE if wildcard else Scope.EXACT))


def parse(data: bytes, path: str = "", origin: str | None = None, *, fast: bool = True,
          wildcard: bool = False) -> ParsedSource:
    ps = ParsedSource(path=path, format="wildcard-domains" if wildcard else "domains")
    text, bad = decode(data)
    with no_gc():
        sc = scan(text, _RX_WILD if wildcard else _RX_EXACT, 0, fast)
        sc = reroute(text, sc, too_long(sc, 0))
        rows: list[Row] = []
        for lineno, line in sc.careful:
            if line == BAD_UTF8:
                ps.problem(lineno, bad[lineno])
            else:
                _line(ps, rows, lineno, line, wildcard)
        names = sc.groups[0]
        n = len(names)
        scope = Scope.SUBTREE if wildcard else Scope.EXACT
        assemble(ps, Fast(sc.fast_lines, names, bytes([scope]) * n, bytes(n)), rows)
    return ps


def parse_wildcard(data: bytes, path: str = "", origin: str | None = None, *,
                   fast: bool = True) -> ParsedSource:
    return parse(data, path, origin, fast=fast, wildcard=True)
