"""A small DNS upstream on loopback for faults real software cannot produce.

``FakeUpstream`` listens on UDP *and* TCP on the same loopback port and serves
from a background thread, so it works from synchronous tests and with moat
running in a subprocess. Its ``behaviour`` attribute can be changed at any
time (a test can make it flap). Every query it receives is recorded.

Behaviours
    ``answer``          A ``address`` (192.0.2.1, TTL ``ttl``=300) for any name, or
                        answers from ``records`` (see below)
    ``silent``          never answers (TCP connections are read and left open)
    ``slow``            answers like ``answer`` after ``delay`` seconds
    ``servfail``        SERVFAIL, question echoed
    ``refused``         REFUSED, question echoed
    ``wrong_id``        an answer with a different ID first, then (if
                        ``wrong_id_then_right``) the real one
    ``wrong_port``      UDP: the answer comes from another socket/port;
                        TCP: answers normally
    ``wrong_question``  an answer (right ID) for a different question name
    ``garbage``         unparseable bytes (first two are the query ID when
                        ``garbage_keep_id``)
    ``truncate``        UDP: TC=1, no answers; TCP: the full answer
    ``nxdomain_soa``    NXDOMAIN with an SOA in the authority section

``behaviour`` may also be a callable ``(query: ReceivedQuery, request:
dnslib.DNSRecord) -> bytes | DNSRecord | list[bytes | DNSRecord] | None``.
``tcp_behaviour`` (default None = same as ``behaviour``) overrides it for TCP.

``records`` maps names to record lines ``"[TTL] TYPE RDATA"``, e.g.
``{"www.example.test": ["A 192.0.2.5", "60 AAAA 2001:db8::5"]}``. With
``records`` set, a listed name without the asked type gets NODATA (SOA in
authority), an unlisted name gets NXDOMAIN (SOA in authority). A CNAME line
is returned for any type. Without ``records`` every A query gets
``address``; other types get NODATA.

Responses to queries that carried EDNS carry an OPT record (payload 1232).
NOTIFY and other non-QUERY opcodes get an empty NOERROR reply with the same
opcode (behaviour ``silent`` / faults still apply).
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.rdatatype
from dnslib import EDNS0, QTYPE, RCODE, RR, A, DNSQuestion, DNSRecord

from .ports import free_port_on

__all__ = ["BEHAVIOURS", "FakeUpstream", "ReceivedQuery"]

BEHAVIOURS = (
    "answer",
    "silent",
    "slow",
    "servfail",
    "refused",
    "wrong_id",
    "wrong_port",
    "wrong_question",
    "garbage",
    "truncate",
    "nxdomain_soa",
)

# Bounds: a TCP connection idle this long is closed; at most this many
# concurrent TCP connections / delayed UDP answers are served.
TCP_IDLE_TIMEOUT = 30.0
MAX_TCP_CONNECTIONS = 256
MAX_PENDING_DELAYED = 4096
EDNS_PAYLOAD = 1232


@dataclass
class ReceivedQuery:
    """One query as received by the fake upstream."""

    wire: bytes
    transport: str  # "udp" or "tcp"
    src: tuple[Any, ...]  # (host, port[, flow, scope])
    time: float  # time.monotonic() at receipt
    wall_time: float = field(default_factory=time.time)

    @property
    def src_host(self) -> str:
        return str(self.src[0])

    @property
    def src_port(self) -> int:
        return int(self.src[1])

    @property
    def id(self) -> int:
        return struct.unpack("!H", self.wire[:2])[0] if len(self.wire) >= 2 else -1

    @cached_property
    def message(self) -> dns.message.Message | None:
        """The query parsed by dnspython (None if unparseable)."""
        try:
            return dns.message.from_wire(self.wire, ignore_trailing=True)
        except dns.exception.DNSException:
            return None

    @property
    def qname(self) -> str | None:
        m = self.message
        return m.question[0].name.to_text() if m is not None and m.question else None

    @property
    def qtype(self) -> str | None:
        m = self.message
        if m is None or not m.question:
            return None
        return dns.rdatatype.to_text(m.question[0].rdtype)

    @property
    def opcode(self) -> int:
        return (self.wire[2] >> 3) & 0xF if len(self.wire) >= 3 else -1

    @property
    def rd(self) -> bool:
        m = self.message
        return bool(m is not None and m.flags & dns.flags.RD)

    @property
    def has_edns(self) -> bool:
        m = self.message
        return m is not None and m.edns >= 0

    @property
    def payload(self) -> int | None:
        """EDNS UDP payload size advertised (None without EDNS)."""
        return self.message.payload if self.has_edns and self.message else None

    @property
    def do_bit(self) -> bool:
        m = self.message
        return bool(m is not None and m.ednsflags & dns.flags.DO)

    @property
    def edns_options(self) -> list[dns.edns.Option]:
        m = self.message
        return list(m.options) if m is not None and m.edns >= 0 else []

    @property
    def has_ecs(self) -> bool:
        return any(o.otype == dns.edns.OptionType.ECS for o in self.edns_options)

    @property
    def has_cookie(self) -> bool:
        return any(o.otype == dns.edns.OptionType.COOKIE for o in self.edns_options)

    def __repr__(self) -> str:
        return (
            f"<ReceivedQuery {self.transport} from {self.src_host}#{self.src_port} "
            f"id={self.id} {self.qname} {self.qtype}>"
        )


Behaviour = str | Callable[[ReceivedQuery, DNSRecord], Any]


class FakeUpstream:
    """Fault-injecting DNS upstream on ``host``:``port`` (UDP + TCP). See module doc."""

    def __init__(
        self,
        behaviour: Behaviour = "answer",
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        records: dict[str, Iterable[str] | str] | None = None,
        delay: float = 2.0,
        ttl: int = 300,
        address: str = "192.0.2.1",
        start: bool = True,
    ) -> None:
        self._check_behaviour(behaviour)
        self.behaviour: Behaviour = behaviour
        self.tcp_behaviour: Behaviour | None = None
        self.host = host
        self.records = records
        self.delay = delay
        self.ttl = ttl
        self.address = address
        self.negative_ttl = 60
        self.soa_zone: str | None = None  # default: last two labels of the qname
        self.wrong_id_then_right = True
        self.garbage_keep_id = True

        self.queries: list[ReceivedQuery] = []
        self.responses_sent = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._tcp_conns: set[socket.socket] = set()
        self._pending_delayed = 0
        self._requested_port = port
        self.port = port or 0
        self._udp: socket.socket | None = None
        self._udp_other: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._loop: threading.Thread | None = None
        if start:
            self.start()

    # ------------------------------------------------------------------ #
    @staticmethod
    def _check_behaviour(b: Behaviour | None) -> None:
        if b is not None and not callable(b) and b not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {b!r}; known: {BEHAVIOURS}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("behaviour", "tcp_behaviour"):
            self._check_behaviour(value)
        super().__setattr__(name, value)

    @property
    def addr(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def start(self) -> FakeUpstream:
        if self._loop is not None:
            raise RuntimeError("already started")
        for attempt in range(5):
            port = self._requested_port or free_port_on(self.host)
            try:
                self._bind(port)
                break
            except OSError as e:
                self._close_sockets()
                if e.errno != errno.EADDRINUSE or self._requested_port or attempt == 4:
                    raise
        self._loop = threading.Thread(
            target=self._serve, name=f"fake-upstream-{self.port}", daemon=True
        )
        self._loop.start()
        return self

    def _bind(self, port: int) -> None:
        fam = self.family
        self._udp = socket.socket(fam, socket.SOCK_DGRAM)
        self._tcp = socket.socket(fam, socket.SOCK_STREAM)
        self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for s in (self._udp, self._tcp):
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((self.host, port))
        self._tcp.listen(64)
        self._udp_other = socket.socket(fam, socket.SOCK_DGRAM)
        self._udp_other.bind((self.host, 0))
        self.port = port

    def _close_sockets(self) -> None:
        for s in (self._udp, self._tcp, self._udp_other):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        self._udp = self._tcp = self._udp_other = None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close every socket and join the threads (bounded)."""
        self._stop.set()
        if self._loop is not None:
            self._loop.join(timeout)
        with self._lock:
            conns = list(self._tcp_conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        self._close_sockets()

    def __enter__(self) -> FakeUpstream:
        if self._loop is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<FakeUpstream {self.addr} behaviour={self.behaviour!r}>"

    # ------------------------------------------------------------------ #
    # Query log
    # ------------------------------------------------------------------ #
    def clear(self) -> None:
        with self._lock:
            self.queries.clear()
            self.responses_sent = 0

    def wait_for_queries(
        self,
        count: int = 1,
        timeout: float = 5.0,
        predicate: Callable[[ReceivedQuery], bool] | None = None,
    ) -> list[ReceivedQuery]:
        """Wait (bounded) until ``count`` matching queries arrived; return them.

        Raises TimeoutError listing what did arrive.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [q for q in self.queries if predicate is None or predicate(q)]
                if len(got) >= count:
                    return got
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{self!r}: wanted {count} matching queries within {timeout}s, "
                        f"got {len(got)} (all received: {self.queries!r})"
                    )
                self._cond.wait(remaining)

    def _record(self, q: ReceivedQuery) -> None:
        with self._cond:
            self.queries.append(q)
            self._cond.notify_all()

    # ------------------------------------------------------------------ #
    # Serving
    # ------------------------------------------------------------------ #
    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        sel = selectors.DefaultSelector()
        self._udp.setblocking(False)
        self._tcp.setblocking(False)
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "tcp")
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.1):
                    if key.data == "udp":
                        self._on_udp()
                    else:
                        self._on_accept()
        finally:
            sel.close()

    def _on_udp(self) -> None:
        assert self._udp is not None
        for _ in range(64):  # bounded drain per wake-up
            try:
                wire, src = self._udp.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            q = ReceivedQuery(wire, "udp", src, time.monotonic())
            self._record(q)
            behaviour = self.behaviour
            replies = self._replies(q, behaviour, "udp")
            if not replies:
                continue
            delay = self.delay if behaviour == "slow" else 0.0
            if delay > 0:
                with self._lock:
                    if self._pending_delayed >= MAX_PENDING_DELAYED:
                        continue
                    self._pending_delayed += 1
                self._spawn(self._send_udp_later, replies, src, delay)
            else:
                self._send_udp(replies, src)

    def _send_udp_later(self, replies: list[tuple[bytes, bool]], src: Any, delay: float) -> None:
        try:
            if not self._stop.wait(delay):
                self._send_udp(replies, src)
        finally:
            with self._lock:
                self._pending_delayed -= 1

    def _send_udp(self, replies: list[tuple[bytes, bool]], src: Any) -> None:
        for data, other_port in replies:
            sock = self._udp_other if other_port else self._udp
            if sock is None:
                return
            with contextlib.suppress(OSError):
                sock.sendto(data, src)
                with self._lock:
                    self.responses_sent += 1

    def _on_accept(self) -> None:
        assert self._tcp is not None
        try:
            conn, src = self._tcp.accept()
        except (BlockingIOError, InterruptedError, OSError):
            return
        with self._lock:
            if len(self._tcp_conns) >= MAX_TCP_CONNECTIONS:
                conn.close()
                return
            self._tcp_conns.add(conn)
        self._spawn(self._serve_tcp, conn, src)

    def _recv_exact(self, conn: socket.socket, n: int, idle_deadline: float) -> bytes | None:
        buf = b""
        while len(buf) < n:
            if self._stop.is_set() or time.monotonic() > idle_deadline:
                return None
            try:
                chunk = conn.recv(n - len(buf))
            except TimeoutError:
                continue
            except OSError:
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    def _serve_tcp(self, conn: socket.socket, src: Any) -> None:
        conn.settimeout(0.1)
        try:
            for _ in range(10_000):  # bounded number of messages per connection
                idle_deadline = time.monotonic() + TCP_IDLE_TIMEOUT
                head = self._recv_exact(conn, 2, idle_deadline)
                if head is None:
                    return
                (length,) = struct.unpack("!H", head)
                wire = self._recv_exact(conn, length, idle_deadline)
                if wire is None:
                    return
                q = ReceivedQuery(wire, "tcp", src, time.monotonic())
                self._record(q)
                behaviour = self.tcp_behaviour if self.tcp_behaviour is not None else self.behaviour
                replies = self._replies(q, behaviour, "tcp")
                if behaviour == "slow" and replies and self._stop.wait(self.delay):
                    return
                for data, _other in replies:
                    try:
                        conn.sendall(struct.pack("!H", len(data)) + data)
                    except OSError:
                        return
                    with self._lock:
                        self.responses_sent += 1
        finally:
            with self._lock:
                self._tcp_conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    # ------------------------------------------------------------------ #
    # Building replies
    # ------------------------------------------------------------------ #
    def _replies(
        self, q: ReceivedQuery, behaviour: Behaviour, transport: str
    ) -> list[tuple[bytes, bool]]:
        """List of (wire, send_from_other_port)."""
        try:
            req = DNSRecord.parse(q.wire)
        except Exception:  # noqa: BLE001 - unparseable query: no answer
            return []
        if callable(behaviour):
            out = behaviour(q, req)
            if out is None:
                return []
            items = out if isinstance(out, list) else [out]
            return [(i.pack() if isinstance(i, DNSRecord) else bytes(i), False) for i in items]
        if behaviour == "silent":
            return []
        if behaviour in ("answer", "slow"):
            return [(self._answer(req).pack(), False)]
        if behaviour == "servfail":
            return [(self._rcode(req, RCODE.SERVFAIL).pack(), False)]
        if behaviour == "refused":
            return [(self._rcode(req, RCODE.REFUSED).pack(), False)]
        if behaviour == "nxdomain_soa":
            r = self._rcode(req, RCODE.NXDOMAIN)
            if req.questions:
                r.add_auth(self._soa(str(req.q.qname)))
            return [(r.pack(), False)]
        if behaviour == "truncate":
            if transport == "tcp":
                return [(self._answer(req).pack(), False)]
            r = self._base_reply(req)
            r.header.tc = 1
            return [(r.pack(), False)]
        if behaviour == "wrong_id":
            right = self._answer(req)
            wrong = self._answer(req)
            wrong.header.id = (req.header.id + 0x5A5B) & 0xFFFF
            out = [(wrong.pack(), False)]
            if self.wrong_id_then_right:
                out.append((right.pack(), False))
            return out
        if behaviour == "wrong_port":
            return [(self._answer(req).pack(), transport == "udp")]
        if behaviour == "wrong_question":
            r = self._base_reply(req)
            if req.questions:
                qn = str(req.q.qname)
                wrong_name = "wrong-question." + (qn if qn != "." else "")
                r.questions = [DNSQuestion(wrong_name, req.q.qtype, req.q.qclass)]
                r.header.q = 1
                r.add_answer(RR(wrong_name, QTYPE.A, ttl=self.ttl, rdata=A(self.address)))
            return [(r.pack(), False)]
        if behaviour == "garbage":
            body = bytearray(os.urandom(2)) + b"\xff" * 8 + os.urandom(20)
            head = q.wire[:2] if self.garbage_keep_id and len(q.wire) >= 2 else os.urandom(2)
            return [(bytes(head) + bytes(body), False)]
        raise ValueError(f"unknown behaviour {behaviour!r}")

    def _base_reply(self, req: DNSRecord) -> DNSRecord:
        r = req.reply(ra=1, aa=0)
        if any(getattr(ar, "rtype", None) == QTYPE.OPT for ar in req.ar):
            r.add_ar(EDNS0(udp_len=EDNS_PAYLOAD))
        return r

    def _rcode(self, req: DNSRecord, rcode: int) -> DNSRecord:
        r = self._base_reply(req)
        r.header.rcode = rcode
        return r

    def _soa(self, qname: str) -> RR:
        zone = self.soa_zone
        if zone is None:
            labels = [x for x in qname.rstrip(".").split(".") if x]
            zone = ".".join(labels[-2:]) + "." if labels else "."
        if not zone.endswith("."):
            zone += "."
        t = self.negative_ttl
        ns = f"ns1.{zone}" if zone != "." else "ns1."
        hm = f"hostmaster.{zone}" if zone != "." else "hostmaster."
        return RR.fromZone(f"{zone} {t} IN SOA {ns} {hm} 1 3600 600 86400 {t}")[0]

    def _lookup(self, name: str) -> list[str] | None:
        if self.records is None:
            return None
        want = name.lower().rstrip(".")
        for k, v in self.records.items():
            if k.lower().rstrip(".") == want:
                return [v] if isinstance(v, str) else list(v)
        return None

    def _answer(self, req: DNSRecord) -> DNSRecord:
        r = self._base_reply(req)
        if req.header.opcode != 0 or not req.questions:
            return r
        qname = str(req.q.qname)
        qtype = req.q.qtype
        if self.records is None:
            if qtype in (QTYPE.A, QTYPE.ANY):
                r.add_answer(*RR.fromZone(f"{qname} {self.ttl} IN A {self.address}"))
            else:
                r.add_auth(self._soa(qname))
            return r
        lines = self._lookup(qname)
        if lines is None:
            r.header.rcode = RCODE.NXDOMAIN
            r.add_auth(self._soa(qname))
            return r
        for line in lines:
            parts = line.split(None, 1)
            ttl = self.ttl
            if parts and parts[0].isdigit():
                ttl = int(parts[0])
                line = parts[1]
            rtype = line.split(None, 1)[0].upper()
            if rtype == "CNAME" or qtype == QTYPE.ANY or QTYPE.reverse.get(rtype) == qtype:
                r.add_answer(*RR.fromZone(f"{qname} {ttl} IN {line}"))
        if not r.rr:
            r.add_auth(self._soa(qname))
        return r
