"""The answer cache: upstream answers kept as wire bytes, aged by patching TTLs in place.

Invariants
* An entry holds the answer *after* the question section, without the upstream's OPT
  record, plus the offsets of every TTL field in it. A hit never re-parses the message: it
  copies the client's ID and question, patches TTLs (at most once per second per entry,
  memoised) and appends moat's own OPT record.
* The key is the lower-cased question (name, type, class) plus the DO and CD bits.
* Served TTLs are the clamped TTLs minus the age rounded *up*, so a client is never told a
  TTL larger than what remains.
* Positive answers live for their smallest clamped TTL; NXDOMAIN and NODATA for the
  negative TTL of RFC 2308 (min of the SOA's TTL and its MINIMUM field, clamped); negative
  answers without an SOA, SERVFAIL, REFUSED and truncated answers are not cached.
* After expiry an entry is kept for ``stale_window`` seconds so it can be served stale
  (RFC 8767) when every upstream fails, with a TTL of ``stale_ttl``.
* Each entry memoises the policy verdict for the policy version that checked it, so a hit
  re-checks policy only after a reload (the policy itself is never cached across versions).

Only the event-loop thread touches the cache.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from . import wire

_TTL = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    size: int = 20000
    min_ttl: int = 0
    max_ttl: int = 86400
    max_negative_ttl: int = 3600
    stale_window: float = 86400.0  # RFC 8767 suggests 1 to 3 days
    stale_ttl: int = 30  # RFC 8767's recommended TTL for stale answers


class CacheEntry:
    __slots__ = ("flags", "an", "ns", "ar", "body", "ttl_offsets", "ttls", "stored",
                 "expires", "dead_after", "rcode", "names", "addresses", "_age", "_patched",
                 "valid_until", "policy_version", "verdict", "count_key", "fast")

    flags: int
    an: int
    ns: int
    ar: int
    body: bytes
    ttl_offsets: tuple[int, ...]
    ttls: tuple[int, ...]
    stored: float
    expires: float
    dead_after: float
    rcode: int
    names: tuple[str, ...]  # owner names and CNAME targets in the answer (policy checks)
    addresses: tuple[str, ...]  # A/AAAA addresses in the answer (response-IP checks)
    _age: int
    _patched: bytes
    valid_until: float  # _patched has the right TTLs until this moment
    policy_version: int
    verdict: Any
    count_key: int  # qtype * 16 + rcode (resolver/fastpath.py counts by it)
    fast: Any  # resolver/fastpath.py's memo of the last answer it built from this entry

    def body_at(self, now: float) -> bytes:
        """The body with TTLs aged to ``now`` (memoised per whole second of age)."""
        elapsed = now - self.stored
        age = math.ceil(elapsed) if elapsed > 0 else 0
        if age == self._age:
            return self._patched
        buf = bytearray(self.body)
        pack = _TTL.pack_into
        for off, ttl in zip(self.ttl_offsets, self.ttls, strict=True):
            pack(buf, off, ttl - age if ttl > age else 0)
        self._age = age
        self._patched = bytes(buf)
        self.valid_until = self.stored + age
        return self._patched

    def body_stale(self, stale_ttl: int) -> bytes:
        """Every TTL set to ``stale_ttl`` (RFC 8767 recommends 30 s: clients come back
        soon, but not every second during an outage)."""
        buf = bytearray(self.body)
        for off in self.ttl_offsets:
            _TTL.pack_into(buf, off, stale_ttl)
        return bytes(buf)


def _soa_minimum(data: bytes, rec: wire.Record) -> int:
    off = wire.skip_name(data, rec.rdata_offset)  # MNAME
    off = wire.skip_name(data, off)  # RNAME
    # SERIAL REFRESH RETRY EXPIRE MINIMUM
    return _TTL.unpack_from(data, off + 16)[0]


class _Lru(LRUCache):
    """cachetools' LRU, telling the cache when an entry leaves (evicted or dropped)."""

    def __init__(self, maxsize: int, on_remove: Any) -> None:
        super().__init__(maxsize=maxsize)
        self._on_remove = on_remove

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._on_remove(key)


class AnswerCache:
    """An LRU (cachetools) of CacheEntry, capped at ``settings.size`` entries.

    ``index`` mirrors the LRU's contents in a plain dict: the fast path reads it without
    touching the LRU order, and refreshes the order when it re-patches an entry's TTLs
    (about once a second per busy entry), so eviction stays close to LRU.
    """

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self.index: dict[bytes, CacheEntry] = {}
        self._lru: LRUCache[bytes, CacheEntry] = _Lru(max(settings.size, 1),
                                                      self._removed)
        self.hits = 0
        self.misses = 0
        self.stale_served = 0

    def __len__(self) -> int:
        return len(self._lru)

    def _removed(self, key: bytes) -> None:
        self.index.pop(key, None)

    def get(self, key: bytes) -> CacheEntry | None:
        """The entry for ``key`` (fresh or stale), or None. Dead entries are dropped."""
        try:
            return self._lru[key]
        except KeyError:
            return None

    def drop(self, key: bytes) -> None:
        self._lru.pop(key, None)

    def clear(self) -> None:
        self._lru.clear()

    def store(self, key: bytes, msg: wire.Message, data: bytes, now: float) -> CacheEntry | None:
        """Make an entry from an upstream answer, store it and return it (None: not cacheable)."""
        entry = make_entry(msg, data, now, self.settings)
        if entry is not None:
            self._lru[key] = entry
            self.index[key] = entry
        return entry


def make_entry(msg: wire.Message, data: bytes, now: float, s: CacheSettings,
               transient: bool = False) -> CacheEntry | None:
    """An entry for an upstream answer, or None if it must not be cached.

    ``transient``: for answering once from an answer that is not cacheable (SERVFAIL
    passed on, NODATA without SOA): TTLs are kept as received and it is never stored.
    """
    rcode = msg.rcode
    if not transient and (msg.truncated or rcode not in (wire.NOERROR, wire.NXDOMAIN)):
        return None
    # Cut the message after the question, and before the first OPT/TSIG in additional
    # (everything after it is additional data we may drop).
    cut = len(data)
    ar = 0
    keep: list[wire.Record] = []
    for rec in msg.records:
        if rec.start >= cut:
            break
        if rec.rtype in (wire.TYPE_TSIG,):
            cut = rec.start
            break
        keep.append(rec)
        if rec.section == 3:
            ar += 1
    if msg.opt is not None and msg.opt.start < cut:
        cut = msg.opt.start
        keep = [r for r in keep if r.start < cut]
        ar = sum(1 for r in keep if r.section == 3)
    an = sum(1 for r in keep if r.section == 1)
    ns = sum(1 for r in keep if r.section == 2)

    answers = [r for r in keep if r.section == 1]
    positive = rcode == wire.NOERROR and any(
        r.rtype == msg.qtype or r.rtype == wire.TYPE_CNAME or r.rtype == wire.TYPE_DNAME
        or msg.qtype == wire.TYPE_ANY for r in answers)
    base = msg.qend
    ttls: list[int] = []
    offsets: list[int] = []
    if transient:
        ttls = [r.ttl for r in keep]
        offsets = [r.ttl_offset - base for r in keep]
        lifetime = 0
    elif positive:
        for r in keep:
            ttls.append(min(max(r.ttl, s.min_ttl), s.max_ttl))
            offsets.append(r.ttl_offset - base)
        lifetime = min(ttls[:an]) if an else 0
    else:
        soa = next((r for r in keep if r.section == 2 and r.rtype == wire.TYPE_SOA), None)
        if soa is None:
            return None  # RFC 2308 section 5: no SOA, do not cache
        try:
            minimum = _soa_minimum(data, soa)
        except (wire.WireError, struct.error):
            return None
        neg = min(soa.ttl, minimum, s.max_negative_ttl)
        neg = max(neg, min(s.min_ttl, s.max_negative_ttl))
        for r in keep:
            ttls.append(neg if r is soa else min(max(r.ttl, s.min_ttl), s.max_ttl, neg))
            offsets.append(r.ttl_offset - base)
        lifetime = neg
    if lifetime <= 0 and not transient:
        return None
    e = CacheEntry()
    e.flags = (msg.flags & (wire.AD | wire.RCODE_MASK)) | wire.QR | wire.RA
    e.an, e.ns, e.ar = an, ns, ar
    e.body = data[base:cut]
    e.ttl_offsets = tuple(offsets)
    e.ttls = tuple(ttls)
    e.stored = now
    e.expires = now + lifetime
    e.dead_after = e.expires + s.stale_window
    e.rcode = rcode
    names: list[str] = []
    addresses: list[str] = []
    for r in answers:
        if r.name != msg.qname:  # the query name itself was checked before forwarding
            names.append(wire.wire_name_to_text(r.name))
        if r.target is not None:
            names.append(wire.wire_name_to_text(r.target))
        if r.address is not None:
            addresses.append(r.address)
    e.names = tuple(dict.fromkeys(names))
    e.addresses = tuple(dict.fromkeys(addresses))
    e._age = -1
    e._patched = b""
    e.valid_until = -1.0
    e.count_key = msg.qtype * 16 + (rcode & 0xF)
    e.fast = None
    e.policy_version = -1
    e.verdict = None
    return e


def answer_from_entry(entry: CacheEntry, query: wire.Query, body: bytes) -> bytes:
    """The client's answer: its ID and question, the cached records, moat's OPT."""
    flags = entry.flags | (query.flags & (wire.OPCODE_MASK | wire.RD | wire.CD))
    if not (query.do or query.flags & wire.AD):
        flags &= ~wire.AD
    data = query.data
    if query.edns:
        return wire.HEADER.pack(query.id, flags, 1, entry.an, entry.ns, entry.ar + 1) + \
            data[12:query.qend] + body + (_OPT_DO if query.do else _OPT)
    return wire.HEADER.pack(query.id, flags, 1, entry.an, entry.ns, entry.ar) + \
        data[12:query.qend] + body


_OPT = wire.opt_record(wire.UDP_PAYLOAD, False)
_OPT_DO = wire.opt_record(wire.UDP_PAYLOAD, True)
