"""The UDP fast path: a cache hit, or a blocked name seen before, answered in a few µs.

This module holds the speed tricks, so the pipeline can stay readable. It answers only
what the full pipeline (resolver/pipeline.py) has already decided once, from state the
pipeline filled and keeps current:

* ``hosts``: clients the ACL allows, and whether the rate limiter must count them;
* ``memo``: the query-policy verdict per question (the pipeline's own memo, cleared when
  the policy changes);
* a cache entry whose answer-policy verdict for the current policy version is "allowed";
* ``templates``: a synthesised NXDOMAIN/NODATA/SINKHOLE answer per source, family,
  action, qtype and query shape (such answers depend on the name only through the
  question section, so one template serves every name of a list).

A question not seen under the current policy is checked here too (the verdict goes into
the pipeline's memo), so the first query for each of a million listed names costs a
policy lookup and a template splice, not a trip through the pipeline.

Everything else goes back to the pipeline (``answer`` returns False): first queries,
misses, malformed or unusual packets (opcode, counts, EDNS version, odd OPT placement),
new clients, rate-limit decisions other than "admit", answers that need truncation,
client-dependent policies.

Why it is correct to skip the full parser: the lookup key is the raw question bytes up to
the first zero byte (lower-cased) plus a byte for DO/CD. Keys in the cache and memos were
made by the full parser from well-formed questions, so an equal key proves the question
is well-formed; a malformed one simply misses and goes the long way.

What a cache hit costs: the answer after the ID is memoised on the entry for as long as
its TTLs stay right (they are re-patched once a second) and queries keep the same header
flags and question bytes, so a hit is a few comparisons, two dict lookups, one
concatenation and a send.

Counting is folded: ``counts[qtype * 16 + rcode]`` stands for queries_total,
responses_total and cache_hits_total together, ``synth_counts`` (keyed by a tuple kept on
each template) for queries_total, responses_total and policy_hits_total of synthesised
answers, and ``quick``/``quick_sum`` for the first request-duration bucket; the metrics
collector unfolds them.

Blocked names are memoised as the policy's compact references (ints, see
Policy.check_query_ref) where it gives one: the fast path needs only the template, found
by the reference's "head" bits, and expands a reference into a Verdict only to log it.
"""

from __future__ import annotations

import collections
import struct
from time import monotonic, perf_counter
from typing import Any

from policy.engine import REF_HEAD_MASK
from policy.rules import Action

from . import wire
from .cache import _OPT, _OPT_DO
from .pipeline_memo import MEMO_LIMIT, evict_oldest
from .ratelimit import ADMIT
from .stats import DURATION_BUCKETS, QTYPE_LABELS

_TAIL = struct.Struct("!HHHHH")  # flags, qd, an, ns, ar
_PLAIN_QUERY = b"\x00\x01\x00\x00\x00\x00\x00\x00"
_EDNS_QUERY = b"\x00\x01\x00\x00\x00\x00\x00\x01"
_KEY_SUFFIX = (b"\x00", b"\x01", b"\x02", b"\x03")  # DO | CD << 1, as in wire.parse_query
_FIRST_BUCKET = DURATION_BUCKETS[0]
_SYNTH_OK = (Action.NXDOMAIN, Action.NODATA, Action.SINKHOLE)
_MEMO_LIMIT = 50000
#: Bytes a name may hold and still be printed as it is (no escapes in wire_name_to_text).
_PLAIN_NAME_BYTES = bytes(range(0x21, 0x7F)).translate(None, b'.\\"();@$') + b"."


def _question_name(data: bytes, zero: int) -> str | None:
    """The question name at offset 12 as text (lower case), if it is plain labels
    (<= 63 octets, no compression) ending exactly at ``zero``, at most 255 octets, and
    needs no escaping: what wire.parse_query accepts and wire_name_to_text gives. None
    otherwise (the pipeline deals with it). Needed before this module trusts bytes that
    no earlier parse has vouched for."""
    if zero - 12 + 1 > 255:
        return None
    labels = []
    i = 12
    while i < zero:
        length = data[i]
        if length > 63 or length == 0:
            return None
        labels.append(data[i + 1:i + 1 + length])
        i += length + 1
    if i != zero:
        return None
    name = b".".join(labels)
    if name.translate(None, _PLAIN_NAME_BYTES) or name.count(b".") != len(labels) - 1:
        return None  # characters that would need escaping, or a dot inside a label
    return name.decode("ascii").lower()


def _template_key(v: Any, qtype: int, flags: bytes, edns: bool, do: bool) -> tuple[Any, ...]:
    """The templates key of a synthesised answer made from Verdict ``v``."""
    return (v.source_index, v.family, v.action, qtype, flags, edns, do)


class FastPath:
    def __init__(self, pipeline: Any) -> None:
        self.p = pipeline
        #: client address -> True (serve, no rate limit) / False (serve, rate-limited)
        self.hosts: dict[str, bool] = {}
        self.memo: dict[bytes, Any] = pipeline._memo
        self.version = -1
        self.closed = False
        self.index: dict[bytes, Any] = pipeline.cache.index
        #: (source, family, action, qtype, flags, edns, do), or for a verdict reference
        #: (reference & REF_HEAD_MASK, qtype, flags, edns, do) -> the synthesised answer's
        #: header after the ID, everything after the question, the category, and the key
        #: of synth_counts. NXDOMAIN, NODATA and SINKHOLE answers depend on the name only
        #: through the question section.
        self.templates: dict[tuple[Any, ...], tuple[bytes, bytes, str, tuple[Any, ...]]] = {}
        #: qtype * 16 + rcode -> answers from the cache
        self.counts: collections.defaultdict[int, int] = collections.defaultdict(int)
        #: (category, family, action, source, qtype, rcode) -> synthesised answers
        self.synth_counts: collections.defaultdict[tuple[Any, ...], int] = \
            collections.defaultdict(int)
        #: answers that took less than the first histogram bucket, and their total time
        self.quick = 0
        self.quick_sum = 0.0

    # --- kept current by the pipeline -----------------------------------------------

    def policy_changed(self, version: int, closed: bool = False) -> None:
        self.version = version
        self.closed = closed  # a fail-closed source has not loaded: the pipeline answers
        self.templates.clear()

    def parts_changed(self) -> None:
        """The ACL, rate limiter or cache were replaced (config reload)."""
        self.hosts.clear()
        self.index = self.p.cache.index

    def learn_host(self, host: str, rate_limited: bool) -> None:
        if len(self.hosts) >= _MEMO_LIMIT:
            self.hosts.clear()
        self.hosts[host] = not rate_limited

    def remember_synth(self, query: wire.Query, answer: bytes, verdict: Any) -> None:
        """Called by the pipeline after it synthesised a query-time policy answer."""
        if verdict.action not in _SYNTH_OK or len(answer) > 512 or \
                verdict.policy_version != self.version or len(self.templates) > _MEMO_LIMIT:
            return
        qtype = query.qtype
        key = _template_key(verdict, qtype, query.data[2:4], query.edns, query.do)
        count_key = (verdict.category, verdict.family, verdict.action.label, verdict.source,
                     qtype if qtype in QTYPE_LABELS else 0, answer[3] & 0x0F)
        self.templates[key] = (answer[2:12], answer[query.qend:], verdict.category, count_key)

    # --- the fast path --------------------------------------------------------------

    def answer(self, data: bytes, addr: Any, listener: Any) -> bool:
        """Answer ``data`` if it is a case this module handles; False otherwise.

        ``listener`` is the UdpListener (its ``_t`` the transport to send with)."""
        t0 = perf_counter()
        counts = data[4:12]
        if counts == _EDNS_QUERY:
            edns = True
        elif counts == _PLAIN_QUERY:
            edns = False
        else:
            return False
        if data[2] & 0xF8 or self.closed:  # QR=1, an opcode, or no policy yet: the long way
            return False
        qend = data.find(b"\x00", 12) + 5
        n = len(data)
        if edns:
            # The OPT RR right after the question: root owner, type 41, version 0,
            # and its RDATA must end the packet.
            if qend < 17 or data[qend:qend + 3] != b"\x00\x00\x29" or qend + 11 > n or \
                    data[qend + 6] or qend + 11 + (data[qend + 9] << 8 | data[qend + 10]) != n:
                return False
            i = qend + 11
            while i < n:  # options (dig sends a cookie): each must fit exactly
                if i + 4 > n:
                    return False
                i += 4 + (data[i + 2] << 8 | data[i + 3])
            if i != n:
                return False
            do = data[qend + 7] & 0x80
        else:
            if qend < 17 or qend != n:
                return False
            do = 0
        host = addr[0]
        known = self.hosts.get(host)
        if known is not True:
            if known is None:
                return False  # a client not seen yet: the pipeline sorts it out
            decision = self.p.ratelimit.check(host)
            if decision != ADMIT:  # slip or drop: the pipeline does it, once
                self.p.handle(data, addr, listener, decision)
                return True
        question = data[12:qend]
        key = question.lower() + _KEY_SUFFIX[(1 if do else 0) | (2 if data[3] & 0x10 else 0)]
        verdict = self.memo.get(key, False)
        if verdict is False:  # a question not seen under this policy: check it now
            policy = self.p.holder.policy
            name = None if policy.client_dependent else _question_name(data, qend - 5)
            if name is None:
                return False
            verdict = policy.check_query_ref(name, data[qend - 4] << 8 | data[qend - 3], host)
            memo = self.memo
            if len(memo) >= MEMO_LIMIT:
                evict_oldest(memo)
            memo[key] = verdict  # the pipeline finds it there if it takes over
        if verdict is not None:
            return self._synthesised(data, addr, listener._t, verdict, edns, do, qend, t0)
        entry = self.index.get(key)
        if entry is None:
            return False
        now = monotonic()
        flags = data[2:4]
        memo = entry.fast
        if memo is not None and now < memo[2] and memo[4] == self.version and \
                memo[0] == flags and memo[1] is edns and memo[3] == question:
            answer = data[:2] + memo[5]
        else:
            if now >= entry.expires or entry.policy_version != self.version or \
                    entry.verdict is not None:
                return False
            answer = data[:2] + self._build(entry, now, flags, edns, question, do)
            self.p.cache.get(key)  # refresh the LRU order about once a second per entry
        size = len(answer)
        if size > 512 and (not edns or size > wire.UDP_PAYLOAD or
                           size > (data[qend + 3] << 8 | data[qend + 4])):
            return False  # the pipeline truncates
        listener._t.sendto(answer, addr)
        self.counts[entry.count_key] += 1
        self._done(host, t0)
        return True

    def _done(self, host: str, t0: float) -> None:
        """After an answer: the client was active; the time it took (folded counters)."""
        active = self.p.clients.active
        if host in active:
            active[host] = t0
        else:
            self.p.clients.seen(host, t0)
        elapsed = perf_counter() - t0
        if elapsed < _FIRST_BUCKET:
            self.quick += 1
            self.quick_sum += elapsed
        else:
            self.p.stats.observe_duration(elapsed)

    def _build(self, entry: Any, now: float, flags_bytes: bytes, edns: bool,
               question: bytes, do: int) -> bytes:
        """The answer after the ID for this entry and query shape; memoised on the entry."""
        body = entry.body_at(now)
        qflags = flags_bytes[0] << 8 | flags_bytes[1]
        flags = entry.flags | (qflags & (wire.RD | wire.CD))
        if not (do or qflags & wire.AD):
            flags &= ~wire.AD
        if edns:
            rest = _TAIL.pack(flags, 1, entry.an, entry.ns, entry.ar + 1) + question + body + \
                (_OPT_DO if do else _OPT)
        else:
            rest = _TAIL.pack(flags, 1, entry.an, entry.ns, entry.ar) + question + body
        valid = min(entry.valid_until, entry.expires)
        entry.fast = (flags_bytes, edns, valid, question, self.version, rest)
        return rest

    def _synthesised(self, data: bytes, addr: Any, transport: Any, v: Any, edns: bool,
                     do: int, qend: int, t0: float) -> bool:
        """Answer a blocked name from its template (``v``: a Verdict or a reference)."""
        qtype = data[qend - 4] << 8 | data[qend - 3]
        flags = data[2:4]
        if v.__class__ is int:
            template = self.templates.get((v & REF_HEAD_MASK, qtype, flags, edns, do != 0))
            if template is None:
                template = self._template_for_ref(v, data, qend, qtype, flags, edns, do != 0)
        else:
            template = self.templates.get(_template_key(v, qtype, flags, edns, do != 0))
        if template is None:
            return False
        header, tail, category, count_key = template
        transport.sendto(data[:2] + header + data[12:qend] + tail, addr)
        self.synth_counts[count_key] += 1
        p = self.p
        host = addr[0]
        p.clients.threat(category, host, t0)
        if p.querylog.enabled:
            name = wire.wire_name_to_text(data[12:qend - 4].lower())
            if v.__class__ is int:
                v = p.holder.policy.verdict_of(v, name)
            p.querylog.record(host, addr[1], "udp", name, qtype, v, header[1] & 0x0F,
                              "policy", perf_counter() - t0)
        self._done(host, t0)
        return True

    def _template_for_ref(self, ref: int, data: bytes, qend: int, qtype: int, flags: bytes,
                          edns: bool, do: bool) -> tuple[bytes, bytes, str, Any] | None:
        """The template a reference's head maps to, found once through its Verdict (the
        pipeline made the template from a Verdict) and then kept under the head."""
        name = _question_name(data, qend - 5)
        if name is None:
            return None
        v = self.p.holder.policy.verdict_of(ref, name)
        template = self.templates.get(_template_key(v, qtype, flags, edns, do))
        if template is not None and len(self.templates) <= _MEMO_LIMIT:
            self.templates[(ref & REF_HEAD_MASK, qtype, flags, edns, do)] = template
        return template
