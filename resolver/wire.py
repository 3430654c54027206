"""DNS wire format, without I/O (a "sans-IO" core): bytes in, plain values out.

Two kinds of parsing live here, on purpose:

* :func:`parse_query` reads only what the hot path needs from a client's query: the
  header, the one question and the OPT record. It never builds RR objects.
* :func:`parse_message` reads a whole upstream answer once, when it first enters the
  cache: every RR's owner, type, TTL *offset* (so TTLs can be aged by patching bytes
  later), CNAME targets and A/AAAA addresses (for the answer-time policy checks).

Everything else builds answers from bytes: error answers, truncated answers, synthesised
answers for policy actions. Names on the wire are compared lower-cased (``bytes.lower``
folds ASCII only, which is exactly DNS case-insensitivity).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

# --- constants ----------------------------------------------------------------------

HEADER = struct.Struct("!HHHHHH")
U16 = struct.Struct("!H")
U32 = struct.Struct("!I")
RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
TYPE_CLASS = struct.Struct("!HH")

QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
AD = 0x0020
CD = 0x0010
OPCODE_MASK = 0x7800
RCODE_MASK = 0x000F
DO_BIT = 0x8000  # in the OPT TTL field

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
               5: "REFUSED", 16: "BADVERS"}

TYPE_A, TYPE_NS, TYPE_CNAME, TYPE_SOA, TYPE_PTR, TYPE_HINFO = 1, 2, 5, 6, 12, 13
TYPE_MX, TYPE_TXT, TYPE_AAAA, TYPE_SRV, TYPE_DNAME, TYPE_OPT = 15, 16, 28, 33, 39, 41
TYPE_DS, TYPE_RRSIG, TYPE_NSEC, TYPE_DNSKEY, TYPE_NSEC3 = 43, 46, 47, 48, 50
TYPE_SVCB, TYPE_HTTPS, TYPE_TSIG, TYPE_IXFR, TYPE_AXFR, TYPE_ANY = 64, 65, 250, 251, 252, 255
CLASS_IN = 1

TYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 13: "HINFO", 15: "MX",
              16: "TXT", 28: "AAAA", 33: "SRV", 39: "DNAME", 41: "OPT", 43: "DS",
              46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 50: "NSEC3", 64: "SVCB", 65: "HTTPS",
              250: "TSIG", 251: "IXFR", 252: "AXFR", 255: "ANY"}
TYPE_CODES = {v: k for k, v in TYPE_NAMES.items()}

EDNS_ECS = 8
EDNS_EDE = 15
EDE_BLOCKED = 15
EDE_FILTERED = 17
EDE_STALE = 3
EDE_NOT_READY = 14

#: What moat advertises and accepts over UDP (the DNS Flag Day 2020 figure).
UDP_PAYLOAD = 1232
#: A client without EDNS gets at most this much over UDP (RFC 1035).
CLASSIC_UDP_LIMIT = 512
MAX_POINTER_JUMPS = 64


class WireError(ValueError):
    """A message that cannot be read. ``kind`` is a bounded word used as a metric label."""

    def __init__(self, kind: str, message: str = "") -> None:
        super().__init__(message or kind)
        self.kind = kind


# --- queries ------------------------------------------------------------------------


class Query:
    """What the resolver knows about one client query. Built once per datagram.

    ``key`` is the cache key: the question as sent, lower-cased (name, type, class) plus a
    byte for the DO and CD bits, so DNSSEC-aware and CD clients never share answers with
    the others.
    """

    __slots__ = ("data", "id", "flags", "qend", "qtype", "qclass", "qname_wire", "key",
                 "edns", "payload", "do", "edns_version", "ecs", "_qname")

    data: bytes
    id: int
    flags: int
    qend: int
    qtype: int
    qclass: int
    qname_wire: bytes
    key: bytes
    edns: bool
    payload: int  # the most a UDP answer to this client may hold
    do: bool
    edns_version: int
    ecs: bool
    _qname: str | None

    @property
    def qname(self) -> str:
        """The name as text: lower case, no trailing dot ("" for the root)."""
        q = self._qname
        if q is None:
            q = self._qname = wire_name_to_text(self.qname_wire)
        return q

    @property
    def question(self) -> bytes:
        """The question section as the client sent it (case preserved)."""
        return self.data[12:self.qend]

    @property
    def cd(self) -> bool:
        return bool(self.flags & CD)

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11


def parse_query(data: bytes) -> Query:
    """Read header, question and OPT of a client query.

    Raises WireError with kind:
      ``short`` (no full header: drop), ``response`` (QR=1: drop),
      ``opcode`` (not QUERY: NOTIMP), ``qdcount`` / ``name`` / ``truncated`` / ``opt``
      (FORMERR), ``badvers`` (EDNS version > 0: BADVERS).
    The Query is still attached to the error as ``.query`` where the question could be read,
    so the error answer can echo it.
    """
    n = len(data)
    if n < 12:
        raise WireError("short")
    qid, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    if flags & QR:
        raise WireError("response")
    q = Query()
    q.data = data
    q.id = qid
    q.flags = flags
    q._qname = None
    q.edns = False
    q.payload = CLASSIC_UDP_LIMIT
    q.do = False
    q.edns_version = 0
    q.ecs = False
    q.qend = 12
    q.qtype = 0
    q.qclass = 0
    q.qname_wire = b""
    q.key = b""
    if flags & OPCODE_MASK:
        err = WireError("opcode")
        err.query = q  # type: ignore[attr-defined]
        raise err
    if qdcount != 1:
        err = WireError("qdcount")
        err.query = q  # type: ignore[attr-defined]
        raise err
    # Walk the labels of the question name. No compression is allowed in a question.
    i = 12
    try:
        length = data[i]
        while length:
            if length > 63:
                raise WireError("name", "label too long or compressed in question")
            i += length + 1
            length = data[i]
    except IndexError:
        raise WireError("truncated") from None
    name_end = i + 1
    qend = name_end + 4
    if qend > n or name_end - 12 > 255:
        raise WireError("truncated" if qend > n else "name")
    q.qend = qend
    q.qtype, q.qclass = TYPE_CLASS.unpack_from(data, name_end)
    lowered = data[12:qend].lower()
    q.qname_wire = lowered[:-4]
    if arcount and not ancount and not nscount and qend + 11 <= n and data[qend] == 0 \
            and data[qend + 1] == 0 and data[qend + 2] == TYPE_OPT:
        # The usual case: the OPT record directly after the question.
        end = _read_opt(q, data, qend, arcount)
        if arcount > 1:  # more additional records: none of them may be a second OPT
            _find_opt(q, data, end, 0, 0, arcount - 1)
    elif arcount or ancount or nscount:
        _find_opt(q, data, qend, ancount, nscount, arcount)
    q.key = lowered + (b"\x01" if q.do else b"\x00") if not (flags & CD) else \
        lowered + (b"\x03" if q.do else b"\x02")
    return q


def _read_opt(q: Query, data: bytes, off: int, arcount: int) -> int:
    """Read the OPT RR at ``off`` (its owner must be the root). Returns the end offset."""
    n = len(data)
    if off + 11 > n:
        raise _formerr(q, "opt")
    if data[off] != 0:
        raise _formerr(q, "opt")
    rtype, payload, ttl, rdlen = RR_FIXED.unpack_from(data, off + 1)
    end = off + 11 + rdlen
    if end > n:
        raise _formerr(q, "opt")
    if q.edns:  # a second OPT record
        raise _formerr(q, "opt")
    q.edns = True
    q.payload = min(max(payload, CLASSIC_UDP_LIMIT), UDP_PAYLOAD)
    q.do = bool(ttl & DO_BIT)
    q.edns_version = (ttl >> 16) & 0xFF
    # Options: note ECS (it is never forwarded), skip the rest.
    p = off + 11
    while p + 4 <= end:
        code, olen = TYPE_CLASS.unpack_from(data, p)
        if code == EDNS_ECS:
            q.ecs = True
        p += 4 + olen
    if p != end:
        raise _formerr(q, "opt")
    if q.edns_version:
        err = WireError("badvers")
        err.query = q  # type: ignore[attr-defined]
        raise err
    return end


def _find_opt(q: Query, data: bytes, off: int, ancount: int, nscount: int, arcount: int) -> None:
    """Slow path: skip any answer/authority RRs and look for OPT in the additional section."""
    n = len(data)
    for section, count in ((1, ancount), (2, nscount), (3, arcount)):
        for _ in range(count):
            start = off
            try:
                off = skip_name(data, off)
            except WireError:
                raise _formerr(q, "name") from None
            if off + 10 > n:
                raise _formerr(q, "truncated")
            rtype, _cls, _ttl, rdlen = RR_FIXED.unpack_from(data, off)
            if rtype == TYPE_OPT:
                if section != 3:
                    raise _formerr(q, "opt")
                _read_opt(q, data, start, arcount)
            off += 10 + rdlen
            if off > n:
                raise _formerr(q, "truncated")


def _formerr(q: Query, kind: str) -> WireError:
    err = WireError(kind)
    err.query = q  # type: ignore[attr-defined]
    return err


# --- names --------------------------------------------------------------------------


def skip_name(data: bytes, off: int) -> int:
    """Offset just after the (possibly compressed) name at ``off``."""
    n = len(data)
    while True:
        if off >= n:
            raise WireError("truncated")
        length = data[off]
        if length == 0:
            return off + 1
        if length & 0xC0 == 0xC0:
            if off + 2 > n:
                raise WireError("truncated")
            return off + 2
        if length & 0xC0:
            raise WireError("name", "bad label type")
        off += length + 1


def read_name(data: bytes, off: int) -> tuple[bytes, int]:
    """Read a possibly compressed name. Returns (uncompressed lower-case wire name, next offset)."""
    n = len(data)
    parts: list[bytes] = []
    end = -1
    jumps = 0
    total = 0
    while True:
        if off >= n:
            raise WireError("truncated")
        length = data[off]
        if length == 0:
            if end < 0:
                end = off + 1
            if total + 1 > 255:  # RFC 1035 3.1: 255 octets, length octets and root included
                raise WireError("name", "name too long")
            parts.append(b"\x00")
            break
        if length & 0xC0 == 0xC0:
            if off + 2 > n:
                raise WireError("truncated")
            if end < 0:
                end = off + 2
            ptr = ((length & 0x3F) << 8) | data[off + 1]
            jumps += 1
            if jumps > MAX_POINTER_JUMPS or ptr >= n:
                raise WireError("name", "compression loop or pointer out of range")
            off = ptr
            continue
        if length & 0xC0:
            raise WireError("name", "bad label type")
        label_end = off + 1 + length
        if label_end > n:
            raise WireError("truncated")
        parts.append(data[off:label_end])
        total += length + 1
        if total > 255:
            raise WireError("name", "name too long")
        off = label_end
    return b"".join(parts).lower(), end


def _escape_label(label: bytes) -> str:
    out = []
    for b in label:
        c = chr(b)
        if c in ".\\\"();@$ " or b < 0x21 or b > 0x7E:
            out.append("\\" + c if c in ".\\\"();@$" else f"\\{b:03d}")
        else:
            out.append(c)
    return "".join(out)


def wire_name_to_text(wire: bytes) -> str:
    """``b'\\x03www\\x07example\\x00'`` -> ``'www.example'`` (no trailing dot; root -> '')."""
    labels = []
    i = 0
    length = wire[0] if wire else 0
    while length:
        label = wire[i + 1:i + 1 + length]
        try:
            text = label.decode("ascii")
            if not text.isprintable() or "." in text or "\\" in text or " " in text:
                text = _escape_label(label)
        except UnicodeDecodeError:
            text = _escape_label(label)
        labels.append(text)
        i += length + 1
        length = wire[i]
    return ".".join(labels)


def text_to_wire_name(name: str) -> bytes:
    """``'www.example'`` or ``'www.example.'`` -> uncompressed wire name (no escapes)."""
    name = name.rstrip(".")
    if not name:
        return b"\x00"
    out = bytearray()
    for label in name.split("."):
        raw = label.encode("ascii")
        if not raw or len(raw) > 63:
            raise ValueError(f"bad label in {name!r}")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > 255:
        raise ValueError(f"name too long: {name!r}")
    return bytes(out)


# --- whole messages (upstream answers) ----------------------------------------------


@dataclass(slots=True)
class Record:
    section: int  # 1 answer, 2 authority, 3 additional
    name: bytes  # lower-case uncompressed wire name
    rtype: int
    rclass: int
    ttl: int
    start: int  # offset of the RR's owner name
    ttl_offset: int
    rdata_offset: int
    rdlength: int
    end: int
    target: bytes | None = None  # CNAME/DNAME target (lower-case wire)
    address: str | None = None  # A/AAAA in text form


@dataclass(slots=True)
class Message:
    id: int
    flags: int
    qname: bytes  # lower-case wire
    qtype: int
    qclass: int
    qend: int
    records: list[Record]
    opt: Record | None
    counts: tuple[int, int, int, int]

    @property
    def rcode(self) -> int:
        base = self.flags & RCODE_MASK
        if self.opt is not None:
            base |= (self.opt.ttl >> 24) << 4
        return base

    @property
    def truncated(self) -> bool:
        return bool(self.flags & TC)


def parse_message(data: bytes) -> Message:
    """Parse a whole message (an upstream answer). Raises WireError on anything malformed."""
    n = len(data)
    if n < 12:
        raise WireError("short")
    qid, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    off = 12
    qname, qtype, qclass = b"", 0, 0
    if qdcount > 1:
        raise WireError("qdcount")
    if qdcount == 1:
        qname, off = read_name(data, off)
        if off + 4 > n:
            raise WireError("truncated")
        qtype, qclass = TYPE_CLASS.unpack_from(data, off)
        off += 4
    qend = off
    records: list[Record] = []
    opt: Record | None = None
    for section, count in ((1, ancount), (2, nscount), (3, arcount)):
        for _ in range(count):
            start = off
            name, off = read_name(data, off)
            if off + 10 > n:
                raise WireError("truncated")
            rtype, rclass, ttl, rdlen = RR_FIXED.unpack_from(data, off)
            rec = Record(section, name, rtype, rclass, ttl, start, off + 4, off + 10, rdlen,
                         off + 10 + rdlen)
            off = rec.end
            if off > n:
                raise WireError("truncated")
            if rtype == TYPE_OPT:
                if section != 3 or opt is not None or name != b"\x00":
                    raise WireError("opt")
                opt = rec
                continue
            if rclass == CLASS_IN:
                if rtype == TYPE_A:
                    if rdlen != 4:
                        raise WireError("rdata", "A record with bad length")
                    rec.address = socket.inet_ntop(socket.AF_INET, data[rec.rdata_offset:off])
                elif rtype == TYPE_AAAA:
                    if rdlen != 16:
                        raise WireError("rdata", "AAAA record with bad length")
                    rec.address = socket.inet_ntop(socket.AF_INET6, data[rec.rdata_offset:off])
            if rtype == TYPE_CNAME or rtype == TYPE_DNAME:
                rec.target, tend = read_name(data, rec.rdata_offset)
                if tend != off:
                    raise WireError("rdata", "CNAME with trailing bytes")
            records.append(rec)
    return Message(qid, flags, qname, qtype, qclass, qend, records, opt,
                   (qdcount, ancount, nscount, arcount))


# --- building answers ---------------------------------------------------------------


def opt_record(payload: int = UDP_PAYLOAD, do: bool = False, ext_rcode: int = 0,
               options: bytes = b"") -> bytes:
    """An OPT pseudo-RR (root owner), version 0."""
    ttl = (ext_rcode << 24) | (DO_BIT if do else 0)
    return b"\x00" + RR_FIXED.pack(TYPE_OPT, payload, ttl, len(options)) + options


def ede_option(info_code: int, text: str = "") -> bytes:
    """An Extended DNS Error option (RFC 8914)."""
    body = U16.pack(info_code) + text.encode("utf-8")[:200]
    return U16.pack(EDNS_EDE) + U16.pack(len(body)) + body


def response_flags(query_flags: int, rcode: int, extra: int = 0) -> int:
    """Flags of an answer to a query: QR, RA; opcode, RD and CD copied from the query."""
    return QR | RA | (query_flags & (OPCODE_MASK | RD | CD)) | extra | (rcode & RCODE_MASK)


def error_response(data: bytes, rcode: int, query: Query | None = None,
                   ede: bytes = b"") -> bytes:
    """A header-only (or header + question) error answer, echoing what could be read.

    With a parsed question it is echoed; a client that sent EDNS gets an OPT back (and
    the upper bits of an extended rcode such as BADVERS go there).
    """
    qid = U16.unpack_from(data)[0] if len(data) >= 2 else 0
    qflags = U16.unpack_from(data, 2)[0] if len(data) >= 4 else 0
    question = b""
    qd = 0
    if query is not None and query.qend > 12:
        question = data[12:query.qend]
        qd = 1
    additional = b""
    ar = 0
    if query is not None and query.edns:
        additional = opt_record(UDP_PAYLOAD, query.do, rcode >> 4, ede)
        ar = 1
    flags = response_flags(qflags, rcode)
    return HEADER.pack(qid, flags, qd, 0, 0, ar) + question + additional


def truncated_response(query: Query, flags_extra: int = 0) -> bytes:
    """TC=1 with the question kept and no records (the client retries over TCP)."""
    additional = opt_record(UDP_PAYLOAD, query.do) if query.edns else b""
    flags = response_flags(query.flags, NOERROR, TC | flags_extra)
    return HEADER.pack(query.id, flags, 1, 0, 0, 1 if additional else 0) + \
        query.data[12:query.qend] + additional


def build_answer(query: Query, rcode: int, answers: list[tuple[int, int, bytes]] = (),  # type: ignore[assignment]
                 authority: list[tuple[bytes, int, int, bytes]] = (),  # type: ignore[assignment]
                 flags_extra: int = 0, ede: bytes = b"") -> bytes:
    """Synthesise an answer to ``query``.

    ``answers``: (rtype, ttl, rdata) records owned by the query name (pointer to offset 12).
    ``authority``: (owner wire, rtype, ttl, rdata) records.
    """
    body = bytearray()
    for rtype, ttl, rdata in answers:
        body += b"\xc0\x0c" + RR_FIXED.pack(rtype, CLASS_IN, ttl, len(rdata)) + rdata
    for owner, rtype, ttl, rdata in authority:
        body += owner + RR_FIXED.pack(rtype, CLASS_IN, ttl, len(rdata)) + rdata
    additional = b""
    if query.edns:
        additional = opt_record(UDP_PAYLOAD, query.do, 0, ede)
    flags = response_flags(query.flags, rcode, flags_extra)
    return HEADER.pack(query.id, flags, 1, len(answers), len(authority),
                       1 if additional else 0) + query.data[12:query.qend] + bytes(body) + \
        additional


def build_query(qid: int, question: bytes, *, rd: bool = True, cd: bool = False,
                do: bool = False, edns: bool = True, payload: int = UDP_PAYLOAD) -> bytes:
    """An upstream query for ``question`` (wire name + type + class)."""
    flags = (RD if rd else 0) | (CD if cd else 0)
    if not edns:
        return HEADER.pack(qid, flags, 1, 0, 0, 0) + question
    return HEADER.pack(qid, flags, 1, 0, 0, 1) + question + opt_record(payload, do)


def make_question(name: str, qtype: int, qclass: int = CLASS_IN) -> bytes:
    return text_to_wire_name(name) + TYPE_CLASS.pack(qtype, qclass)


def qtype_name(qtype: int) -> str:
    return TYPE_NAMES.get(qtype) or f"TYPE{qtype}"
