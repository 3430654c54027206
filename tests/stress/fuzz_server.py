#!/usr/bin/env python3
"""Fuzz a running moat over the network with mutated DNS packets, then check it is fine.

    python tests/stress/fuzz_server.py                      # 1,000,000 packets (~1 min)
    python tests/stress/fuzz_server.py --packets 30000      # the CI size
    python tests/stress/fuzz_server.py --target 127.0.0.1:5353 --metrics 127.0.0.1:9153 \\
        --pid "$(pgrep -f 'resolver serve' | head -1)"    # a moat you started yourself

Without --target it starts nsd (the harness's example.test zone) and moat in front of it.
Packets are valid queries and answers (stresslib.seed_packets) mutated at random (bit
flips, truncation, insertions, deletions, count fields, compression pointers, header
flags, case) plus some plain random bytes. About ``--tcp-share`` of them go over TCP, in
many connections of 1-30 frames each, cut into random chunks; some connections send a
raw random byte stream, some stop in the middle of a frame. The send rate is capped
(``--rate``) so the box is not overwhelmed, and the run stops at ``--deadline`` whatever
the count.

Checks, after the traffic:
* moat still runs and answers correctly: www.example.test -> 192.0.2.10 and
  c2.moat.test -> 0.0.0.0, over UDP and TCP; no internal errors were counted;
* RSS is flat: the RSS at the end (traffic over, 2 s later) is within ``--rss-margin``
  (10 MB) of the RSS after warm-up (when 20% of the packets were sent), plus 256 bytes
  for each distinct well-formed question first sent after the warm-up. Why: moat
  remembers the policy verdict per question (resolver/pipeline_memo.py, up to 100k
  entries, about 200 bytes each, measured with tracemalloc), and mutated names are new
  questions; 1M packets hold about 25k of them (+5 MB). The answer cache is set to 2000
  entries here, so it is full long before the warm-up point. The 10 MB cover allocator
  noise; a leak of 15 bytes per packet would exceed the total over 1M packets;
* the counters account for the packets: moat counts every datagram or frame it reads
  either as malformed (moat_malformed_queries_total) or as a query (moat_queries_total).
  The sender classifies each packet with moat's own parser (resolver.wire.parse_query)
  as it goes, so "expected malformed" is exact; the counters may fall short only by what
  the kernel dropped (UDP socket buffers), so we require counted >= 95% of sent and
  malformed counted >= 95% of expected malformed, and neither above what was sent.

Prints the figures; exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stresslib import (  # noqa: E402
    Mutator,
    RssSampler,
    by_label,
    check_still_correct,
    metric,
    rss_kb,
    scrape,
    stack,
)

from resolver import wire  # noqa: E402

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; not exported by Python

#: moat's configuration for a self-started run: a small cache (full before the warm-up
#: point, see above), loopback exempt from rate limiting (the default).
CONFIG = """\
[cache]
size = 2000
"""


@dataclass
class FuzzResult:
    packets: int = 0
    udp_sent: int = 0
    tcp_frames: int = 0
    tcp_connections: int = 0
    tcp_garbage_streams: int = 0
    expected_malformed: int = 0
    udp_answers: int = 0
    tcp_answers: int = 0
    seconds: float = 0.0
    rss_start_kb: int = 0
    rss_warm_kb: int = 0
    rss_end_kb: int = 0
    rss_max_kb: int = 0
    questions: int = 0  # distinct well-formed questions sent
    questions_after_warm: int = 0
    rss_allowed_kb: int = 0
    counted_malformed: int = 0
    counted_queries: int = 0
    malformed_by_kind: dict[str, float] = field(default_factory=dict)
    internal_errors: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def frames_seen(stream: bytes) -> list[bytes]:
    """The non-empty frames moat's TCP framer reads from ``stream`` (before EOF)."""
    out = []
    i = 0
    while i + 2 <= len(stream):
        (length,) = struct.unpack_from("!H", stream, i)
        if i + 2 + length > len(stream):
            break
        if length:
            out.append(stream[i + 2:i + 2 + length])
        i += 2 + length
    return out


class Classifier:
    """What moat will make of a packet, by moat's own parser: malformed or a query (and
    then which question: the distinct ones are what moat's per-question memo holds)."""

    def __init__(self) -> None:
        self.questions: set[bytes] = set()

    def malformed(self, data: bytes) -> bool:
        try:
            q = wire.parse_query(data)
        except wire.WireError:
            return True
        self.questions.add(q.key)
        return False


class TcpSender:
    """Runs one TCP connection at a time: frames, random chunks, half-close, read to EOF."""

    def __init__(self, host: str, port: int, mutator: Mutator, result: FuzzResult,
                 classify: Classifier) -> None:
        self.host, self.port = host, port
        self.classify = classify
        self.rng = mutator.rng
        self.mutator = mutator
        self.r = result
        self.pending: list[bytes] = []
        self.target = self.rng.randrange(1, 31)

    def add(self, packet: bytes) -> None:
        self.pending.append(packet)
        if len(self.pending) >= self.target:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        rng = self.rng
        frames, self.pending = self.pending, []
        self.target = rng.randrange(1, 31)
        style = rng.random()
        if style < 0.05:  # a raw random byte stream: whatever lengths it happens to hold
            stream = rng.randbytes(rng.randrange(1, 3000))
            self.r.tcp_garbage_streams += 1
        else:
            stream = b"".join(struct.pack("!H", len(f)) + f for f in frames)
            if style < 0.08:  # stop in the middle of the last frame
                stream = stream[:len(stream) - rng.randrange(1, len(frames[-1]) + 2)]
        seen = frames_seen(stream)
        cuts = sorted({rng.randrange(len(stream) + 1) for _ in range(rng.randrange(0, 8))}
                      | {0, len(stream)})
        answers = 0
        try:
            with socket.create_connection((self.host, self.port), timeout=3) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for a, b in zip(cuts, cuts[1:], strict=False):
                    s.sendall(stream[a:b])
                s.shutdown(socket.SHUT_WR)
                buf = b""
                for _ in range(10_000):  # until moat closes (it does at our EOF)
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                answers = len(frames_seen(buf))
        except OSError as exc:
            self.r.problems.append(f"TCP connection failed: {exc!r}")
        self.r.tcp_connections += 1
        self.r.tcp_frames += len(seen)
        self.r.tcp_answers += answers
        self.r.expected_malformed += sum(map(self.classify.malformed, seen))


def fuzz(host: str, port: int, metrics: str, pid: int | None, *, packets: int,
         rate: float, tcp_share: float, deadline: float, seed: int = 1,
         rss_margin_kb: int = 10 * 1024, log=print) -> FuzzResult:  # noqa: ANN001
    r = FuzzResult()
    before = scrape(metrics)
    sampler = RssSampler(pid, 1.0).start() if pid else None
    r.rss_start_kb = rss_kb(pid) if pid else 0
    mutator = Mutator(seed)
    classify = Classifier()
    tcp = TcpSender(host, port, mutator, r, classify)
    rng = mutator.rng
    t0 = time.monotonic()
    stop_at = t0 + deadline
    t_warm: float | None = None
    questions_at_warm = 0
    tick = 0.005
    per_tick = max(1, int(rate * tick))
    nxt = t0
    next_report = t0 + 10
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)  # root: past rmem_max
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.setblocking(False)
        dest = (host, port)
        for _ in range(packets):  # bounded by count; the deadline ends it earlier
            if r.packets >= packets:
                break
            now = time.monotonic()
            if now >= stop_at:
                r.problems.append(f"deadline: only {r.packets} of {packets} packets sent "
                                  f"in {deadline} s")
                break
            if now < nxt:
                time.sleep(nxt - now)
            nxt += tick
            for _ in range(per_tick):
                p = mutator.packet()
                r.packets += 1
                if rng.random() < tcp_share:
                    tcp.add(p)
                    continue
                try:
                    s.sendto(p, dest)
                except OSError as exc:  # e.g. ENOBUFS: counted as not sent
                    if len(r.problems) < 5:
                        r.problems.append(f"sendto: {exc!r}")
                    continue
                r.udp_sent += 1
                r.expected_malformed += classify.malformed(p)
            for _ in range(per_tick * 4):
                try:
                    s.recv(65536)
                    r.udp_answers += 1
                except BlockingIOError:
                    break
            if t_warm is None and r.packets >= packets * 0.2:
                t_warm = time.monotonic() - t0
                questions_at_warm = len(classify.questions)
            if time.monotonic() >= next_report:
                next_report += 10
                log(f"  {r.packets} packets, {time.monotonic() - t0:.0f} s, "
                    f"RSS {rss_kb(pid) if pid else 0} kB")
        tcp.flush()
        drain_end = time.monotonic() + 1.0
        while time.monotonic() < drain_end:
            try:
                s.recv(65536)
                r.udp_answers += 1
            except BlockingIOError:
                time.sleep(0.01)
    r.seconds = time.monotonic() - t0
    r.questions = len(classify.questions)
    r.questions_after_warm = r.questions - questions_at_warm
    r.rss_allowed_kb = rss_margin_kb + r.questions_after_warm // 4  # 256 B each
    time.sleep(2.0)  # let moat finish what it read; RSS settles
    after = scrape(metrics)
    if sampler is not None:
        samples = sampler.stop()
        r.rss_end_kb = samples[-1][1]
        r.rss_warm_kb = sampler.at(t_warm if t_warm is not None else 0.0)
        r.rss_max_kb = max(kb for _, kb in samples)
    kinds_before = by_label(before, "moat_malformed_queries_total", "kind")
    kinds_after = by_label(after, "moat_malformed_queries_total", "kind")
    r.malformed_by_kind = {k: v - kinds_before.get(k, 0) for k, v in kinds_after.items()
                           if v - kinds_before.get(k, 0)}
    r.counted_malformed = int(sum(r.malformed_by_kind.values()))
    r.counted_queries = int(metric(after, "moat_queries_total") -
                            metric(before, "moat_queries_total"))
    r.internal_errors = int(metric(after, "moat_internal_errors_total") -
                            metric(before, "moat_internal_errors_total"))

    # --- the checks ---
    sent = r.udp_sent + r.tcp_frames
    seen = r.counted_malformed + r.counted_queries
    if seen < 0.95 * sent or seen > sent + 50:
        r.problems.append(f"moat counted {seen} packets (malformed + queries), sent {sent}")
    if r.counted_malformed < 0.95 * r.expected_malformed or \
            r.counted_malformed > r.expected_malformed + 10:
        r.problems.append(f"moat counted {r.counted_malformed} malformed, expected "
                          f"{r.expected_malformed}")
    if r.internal_errors:
        r.problems.append(f"{r.internal_errors} internal errors counted")
    if pid and r.rss_end_kb - r.rss_warm_kb > r.rss_allowed_kb:
        r.problems.append(f"RSS grew from {r.rss_warm_kb} kB after warm-up to "
                          f"{r.rss_end_kb} kB at the end (allowed {r.rss_allowed_kb} kB: "
                          f"{rss_margin_kb} + {r.questions_after_warm} new questions)")
    if pid and rss_kb(pid) == 0:
        r.problems.append("moat is gone")
    r.problems += check_still_correct(host, port)
    return r


def report(r: FuzzResult, log=print) -> None:  # noqa: ANN001
    sent = r.udp_sent + r.tcp_frames
    log(f"packets generated:   {r.packets} in {r.seconds:.1f} s "
        f"({r.packets / max(r.seconds, 1e-9):.0f}/s)")
    log(f"  UDP datagrams:     {r.udp_sent} ({r.udp_answers} answers)")
    log(f"  TCP frames:        {r.tcp_frames} in {r.tcp_connections} connections "
        f"({r.tcp_garbage_streams} raw random streams; {r.tcp_answers} answers)")
    log(f"malformed:           expected {r.expected_malformed}, counted "
        f"{r.counted_malformed} {json.dumps(r.malformed_by_kind, sort_keys=True)}")
    log(f"queries counted:     {r.counted_queries}; malformed + queries = "
        f"{r.counted_malformed + r.counted_queries} of {sent} sent "
        f"({100 * (r.counted_malformed + r.counted_queries) / max(sent, 1):.2f}%)")
    if r.counted_malformed + r.counted_queries == sent and \
            r.counted_malformed != r.expected_malformed:
        log(f"  nothing was lost, yet moat counted {r.expected_malformed - r.counted_malformed}"
            " packets its own parser rejects as queries: answered by the UDP fast path "
            "(see tests/resolver/test_fuzz.py::"
            "test_fast_path_leaves_malformed_edns_options_to_the_pipeline)")
    log(f"internal errors:     {r.internal_errors}")
    if r.rss_start_kb:
        log(f"RSS kB:              start {r.rss_start_kb}, after warm-up {r.rss_warm_kb}, "
            f"max {r.rss_max_kb}, end {r.rss_end_kb} "
            f"(end - warm-up {r.rss_end_kb - r.rss_warm_kb:+d}, allowed "
            f"{r.rss_allowed_kb}: {r.questions_after_warm} new distinct questions after "
            f"warm-up, {r.questions} in all)")
    log("result:              " + ("OK" if r.ok else "FAILED\n  " + "\n  ".join(r.problems)))


def run(packets: int = 1_000_000, rate: float = 25000, tcp_share: float = 0.1,
        deadline: float = 600, seed: int = 1, rss_margin_kb: int = 10 * 1024,
        log=print) -> FuzzResult:  # noqa: ANN001
    """Start nsd + moat, fuzz, check, stop."""
    with stack(CONFIG) as st:
        log(f"moat pid {st.pid} on {st.host}:{st.port}, metrics {st.metrics}")
        r = fuzz(st.host, st.port, st.metrics, st.pid, packets=packets, rate=rate,
                 tcp_share=tcp_share, deadline=deadline, seed=seed,
                 rss_margin_kb=rss_margin_kb, log=log)
        if not st.moat.running():
            r.problems.append("moat exited")
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=25000, help="packets per second at most")
    ap.add_argument("--tcp-share", type=float, default=0.1)
    ap.add_argument("--deadline", type=float, default=600, help="seconds; stop then")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rss-margin", type=int, default=10 * 1024, help="kB")
    ap.add_argument("--target", help="HOST:PORT of a running moat (else start one)")
    ap.add_argument("--metrics", help="its metrics HOST:PORT (with --target)")
    ap.add_argument("--pid", type=int, help="its pid, for RSS (with --target)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = ap.parse_args(argv)
    if args.target:
        if not args.metrics:
            ap.error("--target needs --metrics")
        host, _, port = args.target.rpartition(":")
        r = fuzz(host.strip("[]"), int(port), args.metrics, args.pid, packets=args.packets,
                 rate=args.rate, tcp_share=args.tcp_share, deadline=args.deadline,
                 seed=args.seed, rss_margin_kb=args.rss_margin)
    else:
        r = run(args.packets, args.rate, args.tcp_share, args.deadline, args.seed,
                args.rss_margin)
    report(r)
    if args.json:
        print(json.dumps(asdict(r), indent=1))
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
