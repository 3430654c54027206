"""Asking the upstream resolvers: UDP first, TCP when truncated, fail over, track health.

Spoofing resistance (RFC 5452): every upstream query gets a fresh random 16-bit ID from
the system's CSPRNG and goes out from a fresh socket on a random ephemeral port. An
answer is accepted only when its source address and port, its ID and its question (name
compared case-insensitively, type, class) all match; anything else that arrives on the
socket is counted as ``mismatch`` (or ``malformed``) and ignored, and the wait goes on.

Health: an upstream that times out or fails gets a back-off window during which it is
tried only after the healthy ones, so a dead upstream does not cost every query a timeout.
The window doubles with consecutive failures (0.5 s up to 30 s) and a good answer clears it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from . import wire

_LEN = struct.Struct("!H")


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    servers: tuple[tuple[str, int], ...]
    timeout: float = 1.0  # one attempt over UDP
    deadline: float = 3.0  # all attempts for one client query, then SERVFAIL (or stale)
    tcp_timeout: float = 2.0


class UpstreamError(Exception):
    """Every upstream failed within the deadline."""


class Upstream:
    """One upstream server and what we know of its health."""

    __slots__ = ("host", "port", "family", "label", "failures", "down_until", "results",
                 "latency_sum", "latency_count", "latency_buckets", "ignored")

    #: Every result an exchange can have (exported from the start, at 0). "truncated" is a
    #: UDP exchange whose answer had TC=1; the TCP retry that follows counts on its own.
    RESULTS = ("ok", "timeout", "servfail", "refused", "error", "truncated")

    #: Histogram buckets (seconds) for upstream latency.
    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

    def __init__(self, host: str, port: int) -> None:
        ip = ipaddress.ip_address(host)
        self.host = str(ip)  # normalised: answers are matched against this text
        self.port = port
        self.family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        self.label = f"[{self.host}]:{port}" if ip.version == 6 else f"{self.host}:{port}"
        self.failures = 0
        self.down_until = 0.0
        self.results: Counter[str] = Counter({r: 0 for r in self.RESULTS})  # for metrics
        self.ignored = 0  # packets on our sockets that were not the answer: spoofing signal
        self.latency_sum = 0.0
        self.latency_count = 0
        self.latency_buckets = [0] * len(self.BUCKETS)

    def healthy(self, now: float) -> bool:
        return self.down_until <= now

    def record_success(self, seconds: float) -> None:
        self.failures = 0
        self.down_until = 0.0
        self.latency_sum += seconds
        self.latency_count += 1
        for i, bound in enumerate(self.BUCKETS):
            if seconds <= bound:
                self.latency_buckets[i] += 1
                break

    def record_failure(self, now: float) -> None:
        self.failures += 1
        self.down_until = now + min(0.5 * 2 ** (self.failures - 1), 30.0)


class _Answer:
    """Resolution of one UDP exchange: set by the socket reader callback."""

    __slots__ = ("future", "sock", "qid", "question", "upstream", "on_mismatch")


class UpstreamPool:
    """The configured upstreams, in order of preference."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self.upstreams = [Upstream(h, p) for h, p in settings.servers]
        self.mismatched = 0  # answers ignored: wrong source, ID or question
        self.malformed = 0  # answers that did not parse

    def ordered(self, now: float) -> list[Upstream]:
        """Healthy upstreams first (in configured order), then the ones in back-off."""
        healthy = [u for u in self.upstreams if u.healthy(now)]
        return healthy + [u for u in self.upstreams if not u.healthy(now)]

    async def resolve(self, question: bytes, *, do: bool, cd: bool
                      ) -> tuple[bytes, wire.Message, Upstream]:
        """Ask the upstreams for ``question`` (lower-case wire name + type + class).

        Returns the raw answer, its parse and the upstream that gave it. A SERVFAIL or
        REFUSED from one upstream moves on to the next; if that is all anyone says, the
        last such answer is returned. Raises UpstreamError when nothing usable arrived
        before the deadline.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.settings.deadline
        last_bad: tuple[bytes, wire.Message, Upstream] | None = None
        attempts = 0
        order = self.ordered(time.monotonic())
        max_attempts = 2 * len(order)
        while attempts < max_attempts:
            upstream = order[attempts % len(order)]
            attempts += 1
            remaining = deadline - loop.time()
            if remaining <= 0.005:
                break
            t0 = loop.time()
            try:
                data, msg = await self._udp(upstream, question, do, cd,
                                            min(self.settings.timeout, remaining))
                if msg.truncated:
                    upstream.results["truncated"] += 1
                    remaining = deadline - loop.time()
                    data, msg = await self._tcp(upstream, question, do, cd,
                                                min(self.settings.tcp_timeout, remaining))
            except TimeoutError:
                upstream.results["timeout"] += 1
                upstream.record_failure(time.monotonic())
                continue
            except (OSError, wire.WireError, asyncio.IncompleteReadError, ConnectionError):
                upstream.results["error"] += 1
                upstream.record_failure(time.monotonic())
                continue
            rcode = msg.rcode
            if rcode in (wire.SERVFAIL, wire.REFUSED):
                upstream.results["servfail" if rcode == wire.SERVFAIL else "refused"] += 1
                upstream.record_failure(time.monotonic())
                last_bad = (data, msg, upstream)
                if attempts >= len(order):
                    break  # everyone was asked once: SERVFAIL/REFUSED is their answer
                continue
            upstream.results["ok"] += 1
            upstream.record_success(loop.time() - t0)
            return data, msg, upstream
        if last_bad is not None:
            return last_bad
        raise UpstreamError("no upstream answered")

    # --- one exchange over UDP ------------------------------------------------------

    async def _udp(self, upstream: Upstream, question: bytes, do: bool, cd: bool,
                   timeout: float) -> tuple[bytes, wire.Message]:
        loop = asyncio.get_running_loop()
        sock = socket.socket(upstream.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            # Port 0: the kernel picks a random ephemeral port for this one query.
            sock.bind(("::" if upstream.family == socket.AF_INET6 else "0.0.0.0", 0))
            qid = secrets.randbits(16)
            fut: asyncio.Future[tuple[bytes, wire.Message]] = loop.create_future()
            fd = sock.fileno()

            def readable() -> None:
                for _ in range(16):  # bounded: a flood of junk must not pin the loop
                    try:
                        data, addr = sock.recvfrom(65535)
                    except (BlockingIOError, InterruptedError):
                        return
                    except OSError as exc:
                        if not fut.done():
                            fut.set_exception(exc)
                        return
                    if addr[0] != upstream.host or addr[1] != upstream.port or len(data) < 12 \
                            or _LEN.unpack_from(data)[0] != qid:
                        self.mismatched += 1
                        upstream.ignored += 1
                        continue
                    try:
                        msg = wire.parse_message(data)
                    except wire.WireError:
                        self.malformed += 1
                        upstream.ignored += 1
                        continue
                    if not (msg.flags & wire.QR) or not _same_question(msg, question):
                        self.mismatched += 1
                        upstream.ignored += 1
                        continue
                    if not fut.done():
                        fut.set_result((data, msg))
                    return

            loop.add_reader(fd, readable)
            try:
                sock.sendto(wire.build_query(qid, question, cd=cd, do=do),
                            (upstream.host, upstream.port))
                # A timer on the future itself (asyncio.wait_for would wrap it in a task).
                timer = loop.call_later(timeout, _expire, fut)
                try:
                    return await fut
                finally:
                    timer.cancel()
            finally:
                loop.remove_reader(fd)
        finally:
            sock.close()

    # --- one exchange over TCP ------------------------------------------------------

    async def _tcp(self, upstream: Upstream, question: bytes, do: bool, cd: bool,
                   timeout: float) -> tuple[bytes, wire.Message]:
        async def exchange() -> tuple[bytes, wire.Message]:
            reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
            try:
                qid = secrets.randbits(16)
                query = wire.build_query(qid, question, cd=cd, do=do, payload=65535)
                writer.write(_LEN.pack(len(query)) + query)
                await writer.drain()
                while True:  # bounded by the timeout around us
                    (length,) = _LEN.unpack(await reader.readexactly(2))
                    data = await reader.readexactly(length)
                    if len(data) < 12 or _LEN.unpack_from(data)[0] != qid:
                        self.mismatched += 1
                        upstream.ignored += 1
                        continue
                    msg = wire.parse_message(data)
                    if not (msg.flags & wire.QR) or not _same_question(msg, question):
                        self.mismatched += 1
                        upstream.ignored += 1
                        continue
                    return data, msg
            finally:
                writer.close()
                try:
                    await writer.wait_closed()
                except (OSError, ConnectionError):
                    pass

        return await asyncio.wait_for(exchange(), timeout)


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


def _same_question(msg: wire.Message, question: bytes) -> bool:
    """Name (case-insensitive: msg.qname is already lower-case), type and class match."""
    name_len = len(question) - 4
    return msg.qname == question[:name_len] and \
        (msg.qtype, msg.qclass) == wire.TYPE_CLASS.unpack_from(question, name_len)
