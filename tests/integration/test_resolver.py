"""The real `moat serve` process on loopback, in front of a real nsd (EXAMPLE_ZONE) or, to
count what reaches the upstream, the harness's FakeUpstream. Clients: dnspython, the real
`dig`, and raw sockets for malformed input.

Covers: UDP and TCP listeners on IPv4 and IPv6, TCP per RFC 7766 (framing, pipelining,
idle timeout, connection cap), forwarding, the cache (hits, case, TTL ageing, clamps,
negative caching, SERVFAIL, DO, size cap), EDNS(0) sizes and flags, and bad input.
Upstream faults, spoofing, serve-stale and signals: test_faults.py."""

from __future__ import annotations

import math
import re
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.rrset
import pytest
from dnslib import RCODE, RR, DNSRecord
from harness import FakeUpstream, MoatProcess, ReceivedQuery, free_port, free_port_on
from harness.clients import framed
from harness.scrape import metric, scrape

pytestmark = pytest.mark.integration

HDR = struct.Struct("!HHHHHH")


# --- helpers ----------------------------------------------------------------------------


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "moat.toml"
    path.write_text(text)
    return str(path)


def udp_exchange(port: int, data: bytes, timeout: float = 1.0,
                 host: str = "127.0.0.1") -> bytes | None:
    """Send one datagram, return the first reply (None if none within ``timeout``)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(data, (host, port))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


def tcp_read_message(s: socket.socket) -> bytes:
    head = b""
    for _ in range(100):
        if len(head) == 2:
            break
        chunk = s.recv(2 - len(head))
        if not chunk:
            raise ConnectionError("closed")
        head += chunk
    (length,) = struct.unpack("!H", head)
    body = b""
    for _ in range(10_000):
        if len(body) == length:
            break
        chunk = s.recv(length - len(body))
        if not chunk:
            raise ConnectionError("closed mid-message")
        body += chunk
    return body


def query_wire(name: str, rdtype: str = "A", qid: int | None = None, **kw: object) -> bytes:
    m = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    if qid is not None:
        m.id = qid
    return m.to_wire()


def rrsets(section: list) -> set[tuple[str, int, frozenset[str]]]:
    return {(str(r.name).lower(), r.rdtype, frozenset(x.to_text() for x in r)) for r in section}


# --- shared moat processes ----------------------------------------------------------
# Tests that need no special config share one moat in front of nsd (listening on
# 127.0.0.1 and ::1) and one in front of a FakeUpstream (reset before each test): each
# test uses names of its own, so the shared cache does not couple them.


@pytest.fixture(scope="module")
def nsd_moat(nsd_upstream) -> Iterator[MoatProcess]:
    port = free_port_on("127.0.0.1", "::1")
    proc = MoatProcess(["--upstream", nsd_upstream.addr, "--listen", f"127.0.0.1:{port}",
                        "--listen", f"[::1]:{port}"])
    try:
        yield proc
    finally:
        proc.stop()  # raises if moat needed SIGKILL


@pytest.fixture(scope="module")
def _shared_fake_moat() -> Iterator[tuple[MoatProcess, FakeUpstream, int]]:
    mport = free_port()
    with FakeUpstream("answer") as fake:
        proc = MoatProcess(["--upstream", fake.addr, "--metrics", f"127.0.0.1:{mport}"])
        try:
            yield proc, fake, mport
        finally:
            proc.stop()


@pytest.fixture
def fake_moat(_shared_fake_moat) -> tuple[MoatProcess, FakeUpstream, int]:
    """(moat, its FakeUpstream answering A 192.0.2.1, moat's metrics port)."""
    proc, fake, mport = _shared_fake_moat
    assert proc.running(), proc.stderr_text()
    fake.behaviour = "answer"
    fake.tcp_behaviour = None
    fake.records = None
    fake.negative_ttl = 60
    fake.clear()
    return proc, fake, mport


# --- listeners ------------------------------------------------------------------------


def test_udp_and_tcp_on_ipv4_and_ipv6_with_dig(nsd_moat, require_binary) -> None:
    dig = require_binary("dig")
    port = nsd_moat.port
    assert [h for h, _ in nsd_moat.listen] == ["127.0.0.1", "::1"]
    for host in ("127.0.0.1", "::1"):
        for transport in ("UDP", "TCP"):
            args = [dig, f"@{host}", "-p", str(port), "+time=2", "+tries=1",
                    "www.example.test", "A"]
            if transport == "TCP":
                args.append("+tcp")
            out = subprocess.run(args, capture_output=True, text=True, timeout=15,
                                 check=False).stdout
            assert "status: NOERROR" in out, (host, transport, out)
            assert re.search(r"^www\.example\.test\.\s+\d+\s+IN\s+A\s+192\.0\.2\.10$", out,
                             re.M), out
            assert re.search(rf"SERVER: {re.escape(host)}#{port}\({re.escape(host)}\) "
                             rf"\({transport}\)", out), out


# --- TCP (RFC 7766) ------------------------------------------------------------------


def test_tcp_pipelined_queries_are_all_answered(nsd_moat, nsd_upstream) -> None:
    m = nsd_moat
    cases = [("www.example.test", "A"), ("www.example.test", "AAAA"), ("mx.example.test", "MX"),
             ("chain.example.test", "A"), ("nope.example.test", "A"),
             ("v4only.example.test", "AAAA"), ("x.wild.example.test", "A"),
             ("big.example.test", "TXT")]
    queries = {}
    for i, (name, rdtype) in enumerate(cases):
        queries[1000 + i] = dns.message.make_query(name, rdtype)
        queries[1000 + i].id = 1000 + i
    with socket.create_connection((m.host, m.port), timeout=3) as s:
        s.sendall(b"".join(framed(q.to_wire()) for q in queries.values()))  # one write
        answers = {}
        for _ in range(len(queries)):
            r = dns.message.from_wire(tcp_read_message(s))
            answers[r.id] = r
    assert set(answers) == set(queries)
    for qid, q in queries.items():
        r = answers[qid]
        assert r.question == q.question
        want = nsd_upstream.query(str(q.question[0].name), q.question[0].rdtype, tcp=True)
        assert r.rcode() == want.rcode()
        assert rrsets(r.answer) == rrsets(want.answer), q.question


def test_tcp_pipelined_answers_come_as_they_are_ready(moat) -> None:
    """A slow cache miss first, then cache hits on the same connection: the hits are not
    held back behind the miss (answered out of order, matched by ID)."""
    with FakeUpstream("answer", delay=0.6) as fake:
        m = moat(upstream=fake)
        for i in range(3):
            m.query(f"hit{i}.example.test", "A")
        fake.behaviour = "slow"
        # the same slow question twice (one upstream query, two answers), hits between
        ids = [7001, 7002, 7003, 7004, 7005]
        names = ["miss.example.test", "hit0.example.test", "hit1.example.test",
                 "hit2.example.test", "MISS.example.test"]
        with socket.create_connection((m.host, m.port), timeout=3) as s:
            s.sendall(b"".join(framed(query_wire(n, qid=i)) for i, n in zip(ids, names,
                                                                             strict=True)))
            order = [dns.message.from_wire(tcp_read_message(s)) for _ in ids]
        assert sorted(r.id for r in order) == ids
        assert {r.id for r in order[-2:]} == {7001, 7005}, [r.id for r in order]
        by_id = {r.id: r for r in order}
        assert by_id[7005].question[0].name.to_text() == "MISS.example.test."
        assert len([q for q in fake.queries if q.qname == "miss.example.test."]) == 1
        for r in order:
            assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].address == "192.0.2.1"


def test_tcp_idle_connection_is_closed(moat, nsd_upstream, tmp_path) -> None:
    cfg = write_config(tmp_path, '[server]\ntcp_idle_timeout = "0.5s"\n'
                                 'tcp_read_timeout = "0.5s"\n')
    m = moat("--config", cfg, upstream=nsd_upstream)
    with socket.create_connection((m.host, m.port), timeout=5) as s:
        for qid in (1, 2):  # a client that keeps talking is not idle
            s.sendall(framed(query_wire("www.example.test", qid=qid)))
            assert dns.message.from_wire(tcp_read_message(s)).id == qid
            time.sleep(0.3)
        t0 = time.monotonic()
        try:
            closed = s.recv(100) == b""
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
        elapsed = time.monotonic() - t0
    assert closed, "moat kept an idle TCP connection open for 5 s (idle timeout 0.5 s)"
    assert 0.2 <= elapsed <= 2.0, elapsed


def _closed_at_once(s: socket.socket, timeout: float = 1.5) -> bool:
    s.settimeout(timeout)
    try:
        s.sendall(framed(query_wire("www.example.test", qid=99)))
        return s.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_tcp_connection_cap(moat, nsd_upstream, tmp_path) -> None:
    cfg = write_config(tmp_path, "[server]\ntcp_max_connections = 2\n")
    m = moat("--config", cfg, upstream=nsd_upstream)
    held = []
    for qid in (1, 2):
        s = socket.create_connection((m.host, m.port), timeout=3)
        held.append(s)
        s.sendall(framed(query_wire("www.example.test", qid=qid)))
        assert dns.message.from_wire(tcp_read_message(s)).id == qid
    extra = socket.create_connection((m.host, m.port), timeout=3)
    try:
        assert _closed_at_once(extra), "a third connection was served with a cap of 2"
    finally:
        extra.close()
    held.pop(0).close()
    served = False
    for _ in range(20):  # bounded: moat frees the slot when it sees the close
        time.sleep(0.1)
        with socket.create_connection((m.host, m.port), timeout=3) as s:
            s.settimeout(1.5)
            try:
                s.sendall(framed(query_wire("www.example.test", qid=5)))
                served = dns.message.from_wire(tcp_read_message(s)).id == 5
            except (ConnectionError, TimeoutError):
                served = False
        if served:
            break
    for s in held:
        s.close()
    assert served, "after one of two connections closed, a new one was still refused"


# --- forwarding ---------------------------------------------------------------------


FORWARD_CASES = [("www.example.test", "A"), ("www.example.test", "AAAA"),
                 ("example.test", "SOA"), ("example.test", "NS"), ("alias.example.test", "A"),
                 ("chain.example.test", "A"), ("mx.example.test", "MX"),
                 ("txtonly.example.test", "TXT"), ("x.wild.example.test", "A"),
                 ("nope.example.test", "A"), ("v4only.example.test", "AAAA"),
                 ("ent.example.test", "A")]


def test_answers_are_the_upstreams(nsd_moat, nsd_upstream) -> None:
    m = nsd_moat
    for tcp in (False, True):
        for name, rdtype in FORWARD_CASES:
            got = m.query(name, rdtype, tcp=tcp)
            want = nsd_upstream.query(name, rdtype)
            assert got.rcode() == want.rcode(), (name, rdtype)
            assert rrsets(got.answer) == rrsets(want.answer), (name, rdtype)
            if not want.answer:  # negative answers keep the SOA (RFC 2308)
                assert rrsets(got.authority) == rrsets(want.authority), (name, rdtype)
            assert got.flags & dns.flags.RA and got.flags & dns.flags.QR
            assert not got.flags & dns.flags.AA  # moat is not the authority


# --- the cache ------------------------------------------------------------------------


def test_second_query_is_answered_from_the_cache(fake_moat) -> None:
    m, fake_upstream, _ = fake_moat
    first = m.query("cached.example.test", "A")
    for tcp in (False, True, False):
        again = m.query("cached.example.test", "A", tcp=tcp)
        assert rrsets(again.answer) == rrsets(first.answer)
    time.sleep(0.1)
    assert len(fake_upstream.queries) == 1, fake_upstream.queries


def test_cache_ignores_case_and_echoes_the_clients_spelling(fake_moat) -> None:
    m, fake_upstream, _ = fake_moat
    m.query("case.example.test", "A")
    for tcp in (False, True):
        q = dns.message.make_query("CaSe.ExAmPle.TeSt", "A")
        r = (dns.query.tcp if tcp else dns.query.udp)(q, m.host, port=m.port, timeout=3)
        assert r.question[0].name.to_text() == "CaSe.ExAmPle.TeSt."  # exact spelling
        assert r.answer[0][0].address == "192.0.2.1"
    time.sleep(0.1)
    assert len(fake_upstream.queries) == 1, fake_upstream.queries


def test_ttl_counts_down_and_never_exceeds_what_remains(nsd_moat) -> None:
    m = nsd_moat
    t_sent = time.monotonic()
    first = m.query("mail.example.test", "A")
    t_first = time.monotonic()
    ttl0 = first.answer[0].ttl
    assert ttl0 <= 300
    time.sleep(1.6)
    for tcp in (False, True):
        t_send = time.monotonic()
        r = m.query("mail.example.test", "A", tcp=tcp)
        t_recv = time.monotonic()
        ttl = r.answer[0].ttl
        # The entry was stored before t_first: at least (t_send - t_first) has passed.
        # ... so what remains is less than 300 - (t_send - t_first): TTL at most its floor.
        assert ttl <= math.floor(300 - (t_send - t_first)), (ttl, t_send - t_first)
        assert ttl >= 300 - (t_recv - t_sent) - 1, (ttl, t_recv - t_sent)  # not aged too fast
        # the other records age too
        for section in (r.authority, r.additional):
            for rrset in section:
                assert rrset.ttl <= math.floor(300 - (t_send - t_first))


def test_min_and_max_ttl_clamps(moat, tmp_path) -> None:
    records = {"short.example.test": ["1 A 192.0.2.20"], "long.example.test": ["900 A 192.0.2.21"]}
    with FakeUpstream(records=records) as fake:
        cfg = write_config(tmp_path, "[cache]\nmin_ttl = 10\nmax_ttl = 100\n")
        m = moat("--config", cfg, upstream=fake)
        assert m.query("short.example.test", "A").answer[0].ttl == 10
        assert m.query("long.example.test", "A").answer[0].ttl == 100
        time.sleep(1.3)  # the upstream's TTL of 1 is over; moat's floor of 10 is not
        r = m.query("short.example.test", "A")
        assert 6 <= r.answer[0].ttl <= 8 and r.answer[0][0].address == "192.0.2.20"
        time.sleep(0.1)
        assert [q.qname for q in fake.queries] == ["short.example.test.", "long.example.test."]


def soa_ttl_300_minimum_60(q: ReceivedQuery, req: DNSRecord) -> DNSRecord:
    """NXDOMAIN whose SOA has TTL 300 but MINIMUM 60: RFC 2308 says cache for 60."""
    r = req.reply(ra=1, aa=0)
    r.header.rcode = RCODE.NXDOMAIN
    r.add_auth(*RR.fromZone("example.test. 300 IN SOA ns1.example.test. "
                            "hostmaster.example.test. 1 3600 600 86400 60"))
    return r


def test_negative_answers_from_nsd_carry_the_soa_minimum(nsd_moat) -> None:
    m = nsd_moat
    for name, rdtype, rcode in [("nope.example.test", "A", dns.rcode.NXDOMAIN),
                                ("v4only.example.test", "AAAA", dns.rcode.NOERROR)]:
        for _ in range(2):
            r = m.query(name, rdtype)
            assert r.rcode() == rcode and not r.answer
            (soa,) = r.authority
            assert soa.rdtype == dns.rdatatype.SOA and 0 < soa.ttl <= 60, soa


def test_negative_answers_are_cached_for_the_soa_minimum(fake_moat) -> None:
    f, fake_upstream, _ = fake_moat
    fake_upstream.behaviour = "nxdomain_soa"
    for _ in range(3):
        r = f.query("gone.example.test", "A")
        assert r.rcode() == dns.rcode.NXDOMAIN and r.authority[0].ttl <= 60
    fake_upstream.behaviour = "answer"  # no records: AAAA gets NODATA with an SOA
    for _ in range(3):
        r = f.query("here.example.test", "AAAA")
        assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.authority[0].ttl <= 60
    fake_upstream.behaviour = soa_ttl_300_minimum_60
    for _ in range(3):
        r = f.query("min.example.test", "A")
        assert r.rcode() == dns.rcode.NXDOMAIN and 0 < r.authority[0].ttl <= 60, r
    time.sleep(0.1)
    assert [(q.qname, q.qtype) for q in fake_upstream.queries] == [
        ("gone.example.test.", "A"), ("here.example.test.", "AAAA"), ("min.example.test.", "A")]


def test_servfail_is_not_cached(fake_moat) -> None:
    m, fake_upstream, _ = fake_moat
    fake_upstream.behaviour = "servfail"
    assert m.query("flaky.example.test", "A").rcode() == dns.rcode.SERVFAIL
    assert m.query("flaky.example.test", "A").rcode() == dns.rcode.SERVFAIL
    assert len(fake_upstream.queries) == 2
    fake_upstream.behaviour = "answer"
    r = m.query("flaky.example.test", "A")
    assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].address == "192.0.2.1"


def test_do_bit_separates_cache_entries(fake_moat) -> None:
    m, fake_upstream, _ = fake_moat
    m.query("sec.example.test", "A")
    m.query("sec.example.test", "A", want_dnssec=True)
    m.query("sec.example.test", "A", want_dnssec=True)
    m.query("sec.example.test", "A")
    time.sleep(0.1)
    assert [q.do_bit for q in fake_upstream.queries] == [False, True]


def test_cache_size_cap(moat, fake_upstream, tmp_path) -> None:
    m = moat("--config", write_config(tmp_path, "[cache]\nsize = 2\n"), upstream=fake_upstream)
    for name in ("one", "two", "three", "three", "one"):
        m.query(f"{name}.example.test", "A")
    time.sleep(0.1)
    assert [q.qname for q in fake_upstream.queries] == [
        "one.example.test.", "two.example.test.", "three.example.test.", "one.example.test."]


# --- EDNS(0) --------------------------------------------------------------------------


def test_edns_sizes_and_truncation(nsd_moat) -> None:
    m = nsd_moat
    r = m.query("www.example.test", "A", use_edns=0, payload=4096)
    assert r.edns == 0 and r.payload == 1232
    assert m.query("www.example.test", "A", use_edns=False).edns < 0
    # no EDNS: at most 512 bytes over UDP, TC=1 with the question kept (from the
    # upstream, then from the cache)
    for qid in (51, 52):
        raw = udp_exchange(m.port, query_wire("Big.example.test", "TXT", qid=qid,
                                              use_edns=False))
        assert raw is not None and len(raw) <= 512
        r = dns.message.from_wire(raw)
        assert r.id == qid and r.flags & dns.flags.TC
        assert r.question[0].name.to_text() == "Big.example.test."
        assert r.question[0].rdtype == 16
    # EDNS 1232: the whole answer
    raw = udp_exchange(m.port, query_wire("big.example.test", "TXT", use_edns=0, payload=1232))
    assert raw is not None and 512 < len(raw) <= 1232
    r = dns.message.from_wire(raw)
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == 11
    # a client's smaller EDNS size is honoured
    raw = udp_exchange(m.port, query_wire("big.example.test", "TXT", use_edns=0, payload=700))
    assert raw is not None and len(raw) <= 700
    assert dns.message.from_wire(raw).flags & dns.flags.TC
    # larger than any UDP answer: TC over UDP, all of it over TCP
    for _ in range(2):
        r = m.query("huge.example.test", "TXT", use_edns=0, payload=1232)
        assert r.flags & dns.flags.TC and not r.answer
    r = m.query("huge.example.test", "TXT", tcp=True)
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == 80


def test_dig_without_edns_retries_over_tcp(nsd_moat, require_binary) -> None:
    require_binary("dig")
    m = nsd_moat
    out = m.dig("+noedns", "+ignore", "big.example.test", "TXT")
    assert "flags: qr tc" in out or re.search(r"flags:[a-z ]*\btc\b", out), out
    out = m.dig("+noedns", "big.example.test", "TXT")
    assert "ANSWER: 11" in out and "(TCP)" in out, out


def test_badvers_for_unknown_edns_version(fake_moat) -> None:
    m, fake_upstream, _ = fake_moat
    raw = udp_exchange(m.port, query_wire("badvers.example.test", "A", qid=77, use_edns=1))
    assert raw is not None
    r = dns.message.from_wire(raw)
    assert r.id == 77 and r.rcode() == dns.rcode.BADVERS and r.edns == 0
    assert not r.answer
    time.sleep(0.1)
    assert fake_upstream.queries == []


def test_do_and_cd_go_upstream_and_ecs_does_not(fake_moat) -> None:
    m, fake_upstream, _ = fake_moat
    q = dns.message.make_query("flags.example.test", "A", want_dnssec=True)
    q.flags |= dns.flags.CD
    r = dns.query.udp(q, m.host, port=m.port, timeout=3)
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.CD
    assert r.ednsflags & dns.flags.DO
    ecs = dns.edns.ECSOption("203.0.113.0", 24)
    m.query("ecs.example.test", "A", use_edns=0, options=[ecs])
    got = fake_upstream.wait_for_queries(2, timeout=3)
    flags_q, ecs_q = got
    assert flags_q.do_bit and flags_q.message is not None
    assert flags_q.message.flags & dns.flags.CD
    assert ecs_q.qname == "ecs.example.test." and ecs_q.has_edns and not ecs_q.has_ecs


# --- bad input ------------------------------------------------------------------------


def test_malformed_queries(fake_moat) -> None:
    m, fake_upstream, mport = fake_moat
    before = scrape(mport)
    question = b"\x03www\x07example\x04test\x00\x00\x01\x00\x01"

    def good() -> None:
        r = m.query("good.example.test", "A", timeout=2)
        assert r.rcode() == dns.rcode.NOERROR

    # shorter than a header: dropped, and moat goes on
    assert udp_exchange(m.port, b"\x12\x34\x01\x00\x00", timeout=0.5) is None
    good()
    # a header, then junk where the question should be: FORMERR, same ID
    raw = udp_exchange(m.port, HDR.pack(0x5151, 0x0100, 1, 0, 0, 0) + b"\xff\xfe\xfd\x00junk")
    assert raw is not None and raw[:2] == b"\x51\x51"
    assert dns.message.from_wire(raw).rcode() == dns.rcode.FORMERR
    # QR=1: never answer a response
    assert udp_exchange(m.port, HDR.pack(0x5252, 0x8100, 1, 0, 0, 0) + question,
                        timeout=0.5) is None
    good()
    # opcode STATUS: NOTIMP, same ID
    raw = udp_exchange(m.port, HDR.pack(0x5353, (2 << 11) | 0x0100, 1, 0, 0, 0) + question)
    assert raw is not None and raw[:2] == b"\x53\x53"
    r = dns.message.from_wire(raw)
    assert r.rcode() == dns.rcode.NOTIMP and r.opcode() == 2
    # QDCOUNT 0 and 2: FORMERR
    for qid, qd in ((0x5454, 0), (0x5555, 2)):
        raw = udp_exchange(m.port, HDR.pack(qid, 0x0100, qd, 0, 0, 0) + question * qd)
        assert raw is not None and struct.unpack("!H", raw[:2])[0] == qid
        assert dns.message.from_wire(raw).rcode() == dns.rcode.FORMERR
    # qtype ANY: the RFC 8482 answer, nothing sent upstream
    r = m.query("any.example.test", "ANY")
    assert r.rcode() == dns.rcode.NOERROR
    (rrset,) = r.answer
    assert rrset.rdtype == dns.rdatatype.HINFO and rrset[0].cpu == b"RFC8482"
    r = m.query("any.example.test", "ANY", tcp=True)
    assert r.answer[0].rdtype == dns.rdatatype.HINFO
    time.sleep(0.1)
    assert [q.qname for q in fake_upstream.queries] == ["good.example.test."]
    after = scrape(mport)

    def counted(*kinds: str) -> float:
        return sum(metric(after, "moat_malformed_queries_total", kind=k) -
                   metric(before, "moat_malformed_queries_total", kind=k) for k in kinds)

    for kind, n in (("short", 1), ("response", 1), ("opcode", 1), ("qdcount", 2)):
        assert counted(kind) == n, (kind, after)
    assert counted("name", "truncated") == 1, after


def test_malformed_query_over_tcp_gets_formerr(fake_moat) -> None:
    m, _, _ = fake_moat
    with socket.create_connection((m.host, m.port), timeout=3) as s:
        s.sendall(framed(HDR.pack(0x6161, 0x0100, 2, 0, 0, 0)))
        raw = tcp_read_message(s)
        assert raw[:2] == b"\x61\x61"
        assert dns.message.from_wire(raw).rcode() == dns.rcode.FORMERR
        s.sendall(framed(query_wire("www.example.test", qid=0x6262)))  # still usable
        assert dns.message.from_wire(tcp_read_message(s)).id == 0x6262


def test_dnssec_records_come_back_to_a_do_client_and_stay_apart_in_the_cache(fake_moat
                                                                             ) -> None:
    """A validating client (DO=1) gets the RRSIGs and the AD bit the upstream sent, also
    from the cache; a client without DO gets neither (a separate cache entry)."""
    m, fake_upstream, _ = fake_moat
    sig = ("A 13 3 300 20361231000000 20261101000000 12345 example.test. "
           "c2lnbmF0dXJlIGJ5dGVzIGZvciB0aGUgdGVzdCBvbmx5IG5vdCByZWFs")

    def signed(query: ReceivedQuery, request: object) -> bytes:
        msg = dns.message.from_wire(query.wire)
        r = dns.message.make_response(msg)
        name = msg.question[0].name
        r.answer.append(dns.rrset.from_text(name, 300, "IN", "A", "192.0.2.44"))
        if msg.ednsflags & dns.flags.DO:
            r.answer.append(dns.rrset.from_text(name, 300, "IN", "RRSIG", sig))
            r.flags |= dns.flags.AD
        return r.to_wire()

    fake_upstream.behaviour = signed
    for _ in range(2):  # upstream, then cache
        q = dns.message.make_query("signed.example.test", "A", want_dnssec=True)
        r = dns.query.udp(q, m.host, port=m.port, timeout=3)
        types = sorted(dns.rdatatype.to_text(rrset.rdtype) for rrset in r.answer)
        assert types == ["A", "RRSIG"] and r.flags & dns.flags.AD, r
        (rrsig,) = [rs for rs in r.answer if rs.rdtype == dns.rdatatype.RRSIG]
        assert rrsig[0] == dns.rdata.from_text("IN", "RRSIG", sig)
    plain = m.query("signed.example.test", "A", use_edns=0)
    assert [dns.rdatatype.to_text(rs.rdtype) for rs in plain.answer] == ["A"]
    assert not plain.flags & dns.flags.AD
    assert len(fake_upstream.queries) == 2  # DO=1 once, DO=0 once
