"""Unit tests for resolver/wire.py (sans-IO parsing and building) and the TCP framing of
resolver/server.py. No sockets: packets are built by hand or with dnspython and parsed
back with dnspython. Only the TCP tests use a stand-in transport object (asyncio's
transport interface), because framing is about the bytes the transport hands over."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver import server, synth, wire

HDR = struct.Struct("!HHHHHH")


def make_query(name: str = "www.example.test", rdtype: str = "A", qid: int = 0x1234,
               **kw: Any) -> bytes:
    m = dns.message.make_query(name, rdtype, **kw)
    m.id = qid
    return m.to_wire()


def question(name: str, qtype: int = 1, qclass: int = 1) -> bytes:
    return wire.text_to_wire_name(name) + struct.pack("!HH", qtype, qclass)


def raw(qid: int = 7, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0,
        body: bytes = b"") -> bytes:
    return HDR.pack(qid, flags, qd, an, ns, ar) + body


OPT0 = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)  # a plain EDNS(0) OPT, no options


def kind_of(data: bytes) -> tuple[str, Any]:
    with pytest.raises(wire.WireError) as info:
        wire.parse_query(data)
    return info.value.kind, getattr(info.value, "query", None)


# --- parse_query: the good cases ----------------------------------------------------


def test_parse_query_reads_header_question_and_key() -> None:
    data = make_query("WwW.Example.TEST", "AAAA", qid=0xBEEF, use_edns=False)
    q = wire.parse_query(data)
    assert q.id == 0xBEEF
    assert q.flags & wire.RD and not q.cd
    assert q.qtype == 28 and q.qclass == 1
    assert q.qname == "www.example.test"  # lower case, no trailing dot
    assert q.question == data[12:]  # the client's case is kept for echoing
    assert q.qname_wire == b"\x03www\x07example\x04test\x00"
    assert q.key == b"\x03www\x07example\x04test\x00\x00\x1c\x00\x01\x00"
    assert not q.edns and q.payload == 512 and not q.do and not q.ecs


def test_parse_query_edns_payload_do_cd_and_key_suffix() -> None:
    base = b"\x03www\x07example\x04test\x00\x00\x01\x00\x01"
    plain = wire.parse_query(make_query(use_edns=0, payload=4096))
    assert plain.edns and plain.payload == 1232  # never more than moat's own limit
    assert plain.key == base + b"\x00"
    small = wire.parse_query(make_query(use_edns=0, payload=100))
    assert small.payload == 512  # RFC 6891: values below 512 are treated as 512
    mid = wire.parse_query(make_query(use_edns=0, payload=700))
    assert mid.payload == 700
    do = wire.parse_query(make_query(want_dnssec=True))
    assert do.do and do.key == base + b"\x01"
    m = dns.message.make_query("www.example.test", "A", want_dnssec=True)
    m.flags |= dns.flags.CD
    cd = wire.parse_query(m.to_wire())
    assert cd.cd and cd.key == base + b"\x03"
    m = dns.message.make_query("www.example.test", "A", use_edns=False)
    m.flags |= dns.flags.CD
    assert wire.parse_query(m.to_wire()).key == base + b"\x02"


def test_parse_query_notes_ecs() -> None:
    ecs = dns.edns.ECSOption("192.0.2.0", 24)
    q = wire.parse_query(make_query(use_edns=0, options=[ecs]))
    assert q.ecs and q.edns
    assert not wire.parse_query(make_query(use_edns=0)).ecs


def test_parse_query_finds_opt_after_other_additional_records() -> None:
    # OPT is not the first additional record: the slow path must still find it.
    rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + b"\xc0\x00\x02\x01"
    data = raw(ar=2, body=question("www.example.test") + rr +
               b"\x00" + struct.pack("!HHIH", 41, 900, 0x8000, 0))
    q = wire.parse_query(data)
    assert q.edns and q.do and q.payload == 900


# --- parse_query: every WireError kind ----------------------------------------------


def test_short_packet() -> None:
    for n in range(12):
        assert kind_of(b"\x12" * n)[0] == "short"


def test_response_bit() -> None:
    assert kind_of(raw(flags=0x8100, body=question("a.test")))[0] == "response"


def test_opcode_other_than_query() -> None:
    kind, q = kind_of(raw(flags=(2 << 11) | 0x0100, body=question("a.test")))  # STATUS
    assert kind == "opcode" and q is not None and q.id == 7


@pytest.mark.parametrize("qd", [0, 2])
def test_qdcount_not_one(qd: int) -> None:
    body = question("a.test") * qd
    kind, q = kind_of(raw(qd=qd, body=body))
    assert kind == "qdcount" and q is not None


@pytest.mark.parametrize("body,kind", [
    (b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", "name"),  # label of 64
    (b"\xc0\x0c\x00\x01\x00\x01", "name"),  # compression in the question
    (b"\x03www\x07exam", "truncated"),  # name cut short
    (b"\x03www\x00\x00\x01", "truncated"),  # type/class cut short
    (b"", "truncated"),
    ((b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01", "name"),  # 257 bytes of name
])
def test_bad_question(body: bytes, kind: str) -> None:
    assert kind_of(raw(body=body))[0] == kind


_QS = question("www.example.test")


@pytest.mark.parametrize("data", [
    pytest.param(raw(ar=1, body=_QS + b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 10)),
                 id="rdata-past-end"),
    pytest.param(raw(ar=2, body=_QS + OPT0 + OPT0), id="two-opt-records"),
    pytest.param(raw(an=1, body=_QS + OPT0), id="opt-in-answer-section"),
    pytest.param(raw(ar=1, body=_QS + b"\x01x\x00" + OPT0[1:]), id="opt-owner-not-root"),
    pytest.param(raw(ar=1, body=_QS + b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 6) +
                     struct.pack("!HH", 10, 8) + b"ab"), id="option-past-rdata"),
])
def test_opt_problems(data: bytes) -> None:
    """RFC 6891 6.1.1: more than one OPT, or a malformed one, is FORMERR."""
    kind, q = kind_of(data)
    assert kind == "opt"
    assert q is not None  # the question was read: the FORMERR can echo it


def test_badvers_keeps_the_question() -> None:
    data = make_query(use_edns=1)
    kind, q = kind_of(data)
    assert kind == "badvers"
    assert q is not None and q.edns and q.edns_version == 1 and q.qend == len(data) - 11


# --- names --------------------------------------------------------------------------


def test_read_name_follows_compression() -> None:
    data = raw(body=b"\x07example\x04test\x00" + b"\x03WWW\xc0\x0c")
    name, end = wire.read_name(data, 12 + 14)
    assert name == b"\x03www\x07example\x04test\x00"  # lower case, uncompressed
    assert end == len(data)  # just after the pointer, not where the pointer led


@pytest.mark.parametrize("tail", [
    b"\xc0\x0c",  # points at itself
    b"\x01a\xc0\x0e",  # label then a pointer back to that label: a -> a -> a ...
])
def test_read_name_compression_loop_is_an_error(tail: bytes) -> None:
    data = raw(body=tail)
    with pytest.raises(wire.WireError) as info:
        wire.read_name(data, 12)
    assert info.value.kind == "name"


def test_read_name_pointer_out_of_range_and_bad_labels() -> None:
    for body, kind in [(b"\xc0\xff", "name"), (b"\x80x\x00", "name"), (b"\x40x\x00", "name"),
                       (b"\x05ab", "truncated"), (b"\xc0", "truncated"), (b"", "truncated")]:
        with pytest.raises(wire.WireError) as info:
            wire.read_name(raw(body=body), 12)
        assert info.value.kind == kind, body


def test_read_name_too_long_through_pointers() -> None:
    # 63-byte labels, each block pointing at the previous one: 4 labels = 257 bytes.
    label = b"\x3f" + b"a" * 63
    body = label + b"\x00"
    starts = [12]
    for _ in range(3):
        starts.append(12 + len(body))
        body += label + struct.pack("!H", 0xC000 | starts[-2])
    data = raw(body=body)
    assert len(wire.read_name(data, starts[2])[0]) == 3 * 64 + 1
    with pytest.raises(wire.WireError) as info:
        wire.read_name(data, starts[3])
    assert info.value.kind == "name"


@pytest.mark.parametrize("wire_name,text", [
    (b"\x00", ""),
    (b"\x03www\x07example\x04test\x00", "www.example.test"),
    (b"\x03a.b\x04test\x00", "a\\.b.test"),
    (b"\x03a b\x00", "a\\032b"),
    (b"\x03a\\b\x00", "a\\\\b"),
    (b"\x02\x00\xff\x00", "\\000\\255"),
    (b"\x02a\x7f\x00", "a\\127"),
])
def test_wire_name_to_text_escapes(wire_name: bytes, text: str) -> None:
    assert wire.wire_name_to_text(wire_name) == text


labels = st.lists(st.binary(min_size=1, max_size=20), min_size=0, max_size=6)


@given(labels)
@settings(max_examples=300, deadline=None)
def test_wire_name_to_text_round_trips_through_dnspython(parts: list[bytes]) -> None:
    name_wire = b"".join(bytes([len(p)]) + p for p in parts) + b"\x00"
    text = wire.wire_name_to_text(name_wire)
    back = dns.name.from_text(text + "." if text else ".").to_wire()
    assert back == name_wire  # the text form names exactly the same labels


def test_text_to_wire_name() -> None:
    assert wire.text_to_wire_name("www.example.test.") == b"\x03www\x07example\x04test\x00"
    assert wire.text_to_wire_name("") == b"\x00"
    for bad in ("a..b", "x" * 64 + ".test", ".".join(["a" * 63] * 5)):
        with pytest.raises(ValueError):
            wire.text_to_wire_name(bad)


# --- building answers ---------------------------------------------------------------


def test_error_response_echoes_id_question_and_edns() -> None:
    data = make_query("WWW.example.test", "MX", qid=4242, use_edns=0, want_dnssec=True)
    q = wire.parse_query(data)
    r = dns.message.from_wire(wire.error_response(data, wire.SERVFAIL, q))
    assert r.id == 4242 and r.rcode() == dns.rcode.SERVFAIL
    assert r.flags & dns.flags.QR and r.flags & dns.flags.RA and r.flags & dns.flags.RD
    assert str(r.question[0].name) == "WWW.example.test."  # the client's spelling
    assert r.question[0].rdtype == dns.rdatatype.MX
    assert r.edns == 0 and r.payload == 1232 and r.ednsflags & dns.flags.DO
    assert not r.answer and not r.authority


def test_error_response_without_a_question() -> None:
    data = raw(qid=99, qd=0)
    r = dns.message.from_wire(wire.error_response(data, wire.FORMERR, None))
    assert r.id == 99 and r.rcode() == dns.rcode.FORMERR and not r.question and r.edns < 0


def test_error_response_badvers_in_opt() -> None:
    data = make_query(use_edns=1, qid=5)
    with pytest.raises(wire.WireError) as info:
        wire.parse_query(data)
    r = dns.message.from_wire(wire.error_response(data, wire.BADVERS, info.value.query))
    assert r.rcode() == dns.rcode.BADVERS and r.edns == 0 and r.id == 5


def test_truncated_response_shape() -> None:
    data = make_query("Big.Example.Test", "TXT", qid=77, use_edns=0, want_dnssec=True)
    q = wire.parse_query(data)
    r = dns.message.from_wire(wire.truncated_response(q))
    assert r.id == 77 and r.flags & dns.flags.TC and r.rcode() == dns.rcode.NOERROR
    assert str(r.question[0].name) == "Big.Example.Test." and r.question[0].rdtype == 16
    assert not r.answer and not r.authority
    assert r.edns == 0 and r.ednsflags & dns.flags.DO
    plain = wire.parse_query(make_query(use_edns=False))
    assert dns.message.from_wire(wire.truncated_response(plain)).edns < 0


def test_build_answer_shape() -> None:
    data = make_query("sink.example.test", "A", qid=3, use_edns=0)
    q = wire.parse_query(data)
    soa = (wire.text_to_wire_name("rpz.moat"), wire.TYPE_SOA, 60,
           wire.text_to_wire_name("localhost") + wire.text_to_wire_name("nobody.invalid") +
           struct.pack("!IIIII", 1, 2, 3, 4, 60))
    ede = wire.ede_option(wire.EDE_BLOCKED, "moat: test")
    out = wire.build_answer(q, wire.NOERROR, [(1, 42, b"\x00\x00\x00\x00")], [soa], ede=ede)
    r = dns.message.from_wire(out)
    assert r.id == 3
    (rrset,) = r.answer
    assert str(rrset.name) == "sink.example.test." and rrset.ttl == 42
    assert rrset[0].address == "0.0.0.0"
    assert r.authority[0].rdtype == dns.rdatatype.SOA and r.authority[0][0].minimum == 60
    (opt,) = r.options
    assert opt.otype == dns.edns.OptionType.EDE and opt.code == 15 and opt.text == "moat: test"


def test_any_answer_is_rfc8482_hinfo() -> None:
    q = wire.parse_query(make_query("x.test", "ANY", qid=11, use_edns=False))
    r = dns.message.from_wire(synth.any_answer(q))
    (rrset,) = r.answer
    assert rrset.rdtype == dns.rdatatype.HINFO and rrset[0].cpu == b"RFC8482"
    assert r.rcode() == dns.rcode.NOERROR and r.id == 11


def test_build_query_flags_and_edns() -> None:
    qs = question("www.example.test", 28)
    r = dns.message.from_wire(wire.build_query(0x4321, qs, cd=True, do=True))
    assert r.id == 0x4321 and r.flags & dns.flags.RD and r.flags & dns.flags.CD
    assert r.edns == 0 and r.payload == 1232 and r.ednsflags & dns.flags.DO
    assert str(r.question[0].name) == "www.example.test." and r.question[0].rdtype == 28
    plain = dns.message.from_wire(wire.build_query(1, qs, cd=False, do=False))
    assert not plain.flags & dns.flags.CD and not plain.ednsflags & dns.flags.DO


def test_parse_message_records_and_ttl_offsets() -> None:
    q = dns.message.make_query("alias.example.test", "A", use_edns=0)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("alias.example.test.", 600, "IN", "CNAME",
                                        "www.example.test."))
    r.answer.append(dns.rrset.from_text("www.example.test.", 300, "IN", "A", "192.0.2.10"))
    r.authority.append(dns.rrset.from_text("example.test.", 3600, "IN", "NS",
                                           "ns1.example.test."))
    data = r.to_wire()
    msg = wire.parse_message(data)
    assert msg.qname == b"\x05alias\x07example\x04test\x00" and msg.qtype == 1
    assert [(x.section, x.rtype, x.ttl) for x in msg.records] == [(1, 5, 600), (1, 1, 300),
                                                                  (2, 2, 3600)]
    for rec in msg.records:
        assert struct.unpack_from("!I", data, rec.ttl_offset)[0] == rec.ttl
    assert msg.records[0].target == b"\x03www\x07example\x04test\x00"
    assert msg.records[1].address == "192.0.2.10"
    assert msg.opt is not None and msg.counts == (1, 2, 1, 1)


def test_parse_message_extended_rcode_and_bad_rdata() -> None:
    q = dns.message.make_query("a.test", "A", use_edns=0)
    r = dns.message.make_response(q)
    r.set_rcode(dns.rcode.BADVERS)
    assert wire.parse_message(r.to_wire()).rcode == 16
    bad = raw(flags=0x8180, an=1, body=question("a.test") + b"\xc0\x0c" +
              struct.pack("!HHIH", 1, 1, 60, 5) + b"\x01\x02\x03\x04\x05")
    with pytest.raises(wire.WireError) as info:
        wire.parse_message(bad)
    assert info.value.kind == "rdata"


# --- TCP framing (resolver/server.py) -------------------------------------------------


class StubTransport:
    """asyncio.Transport's interface, recording what the connection does with it."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        self.peer = peer
        self.closed = False
        self.written = bytearray()
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return 0


class RecordingPipeline:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def handle(self, data: bytes, addr: Any, responder: Any) -> None:
        self.messages.append(data)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(server, "time", c)  # server.py reads time.monotonic() only
    return c


def framed(msg: bytes) -> bytes:
    return struct.pack("!H", len(msg)) + msg


def three_messages() -> list[bytes]:
    pad = dns.edns.GenericOption(dns.edns.OptionType.PADDING, b"\x00" * 300)
    return [make_query("a.example.test", qid=1),
            make_query("b.example.test", "AAAA", qid=2, use_edns=0, options=[pad]),  # > 255
            make_query("c.example.test", "MX", qid=3)]


def connect(limits: server.TcpLimits | None = None, state: server.TcpState | None = None,
            peer: tuple[str, int] = ("127.0.0.1", 40000)
            ) -> tuple[server.TcpConnection, StubTransport, RecordingPipeline]:
    pipeline = RecordingPipeline()
    st_ = state or server.TcpState(limits or server.TcpLimits())
    conn = server.TcpConnection(pipeline, st_)  # type: ignore[arg-type]
    t = StubTransport(peer)
    conn.connection_made(t)  # type: ignore[arg-type]
    return conn, t, pipeline


def tick(conn: server.TcpConnection) -> None:
    """Run the connection's timer now (the real one is cancelled and re-armed)."""
    if conn._timer is not None:
        conn._timer.cancel()
    conn._tick()


def test_tcp_bytes_one_at_a_time() -> None:
    async def body() -> None:
        msgs = three_messages()
        assert len(msgs[1]) > 255  # the length's high byte matters
        stream = b"".join(framed(m) for m in msgs)
        ends = []
        pos = 0
        for m in msgs:
            pos += 2 + len(m)
            ends.append(pos)
        conn, t, pipeline = connect()
        for i in range(len(stream)):
            conn.data_received(stream[i:i + 1])
            complete = sum(1 for e in ends if e <= i + 1)
            assert len(pipeline.messages) == complete, f"after {i + 1} bytes"
        assert pipeline.messages == msgs
        assert conn.outstanding == 3 and not conn.buffer and not t.closed

    asyncio.run(body())


@given(st.lists(st.integers(min_value=0, max_value=800), max_size=12))
@settings(max_examples=100, deadline=None)
def test_tcp_any_split_gives_the_same_messages(cuts: list[int]) -> None:
    async def body() -> None:
        msgs = three_messages()
        stream = b"".join(framed(m) for m in msgs) + framed(b"")  # a zero-length frame too
        points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
        conn, t, pipeline = connect()
        for a, b in zip(points, points[1:], strict=False):
            conn.data_received(stream[a:b])
        assert pipeline.messages == msgs  # the empty frame is skipped, not handed on
        assert conn.outstanding == 3

    asyncio.run(body())


def test_tcp_answers_are_length_framed() -> None:
    async def body() -> None:
        conn, t, _ = connect()
        conn.data_received(framed(make_query(qid=1)) + framed(make_query(qid=2)))
        conn.send(b"answer-two", None)
        conn.send(b"answer-one!", None)
        assert bytes(t.written) == framed(b"answer-two") + framed(b"answer-one!")
        assert conn.outstanding == 0

    asyncio.run(body())


def test_tcp_partial_message_times_out(clock: Clock) -> None:
    async def body() -> None:
        limits = server.TcpLimits(idle_timeout=100.0, read_timeout=5.0)
        conn, t, pipeline = connect(limits)
        msg = framed(make_query())
        conn.data_received(msg[:7])
        clock.now += 4.9
        tick(conn)
        assert not t.closed  # still within the read timeout
        clock.now += 0.2
        tick(conn)
        assert t.closed and pipeline.messages == []
        conn.connection_lost(None)

    asyncio.run(body())


def test_tcp_trickling_client_is_closed_at_the_read_timeout(clock: Clock) -> None:
    """One byte a second keeps the connection busy, but the message must still arrive
    within read_timeout of its first byte."""

    async def body() -> None:
        limits = server.TcpLimits(idle_timeout=100.0, read_timeout=5.0)
        conn, t, pipeline = connect(limits)
        msg = framed(make_query())
        for i in range(7):
            conn.data_received(msg[i:i + 1])
            clock.now += 1.0
            tick(conn)
            if t.closed:
                break
        assert t.closed and pipeline.messages == []

    asyncio.run(body())


def test_tcp_idle_timeout_waits_for_outstanding_answers(clock: Clock) -> None:
    async def body() -> None:
        limits = server.TcpLimits(idle_timeout=2.0, read_timeout=5.0)
        conn, t, pipeline = connect(limits)
        conn.data_received(framed(make_query()))
        clock.now += 10
        tick(conn)
        assert not t.closed  # an answer is still owed: not idle
        conn.send(b"answer", None)
        clock.now += 1.9
        tick(conn)
        assert not t.closed
        clock.now += 0.2
        tick(conn)
        assert t.closed

    asyncio.run(body())


def test_tcp_connection_cap(clock: Clock) -> None:
    async def body() -> None:
        state = server.TcpState(server.TcpLimits(max_connections=2, max_per_client=2))
        c1, t1, _ = connect(state=state)
        c2, t2, _ = connect(state=state, peer=("127.0.0.2", 1))
        c3, t3, p3 = connect(state=state, peer=("127.0.0.3", 1))
        assert not t1.closed and not t2.closed
        assert t3.closed and state.refused == 1  # closed at once
        c3.connection_lost(None)  # a refused connection must not free a slot
        c4, t4, _ = connect(state=state, peer=("127.0.0.4", 1))
        assert t4.closed and state.refused == 2
        c1.connection_lost(None)
        c5, t5, p5 = connect(state=state)
        assert not t5.closed  # served again once another closed
        c5.data_received(framed(make_query()))
        assert len(p5.messages) == 1

    asyncio.run(body())


def test_tcp_per_client_cap(clock: Clock) -> None:
    async def body() -> None:
        state = server.TcpState(server.TcpLimits(max_connections=10, max_per_client=1))
        _, t1, _ = connect(state=state)
        _, t2, _ = connect(state=state)
        _, t3, _ = connect(state=state, peer=("127.0.0.9", 2))
        assert not t1.closed and t2.closed and not t3.closed

    asyncio.run(body())


def test_tcp_pauses_reading_when_too_much_is_pending() -> None:
    async def body() -> None:
        conn, t, pipeline = connect(server.TcpLimits(max_pending_per_connection=4))
        conn.data_received(b"".join(framed(make_query(qid=i)) for i in range(4)))
        assert not t.reading and len(pipeline.messages) == 4
        for _ in range(3):
            conn.send(b"x", None)
        assert t.reading  # below half the cap: reading again

    asyncio.run(body())
