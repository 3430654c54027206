"""Unit tests for resolver/upstream.py: health and back-off, the order upstreams are tried
in, and question matching. The exchanges themselves are tested against real sockets in
tests/integration/test_faults.py (through the moat process) and, in-process, at the end
of this file against the harness's FakeUpstream on loopback."""

from __future__ import annotations

import asyncio
import time

import dns.message
import dns.rcode
import pytest
from harness import FakeUpstream

from resolver import wire
from resolver.upstream import (
    Upstream,
    UpstreamError,
    UpstreamPool,
    UpstreamSettings,
    _same_question,
)


def pool(*servers: tuple[str, int], timeout: float = 0.3, deadline: float = 1.0) -> UpstreamPool:
    return UpstreamPool(UpstreamSettings(servers=servers, timeout=timeout, deadline=deadline,
                                         tcp_timeout=1.0))


def q(name: str, qtype: int = 1) -> bytes:
    return wire.make_question(name, qtype)


def test_upstream_address_is_normalised() -> None:
    u = Upstream("0:0::1", 5353)
    assert u.host == "::1" and u.label == "[::1]:5353"
    assert Upstream("127.0.0.1", 53).label == "127.0.0.1:53"
    with pytest.raises(ValueError):
        Upstream("dns.example", 53)


def test_back_off_doubles_and_is_capped() -> None:
    u = Upstream("127.0.0.1", 53)
    windows = []
    for _ in range(10):
        u.record_failure(100.0)
        windows.append(u.down_until - 100.0)
    assert windows == [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    assert not u.healthy(129.9) and u.healthy(130.0)
    u.record_success(0.01)
    assert u.healthy(100.0) and u.failures == 0


def test_unhealthy_upstreams_are_tried_last() -> None:
    p = pool(("127.0.0.1", 1), ("127.0.0.2", 2), ("127.0.0.3", 3))
    a, b, c = p.upstreams
    assert p.ordered(10.0) == [a, b, c]
    a.record_failure(10.0)
    assert p.ordered(10.1) == [b, c, a]
    b.record_failure(10.0)
    assert p.ordered(10.1) == [c, a, b]
    assert p.ordered(10.6) == [a, b, c]  # both back-off windows (0.5 s) are over


def test_same_question() -> None:
    question = q("www.example.test", 28)
    reply = dns.message.make_response(dns.message.make_query("WWW.Example.Test", "AAAA"))
    assert _same_question(wire.parse_message(reply.to_wire()), question)
    for name, rdtype, rdclass in [("www.example.test", "A", "IN"),
                                  ("www2.example.test", "AAAA", "IN"),
                                  ("www.example.test", "AAAA", "CH")]:
        other = dns.message.make_response(dns.message.make_query(name, rdtype, rdclass))
        assert not _same_question(wire.parse_message(other.to_wire()), question)


# --- in-process exchanges with the harness's FakeUpstream (loopback sockets) ------------


def resolve(p: UpstreamPool, question: bytes, do: bool = False, cd: bool = False
            ) -> tuple[bytes, wire.Message, Upstream]:
    return asyncio.run(p.resolve(question, do=do, cd=cd))


def test_servfail_moves_on_and_all_bad_returns_the_last_answer() -> None:
    with FakeUpstream("servfail") as bad, FakeUpstream("answer") as good:
        p = pool(("127.0.0.1", bad.port), ("127.0.0.1", good.port))
        data, msg, used = resolve(p, q("a.example.test"))
        assert msg.rcode == 0 and used.port == good.port
        assert p.upstreams[0].results["servfail"] == 1
        good.behaviour = "refused"
        p = pool(("127.0.0.1", bad.port), ("127.0.0.1", good.port))
        t0 = time.monotonic()
        data, msg, used = resolve(p, q("b.example.test"))
        assert time.monotonic() - t0 < 0.5  # no waiting for the deadline
        assert msg.rcode == dns.rcode.REFUSED and used.port == good.port
        assert len(bad.queries) == 2 and len(good.queries) == 2  # each asked once per question


def test_nothing_usable_raises_within_the_deadline() -> None:
    with FakeUpstream("silent") as a, FakeUpstream("garbage") as b:
        p = pool(("127.0.0.1", a.port), ("127.0.0.1", b.port), timeout=0.2, deadline=0.7)
        t0 = time.monotonic()
        with pytest.raises(UpstreamError):
            resolve(p, q("c.example.test"))
        elapsed = time.monotonic() - t0
        assert 0.6 <= elapsed <= 0.9, elapsed
        assert p.malformed >= 1  # the garbage was counted


def test_every_exchange_uses_a_fresh_id_and_port() -> None:
    with FakeUpstream("answer") as fake:
        p = pool(("127.0.0.1", fake.port))

        async def many() -> None:
            for i in range(20):
                await p.resolve(q(f"n{i}.example.test"), do=False, cd=False)

        asyncio.run(many())
        got = fake.wait_for_queries(20, timeout=2)
        ports = [x.src_port for x in got]
        ids = [x.id for x in got]
        assert len(set(ports)) >= 19, ports  # the kernel's random choice may repeat once
        assert len(set(ids)) >= 18, ids
        steps = {(b - a) & 0xFFFF for a, b in zip(ids, ids[1:], strict=False)}
        assert len(steps) > 5, ids  # not a counter


def test_truncated_udp_answer_is_retried_over_tcp() -> None:
    with FakeUpstream("truncate") as fake:
        p = pool(("127.0.0.1", fake.port))
        data, msg, _ = resolve(p, q("t.example.test"), do=True, cd=True)
        assert not msg.truncated and [r.address for r in msg.records] == ["192.0.2.1"]
        assert [x.transport for x in fake.queries] == ["udp", "tcp"]
        assert all(x.do_bit for x in fake.queries)
