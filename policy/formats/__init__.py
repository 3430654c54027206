"""Feed parsers: bytes of a blocklist -> :class:`policy.rules.ParsedSource`.

Pure functions (no I/O, no logging on the per-line path). One module per format; the
common line forms go through a bulk regex path and everything else through a careful
per-line parser (see ``_common``). Line numbers are exact 1-based physical line numbers
(lines end at ``\\n``; a trailing ``\\r`` and a UTF-8 BOM are dropped; a line that is not
UTF-8 is a problem).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable

from policy.rules import ParsedSource

from .names import normalise_name

__all__ = ["FORMATS", "detect_format", "import_parsers", "normalise_name", "parse", "parser"]

FORMATS: tuple[str, ...] = ("rpz", "hosts", "domains", "wildcard-domains", "adblock",
                            "dnsmasq", "unbound", "threatfox-csv", "urls")

#: format -> (module, function). A parser module is imported when a source of its format
#: is first parsed: the server forks its first policy build right after importing this
#: package, and the child imports only the parsers it needs (their regexes and
#: dnspython cost ~0.1 s that would otherwise delay the fork).
_PARSERS: dict[str, tuple[str, str]] = {
    "rpz": ("rpz", "parse"),
    "hosts": ("hosts", "parse"),
    "domains": ("domains", "parse"),
    "wildcard-domains": ("domains", "parse_wildcard"),
    "adblock": ("adblock", "parse"),
    "dnsmasq": ("dnsmasq", "parse"),
    "unbound": ("unbound", "parse"),
    "threatfox-csv": ("threatfox_csv", "parse"),
    "urls": ("urls", "parse"),
}


def import_parsers() -> None:
    """Import every parser now. The server does it once its first build has forked (the
    two overlap), so the children of later builds start with them."""
    for module, _ in _PARSERS.values():
        importlib.import_module(f"{__name__}.{module}")


def parser(fmt: str) -> Callable[..., ParsedSource]:
    """The parse function of a format (one of :data:`FORMATS`)."""
    try:
        module, function = _PARSERS[fmt]
    except KeyError:
        raise ValueError(f"unknown feed format {fmt!r} (known: {', '.join(FORMATS)})") from None
    parse_fn: Callable[..., ParsedSource] = getattr(
        importlib.import_module(f"{__name__}.{module}"), function)
    return parse_fn


def parse(data: bytes, fmt: str, path: str = "", origin: str | None = None) -> ParsedSource:
    """Parse one source. ``fmt`` is one of :data:`FORMATS` or ``"auto"``.

    ``origin`` is the RPZ zone name (owners are relative to it); other formats ignore it.
    """
    if fmt == "auto":
        fmt = detect_format(path, data[:65536])
    return parser(fmt)(data, path, origin)


_RPZ_LINE = re.compile(r"\S+\s+(?:\d+\s+)?(?:IN\s+)?(?:CNAME|SOA|NS|A|AAAA|TXT)\s+\S",
                       re.IGNORECASE)
_HOSTS_LINE = re.compile(r"(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9a-f:]*:[0-9a-f:.%a-z]*)\s+\S",
                         re.IGNORECASE)
_ADBLOCK_LINE = re.compile(r"(?:@@|\|\|?)\S+|\S+\^(?:\$\S*)?|/.+/(?:\$\S*)?")
_URL_LINE = re.compile(r"[a-z][a-z0-9+.-]*://\S", re.IGNORECASE)
_DNSMASQ_LINE = re.compile(r"(?:address|server|local)=/")
_UNBOUND_LINE = re.compile(r"(?:local-zone|local-data|server)\s*:")


def detect_format(path: str, head: bytes) -> str:
    """Best guess of the format of a source from its name and first bytes."""
    name = os.path.basename(path).lower()
    text = head.decode("utf-8", "replace").lstrip("\ufeff")
    lines = [ln.strip() for ln in text.split("\n")[:400]]
    if text.lstrip().startswith(("[Adblock", "[AdGuard", "[uBlock")):
        return "adblock"
    if any(ln.startswith(("$TTL", "$ORIGIN")) for ln in lines):
        return "rpz"
    if '"ioc_value"' in text:
        return "threatfox-csv"
    data = [ln for ln in lines if ln and ln[0] not in "#!;"][:100]
    votes = {"rpz": 0, "unbound": 0, "dnsmasq": 0, "adblock": 0, "hosts": 0, "urls": 0,
             "wildcard-domains": 0, "domains": 0}
    for ln in data:
        if _UNBOUND_LINE.match(ln):
            votes["unbound"] += 1
        elif _DNSMASQ_LINE.match(ln):
            votes["dnsmasq"] += 1
        elif _URL_LINE.match(ln):
            votes["urls"] += 1
        elif _ADBLOCK_LINE.fullmatch(ln):
            votes["adblock"] += 1
        elif _HOSTS_LINE.match(ln):
            votes["hosts"] += 1
        elif _RPZ_LINE.match(ln):
            votes["rpz"] += 1
        elif ln.startswith("*."):
            votes["wildcard-domains"] += 1
        elif " " not in ln and "\t" not in ln:
            votes["domains"] += 1
    best = max(votes, key=lambda k: votes[k])  # ties: the order of `votes`
    if votes[best] == 0:
        for hint, fmt in (("rpz", "rpz"), (".csv", "threatfox-csv"), ("dnsmasq", "dnsmasq"),
                          ("unbound", "unbound"), ("hosts", "hosts"), ("wild", "wildcard-domains"),
                          ("adblock", "adblock"), ("abp", "adblock"), ("url", "urls")):
            if hint in name:
                return fmt
        return "domains"
    if best == "domains" and "wild" in name:
        return "wildcard-domains"
    if best in ("domains", "wildcard-domains") and votes["wildcard-domains"] and \
            votes["domains"] and "wild" in name:
        return "wildcard-domains"
    return best
