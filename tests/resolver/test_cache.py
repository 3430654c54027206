"""Unit tests for resolver/cache.py: TTL ageing, clamps, negative caching, stale bodies,
the LRU cap, and (property test) that the UDP fast path answers exactly as the full
pipeline does. Upstream answers are built with dnspython, answers parsed back with it."""

from __future__ import annotations

import asyncio
import math
import struct
import types
from collections.abc import Iterator
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import resolver.fastpath as fastpath_mod
import resolver.pipeline as pipeline_mod
from resolver import config, wire
from resolver.app import App
from resolver.cache import AnswerCache, CacheSettings, answer_from_entry, make_entry

NOW = 5000.0


def upstream_answer(name: str = "www.example.test", rdtype: str = "A", *,
                    answers: list[tuple[str, int, str, str]] = (),  # type: ignore[assignment]
                    authority: list[tuple[str, int, str, str]] = (),  # type: ignore[assignment]
                    additional: list[tuple[str, int, str, str]] = (),  # type: ignore[assignment]
                    rcode: int = dns.rcode.NOERROR, flags: int = 0, edns: bool = True,
                    ) -> tuple[bytes, wire.Message]:
    q = dns.message.make_query(name, rdtype, use_edns=0 if edns else False)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    r.flags |= flags
    for section, rows in ((r.answer, answers), (r.authority, authority),
                          (r.additional, additional)):
        for owner, ttl, rtype, rdata in rows:
            section.append(dns.rrset.from_text(owner, ttl, "IN", rtype, rdata))
    data = r.to_wire()
    return data, wire.parse_message(data)


def soa(ttl: int = 300, minimum: int = 60) -> tuple[str, int, str, str]:
    return ("example.test.", ttl, "SOA",
            f"ns1.example.test. hostmaster.example.test. 1 3600 600 86400 {minimum}")


WWW = [("www.example.test.", 300, "A", "192.0.2.10")]


def client_query(name: str = "www.example.test", rdtype: str = "A", qid: int = 0x2222,
                 **kw: Any) -> wire.Query:
    m = dns.message.make_query(name, rdtype, **kw)
    m.id = qid
    return wire.parse_query(m.to_wire())


def rendered(entry: Any, body: bytes, query: wire.Query | None = None) -> dns.message.Message:
    return dns.message.from_wire(answer_from_entry(entry, query or client_query(), body))


def ttls(msg: dns.message.Message) -> list[int]:
    return [rr.ttl for section in (msg.answer, msg.authority, msg.additional) for rr in section]


# --- ageing ---------------------------------------------------------------------------


def test_ttls_age_by_whole_seconds_rounded_up() -> None:
    data, msg = upstream_answer(
        "alias.example.test",
        answers=[("alias.example.test.", 600, "CNAME", "www.example.test."),
                 ("www.example.test.", 300, "A", "192.0.2.10")],
        authority=[("example.test.", 3600, "NS", "ns1.example.test.")],
        additional=[("ns1.example.test.", 100, "A", "192.0.2.53")])
    entry = make_entry(msg, data, NOW, CacheSettings())
    assert entry is not None
    assert entry.expires == NOW + 300  # the smallest answer TTL
    originals = [600, 300, 3600, 100]
    q = client_query("alias.example.test")
    for age in (0, 0.001, 0.5, 1.0, 1.001, 2.5, 99.999, 100, 299.2, 300, 301, 5000):
        got = ttls(rendered(entry, entry.body_at(NOW + age), q))
        want = [max(0, t - math.ceil(age)) for t in originals]
        assert got == want, f"age {age}"
    # a clock that went backwards is age 0, never a TTL above the original
    assert ttls(rendered(entry, entry.body_at(NOW - 3), q)) == originals


@given(st.lists(st.floats(min_value=0, max_value=400, allow_nan=False), min_size=1,
                max_size=30))
@settings(max_examples=100, deadline=None)
def test_memoised_ageing_matches_fresh_ageing(ages: list[float]) -> None:
    data, msg = upstream_answer(answers=WWW, authority=[("example.test.", 250, "NS",
                                                         "ns1.example.test.")])
    entry = make_entry(msg, data, NOW, CacheSettings())
    assert entry is not None
    for age in ages:  # any order: the memo must never hand out a body of another age
        now = NOW + age
        elapsed = now - NOW  # what the float clock can express
        got = ttls(rendered(entry, entry.body_at(now)))
        assert got == [max(0, 300 - math.ceil(elapsed)), max(0, 250 - math.ceil(elapsed))], age


def test_min_and_max_ttl_clamps() -> None:
    s = CacheSettings(min_ttl=30, max_ttl=100)
    data, msg = upstream_answer(answers=[("www.example.test.", 5, "A", "192.0.2.10")],
                                authority=[("example.test.", 3600, "NS", "ns1.example.test.")])
    entry = make_entry(msg, data, NOW, s)
    assert entry is not None and entry.expires == NOW + 30
    assert ttls(rendered(entry, entry.body_at(NOW))) == [30, 100]
    assert ttls(rendered(entry, entry.body_at(NOW + 10.5))) == [19, 89]
    data, msg = upstream_answer(answers=[("www.example.test.", 86400, "A", "192.0.2.10")])
    entry = make_entry(msg, data, NOW, s)
    assert entry is not None and entry.expires == NOW + 100


def test_zero_ttl_answer_is_not_cached() -> None:
    data, msg = upstream_answer(answers=[("www.example.test.", 0, "A", "192.0.2.10")])
    assert make_entry(msg, data, NOW, CacheSettings()) is None


# --- negative caching (RFC 2308) ------------------------------------------------------


@pytest.mark.parametrize("soa_ttl,minimum,lifetime", [(300, 60, 60), (30, 60, 30),
                                                      (60, 60, 60), (7200, 7200, 3600)])
def test_nxdomain_lives_for_min_of_soa_ttl_and_minimum(soa_ttl: int, minimum: int,
                                                       lifetime: int) -> None:
    data, msg = upstream_answer("nope.example.test", rcode=dns.rcode.NXDOMAIN,
                                authority=[soa(soa_ttl, minimum)])
    entry = make_entry(msg, data, NOW, CacheSettings())  # max_negative_ttl 3600
    assert entry is not None and entry.expires == NOW + lifetime
    r = rendered(entry, entry.body_at(NOW + 2.5), client_query("nope.example.test"))
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert r.authority[0].rdtype == dns.rdatatype.SOA
    assert r.authority[0].ttl == lifetime - 3


def test_nodata_with_soa_is_cached_and_without_is_not() -> None:
    data, msg = upstream_answer("v4only.example.test", "AAAA", authority=[soa(300, 60)])
    entry = make_entry(msg, data, NOW, CacheSettings())
    assert entry is not None and entry.expires == NOW + 60 and entry.rcode == 0
    data, msg = upstream_answer("v4only.example.test", "AAAA")
    assert make_entry(msg, data, NOW, CacheSettings()) is None


def test_nxdomain_without_soa_is_not_cached() -> None:
    data, msg = upstream_answer("nope.example.test", rcode=dns.rcode.NXDOMAIN)
    assert make_entry(msg, data, NOW, CacheSettings()) is None


def test_max_negative_ttl() -> None:
    data, msg = upstream_answer("nope.example.test", rcode=dns.rcode.NXDOMAIN,
                                authority=[soa(300, 300)])
    entry = make_entry(msg, data, NOW, CacheSettings(max_negative_ttl=10))
    assert entry is not None and entry.expires == NOW + 10


@pytest.mark.parametrize("rcode", [dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.FORMERR,
                                   dns.rcode.NOTIMP])
def test_failures_are_not_cached(rcode: int) -> None:
    data, msg = upstream_answer(rcode=rcode, authority=[soa()])
    assert make_entry(msg, data, NOW, CacheSettings()) is None
    cache = AnswerCache(CacheSettings())
    assert cache.store(b"k", msg, data, NOW) is None and len(cache) == 0
    # ... but a transient entry can still answer the one client that asked
    transient = make_entry(msg, data, NOW, CacheSettings(), transient=True)
    assert transient is not None
    assert rendered(transient, transient.body).rcode() == rcode


def test_truncated_answer_is_not_cached() -> None:
    data, msg = upstream_answer(answers=WWW, flags=dns.flags.TC)
    assert make_entry(msg, data, NOW, CacheSettings()) is None


def test_upstream_opt_is_not_kept() -> None:
    data, msg = upstream_answer(answers=WWW, edns=True)
    entry = make_entry(msg, data, NOW, CacheSettings())
    assert entry is not None and entry.ar == 0
    plain = client_query(use_edns=False)
    r = rendered(entry, entry.body_at(NOW), plain)
    assert r.edns < 0  # a client without EDNS gets no OPT
    r = rendered(entry, entry.body_at(NOW), client_query(use_edns=0, want_dnssec=True))
    assert r.edns == 0 and r.payload == 1232 and r.ednsflags & dns.flags.DO


def test_stale_body() -> None:
    data, msg = upstream_answer(answers=WWW, authority=[("example.test.", 20, "NS",
                                                         "ns1.example.test.")])
    entry = make_entry(msg, data, NOW, CacheSettings())
    assert entry is not None
    assert ttls(rendered(entry, entry.body_stale(30))) == [30, 30]  # RFC 8767: every TTL
    assert entry.dead_after == entry.expires + CacheSettings().stale_window


# --- the answer from an entry ---------------------------------------------------------


def test_answer_echoes_client_id_case_and_flags() -> None:
    data, msg = upstream_answer(answers=WWW, flags=dns.flags.AD | dns.flags.AA)
    entry = make_entry(msg, data, NOW, CacheSettings())
    assert entry is not None
    m = dns.message.make_query("WwW.ExAmPlE.tEsT", "A", use_edns=False)
    m.id = 0xABCD
    m.flags |= dns.flags.CD
    q = wire.parse_query(m.to_wire())
    r = dns.message.from_wire(answer_from_entry(entry, q, entry.body_at(NOW)))
    assert r.id == 0xABCD
    assert str(r.question[0].name) == "WwW.ExAmPlE.tEsT."
    assert r.flags & dns.flags.QR and r.flags & dns.flags.RA and r.flags & dns.flags.RD
    assert r.flags & dns.flags.CD
    assert not r.flags & dns.flags.AA  # moat is not authoritative
    assert not r.flags & dns.flags.AD  # neither DO nor AD asked: AD cleared (RFC 6840 5.8)
    r = rendered(entry, entry.body_at(NOW), client_query(want_dnssec=True))
    assert r.flags & dns.flags.AD


# --- the LRU ----------------------------------------------------------------------------


def test_cache_size_cap_evicts_least_recently_used() -> None:
    cache = AnswerCache(CacheSettings(size=2))
    data, msg = upstream_answer(answers=WWW)
    for key in (b"a", b"b"):
        assert cache.store(key, msg, data, NOW) is not None
    assert cache.get(b"a") is not None  # a is now more recent than b
    cache.store(b"c", msg, data, NOW)
    assert len(cache) == 2
    assert cache.get(b"b") is None and b"b" not in cache.index
    assert cache.get(b"a") is not None and cache.get(b"c") is not None
    assert set(cache.index) == {b"a", b"c"}
    cache.drop(b"a")
    assert cache.get(b"a") is None and set(cache.index) == {b"c"}


# --- the fast path answers exactly as the pipeline does -----------------------------


class Capture:
    """Both a pipeline Responder and the UdpListener the fast path sends through."""

    transport = "udp"

    def __init__(self) -> None:
        self._t = self
        self.sent: list[bytes] = []

    def send(self, data: bytes, addr: Any) -> None:
        self.sent.append(data)

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append(data)

    def done_without_answer(self) -> None:
        self.sent.append(b"<dropped>")


class FrozenClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


SAMPLES = {
    "www": (("www.example.test", "A"), dict(
        answers=WWW, authority=[("example.test.", 600, "NS", "ns1.example.test.")],
        additional=[("ns1.example.test.", 120, "A", "192.0.2.53")])),
    "alias": (("alias.example.test", "A"), dict(
        answers=[("alias.example.test.", 600, "CNAME", "www.example.test."),
                 ("www.example.test.", 200, "A", "192.0.2.10")], flags=dns.flags.AD)),
    "nxdomain": (("nope.example.test", "A"), dict(rcode=dns.rcode.NXDOMAIN,
                                                  authority=[soa(300, 60)])),
    "nodata": (("v4only.example.test", "AAAA"), dict(authority=[soa(300, 60)])),
    "big": (("big.example.test", "TXT"), dict(answers=[
        ("big.example.test.", 300, "TXT", f'"{i:02d}' + "x" * 58 + '"') for i in range(11)])),
}


@pytest.fixture(scope="module")
def app_loop() -> Iterator[tuple[App, asyncio.AbstractEventLoop, FrozenClock]]:
    loop = asyncio.new_event_loop()
    clock = FrozenClock(10_000.0)
    mp = pytest.MonkeyPatch()
    # Both paths read the same frozen clock, so a second boundary can never fall between
    # the two answers being compared.
    mp.setattr(pipeline_mod, "time", types.SimpleNamespace(
        monotonic=clock.monotonic, perf_counter=pipeline_mod.time.perf_counter))
    mp.setattr(fastpath_mod, "monotonic", clock.monotonic)

    async def build() -> App:
        cfg = config.load(None, {"upstream": {"servers": ["127.0.0.1:9"]}})
        app = App(cfg)
        for (name, rdtype), kw in SAMPLES.values():
            data, msg = upstream_answer(name, rdtype, **kw)
            qname = wire.text_to_wire_name(name)
            question = qname + wire.TYPE_CLASS.pack(dns.rdatatype.from_text(rdtype), 1)
            for suffix in (b"\x00", b"\x01", b"\x02", b"\x03"):  # DO/CD variants
                app.cache.store(question + suffix, msg, data, clock.now)
        return app

    app = loop.run_until_complete(build())
    yield app, loop, clock
    mp.undo()
    loop.close()


def random_case(name: str, flips: list[bool]) -> str:
    return "".join(c.upper() if c.isalpha() and flips[i % len(flips)] else c
                   for i, c in enumerate(name))


@st.composite
def client_queries(draw: Any) -> tuple[str, bytes, str]:
    sample = draw(st.sampled_from(sorted(SAMPLES)))
    (name, rdtype), _ = SAMPLES[sample]
    edns = draw(st.booleans())
    m = dns.message.make_query(
        random_case(name, draw(st.lists(st.booleans(), min_size=1, max_size=20))), rdtype,
        use_edns=0 if edns else False,
        payload=draw(st.sampled_from([512, 600, 1000, 1232, 4096])),
        want_dnssec=edns and draw(st.booleans()))
    m.id = draw(st.integers(0, 0xFFFF))
    m.flags = 0
    for flag in (dns.flags.RD, dns.flags.CD, dns.flags.AD):
        if draw(st.booleans()):
            m.flags |= flag
    return sample, m.to_wire(), draw(st.sampled_from(["127.0.0.1", "::1", "192.168.1.20"]))


@given(queries=st.lists(client_queries(), min_size=1, max_size=4),
       ages=st.lists(st.floats(min_value=0, max_value=330, allow_nan=False), min_size=4,
                     max_size=4))
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fast_path_answers_like_the_pipeline(
        app_loop: tuple[App, asyncio.AbstractEventLoop, FrozenClock],
        queries: list[tuple[str, bytes, str]], ages: list[float]) -> None:
    """A few queries (random ID, case, RD/CD/AD, EDNS, DO, payload) at non-decreasing
    times: whenever the fast path answers, its bytes equal the pipeline's."""
    app, loop, clock = app_loop
    for key in list(app.cache.index):  # each example starts from freshly stored entries
        entry = app.cache.index[key]
        entry.fast, entry._age, entry.valid_until = None, -1, -1.0
    compared = 0

    async def one(data: bytes, addr: tuple[str, int]) -> tuple[list[bytes], list[bytes],
                                                               bool, bool]:
        entry = app.cache.get(wire.parse_query(data).key)
        assert entry is not None
        fresh = clock.now < entry.expires
        slow = Capture()
        if fresh:  # an expired entry would make the pipeline go upstream
            app.pipeline.handle(data, addr, Capture())  # what a first query does
            app.pipeline.handle(data, addr, slow)
        fast = Capture()
        answered = app.pipeline.fast.answer(data, addr, fast)
        again = Capture()
        answered_again = app.pipeline.fast.answer(data, addr, again)  # the memo, if any
        if answered and answered_again:
            assert again.sent == fast.sent
        return slow.sent, fast.sent, answered, fresh

    for (sample, data, client), age in zip(queries, sorted(ages), strict=False):
        clock.now = 10_000.0 + age
        slow_sent, fast_sent, answered, fresh = loop.run_until_complete(one(data, (client, 53)))
        if not fresh:
            assert not answered, "the fast path answered from an expired entry"
            continue
        if not answered:
            continue  # it may hand any query to the pipeline
        compared += 1
        event(f"compared {sample}")
        assert len(fast_sent) == 1 and len(slow_sent) == 1
        q = dns.message.from_wire(data)
        assert fast_sent[0] == slow_sent[0], (
            f"fast path and pipeline differ for {sample} at age {age}: "
            f"flags={q.flags:#x} edns={q.edns} payload={q.payload} ednsflags={q.ednsflags:#x}")
        r = dns.message.from_wire(fast_sent[0])
        assert r.id == q.id and r.question[0].name.to_text() == q.question[0].name.to_text()


def test_fast_path_really_answers(app_loop: tuple[App, asyncio.AbstractEventLoop,
                                                  FrozenClock]) -> None:
    """The property above is only worth something if the fast path takes these queries."""
    app, loop, clock = app_loop
    clock.now = 10_001.0
    data = dns.message.make_query("www.example.test", "A").to_wire()
    addr = ("127.0.0.1", 5353)

    async def run() -> bool:
        app.pipeline.handle(data, addr, Capture())
        return app.pipeline.fast.answer(data, addr, Capture())

    assert loop.run_until_complete(run())


def test_ttl_of_served_answers_never_exceeds_what_remains() -> None:
    data, msg = upstream_answer(answers=WWW)
    entry = make_entry(msg, data, NOW, CacheSettings())
    assert entry is not None
    for tenths in range(0, 3100, 7):
        now = NOW + tenths / 10
        (rr,) = rendered(entry, entry.body_at(now)).answer
        assert rr.ttl <= max(0.0, entry.expires - now), now
    assert struct.unpack("!I", entry.body[-10:-6])[0] == 300  # the stored body is untouched
