"""Policy configuration: the ``[policy]`` section and its ``[[policy.source]]`` entries.

Frozen dataclasses with defaults; resolver/config.py reads TOML into them (and reports
unknown keys and bad values with their dotted path). Field metadata ``doc`` is the
one-line help; ``convert`` normalises a value at the edge.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from .rules import OVERRIDE_ACTIONS


def _addresses(version: int):
    def convert(value: object) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ValueError("expected an address or a list of addresses")
        out = []
        for item in items:
            ip = ipaddress.ip_address(str(item))
            if ip.version != version:
                raise ValueError(f"{item} is not an IPv{version} address")
            out.append(str(ip))
        return tuple(out)
    return convert


def _networks(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError("expected a network or a list of networks")
    return tuple(str(ipaddress.ip_network(str(v), strict=False)) for v in items)


def _action(value: object) -> str:
    word = str(value).strip().lower()
    if word not in OVERRIDE_ACTIONS:
        raise ValueError(f"unknown action {value!r} (one of: {', '.join(OVERRIDE_ACTIONS)})")
    return word


def _word(value: object) -> str:
    word = str(value).strip()
    if not word or any(c.isspace() for c in word) or len(word) > 64:
        raise ValueError(f"{value!r} is not a single word of at most 64 characters")
    return word


def _source_name(value: object) -> str:
    """Names become file names in the state directory: letters, digits, '.', '_', '-'."""
    word = _word(value)
    if word.startswith(".") or not all(c.isalnum() or c in "._-" for c in word):
        raise ValueError(f"{value!r}: use letters, digits, '.', '_' and '-' only")
    return word


@dataclass(frozen=True, slots=True)
class TsigKey:
    name: str
    secret: str  # base64
    algorithm: str = "hmac-sha256"


@dataclass(frozen=True, slots=True)
class SourceSettings:
    """One policy source: a file, a URL, or a zone pulled from a primary by AXFR/IXFR."""

    name: str = field(default="", metadata={"convert": _source_name, "required": True,
                                            "doc": "a short name, used in logs and metric labels"})
    category: str = field(default="malware", metadata={
        "convert": lambda v: _word(v).lower(),
        "doc": "threat category: malware, phishing, c2 or any other word"})
    family: str = field(default="", metadata={"doc": "malware family, e.g. QSnatch, Emotet"})
    path: str = field(default="", metadata={"doc": "a local file"})
    url: str = field(default="", metadata={"doc": "an http(s) URL fetched at start and on refresh"})
    zone: str = field(default="", metadata={
        "doc": "an RPZ zone name pulled from `primary` by AXFR/IXFR"})
    primary: str = field(default="", metadata={"doc": "HOST[:PORT] of the zone's primary server"})
    tsig: TsigKey | None = None
    notify_from: tuple[str, ...] = field(default=(), metadata={
        "convert": _networks,
        "doc": "networks NOTIFY may also come from (the primary's own address always may): "
               "for a primary behind NAT or a Kubernetes Service"})
    format: str = field(default="auto", metadata={
        "doc": "rpz, hosts, domains, wildcard-domains, adblock, dnsmasq, unbound, "
               "threatfox-csv, urls or auto"})
    action: str = field(default="given", metadata={
        "convert": _action,
        "doc": "given (the rule's own action; plain lists: [policy] default_action), "
               "sinkhole, nxdomain, nodata, drop, passthru, tcp-only or log-only"})
    sinkhole_ipv4: tuple[str, ...] = field(default=(), metadata={"convert": _addresses(4)})
    sinkhole_ipv6: tuple[str, ...] = field(default=(), metadata={"convert": _addresses(6)})
    ttl: int = field(default=0, metadata={"doc": "TTL of synthesised answers (0: [policy] ttl)"})
    refresh: float = field(default=3600.0, metadata={"duration": True,
                                                     "doc": "URL refresh interval"})
    timeout: float = field(default=30.0, metadata={"duration": True})
    max_bytes: int = 64 * 1024 * 1024
    fail: str = field(default="open", metadata={
        "convert": lambda v: {"open": "open", "closed": "closed"}[str(v)],
        "doc": "a source that has never loaded: open (resolve anyway) or closed (SERVFAIL)"})
    keywords: tuple[str, ...] = field(default=(), metadata={
        "doc": "substrings that match a name (pyahocorasick), e.g. a bank's brand"})
    keywords_unless_under: tuple[str, ...] = field(default=(), metadata={
        "doc": "the brand's real domains, never matched by `keywords`"})
    names: tuple[str, ...] = field(default=(), metadata={
        "doc": "names listed inline in the config (each blocks the name and its subdomains)"})

    @property
    def location(self) -> str:
        return self.path or self.url or (f"axfr://{self.primary}/{self.zone}" if self.zone
                                         else "config")


@dataclass(frozen=True, slots=True)
class CategorySettings:
    """Per-category sinkhole addresses (e.g. a block page per category)."""

    sinkhole_ipv4: tuple[str, ...] = field(default=(), metadata={"convert": _addresses(4)})
    sinkhole_ipv6: tuple[str, ...] = field(default=(), metadata={"convert": _addresses(6)})


@dataclass(frozen=True, slots=True)
class PolicySettings:
    sources: tuple[SourceSettings, ...] = field(default=(), metadata={"toml_key": "source"})
    categories: dict[str, CategorySettings] = field(default_factory=dict,
                                                    metadata={"toml_key": "category"})
    default_action: str = field(default="sinkhole", metadata={
        "convert": _action, "doc": "action for plain lists (hosts, domains, adblock, ...)"})
    ttl: int = 60
    sinkhole_ipv4: tuple[str, ...] = field(default=("0.0.0.0",),
                                           metadata={"convert": _addresses(4)})
    sinkhole_ipv6: tuple[str, ...] = field(default=("::",), metadata={"convert": _addresses(6)})
    selftest: bool = field(default=True, metadata={
        "doc": "answer malware.moat.test, phishing.moat.test, c2.moat.test as blocked"})
    reload_interval: float = field(default=0.0, metadata={
        "duration": True, "doc": "rebuild the policy on this timer (0: only on SIGHUP/changes)"})
    watch: float = field(default=0.0, metadata={
        "duration": True, "doc": "poll local files for changes this often (0: off)"})
