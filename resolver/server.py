"""The transports: thin asyncio protocols that hand bytes to the pipeline.

UDP: one DatagramProtocol per listening socket; each datagram goes straight into
``Pipeline.handle`` (no task per datagram).

TCP (RFC 7766): 2-byte length framing; several queries per connection, handled
concurrently and answered as they complete (possibly out of order); an idle timeout; a
read timeout for a message that has started but not finished arriving (a client that
sends one byte a second); caps on connections in total and per client; reading pauses
while the client is not reading our answers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .pipeline import Pipeline

log = logging.getLogger("moat.server")
_LEN = struct.Struct("!H")


@dataclass(frozen=True, slots=True)
class TcpLimits:
    idle_timeout: float = 10.0
    read_timeout: float = 5.0
    max_connections: int = 256
    max_per_client: int = 32
    max_pending_per_connection: int = 100  # pipelined queries awaiting answers


class UdpListener(asyncio.DatagramProtocol):
    transport = "udp"  # the Responder contract: the transport's name

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.fast = pipeline.fast.answer
        self._t: asyncio.DatagramTransport | None = None
        self.send_errors = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._t = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # Cache hits and known blocked names: resolver/fastpath.py; the rest: the pipeline.
        if not self.fast(data, addr, self):
            self.pipeline.handle(data, addr, self)

    def stop_accepting(self) -> None:
        """Shutdown, first step: ignore new queries, keep the socket to answer the ones
        in flight; close() comes after the drain."""
        self.fast = lambda data, addr, listener: True

    def send(self, data: bytes, addr: Any) -> None:
        t = self._t
        if t is not None and not t.is_closing():
            t.sendto(data, addr)

    def done_without_answer(self) -> None:
        pass

    def error_received(self, exc: Exception) -> None:
        self.send_errors += 1

    def close(self) -> None:
        if self._t is not None:
            self._t.close()


class TcpState:
    """Shared by all TCP connections of one server: counts for the caps."""

    def __init__(self, limits: TcpLimits) -> None:
        self.limits = limits
        self.connections: set[TcpConnection] = set()
        self.per_client: Counter[str] = Counter()
        self.refused = 0  # connections closed at once because of a cap
        self.timed_out = 0


class TcpConnection(asyncio.Protocol):
    transport = "tcp"

    def __init__(self, pipeline: Pipeline, state: TcpState) -> None:
        self.pipeline = pipeline
        self.state = state
        self._t: asyncio.Transport | None = None
        self.peer: Any = None
        self.host = ""
        self.buffer = bytearray()
        self.partial_since = 0.0  # when the message now in the buffer started arriving
        self.last_activity = 0.0
        self.outstanding = 0
        self.paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False

    # --- asyncio callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._t = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")
        self.host = self.peer[0] if self.peer else ""
        st = self.state
        if len(st.connections) >= st.limits.max_connections or \
                st.per_client[self.host] >= st.limits.max_per_client:
            st.refused += 1
            transport.close()
            return
        st.connections.add(self)
        st.per_client[self.host] += 1
        self._counted = True
        self.last_activity = time.monotonic()
        self._arm()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.last_activity = now
        buf = self.buffer
        if not buf:
            self.partial_since = now
        buf += data
        while len(buf) >= 2:
            (length,) = _LEN.unpack_from(buf)
            if len(buf) < 2 + length:
                break
            message = bytes(buf[2:2 + length])
            del buf[:2 + length]
            self.partial_since = now
            if length == 0:
                continue
            self.outstanding += 1
            self.pipeline.handle(message, self.peer, self)
        if self.outstanding >= self.state.limits.max_pending_per_connection and \
                not self.paused and self._t is not None:
            self._t.pause_reading()  # a client pipelining faster than we answer waits
            self.paused = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counted:
            self._counted = False
            self.state.connections.discard(self)
            self.state.per_client[self.host] -= 1
            if self.state.per_client[self.host] <= 0:
                del self.state.per_client[self.host]
        self._t = None

    def pause_writing(self) -> None:
        if self._t is not None and not self.paused:
            self._t.pause_reading()
            self.paused = True

    def resume_writing(self) -> None:
        self._resume()

    # --- Responder ------------------------------------------------------------------

    def send(self, data: bytes, addr: Any) -> None:
        self.outstanding -= 1
        t = self._t
        if t is None or t.is_closing():
            return
        self.last_activity = time.monotonic()
        t.write(_LEN.pack(len(data)) + data)
        if self.outstanding < self.state.limits.max_pending_per_connection // 2:
            self._resume()

    def done_without_answer(self) -> None:
        """A query on this connection ended without an answer (DROP, rate limit)."""
        self.outstanding -= 1

    # --- timers ---------------------------------------------------------------------

    def _resume(self) -> None:
        if self.paused and self._t is not None and not self._t.is_closing() and \
                self._t.get_write_buffer_size() == 0:
            self._t.resume_reading()
            self.paused = False

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(min(1.0, self.state.limits.read_timeout), self._tick)

    def _tick(self) -> None:
        self._timer = None
        t = self._t
        if t is None or t.is_closing():
            return
        now = time.monotonic()
        lim = self.state.limits
        if self.buffer and now - self.partial_since > lim.read_timeout:
            self._expire(t, "slow read")
            return
        if self.outstanding <= 0 and not self.buffer and \
                now - self.last_activity > lim.idle_timeout:
            self._expire(t, "idle")
            return
        self._arm()

    def _expire(self, t: asyncio.Transport, why: str) -> None:
        self.state.timed_out += 1
        log.debug("closing TCP connection from %s: %s", self.peer, why)
        t.close()

    def close(self) -> None:
        if self._t is not None:
            self._t.close()


def udp_socket(host: str, port: int, reuse_port: bool, rcvbuf: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        except OSError:
            pass
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def tcp_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
