"""The vocabulary of policy rules, shared by the feed parsers and the engine.

Words follow the RPZ drafts (draft-vixie-dnsop-dns-rpz-00): a *trigger* says when a
rule applies (QNAME, client IP, response IP, ...), an *action* says what moat answers
(NXDOMAIN, NODATA, PASSTHRU, DROP, TCP-ONLY, Local-Data) and moat adds SINKHOLE (answer
A/AAAA with configured addresses, NODATA for other types) and LOG_ONLY (record the
verdict, answer normally).

A parser turns one source (a file's text) into a :class:`ParsedSource`: the QNAME rules
in parallel columns (a million names must not cost a million objects), the rare rich
rules (IP triggers, local data, patterns, rules limited to a qtype or client) as small
objects, and every line it could not use as a :class:`Problem` with its line number.
"""

from __future__ import annotations

import array
import enum
from collections import Counter
from dataclasses import dataclass, field


class Action(enum.IntEnum):
    """What moat answers when a rule matches. 0 means "the source's default"."""

    DEFAULT = 0
    NXDOMAIN = 1  # CNAME .
    NODATA = 2  # CNAME *.
    PASSTHRU = 3  # CNAME rpz-passthru.  (an allow-list hole: stops further policy)
    DROP = 4  # CNAME rpz-drop.      (no answer at all)
    TCP_ONLY = 5  # CNAME rpz-tcp-only.  (TC=1 over UDP, normal answer over TCP)
    LOCAL_DATA = 6  # any other RRs at the owner (A, AAAA, TXT, CNAME garden.example., ...)
    SINKHOLE = 7  # moat: A/AAAA -> configured sinkhole addresses, other qtypes NODATA
    LOG_ONLY = 8  # moat: shadow mode, the verdict is logged and the answer is normal

    @property
    def label(self) -> str:
        """The word used in logs, metrics and config (``tcp-only``, ``local-data``...)."""
        return _ACTION_LABELS[self]

    @classmethod
    def from_label(cls, word: str) -> Action:
        return cls[word.strip().upper().replace("-", "_")]


_ACTION_LABELS = {a: a.name.lower().replace("_", "-") for a in Action}
#: Action by number, without the cost of calling the enum (the index stores numbers).
ACTIONS = tuple(Action(i) for i in range(len(Action)))

#: Actions an operator may set as a source's override (``action = "..."`` in config).
OVERRIDE_ACTIONS = ("given", "sinkhole", "nxdomain", "nodata", "drop", "passthru",
                    "tcp-only", "log-only")


class Scope(enum.IntFlag):
    """Which names a QNAME rule covers, relative to the name written in the rule."""

    EXACT = 1  # the name itself
    BELOW = 2  # strict subdomains ("*.name" in RPZ, "*.name" in dnsmasq)
    SUBTREE = 3  # the name and everything below it (AdBlock "||name^", dnsmasq "/name/")


class Trigger(enum.Enum):
    QNAME = "qname"
    WILDCARD = "wildcard"  # a QNAME rule that matched through its BELOW scope
    CLIENT_IP = "client-ip"
    RESPONSE_IP = "response-ip"
    PATTERN = "pattern"  # keyword / glob / regex over the name
    NSDNAME = "nsdname"  # cannot be evaluated by a forwarder: loaded as unsupported
    NSIP = "nsip"  # ditto
    REBINDING = "rebinding"  # resolver-level check of answers with private addresses
    SELFTEST = "selftest"


@dataclass(frozen=True, slots=True)
class LocalRecord:
    """One RR of RPZ Local-Data. ``rdata`` is the uncompressed wire form.

    A CNAME whose target starts with ``*.`` (``CNAME *.garden.example.``) is kept with
    ``wildcard_target`` set: the query name is substituted for the ``*`` at answer time.
    """

    rtype: int
    rdata: bytes
    ttl: int | None = None
    text: str = ""  # presentation form, for logs and `moat check`
    wildcard_target: str | None = None


@dataclass(frozen=True, slots=True)
class Problem:
    """A line that was skipped, with the reason. Reported as ``path:line: message``."""

    line: int
    message: str
    path: str = ""

    def __str__(self) -> str:
        return f"{self.path or '<text>'}:{self.line}: {self.message}"


@dataclass(frozen=True, slots=True)
class IpRule:
    """A client-IP or response-IP trigger; ``network`` like ``192.0.2.0/24``, ``2001:db8::/32``."""

    trigger: Trigger  # CLIENT_IP or RESPONSE_IP
    network: str
    action: Action
    line: int
    local_data: tuple[LocalRecord, ...] = ()
    family: str | None = None


@dataclass(frozen=True, slots=True)
class PatternRule:
    """A rule over the text of a name rather than a fixed name.

    kind: ``keyword`` (substring, matched with pyahocorasick), ``glob`` (``*`` inside a
    label, AdBlock/dnsmasq style) or ``regex`` (AdBlock ``/.../``).
    ``unless_under``: names under these domains never match (a brand's real domains).
    """

    kind: str
    pattern: str
    action: Action
    line: int
    unless_under: tuple[str, ...] = ()
    family: str | None = None


@dataclass(frozen=True, slots=True)
class ConditionalRule:
    """A QNAME rule limited to some qtypes or clients (AdGuard ``$dnstype``/``$client``)."""

    name: str
    scope: Scope
    action: Action
    line: int
    qtypes: frozenset[int] = frozenset()  # empty: every qtype
    clients: tuple[str, ...] = ()  # networks; empty: every client
    local_data: tuple[LocalRecord, ...] = ()


@dataclass(slots=True)
class ParsedSource:
    """What a parser made of one source.

    QNAME rules are columns of equal length: ``names[i]`` (normalised A-label, lower case,
    no trailing dot) covers ``scopes[i]`` with ``actions[i]`` (0: the source's default)
    and was written on line ``lines[i]``. Entries may repeat; the index builder keeps one.
    ``local_data[i]`` and ``families[i]`` exist only for the entries that have them.
    """

    path: str = ""
    format: str = ""
    names: list[str] = field(default_factory=list)
    scopes: bytearray = field(default_factory=bytearray)
    actions: bytearray = field(default_factory=bytearray)
    lines: array.array = field(default_factory=lambda: array.array("I"))
    families: dict[int, str] = field(default_factory=dict)
    local_data: dict[int, tuple[LocalRecord, ...]] = field(default_factory=dict)
    ip_rules: list[IpRule] = field(default_factory=list)
    patterns: list[PatternRule] = field(default_factory=list)
    conditional: list[ConditionalRule] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    ignored: int = 0  # comments, blank lines, headers
    #: kind -> count of rules not turned into rules (NSDNAME, cosmetic, ...)
    unsupported: Counter[str] = field(default_factory=Counter)
    #: Declared size from a header ("Number of entries: N"), to detect truncated downloads.
    declared_entries: int | None = None
    #: Zone name of an RPZ source (its $ORIGIN or SOA owner), for relative owners.
    origin: str | None = None
    #: Well-formed lines that made no rule of their own, line -> why (unsupported kind,
    #: AdBlock rule overridden or $badfilter-ed, RR merged into the rule on line N...),
    #: so `moat check` can explain every line. Broken lines are in ``problems`` instead.
    skipped: dict[int, str] = field(default_factory=dict)

    def add(self, name: str, scope: Scope, line: int, action: Action = Action.DEFAULT,
            family: str | None = None, local_data: tuple[LocalRecord, ...] = ()) -> None:
        i = len(self.names)
        self.names.append(name)
        self.scopes.append(int(scope))
        self.actions.append(int(action))
        self.lines.append(line)
        if family:
            self.families[i] = family
        if local_data:
            self.local_data[i] = local_data

    def problem(self, line: int, message: str) -> None:
        self.problems.append(Problem(line, message, self.path))

    def __len__(self) -> int:
        return len(self.names)
