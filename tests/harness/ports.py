"""Pick loopback ports that are free for both UDP and TCP.

Ports are drawn at random from a range *below* the kernel's ephemeral range
(``/proc/sys/net/ipv4/ip_local_port_range``), so that the short window between
"checked free" and "daemon bound it" does not collide with the source ports
that every outgoing socket (dig, dnspython, moat's own upstream queries) gets
from the kernel.  A port is never handed out twice by one process.
"""

from __future__ import annotations

import errno
import random
import socket
import threading

__all__ = ["free_port", "free_port_on", "is_port_free"]

_LOCK = threading.Lock()
_HANDED_OUT: set[int] = set()
_MAX_ATTEMPTS = 200


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def _candidate_range() -> tuple[int, int]:
    lo, hi = _ephemeral_range()
    # Prefer the gap below the ephemeral range; fall back to above it.
    if lo - 1 - 20000 >= 1000:
        return 20000, lo - 1
    if 65535 - (hi + 1) >= 1000:
        return hi + 1, 65535
    return 1024, 65535


def _family_for(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def is_port_free(port: int, host: str = "127.0.0.1", family: int | None = None) -> bool:
    """True if ``port`` can be bound right now on ``host`` for both UDP and TCP."""
    fam = family if family is not None else _family_for(host)
    socks: list[socket.socket] = []
    try:
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            s = socket.socket(fam, kind)
            socks.append(s)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
        return True
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            return False
        raise
    finally:
        for s in socks:
            s.close()


def free_port_on(*hosts: str) -> int:
    """A port free for UDP and TCP on every one of ``hosts`` (e.g. 127.0.0.1 and ::1)."""
    if not hosts:
        hosts = ("127.0.0.1",)
    lo, hi = _candidate_range()
    rng = random.SystemRandom()
    with _LOCK:
        for _ in range(_MAX_ATTEMPTS):
            port = rng.randint(lo, hi)
            if port in _HANDED_OUT:
                continue
            if all(is_port_free(port, h) for h in hosts):
                _HANDED_OUT.add(port)
                return port
        # Last resort: let the kernel choose (inside the ephemeral range).
        for _ in range(_MAX_ATTEMPTS):
            s = socket.socket(_family_for(hosts[0]), socket.SOCK_STREAM)
            try:
                s.bind((hosts[0], 0))
                port = s.getsockname()[1]
            finally:
                s.close()
            if port not in _HANDED_OUT and all(is_port_free(port, h) for h in hosts):
                _HANDED_OUT.add(port)
                return port
    raise RuntimeError(f"no port free for both UDP and TCP on {hosts} after {_MAX_ATTEMPTS} tries")


def free_port(family: int = socket.AF_INET, host: str | None = None) -> int:
    """A port that is free for BOTH UDP and TCP on ``host`` at this moment.

    ``host`` defaults to 127.0.0.1 for AF_INET and ::1 for AF_INET6.
    """
    if host is None:
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    if _family_for(host) != family:
        raise ValueError(f"host {host!r} does not match address family {family!r}")
    return free_port_on(host)
