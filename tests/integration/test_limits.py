"""Resource limits (issue 7), with the real `moat serve` process and real sockets on
loopback: what a client can make moat hold (TCP connections in total and per client,
idle and half-sent messages, queries waiting on upstreams) is capped, the cap does not
take the rest of the service down, and moat recovers when the pressure goes.

Other clients are simulated by binding the client socket to other loopback addresses
(127.0.0.0/8 is all loopback on Linux). The total TCP connection cap, the idle timeout of
a connection that has talked, and pipelining: test_resolver.py. ACL, rate limiting and
rebinding: test_protection.py.
"""

from __future__ import annotations

import select
import socket
import struct
import textwrap
import time
from pathlib import Path

import dns.message
import dns.rcode
import pytest
from harness import FakeUpstream, free_port
from harness.clients import framed, query_wire, recv_exact, rss_kb
from harness.scrape import metric, scrape

pytestmark = pytest.mark.integration

HDR = struct.Struct("!HHHHHH")


# --- helpers ----------------------------------------------------------------------------


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "moat.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def shed(mport: int, reason: str) -> float:
    return metric(scrape(mport), "moat_shed_queries_total", reason=reason)


def tcp_ask(host: str, port: int, name: str = "www.example.test", qid: int = 7,
            source: str = "127.0.0.1", timeout: float = 3.0) -> dns.message.Message:
    """One query over a fresh TCP connection from ``source``."""
    with socket.create_connection((host, port), timeout=timeout,
                                  source_address=(source, 0)) as s:
        s.sendall(framed(query_wire(name, qid)))
        (length,) = struct.unpack("!H", recv_exact(s, 2))
        return dns.message.from_wire(recv_exact(s, length))


def connect(host: str, port: int, source: str) -> socket.socket:
    return socket.create_connection((host, port), timeout=3, source_address=(source, 0))


def closed_at_once(s: socket.socket, timeout: float = 1.5) -> bool:
    """Whether moat closes ``s`` without answering a query sent on it."""
    s.settimeout(timeout)
    try:
        s.sendall(framed(query_wire("www.example.test", 99)))
        return s.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def served(s: socket.socket, qid: int) -> bool:
    s.sendall(framed(query_wire("www.example.test", qid)))
    (length,) = struct.unpack("!H", recv_exact(s, 2))
    r = dns.message.from_wire(recv_exact(s, length))
    return r.id == qid and r.rcode() == dns.rcode.NOERROR and bool(r.answer)


def wait_closed(socks: list[socket.socket], deadline: float) -> dict[int, float]:
    """Wait (until ``deadline``) for moat to close each socket; {index: when}."""
    closed: dict[int, float] = {}
    for _ in range(10_000):
        now = time.monotonic()
        open_ = [s for i, s in enumerate(socks) if i not in closed]
        if not open_ or now >= deadline:
            break
        readable, _, _ = select.select(open_, [], [], min(0.05, deadline - now))
        for s in readable:
            i = socks.index(s)
            try:
                data = s.recv(65536)
            except (ConnectionResetError, OSError):
                data = b""
            if not data:
                closed[i] = time.monotonic()
    return closed


# --- TCP connections --------------------------------------------------------------------


def test_per_client_tcp_connection_cap(moat, nsd_upstream, tmp_path) -> None:
    mport = free_port()
    cfg = write_config(tmp_path, "[server]\ntcp_max_connections_per_client = 3\n")
    m = moat("--config", cfg, "--metrics", f"127.0.0.1:{mport}", upstream=nsd_upstream)
    before = shed(mport, "tcp-connection-cap")
    held = [connect(m.host, m.port, "127.0.0.1") for _ in range(3)]
    try:
        for i, s in enumerate(held):
            assert served(s, 100 + i)
        fourth = connect(m.host, m.port, "127.0.0.1")
        with fourth:
            assert closed_at_once(fourth), "a 4th connection from one client was served"
        # another client is not affected by the first one's cap
        other = [connect(m.host, m.port, "127.0.0.2") for _ in range(3)]
        for i, s in enumerate(other):
            assert served(s, 200 + i)
            s.close()
        assert shed(mport, "tcp-connection-cap") - before >= 1
        # the first client gets a slot back when it closes one
        held.pop().close()
        ok = False
        for attempt in range(20):  # bounded: moat frees the slot when it sees the close
            time.sleep(0.05)
            with connect(m.host, m.port, "127.0.0.1") as s:
                s.settimeout(1.5)
                try:
                    ok = served(s, 300 + attempt)
                except (ConnectionError, TimeoutError):
                    ok = False
            if ok:
                break
        assert ok, "after closing one of its 3 connections, the client was still refused"
        for i, s in enumerate(held):  # the ones kept open still work
            assert served(s, 400 + i)
    finally:
        for s in held:
            s.close()


def test_idle_connections_filling_the_cap_do_not_stop_udp_and_expire(moat, nsd_upstream,
                                                                      tmp_path) -> None:
    """Slowloris: 20 clients each open a TCP connection and say nothing, filling
    tcp_max_connections. UDP is still served at once; new TCP connections are refused
    while the table is full; the idle ones are closed after tcp_idle_timeout and TCP
    works again."""
    mport = free_port()
    cfg = write_config(tmp_path, """\
        [server]
        tcp_max_connections = 20
        tcp_idle_timeout = "2s"
        """)
    m = moat("--config", cfg, "--metrics", f"127.0.0.1:{mport}", upstream=nsd_upstream)
    assert tcp_ask(m.host, m.port).answer  # warm the cache; TCP works
    cap_before = shed(mport, "tcp-connection-cap")
    timeouts_before = shed(mport, "tcp-timeout")
    t_open = time.monotonic()
    idle = [connect(m.host, m.port, f"127.0.2.{i + 1}") for i in range(20)]
    try:
        time.sleep(0.2)  # moat has accepted them all
        # UDP keeps working, promptly
        slow = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(1.0)
            for i in range(50):
                t0 = time.perf_counter()
                u.sendto(query_wire("www.example.test", 1000 + i), (m.host, m.port))
                r = dns.message.from_wire(u.recv(4096))
                elapsed = time.perf_counter() - t0
                assert r.id == 1000 + i and r.rcode() == dns.rcode.NOERROR and r.answer
                if elapsed > 0.05:
                    slow.append(elapsed)
        assert len(slow) <= 2, slow
        # a new TCP connection (another client) is refused while the table is full
        with connect(m.host, m.port, "127.0.0.99") as extra:
            assert closed_at_once(extra), "a connection beyond tcp_max_connections was served"
        assert shed(mport, "tcp-connection-cap") - cap_before >= 1
        # the idle connections are closed after the idle timeout (checked once a second)
        closed = wait_closed(idle, time.monotonic() + 6)
        assert len(closed) == 20, f"only {len(closed)} of 20 idle connections were closed"
        waits = sorted(t - t_open for t in closed.values())
        assert 1.9 <= waits[0] and waits[-1] <= 4.0, waits
        assert shed(mport, "tcp-timeout") - timeouts_before >= 20
        # TCP works again
        r = tcp_ask(m.host, m.port, source="127.0.0.99")
        assert r.rcode() == dns.rcode.NOERROR and r.answer
    finally:
        for s in idle:
            s.close()


def test_trickling_clients_are_closed_at_the_read_timeout(moat, nsd_upstream, tmp_path
                                                          ) -> None:
    """Ten clients send a query one byte a second (it would take 30 s to arrive): each
    is closed tcp_read_timeout (2 s) after its first byte, though it is never idle, and
    a normal client is served meanwhile."""
    mport = free_port()
    cfg = write_config(tmp_path, """\
        [server]
        tcp_read_timeout = "2s"
        tcp_idle_timeout = "30s"
        """)
    m = moat("--config", cfg, "--metrics", f"127.0.0.1:{mport}", upstream=nsd_upstream)
    before = shed(mport, "tcp-timeout")
    message = framed(query_wire("www.example.test", 5))
    socks = [connect(m.host, m.port, f"127.0.3.{i + 1}") for i in range(10)]
    try:
        t_first = time.monotonic()
        closed: dict[int, float] = {}
        answered = False
        for second in range(8):  # bounded: 8 bytes, 8 seconds at most
            for i, s in enumerate(socks):
                if i not in closed:
                    try:
                        s.sendall(message[second:second + 1])
                    except OSError:
                        closed[i] = time.monotonic()
            if second == 1:
                r = tcp_ask(m.host, m.port, source="127.0.0.1")
                answered = r.rcode() == dns.rcode.NOERROR and bool(r.answer)
            open_ = [s for i, s in enumerate(socks) if i not in closed]
            got = wait_closed(open_, time.monotonic() + 1.0)
            for j, when in got.items():
                closed[socks.index(open_[j])] = when
            if len(closed) == len(socks):
                break
        assert answered, "a normal TCP client was not served while others trickled"
        assert len(closed) == 10, f"{10 - len(closed)} trickling connections still open"
        waits = sorted(t - t_first for t in closed.values())
        assert 1.9 <= waits[0] and waits[-1] <= 4.0, waits
        assert shed(mport, "tcp-timeout") - before == 10
    finally:
        for s in socks:
            s.close()


def test_unfinished_maximum_length_messages_cost_little_and_time_out(
        moat, nsd_upstream, tmp_path) -> None:
    """200 connections announce a 65535-byte message and send nothing more: moat does not
    reserve memory for what was announced (RSS grows far less than 200 x 64 KB), and
    closes them all after tcp_read_timeout. 40 more send 60000 of the 65535 bytes: moat
    holds what arrived (bounded by the connection caps) and drops it at the timeout."""
    mport = free_port()
    cfg = write_config(tmp_path, """\
        [server]
        tcp_read_timeout = "1s"
        tcp_idle_timeout = "30s"
        tcp_max_connections = 300
        tcp_max_connections_per_client = 300
        """)
    m = moat("--config", cfg, "--metrics", f"127.0.0.1:{mport}", upstream=nsd_upstream)
    assert tcp_ask(m.host, m.port).answer
    before_timeouts = shed(mport, "tcp-timeout")
    rss0 = rss_kb(m.pid)
    socks: list[socket.socket] = []
    try:
        t0 = time.monotonic()
        for _ in range(200):
            s = connect(m.host, m.port, "127.0.0.1")
            s.sendall(b"\xff\xff")
            socks.append(s)
        time.sleep(0.3)
        rss_announced = rss_kb(m.pid)
        closed = wait_closed(socks, time.monotonic() + 5)
        assert len(closed) == 200, f"{200 - len(closed)} connections still open"
        waits = sorted(t - t0 for t in closed.values())
        assert waits[0] >= 0.9 and waits[-1] <= 3.5, (waits[0], waits[-1])
        for s in socks:
            s.close()
        socks = []

        for _ in range(40):
            s = connect(m.host, m.port, "127.0.0.1")
            s.sendall(b"\xff\xff" + b"\x00" * 60000)
            socks.append(s)
        time.sleep(0.5)
        rss_half = rss_kb(m.pid)
        closed = wait_closed(socks, time.monotonic() + 5)
        assert len(closed) == 40
        time.sleep(0.3)
        rss_end = rss_kb(m.pid)
        print(f"\nRSS kB: before {rss0}, 200 announced {rss_announced}, 40 x 60000 bytes "
              f"pending {rss_half}, after {rss_end}")
        assert rss_announced - rss0 < 4096, (rss0, rss_announced)  # 200 x 64 KB = 12.5 MB
        assert rss_half - rss0 < 40 * 64 + 8192, (rss0, rss_half)
        assert rss_end - rss0 < 8192, (rss0, rss_end)
        assert shed(mport, "tcp-timeout") - before_timeouts == 240
        assert tcp_ask(m.host, m.port).answer  # still serving
    finally:
        for s in socks:
            s.close()


def test_a_maximum_size_tcp_query_is_answered(moat, nsd_upstream) -> None:
    """A query of the largest size TCP can frame (65535 bytes: EDNS padding) is read and
    answered like any other."""
    m = moat(upstream=nsd_upstream)
    head = HDR.pack(3, 0x0100, 1, 0, 0, 1) + b"\x03www\x07example\x04test\x00" + \
        struct.pack("!HH", 1, 1)
    pad_len = 65535 - len(head) - 11 - 4  # OPT RR fixed part, option header
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 4 + pad_len) + \
        struct.pack("!HH", 12, pad_len) + b"\x00" * pad_len  # option 12: padding
    q = head + opt
    assert len(q) == 65535 and dns.message.from_wire(q).id == 3
    with connect(m.host, m.port, "127.0.0.1") as s:
        for chunk in range(0, len(q) + 2, 8192):  # in pieces, as a real stream arrives
            s.sendall(framed(q)[chunk:chunk + 8192])
        (length,) = struct.unpack("!H", recv_exact(s, 2))
        r = dns.message.from_wire(recv_exact(s, length))
    assert r.id == 3 and r.rcode() == dns.rcode.NOERROR
    assert [rd.address for rrset in r.answer for rd in rrset] == ["192.0.2.10"]


# --- queries waiting on upstreams -------------------------------------------------------


def test_in_flight_cap_sheds_misses_keeps_hits_and_recovers(moat, tmp_path) -> None:
    """max_in_flight = 5 and an upstream that takes 1 s: of 20 concurrent cache misses, 5
    go upstream and 15 are REFUSED at once (the upstream is not asked for them); a cache
    hit is still answered meanwhile; once the slow answers are back, new misses are
    forwarded again."""
    mport = free_port()
    cfg = write_config(tmp_path, """\
        [server]
        max_in_flight = 5
        [upstream]
        timeout = "2s"
        deadline = "3s"
        """)
    with FakeUpstream("answer", delay=1.0) as fake:
        m = moat("--config", cfg, "--metrics", f"127.0.0.1:{mport}", upstream=fake)
        assert dns.message.from_wire(_udp(m.port, query_wire("hit.example.test", 1))).answer
        fake.behaviour = "slow"
        fake.clear()
        before = shed(mport, "in-flight")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.05)
            t0 = time.monotonic()
            for i in range(20):
                s.sendto(query_wire(f"miss{i}.example.test", 100 + i), (m.host, m.port))
            got: dict[int, tuple[float, int]] = {}
            hit_time = None
            for _ in range(1000):  # bounded by the 3 s deadline below too
                if len(got) == 20 or time.monotonic() - t0 > 3:
                    break
                if hit_time is None and time.monotonic() - t0 > 0.2:
                    t_hit = time.monotonic()
                    r = dns.message.from_wire(_udp(m.port, query_wire("hit.example.test", 2)))
                    assert r.rcode() == dns.rcode.NOERROR and r.answer, r
                    hit_time = time.monotonic() - t_hit
                try:
                    data = s.recv(4096)
                except TimeoutError:
                    continue
                qid, flags = struct.unpack_from("!HH", data)
                got.setdefault(qid, (time.monotonic() - t0, flags & 0xF))
        refused = [t for t, rc in got.values() if rc == dns.rcode.REFUSED]
        answered = [t for t, rc in got.values() if rc == dns.rcode.NOERROR]
        assert len(got) == 20, got
        assert len(refused) == 15 and len(answered) == 5, got
        assert max(refused) < 0.5, refused  # shed at once, not after a timeout
        assert min(answered) >= 0.9, answered  # these really waited for the upstream
        assert hit_time is not None and hit_time < 0.2, hit_time
        assert len(fake.queries) == 5, [q.qname for q in fake.queries]
        assert shed(mport, "in-flight") - before == 15
        # recovered: 5 new concurrent misses are all forwarded and answered
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            for i in range(5):
                s.sendto(query_wire(f"again{i}.example.test", 300 + i), (m.host, m.port))
            rcodes = [struct.unpack_from("!HH", s.recv(4096))[1] & 0xF for _ in range(5)]
        assert rcodes == [dns.rcode.NOERROR] * 5, rcodes
        assert shed(mport, "in-flight") - before == 15


def _udp(port: int, data: bytes, timeout: float = 2.0) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(data, ("127.0.0.1", port))
        return s.recv(65535)


def test_in_flight_cap_also_bounds_tcp_only_names_asked_over_tcp(moat, tmp_path) -> None:
    """The same cap for names under a tcp-only rule (RPZ rpz-tcp-only: UDP gets TC=1, TCP
    is resolved normally): 20 concurrent cache misses over TCP must not make moat hold
    more than max_in_flight queries on the upstream either."""
    mport = free_port()
    cfg = write_config(tmp_path, """\
        [server]
        max_in_flight = 5
        [upstream]
        timeout = "2s"
        deadline = "3s"
        [[policy.source]]
        name = "suspicious"
        names = ["tcp.test"]
        action = "tcp-only"
        """)
    with FakeUpstream("slow", delay=1.0) as fake:
        m = moat("--config", cfg, "--metrics", f"127.0.0.1:{mport}", upstream=fake)
        r = dns.message.from_wire(_udp(m.port, query_wire("a.tcp.test", 1)))
        assert r.flags & 0x0200 and not r.answer  # the rule is in force: TC=1 over UDP
        before = shed(mport, "in-flight")
        got: dict[int, tuple[float, int]] = {}
        with connect(m.host, m.port, "127.0.0.1") as s:
            t0 = time.monotonic()
            s.sendall(b"".join(framed(query_wire(f"n{i}.tcp.test", 100 + i))
                               for i in range(20)))
            s.settimeout(3.5)
            for _ in range(20):
                (length,) = struct.unpack("!H", recv_exact(s, 2))
                qid, flags = struct.unpack_from("!HH", recv_exact(s, length))
                got[qid] = (time.monotonic() - t0, flags & 0xF)
        refused = [t for t, rc in got.values() if rc == dns.rcode.REFUSED]
        asked = len([q for q in fake.queries if q.qname and q.qname.endswith("tcp.test.")])
        assert asked <= 5 and len(refused) == 15, (
            f"max_in_flight = 5, yet moat sent {asked} of 20 concurrent tcp-only queries "
            f"upstream and refused {len(refused)}")
        assert shed(mport, "in-flight") - before == 15
