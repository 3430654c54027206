"""Names and files for the benchmark, all generated at run time from fixed seeds.

* the blocklist: realistic malicious-looking names (DGA-like random labels,
  dictionary-like phishing names, deep names) under many TLDs; the lists for
  smaller sizes are prefixes of the largest one, so they nest;
* the list in three forms: an RPZ zone (``name CNAME .``, for moat and unbound)
  and a dnsmasq conf-file (``address=/name/``);
* the upstream zone ``bench.test.``: ``host{i}`` names plus a wildcard under
  ``fresh.bench.test.`` that answers any never-asked-before name (cache misses);
* the dnsperf input files of the three workloads.

Nothing here is committed: files go to a temporary directory.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

ZONE = "bench.test."
RPZ_ORIGIN = "rpz.bench."
#: The wildcard that answers cache misses: any ``<label>.fresh.bench.test``.
MISS_PARENT = "fresh.bench.test"
MISS_ADDRESS = "198.51.100.7"
#: The name every server must block, whatever the list size (the "empty" list has
#: only this one); it is also the start-up probe of the empty list.
PROBE_NAME = "start-probe.blocked-bench.example"

TLDS = (
    "com", "net", "org", "info", "biz", "xyz", "top", "online", "site", "club", "shop",
    "icu", "live", "buzz", "store", "tk", "ml", "ga", "cf", "gq", "ru", "su", "cn", "in",
    "br", "io", "co", "me", "cc", "pw", "ws", "tw", "de", "fr", "uk", "co.uk", "com.br",
    "com.cn", "ir", "kr", "vn", "pl", "ua", "app", "dev", "link", "click", "work", "rest",
    "fun", "space", "website", "tech", "host", "cloud", "life", "world", "today", "news",
    "support", "services", "digital", "email", "bid", "win", "loan", "date", "men", "party",
)
# Common TLDs weigh more, as in real feeds.
_TLD_WEIGHTS = tuple(8 if t in ("com", "net", "org", "xyz", "top", "ru", "info") else 1
                     for t in TLDS)

WORDS = (
    "secure", "login", "account", "verify", "update", "bank", "pay", "paypal", "apple",
    "microsoft", "office", "outlook", "support", "service", "online", "web", "mail",
    "cloud", "drive", "docs", "share", "file", "invoice", "billing", "wallet", "crypto",
    "coin", "bonus", "free", "gift", "prize", "win", "promo", "deal", "shop", "store",
    "market", "cheap", "best", "top", "global", "net", "host", "cdn", "static", "api",
    "app", "mobile", "auth", "sso", "id", "signin", "portal", "client", "customer", "help",
    "desk", "center", "alert", "notice", "security", "safe", "protect", "check", "track",
    "delivery", "parcel", "post", "express", "ship", "order", "confirm", "review", "case",
    "recovery", "reset", "password", "unlock", "access", "team", "admin", "panel", "data",
    "stats", "metric", "analytics", "ads", "click", "media", "video", "stream", "music",
    "game", "play", "bet", "casino", "lucky", "star", "sun", "moon", "blue", "red",
    "green", "black", "gold", "silver", "tech", "soft", "sys", "info", "news", "daily",
    "world", "city", "home", "life", "health", "care", "pharma", "med", "loan", "credit",
    "finance", "trade", "invest", "fx", "bit", "block", "chain", "link", "node", "sync",
    "update", "download", "install", "setup", "driver", "flash", "player", "codec",
)

_ALNUM = string.ascii_lowercase + string.digits
_LOWER = string.ascii_lowercase


class _Maker:
    """Draws names; the random choices are batched (1M names in a few seconds)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        acc, self.tld_cum = 0, []
        for w in _TLD_WEIGHTS:
            acc += w
            self.tld_cum.append(acc)
        # Random labels are slices of two long random strings, at random offsets.
        self.alnum = "".join(self.rng.choices(_ALNUM, k=1 << 20))
        self.lower = "".join(self.rng.choices(_LOWER, k=1 << 20))

    def dga(self, lo: int = 8, hi: int = 18) -> str:
        rng = self.rng
        pool = self.alnum if rng.random() < 0.6 else self.lower
        start = rng.randrange(len(pool) - hi)
        return pool[start:start + rng.randint(lo, hi)]

    def dictionary(self) -> str:
        rng = self.rng
        words = rng.choices(WORDS, k=rng.choice((1, 2, 2, 2, 3, 3)))
        label = rng.choice(("-", "", "-", "")).join(words)
        if rng.random() < 0.3:
            label += str(rng.randint(1, 999))
        return label[:63]

    def batch(self, n: int) -> list[str]:
        rng = self.rng
        tlds = rng.choices(TLDS, cum_weights=self.tld_cum, k=n)
        kinds = [rng.random() for _ in range(n)]
        out = []
        for tld, r in zip(tlds, kinds, strict=True):
            if r < 0.30:  # kq3x9v2m.xyz
                out.append(f"{self.dga()}.{tld}")
            elif r < 0.55:  # secure-login-verify.com
                out.append(f"{self.dictionary()}.{tld}")
            elif r < 0.80:  # kq3x9v2m.example-shop.xyz
                out.append(f"{self.dga(6, 14)}.{self.dictionary()}.{tld}")
            elif r < 0.93:  # login.paypal-account-review.net
                out.append(f"{rng.choice(WORDS)}.{self.dictionary()}.{tld}")
            else:  # deep: a1b2.c3.cdn.static-files.top
                labels = [self.dga(2, 10) if rng.random() < 0.5 else rng.choice(WORDS)
                          for _ in range(rng.randint(2, 5))]
                out.append(".".join([*labels, self.dictionary(), tld]))
        return out


def blocklist(n: int, seed: int = 20240601) -> list[str]:
    """``n`` distinct names; ``blocklist(k)`` is a prefix of ``blocklist(n)`` for k < n."""
    maker = _Maker(seed)
    seen: set[str] = {PROBE_NAME}
    out: list[str] = []
    for _ in range(n // 9_000 + 10):  # bounded; duplicates are rare
        if len(out) >= n:
            break
        for name in maker.batch(10_000):
            if name not in seen and len(name) <= 250:
                seen.add(name)
                out.append(name)
    if len(out) < n:
        raise RuntimeError(f"could only make {len(out)} distinct names of {n}")
    return out[:n]


def list_for_size(all_names: Sequence[str], size: int) -> list[str]:
    """The list for one size: the probe name plus ``size`` names (size 0: the probe only)."""
    return [PROBE_NAME, *all_names[:size]]


# --- list files ---------------------------------------------------------------------


def write_rpz(path: Path, names: Iterable[str]) -> None:
    """An RPZ zone: ``name CNAME .`` (NXDOMAIN) for each name, with SOA and NS."""
    head = (f"$ORIGIN {RPZ_ORIGIN}\n$TTL 300\n"
            f"@ 300 IN SOA localhost. hostmaster.localhost. 1 3600 600 86400 60\n"
            f"@ 300 IN NS localhost.\n")
    with open(path, "w") as fh:
        fh.write(head)
        fh.write("".join(f"{n} CNAME .\n" for n in names))


def write_dnsmasq(path: Path, names: Iterable[str]) -> None:
    """A dnsmasq conf-file: ``address=/name/`` answers NXDOMAIN for name and subdomains."""
    with open(path, "w") as fh:
        fh.write("".join(f"address=/{n}/\n" for n in names))


# --- the upstream zone ----------------------------------------------------------------


def hit_names(count: int) -> list[str]:
    return [f"host{i}.{ZONE}".rstrip(".") for i in range(count)]


def upstream_zone_text(n_hosts: int) -> str:
    """``host0`` .. ``host{n-1}`` A records, plus ``*.fresh`` for cache misses."""
    import sys

    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from harness.servers import make_zone

    return make_zone(ZONE, (f"host{i}" for i in range(n_hosts)),
                     extra=f"*.fresh 300 IN A {MISS_ADDRESS}\n")


# --- workload files ---------------------------------------------------------------------


def write_queries(path: Path, names: Iterable[str]) -> int:
    """A dnsperf input file (``name A`` per line); returns the line count."""
    lines = [f"{n} A\n" for n in names]
    with open(path, "w") as fh:
        fh.write("".join(lines))
    return len(lines)


def blocked_sample(names: Sequence[str], limit: int, seed: int = 7) -> list[str]:
    """Up to ``limit`` distinct names of the list, shuffled."""
    rng = random.Random(seed)
    pool = list(names)
    if len(pool) > limit:
        pool = rng.sample(pool, limit)
    else:
        rng.shuffle(pool)
    return pool


def write_mix(path: Path, lines: int, hits: Sequence[str], blocked: Sequence[str], tag: str,
              *, hit_share: float = 0.8, blocked_share: float = 0.1, seed: int = 11) -> int:
    """The realistic mix: ``hit_share`` cached names, ``blocked_share`` listed names,
    the rest cache misses: names under the upstream's wildcard, each used once,
    ``{tag}{i}.fresh.bench.test`` (a different tag per file: never asked before).
    Run it with ``dnsperf -n 1`` so that it never wraps (and misses stay misses)."""
    rng = random.Random(seed)
    rand = rng.random
    out: list[str] = []
    miss = 0
    nh, nb = len(hits), len(blocked)
    hb = hit_share + blocked_share
    for _ in range(lines):
        r = rand()
        if r < hit_share:
            out.append(f"{hits[int(rand() * nh)]} A\n")
        elif r < hb and nb:
            out.append(f"{blocked[int(rand() * nb)]} A\n")
        else:
            out.append(f"{tag}{miss}.{MISS_PARENT} A\n")
            miss += 1
    with open(path, "w") as fh:
        fh.write("".join(out))
    return miss
