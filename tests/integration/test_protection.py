"""Protection (issue 7), with the real `moat serve` process, a real nsd upstream and real
sockets on loopback: who may ask (ACL, the open-resolver warning), how much one client
may ask (per-prefix rate limiting with slip, and that one client's flood does not slow
another), and what an answer may say (DNS rebinding protection).

Other clients are simulated by binding the client socket to other loopback addresses:
127.0.0.0/8 is all loopback on Linux, so 127.0.0.2 is "another client" and 127.0.1.7 is
"a client in another /24" (another rate-limit bucket).

Resource limits (TCP caps, slowloris, in-flight shedding, message size): test_limits.py.
Malformed upstream answers (garbage, wrong ID, wrong question, truncation): test_faults.py.
"""

from __future__ import annotations

import json
import socket
import statistics
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest
from harness import NsdServer, free_port, free_port_on, require_binary
from harness.clients import query_wire, recv_exact, udp_burst
from harness.scrape import metric, scrape

pytestmark = pytest.mark.integration

HDR = struct.Struct("!HHHHHH")

# --- helpers ----------------------------------------------------------------------------


def write_config(tmp_path: Path, text: str, name: str = "moat.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def shed(mport: int) -> dict[str, float]:
    text = scrape(mport)
    return {r: metric(text, "moat_shed_queries_total", reason=r)
            for r in ("acl", "ratelimit-slip", "ratelimit-drop", "ratelimit-refused",
                      "in-flight")}


def ask(host: str, port: int, name: str, rdtype: str = "A", *, source: str | None = None,
        tcp: bool = False, timeout: float = 2.0, **kw: object) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    if tcp:
        return dns.query.tcp(q, host, port=port, timeout=timeout, source=source)
    return dns.query.udp(q, host, port=port, timeout=timeout, source=source)


def addresses(r: dns.message.Message) -> list[str]:
    return sorted(rd.address for rrset in r.answer for rd in rrset if hasattr(rd, "address"))


def flags_of(reply: bytes) -> tuple[int, int, int]:
    """(rcode, TC bit, ANCOUNT) of a raw reply."""
    _, flags, _, an, _, _ = HDR.unpack_from(reply)
    return flags & 0xF, (flags >> 9) & 1, an


# --- access control ---------------------------------------------------------------------


def test_acl_refuses_clients_outside_the_allow_list(moat, nsd_upstream, tmp_path) -> None:
    mport = free_port()
    cfg = write_config(tmp_path, '[acl]\nallow = ["127.0.0.2/32"]\n')
    m = moat("--config", cfg, "--metrics", f"127.0.0.1:{mport}", upstream=nsd_upstream)
    before = shed(mport)["acl"]
    # the allowed client is served over UDP and TCP (and fills the cache)
    for tcp in (False, True):
        r = ask(m.host, m.port, "www.example.test", source="127.0.0.2", tcp=tcp)
        assert r.rcode() == dns.rcode.NOERROR and addresses(r) == ["192.0.2.10"], r
    # everyone else is refused, even for a name in the cache (the UDP fast path must not
    # answer a cache hit for a client the ACL never admitted)
    refused = 0
    for source in ("127.0.0.1", "127.0.0.3"):
        for tcp in (False, True):
            for _ in range(2):
                r = ask(m.host, m.port, "www.example.test", source=source, tcp=tcp)
                assert r.rcode() == dns.rcode.REFUSED and not r.answer, (source, tcp, r)
                refused += 1
    assert shed(mport)["acl"] - before == refused
    # and the refused queries did not stop the allowed client
    r = ask(m.host, m.port, "www.example.test", source="127.0.0.2")
    assert addresses(r) == ["192.0.2.10"]


def test_default_acl_serves_loopback_on_ipv4_and_ipv6(moat, nsd_upstream) -> None:
    port = free_port_on("127.0.0.1", "::1")
    m = moat("--listen", f"[::1]:{port}", listen=f"127.0.0.1:{port}", upstream=nsd_upstream)
    for host, source in (("127.0.0.1", "127.0.0.1"), ("127.0.0.1", "127.0.0.2"),
                         ("127.0.0.1", "127.0.1.7"), ("::1", "::1")):
        for tcp in (False, True):
            r = ask(host, m.port, "www.example.test", source=source, tcp=tcp)
            assert r.rcode() == dns.rcode.NOERROR, (host, source, tcp, r)
            assert addresses(r) == ["192.0.2.10"]


def test_acl_applies_to_ipv6_clients(moat, nsd_upstream, tmp_path) -> None:
    mport = free_port()
    port = free_port_on("127.0.0.1", "::1")
    cfg = write_config(tmp_path, '[acl]\nallow = ["::1/128"]\n')
    moat("--config", cfg, "--listen", f"[::1]:{port}", "--metrics", f"127.0.0.1:{mport}",
         listen=f"127.0.0.1:{port}", upstream=nsd_upstream)
    before = shed(mport)["acl"]
    for tcp in (False, True):
        r = ask("::1", port, "www.example.test", tcp=tcp)
        assert r.rcode() == dns.rcode.NOERROR and addresses(r) == ["192.0.2.10"], r
        r = ask("127.0.0.1", port, "www.example.test", tcp=tcp)
        assert r.rcode() == dns.rcode.REFUSED and not r.answer, r
    assert shed(mport)["acl"] - before == 2


@pytest.mark.parametrize("acl,wildcard,warns", [
    ('["0.0.0.0/0", "::/0"]', True, True),
    (None, True, False),  # the default ACL (loopback and private networks) is not open
    ('["0.0.0.0/0", "::/0"]', False, False),  # open ACL, but only loopback listeners
], ids=["open-acl-on-0.0.0.0", "default-acl-on-0.0.0.0", "open-acl-on-loopback"])
def test_open_resolver_warning_at_start(moat, nsd_upstream, tmp_path, acl: str | None,
                                        wildcard: bool, warns: bool) -> None:
    args: list[str] = []
    if acl is not None:
        args += ["--config", write_config(tmp_path, f"[acl]\nallow = {acl}\n")]
    second = free_port_on("0.0.0.0") if wildcard else free_port()
    bind = "0.0.0.0" if wildcard else "127.0.0.1"
    # the first listener (the one the harness probes) is on loopback; the second is the
    # one under test. Queries only ever go to 127.0.0.1.
    m = moat(*args, "--listen", f"{bind}:{second}", listen=f"127.0.0.1:{free_port()}",
             upstream=nsd_upstream)
    m.wait_for_stderr(r"listening on", timeout=5)
    log = m.stderr_text()
    warning = [line for line in log.splitlines() if "open resolver" in line]
    if warns:
        assert warning, log
        assert f"0.0.0.0:{second}" in warning[0] and "WARNING" in warning[0], warning
    else:
        assert not warning, log
    r = ask("127.0.0.1", second, "www.example.test")
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == ["192.0.2.10"]


# --- rate limiting ----------------------------------------------------------------------

LIMITED = """\
[ratelimit]
exempt = []
rate = 50
burst = 100
slip = 2
"""


def test_flood_beyond_the_burst_gets_tc_or_nothing_tcp_refused_then_refills(
        moat, nsd_upstream, tmp_path) -> None:
    mport = free_port()
    m = moat("--config", write_config(tmp_path, LIMITED), "--metrics", f"127.0.0.1:{mport}",
             upstream=nsd_upstream)
    assert addresses(ask(m.host, m.port, "www.example.test")) == ["192.0.2.10"]  # cached now
    before = shed(mport)
    n = 400
    replies, sending = udp_burst(m.host, m.port,
                                 [query_wire("www.example.test", i) for i in range(n)])
    ok = [r for r in replies.values() if flags_of(r) == (0, 0, 1)]
    tc = [r for r in replies.values() if flags_of(r) == (0, 1, 0)]
    assert len(ok) + len(tc) == len(replies), "answers other than full or TC=1"
    silent = n - len(replies)
    # the burst (100, minus the few tokens the start-up probe and the priming query used)
    # plus what refills at 50/s while the flood lasts
    assert 90 <= len(ok) <= 100 + 50 * (sending + 0.1), (len(ok), sending)
    over = n - len(ok)
    # slip = 2: every 2nd over-limit query gets TC=1 (a real client retries over TCP),
    # the others get nothing
    assert abs(len(tc) - over / 2) <= 1, (len(tc), over)
    assert abs(silent - over / 2) <= 1, (silent, over)
    after = shed(mport)
    assert after["ratelimit-slip"] - before["ratelimit-slip"] == len(tc)
    assert after["ratelimit-drop"] - before["ratelimit-drop"] == silent

    # TCP from the same client over its limit: REFUSED (TCP cannot be spoofed, so TC=1
    # makes no sense there). The bucket refilled a little since the flood (at most about
    # one second's worth, 50): 200 pipelined queries are well over it.
    qs = [query_wire("www.example.test", 5000 + i) for i in range(200)]
    with socket.create_connection((m.host, m.port), timeout=3) as s:
        s.sendall(b"".join(struct.pack("!H", len(q)) + q for q in qs))
        answers = []
        for _ in qs:
            (length,) = struct.unpack("!H", recv_exact(s, 2))
            answers.append(flags_of(recv_exact(s, length)))
    refused = answers.count((dns.rcode.REFUSED, 0, 0))
    served = answers.count((0, 0, 1))
    assert refused + served == len(qs), [a for a in answers if a[0] not in (0, 5)]
    assert refused >= 100 and served <= 100, (refused, served)
    assert shed(mport)["ratelimit-refused"] - before["ratelimit-refused"] == refused

    # the bucket refills: after a pause longer than burst/rate the client is served again
    time.sleep(2.2)
    replies, _ = udp_burst(m.host, m.port,
                           [query_wire("www.example.test", 9000 + i) for i in range(60)])
    assert len(replies) == 60 and all(flags_of(r) == (0, 0, 1) for r in replies.values())


FLOODER = r"""
import socket, struct, sys, time
host, port, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
q = bytes.fromhex(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.setblocking(False)
sent = got = 0
t0 = time.monotonic()
end = t0 + seconds
tick = 0.002
per_tick = max(1, int(rate * tick))
nxt = t0
while True:
    now = time.monotonic()
    if now >= end or sent >= rate * seconds + per_tick:
        break
    if now < nxt:
        time.sleep(nxt - now)
    for _ in range(per_tick):
        s.sendto(struct.pack("!H", sent & 0xFFFF) + q[2:], (host, port))
        sent += 1
    nxt += tick
    for _ in range(per_tick * 2):
        try:
            s.recv(512)
            got += 1
        except BlockingIOError:
            break
print(sent, got, round(time.monotonic() - t0, 3))
"""


def _probe_latencies(host: str, port: int, source: str, count: int, interval: float
                     ) -> tuple[list[float], int]:
    """``count`` queries at a fixed rate from ``source``; (RTTs of the answered, lost)."""
    rtts: list[float] = []
    lost = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(1.0)
        nxt = time.monotonic()
        for i in range(count):
            nxt += interval
            q = query_wire("www.example.test", 20000 + i)
            t0 = time.perf_counter()
            s.sendto(q, (host, port))
            try:
                for _ in range(10):
                    data = s.recv(4096)
                    if data[:2] == q[:2]:
                        break
                rtt = time.perf_counter() - t0
                if flags_of(data) == (0, 0, 1):
                    rtts.append(rtt)
                else:
                    lost += 1
            except TimeoutError:
                lost += 1
            time.sleep(max(0.0, nxt - time.monotonic()))
    return rtts, lost


def test_a_flood_from_one_client_does_not_slow_another(moat, nsd_upstream, tmp_path) -> None:
    """Client A (127.0.0.1) floods at 100x its limit; client B in another /24 (127.0.1.7)
    asks at a steady 40/s (below its own limit) before and during the flood: B loses
    nothing and its latency stays low."""
    mport = free_port()
    m = moat("--config", write_config(tmp_path, LIMITED), "--metrics", f"127.0.0.1:{mport}",
             upstream=nsd_upstream)
    b = "127.0.1.7"
    assert addresses(ask(m.host, m.port, "www.example.test", source=b)) == ["192.0.2.10"]
    calm, calm_lost = _probe_latencies(m.host, m.port, b, 60, 1 / 40)
    before = shed(mport)
    rate, seconds = 5000, 4.0
    flood = subprocess.Popen(
        [sys.executable, "-c", FLOODER, m.host, str(m.port), str(rate), str(seconds),
         query_wire("www.example.test", 0).hex()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # the flood is on
        busy, busy_lost = _probe_latencies(m.host, m.port, b, 120, 1 / 40)
        out, err = flood.communicate(timeout=seconds + 10)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait(5)
    assert flood.returncode == 0, err
    sent, got, took = out.split()
    after = shed(mport)
    limited = sum(after[k] - before[k] for k in ("ratelimit-slip", "ratelimit-drop"))
    # the flood really happened and really was over A's limit
    assert int(sent) >= rate * seconds * 0.8, out
    assert limited >= int(sent) * 0.8, (limited, out)
    assert calm_lost == 0 and busy_lost == 0, (calm_lost, busy_lost)
    p50_calm, p50_busy = statistics.median(calm), statistics.median(busy)
    print(f"\nB latency before the flood: p50 {p50_calm * 1e3:.2f} ms, max "
          f"{max(calm) * 1e3:.2f} ms; during ({sent} queries from A in {took} s, {limited:.0f}"
          f" limited): p50 {p50_busy * 1e3:.2f} ms, max {max(busy) * 1e3:.2f} ms")
    assert p50_busy <= max(3 * p50_calm, p50_calm + 0.002), (p50_calm, p50_busy)
    assert max(busy) <= 0.1, sorted(busy)[-5:]
    assert after["ratelimit-refused"] == before["ratelimit-refused"]


def test_default_limits_do_not_throttle_a_busy_household(moat, nsd_upstream, tmp_path
                                                         ) -> None:
    """With the default rate and burst (loopback not exempt, so it is counted like a
    household's /24), 1500 queries within a second (page loads from several devices:
    300 distinct names, most asked several times) are all answered."""
    mport = free_port()
    m = moat("--config", write_config(tmp_path, "[ratelimit]\nexempt = []\n"),
             "--metrics", f"127.0.0.1:{mport}", upstream=nsd_upstream)
    before = shed(mport)
    n = 1500
    packets = [query_wire(f"h{i % 300}.wild.example.test", i) for i in range(n)]
    replies, took = udp_burst(m.host, m.port, packets, per_batch=15, gap=0.0095, settle=3.0)
    assert len(replies) == n, f"{n - len(replies)} of {n} queries got no answer"
    bad = [flags_of(r) for r in replies.values() if flags_of(r) != (0, 0, 1)]
    assert not bad, bad[:10]
    after = shed(mport)
    assert after == before, (before, after)
    assert took < 2.5, f"the client was too slow to make the burst ({took:.2f} s)"


# --- DNS rebinding protection ----------------------------------------------------------

PUBLIC_ZONE = """\
$ORIGIN public.test.
$TTL 300
@       SOA ns1.public.test. hostmaster.public.test. 1 3600 600 86400 60
@       NS  ns1.public.test.
ns1     A   192.0.2.1
nas     A   192.168.1.1
evil    A   127.0.0.1
v6      AAAA fd00::1
ok      A   192.0.2.5
ok      AAAA 2001:db8::5
cloak   CNAME nas
mapped  AAAA ::ffff:10.1.2.3
mixed   A   192.0.2.6
mixed   A   10.0.0.1
sub.nas A   192.168.1.3
evilnas A   192.168.1.4
ll      A   169.254.1.1
ll6     AAAA fe80::1
"""

HOME_ZONE = """\
$ORIGIN home.arpa.
$TTL 300
@       SOA ns1.home.arpa. hostmaster.home.arpa. 1 3600 600 86400 60
@       NS  ns1.home.arpa.
ns1     A   192.168.1.2
router  A   192.168.1.1
"""

LAN_ZONE = """\
$ORIGIN lan.
$TTL 300
@       SOA ns1.lan. hostmaster.lan. 1 3600 600 86400 60
@       NS  ns1.lan.
ns1     A   192.168.1.2
printer A   192.168.1.9
"""

BLOCKED = [("nas.public.test", "A"), ("evil.public.test", "A"), ("v6.public.test", "AAAA"),
           ("cloak.public.test", "A"), ("mapped.public.test", "AAAA"),
           ("mixed.public.test", "A"), ("sub.nas.public.test", "A"),
           ("evilnas.public.test", "A"), ("ll.public.test", "A"), ("ll6.public.test", "AAAA")]
ALLOWED = [("ok.public.test", "A", ["192.0.2.5"]), ("ok.public.test", "AAAA", ["2001:db8::5"]),
           ("router.home.arpa", "A", ["192.168.1.1"]), ("printer.lan", "A", ["192.168.1.9"])]


@pytest.fixture(scope="module")
def rebinding_nsd() -> Iterator[NsdServer]:
    require_binary("nsd")
    with NsdServer({"public.test.": PUBLIC_ZONE, "home.arpa.": HOME_ZONE,
                    "lan.": LAN_ZONE}) as nsd:
        yield nsd


def read_log(path: Path, want: int, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    lines: list[dict] = []
    while time.monotonic() < deadline:
        if path.exists():
            lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            if len(lines) >= want:
                break
        time.sleep(0.1)
    return lines


def test_rebinding_answers_for_public_names_are_blocked(moat, rebinding_nsd, tmp_path
                                                        ) -> None:
    log = tmp_path / "verdicts.jsonl"
    m = moat("--query-log", str(log), upstream=rebinding_nsd)
    # the upstream really does say these things (so the block is moat's doing)
    assert addresses(rebinding_nsd.query("nas.public.test", "A")) == ["192.168.1.1"]
    expected = 0
    for name, rdtype in BLOCKED:
        # first answer (from the upstream), then from the cache (the UDP fast path), then
        # over TCP: all three blocked, NODATA by default
        for tcp in (False, False, True):
            r = ask(m.host, m.port, name, rdtype, tcp=tcp)
            assert r.rcode() == dns.rcode.NOERROR, (name, tcp, r)
            assert not addresses(r), (name, tcp, r)
            expected += 1
    for name, rdtype, want in ALLOWED:
        for tcp in (False, False, True):
            r = ask(m.host, m.port, name, rdtype, tcp=tcp)
            assert r.rcode() == dns.rcode.NOERROR and addresses(r) == want, (name, tcp, r)
    lines = read_log(log, expected)
    assert len(lines) == expected, lines
    assert {x["qname"] for x in lines} == {n for n, _ in BLOCKED}
    for x in lines:
        assert x["category"] == "rebinding" and x["action"] == "nodata", x
        assert x["client"] == "127.0.0.1", x
    by_name = {x["qname"]: x["matched"] for x in lines}
    assert by_name["cloak.public.test"] == "192.168.1.1"  # through the CNAME
    assert by_name["mixed.public.test"] == "10.0.0.1"


def test_rebinding_protection_can_be_turned_off(moat, rebinding_nsd, tmp_path) -> None:
    cfg = write_config(tmp_path, "[rebinding]\nenabled = false\n")
    m = moat("--config", cfg, upstream=rebinding_nsd)
    want = {"nas.public.test": ["192.168.1.1"], "evil.public.test": ["127.0.0.1"],
            "v6.public.test": ["fd00::1"], "cloak.public.test": ["192.168.1.1"]}
    for name, rdtype in BLOCKED:
        r = ask(m.host, m.port, name, rdtype)
        assert r.rcode() == dns.rcode.NOERROR and addresses(r), (name, r)
        if name in want:
            assert addresses(r) == want[name]


def test_rebinding_allow_domains_and_action(moat, rebinding_nsd, tmp_path) -> None:
    """An allow_domains entry lets names under it through (here one public name; listing
    domains replaces the default list, so home.arpa must be listed to stay allowed), and
    the action is configurable."""
    cfg = write_config(tmp_path, '[rebinding]\nallow_domains = ["nas.public.test", "home.arpa"]'
                                 '\naction = "nxdomain"\n')
    m = moat("--config", cfg, upstream=rebinding_nsd)
    for tcp in (False, False, True):
        r = ask(m.host, m.port, "nas.public.test", tcp=tcp)
        assert addresses(r) == ["192.168.1.1"], r
        r = ask(m.host, m.port, "router.home.arpa", tcp=tcp)
        assert addresses(r) == ["192.168.1.1"], r
        r = ask(m.host, m.port, "evil.public.test", tcp=tcp)
        assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer, r
        r = ask(m.host, m.port, "cloak.public.test", tcp=tcp)  # the CNAME's owner is not
        assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer, r  # under the allowed name
    # a name below the allowed one is allowed too; one that merely ends the same is not
    assert addresses(ask(m.host, m.port, "sub.nas.public.test")) == ["192.168.1.3"]
    r = ask(m.host, m.port, "evilnas.public.test")
    assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer, r
