"""The Python ceiling: how fast can Python answer DNS over UDP at all?

A minimal asyncio UDP responder. Answers for the cache-hit names are built once,
up front (header, question, one A record); a query is answered by looking up its
bytes after the ID in a dict and patching the ID in. Anything else (blocked
names, misses) gets NXDOMAIN by flipping header bits, with no parsing. No policy,
no cache logic, no upstream: an upper bound for any Python resolver on this
machine, with uvloop and with asyncio's default loop.

    python -m bench.ceiling --listen 127.0.0.1:PORT --names FILE [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import struct

_QUERY_TAIL = b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"  # RD, QD=1 (as dnsperf sends)


def _qname(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def build_table(names: list[str]) -> dict[bytes, bytes]:
    """query bytes after the ID -> answer bytes after the ID."""
    table = {}
    for i, name in enumerate(names):
        question = _qname(name) + b"\x00\x01\x00\x01"  # A IN
        addr = socket.inet_aton(f"198.18.{(i >> 8) & 255}.{i & 255}")
        answer = b"\xc0\x0c\x00\x01\x00\x01" + struct.pack("!IH", 300, 4) + addr
        for key_name in {name, name.lower()}:
            q = _QUERY_TAIL + _qname(key_name) + b"\x00\x01\x00\x01"
            table[q] = b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + question + answer
    return table


class Responder(asyncio.DatagramProtocol):
    def __init__(self, table: dict[bytes, bytes]) -> None:
        self.table = table
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 12:
            return
        tail = self.table.get(data[2:])
        if tail is None:  # NXDOMAIN: QR, RD, RA, rcode 3; the question echoed
            tail = b"\x81\x83" + data[4:]
        self.transport.sendto(data[:2] + tail, addr)  # type: ignore[union-attr]


async def serve(host: str, port: int, table: dict[bytes, bytes]) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind((host, port))
    transport, _ = await loop.create_datagram_endpoint(lambda: Responder(table), sock=sock)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        transport.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ceiling")
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    ap.add_argument("--names", required=True, metavar="FILE",
                    help="a dnsperf input file: names answered with an A record")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = ap.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    with open(args.names) as fh:
        names = [line.split()[0] for line in fh if line.strip()]
    table = build_table(names)
    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(serve(host, int(port), table))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
