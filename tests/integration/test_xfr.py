"""RPZ by zone transfer (resolver/xfr.py) against a real primary: Knot DNS on loopback.

Knot serves ``rpz.test.`` with ``zonefile-load: difference`` and a journal, so
``KnotServer.update_zone`` gives a real IXFR and a real NOTIFY (Knot 3.2 sends NOTIFY over
TCP). Until the pipeline's NOTIFY hook is wired in moat, a small asyncio listener here
(UDP and TCP, like moat's listeners) hands every message to ``handle_notify``. The last
test runs the real ``moat serve`` and is skipped until app.py constructs ZoneTransfers.

Every test is bounded (``run(..., timeout)``), uses loopback only and stops what it starts.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.zone
import pytest
from harness import REPO_ROOT, KnotServer, dns_query, free_port_on, require_binary
from harness.waiting import wait_for_async as wait_for

from policy.build import build_policy
from policy.settings import PolicySettings, SourceSettings, TsigKey
from resolver.xfr import ZoneTransfers

pytestmark = pytest.mark.integration

ORIGIN = "rpz.test."
A = 1


def rpz(serial: int, *rules: str, refresh: int = 3600, retry: int = 600,
        expire: int = 86400) -> str:
    body = "\n".join(rules)
    return (f"$ORIGIN {ORIGIN}\n$TTL 60\n"
            f"@ 60 IN SOA ns1.rpz.test. hostmaster.rpz.test. {serial} {refresh} {retry} "
            f"{expire} 60\n"
            "@ 60 IN NS localhost.\n"
            f"{body}\n")


RULES1 = ("bad.example CNAME .", "*.evil.example CNAME .", "tracker.example CNAME *.",
          "ok.bad.example CNAME rpz-passthru.")


def run(coro: Awaitable[Any], timeout: float = 60.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def source(knot: KnotServer, name: str = "rpz", **kw: Any) -> SourceSettings:
    kw.setdefault("timeout", 5.0)
    return SourceSettings(name=name, zone=ORIGIN.rstrip("."),
                          primary=f"127.0.0.1:{knot.port}", **kw)


class Changes(list[str]):
    """The sources ZoneTransfers reported as changed, in order (its on_change callback)."""

    async def record(self, name: str) -> None:
        self.append(name)


def sample(zt: Any, metric: str, **labels: str) -> float | None:
    for family in zt.collect():
        for s in family.samples:
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def policy_blocks(state_dir: Path, src: SourceSettings, name: str) -> bool:
    policy, report = build_policy(PolicySettings(sources=(src,), selftest=False),
                                  state_dir=str(state_dir))
    assert report.sources[0].status in ("loaded", "empty"), report.sources[0]
    return policy.check_query(name, A, "192.0.2.1") is not None


class NotifyListener:
    """UDP + TCP on 127.0.0.1:port, every message to ``handler(raw, addr)`` (as moat's
    pipeline does for opcode 4)."""

    def __init__(self, port: int, handler: Callable[[bytes, Any], bytes | None]) -> None:
        self.port = port
        self.handler = handler
        self.received: list[tuple[str, str]] = []  # (transport, source address)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None

    async def start(self) -> NotifyListener:
        loop = asyncio.get_running_loop()
        listener = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                listener.received.append(("udp", addr[0]))
                answer = listener.handler(data, addr)
                if answer is not None:
                    self.transport.sendto(answer, addr)

        self._udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1",
                                                                            self.port))

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            addr = writer.get_extra_info("peername")
            try:
                while True:
                    head = await reader.readexactly(2)
                    data = await reader.readexactly(struct.unpack("!H", head)[0])
                    listener.received.append(("tcp", addr[0]))
                    answer = listener.handler(data, addr)
                    if answer is not None:
                        writer.write(struct.pack("!H", len(answer)) + answer)
                        await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self._tcp = await asyncio.start_server(tcp, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()


def notify_message(zone: str = ORIGIN, key: dns.tsig.Key | None = None) -> dns.message.Message:
    q = dns.message.make_query(zone, "SOA")
    q.set_opcode(dns.opcode.NOTIFY)
    q.flags = (q.flags & ~dns.flags.RD) | dns.flags.AA
    if key is not None:
        q.use_tsig(key)
    return q


def exchange(port: int, q: dns.message.Message, *, source: str = "127.0.0.1",
             tcp: bool = False, timeout: float = 3.0) -> bytes:
    """Send ``q`` from ``source`` (any 127/8 address is loopback) and return the raw answer."""
    wire = q.to_wire()
    kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.settimeout(timeout)
        s.bind((source, 0))
        if tcp:
            s.connect(("127.0.0.1", port))
            s.sendall(struct.pack("!H", len(wire)) + wire)
            head = b""
            while len(head) < 2:
                chunk = s.recv(2 - len(head))
                assert chunk, "connection closed without an answer"
                head += chunk
            n = struct.unpack("!H", head)[0]
            data = b""
            while len(data) < n:
                chunk = s.recv(n - len(data))
                assert chunk, "connection closed inside the answer"
                data += chunk
            return data
        s.sendto(wire, ("127.0.0.1", port))
        return s.recvfrom(65535)[0]


def check_notify_answer(raw: bytes, q: dns.message.Message, rcode: int) -> dns.message.Message:
    r = dns.message.from_wire(raw, keyring=False)
    assert r.id == q.id
    assert r.flags & dns.flags.QR
    assert r.opcode() == dns.opcode.NOTIFY
    assert r.rcode() == rcode, dns.rcode.to_text(r.rcode())
    assert r.question == q.question
    if rcode == dns.rcode.NOERROR:
        assert r.flags & dns.flags.AA
    return r


@pytest.fixture
def knot_bin() -> None:
    require_binary("knotd")
    require_binary("knotc")


# --------------------------------------------------------------------------------------


def test_axfr_then_notify_ixfr_and_restart(tmp_path: Path, knot_bin: None) -> None:
    notify_port = free_port_on("127.0.0.1")
    with KnotServer({ORIGIN: rpz(1, *RULES1)}, notify_to=[("127.0.0.1", notify_port)]) as knot:
        src = source(knot)
        changes = Changes()

        async def scenario() -> None:
            zt = ZoneTransfers([src], str(tmp_path), changes.record)
            listener = await NotifyListener(notify_port, zt.handle_notify).start()
            try:
                t0 = time.monotonic()
                await zt.start(initial_timeout=10)
                assert time.monotonic() - t0 < 10
                path = tmp_path / "zones" / "rpz.zone"
                assert path.is_file()
                # The file reads back with dnspython (origin = the zone), SOA included.
                zone = dns.zone.from_file(str(path), origin=ORIGIN, relativize=True)
                assert zone.get_rdataset("@", "SOA")[0].serial == 1
                assert zone.get_rdataset("bad.example", "CNAME")[0].target.to_text() == "."
                assert zone.get_rdataset("*.evil.example", "CNAME") is not None
                assert path.read_text().startswith(f"$ORIGIN {ORIGIN}\n@ 60 IN SOA")
                # ... and with the policy's RPZ parser.
                assert policy_blocks(tmp_path, src, "bad.example")
                assert policy_blocks(tmp_path, src, "x.evil.example")
                assert not policy_blocks(tmp_path, src, "new.example")
                assert zt.serial("rpz") == 1
                assert sample(zt, "moat_zone_transfers_total", source="rpz", kind="axfr",
                              result="ok") == 1
                assert changes == []  # finished inside start(): the caller builds next

                # A new rule on the primary: NOTIFY (over TCP from knot) -> IXFR.
                await asyncio.to_thread(knot.update_zone, ORIGIN,
                                        rpz(2, *RULES1, "new.example CNAME ."))
                await wait_for(lambda: changes == ["rpz"], 15, "on_change after NOTIFY")
                assert ("tcp", "127.0.0.1") in listener.received
                assert sample(zt, "moat_notify_total", source="rpz", result="accepted") >= 1
                assert sample(zt, "moat_zone_transfers_total", source="rpz", kind="ixfr",
                              result="ok") == 1
                assert sample(zt, "moat_zone_transfers_total", source="rpz", kind="axfr",
                              result="ok") == 1
                assert sample(zt, "moat_zone_serial", source="rpz") == 2
                zone = dns.zone.from_file(str(path), origin=ORIGIN, relativize=True)
                assert zone.get_rdataset("new.example", "CNAME") is not None
                assert zone.get_rdataset("bad.example", "CNAME") is not None
                assert policy_blocks(tmp_path, src, "new.example")

                # NOTIFY over UDP from the primary's address: accepted, answered properly.
                q = notify_message()
                raw = await asyncio.to_thread(exchange, notify_port, q)
                check_notify_answer(raw, q, dns.rcode.NOERROR)
                q = notify_message()
                raw = await asyncio.to_thread(exchange, notify_port, q, tcp=True)
                check_notify_answer(raw, q, dns.rcode.NOERROR)
                await wait_for(lambda: (sample(zt, "moat_zone_transfers_total", source="rpz",
                                               kind="ixfr", result="uptodate") or 0) >= 1,
                               10, "an up-to-date check after the UDP NOTIFY")
                assert changes == ["rpz"]  # nothing new: no rebuild
            finally:
                await zt.stop()
                await listener.stop()

            # Restart: the copy on disk protects at once; the first check is an IXFR
            # from its serial, in the background.
            changes.clear()
            zt2 = ZoneTransfers([src], str(tmp_path), changes.record)
            try:
                t0 = time.monotonic()
                await zt2.start(initial_timeout=10)
                assert time.monotonic() - t0 < 0.5
                await wait_for(lambda: sample(zt2, "moat_zone_transfers_total", source="rpz",
                                              kind="ixfr", result="uptodate") == 1,
                               10, "the IXFR check from the serial on disk")
                assert zt2.serial("rpz") == 2
                assert sample(zt2, "moat_zone_transfers_total", source="rpz", kind="axfr",
                              result="ok") == 0
                assert changes == []
            finally:
                await zt2.stop()

        run(scenario(), 60)


def test_notify_from_others_is_refused(tmp_path: Path, knot_bin: None) -> None:
    notify_port = free_port_on("127.0.0.1")
    with KnotServer({ORIGIN: rpz(1, *RULES1)}) as knot:
        src = source(knot)
        changes = Changes()  # (none expected)

        async def scenario() -> None:
            zt = ZoneTransfers([src], str(tmp_path), changes.record)
            listener = await NotifyListener(notify_port, zt.handle_notify).start()
            try:
                await zt.start(initial_timeout=10)
                for tcp in (False, True):
                    q = notify_message()
                    raw = await asyncio.to_thread(exchange, notify_port, q,
                                                  source="127.0.0.2", tcp=tcp)
                    check_notify_answer(raw, q, dns.rcode.REFUSED)
                assert ("udp", "127.0.0.2") in listener.received
                assert ("tcp", "127.0.0.2") in listener.received
                assert sample(zt, "moat_notify_total", source="rpz", result="refused") == 2
                assert sample(zt, "moat_notify_total", source="rpz", result="accepted") == 0
                # A zone moat does not transfer, even from the primary's address.
                q = notify_message("other.test.")
                raw = await asyncio.to_thread(exchange, notify_port, q)
                check_notify_answer(raw, q, dns.rcode.REFUSED)
                assert sample(zt, "moat_notify_total", source="-", result="refused") == 1
                # Not a NOTIFY / garbage: nothing to answer, no crash.
                assert zt.handle_notify(b"\x00\x01garbage", ("127.0.0.1", 5)) is None
                # No transfer was triggered by the refused ones.
                await asyncio.sleep(0.7)
                total = sum(sample(zt, "moat_zone_transfers_total", source="rpz", kind=k,
                                   result=r) or 0
                            for k in ("axfr", "ixfr")
                            for r in ("ok", "uptodate", "refused", "timeout", "tsig", "error"))
                assert total == 1  # the initial AXFR only
            finally:
                await zt.stop()
                await listener.stop()

            # A process that only answers NOTIFY (a worker: never started) passes accepted
            # ones on through on_notify.
            passed: list[str] = []
            answering = ZoneTransfers([src], str(tmp_path / "w"), changes.record,
                                      on_notify=passed.append)
            q = notify_message()
            raw = answering.handle_notify(q.to_wire(), ("127.0.0.2", 5300))
            assert raw is not None
            check_notify_answer(raw, q, dns.rcode.REFUSED)
            assert passed == []
            raw = answering.handle_notify(q.to_wire(), ("::ffff:127.0.0.1", 5300))
            assert raw is not None
            check_notify_answer(raw, q, dns.rcode.NOERROR)
            assert passed == ["rpz"]

        run(scenario(), 40)


def test_tsig_transfers_and_notify(tmp_path: Path, knot_bin: None) -> None:
    secret = base64.b64encode(secrets.token_bytes(32)).decode()
    wrong = base64.b64encode(secrets.token_bytes(32)).decode()
    notify_port = free_port_on("127.0.0.1")
    tsig = TsigKey(name="xfr-key", secret=secret, algorithm="hmac-sha256")
    key = dns.tsig.Key("xfr-key.", secret, "hmac-sha256")
    bad_key = dns.tsig.Key("xfr-key.", wrong, "hmac-sha256")
    other_name = dns.tsig.Key("other-key.", secret, "hmac-sha256")
    with KnotServer({ORIGIN: rpz(1, *RULES1)}, notify_to=[("127.0.0.1", notify_port)],
                    tsig=("xfr-key", "hmac-sha256", secret)) as knot:
        src = source(knot, tsig=tsig)
        changes = Changes()

        async def scenario() -> None:
            # Without the key the primary refuses the transfer: no copy appears.
            unsigned_dir = tmp_path / "unsigned"
            zt0 = ZoneTransfers([source(knot)], str(unsigned_dir), changes.record)
            out = await zt0.refresh("rpz")
            assert out.result == "refused", out
            assert not (unsigned_dir / "zones" / "rpz.zone").exists()
            await zt0.stop()

            zt = ZoneTransfers([src], str(tmp_path), changes.record)
            listener = await NotifyListener(notify_port, zt.handle_notify).start()
            try:
                await zt.start(initial_timeout=10)
                assert zt.serial("rpz") == 1
                assert policy_blocks(tmp_path, src, "bad.example")

                # Knot's NOTIFY is signed with the key: accepted, IXFR signed too.
                await asyncio.to_thread(knot.update_zone, ORIGIN,
                                        rpz(2, *RULES1, "new.example CNAME ."))
                await wait_for(lambda: changes == ["rpz"], 15, "on_change after signed NOTIFY")
                assert sample(zt, "moat_zone_transfers_total", source="rpz", kind="ixfr",
                              result="ok") == 1
                assert policy_blocks(tmp_path, src, "new.example")
                accepted = sample(zt, "moat_notify_total", source="rpz", result="accepted")
                assert accepted is not None and accepted >= 1

                # From the primary's address but unsigned / wrong secret / unknown key name.
                for k in (None, bad_key, other_name):
                    q = notify_message(key=k)
                    raw = await asyncio.to_thread(exchange, notify_port, q)
                    r = check_notify_answer(raw, q, dns.rcode.REFUSED)
                    assert not r.had_tsig
                assert sample(zt, "moat_notify_total", source="rpz", result="refused") == 3
                # With the key: accepted, and the answer is signed with it (validated here).
                q = notify_message(key=key)
                raw = await asyncio.to_thread(exchange, notify_port, q)
                r = dns.message.from_wire(raw, keyring={key.name: key}, request_mac=q.mac)
                assert r.had_tsig
                check_notify_answer(raw, q, dns.rcode.NOERROR)
            finally:
                await zt.stop()
                await listener.stop()

        run(scenario(), 60)


def test_primary_down_keeps_the_copy_and_expiry_is_loud(
        tmp_path: Path, knot_bin: None, caplog: pytest.LogCaptureFixture) -> None:
    offset = [0.0]

    def clock() -> float:
        return time.time() + offset[0]

    knot = KnotServer({ORIGIN: rpz(7, *RULES1, refresh=3600, retry=1, expire=60)})
    knot.start()
    try:
        src = source(knot, timeout=2.0)
        changes = Changes()

        async def scenario() -> None:
            zt = ZoneTransfers([src], str(tmp_path), changes.record, clock=clock)
            try:
                await zt.start(initial_timeout=10)
                path = tmp_path / "zones" / "rpz.zone"
                before = path.read_bytes()
                knot.stop()
                out = await zt.refresh("rpz")
                assert out.result == "error", out
                assert out.kind == "ixfr"
                assert path.read_bytes() == before
                assert zt.serial("rpz") == 7
                assert sample(zt, "moat_zone_transfers_total", source="rpz", kind="ixfr",
                              result="error") == 1
                assert sample(zt, "moat_zone_expired", source="rpz") == 0
                # The retry timer (SOA retry = 1 s) keeps trying in the background.
                await wait_for(lambda: (sample(zt, "moat_zone_transfers_total", source="rpz",
                                               kind="ixfr", result="error") or 0) >= 2,
                               10, "a retry on the SOA retry timer")
                # Past SOA expire: loud, but the copy stays and still protects.
                offset[0] = 120.0
                out = await zt.refresh("rpz")
                assert out.result == "error"
                assert sample(zt, "moat_zone_expired", source="rpz") == 1
                assert any("EXPIRED" in r.getMessage() and r.levelname == "ERROR"
                           for r in caplog.records)
                assert path.read_bytes() == before
                assert policy_blocks(tmp_path, src, "bad.example")
            finally:
                await zt.stop()

        run(scenario(), 60)
    finally:
        knot.stop()


def test_ixfr_answered_with_full_zone_counts_as_axfr(tmp_path: Path, knot_bin: None) -> None:
    """A copy whose serial the primary's journal does not know (another primary, a reset):
    the IXFR is answered with the whole zone, and the copy is replaced by it."""
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "rpz.zone").write_text(rpz(3, "stale.example CNAME ."))
    with KnotServer({ORIGIN: rpz(5, *RULES1)}) as knot:
        src = source(knot)
        changes = Changes()

        async def scenario() -> None:
            zt = ZoneTransfers([src], str(tmp_path), changes.record)
            try:
                await zt.start(initial_timeout=10)  # a copy exists: no waiting
                await wait_for(lambda: changes == ["rpz"], 10, "the transfer")
                assert sample(zt, "moat_zone_transfers_total", source="rpz", kind="axfr",
                              result="ok") == 1
                assert sample(zt, "moat_zone_transfers_total", source="rpz", kind="ixfr",
                              result="ok") == 0
                assert zt.serial("rpz") == 5
                zone = dns.zone.from_file(str(zones / "rpz.zone"), origin=ORIGIN)
                assert zone.get_rdataset("stale.example", "CNAME") is None
                assert zone.get_rdataset("bad.example", "CNAME") is not None
            finally:
                await zt.stop()

        run(scenario(), 40)


# --- end to end, through the real `moat serve` (enabled once app.py wires xfr) ---------


def _xfr_wired() -> bool:
    text = (REPO_ROOT / "resolver" / "app.py").read_text()
    return "ZoneTransfers" in text and "notify_handler" in text


def test_moat_serve_rpz_by_transfer_and_notify(tmp_path: Path, knot_bin: None,
                                               moat: Any, fake_upstream: Any) -> None:
    if not _xfr_wired():
        pytest.skip("resolver/app.py does not construct ZoneTransfers yet")
    listen_port = free_port_on("127.0.0.1")
    with KnotServer({ORIGIN: rpz(1, *RULES1)},
                    notify_to=[("127.0.0.1", listen_port)]) as knot:
        cfg = tmp_path / "moat.toml"
        cfg.write_text(
            "[policy]\nselftest = false\n\n"
            "[[policy.source]]\n"
            'name = "rpz-xfr"\n'
            f'zone = "{ORIGIN.rstrip(".")}"\n'
            f'primary = "127.0.0.1:{knot.port}"\n'
            'timeout = "3s"\n')
        proc = moat("--config", str(cfg), upstream=fake_upstream,
                    listen=f"127.0.0.1:{listen_port}", ready_timeout=20)
        r = dns_query(proc.host, proc.port, "bad.example", "A")
        assert r.rcode() == dns.rcode.NXDOMAIN, r
        r = dns_query(proc.host, proc.port, "new.example", "A")
        assert r.rcode() == dns.rcode.NOERROR, r  # forwarded to the fake upstream
        # moat's own listeners answer NOTIFY over UDP too: the primary's address only.
        q = notify_message()
        check_notify_answer(exchange(listen_port, q), q, dns.rcode.NOERROR)
        q = notify_message()
        check_notify_answer(exchange(listen_port, q, source="127.0.0.2"), q, dns.rcode.REFUSED)
        knot.update_zone(ORIGIN, rpz(2, *RULES1, "new.example CNAME ."))
        deadline = time.monotonic() + 15
        while True:
            # the policy is checked before the cache: no stale answer hides a new rule
            r = dns_query(proc.host, proc.port, "new.example", "A")
            if r.rcode() == dns.rcode.NXDOMAIN:
                break
            assert time.monotonic() < deadline, "new.example not blocked 15s after NOTIFY\n" + \
                proc.stderr_text()
            time.sleep(0.2)
        state = Path(proc.state_dir) / "zones" / "rpz-xfr.zone"
        assert state.is_file()
        assert "new.example" in state.read_text()



def test_refresh_timer_picks_up_a_change_without_notify(tmp_path: Path, knot_bin: None) -> None:
    """A primary that sends no NOTIFY (or whose NOTIFY is lost): the SOA refresh timer
    (2 s here) finds the new serial and the change arrives by IXFR."""
    with KnotServer({ORIGIN: rpz(1, *RULES1, refresh=2, retry=1)}) as knot:
        src = source(knot)
        changes = Changes()

        async def scenario() -> None:
            zt = ZoneTransfers([src], str(tmp_path), changes.record)
            try:
                await zt.start(initial_timeout=10)
                assert zt.serial("rpz") == 1
                t_change = time.monotonic()
                await asyncio.to_thread(knot.update_zone, ORIGIN,
                                        rpz(2, *RULES1, "late.example CNAME .", refresh=2,
                                            retry=1))
                await wait_for(lambda: changes == ["rpz"], 10, "the refresh timer's IXFR")
                assert time.monotonic() - t_change < 2 * 1.1 + 2  # one refresh (+ jitter)
                assert sample(zt, "moat_zone_transfers_total", source="rpz", kind="ixfr",
                              result="ok") == 1
                assert sample(zt, "moat_notify_total", source="rpz", result="accepted") in (
                    None, 0)
                assert zt.serial("rpz") == 2
                assert policy_blocks(tmp_path, src, "late.example")
            finally:
                await zt.stop()

        run(scenario(), 60)
