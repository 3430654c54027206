"""Property-based fuzzing (hypothesis) of what reads bytes from the network: the wire
decoder (resolver/wire.py: parse_query, parse_message, read_name, skip_name), the TCP
framer (resolver/server.py TcpConnection) and the whole request path in-process
(resolver/app.py App -> Pipeline.handle, and the UDP fast path).

Inputs are random bytes and, more usefully, *mutated valid packets*: real queries and
real (compressed) answers with bits flipped, truncated, bytes inserted or deleted, count
fields changed, compression pointers redirected (to themselves, forward, past the end),
header flags rewritten, name case flipped.

Properties:
* the decoder only ever raises wire.WireError (never IndexError, struct.error, ...), with
  a ``kind`` from the bounded set exported as a metric label, and never loops (every
  call runs under a 2 s alarm); what it returns is within the packet's bounds;
* the TCP framer hands the pipeline exactly the frames that were sent, whatever the
  chunking, and never raises;
* the pipeline answers every datagram or TCP frame exactly once (an answer, or a counted
  drop), never raises, never records an internal error, counts every malformed query,
  and every answer is a well-formed DNS response with the query's ID that fits the
  client's UDP size;
* the UDP fast path returns a bool, never raises, and whenever it answers, its answer is
  byte for byte what the full pipeline sends for the same datagram.

The only stand-ins: a transport object for TCP (asyncio's interface) and a responder that
records what the pipeline sends. No sockets: the upstream is never reached (max_in_flight
= 0 sheds every cache miss at once, so each datagram is handled synchronously).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import struct
import time
import types
from collections.abc import Iterator
from typing import Any
from unittest import mock

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.build import build_policy
from resolver import config as config_mod
from resolver import fastpath, pipeline, server, stats, wire
from resolver.app import App

HDR = struct.Struct("!HHHHHH")
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextlib.contextmanager
def time_limit(seconds: float = 2.0) -> Iterator[None]:
    """Fail (instead of hanging) if the body loops: SIGALRM raises in the main thread."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s: an endless loop?")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- seeds: valid packets -----------------------------------------------------------------


def _query(name: str, rdtype: str = "A", qid: int = 0x2345, rdclass: str = "IN",
           **kw: Any) -> bytes:
    q = dns.message.make_query(name, rdtype, rdclass, **kw)
    q.id = qid
    return q.to_wire()


def _opt(payload: int = 1232, ttl: int = 0, options: bytes = b"") -> bytes:
    return b"\x00" + struct.pack("!HHIH", 41, payload, ttl, len(options)) + options


def _question(name: str, qtype: int = 1, qclass: int = 1) -> bytes:
    return wire.text_to_wire_name(name) + struct.pack("!HH", qtype, qclass)


def _response(name: str, rdtype: str, *rrs: tuple[str, int, str, str], rcode: int = 0,
              authority: tuple[tuple[str, int, str, str], ...] = (), edns: bool = True,
              ad: bool = False) -> bytes:
    q = dns.message.make_query(name, rdtype, use_edns=0 if edns else None)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    if ad:  # a validating upstream vouches for it: moat passes AD only to who asks
        r.flags |= dns.flags.AD
    for owner, ttl, t, text in rrs:
        r.answer.append(dns.rrset.from_text(owner, ttl, "IN", t, text))
    for owner, ttl, t, text in authority:
        r.authority.append(dns.rrset.from_text(owner, ttl, "IN", t, text))
    return r.to_wire()  # dnspython compresses names: pointers to mutate


ECS = dns.edns.ECSOption("192.0.2.0", 24)
COOKIE = dns.edns.GenericOption(10, b"\x01\x02\x03\x04\x05\x06\x07\x08")
PAD = dns.edns.GenericOption(12, b"\x00" * 40)
SOA = ("example.test.", 300, "SOA", "ns1.example.test. hostmaster.example.test. 1 3600 600 "
       "86400 60")

QUERY_SEEDS = [
    _query("www.example.test"),
    _query("www.example.test", use_edns=0),
    _query("www.example.test", use_edns=0, want_dnssec=True),
    _query("www.example.test", use_edns=0, flags=dns.flags.RD | dns.flags.CD),
    _query("WwW.ExAmPlE.TeSt", "AAAA", use_edns=0, options=[ECS, COOKIE]),
    _query("www.example.test", "MX", use_edns=0, options=[PAD]),
    _query("c2.moat.test"),
    _query("c2.moat.test", "AAAA", use_edns=0),
    _query("malware.moat.test", "TXT", use_edns=0, want_dnssec=True),
    _query("nx.bad.test", use_edns=0),
    _query("drop.bad.test"),
    _query("tcp.bad.test", use_edns=0),
    _query("www.example.test", "ANY"),
    _query("version.bind", "TXT", rdclass="CH"),
    _query(".", "NS", use_edns=0),
    _query(".".join(["a" * 63] * 3 + ["b" * 61])),  # 255 octets: the longest name
    _query("xn--bcher-kva.example.test", "HTTPS", use_edns=0, payload=4096),
    _query("www.example.test", use_edns=1),  # EDNS version 1: BADVERS
    HDR.pack(7, 0x0100, 1, 0, 0, 2) + _question("www.example.test") + _opt() +
    b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + b"\x7f\x00\x00\x01",
    HDR.pack(8, 0x0100, 1, 1, 0, 1) + _question("www.example.test") +
    b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + b"\xc0\x00\x02\x01" + _opt(),
    HDR.pack(9, 0x2000, 1, 0, 0, 0) + _question("example.test", 6),  # NOTIFY
    HDR.pack(10, 0x2800, 1, 0, 0, 0) + _question("example.test", 6),  # UPDATE
    HDR.pack(11, 0x0100, 2, 0, 0, 0) + _question("a.test") + _question("b.test"),
    HDR.pack(12, 0x0100, 1, 0, 0, 1) + _question("www.example.test") +
    _opt(options=struct.pack("!HH", 8, 7) + b"\x00\x01\x18\x00\xc0\x00\x02"),
]

RESPONSE_SEEDS = [
    _response("www.example.test", "A", ("www.example.test.", 300, "A", "192.0.2.10")),
    _response("www.example.test", "AAAA", ("www.example.test.", 300, "AAAA", "2001:db8::10"),
              edns=False),
    _response("chain.example.test", "A", ("chain.example.test.", 300, "CNAME",
                                          "alias.example.test."),
              ("alias.example.test.", 300, "CNAME", "www.example.test."),
              ("www.example.test.", 300, "A", "192.0.2.10")),
    _response("mx.example.test", "MX", ("mx.example.test.", 300, "MX", "10 mail.example.test."),
              authority=(("example.test.", 300, "NS", "ns1.example.test."),)),
    _response("nope.example.test", "A", rcode=dns.rcode.NXDOMAIN, authority=(SOA,)),
    _response("txt.example.test", "TXT", ("txt.example.test.", 300, "TXT", '"a" "b" "c"')),
    _response("d.example.test", "A", ("d.example.test.", 300, "DNAME", "example.org.")),
]

SEEDS = QUERY_SEEDS + RESPONSE_SEEDS


# --- mutations ----------------------------------------------------------------------------


def _pointer_positions(data: bytearray) -> list[int]:
    return [i for i in range(12, len(data) - 1) if data[i] & 0xC0 == 0xC0]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes] = SEEDS, max_ops: int = 5) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "count",
                                   "pointer", "new-pointer", "byte", "flags", "case",
                                   "repeat", "append"]))
        n = len(data)
        pos = draw(st.integers(0, max(n - 1, 0)))
        if op == "flip" and n:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[draw(st.integers(0, n)):]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and n:
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == "count" and n >= 12:
            which = draw(st.integers(0, 3))
            value = draw(st.sampled_from([0, 1, 2, 3, 0x7F, 0xFF, 0x100, 0xFFFF]) |
                         st.integers(0, 0xFFFF))
            data[4 + 2 * which:6 + 2 * which] = struct.pack("!H", value)
        elif op == "pointer":
            ptrs = _pointer_positions(data)
            if ptrs:
                i = draw(st.sampled_from(ptrs))
                target = draw(st.sampled_from([0, 12, i, i + 2, n - 1, n, 0x3FFF]) |
                              st.integers(0, 0x3FFF))
                data[i:i + 2] = struct.pack("!H", 0xC000 | (target & 0x3FFF))
        elif op == "new-pointer" and n > 12:
            at = draw(st.integers(12, n - 1))
            target = draw(st.sampled_from([at, 12, at - 2]) | st.integers(0, n + 4))
            data[at:at + 2] = struct.pack("!H", 0xC000 | (max(target, 0) & 0x3FFF))
        elif op == "byte" and n:
            data[pos] = draw(st.sampled_from([0, 0x3F, 0x40, 0x80, 0xC0, 0xFF, 41]) |
                             st.integers(0, 255))
        elif op == "flags" and n >= 4:
            data[2:4] = struct.pack("!H", draw(st.integers(0, 0xFFFF)))
        elif op == "case" and n > 12:
            letters = [i for i in range(12, n) if chr(data[i]).isalpha()]
            if letters:
                data[draw(st.sampled_from(letters))] ^= 0x20
        elif op == "repeat" and n:
            data += data[pos:pos + draw(st.integers(1, 40))]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


packets = st.one_of(mutated(), st.binary(max_size=700))


# --- the decoder --------------------------------------------------------------------------


def check_parse_query(data: bytes) -> None:
    try:
        q = wire.parse_query(data)
    except wire.WireError as err:
        assert err.kind in stats.MALFORMED_KINDS, err.kind  # a bounded metric label
        partial = getattr(err, "query", None)
        if partial is not None:
            assert 12 <= partial.qend <= len(data)
        return
    n = len(data)
    assert 17 <= q.qend <= n
    assert q.key[:-1] == data[12:q.qend].lower() and q.key[-1] in (0, 1, 2, 3)
    assert len(q.qname_wire) <= 255 and q.qname_wire.endswith(b"\x00")
    assert 512 <= q.payload <= wire.UDP_PAYLOAD
    assert q.opcode == 0 and q.edns_version == 0
    q.qname  # renders as text  # noqa: B018


@given(packets)
@SETTINGS
def test_parse_query_raises_only_wire_errors(data: bytes) -> None:
    with time_limit():
        check_parse_query(data)


def check_parse_message(data: bytes) -> None:
    try:
        msg = wire.parse_message(data)
    except wire.WireError:
        return
    n = len(data)
    assert 12 <= msg.qend <= n
    assert len(msg.records) <= sum(msg.counts[1:])
    for rec in msg.records + ([msg.opt] if msg.opt else []):
        assert 12 <= rec.start < rec.ttl_offset < rec.rdata_offset <= rec.end <= n
        assert rec.rdata_offset + rec.rdlength == rec.end
        assert rec.ttl == struct.unpack_from("!I", data, rec.ttl_offset)[0]
        assert len(rec.name) <= 255, rec.name
        if rec.address is not None:
            ipaddress.ip_address(rec.address)
        if rec.target is not None:
            assert len(rec.target) <= 255
            wire.wire_name_to_text(rec.target)
    msg.rcode  # noqa: B018


@given(packets)
@SETTINGS
def test_parse_message_raises_only_wire_errors(data: bytes) -> None:
    with time_limit():
        check_parse_message(data)


@given(packets, st.integers(0, 800))
@SETTINGS
def test_read_name_and_skip_name_anywhere(data: bytes, start: int) -> None:
    with time_limit():
        for off in range(start % (len(data) + 1), min(len(data) + 2, start % (len(data) + 1)
                                                      + 40)):
            try:
                name, end = wire.read_name(data, off)
            except wire.WireError:
                with contextlib.suppress(wire.WireError):
                    wire.skip_name(data, off)
                continue
            assert off < end <= len(data)
            assert name.endswith(b"\x00") and len(name) <= 255, (len(name), name)
            assert name == name.lower()
            i = 0
            for _ in range(256):  # the name is a sequence of labels ending at the root
                if name[i] == 0:
                    break
                assert name[i] <= 63
                i += name[i] + 1
            assert i == len(name) - 1
            wire.wire_name_to_text(name)
            assert wire.skip_name(data, off) == end


def test_names_longer_than_255_octets_are_rejected_everywhere() -> None:
    """RFC 1035 3.1: a name is at most 255 octets, length octets and the root included.
    parse_query enforces it; read_name (upstream answers) must too: labels of 63, 63, 63
    and 62 octets make a 256-octet name."""
    name = b"".join(bytes([n]) + c * n for n, c in ((63, b"a"), (63, b"b"), (63, b"c"),
                                                      (62, b"d"))) + b"\x00"
    assert len(name) == 256
    query = HDR.pack(1, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)
    with pytest.raises(wire.WireError):
        wire.parse_query(query)
    answer = HDR.pack(1, 0x8180, 1, 1, 0, 0) + name + struct.pack("!HH", 1, 1) + \
        b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + b"\xc0\x00\x02\x01"
    with pytest.raises(wire.WireError):
        wire.read_name(answer, 12)
    with pytest.raises(wire.WireError):
        wire.parse_message(answer)


# --- an App in-process ------------------------------------------------------------------


class Responder:
    """What the pipeline sends to one client (the Responder contract)."""

    def __init__(self, transport: str = "udp") -> None:
        self.transport = transport
        self.sent: list[bytes] = []
        self.dropped = 0

    def send(self, data: bytes, addr: Any) -> None:
        self.sent.append(data)

    def done_without_answer(self) -> None:
        self.dropped += 1


class RecordingTransport:
    """asyncio's transport interface (TCP and UDP), recording what is written."""

    def __init__(self, peer: Any = ("127.0.0.1", 40000)) -> None:
        self.peer = peer
        self.closed = False
        self.written = bytearray()
        self.datagrams: list[bytes] = []
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        self.written += data

    def sendto(self, data: bytes, addr: Any) -> None:
        self.datagrams.append(data)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return 0


class Listener(Responder):
    """A UdpListener stand-in for the fast path: ``_t`` is the transport it sends with."""

    def __init__(self) -> None:
        super().__init__("udp")
        self._t = RecordingTransport()


#: Clients: exempt loopback, a rate-limited private address, one the ACL refuses, IPv6.
PEERS = [("127.0.0.1", 40000), ("10.1.2.3", 5353), ("192.0.2.99", 1234),
         ("::1", 40001, 0, 0), ("fd00::7", 53, 0, 0), ("fe80::1%lo", 9, 0, 1)]

POLICY = {
    "server": {"max_in_flight": 0},  # every cache miss is shed at once: no upstream I/O
    "upstream": {"servers": ["127.0.0.1:9"]},
    "ratelimit": {"rate": 1e9, "burst": 1e9},
    "policy": {"source": [
        {"name": "nx", "names": ["nx.bad.test"], "action": "nxdomain"},
        {"name": "drop", "names": ["drop.bad.test"], "action": "drop"},
        {"name": "tcp", "names": ["tcp.bad.test"], "action": "tcp-only"},
        {"name": "nodata", "names": ["nodata.bad.test"], "action": "nodata",
         "category": "phishing"},
    ]},
}


class World:
    """One App (cache, policy, pipeline, fast path) on one event loop, for all examples."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        cfg = config_mod.load(None, POLICY)
        self.app = self.loop.run_until_complete(self._make(cfg))
        policy, report = build_policy(cfg.policy, 1)
        assert report.rules >= 7, report
        self.app.holder.swap(policy)
        self.p = self.app.pipeline
        # prime the cache: www.example.test A (with AD) and AAAA in every DO/CD variant
        now = time.monotonic()
        for rdtype, text in (("A", "192.0.2.10"), ("AAAA", "2001:db8::10")):
            data = _response("www.example.test", rdtype, ("www.example.test.", 86400, rdtype,
                                                          text), ad=rdtype == "A")
            msg = wire.parse_message(data)
            base = wire.make_question("www.example.test", dns.rdatatype.from_text(rdtype))
            for suffix in (b"\x00", b"\x01", b"\x02", b"\x03"):
                assert self.app.cache.store(base + suffix, msg, data, now) is not None
        # teach the pipeline (and through it the fast path) every client and the blocked
        # names' answers
        for peer in PEERS:
            for q in QUERY_SEEDS[:12]:
                self.run(lambda q=q, peer=peer: self.p.handle(q, peer, Responder()))
                self.run(lambda q=q, peer=peer: self.p.handle(q, peer, Listener()))

    @staticmethod
    async def _make(cfg: Any) -> App:
        return App(cfg)

    def run(self, fn: Any) -> Any:
        async def call() -> Any:
            return fn()
        return self.loop.run_until_complete(call())

    def cancel_forwards(self) -> None:
        """Cancel upstream tasks (there is no upstream): only a tcp-only name asked over
        TCP is forwarded despite max_in_flight = 0 (see test_limits.py::
        test_in_flight_cap_also_bounds_tcp_only_names_asked_over_tcp)."""
        tasks = list(self.p.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def tcp_only_name(data: bytes) -> bool:
    """Whether ``data`` parses as a query for the tcp-only rule's names."""
    try:
        q = wire.parse_query(data)
    except wire.WireError:
        return False
    return q.qname == "tcp.bad.test" or q.qname.endswith(".tcp.bad.test")


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    w = World()
    yield w
    w.loop.close()


def check_answer(query: bytes, answer: bytes, transport: str) -> dns.message.Message:
    """An answer moat sent to ``query``: a well-formed response with its ID."""
    assert len(answer) >= 12
    qid, flags = struct.unpack_from("!HH", answer)
    assert flags & wire.QR
    if len(query) >= 2:
        assert qid == struct.unpack_from("!H", query)[0]
    msg = dns.message.from_wire(answer)
    assert msg.rcode() in (dns.rcode.NOERROR, dns.rcode.FORMERR, dns.rcode.NOTIMP,
                           dns.rcode.REFUSED, dns.rcode.NXDOMAIN, dns.rcode.BADVERS), msg
    if transport == "udp":
        try:
            limit = wire.parse_query(query).payload
        except wire.WireError:
            limit = 512
        assert len(answer) <= limit, (len(answer), limit)
    return msg


def handle_one(world: World, data: bytes, peer: Any, transport: str = "udp") -> Responder:
    p = world.p
    r = Responder(transport)
    malformed = sum(world.app.stats.malformed.values())
    errors = dict(world.app.stats.errors)
    try:
        wire.parse_query(data)
        bad = False
    except wire.WireError:
        bad = True
    pending = p.pending
    try:
        world.run(lambda: p.handle(data, peer, r))
    finally:
        forwarded = p.pending - pending
        world.cancel_forwards()
    if forwarded:
        assert transport == "tcp" and tcp_only_name(data) and forwarded == 1, data
        assert not r.sent and not r.dropped
        return r
    assert len(r.sent) + r.dropped == 1, (r.sent, r.dropped)  # exactly one outcome
    assert dict(world.app.stats.errors) == errors, world.app.stats.errors  # no internal error
    assert sum(world.app.stats.malformed.values()) == malformed + bad  # counted
    for answer in r.sent:
        check_answer(data, answer, transport)
    return r


@given(packets, st.sampled_from(PEERS), st.sampled_from(["udp", "tcp"]))
@SETTINGS
def test_pipeline_answers_or_drops_every_datagram(world: World, data: bytes, peer: Any,
                                                  transport: str) -> None:
    with time_limit():
        handle_one(world, data, peer, transport)


@given(st.lists(st.one_of(mutated(QUERY_SEEDS), st.binary(max_size=80)), max_size=8),
       st.lists(st.integers(0, 2000), max_size=12), st.sampled_from(PEERS),
       st.binary(max_size=3))
@SETTINGS
def test_tcp_framer_with_random_chunking_and_the_real_pipeline(
        world: World, frames: list[bytes], cuts: list[int], peer: Any, tail: bytes) -> None:
    """Frames of mutated queries (and empty ones) split at random points: the framer
    hands the pipeline exactly the non-empty frames, each is answered once (framed), and
    an unfinished frame at the end stays buffered."""
    stream = b"".join(struct.pack("!H", len(f)) + f for f in frames)
    # an unfinished frame: a length (maybe just one byte of it) and less than it promised
    partial = struct.pack("!H", 200)[:len(tail)] + tail[2:] if tail else b""
    stream += partial
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    handed: list[bytes] = []
    state = server.TcpState(server.TcpLimits())
    conn = server.TcpConnection(world.p, state)
    t = RecordingTransport(peer)
    real_handle = world.p.handle

    dropped = [0]

    def spy(data: bytes, addr: Any, responder: Any, decision: Any = None) -> None:
        handed.append(data)
        before = conn.outstanding
        real_handle(data, addr, responder)
        if conn.outstanding == before - 1 and len(t.written) == written[0]:
            dropped[0] += 1
        written[0] = len(t.written)

    written = [0]

    errors = dict(world.app.stats.errors)
    pending = world.p.pending

    def feed() -> None:
        conn.connection_made(t)  # type: ignore[arg-type]
        for a, b in zip(points, points[1:], strict=False):
            conn.data_received(stream[a:b])

    with time_limit(), mock.patch.object(world.p, "handle", spy):
        try:
            world.run(feed)
        finally:
            forwarded = world.p.pending - pending
            world.cancel_forwards()
            conn.connection_lost(None)
    assert handed == [f for f in frames if f]
    # every frame answered or dropped, synchronously (but tcp-only names from a client
    # the ACL admits: forwarded)
    assert conn.outstanding == forwarded <= sum(map(tcp_only_name, handed))
    assert bytes(conn.buffer) == partial
    assert dict(world.app.stats.errors) == errors
    out = bytes(t.written)
    answers = []
    for _ in range(len(handed) + 1):
        if not out:
            break
        (length,) = struct.unpack_from("!H", out)
        answers.append(out[2:2 + length])
        assert len(out) >= 2 + length
        out = out[2 + length:]
    assert not out and len(answers) == len(handed) - forwarded - dropped[0]
    for answer in answers:
        qid = struct.unpack_from("!H", answer)[0]
        sources = [f for f in handed if len(f) >= 2 and struct.unpack_from("!H", f)[0] == qid]
        assert sources, answer
        msg = dns.message.from_wire(answer)
        assert msg.flags & dns.flags.QR


@given(st.lists(st.binary(max_size=300), max_size=6), st.lists(st.integers(0, 2000),
                                                                max_size=12))
@SETTINGS
def test_tcp_framer_hands_over_exactly_the_frames(frames: list[bytes], cuts: list[int]
                                                  ) -> None:
    class Recording:
        def __init__(self) -> None:
            self.messages: list[bytes] = []

        def handle(self, data: bytes, addr: Any, responder: Any) -> None:
            self.messages.append(data)
            responder.done_without_answer()

    async def body() -> None:
        stream = b"".join(struct.pack("!H", len(f)) + f for f in frames)
        points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
        rec = Recording()
        conn = server.TcpConnection(rec, server.TcpState(server.TcpLimits()))  # type: ignore[arg-type]
        t = RecordingTransport()
        conn.connection_made(t)  # type: ignore[arg-type]
        for a, b in zip(points, points[1:], strict=False):
            conn.data_received(stream[a:b])
        assert rec.messages == [f for f in frames if f]
        assert not conn.buffer and conn.outstanding == 0 and not t.closed
        conn.connection_lost(None)

    with time_limit():
        asyncio.run(body())


# --- the UDP fast path ------------------------------------------------------------------

FAST_SEEDS = QUERY_SEEDS[:9]


def test_fast_path_answers_seeds_at_all(world: World) -> None:
    """The equivalence test above means something only if the fast path does answer:
    cached names and blocked names seen before, from known clients."""
    for data in FAST_SEEDS:
        if b"\x00\x0f\x00\x01" in data:  # MX: not in the cache
            continue
        listener = Listener()
        assert world.run(lambda d=data, li=listener: world.p.fast.answer(
            d, PEERS[0], li)), data
        assert len(listener._t.datagrams) == 1


@pytest.mark.parametrize("options", [
    struct.pack("!HH", 10, 40) + b"abcd",  # a cookie option claiming 40 bytes, holding 4
    struct.pack("!HH", 10, 8) + b"12345678" + b"\x00\x0c",  # 2 stray bytes after it
], ids=["option-overruns-opt", "stray-bytes-in-opt"])
def test_fast_path_leaves_malformed_edns_options_to_the_pipeline(world: World,
                                                                 options: bytes) -> None:
    """A cached name asked with a malformed OPT record (options that do not tile its
    RDATA): parse_query says FORMERR ("opt"), so must the fast path (by declining)."""
    data = HDR.pack(0x4242, 0x0100, 1, 0, 0, 1) + _question("www.example.test") + \
        _opt(options=options)
    with pytest.raises(wire.WireError) as info:
        wire.parse_query(data)
    assert info.value.kind == "opt"
    full = Responder()
    world.run(lambda: world.p.handle(data, PEERS[0], full))
    assert [dns.message.from_wire(a).rcode() for a in full.sent] == [dns.rcode.FORMERR]
    listener = Listener()
    handled = world.run(lambda: world.p.fast.answer(data, PEERS[0], listener))
    assert not (handled and listener._t.datagrams), (
        "the fast path answered a malformed query from the cache: "
        f"{dns.message.from_wire(listener._t.datagrams[0]).rcode() if handled else ''}")


@given(st.one_of(mutated(FAST_SEEDS, max_ops=3), st.sampled_from(FAST_SEEDS)),
       st.sampled_from(PEERS[:2] + PEERS[3:5]))
@settings(max_examples=600, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_fast_path_answers_exactly_like_the_pipeline(world: World, data: bytes,
                                                     peer: Any) -> None:
    """Whenever the fast path answers a datagram, the full pipeline would have sent the
    same bytes. The clock is frozen so both see the same TTLs."""
    frozen = time.monotonic()
    clock = types.SimpleNamespace(monotonic=lambda: frozen, perf_counter=time.perf_counter)
    listener = Listener()
    with time_limit(), mock.patch.object(fastpath, "monotonic", clock.monotonic), \
            mock.patch.object(pipeline, "time", clock):
        handled = world.run(lambda: world.p.fast.answer(data, peer, listener))
        assert handled is True or handled is False
        if not handled:
            return
        if not listener._t.datagrams:  # handed to the pipeline (a rate-limit decision)
            assert len(listener.sent) + listener.dropped == 1
            return
        (fast,) = listener._t.datagrams
        full = Responder()
        world.run(lambda: world.p.handle(data, peer, full))
    assert full.sent == [fast], (data, fast, full.sent)
    check_answer(data, fast, "udp")
