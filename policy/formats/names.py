"""Name normalisation shared by every feed parser.

A rule name is stored as moat compares it: lower case, A-labels (IDNA UTS#46, non
transitional), no trailing dot. ``_`` is kept (legal in DNS, only illegal in host names).
Rejected: empty labels, labels over 63 or names over 253 octets, labels starting or
ending with ``-``, IP literals (a name whose last label is all digits), ``*`` and any
other character outside ``[a-z0-9_-]``, and single-label names unless the caller says the
format makes a TLD rule legal (AdBlock ``||zip^``, RPZ ``*.tk``).

Also here: the fast-path regular expression every bulk parser builds on (:data:`FAST_NAME`),
header parsing (``Number of entries: N``) and family tags found in comments.
"""

from __future__ import annotations

import ipaddress
import re

import idna

__all__ = [
    "FAST_NAME",
    "FAST_NAME_LOWER",
    "SPECIAL_HOSTS",
    "check_name",
    "declared_count",
    "family_from_comment",
    "ip_literal",
    "normalise_name",
]

#: Names the hosts-file preamble maps and that must never become rules.
SPECIAL_HOSTS = frozenset({
    "localhost", "localhost.localdomain", "local", "broadcasthost", "localhost4",
    "localhost6", "localhost4.localdomain4", "localhost6.localdomain6", "ip6-localhost",
    "ip6-loopback", "ip6-localnet", "ip6-mcastprefix", "ip6-allnodes", "ip6-allrouters",
    "ip6-allhosts", "0.0.0.0",
})

#: The name part of every fast-path regex: ASCII labels of 1 to 63 characters separated by
#: single dots, no label starting or ending with ``-``, at least two labels, the last one
#: ending in a letter or ``_`` (so never an IP literal). Possessive quantifiers: one pass,
#: no backtracking. Upper case is accepted (``scan`` lowers the names of a chunk that has
#: any). It does not check the 253-character limit: callers send longer names to the
#: careful path (``_common.too_long``). Whatever it accepts, :func:`check_name` accepts
#: unchanged but for case; the rest goes to the careful path.
FAST_NAME = (r"(?!-)(?:[a-zA-Z0-9_-]{1,63}+(?<!-)\.(?=[a-zA-Z0-9_]))++"
             r"[a-zA-Z0-9_-]{1,63}+(?<=[a-zA-Z_])")
#: :data:`FAST_NAME` in lower case only: what a bulk path that does not lower names takes.
FAST_NAME_LOWER = FAST_NAME.replace("a-zA-Z", "a-z")

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")
_ASCII_OK = re.compile(r"[a-z0-9_.-]*")
#: a whole valid name at once (lengths aside); the label-by-label checks only run to
#: explain a failure
_NAME_OK = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
                      r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_MAYBE_IP = re.compile(r"\[?[0-9.]+\]?|.*:.*")


def ip_literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address if ``text`` is an IPv4/IPv6 literal (brackets, zone id allowed), else None."""
    t = text.strip()
    if not _MAYBE_IP.fullmatch(t):
        return None
    if t.startswith("[") and t.endswith("]"):
        t = t[1:-1]
    try:
        return ipaddress.ip_address(t)
    except ValueError:
        return None


def _to_ascii(text: str) -> str:
    """UTS#46 mapping (non-transitional, STD3 off so ``_`` survives), then A-labels."""
    mapped = idna.uts46_remap(text, std3_rules=False, transitional=False)
    labels = mapped.split(".")
    out = []
    for label in labels:
        if label.isascii():
            out.append(label)
        else:
            out.append(idna.alabel(label).decode("ascii"))
    return ".".join(out)


def check_name(text: str, allow_single_label: bool = False) -> tuple[str | None, str]:
    """Normalise ``text``; return ``(name, "")`` or ``(None, reason)``."""
    s = text
    if s.endswith("."):
        s = s[:-1]
    if not s:
        return None, "empty name" if not text else "the root name"
    if not s.isascii():
        try:
            s = _to_ascii(s)
        except (idna.IDNAError, UnicodeError, ValueError) as e:
            return None, f"not a valid internationalised name ({e})"
    s = s.lower()
    if len(s) <= 253 and _NAME_OK.fullmatch(s):
        last = s.rfind(".")
        if last >= 0:
            if not s[last + 1:].isdigit():
                return s, ""
        elif allow_single_label and not s.isdigit():
            return s, ""
    if not _ASCII_OK.fullmatch(s):
        if ip_literal(s) is not None:
            return None, "an IP address, not a name"
        if "*" in s:
            return None, "wildcard '*' not allowed here"
        bad = next(c for c in s if not (c.isalnum() and c.isascii()) and c not in "_.-")
        return None, f"invalid character {bad!r}"
    if len(s) > 253:
        return None, "name longer than 253 characters"
    labels = s.split(".")
    for label in labels:
        if not label:
            return None, "empty label"
        if len(label) > 63:
            return None, "label longer than 63 characters"
        if not _LABEL.fullmatch(label):
            return None, "label starts or ends with '-'"
    if labels[-1].isdigit():
        return None, "an IP address, not a name" if ip_literal(s) else "all-numeric top label"
    if len(labels) == 1 and not allow_single_label:
        return None, "single-label name"
    return s, ""


def normalise_name(text: str, allow_single_label: bool = False) -> str | None:
    """The rule form of ``text`` (lower case A-labels, no trailing dot), or None if invalid."""
    return check_name(text, allow_single_label)[0]


_DECLARED = re.compile(
    r"[#!;]+\s*(?:number of (?:entries|unique domains|domains|rules|hosts)|entries"
    r"|total (?:number of )?(?:entries|domains|rules|hosts)|domain count|rule count)"
    r"\s*[:=]\s*([0-9][0-9,. _']*)\s*",
    re.IGNORECASE,
)


def declared_count(comment_line: str) -> int | None:
    """N from a header comment like ``# Number of entries: 143,721``, else None."""
    m = _DECLARED.fullmatch(comment_line.strip())
    if not m:
        return None
    digits = re.sub(r"[^0-9]", "", m.group(1))
    return int(digits) if digits else None


_FAMILY_KEY = re.compile(r"(?:^|[\s;,])family=(\"[^\"]*\"|[^\s;,]+)")
_CATEGORY_KEY = re.compile(r"(?:^|[\s;,])category=(\"[^\"]*\"|[^\s;,]+)")
_THREATFOX = re.compile(r"\s*([^;()]+?)\s+\(confidence level:")


def family_from_comment(comment: str) -> str | None:
    """A family tag carried by a comment (text after ``;``/``#``), or None.

    ``family=X`` anywhere; else the abuse.ch ThreatFox form ``X (confidence level: N%)``;
    else ``category=X``.
    """
    if not comment:
        return None
    if "=" in comment:
        m = _FAMILY_KEY.search(comment) or _CATEGORY_KEY.search(comment)
        if m:
            return m.group(1).strip('"') or None
    if "(confidence level:" in comment:
        m = _THREATFOX.match(comment)
        if m:
            return m.group(1)
    return None
