"""AdBlock / ABP / AdGuard DNS filtering syntax (HaGeZi ``adblock/``, OISD, AdGuard DNS filter).

Rules and what they become:

* ``||name^`` name and subdomains (SUBTREE); ``|name^`` and a bare ``name`` the exact name;
  ``*.name^`` strict subdomains (BELOW); ``name^`` without an anchor: SUBTREE. A single
  label is legal only as ``||tld^``.
* ``@@`` exceptions become ``Action.PASSTHRU``; blocks use ``Action.DEFAULT``.
* hosts-style ``0.0.0.0 name`` (exact block) and ``203.0.113.80 name`` (Local-Data A).
* ``||192.0.2.7^`` -> ``IpRule(RESPONSE_IP, "192.0.2.7/32")`` (AdGuard matches answers).
* ``*`` inside a name -> ``PatternRule("glob", "ads*.example")``: the glob applies to the
  name and its subdomains like ``||...^`` (``*`` may span dots); ``|a*b^`` (exact) and
  ``/regex/`` -> ``PatternRule("regex", ...)`` (matched against the lower-case name).
* ``$important``, ``$badfilter``, ``$dnstype=``, ``$client=`` (networks), ``$denyallow=``
  (a glob with ``unless_under``), ``$dnsrewrite=`` (NXDOMAIN/NODATA/Local-Data).
  ``$dnstype``/``$client`` rules are :class:`ConditionalRule`s.
* Not DNS: cosmetic (``##``...) and URL/path rules, rules with browser-only modifiers
  (``$third-party``, ``$popup``...) or ``$ctag`` (client tags moat cannot know): counted in
  ``unsupported`` by kind and explained in ``skipped``.

Within-source priorities are resolved here (AdGuard semantics), so the engine only sees the
effective rules: ``$badfilter`` removes the identical rule; an exception removes the plain
blocks it covers (same name or below an exception's subtree); an ``$important`` block
survives plain exceptions and removes the plain exceptions it covers; ``@@...$important``
removes even ``$important`` blocks. Removed rules are listed in ``skipped``. Conditional
rules and ``$dnsrewrite`` rules are not part of this resolution.
"""

from __future__ import annotations

import ipaddress
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from itertools import compress

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import idna

from policy.rules import (
    Action,
    ConditionalRule,
    IpRule,
    LocalRecord,
    ParsedSource,
    PatternRule,
    Scope,
    Trigger,
)

from ._common import (
    BAD_UTF8,
    CATCH_ALL,
    Fast,
    Row,
    assemble,
    comment_header,
    decode,
    indexes_named,
    no_gc,
    remove_entries,
    reroute,
    scan,
    too_long,
    under_any,
    wire,
)
from .hosts import address_record, hosts_line, is_sink
from .names import FAST_NAME, _to_ascii, check_name, ip_literal

_RX = re.compile(rf"\|\|({FAST_NAME})\^[ \t]*+\n|{CATCH_ALL}")
_COSMETIC = re.compile(r"#[@?$%]{0,2}#|#@?\$\??#|\$@?\$|#%#")
_DNS_MODIFIERS = {"important", "badfilter", "dnstype", "client", "ctag", "denyallow",
                  "dnsrewrite"}
_BLANK = re.compile(r"[ \t]")
_URLISH = re.compile(r"[/:?=&^|%]")
_GLOB = re.compile(r"[a-z0-9_*-]+(?:\.[a-z0-9_*-]+)*")

Key = tuple[bool, str, str, int, frozenset[str]]


@dataclass
class _State:
    important: set[int] = field(default_factory=set)  # lines of $important rules
    mods: dict[int, frozenset[str]] = field(default_factory=dict)  # line -> modifiers
    badfilters: dict[Key, int] = field(default_factory=dict)  # disabled rule key -> line


def _split_modifiers(text: str) -> list[tuple[str, str]]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, value = part.partition("=")
        out.append((name.strip().lower(), value.strip()))
    return out


def _rewrite(value: str) -> tuple[Action, tuple[LocalRecord, ...]]:
    """``$dnsrewrite=`` value -> (action, records); raises ValueError when malformed."""
    v = value.strip()
    if not v:
        raise ValueError("empty $dnsrewrite")
    if ";" in v:
        rcode, _, rest = v.partition(";")
        rrtype, _, rvalue = rest.partition(";")
        rcode, rrtype, rvalue = rcode.strip().upper(), rrtype.strip().upper(), rvalue.strip()
    elif v.upper() in ("NXDOMAIN", "REFUSED", "SERVFAIL", "NOERROR"):
        rcode, rrtype, rvalue = v.upper(), "", ""
    else:
        addr = ip_literal(v)
        if addr is not None:
            rcode, rrtype, rvalue = "NOERROR", "A" if addr.version == 4 else "AAAA", v
        else:
            rcode, rrtype, rvalue = "NOERROR", "CNAME", v
    if rcode == "NXDOMAIN":
        return Action.NXDOMAIN, ()
    if rcode in ("REFUSED", "SERVFAIL"):
        return Action.DEFAULT, ()
    if rcode != "NOERROR":
        raise ValueError(f"unknown response code {rcode!r}")
    if not rrtype:
        return Action.NODATA, ()
    if rrtype in ("A", "AAAA"):
        addr = ip_literal(rvalue)
        if addr is None or (addr.version == 4) != (rrtype == "A"):
            raise ValueError(f"{rvalue!r} is not an {rrtype} address")
        if is_sink(addr):
            return Action.DEFAULT, ()
        return Action.LOCAL_DATA, (address_record(addr),)
    try:
        rdtype = dns.rdatatype.from_text(rrtype)
        if rdtype in (dns.rdatatype.CNAME, dns.rdatatype.PTR, dns.rdatatype.NS) \
                and not rvalue.endswith("."):
            rvalue += "."
        rd = dns.rdata.from_text(dns.rdataclass.IN, rdtype, rvalue, origin=dns.name.root)
    except (dns.exception.DNSException, ValueError) as e:
        raise ValueError(f"bad {rrtype} data {rvalue!r}: {e}") from None
    return Action.LOCAL_DATA, (LocalRecord(int(rdtype), wire(rd), None, rd.to_text()),)


def _glob_to_regex(glob: str) -> str:
    return "^" + ".*".join(re.escape(p) for p in glob.split("*")) + "$"


def _unsupported(ps: ParsedSource, lineno: int, kind: str, why: str) -> None:
    ps.unsupported[kind] += 1
    ps.skipped[lineno] = why


def _line(ps: ParsedSource, st: _State, rows: list[Row], lineno: int, text: str) -> None:
    s = text.strip()
    if not s or s[0] in "!#" or (s[0] == "[" and s[-1] == "]"):
        if s:
            comment_header(ps, s)
        ps.ignored += 1
        return
    if _COSMETIC.search(s):
        _unsupported(ps, lineno, "cosmetic", "cosmetic rule: not DNS")
        return
    exception = s.startswith("@@")
    body = s[2:] if exception else s
    # hosts-style line inside an AdBlock list
    m = _BLANK.search(body)
    if m:
        blank = m.start()
        if not exception and ip_literal(body[:blank]) is not None:
            hosts_line(ps, rows, lineno, body)
            return
        if "$" not in body[:blank]:  # blanks are allowed in modifier values only
            ps.problem(lineno, "unexpected blank inside a rule")
            return
    # split pattern and modifiers
    if body.startswith("/") and len(body) > 1:
        if body.endswith("/"):
            pattern, modtext = body, ""
        else:
            cut = body.rfind("/$")
            if cut <= 0:
                _unsupported(ps, lineno, "url-path", "URL or path rule: not DNS")
                return
            pattern, modtext = body[:cut + 1], body[cut + 2:]
    else:
        pattern, _, modtext = body.partition("$")
    mods = _split_modifiers(modtext)
    names = {m for m, _ in mods}
    other = [m for m in names if m not in _DNS_MODIFIERS]
    if other:
        _unsupported(ps, lineno, "browser-modifier",
                     f"browser-only modifier ${sorted(other)[0]}: not applicable to DNS")
        return
    if "ctag" in names:
        _unsupported(ps, lineno, "ctag", "$ctag (client tags) cannot be evaluated; rule skipped")
        return
    action = Action.PASSTHRU if exception else Action.DEFAULT
    # --- the pattern ---
    kind = "qname"
    target = ""
    scope = Scope.SUBTREE
    if pattern.startswith("/") and pattern.endswith("/") and len(pattern) > 2:
        kind, target = "regex", pattern[1:-1]
        try:
            re.compile(target)
        except re.error as e:
            ps.problem(lineno, f"invalid regular expression: {e}")
            return
    else:
        p = pattern
        if p.startswith("||"):
            anchor, p = "sub", p[2:]
        elif p.startswith("|"):
            anchor, p = "exact", p[1:]
        else:
            anchor = "none"
        caret = False
        if p.endswith("|"):
            p = p[:-1]
        if p.endswith("^"):
            p, caret = p[:-1], True
        if _URLISH.search(p) and ip_literal(p) is None:
            _unsupported(ps, lineno, "url-path", "URL or path rule: not DNS")
            return
        if not p:
            ps.problem(lineno, "empty rule")
            return
        addr = ip_literal(p)
        if addr is not None:
            kind, target = "ip", f"{addr}/{addr.max_prefixlen}"
        elif "*" in p:
            low = p.lower()
            if not low.isascii():
                try:
                    low = _to_ascii(low)
                except (idna.IDNAError, UnicodeError, ValueError) as e:
                    ps.problem(lineno, f"{p!r} is not a valid name pattern: {e}")
                    return
            if low == "*" or not low.strip("*."):
                ps.problem(lineno, "a pattern matching every name")
                return
            if low.startswith("*.") and "*" not in low[2:]:
                name, why = check_name(low[2:], allow_single_label=True)
                if name is None:
                    ps.problem(lineno, f"{p!r} is not a valid name: {why}")
                    return
                target, scope = name, Scope.BELOW
            elif not _GLOB.fullmatch(low):
                ps.problem(lineno, f"{p!r} is not a valid name pattern")
                return
            elif anchor == "exact":
                kind, target = "regex", _glob_to_regex(low)
            else:
                kind, target = "glob", low
        else:
            name, why = check_name(p, allow_single_label=anchor == "sub")
            if name is None:
                ps.problem(lineno, f"{p!r} is not a valid name: {why}")
                return
            target = name
            scope = Scope.EXACT if anchor == "exact" or (anchor == "none" and not caret) \
                else Scope.SUBTREE
    # --- the modifiers ---
    key_mods = frozenset(f"{m}={v}" if v else m for m, v in mods if m != "badfilter")
    if "badfilter" in names:
        st.badfilters[(exception, kind, target, int(scope), key_mods)] = lineno
        ps.skipped[lineno] = "$badfilter: disables the identical rule"
        return
    qtypes: set[int] = set()
    clients: list[str] = []
    unless: list[str] = []
    records: tuple[LocalRecord, ...] = ()
    for mod, v in mods:
        if mod == "dnstype":
            for t in v.split("|"):
                t = t.strip()
                if t.startswith("~"):
                    _unsupported(ps, lineno, "dnstype-negation",
                                 "$dnstype=~TYPE (all but a type) is not supported")
                    return
                try:
                    qtypes.add(int(dns.rdatatype.from_text(t)))
                except dns.exception.DNSException:
                    ps.problem(lineno, f"unknown DNS type {t!r} in $dnstype")
                    return
        elif mod == "client":
            for c in v.split("|"):
                c = c.strip().strip("'\"")
                try:
                    if c.startswith("~"):
                        raise ValueError
                    clients.append(str(ipaddress.ip_network(c, strict=False)))
                except ValueError:
                    _unsupported(ps, lineno, "client-name",
                                 f"$client={c}: only client addresses/networks are supported")
                    return
        elif mod == "denyallow":
            if exception or kind != "qname":
                _unsupported(ps, lineno, "denyallow",
                             "$denyallow is supported on blocking name rules only")
                return
            for d in v.split("|"):
                name, why = check_name(d.strip())
                if name is None:
                    ps.problem(lineno, f"{d!r} in $denyallow is not a valid name: {why}")
                    return
                unless.append(name)
        elif mod == "dnsrewrite":
            if exception:
                _unsupported(ps, lineno, "dnsrewrite-exception",
                             "@@...$dnsrewrite (disabling rewrites) is not supported")
                return
            try:
                action, records = _rewrite(v)
            except ValueError as e:
                ps.problem(lineno, f"invalid $dnsrewrite: {e}")
                return
    if key_mods:
        st.mods[lineno] = key_mods
    if "important" in names:
        st.important.add(lineno)
    if qtypes or clients:
        if kind != "qname":
            _unsupported(ps, lineno, "conditional-pattern",
                         "$dnstype/$client on a pattern or IP rule is not supported")
            return
        ps.conditional.append(ConditionalRule(target, scope, action, lineno, frozenset(qtypes),
                                              tuple(clients), records))
    elif kind == "ip":
        ps.ip_rules.append(IpRule(Trigger.RESPONSE_IP, target, action, lineno, records))
    elif kind in ("glob", "regex"):
        ps.patterns.append(PatternRule(kind, target, action, lineno))
    elif unless:
        glob = ("*." + target) if scope == Scope.BELOW else target
        if scope == Scope.EXACT:
            rows.append(Row(lineno, target, scope, action, None, records))
        else:
            ps.patterns.append(PatternRule("glob", glob, action, lineno, tuple(unless)))
    else:
        rows.append(Row(lineno, target, scope, action, None, records))


def _covers(outer: tuple[str, int], inner: tuple[str, int]) -> bool:
    """Does rule ``outer`` (name, scope) match every name rule ``inner`` matches?"""
    on, os_ = outer
    inn, is_ = inner
    if os_ == Scope.SUBTREE:
        return inn == on or inn.endswith("." + on)
    if os_ == Scope.BELOW:
        return inn.endswith("." + on) or (inn == on and is_ == Scope.BELOW)
    return inn == on and is_ == Scope.EXACT


def _covering(by_name: dict[str, list[tuple[int, int, bool]]], entry: tuple[str, int],
              important: bool) -> int:
    """Line of an exception that covers ``entry`` (and beats it), else 0."""
    name = entry[0]
    while True:
        for sc, line, exc_imp in by_name.get(name, ()):
            if (exc_imp or not important) and _covers((name, sc), entry):
                return line
        dot = name.find(".")
        if dot < 0:
            return 0
        name = name[dot + 1:]


def _resolve(ps: ParsedSource, st: _State) -> None:
    """Apply $badfilter and the exception / $important priorities (see module doc)."""
    drop: set[int] = set()
    if st.badfilters:
        targets = {k[2] for k in st.badfilters if k[1] == "qname"}
        for i in indexes_named(ps, targets):
            line = ps.lines[i]
            key = (ps.actions[i] == Action.PASSTHRU, "qname", ps.names[i], ps.scopes[i],
                   st.mods.get(line, frozenset()))
            if key in st.badfilters:
                drop.add(i)
                ps.skipped[line] = f"disabled by the $badfilter rule on line {st.badfilters[key]}"

        def alive(rule, kind: str, target: str, scope: int = Scope.SUBTREE) -> bool:
            key = (rule.action == Action.PASSTHRU, kind, target, int(scope),
                   st.mods.get(rule.line, frozenset()))
            if key in st.badfilters:
                ps.skipped[rule.line] = \
                    f"disabled by the $badfilter rule on line {st.badfilters[key]}"
                return False
            return True

        ps.ip_rules = [r for r in ps.ip_rules if alive(r, "ip", r.network)]
        ps.patterns = [r for r in ps.patterns if alive(r, r.kind, r.pattern)]
        ps.conditional = [r for r in ps.conditional if alive(r, "qname", r.name, r.scope)]
    # exceptions
    exc: list[int] = []
    if Action.PASSTHRU in ps.actions:
        is_pass = int(Action.PASSTHRU).__eq__
        exc = [i for i in compress(range(len(ps.actions)), map(is_pass, ps.actions))
               if i not in drop]
    if exc:
        imp = st.important
        exceptions = [(ps.names[i], ps.scopes[i], ps.lines[i], ps.lines[i] in imp) for i in exc]
        by_name: dict[str, list[tuple[int, int, bool]]] = {}
        for n, sc, line, exc_imp in exceptions:
            by_name.setdefault(n, []).append((sc, line, exc_imp))
        for i in compress(range(len(ps.names)), under_any(ps.names, set(by_name))):
            if i in drop or ps.actions[i] != Action.DEFAULT:
                continue
            entry = (ps.names[i], ps.scopes[i])
            important = ps.lines[i] in imp
            line = _covering(by_name, entry, important)
            if line:
                drop.add(i)
                ps.skipped[ps.lines[i]] = f"overridden by the exception on line {line}"
        strong = []  # $important blocks still standing (careful lines only: few)
        for line in sorted(imp):
            for i in range(bisect_left(ps.lines, line), bisect_right(ps.lines, line)):
                if i not in drop and ps.actions[i] == Action.DEFAULT:
                    strong.append((ps.names[i], ps.scopes[i], line))
        for i, (n, sc, line, exc_imp) in zip(exc, exceptions, strict=True):
            if exc_imp:
                continue
            for bn, bsc, bline in strong:
                if _covers((bn, bsc), (n, sc)):
                    drop.add(i)
                    ps.skipped[line] = f"overridden by the $important rule on line {bline}"
                    break
    # exception vs block among IP and pattern rules: identical target only
    for attr, tkey in (("ip_rules", "network"), ("patterns", "pattern")):
        rules = getattr(ps, attr)
        allowed = {getattr(r, tkey): r for r in rules if r.action == Action.PASSTHRU}
        if allowed:
            kept = []
            for r in rules:
                a = allowed.get(getattr(r, tkey))
                if (r.action == Action.DEFAULT and a is not None and
                        (r.line not in st.important or a.line in st.important)):
                    ps.skipped[r.line] = f"overridden by the exception on line {a.line}"
                    continue
                kept.append(r)
            setattr(ps, attr, kept)
    remove_entries(ps, drop)


def parse(data: bytes, path: str = "", origin: str | None = None, *,
          fast: bool = True) -> ParsedSource:
    ps = ParsedSource(path=path, format="adblock")
    text, bad = decode(data)
    st = _State()
    with no_gc():
        sc = scan(text, _RX, 0, fast)
        sc = reroute(text, sc, too_long(sc, 0))
        rows: list[Row] = []
        for lineno, line in sc.careful:
            if line == BAD_UTF8:
                ps.problem(lineno, bad[lineno])
            else:
                _line(ps, st, rows, lineno, line)
        names = sc.groups[0]
        n = len(names)
        assemble(ps, Fast(sc.fast_lines, names, bytes([Scope.SUBTREE]) * n, bytes(n)), rows)
        _resolve(ps, st)
    return ps
