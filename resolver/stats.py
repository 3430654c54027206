"""Counters the request path bumps: plain ints in dicts, nothing else.

Why not prometheus-client objects directly: each ``Counter.inc()`` takes a lock and costs
about as much as answering a cached query. The hot path increments dict entries here;
resolver/metrics.py turns them into Prometheus metrics when somebody scrapes.
Labels are bounded by construction: qtypes fold into a fixed set plus "other".
"""

from __future__ import annotations

import bisect
from collections import Counter

from . import wire

#: qtypes that get their own label; everything else is "other".
QTYPE_LABELS: dict[int, str] = {t: wire.TYPE_NAMES[t] for t in (
    wire.TYPE_A, wire.TYPE_AAAA, wire.TYPE_CNAME, wire.TYPE_MX, wire.TYPE_TXT, wire.TYPE_NS,
    wire.TYPE_SOA, wire.TYPE_PTR, wire.TYPE_SRV, wire.TYPE_HTTPS, wire.TYPE_SVCB,
    wire.TYPE_DS, wire.TYPE_DNSKEY, wire.TYPE_ANY)}

#: Request duration histogram buckets, in seconds.
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0)


#: Label values exported from the start (at 0), so the first event shows in rate().
MALFORMED_KINDS = ("short", "response", "opcode", "qdcount", "name", "truncated", "opt",
                   "badvers")
SHED_REASONS = ("acl", "ratelimit-slip", "ratelimit-drop", "ratelimit-refused", "in-flight")


def qtype_label(qtype: int) -> str:
    return QTYPE_LABELS.get(qtype, "other")


class Stats:
    """One per process; owned by the server, read by the metrics collector."""

    def __init__(self) -> None:
        self.queries: Counter[tuple[str, int]] = Counter()  # (transport, qtype)
        self.responses: Counter[tuple[int, str]] = Counter()  # (rcode, source)
        self.malformed: Counter[str] = Counter()  # kind
        self.policy_hits: Counter[tuple[str, str, str, str]] = Counter()  # cat, fam, action, src
        self.shed: Counter[str] = Counter()  # reason: acl, ratelimit-drop, ratelimit-slip, ...
        self.errors: Counter[str] = Counter()  # internal errors by exception type
        self.duration_buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.duration_count = 0
        self.dropped_log_lines = 0

    def observe_duration(self, seconds: float) -> None:
        self.duration_buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds
        self.duration_count += 1
