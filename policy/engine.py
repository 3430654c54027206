"""The policy snapshot and its precedence rules.

Precedence (draft-vixie-dnsop-dns-rpz-00; BIND 9 where the draft is loose):

1. Sources are consulted in configured order (``--rpz`` flags, then ``[[policy.source]]``
   entries, then the built-in self-test names). **The first source with a match wins.**
2. Within one source: client-IP triggers, then QNAME triggers (together with the source's
   pattern and qtype/client-limited rules), then response-IP triggers.
3. Among QNAME triggers of one source: an exact name beats a wildcard; the longest
   (closest) wildcard wins. ``*.example`` matches names below ``example``, not
   ``example`` itself, as in an ordinary DNS zone.
4. PASSTHRU ends policy processing: the query is answered normally and its answer is not
   checked either (an allow-list hole).
5. A LOG_ONLY source (``action = "log-only"``) never changes an answer: its match is
   remembered and evaluation goes on with the later sources; if nothing else matches, the
   log-only verdict is reported (and logged) with a normal answer.
6. Query time: client-IP, QNAME and pattern triggers of every source are checked before
   the upstream is asked. A match is answered at once (as BIND with
   ``qname-wait-recurse no``), so a blocked name never reaches the upstream; a
   response-IP trigger of an earlier source cannot pre-empt it.
7. Answer time: every owner name and CNAME/DNAME target in the answer is checked against
   QNAME triggers (CNAME cloaking) and every A/AAAA address against response-IP triggers.
   The first source with a match wins, and one rewrite applies to the whole answer.
8. Action overrides per source (BIND's ``policy`` option) replace the action of every rule
   of that source except PASSTHRU: an override never turns an allow-hole into a block.
   Plain lists carry no actions of their own and get ``[policy] default_action``.
9. NSDNAME and NSIP triggers need the authoritative servers' names and addresses, which a
   forwarder never sees: they are counted as unsupported and reported when loading.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .index import ACTION_SHIFT, FAMILY_SHIFT, LINE_SHIFT, SCOPE_SHIFT, NameIndex
from .rules import (
    ACTIONS,
    Action,
    ConditionalRule,
    IpRule,
    LocalRecord,
    PatternRule,
    Trigger,
)
from .verdict import Verdict


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What a verdict needs to know about the source a rule came from."""

    position: int
    name: str
    category: str
    family: str
    location: str  # path or URL shown to people
    snapshot: str  # the file the rules were read from (for reading a rule back by line)
    snapshot_id: tuple[int, int]  # (size, mtime_ns) of that file when it was read
    sparse_lines: tuple[int, ...]  # byte offset of every 64th line
    override: Action | None  # None: the rules' own actions
    default_action: Action  # for rules without one (plain lists)
    ttl: int
    sinkhole_v4: tuple[str, ...]
    sinkhole_v6: tuple[str, ...]
    log_only: bool = False
    inline_rules: tuple[str, ...] = ()  # rule text by line for sources without a file


SPARSE_STEP = 64
# Enum members as plain names: attribute access on an enum class costs on a hot path.
_LOG_ONLY, _PASSTHRU, _DEFAULT = Action.LOG_ONLY, Action.PASSTHRU, Action.DEFAULT
_LOCAL_DATA = Action.LOCAL_DATA
_QNAME, _WILDCARD = Trigger.QNAME, Trigger.WILDCARD
#: Builds a Verdict from a tuple in field order without the keyword-parsing __new__.
_new_verdict = tuple.__new__

# A verdict reference (Policy.check_query_ref): the index's meta word of the rule
# (policy/index.py) with the match depth in its free bits 26-31.
REF_DEPTH_SHIFT = 26
REF_MAX_DEPTH = 63
REF_DEPTH_MASK = REF_MAX_DEPTH << REF_DEPTH_SHIFT
#: The bits of a reference that decide the answer (source, action, family), not which
#: rule or how deep: one synthesised-answer template serves every reference with the same.
REF_HEAD_MASK = 0xFF | 0xF << ACTION_SHIFT | 0xFFF << FAMILY_SHIFT


def read_rule_line(src: SourceInfo, line: int) -> str:
    """The text of ``line`` in the source as it was loaded ("" if it cannot be read)."""
    if src.inline_rules:
        return src.inline_rules[line - 1] if 0 < line <= len(src.inline_rules) else ""
    if not src.snapshot or line <= 0:
        return ""
    try:
        st = os.stat(src.snapshot)
        if (st.st_size, st.st_mtime_ns) != src.snapshot_id:
            return ""
        block = (line - 1) // SPARSE_STEP
        if block >= len(src.sparse_lines):
            return ""
        start = src.sparse_lines[block]
        end = src.sparse_lines[block + 1] if block + 1 < len(src.sparse_lines) else st.st_size
        with open(src.snapshot, "rb") as fh:
            fh.seek(start)
            chunk = fh.read(min(end - start, 1 << 20))
        lines = chunk.split(b"\n")
        text = lines[(line - 1) % SPARSE_STEP] if (line - 1) % SPARSE_STEP < len(lines) else b""
        return text.decode("utf-8", "replace").lstrip("\ufeff").strip()
    except (OSError, IndexError):
        return ""


class RuleText:
    """The rule as written, read from the source file only when somebody looks (logs,
    ``moat check``): the request path never touches the disk, nor formats any text."""

    __slots__ = ("src", "line", "_fallback", "_text")

    def __init__(self, src: SourceInfo, line: int, fallback: str | tuple[str, int]) -> None:
        self.src = src
        self.line = line
        #: what to show when the line cannot be read back: the text, or a name rule's
        #: (name, scope), formatted only when needed
        self._fallback = fallback
        self._text: str | None = None

    @property
    def where(self) -> str:
        """``path:line`` of the rule."""
        return f"{self.src.location}:{self.line}"

    @property
    def fallback(self) -> str:
        fb = self._fallback
        if isinstance(fb, str):
            return fb
        name, scope = fb
        return name if scope == 1 else (f"*.{name}" if scope == 2 else f"{name} (and below)")

    def __str__(self) -> str:
        if self._text is None:
            self._text = read_rule_line(self.src, self.line) or self.fallback
        return self._text

    def __repr__(self) -> str:
        return repr(str(self))

    def __eq__(self, other: object) -> bool:
        return str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


# --- IP triggers --------------------------------------------------------------------


class IpTable:
    """Longest-prefix match per source: {version: {prefixlen: {network int: entry}}}."""

    def __init__(self) -> None:
        self._tables: dict[int, dict[int, dict[int, tuple[int, IpRule]]]] = {4: {}, 6: {}}
        self._lens: dict[int, list[int]] = {4: [], 6: []}
        self.count = 0

    def add(self, position: int, rule: IpRule) -> None:
        net = ipaddress.ip_network(rule.network, strict=False)
        table = self._tables[net.version].setdefault(net.prefixlen, {})
        key = int(net.network_address) >> (net.max_prefixlen - net.prefixlen)
        old = table.get(key)
        if old is None or old[0] > position:
            table[key] = (position, rule)
        self._lens[net.version] = sorted(self._tables[net.version], reverse=True)
        self.count += 1

    def __bool__(self) -> bool:
        return self.count > 0

    def lookup(self, address: str) -> tuple[int, IpRule] | None:
        """The best (lowest source, then longest prefix) rule covering ``address``."""
        try:
            if ":" in address:
                value = int.from_bytes(socket.inet_pton(socket.AF_INET6,
                                                        address.split("%", 1)[0]), "big")
                version, bits = 6, 128
                if value >> 32 == 0xFFFF:  # IPv4-mapped: match IPv4 rules too
                    best4 = self._lookup(4, 32, value & 0xFFFFFFFF)
                    best6 = self._lookup(6, 128, value)
                    return _better(best4, best6)
            else:
                value = int.from_bytes(socket.inet_aton(address), "big")
                version, bits = 4, 32
        except OSError:
            return None
        return self._lookup(version, bits, value)

    def _lookup(self, version: int, bits: int, value: int) -> tuple[int, IpRule] | None:
        best: tuple[int, IpRule] | None = None
        tables = self._tables[version]
        for plen in self._lens[version]:  # longest first
            hit = tables[plen].get(value >> (bits - plen))
            if hit is not None and (best is None or hit[0] < best[0]):
                best = hit
        return best


def _better(a: tuple[int, IpRule] | None, b: tuple[int, IpRule] | None
            ) -> tuple[int, IpRule] | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a[0] <= b[0] else b


# --- patterns: keywords (Aho-Corasick), globs, regexes --------------------------------


class PatternSet:
    """Rules over a name's text. Keywords share one Aho-Corasick automaton, so every
    keyword of every source is matched in one pass over the name."""

    def __init__(self) -> None:
        self._keywords: dict[str, list[tuple[int, PatternRule]]] = {}
        self._regexes: list[tuple[int, PatternRule, re.Pattern[str]]] = []
        self._automaton: Any = None
        self.count = 0

    def add(self, position: int, rule: PatternRule) -> None:
        self.count += 1
        if rule.kind == "keyword":
            self._keywords.setdefault(rule.pattern.lower(), []).append((position, rule))
        elif rule.kind == "glob":
            self._regexes.append((position, rule, _glob_regex(rule.pattern)))
        else:
            self._regexes.append((position, rule, re.compile(rule.pattern, re.IGNORECASE)))

    def finish(self) -> None:
        if self._keywords:
            import ahocorasick

            auto = ahocorasick.Automaton()
            for word, entries in self._keywords.items():
                auto.add_word(word, entries)
            auto.make_automaton()
            self._automaton = auto

    def __bool__(self) -> bool:
        return self.count > 0

    def lookup(self, name: str) -> tuple[int, PatternRule] | None:
        best: tuple[int, PatternRule] | None = None
        if self._automaton is not None:
            for _end, entries in self._automaton.iter(name):
                for position, rule in entries:
                    if (best is None or position < best[0]) and not _under(name, rule):
                        best = (position, rule)
        for position, rule, rx in self._regexes:
            if (best is None or position < best[0]) and rx.search(name) and \
                    not _under(name, rule):
                best = (position, rule)
        return best


def _under(name: str, rule: PatternRule) -> bool:
    return any(name == d or name.endswith("." + d) for d in rule.unless_under)


def _glob_regex(glob: str) -> re.Pattern[str]:
    """AdBlock/dnsmasq glob over a whole name or one of its parents (``ads*.example``)."""
    body = ".*".join(re.escape(part) for part in glob.lower().split("*"))
    return re.compile(rf"(?:^|\.){body}$")


# --- qtype/client-limited QNAME rules -------------------------------------------------


class ConditionalSet:
    def __init__(self) -> None:
        self._by_name: dict[str, list[tuple[int, ConditionalRule]]] = {}
        self.count = 0

    def add(self, position: int, rule: ConditionalRule) -> None:
        self._by_name.setdefault(rule.name, []).append((position, rule))
        self.count += 1

    def __bool__(self) -> bool:
        return self.count > 0

    @property
    def client_dependent(self) -> bool:
        return any(r.clients for rules in self._by_name.values() for _, r in rules)

    def lookup(self, name: str, qtype: int, client: str
               ) -> tuple[int, int, ConditionalRule] | None:
        """(position, depth, rule) of the best rule for this name, qtype and client."""
        best: tuple[int, int, ConditionalRule] | None = None
        suffix, depth = name, 0
        while True:
            for position, rule in self._by_name.get(suffix, ()):
                if not rule.scope & (1 if depth == 0 else 2):
                    continue
                if rule.qtypes and qtype not in rule.qtypes:
                    continue
                if rule.clients and not _client_in(client, rule.clients):
                    continue
                if best is None or position < best[0]:
                    best = (position, depth, rule)
            dot = suffix.find(".")
            if dot < 0:
                return best
            suffix, depth = suffix[dot + 1:], depth + 1


def _client_in(client: str, networks: tuple[str, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


# --- the snapshot -----------------------------------------------------------------


@dataclass(slots=True)
class PolicyParts:
    """Everything but the name index: small, picklable (sent from the build process)."""

    sources: tuple[SourceInfo, ...] = ()
    families: tuple[str, ...] = ("",)  # family number -> name; 0 = the source's family
    local_data: dict[tuple[int, int], tuple[LocalRecord, ...]] = field(default_factory=dict)
    ip_rules: list[tuple[int, IpRule]] = field(default_factory=list)
    patterns: list[tuple[int, PatternRule]] = field(default_factory=list)
    conditional: list[tuple[int, ConditionalRule]] = field(default_factory=list)
    #: sources with ``fail = "closed"`` that have never loaded (no copy at all)
    closed: tuple[str, ...] = ()


class Policy:
    """An immutable policy snapshot. Built by policy/build.py; swapped whole on reload."""

    def __init__(self, version: int, index: NameIndex, parts: PolicyParts) -> None:
        self.version = version
        self.index = index
        self.parts = parts
        self.sources = parts.sources
        self.families = parts.families
        self.local_data = parts.local_data
        self.client_ip = IpTable()
        self.response_ip = IpTable()
        for position, rule in parts.ip_rules:
            (self.client_ip if rule.trigger == Trigger.CLIENT_IP else self.response_ip).add(
                position, rule)
        self.patterns = PatternSet()
        for position, prule in parts.patterns:
            self.patterns.add(position, prule)
        self.patterns.finish()
        self.conditional = ConditionalSet()
        for position, crule in parts.conditional:
            self.conditional.add(position, crule)
        self.client_dependent = bool(self.client_ip) or self.conditional.client_dependent
        self.closed = parts.closed
        self._enforcing = tuple(not s.log_only for s in self.sources)
        #: A name rule of this source on the name itself wins over every other name rule
        #: (lowest enforcing position, lowest rank): a lookup that finds one stops there.
        self._final = self._enforcing.index(True) if True in self._enforcing else -1
        #: source position -> effective action by the rule's action number
        self._effective_actions = tuple(tuple(self._effective(src, a) for a in ACTIONS)
                                        for src in self.sources)
        self.index_file = ""  # the mapped file, when built by build_in_child
        self._names_only = not (self.client_ip or self.conditional or self.patterns)

    def __len__(self) -> int:
        return len(self.index) + self.client_ip.count + self.response_ip.count + \
            self.patterns.count + self.conditional.count

    # --- the two questions the resolver asks ---------------------------------------

    def check_query(self, qname: str, qtype: int, client: str) -> Verdict | None:
        if self._names_only:
            # The common policy (lists and RPZ zones without client-IP, patterns or
            # qtype/client-limited rules): name rules only, usually just one.
            hits = self.index.hits(qname, self._final)
            if hits is None:
                return None
            return self._names_only_verdict(qname, hits)
        candidates: list[tuple[int, int, Any]] = []  # (position, rank, thunk-args)
        if self.client_ip:
            hit = self.client_ip.lookup(client)
            if hit is not None:
                candidates.append((hit[0], 0, ("ip", hit[1], client)))
        hits = self.index.hits(qname)
        if hits is not None:
            for meta, depth, rule_name in hits:
                candidates.append((meta & 0xFF, 1 + depth, ("name", meta, depth, qname,
                                                           rule_name)))
        if self.conditional:
            chit = self.conditional.lookup(qname, qtype, client)
            if chit is not None:
                candidates.append((chit[0], 1 + chit[1], ("cond", chit[2], qname)))
        if self.patterns:
            phit = self.patterns.lookup(qname)
            if phit is not None:
                candidates.append((phit[0], 500, ("pattern", phit[1], qname)))
        if not candidates:
            return None
        return self._decide(candidates)

    def check_query_ref(self, qname: str, qtype: int, client: str) -> Verdict | int | None:
        """``check_query``, but the common verdict (one name rule covers the name) comes
        as a compact reference, an int that ``verdict_of`` expands. What the resolver's
        memo keeps per blocked name: ~36 bytes, no objects for the garbage collector,
        instead of ~450 bytes of Verdict, rule and name (51 MB for 100k names)."""
        if not self._names_only:
            return self.check_query(qname, qtype, client)
        hits = self.index.hits(qname, self._final)
        if hits is None:
            return None
        if len(hits) == 1 and hits[0][1] <= REF_MAX_DEPTH:
            meta, depth, _ = hits[0]
            return meta | depth << REF_DEPTH_SHIFT
        return self._names_only_verdict(qname, hits)

    def _names_only_verdict(self, qname: str, hits: list[tuple[int, int, str]]) -> Verdict | None:
        """The verdict of a names-only policy from the name rules covering ``qname``."""
        if len(hits) == 1:
            meta, depth, rule_name = hits[0]
            return self._name_verdict(meta & 0xFF, meta, depth, qname, rule_name)
        return self._decide([(m & 0xFF, 1 + d, ("name", m, d, qname, r)) for m, d, r in hits])

    def verdict_of(self, ref: int, qname: str) -> Verdict:
        """The Verdict a reference from ``check_query_ref`` stands for (``qname``: the
        name it was made for)."""
        depth = (ref >> REF_DEPTH_SHIFT) & REF_MAX_DEPTH
        rule_name = qname
        for _ in range(depth):
            rule_name = rule_name[rule_name.find(".") + 1:]
        return self._name_verdict(ref & 0xFF, ref & ~REF_DEPTH_MASK, depth, qname, rule_name)

    def check_answer(self, names: Sequence[str], addresses: Sequence[str], qtype: int,
                     client: str) -> Verdict | None:
        candidates: list[tuple[int, int, Any]] = []
        for name in names:
            hits = self.index.hits(name)
            if hits is not None:
                for meta, depth, rule_name in hits:
                    candidates.append((meta & 0xFF, 1 + depth,
                                       ("name", meta, depth, name, rule_name)))
            if self.patterns:
                phit = self.patterns.lookup(name)
                if phit is not None:
                    candidates.append((phit[0], 500, ("pattern", phit[1], name)))
        if self.response_ip:
            for address in addresses:
                hit = self.response_ip.lookup(address)
                if hit is not None:
                    candidates.append((hit[0], 1000, ("ip", hit[1], address)))
        if not candidates:
            return None
        return self._decide(candidates)

    # --- precedence ----------------------------------------------------------------

    def _decide(self, candidates: list[tuple[int, int, Any]]) -> Verdict | None:
        """Lowest source position wins, then lowest rank (client-IP 0, exact name 1,
        wildcards by distance, patterns, response-IP). Log-only sources are remembered
        and passed over."""
        candidates.sort(key=lambda c: (c[0], c[1]))
        shadow: Verdict | None = None
        for position, _rank, args in candidates:
            verdict = self._verdict(position, args)
            if not self._enforcing[position]:
                if shadow is None:
                    shadow = verdict
                continue
            return verdict
        return shadow

    def _verdict(self, position: int, args: tuple[Any, ...]) -> Verdict:
        kind = args[0]
        if kind == "name":
            _, meta, depth, matched, rule_name = args
            return self._name_verdict(position, meta, depth, matched, rule_name)
        src = self.sources[position]
        family = src.family
        local: tuple[LocalRecord, ...] = ()
        if kind == "ip":
            _, iprule, matched = args
            rule_action, line = iprule.action, iprule.line
            trigger = iprule.trigger
            family = iprule.family or family
            rule = RuleText(src, line, iprule.network)
            local = iprule.local_data
        elif kind == "cond":
            _, crule, matched = args
            rule_action, line, trigger = crule.action, crule.line, Trigger.QNAME
            rule = RuleText(src, line, crule.name)
            local = crule.local_data
        else:  # pattern
            _, prule, matched = args
            rule_action, line, trigger = prule.action, prule.line, Trigger.PATTERN
            family = prule.family or family
            rule = RuleText(src, line, f"{prule.kind} {prule.pattern}")
        action = self._effective(src, rule_action)
        return Verdict(action=action, trigger=trigger, category=src.category, family=family,
                       source=src.name, rule=rule, matched=matched,
                       policy_version=self.version, ttl=src.ttl, local_data=local,
                       sinkhole_v4=src.sinkhole_v4, sinkhole_v6=src.sinkhole_v6,
                       source_index=position)

    def _name_verdict(self, position: int, meta: int, depth: int, matched: str,
                      rule_name: str) -> Verdict:
        """A QNAME/wildcard rule's verdict. The common case of a blocked query that is
        not memoised yet (a list of a million names), so: no keyword arguments, no text
        formatted, the effective action looked up."""
        src = self.sources[position]
        rule_action = (meta >> ACTION_SHIFT) & 0xF
        fam = (meta >> FAMILY_SHIFT) & 0xFFF
        line = meta >> LINE_SHIFT
        return _new_verdict(Verdict, (
            self._effective_actions[position][rule_action],
            _QNAME if depth == 0 else _WILDCARD,
            src.category,
            self.families[fam] if fam else src.family,
            src.name,
            RuleText(src, line, (rule_name, (meta >> SCOPE_SHIFT) & 3)),
            matched,
            self.version,
            src.ttl,
            self.local_data.get((position, line), ()) if rule_action == _LOCAL_DATA else (),
            src.sinkhole_v4,
            src.sinkhole_v6,
            position))

    @staticmethod
    def _effective(src: SourceInfo, rule_action: Action) -> Action:
        if src.log_only:
            return _LOG_ONLY
        if rule_action is _PASSTHRU:
            return _PASSTHRU
        if src.override is not None:
            return src.override
        if rule_action is _DEFAULT:
            return src.default_action
        return rule_action
