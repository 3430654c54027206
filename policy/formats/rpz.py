"""Response Policy Zones written as DNS master files (draft-vixie-dnsop-dns-rpz-00, BIND).

The file is split into logical records here (``$ORIGIN``, ``$TTL``, relative and absolute
owners, a blank owner = the previous owner, parentheses across lines, quoted strings,
``;`` comments, optional TTL and class in either order, any RR type), and each record's RDATA
is parsed by dnspython's rdata parser. A broken record is a :class:`Problem` with its line
number and only that record is skipped (dnspython's zone reader would stop at the first).

Owners are relative to the zone origin: the ``origin`` argument, else the owner of the
file's first SOA, else its first ``$ORIGIN``, else the root (owners are then used as
written). Absolute owners under the origin are made relative; absolute owners outside it
are taken as the names they spell.

Semantics per owner:

* ``name`` exact, ``*.name`` strict subdomains (Scope.BELOW); single labels are legal
  (``*.tk``); ``*`` alone (every name) and inner ``*`` are problems.
* ``CNAME .`` NXDOMAIN, ``CNAME *.`` NODATA, ``CNAME rpz-passthru.`` (or a CNAME to the
  owner's own name, the legacy form) PASSTHRU, ``CNAME rpz-drop.`` DROP,
  ``CNAME rpz-tcp-only.`` TCP_ONLY; any other CNAME and any other RR types -> LOCAL_DATA,
  all RRs of one owner merged into one entry (``skipped`` names the line it went to);
  ``CNAME *.garden.example.`` keeps ``wildcard_target="garden.example"``.
* ``<prefix>.<reversed ip>.rpz-ip`` -> ``IpRule(RESPONSE_IP)`` (IPv6 with ``zz`` for ``::``),
  ``.rpz-client-ip`` -> ``IpRule(CLIENT_IP)``; ``.rpz-nsdname`` / ``.rpz-nsip`` are
  counted in ``unsupported`` and reported as problems (a forwarder cannot evaluate them).
* Apex SOA/NS and DNSSEC records are ignored. ``$INCLUDE`` is refused (problem).
* Family tags from comments: ``family=X``, ThreatFox ``X (confidence level: N%)``, else
  ``category=X`` (see :func:`names.family_from_comment`).
* TTL of Local-Data: the record's own TTL, else ``$TTL``, else None.

Fast path: lines ``[*.]name[.] [ttl] [IN] CNAME <. | *. | rpz-passthru. | rpz-drop. |
rpz-tcp-only.> [; comment]`` are read in bulk without dnspython. Tier 0 takes long runs of
lines that are exactly ``name CNAME .`` (lower case, relative: generated lists): one
``match`` checks the whole run and one ``split`` cuts the names out. Over the rest, tier 1,
a one-group regex for ``[*.]name [ttl] [IN] CNAME .`` (the bulk of a feed), then tier 2, a
regex with groups for the other targets, absolute owners and comments, over the lines
tier 1 left (a file whose lines mostly carry comments goes to tier 2 directly). Owners are
made relative to the zone in bulk after the record-by-record pass over the other lines. A
file with an ``$ORIGIN`` or a parenthesised record after its first bulk line is parsed
record by record throughout. Equal RDATA texts are parsed by dnspython once. Both paths
give equal results (tested).
"""

from __future__ import annotations

import array
import ipaddress
import operator
import re
from bisect import bisect_left
from dataclasses import dataclass
from itertools import compress, repeat

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.ttl
import numpy as np
from dns.rdtypes.ANY.CNAME import CNAME

from policy.rules import Action, IpRule, LocalRecord, ParsedSource, Scope, Trigger

from ._common import (
    BAD_UTF8,
    CATCH_ALL,
    CATCH_ALL_TEXT,
    Fast,
    Row,
    Scan,
    assemble,
    comment_header,
    decode,
    no_gc,
    run_end,
    scan,
    scan_lines,
    split_lines,
    wire,
)
from .names import FAST_NAME, FAST_NAME_LOWER, check_name, family_from_comment

_TARGETS = {".": Action.NXDOMAIN, "*.": Action.NODATA, "rpz-passthru.": Action.PASSTHRU,
            "rpz-drop.": Action.DROP, "rpz-tcp-only.": Action.TCP_ONLY}
_LB = (r"(?<!(?i:\.rpz-ip))(?<!(?i:\.rpz-nsip))(?<!(?i:\.rpz-nsdname))"
       r"(?<!(?i:\.rpz-client-ip))")
#: tier 1, one group (cheap): ``name [ttl] [IN] CNAME .`` without a comment, and the same
#: with ``*.name``
_TIER1 = (r"{star}({name}){lb}[ \t]++(?:[0-9]{{1,9}}+[ \t]++)?+(?:(?:IN|in)[ \t]++)?+"
          r"(?:CNAME|cname)[ \t]++\.[ \t]*+\n|" + CATCH_ALL)
_RX1 = {star: re.compile(_TIER1.format(star=r"\*\." if star else "", name=FAST_NAME, lb=_LB))
        for star in (False, True)}
#: tier 0: a run of lines that are all exactly ``name CNAME .`` with a lower-case relative
#: owner; the lookbehinds (IP and NS triggers) only where the text has "rpz-" at all
_RUN0 = {lb: re.compile(rf"(?:{FAST_NAME_LOWER}{_LB if lb else ''} CNAME \.\n)++")
         for lb in (False, True)}
_RUN0_MIN = 1 << 16  # bytes: a shorter run is left to tiers 1 and 2 (tests lower it)
_RUN0_SEEK = 64  # lines tried for the start of the next run before tiers 1 and 2 take the rest
#: tier 2, over the lines tier 1 left: absolute owners, the other targets, comments
_RX2 = re.compile(
    rf"(\*\.)?+({FAST_NAME}){_LB}(\.?+)[ \t]++(?:[0-9]{{1,9}}+[ \t]++)?+"
    r"(?:(?:IN|in)[ \t]++)?+(?:CNAME|cname)[ \t]++"
    r"(\.|\*\.|rpz-passthru\.|rpz-drop\.|rpz-tcp-only\.)[ \t]*+(?:;([^\n]*+))?+\n|"
    + CATCH_ALL_TEXT)
_TOKEN = re.compile(
    r'[ \t]*(?:;(?P<c>.*)|(?P<q>"(?:[^"\\]|\\.)*")|(?P<o>\()|(?P<x>\))'
    r'|(?P<w>(?:[^\s;"()\\]|\\.)+)|(?P<bad>["\\]))')
_IGNORED_TYPES = {dns.rdatatype.RRSIG, dns.rdatatype.NSEC, dns.rdatatype.NSEC3,
                  dns.rdatatype.NSEC3PARAM, dns.rdatatype.DNSKEY, dns.rdatatype.ZONEMD}
_CLASSES = {"IN", "CH", "HS", "NONE", "ANY"}
_NSX = "NSDNAME/NSIP triggers cannot be evaluated by a forwarding resolver; skipped"


class _Fallback(Exception):
    """The fast path cannot be used for this file: parse every line carefully."""


@dataclass
class _Record:
    line: int
    nlines: int
    owner: str  # absolute, lower case, no trailing dot ("" = root)
    ttl: int | None  # its own, else the $TTL in effect, else None
    rdtype: dns.rdatatype.RdataType
    rdata: str
    comment: str
    origin: str  # $ORIGIN in effect (for relative names in the RDATA)


def _tokens(text: str) -> tuple[list[str], str | None, int, str | None]:
    """(tokens, comment, paren depth change, error) of one physical line."""
    toks: list[str] = []
    comment = None
    depth = 0
    pos, n = 0, len(text)
    while pos < n:
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip():
                return toks, comment, depth, f"unexpected text {text[pos:].strip()[:20]!r}"
            break
        pos = m.end()
        kind = m.lastgroup or ""
        if kind == "c":
            comment = m.group("c")
            break
        if kind == "o":
            depth += 1
        elif kind == "x":
            depth -= 1
        elif kind == "bad":
            return toks, comment, depth, "unterminated quoted string or escape"
        else:
            toks.append(m.group(kind))
    return toks, comment, depth, None


def _absolute(owner: str, origin: str) -> str:
    """Owner token -> absolute name, lower case, no trailing dot."""
    if owner == "@":
        return origin
    if owner.endswith(".") and not owner.endswith("\\."):
        return owner[:-1].lower()
    low = owner.lower()
    return f"{low}.{origin}" if origin else low


def _relative(name: str, zone: str) -> str:
    """Name relative to the zone ("" = apex); names outside the zone are kept whole."""
    if not zone:
        return name
    if name == zone:
        return ""
    if name.endswith("." + zone):
        return name[:-len(zone) - 1]
    return name


def _rpz_ip(labels: list[str]) -> str:
    """``["32", "53", "2", "0", "192"]`` -> ``"192.0.2.53/32"``; raises ValueError."""
    if len(labels) < 2 or not labels[0].isdigit():
        raise ValueError("expected <prefix>.<reversed address>")
    prefix = int(labels[0])
    rest = labels[:0:-1]  # address in normal order
    if len(rest) == 4 and all(x.isdigit() for x in rest):
        text = ".".join(rest)
    else:
        if rest.count("zz") > 1:
            raise ValueError("more than one 'zz'")
        text = ":".join("" if x == "zz" else x for x in rest)
        if rest[0] == "zz":
            text = ":" + text
        if rest[-1] == "zz":
            text += ":"
    net = ipaddress.ip_network(f"{text}/{prefix}", strict=True)
    return str(net)


class _Parser:
    def __init__(self, ps: ParsedSource, origin: str | None, fr: _FastRules,
                 careful: list[tuple[int, str]], count: int, bad: dict[int, str],
                 fast: bool) -> None:
        self.ps = ps
        self.zone_arg = None if origin is None else origin.strip().rstrip(".").lower()
        self.fr = fr
        self.careful = careful
        self.count = count
        self.bad = bad
        self.fast = fast
        self.records: list[_Record] = []
        self.first_fast = fr.lines[0] if len(fr.lines) else None
        self.origin = self.zone_arg or ""  # current $ORIGIN
        self.first_origin: str | None = None
        self.ttl: int | None = None
        self.last_owner: str | None = None
        self.last_owner_line = 0

    # ---- pass 1: logical records -------------------------------------------------
    def read(self) -> None:
        careful = self.careful
        j = 0
        while j < len(careful):
            lineno, text = careful[j]
            j += 1
            if text == BAD_UTF8:
                self.ps.problem(lineno, self.bad[lineno])
                continue
            toks, comment, depth, err = _tokens(text)
            if err:
                self.ps.problem(lineno, err)
                continue
            if not toks and depth == 0:
                if comment is not None:
                    comment_header(self.ps, ";" + comment)
                self.ps.ignored += 1
                continue
            comments = [comment] if comment else []
            nlines = 1
            broken = None
            while depth > 0:
                want = lineno + nlines
                if j < len(careful) and careful[j][0] == want:
                    more = careful[j][1]
                    j += 1
                elif self.fast and want <= self.count:
                    raise _Fallback
                else:
                    broken = "unbalanced '(': record runs to the end of the file"
                    break
                nlines += 1
                if more == BAD_UTF8:
                    broken = self.bad[want]
                    break
                t2, c2, d2, e2 = _tokens(more)
                if e2:
                    broken = f"line {want}: {e2}"
                    break
                toks += t2
                depth += d2
                if c2:
                    comments.append(c2)
            if broken is None and depth < 0:
                broken = "unbalanced ')'"
            if broken:
                self.ps.problem(lineno, broken)
                continue
            if not toks:
                self.ps.ignored += nlines
                continue
            self._logical(lineno, nlines, text[:1] in (" ", "\t"), toks, "\n".join(comments))

    def _logical(self, lineno: int, nlines: int, blank_owner: bool, toks: list[str],
                 comment: str) -> None:
        ps = self.ps
        if not blank_owner and toks[0].startswith("$"):
            self._directive(lineno, nlines, toks)
            return
        if blank_owner:
            owner = self._previous_owner(lineno)
            if owner is None:
                ps.problem(lineno, "blank owner but no previous owner")
                return
            rest = toks
        else:
            if "\\" in toks[0]:
                ps.problem(lineno, "escaped characters in owner names are not supported")
                return
            owner = _absolute(toks[0], self.origin)
            rest = toks[1:]
        ttl = None
        i = 0
        while i < len(rest) and i < 2:
            tok = rest[i]
            if tok[:1].isdigit():
                try:
                    ttl = dns.ttl.from_text(tok)
                except dns.exception.DNSException:
                    ps.problem(lineno, f"invalid TTL {tok!r}")
                    return
            elif tok.upper() in _CLASSES or tok.upper().startswith("CLASS"):
                if tok.upper() != "IN":
                    ps.problem(lineno, f"class {tok} is not supported (IN only)")
                    return
            else:
                break
            i += 1
        if i >= len(rest):
            ps.problem(lineno, "no record type")
            return
        try:
            rdtype = dns.rdatatype.from_text(rest[i])
        except dns.exception.DNSException:
            ps.problem(lineno, f"unknown record type {rest[i]!r}")
            return
        self.last_owner, self.last_owner_line = owner, lineno
        if ttl is None:
            ttl = self.ttl  # the $TTL in effect
        self.records.append(_Record(lineno, nlines, owner, ttl, rdtype,
                                    " ".join(rest[i + 1:]), comment, self.origin))

    def _directive(self, lineno: int, nlines: int, toks: list[str]) -> None:
        ps = self.ps
        word = toks[0].upper()
        if word == "$ORIGIN":
            if len(toks) != 2:
                ps.problem(lineno, "$ORIGIN takes one name")
                return
            if self.fast and self.first_fast is not None and lineno > self.first_fast:
                raise _Fallback
            self.origin = _absolute(toks[1], self.origin)
            if self.first_origin is None:
                self.first_origin = self.origin
            ps.ignored += nlines
        elif word == "$TTL":
            try:
                self.ttl = dns.ttl.from_text(toks[1]) if len(toks) == 2 else None
                if self.ttl is None:
                    raise dns.exception.SyntaxError("$TTL takes one value")
            except dns.exception.DNSException as e:
                ps.problem(lineno, f"invalid $TTL: {e}")
                return
            ps.ignored += nlines
        elif word == "$INCLUDE":
            ps.problem(lineno, "$INCLUDE is refused: a downloaded feed must not pull in "
                               "other files")
        else:
            ps.problem(lineno, f"unsupported directive {toks[0]}")

    def _previous_owner(self, lineno: int) -> str | None:
        fr = self.fr
        k = bisect_left(fr.lines, lineno) - 1
        if k >= 0 and fr.lines[k] > self.last_owner_line:
            star = "*." if fr.scopes[k] == Scope.BELOW else ""
            dot = fr.dots[k] if fr.dots is not None else ""
            return _absolute(star + fr.names[k] + dot, self.origin)
        return self.last_owner

    # ---- pass 2: records -> rules -----------------------------------------------
    def zone(self) -> str:
        if self.zone_arg is not None:
            return self.zone_arg
        soa = next((r.owner for r in self.records if r.rdtype == dns.rdatatype.SOA), None)
        if soa is not None:
            return soa
        return self.first_origin or ""

    def rules(self, zone: str) -> list[Row]:
        ps = self.ps
        rows: list[Row] = []
        groups: dict[tuple, list] = {}  # local data: key -> [line, records, family, kind info]
        origins: dict[str, dns.name.Name] = {}
        # RDATA parsed by dnspython once per distinct (type, text, origin): rdata objects
        # are immutable, and a feed repeats "CNAME ." or its sinkhole address endlessly
        parsed: dict[tuple[int, str, str], dns.rdata.Rdata] = {}
        for rec in self.records:
            rel = _relative(rec.owner, zone)
            if rec.rdtype in _IGNORED_TYPES:
                ps.ignored += rec.nlines
                continue
            if rel == "":
                if rec.rdtype in (dns.rdatatype.SOA, dns.rdatatype.NS):
                    ps.ignored += rec.nlines
                else:
                    ps.problem(rec.line, "record at the zone apex is not a policy rule")
                continue
            if rec.rdtype in (dns.rdatatype.SOA, dns.rdatatype.NS):
                ps.problem(rec.line, f"{dns.rdatatype.to_text(rec.rdtype)} below the zone apex "
                                     "(a delegation) is not a policy rule")
                continue
            labels = rel.split(".")
            last = labels[-1]
            family = family_from_comment(rec.comment) if rec.comment else None
            # the trigger
            if last in ("rpz-nsdname", "rpz-nsip"):
                ps.unsupported[last[4:]] += 1
                ps.problem(rec.line, _NSX)
                continue
            if last in ("rpz-ip", "rpz-client-ip"):
                try:
                    net = _rpz_ip(labels[:-1])
                except ValueError as e:
                    ps.problem(rec.line, f"invalid {last} trigger {rel!r}: {e}")
                    continue
                key: tuple = ("ip", Trigger.RESPONSE_IP if last == "rpz-ip"
                              else Trigger.CLIENT_IP, net)
            else:
                scope = Scope.EXACT
                base = rel
                if rel == "*":
                    ps.problem(rec.line, "wildcard owner '*' at the apex would match every name")
                    continue
                if rel.startswith("*."):
                    base, scope = rel[2:], Scope.BELOW
                if "*" in base:
                    ps.problem(rec.line, "'*' is only allowed as the first label of an owner")
                    continue
                qname, why = check_name(base, allow_single_label=True)
                if qname is None:
                    ps.problem(rec.line, f"owner {base!r} is not a valid name: {why}")
                    continue
                key = ("qname", qname, scope)
            # the action
            try:
                ck = (rec.rdtype, rec.rdata, rec.origin)
                rd = parsed.get(ck)
                if rd is None:
                    org = origins.get(rec.origin)
                    if org is None:
                        org = origins[rec.origin] = dns.name.from_text(rec.origin + ".")
                    rd = parsed[ck] = dns.rdata.from_text(
                        dns.rdataclass.IN, rec.rdtype, rec.rdata, origin=org, relativize=False)
            except (dns.exception.DNSException, ValueError) as e:
                ps.problem(rec.line, f"invalid {dns.rdatatype.to_text(rec.rdtype)} data: "
                                     f"{e or type(e).__name__}")
                continue
            action = Action.LOCAL_DATA
            target = ""
            if isinstance(rd, CNAME):
                target = rd.target.to_text().lower()
                action = _TARGETS.get(target, Action.LOCAL_DATA)
                if action == Action.LOCAL_DATA and key[0] == "qname" and (
                        target[:-1] in (key[1], rec.owner)) and key[2] == Scope.EXACT:
                    action = Action.PASSTHRU  # legacy: CNAME to the owner's own name
            if action == Action.LOCAL_DATA:
                wild = None
                if target.startswith("*.") and len(target) > 2:
                    wild = target[2:-1]
                record = LocalRecord(int(rec.rdtype), wire(rd), rec.ttl, rd.to_text(), wild)
                g = groups.get(key)
                if g is None:
                    groups[key] = [rec.line, [record], family]
                    continue
                if record not in g[1]:  # identical RRs merge silently, as in a zone
                    cname = int(dns.rdatatype.CNAME)
                    if record.rtype == cname or any(r.rtype == cname for r in g[1]):
                        ps.problem(rec.line, "CNAME and other data at the same owner; "
                                             "record skipped")
                        continue
                    g[1].append(record)
                if g[2] is None:
                    g[2] = family
                ps.skipped[rec.line] = f"merged into the rule on line {g[0]}"
                continue
            if key[0] == "ip":
                ps.ip_rules.append(IpRule(key[1], key[2], action, rec.line, (), family))
            else:
                rows.append(Row(rec.line, key[1], key[2], action, family))
        for key, (line, records, family) in groups.items():
            if key[0] == "ip":
                ps.ip_rules.append(IpRule(key[1], key[2], Action.LOCAL_DATA, line,
                                          tuple(records), family))
            else:
                rows.append(Row(line, key[1], key[2], Action.LOCAL_DATA, family,
                                tuple(records)))
        ps.ip_rules.sort(key=lambda r: r.line)
        return rows


_SPECIAL_TLDS = frozenset({"rpz-ip", "rpz-client-ip", "rpz-nsip", "rpz-nsdname"})
_SPECIAL_SUFFIXES = tuple("." + t for t in sorted(_SPECIAL_TLDS))
_STAR_SCOPE = {"*.": Scope.BELOW, "": Scope.EXACT}


@dataclass
class _FastRules:
    """Rules of the fast lines, in line order; ``dots[i]`` is "." for an absolute owner."""

    lines: array.array
    names: list[str]
    scopes: bytes
    actions: bytes
    dots: list[str] | None = None
    families: list[str] | None = None

    def take(self, keep: list[bool]) -> _FastRules:
        def pick(col):
            return None if col is None else list(compress(col, keep))

        return _FastRules(array.array("I", compress(self.lines, keep)),
                          list(compress(self.names, keep)),
                          bytes(compress(self.scopes, keep)),
                          bytes(compress(self.actions, keep)), pick(self.dots),
                          pick(self.families))


def _families(comments: list[str]) -> list[str] | None:
    """Family tags of the fast lines' comments ("" for none), None when there are none.
    Only comments that can hold a tag (``=``, ThreatFox's ``(confidence level:``) are read."""
    if not any(comments):
        return None
    n = len(comments)
    maybe = compress(range(n), map(operator.or_,
                                   map(operator.contains, comments, repeat("=")),
                                   map(operator.contains, comments, repeat("(confidence level:"))))
    families = [""] * n
    found = False
    for i in maybe:
        f = family_from_comment(comments[i])
        if f:
            families[i] = f
            found = True
    return families if found else None


def _merge(a: _FastRules, b: _FastRules) -> _FastRules:
    """Two sets of fast rules -> one, in line order (numpy's stable argsort, C-level takes)."""
    if not len(b.lines):
        return a
    if not len(a.lines):
        return b
    na = len(a.lines)
    lines = np.concatenate([np.frombuffer(a.lines, dtype=np.uint32),
                            np.frombuffer(b.lines, dtype=np.uint32)])
    order = np.argsort(lines, kind="stable")
    perm = order.tolist()

    def col(x, y, fill):
        if x is None and y is None:
            return None
        x = x if x is not None else [fill] * na
        y = y if y is not None else [fill] * len(b.lines)
        both = x + y
        return list(map(both.__getitem__, perm))

    out = array.array("I")
    out.frombytes(lines[order].tobytes())
    scopes = np.frombuffer(a.scopes + b.scopes, dtype=np.uint8)[order].tobytes()
    actions = np.frombuffer(a.actions + b.actions, dtype=np.uint8)[order].tobytes()
    return _FastRules(out, col(a.names, b.names, ""), scopes, actions,
                      col(a.dots, b.dots, ""), col(a.families, b.families, ""))


def _fast_scan(text: str) -> tuple[_FastRules, list[tuple[int, str]], int]:
    """Tier 0 over the long runs of plain ``name CNAME .`` lines, tiers 1 and 2 over each
    stretch between them; returns (rules, careful lines, number of lines).

    Tier 0 costs about half of tier 1 (the 1M-name benchmark list: one ``match`` and one
    ``split``, ~0.35 s, against ~0.65 s of ``findall`` and list building), and makes no
    tuple or list per line."""
    rx0 = _RUN0["rpz-" in text]
    pieces: list[tuple[int, _FastRules, list[tuple[int, str]]]] = []  # (line offset, ...)
    pos = line = 0
    while pos < len(text):
        run = _next_run(text, pos, rx0)
        stop = run[0] if run else len(text)
        if stop > pos:  # the stretch before the run (the header), or the rest
            rules, careful, count = _tiers12(text[pos:stop])
            pieces.append((line, rules, careful))
            line += count
        if run is None:
            break
        start, end = run
        if end == len(text) and text.find(" CNAME .\n", 0, start) < 0:
            # the run ends the text: split the text itself (no copy of the run), then cut
            # the stretch before the run off the first name
            names = text.split(" CNAME .\n")
            names[0] = names[0][start:]
        else:
            names = text[start:end].split(" CNAME .\n")
        names.pop()  # "" after the last line
        n = len(names)
        lines = array.array("I")
        lines.frombytes(np.arange(line + 1, line + n + 1, dtype=np.uint32).tobytes())
        pieces.append((0, _FastRules(lines, names, bytes([Scope.EXACT]) * n,
                                     bytes([Action.NXDOMAIN]) * n), []))
        line += n
        pos = end
    return (*_concat(pieces), line)


def _next_run(text: str, pos: int, rx0: re.Pattern[str]) -> tuple[int, int] | None:
    """(start, end) of the first tier-0 run of at least ``_RUN0_MIN`` characters that
    starts within ``_RUN0_SEEK`` lines of ``pos`` (a line start), else None."""
    for _ in range(_RUN0_SEEK):
        end = run_end(rx0, text, pos)
        if end - pos >= _RUN0_MIN:
            return pos, end
        nl = text.find("\n", end)  # the line that ended the run (or this one) is not plain
        if nl < 0:
            return None
        pos = nl + 1
    return None


def _concat(pieces: list[tuple[int, _FastRules, list[tuple[int, str]]]]
            ) -> tuple[_FastRules, list[tuple[int, str]]]:
    """Fast rules and careful lines of consecutive stretches, each with its first line's
    offset, as one set in line order."""
    if len(pieces) == 1 and pieces[0][0] == 0:
        return pieces[0][1], pieces[0][2]
    lines = array.array("I")
    names: list[str] = []
    scopes, actions = bytearray(), bytearray()
    careful: list[tuple[int, str]] = []
    has_dots = any(fr.dots is not None for _, fr, _ in pieces)
    has_families = any(fr.families is not None for _, fr, _ in pieces)
    dots: list[str] | None = [] if has_dots else None
    families: list[str] | None = [] if has_families else None
    for offset, fr, lines_left in pieces:
        lines.frombytes((np.frombuffer(fr.lines, dtype=np.uint32) + np.uint32(offset)).tobytes()
                        if offset else fr.lines.tobytes())
        names.extend(fr.names)
        scopes += fr.scopes
        actions += fr.actions
        for column, part in ((dots, fr.dots), (families, fr.families)):
            if column is not None:
                column.extend(part if part is not None else repeat("", len(fr.names)))
        careful.extend((ln + offset, t) for ln, t in lines_left)
    return _FastRules(lines, names, bytes(scopes), bytes(actions), dots, families), careful


def _tiers12(text: str) -> tuple[_FastRules, list[tuple[int, str]], int]:
    """Tier 1 (exact and wildcard owners, the more frequent first) over the text, tier 2
    over what tier 1 left; returns (rules, careful lines, number of lines). A file whose
    lines mostly carry comments (abuse.ch style) goes to tier 2 directly."""
    # a head sample decides whether tier 1 is worth it (not for comment-heavy abuse.ch
    # style files nor zone dumps with absolute owners)
    cut = text.rfind("\n", 0, 1 << 17)
    head = text[:cut + 1] if cut > 0 else text
    star_first = head.count("\n*.") * 2 > head.count("\n")  # the more frequent owner form
    sample = scan(head, _RX1[star_first])
    if len(sample.careful) * 2 > sample.nlines:
        s2 = scan(text, _RX2, 1)
        return _tier2(s2), s2.careful, s2.nlines
    # the more frequent form first, judged by the head (counting the whole text costs more
    # than a second pass over the few lines the first one leaves)
    order = [True, False] if star_first else [False, True]
    rules = None
    pending: list[tuple[int, str]] | None = None
    count = 0
    for star in order:
        rx = _RX1[star]
        if pending is None:
            s1 = scan(text, rx)
            count = s1.nlines
        else:
            s1 = scan_lines(pending, rx)
        n = len(s1.groups[0])
        tier = _FastRules(s1.fast_lines, s1.groups[0],
                          bytes([Scope.BELOW if star else Scope.EXACT]) * n,
                          bytes([Action.NXDOMAIN]) * n)
        rules = tier if rules is None else _merge(rules, tier)
        pending = s1.careful
        if not pending:
            return rules, [], count
    s2 = scan_lines(pending or [], _RX2, 1)
    assert rules is not None
    return _merge(rules, _tier2(s2)), s2.careful, count


def _tier2(s2: Scan) -> _FastRules:
    stars, names, dots, targets, comments = s2.groups
    return _FastRules(s2.fast_lines, names, bytes(map(_STAR_SCOPE.__getitem__, stars)),
                      bytes(map(_TARGETS.__getitem__, targets)),
                      dots if any(dots) else None, _families(comments))


def _fast_names(fr: _FastRules, origin: str, zone: str) -> tuple[list[str], list[int]]:
    """Trigger names of the fast lines, and the fast lines that need the careful path
    (over-long names, apex owners, IP/NS triggers once the zone is stripped)."""
    names = fr.names
    redo = []
    if max(map(len, names), default=0) > 253:
        redo = [i for i, n in enumerate(names) if len(n) > 253]
    dots = fr.dots
    if origin == zone and dots is None:
        return names, redo  # the usual case: owners relative to the zone
    sfx = "." + zone
    # bulk (C-level) for the uniform cases: all owners absolute (a zone dump), or all
    # relative to an $ORIGIN that is a valid name; anything else name by name
    full = None
    if (dots is not None and all(dots)) or (dots is None and not origin):
        full = names
    elif dots is None and check_name(origin, True)[0] == origin:
        full = list(map(operator.add, names, repeat("." + origin)))
        if max(map(len, full), default=0) > 253:
            full = None
    if full is not None and zone:
        ends = list(map(operator.methodcaller("endswith", sfx), full))
        if all(ends):  # (an apex owner does not end with ".zone": not all)
            out = list(map(operator.itemgetter(slice(None, -len(sfx))), full))
        elif not any(ends) and zone not in full:
            out = full
        else:
            full = None
        if full is not None:
            special: set[int] = set()
            is_special = operator.methodcaller("endswith", _SPECIAL_SUFFIXES)
            if any(map(is_special, out)):
                special.update(compress(range(len(out)), map(is_special, out)))
            if not _SPECIAL_TLDS.isdisjoint(out):
                special.update(compress(range(len(out)), map(_SPECIAL_TLDS.__contains__, out)))
            return out, sorted(set(redo) | special)
    elif full is not None and not zone:
        return full, redo
    out = []
    for i, name in enumerate(names):
        absolute = dots is not None and dots[i]
        full_name = name if absolute or not origin else f"{name}.{origin}"
        if full_name is not name and check_name(full_name, True)[0] != full_name:
            redo.append(i)  # the $ORIGIN part is not a plain valid suffix
        elif zone:
            if full_name == zone:
                redo.append(i)
            elif full_name.endswith(sfx):
                full_name = full_name[:-len(sfx)]
                if full_name.rpartition(".")[2] in _SPECIAL_TLDS:
                    redo.append(i)
        out.append(full_name)
    return out, sorted(set(redo))


def parse(data: bytes, path: str = "", origin: str | None = None, *,
          fast: bool = True) -> ParsedSource:
    text, bad = decode(data)
    with no_gc():
        if fast:
            try:
                return _parse(text, bad, path, origin, True)
            except _Fallback:
                pass
        return _parse(text, bad, path, origin, False)


def _parse(text: str, bad: dict[int, str], path: str, origin: str | None,
           fast: bool) -> ParsedSource:
    ps = ParsedSource(path=path, format="rpz")
    if fast:
        fr, careful, count = _fast_scan(text)
    else:
        lines = split_lines(text)
        fr = _FastRules(array.array("I"), [], b"", b"")
        careful, count = list(enumerate(lines, 1)), len(lines)
    p = _Parser(ps, origin, fr, careful, count, bad, fast)
    p.read()
    zone = p.zone()
    ps.origin = zone or None
    if len(fr.lines):
        names, redo = _fast_names(fr, p.origin, zone)
        fr.names = names
        if redo:  # rare: give these lines to the careful path, in line order
            lines = split_lines(text)
            for i in redo:
                lineno = fr.lines[i]
                toks, comment, _, _ = _tokens(lines[lineno - 1])
                p._logical(lineno, 1, False, toks, comment or "")
            p.records.sort(key=lambda r: r.line)
            drop = set(redo)
            fr = fr.take([i not in drop for i in range(len(fr.names))])
    rows = p.rules(zone)
    assemble(ps, Fast(fr.lines, fr.names, fr.scopes, fr.actions, fr.families), rows)
    ps.problems.sort(key=lambda pr: pr.line)
    return ps
