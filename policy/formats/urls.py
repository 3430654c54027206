"""URL feeds (OpenPhish, URLhaus text export): one URL per line, block its **exact host**.

The host is ``urlsplit(url).hostname`` (no userinfo, no port, lower case), normalised like
any name; the registrable domain is never widened to. A host that is an IP literal is not a
DNS rule (counted in ``unsupported["ip-host"]``); a host that is the apex of a big shared
service (``ipfs.io``, ``tinyurl.com``, ...) is never blocked as a whole
(``unsupported["shared-service"]``). Lines that are not ``scheme://host...`` are problems.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

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
from .names import FAST_NAME, check_name, ip_literal

#: Apexes of shared hosting / shortener / gateway services: a URL on them says nothing
#: about the whole domain. Full host names below them are still blocked.
SHARED_APEX = frozenset({
    "ipfs.io", "dweb.link", "cloudflare-ipfs.com", "tinyurl.com", "is.gd", "bit.ly", "t.co",
    "goo.gl", "ow.ly", "cutt.ly", "rebrand.ly", "github.io", "github.com",
    "raw.githubusercontent.com", "gitlab.io", "blogspot.com", "webflow.io", "workers.dev",
    "pages.dev", "r2.dev", "glitch.me", "weebly.com", "wixsite.com", "godaddysites.com",
    "firebaseapp.com", "web.app", "herokuapp.com", "netlify.app", "vercel.app",
    "000webhostapp.com", "sites.google.com", "docs.google.com", "drive.google.com",
    "storage.googleapis.com", "dropbox.com", "onedrive.live.com", "1drv.ms",
    "sharepoint.com", "forms.gle", "s3.amazonaws.com", "azurewebsites.net",
    "blob.core.windows.net", "translate.goog", "linktr.ee", "telegra.ph", "t.me",
    "discord.com", "cdn.discordapp.com", "mediafire.com", "google.com", "youtube.com",
})

_RX = re.compile(
    rf"https?://({FAST_NAME})(?::[0-9]{{1,5}}+)?+(?:[/?#][^\n]*+)?+\n|{CATCH_ALL}")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _line(ps: ParsedSource, rows: list[Row], lineno: int, text: str) -> None:
    s = text.strip()
    if not s or s[0] in "#!":
        if s:
            comment_header(ps, s)
        ps.ignored += 1
        return
    if not _SCHEME.match(s):
        ps.problem(lineno, "not a URL (expected scheme://host/...)")
        return
    try:
        host = urlsplit(s).hostname
    except ValueError as e:
        ps.problem(lineno, f"not a valid URL: {e}")
        return
    if not host:
        ps.problem(lineno, "URL without a host")
        return
    if ip_literal(host) is not None:
        ps.unsupported["ip-host"] += 1
        ps.skipped[lineno] = f"host {host} is an IP address: not a DNS rule"
        return
    name, why = check_name(host)
    if name is None:
        ps.problem(lineno, f"host {host!r} is not a valid name: {why}")
        return
    if name in SHARED_APEX:
        ps.unsupported["shared-service"] += 1
        ps.skipped[lineno] = f"{name} is a shared service: never blocked as a whole"
        return
    rows.append(Row(lineno, name, Scope.EXACT))


def parse(data: bytes, path: str = "", origin: str | None = None, *,
          fast: bool = True) -> ParsedSource:
    ps = ParsedSource(path=path, format="urls")
    text, bad = decode(data)
    with no_gc():
        sc = scan(text, _RX, 0, fast)
        names = sc.groups[0]
        drop = too_long(sc, 0)
        if not SHARED_APEX.isdisjoint(names):
            drop = sorted(set(drop) | {i for i, n in enumerate(names) if n in SHARED_APEX})
        sc = reroute(text, sc, drop)
        rows: list[Row] = []
        for lineno, line in sc.careful:
            if line == BAD_UTF8:
                ps.problem(lineno, bad[lineno])
            else:
                _line(ps, rows, lineno, line)
        names = sc.groups[0]
        n = len(names)
        assemble(ps, Fast(sc.fast_lines, names, bytes([Scope.EXACT]) * n, bytes(n)), rows)
    return ps
