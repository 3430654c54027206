"""Per-client rate limiting with token buckets, RRL-style "slip" for UDP.

Clients are grouped by prefix (/24 for IPv4, /56 for IPv6 by default: one household or
one spoofed range is one bucket). Over the limit, one UDP answer in ``slip`` gets TC=1
(an empty truncated answer, so a real client retries over TCP, which cannot be spoofed)
and the others are dropped; TCP queries over the limit are refused. ``slip = 0`` drops all.

Default: 500 queries/s sustained with a burst of 2500, per prefix. Pi-hole's default
(1000 queries per 60 s, about 17/s) throttled real households: a browser page load asks
for 50-100 names at once, and a whole home network shares one /24. Loopback is exempt by
default (the host's own services and local tools).
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

ADMIT, SLIP, DROP = 0, 1, 2


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    enabled: bool = True
    rate: float = 500.0  # tokens per second per prefix
    burst: float = 2500.0
    ipv4_prefix: int = 24
    ipv6_prefix: int = 56
    slip: int = 2  # every Nth over-limit UDP answer is TC=1; 0 = drop all
    exempt: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    max_buckets: int = 100000


class RateLimiter:
    def __init__(self, settings: RateLimitSettings) -> None:
        self.s = settings
        self._exempt = tuple(ipaddress.ip_network(n, strict=False) for n in settings.exempt)
        self._prefix_of: dict[str, str | None] = {}  # client address -> bucket key (None: exempt)
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, last refill, over-count]

    def _key(self, host: str) -> str | None:
        key = self._prefix_of.get(host, "")
        if key != "":
            return key
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return None
        if any(ip in n for n in self._exempt if n.version == ip.version):
            k = None
        else:
            plen = self.s.ipv4_prefix if ip.version == 4 else self.s.ipv6_prefix
            k = str(ipaddress.ip_network(f"{ip}/{plen}", strict=False))
        if len(self._prefix_of) >= self.s.max_buckets:
            self._prefix_of.clear()
        self._prefix_of[host] = k
        return k

    def limits(self, host: str) -> bool:
        """Whether queries from ``host`` are counted at all (not exempt, limiter on)."""
        return self.s.enabled and self._key(host) is not None

    def check(self, host: str, now: float | None = None) -> int:
        """ADMIT, SLIP (answer TC=1) or DROP for one query from ``host``."""
        if not self.s.enabled:
            return ADMIT
        key = self._key(host)
        if key is None:
            return ADMIT
        if now is None:
            now = time.monotonic()
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self.s.max_buckets:
                self._evict(now)
            b = self._buckets[key] = [self.s.burst, now, 0.0]
        tokens = min(self.s.burst, b[0] + (now - b[1]) * self.s.rate)
        b[1] = now
        if tokens >= 1.0:
            b[0] = tokens - 1.0
            return ADMIT
        b[0] = tokens
        b[2] += 1
        if self.s.slip and int(b[2]) % self.s.slip == 0:
            return SLIP
        return DROP

    def _evict(self, now: float) -> None:
        """Forget buckets that have refilled completely (they behave like new ones)."""
        full = self.s.burst / self.s.rate if self.s.rate else 0.0
        for key in [k for k, b in self._buckets.items() if now - b[1] >= full]:
            del self._buckets[key]
        if len(self._buckets) >= self.s.max_buckets:
            self._buckets.clear()
