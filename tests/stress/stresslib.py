"""Shared pieces of the stress scripts (fuzz_server.py, reload_under_load.py, soak.py):
starting nsd + moat, reading moat's RSS and /metrics, running dnsperf, and a fast
random mutator of valid DNS packets. Everything talks to 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
for p in (str(TESTS), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rcode  # noqa: E402
from harness import (  # noqa: E402
    EXAMPLE_ZONE,
    MoatProcess,
    NsdServer,
    find_binary,
    free_port,
    make_zone,
)
from harness.scrape import metric, scrape  # noqa: E402

from bench.dnsperf import PerfResult  # noqa: E402
from bench.dnsperf import parse as parse_dnsperf  # noqa: E402

# re-exported for the scripts
__all__ = ["EXAMPLE_ZONE", "MoatProcess", "NsdServer", "make_zone", "metric", "scrape"]

HDR = struct.Struct("!HHHHHH")
RPZ_SOA = ("$TTL 300\n@ SOA ns.rpz.test. hostmaster.rpz.test. 1 3600 600 86400 60\n"
           "@ NS ns.rpz.test.\n")


# --- moat's process: RSS and metrics ------------------------------------------------------


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in kB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_parts_kb(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of ``pid`` in kB: heap vs mapped files (a policy index is a
    mapped file, so its pages count as RSS once touched)."""
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1])
    except OSError:
        pass
    return anon, file


class RssSampler:
    """Samples a process's RSS every ``interval`` s in a thread: [(t, kB)]."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._t0, rss_kb(self.pid)))
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join(5)
        self.samples.append((time.monotonic() - self._t0, rss_kb(self.pid)))
        return self.samples

    def at(self, t: float) -> int:
        """The first sample at or after ``t`` s."""
        for when, kb in self.samples:
            if when >= t:
                return kb
        return self.samples[-1][1] if self.samples else 0


def by_label(text: str, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)\{(.*)\}\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2)))
        if label in got:
            out[got[label]] = out.get(got[label], 0.0) + float(m.group(3))
    return out


# --- a stack: nsd upstream + moat -----------------------------------------------------------


@dataclass
class Stack:
    moat: MoatProcess
    nsd: NsdServer | None
    metrics: str  # HOST:PORT
    workdir: Path

    @property
    def host(self) -> str:
        return self.moat.host

    @property
    def port(self) -> int:
        return self.moat.port

    @property
    def pid(self) -> int:
        return self.moat.pid


@contextlib.contextmanager
def stack(config: str = "", args: tuple[str, ...] = (), zones: dict[str, str] | None = None,
          ready_timeout: float = 60.0) -> Iterator[Stack]:
    """nsd serving ``zones`` (default: the harness's example.test) and moat in front of it,
    with metrics on a free loopback port. Both are stopped on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="moat-stress-"))
    try:
        with NsdServer(zones or {"example.test.": EXAMPLE_ZONE}) as nsd:
            mport = free_port()
            cfg = workdir / "moat.toml"
            cfg.write_text(config)
            m = MoatProcess(["--upstream", nsd.addr, "--config", str(cfg),
                             "--metrics", f"127.0.0.1:{mport}", *args],
                            ready_timeout=ready_timeout)
            try:
                yield Stack(m, nsd, f"127.0.0.1:{mport}", workdir)
            finally:
                m.stop(timeout=20)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def udp_query(host: str, port: int, name: str, rdtype: str = "A", timeout: float = 2.0,
              tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    if tcp:
        return dns.query.tcp(q, host, port=port, timeout=timeout)
    return dns.query.udp(q, host, port=port, timeout=timeout)


def check_still_correct(host: str, port: int) -> list[str]:
    """moat answers correctly over UDP and TCP: problems found (empty: all good)."""
    problems = []
    for tcp in (False, True):
        for name, want in (("www.example.test", "192.0.2.10"), ("c2.moat.test", "0.0.0.0")):
            for _attempt in range(3):
                try:
                    r = udp_query(host, port, name, tcp=tcp)
                    break
                except Exception as exc:  # noqa: BLE001 - reported below
                    r = exc  # type: ignore[assignment]
            if isinstance(r, Exception):
                problems.append(f"{name} ({'tcp' if tcp else 'udp'}): {r!r}")
                continue
            got = [rd.address for rrset in r.answer for rd in rrset if hasattr(rd, "address")]
            if got != [want]:
                problems.append(f"{name} ({'tcp' if tcp else 'udp'}): {got}, want {want}")
    return problems


# --- dnsperf ------------------------------------------------------------------------------


def dnsperf(host: str, port: int, datafile: Path, *, qps: int, seconds: float,
            clients: int = 4, timeout: float = 5.0, extra: tuple[str, ...] = ()
            ) -> subprocess.Popen[str]:
    """Start dnsperf (UDP, at most ``qps`` queries a second for ``seconds``)."""
    cmd = [find_binary("dnsperf"), "-s", host, "-p", str(port), "-d", str(datafile),
           "-Q", str(qps), "-l", str(seconds), "-c", str(clients), "-t", str(timeout),
           "-q", "500", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str], timeout: float) -> PerfResult:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        raise AssertionError(f"dnsperf did not finish within {timeout} s:\n{out}") from None
    if proc.returncode != 0:
        raise AssertionError(f"dnsperf exited {proc.returncode}:\n{out}")
    return parse_dnsperf(out)  # bench/dnsperf.py: one parser for the benchmark and these


# --- probing latency at a fixed rate ----------------------------------------------------


class Prober:
    """Asks ``name`` at a fixed rate in a thread, recording (time, RTT or None if lost)."""

    def __init__(self, host: str, port: int, names: list[tuple[str, str]], rate: float,
                 timeout: float = 2.0, tcp_every: int = 0) -> None:
        self.host, self.port = host, port
        self.names = names
        self.interval = 1.0 / rate
        self.timeout = timeout
        self.tcp_every = tcp_every
        self.samples: list[tuple[float, float | None, str]] = []
        self.wrong: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        nxt = time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(self.timeout)
            while not self._stop.is_set() and i < 10_000_000:
                name, rcode = self.names[i % len(self.names)]
                tcp = bool(self.tcp_every) and i % self.tcp_every == 0
                q = dns.message.make_query(name, "A")
                q.id = i & 0xFFFF
                t0 = time.perf_counter()
                got: dns.message.Message | None = None
                try:
                    if tcp:
                        got = udp_query(self.host, self.port, name, tcp=True,
                                        timeout=self.timeout)
                    else:
                        s.sendto(q.to_wire(), (self.host, self.port))
                        for _ in range(10):
                            data = s.recv(4096)
                            if data[:2] == q.to_wire()[:2]:
                                got = dns.message.from_wire(data)
                                break
                except (OSError, TimeoutError, EOFError):
                    got = None
                except Exception as exc:  # noqa: BLE001
                    self.wrong.append(f"{name}: {exc!r}")
                rtt = time.perf_counter() - t0 if got is not None else None
                self.samples.append((time.monotonic(), rtt, "tcp" if tcp else "udp"))
                if got is not None:
                    if dns.rcode.to_text(got.rcode()) != rcode:
                        self.wrong.append(f"{name}: {dns.rcode.to_text(got.rcode())}")
                i += 1
                nxt += self.interval
                self._stop.wait(max(0.0, nxt - time.monotonic()))

    def start(self) -> Prober:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 5)

    def rtts(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        return [r for t, r, _ in self.samples if r is not None and start <= t <= end]

    def lost(self) -> int:
        return sum(1 for _, r, _ in self.samples if r is None)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


# --- mutating valid packets ---------------------------------------------------------------


def _q(name: str, rdtype: str = "A", rdclass: str = "IN", **kw: Any) -> bytes:
    return dns.message.make_query(name, rdtype, rdclass, **kw).to_wire()


def _name(text: str) -> bytes:
    out = b""
    for label in text.strip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def seed_packets() -> list[bytes]:
    """Valid queries and answers of many shapes: the material the mutator works on."""
    import dns.edns
    import dns.flags
    import dns.rrset

    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    seeds = [
        _q("www.example.test"), _q("www.example.test", use_edns=0),
        _q("www.example.test", "AAAA", use_edns=0, want_dnssec=True),
        _q("WWW.Example.TEST", "MX", use_edns=0, flags=dns.flags.RD | dns.flags.CD),
        _q("chain.example.test", "A", use_edns=0,
           options=[dns.edns.ECSOption("192.0.2.0", 24),
                    dns.edns.GenericOption(10, b"12345678")]),
        _q("c2.moat.test"), _q("malware.moat.test", "AAAA", use_edns=0),
        _q("nope.example.test", "TXT", use_edns=0, payload=4096),
        _q("x.wild.example.test", "ANY"), _q("version.bind", "TXT", "CH"),
        _q(".", "NS", use_edns=0), _q(".".join(["a" * 63] * 3 + ["b" * 61])),
        HDR.pack(1, 0x0100, 1, 0, 0, 2) + _name("www.example.test") +
        struct.pack("!HH", 1, 1) + opt + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) +
        b"\x7f\x00\x00\x01",
        HDR.pack(2, 0x2000, 1, 0, 0, 0) + _name("example.test") + struct.pack("!HH", 6, 1),
        HDR.pack(3, 0x0100, 2, 0, 0, 0) + _name("a.test") + b"\x00\x01\x00\x01" +
        _name("b.test") + b"\x00\x01\x00\x01",
    ]
    for name, rdtype, records in (
            ("www.example.test", "A", [("www.example.test.", "A", "192.0.2.10")]),
            ("chain.example.test", "A", [("chain.example.test.", "CNAME", "alias.example.test."),
                                         ("alias.example.test.", "CNAME", "www.example.test."),
                                         ("www.example.test.", "A", "192.0.2.10")]),
            ("mx.example.test", "MX", [("mx.example.test.", "MX", "10 mail.example.test.")])):
        q = dns.message.make_query(name, rdtype, use_edns=0)
        r = dns.message.make_response(q)
        for owner, t, text in records:
            r.answer.append(dns.rrset.from_text(owner, 300, "IN", t, text))
        seeds.append(r.to_wire())
    return seeds


class Mutator:
    """Random mutations of valid packets (bit flips, truncation, insertion, deletion,
    count fields, compression pointers, flags, case), fast enough for ~100k/s."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.seeds = seed_packets()

    def packet(self) -> bytes:
        rng = self.rng
        kind = rng.random()
        if kind < 0.05:
            return rng.randbytes(rng.randrange(0, 64))
        if kind < 0.08:
            return rng.randbytes(rng.randrange(12, 600))
        data = bytearray(rng.choice(self.seeds))
        data[0:2] = rng.randbytes(2)
        for _ in range(rng.randrange(1, 5)):
            n = len(data)
            if n == 0:
                data += rng.randbytes(rng.randrange(1, 20))
                continue
            op = rng.randrange(11)
            pos = rng.randrange(n)
            if op == 0:
                data[pos] ^= 1 << rng.randrange(8)
            elif op == 1:
                del data[rng.randrange(n + 1):]
            elif op == 2:
                data[pos:pos] = rng.randbytes(rng.randrange(1, 8))
            elif op == 3:
                del data[pos:pos + rng.randrange(1, 8)]
            elif op == 4 and n >= 12:
                w = 4 + 2 * rng.randrange(4)
                data[w:w + 2] = struct.pack("!H", rng.choice((0, 1, 2, 3, 255, 0xFFFF,
                                                              rng.randrange(65536))))
            elif op == 5 and n > 13:
                at = rng.randrange(12, n - 1)
                target = rng.choice((at, 12, n, 0x3FFF, rng.randrange(n + 8)))
                data[at:at + 2] = struct.pack("!H", 0xC000 | (target & 0x3FFF))
            elif op == 6:
                data[pos] = rng.choice((0, 0x3F, 0x40, 0x80, 0xC0, 0xFF, 41, rng.randrange(256)))
            elif op == 7 and n >= 4:
                data[2:4] = rng.randbytes(2)
            elif op == 8 and n > 12:
                if chr(data[pos]).isalpha():
                    data[pos] ^= 0x20
            elif op == 9:
                data += data[pos:pos + rng.randrange(1, 40)]
            else:
                data += rng.randbytes(rng.randrange(1, 32))
        return bytes(data)
