"""Raw DNS clients for tests that need more control than dnspython's query helpers:
bursts of UDP queries from one socket, exact reads of TCP frames, a process's RSS."""

from __future__ import annotations

import socket
import struct
import time

import dns.message


def query_wire(name: str, qid: int = 1, rdtype: str = "A", **kw: object) -> bytes:
    """A query for ``name`` with the ID ``qid``, as bytes."""
    q = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    q.id = qid
    return q.to_wire()


def framed(data: bytes) -> bytes:
    """A DNS message with its TCP length prefix (RFC 7766)."""
    return struct.pack("!H", len(data)) + data


def recv_exact(s: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from a stream socket (ConnectionError if it closes first)."""
    buf = b""
    for _ in range(100_000):
        if len(buf) == n:
            return buf
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    raise ConnectionError("too many reads")


def udp_burst(host: str, port: int, packets: list[bytes], *, source: str = "127.0.0.1",
              per_batch: int = 50, gap: float = 0.0, settle: float = 1.0, quiet: float = 0.2,
              times: dict[int, float] | None = None) -> tuple[dict[int, bytes], float]:
    """Send ``packets`` (distinct IDs) from one socket in batches, reading replies between
    batches so neither side's socket buffer overflows; then wait for the rest (at most
    ``settle`` s, or until nothing came for ``quiet`` s). Returns ({id: first reply},
    seconds the sending took); ``times``, if given, gets {id: seconds from sending that
    packet to its first reply}."""
    replies: dict[int, bytes] = {}
    sent_at: dict[int, float] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.setblocking(False)

        def drain() -> int:
            got = 0
            for _ in range(100_000):
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    break
                if len(data) >= 2:
                    qid = struct.unpack_from("!H", data)[0]
                    if qid not in replies:
                        replies[qid] = data
                        if times is not None and qid in sent_at:
                            times[qid] = time.monotonic() - sent_at[qid]
                    got += 1
            return got

        t0 = time.monotonic()
        for i in range(0, len(packets), per_batch):
            for p in packets[i:i + per_batch]:
                if len(p) >= 2:
                    sent_at.setdefault(struct.unpack_from("!H", p)[0], time.monotonic())
                s.sendto(p, (host, port))
            drain()
            if gap:
                time.sleep(gap)
        sending = time.monotonic() - t0
        end = time.monotonic() + settle
        quiet_since = time.monotonic()
        while len(replies) < len(packets):
            now = time.monotonic()
            if now >= end or now - quiet_since > quiet:
                break
            time.sleep(0.01)
            if drain():
                quiet_since = time.monotonic()
        drain()
    return replies, sending


def rss_kb(pid: int) -> int:
    """VmRSS of a running process, in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")
