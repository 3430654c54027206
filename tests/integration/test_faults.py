"""Faults, with the real `moat serve` process: upstreams that time out, fail, truncate or
spoof (the harness's FakeUpstream, for faults real software cannot produce), serve-stale,
a flood of garbage, and signals (SIGTERM, SIGINT, SIGHUP)."""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest
from dnslib import QTYPE, RR, A, DNSQuestion, DNSRecord
from harness import FakeUpstream, ReceivedQuery, dns_query, free_port
from harness.clients import query_wire, rss_kb, udp_burst
from harness.scrape import metric, scrape

pytestmark = pytest.mark.integration

# Short upstream timings for every test here: one attempt 0.3 s, SERVFAIL after 1 s.
FAST = '[upstream]\ntimeout = "0.3s"\ndeadline = "1s"\n'


def write_config(tmp_path: Path, text: str, name: str = "moat.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def timed_query(m: Any, name: str, rdtype: str = "A", **kw: Any
                ) -> tuple[dns.message.Message, float]:
    t0 = time.monotonic()
    r = m.query(name, rdtype, timeout=5, **kw)
    return r, time.monotonic() - t0


def addresses(r: dns.message.Message) -> list[str]:
    return [rd.address for rrset in r.answer for rd in rrset if hasattr(rd, "address")]


# --- fail over, deadline, health ------------------------------------------------------


def test_silent_upstream_fails_over_to_the_next(moat, tmp_path) -> None:
    with FakeUpstream("silent") as dead, FakeUpstream("answer", address="192.0.2.7") as live:
        m = moat("--config", write_config(tmp_path, FAST), upstream=[dead, live])
        r, elapsed = timed_query(m, "over.example.test")
        assert r.rcode() == dns.rcode.NOERROR and addresses(r) == ["192.0.2.7"]
        assert 0.25 <= elapsed < 0.9, elapsed  # one attempt's timeout, not the deadline
        assert len(dead.queries) == 1


@pytest.mark.parametrize("failure", ["servfail", "refused"])
def test_failing_upstream_fails_over_to_the_next(moat, tmp_path, failure: str) -> None:
    with FakeUpstream(failure) as bad, FakeUpstream("answer", address="192.0.2.8") as good:
        m = moat("--config", write_config(tmp_path, FAST), upstream=[bad, good])
        r, elapsed = timed_query(m, "fo.example.test")
        assert r.rcode() == dns.rcode.NOERROR and addresses(r) == ["192.0.2.8"]
        assert elapsed < 0.25, elapsed  # no timeout involved
        assert len(bad.queries) == 1 and len(good.queries) == 1


def test_servfail_within_the_deadline_when_every_upstream_is_silent(moat, tmp_path) -> None:
    with FakeUpstream("silent") as a, FakeUpstream("silent") as b:
        m = moat("--config", write_config(tmp_path, FAST), upstream=[a, b])
        for tcp in (False, True):
            t0 = time.monotonic()
            r = m.query(f"dead{int(tcp)}.example.test", "A", tcp=tcp, timeout=5)
            elapsed = time.monotonic() - t0
            assert r.rcode() == dns.rcode.SERVFAIL
            assert 0.85 <= elapsed <= 1.5, elapsed  # deadline 1 s


def test_truncated_upstream_answer_is_retried_over_tcp(moat, tmp_path) -> None:
    with FakeUpstream("truncate") as fake:
        m = moat("--config", write_config(tmp_path, FAST), upstream=fake)
        r = m.query("tc.example.test", "A")
        assert r.rcode() == dns.rcode.NOERROR and not r.flags & dns.flags.TC
        assert addresses(r) == ["192.0.2.1"]
        assert [q.transport for q in fake.queries] == ["udp", "tcp"]


def test_a_timed_out_upstream_is_asked_after_the_healthy_one(moat, tmp_path) -> None:
    cfg = write_config(tmp_path, '[upstream]\ntimeout = "0.5s"\ndeadline = "2s"\n')
    with FakeUpstream("silent") as dead, FakeUpstream("answer") as live:
        m = moat("--config", cfg, upstream=[dead, live])
        r, first = timed_query(m, "h0.example.test")
        t_failed = time.monotonic()
        assert r.rcode() == dns.rcode.NOERROR and first >= 0.45
        # moat's first back-off window is 0.5 s: every query inside it must skip the dead one
        sent = 0
        for i in range(1, 11):
            if time.monotonic() - t_failed > 0.35:
                break
            r, elapsed = timed_query(m, f"h{i}.example.test")
            sent += 1
            assert r.rcode() == dns.rcode.NOERROR
            assert elapsed < 0.25, (i, elapsed)  # no timeout on the dead upstream first
        assert sent >= 3, "too slow to send queries within the back-off window"
        assert len(dead.queries) == 1 < sent + 1, dead.queries
        assert len(live.queries) == sent + 1


# --- spoofing resistance --------------------------------------------------------------


def test_every_upstream_query_has_a_fresh_id_and_source_port(moat, fake_upstream) -> None:
    m = moat(upstream=fake_upstream)
    for i in range(20):
        assert m.query(f"rnd{i}.example.test", "A").rcode() == dns.rcode.NOERROR
    got = fake_upstream.wait_for_queries(20, timeout=3)
    ports = [q.src_port for q in got]
    ids = [q.id for q in got]
    # The kernel picks each port at random: one repeat in 20 is chance, more is reuse.
    assert len(set(ports)) >= 19, ports
    assert len(set(ids)) >= 18, ids
    steps = {(b - a) & 0xFFFF for a, b in zip(ids, ids[1:], strict=False)}
    assert len(steps) > 5, ids  # not a counter


def reply(req: DNSRecord, address: str, *, qid: int | None = None,
          qname: str | None = None) -> DNSRecord:
    r = req.reply(ra=1, aa=0)
    name = qname or str(req.q.qname)
    if qname:
        r.questions = [DNSQuestion(qname, req.q.qtype, req.q.qclass)]
    r.add_answer(RR(name, QTYPE.A, ttl=300, rdata=A(address)))
    if qid is not None:
        r.header.id = qid
    return r


def spoof_then_right(kind: str):  # noqa: ANN201
    """A behaviour: first a forged answer (6.6.6.6) of ``kind``, then the real one."""

    def behaviour(q: ReceivedQuery, req: DNSRecord) -> list[DNSRecord]:
        right = reply(req, "192.0.2.1")
        if kind == "wrong_id":
            return [reply(req, "6.6.6.6", qid=(req.header.id + 1) & 0xFFFF), right]
        if kind == "wrong_question":
            return [reply(req, "6.6.6.6", qname="evil." + str(req.q.qname)), right]
        # wrong_port: the forgery comes from another port of the upstream's address
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.sendto(reply(req, "6.6.6.6").pack(), q.src)
        time.sleep(0.05)
        return [right]

    return behaviour


@pytest.mark.parametrize("kind", ["wrong_id", "wrong_port", "wrong_question"])
def test_forged_answers_are_ignored_and_counted(moat, tmp_path, kind: str) -> None:
    mport = free_port()
    with FakeUpstream(spoof_then_right(kind)) as fake:
        m = moat("--config", write_config(tmp_path, FAST), "--metrics", f"127.0.0.1:{mport}",
                 upstream=fake)
        # the forgery first, the real answer after: the client gets the real one
        r = m.query("spoofed.example.test", "A", timeout=3)
        assert r.rcode() == dns.rcode.NOERROR and addresses(r) == ["192.0.2.1"]
        assert metric(scrape(mport), "moat_upstream_ignored_answers_total") >= 1
        # forgeries only: SERVFAIL within the deadline, never the forged data; moat kept
        # waiting for the real answer after each forgery (a full attempt timeout, 0.3 s)
        fake.wrong_id_then_right = False
        fake.behaviour = kind
        before = len(fake.queries)
        r, elapsed = timed_query(m, "forged.example.test")
        assert r.rcode() == dns.rcode.SERVFAIL and not r.answer, r
        assert 0.28 <= elapsed <= 1.5, elapsed
        asked = len(fake.queries) - before
        assert asked >= 1
        assert metric(scrape(mport), "moat_upstream_ignored_answers_total") >= 1 + asked
        # nothing forged went into the cache either
        fake.behaviour = "answer"
        r = m.query("forged.example.test", "A")
        assert addresses(r) == ["192.0.2.1"]


# --- serve-stale (RFC 8767) -----------------------------------------------------------


def test_stale_answer_when_upstreams_fail_then_servfail_after_the_window(moat, tmp_path
                                                                         ) -> None:
    cfg = write_config(tmp_path, '[upstream]\ntimeout = "0.2s"\ndeadline = "0.5s"\n'
                                 '[cache]\nstale_window = "1s"\n')
    with FakeUpstream("answer", ttl=1) as fake:
        m = moat("--config", cfg, upstream=fake)
        t0 = time.monotonic()
        r = m.query("stale.example.test", "A")
        assert r.answer[0].ttl == 1
        fake.behaviour = "silent"
        time.sleep(max(0.0, t0 + 1.2 - time.monotonic()))
        r = m.query("stale.example.test", "A", use_edns=0, timeout=3)
        assert r.rcode() == dns.rcode.NOERROR and addresses(r) == ["192.0.2.1"]
        ede = [o for o in r.options if o.otype == dns.edns.OptionType.EDE]
        assert ede and ede[0].code == 3, r.options  # EDE 3: Stale Answer
        stale_ttl = r.answer[0].ttl
        time.sleep(max(0.0, t0 + 1 + 1 + 0.4 - time.monotonic()))  # past expiry + window
        r = m.query("stale.example.test", "A", timeout=3)
        assert r.rcode() == dns.rcode.SERVFAIL and not r.answer
        # RFC 8767 section 4 (and cache.py's own contract): stale data is served with the
        # stale-answer TTL, 30 s, even when the record's original TTL was smaller.
        assert stale_ttl == 30, f"stale answer TTL {stale_ttl}, want cache.stale_ttl = 30"


def test_stale_answer_when_the_upstream_answers_servfail(moat, tmp_path) -> None:
    """An upstream that answers SERVFAIL has failed just like a silent one (a forwarding
    upstream says SERVFAIL when the authorities are down): serve the stale entry."""
    cfg = write_config(tmp_path, FAST + '[cache]\nstale_window = "30s"\n')
    with FakeUpstream("answer", ttl=1) as fake:
        m = moat("--config", cfg, upstream=fake)
        t0 = time.monotonic()
        assert addresses(m.query("sf.example.test", "A")) == ["192.0.2.1"]
        fake.behaviour = "servfail"
        time.sleep(max(0.0, t0 + 1.2 - time.monotonic()))
        r = m.query("sf.example.test", "A", use_edns=0, timeout=3)
        assert len(fake.queries) >= 2  # moat did ask again
        assert r.rcode() == dns.rcode.NOERROR and addresses(r) == ["192.0.2.1"], r
        ede = [o for o in r.options if o.otype == dns.edns.OptionType.EDE]
        assert ede and ede[0].code == 3, r.options


# --- garbage ------------------------------------------------------------------------------


def garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:  # anything, including shorter than a header
        return rng.randbytes(rng.randrange(0, 40))
    if kind == 1:  # a plausible header, random rest
        head = struct.pack("!HHHHHH", rng.randrange(65536), 0x0100, 1, rng.randrange(3),
                           rng.randrange(3), rng.randrange(3))
        return head + rng.randbytes(rng.randrange(0, 300))
    if kind == 2:  # a real question with random records after it
        head = struct.pack("!HHHHHH", rng.randrange(65536), 0x0100, 1, rng.randrange(65536),
                           rng.randrange(65536), rng.randrange(65536))
        return head + b"\x03www\x07example\x04test\x00\x00\x01\x00\x01" + \
            rng.randbytes(rng.randrange(0, 64))
    if kind == 3:  # compression pointers everywhere
        head = struct.pack("!HHHHHH", rng.randrange(65536), 0x0100, 1, 0, 0, 1)
        return head + b"\xc0\x0c" * rng.randrange(1, 50)
    return rng.randbytes(rng.randrange(12, 1500))


def test_a_flood_of_garbage_does_not_stop_moat(moat, fake_upstream) -> None:
    mport = free_port()
    m = moat("--metrics", f"127.0.0.1:{mport}", upstream=fake_upstream)
    rng = random.Random(20240611)

    def good(tag: str) -> None:
        for _attempt in range(2):  # the kernel may drop a datagram in a flood; moat must not
            try:
                r = m.query(f"{tag}.example.test", "A", timeout=1.5)
            except dns.exception.Timeout:
                continue
            assert r.rcode() == dns.rcode.NOERROR
            return
        pytest.fail(f"no answer to a good query ({tag}) during/after the garbage")

    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for batch in range(10):
            for _ in range(200):
                s.sendto(garbage(rng), (m.host, m.port))
                sent += 1
            good(f"during{batch}")
    for i in range(3):
        good(f"after{i}")
    assert m.running()
    text = scrape(mport)
    assert metric(text, "moat_malformed_queries_total") >= 1500, text
    assert metric(text, "moat_internal_errors_total") == 0, text
    assert sent == 2000


# --- signals ------------------------------------------------------------------------------


def _wait_exit(m: Any, timeout: float) -> int | None:
    try:
        return m.proc.popen.wait(timeout=timeout)
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
        return None


@pytest.mark.parametrize("sig,tcp", [(signal.SIGTERM, False), (signal.SIGTERM, True),
                                     (signal.SIGINT, False)],
                         ids=["sigterm-udp", "sigterm-tcp", "sigint-udp"])
def test_stop_signal_answers_the_query_in_flight_and_exits_0(moat, tmp_path, sig: int,
                                                            tcp: bool) -> None:
    cfg = write_config(tmp_path, '[upstream]\ntimeout = "2s"\ndeadline = "2.5s"\n')
    with FakeUpstream("slow", delay=0.8) as fake:
        m = moat("--config", cfg, upstream=fake)
        result: dict[str, Any] = {}

        def ask() -> None:
            try:
                result["answer"] = dns_query(m.host, m.port, "inflight.example.test", "A",
                                             tcp=tcp, timeout=2.5)
            except Exception as exc:  # noqa: BLE001
                result["error"] = exc

        t = threading.Thread(target=ask, daemon=True)
        t.start()
        fake.wait_for_queries(1, timeout=3)
        t_sig = time.monotonic()
        m.signal(sig)
        rc = _wait_exit(m, timeout=5)
        took = time.monotonic() - t_sig
        t.join(5)
        assert rc == 0, f"exit code {rc}"
        assert took <= 3.0, took
        assert "answer" in result, f"the query in flight got no answer: {result.get('error')!r}"
        assert result["answer"].rcode() in (dns.rcode.NOERROR, dns.rcode.SERVFAIL)


def test_sighup_applies_a_changed_config(moat, tmp_path) -> None:
    with FakeUpstream("answer", address="192.0.2.101") as a, \
            FakeUpstream("answer", address="192.0.2.102") as b:
        path = write_config(tmp_path, f'[upstream]\nservers = ["{a.addr}"]\n')
        m = moat("--config", path)
        assert addresses(m.query("before.example.test", "A")) == ["192.0.2.101"]
        Path(path).write_text(f'[upstream]\nservers = ["{b.addr}"]\n')
        m.signal(signal.SIGHUP)
        m.wait_for_stderr(r"config reloaded", timeout=5)
        assert addresses(m.query("after.example.test", "A")) == ["192.0.2.102"]
        assert [q.qname for q in a.queries] == ["before.example.test."]
        assert [q.qname for q in b.queries] == ["after.example.test."]


def test_sighup_with_an_invalid_config_keeps_the_old_one(moat, tmp_path) -> None:
    with FakeUpstream("answer", address="192.0.2.111") as a:
        path = write_config(tmp_path, f'[upstream]\nservers = ["{a.addr}"]\n')
        m = moat("--config", path)
        assert addresses(m.query("one.example.test", "A")) == ["192.0.2.111"]
        Path(path).write_text('[upstream]\nservers = ["127.0.0.1:1"]\ntimeout = "never"\n'
                              '[cache]\nsize = "many"\n[typo]\nx = 1\n')
        m.signal(signal.SIGHUP)
        m.wait_for_stderr(r"config reload rejected", timeout=5)
        log = m.stderr_text()
        for key in ("upstream.timeout", "cache.size", "typo"):
            assert key in log, (key, log)
        assert m.running()
        r = m.query("two.example.test", "A", timeout=3)
        assert addresses(r) == ["192.0.2.111"]
        assert [q.qname for q in a.queries] == ["one.example.test.", "two.example.test."]


# --- faults under load: what the client sees, and nothing left behind ------------------------


def burst(port: int, names: list[str], timeout: float) -> dict[str, tuple[int, float]]:
    """Every query sent at once (harness udp_burst: batches of 50, replies read between
    them); name -> (rcode, seconds) of its answer, waiting up to ``timeout`` s."""
    times: dict[int, float] = {}
    replies, _ = udp_burst("127.0.0.1", port, [query_wire(n, i) for i, n in enumerate(names)],
                           settle=timeout, quiet=timeout, times=times)
    return {names[qid]: (dns.message.from_wire(data).rcode(), times[qid])
            for qid, data in replies.items()}


def resources(pid: int) -> tuple[int, int]:
    """(open sockets, resident kB) of a process."""
    sockets = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            sockets += fd.readlink().name.startswith("socket:")
        except OSError:
            pass
    return sockets, rss_kb(pid)


def flapping(fake: FakeUpstream) -> Any:
    """Answers one query, ignores the next, and so on."""
    def behaviour(query: ReceivedQuery, request: DNSRecord) -> Any:
        if len(fake.queries) % 2:
            reply = request.reply()
            reply.add_answer(RR(str(request.q.qname), QTYPE.A, rdata=A("192.0.2.9"), ttl=60))
            return reply
        return None
    return behaviour


FAULTS = {
    # fault: (upstream behaviour, what every client must get, seconds it may take)
    "down": ("silent", dns.rcode.SERVFAIL, 1.5),
    "slow-beyond-timeout": ("slow", dns.rcode.SERVFAIL, 1.5),  # answers after moat gave up
    "garbage": ("garbage", dns.rcode.SERVFAIL, 1.5),
    "wrong-id-from-another-port": ("wrong_port", dns.rcode.SERVFAIL, 1.5),
    "truncates-every-udp-answer": ("truncate", dns.rcode.NOERROR, 1.0),
    "flapping": ("flap", dns.rcode.NOERROR, 1.0),
    "closed-port": ("closed", dns.rcode.SERVFAIL, 1.5),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_faults_under_load_give_bounded_answers_and_leak_nothing(moat, tmp_path,
                                                                fault: str) -> None:
    """300 different names at once, three times, against a broken upstream (plus, for a
    flapping one, a healthy second): every client gets its answer within the bound, and
    afterwards moat holds no more sockets than before and has not grown. (50 at once when
    each needs a TCP connection: the fake upstream accepts 64 pending connections.)"""
    behaviour, rcode, bound = FAULTS[fault]
    at_once = 50 if behaviour == "truncate" else 300
    fakes = []
    with contextlib.ExitStack() as stack:
        if behaviour == "closed":
            upstream: Any = f"127.0.0.1:{free_port()}"  # nothing listens: ICMP unreachable
        else:
            fake = stack.enter_context(FakeUpstream(
                "answer" if behaviour == "flap" else behaviour, delay=0.6))
            fake.wrong_id_then_right = False
            if behaviour == "flap":
                fake.behaviour = flapping(fake)
                fakes.append(stack.enter_context(FakeUpstream("answer", address="192.0.2.7")))
            upstream = [fake, *fakes]
        m = moat("--config", write_config(tmp_path, FAST + "[cache]\nsize = 500\n"),
                 upstream=upstream)
        burst(m.port, [f"warm{i}.example.test" for i in range(at_once)], 3.0)  # warm up
        time.sleep(1.2)
        before = resources(m.pid)
        for rnd in range(3):
            names = [f"r{rnd}-{i}.{fault}.example.test" for i in range(at_once)]
            got = burst(m.port, names, 5.0)
            assert len(got) == len(names), f"{len(names) - len(got)} queries unanswered"
            assert {rc for rc, _ in got.values()} == {rcode}, fault
            slowest = max(t for _, t in got.values())
            assert slowest <= bound, f"{fault}: slowest answer {slowest:.2f} s"
        time.sleep(1.5)  # past the deadline: every upstream exchange is over
        after = resources(m.pid)
        assert after[0] <= before[0], f"sockets {before[0]} -> {after[0]}"
        assert after[1] - before[1] < 4096, f"RSS {before[1]} -> {after[1]} kB"


def test_after_sigterm_new_queries_are_not_accepted_and_the_grace_bounds_the_exit(
        moat, tmp_path) -> None:
    """While a query waits for a very slow upstream: SIGTERM closes the listeners at once
    (a new UDP query goes unanswered, a new TCP connection is refused) and moat exits
    within its shutdown grace (1 s here), not after the upstream's 10 s."""
    cfg = write_config(tmp_path, '[server]\nshutdown_grace = "1s"\n'
                                 '[upstream]\ntimeout = "10s"\ndeadline = "20s"\n')
    with FakeUpstream("slow", delay=10.0) as fake:
        m = moat("--config", cfg, upstream=fake)
        t = threading.Thread(target=lambda: _quietly(m, "stuck.example.test"), daemon=True)
        t.start()
        fake.wait_for_queries(1, timeout=3)
        t_sig = time.monotonic()
        m.signal(signal.SIGTERM)
        m.wait_for_stderr(r"shutting down", timeout=3)
        q = dns.message.make_query("www.example.test", "A")
        with pytest.raises(dns.exception.Timeout):
            dns.query.udp(q, m.host, port=m.port, timeout=0.3)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((m.host, m.port), timeout=1).close()
        rc = _wait_exit(m, timeout=5)
        took = time.monotonic() - t_sig
        assert rc == 0 and took < 2.5, (rc, took)
        assert len(fake.queries) == 1  # the new query never reached the upstream
        t.join(5)


def _quietly(m: Any, name: str) -> None:
    try:
        m.query(name, "A", timeout=15)
    except Exception:  # noqa: BLE001, S110 - the answer does not matter here
        pass
