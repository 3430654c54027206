#!/usr/bin/env python3
"""Soak: a steady, realistic load for a bounded time; memory must stay flat, nothing lost.

    python tests/stress/soak.py                   # 10 minutes at 1000 q/s
    python tests/stress/soak.py --minutes 60 --qps 2000
    python tests/stress/soak.py --seconds 45 --names 1500   # the CI size

Starts nsd serving example.test (the harness's zone) and soak.test (``--names`` names, TTL
30 s or less, see below) and moat in front of it with a blocklist of 10,000 names (RPZ,
generated at run time). Then, for the whole run:

* dnsperf at ``--qps`` (UDP, fixed rate, well below what moat can do: about 20k q/s for
  cached names on a small box) over a mix, in tenths: 3 cached names (example.test and
  the built-in c2.moat.test), 2 blocked names from the list, 3 names walked through the
  soak.test zone in order (the file covers all of them, so a name comes back only after
  a whole pass; the zone's TTL is shorter than a pass, so they stay cache misses and go
  upstream),
  1 NXDOMAIN name of soak.test, 1 name under the example.test wildcard;
* a TCP client asking 20 times a second (each over a new connection), checking answers;
* moat's RSS sampled every ``--sample`` seconds.

Checks: dnsperf lost nothing ("Queries lost: 0") and saw no SERVFAIL or REFUSED; the TCP
client lost nothing and got no wrong answer; moat still answers correctly at the end; RSS
at the end (median of the last 10% of samples) is within ``--rss-margin`` (5 MB) of where
it settled after warm-up (the highest sample in the 15% of the run after the first 25%;
the warm-up is long enough for one whole walk through the zone, so the cache and the
per-question memos have seen every name by then).

Reports: queries, rate, latency (dnsperf's average and max; the TCP client's p50/p99/max),
rcodes, RSS start / settled / end / max, and a coarse RSS series.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stresslib import (  # noqa: E402
    EXAMPLE_ZONE,
    RPZ_SOA,
    PerfResult,
    Prober,
    RssSampler,
    check_still_correct,
    dnsperf,
    finish,
    make_zone,
    metric,
    percentile,
    rss_kb,
    scrape,
    stack,
)

BLOCKED = 10_000


@dataclass
class SoakResult:
    seconds: float = 0.0
    qps: int = 0
    names: int = 0
    perf: PerfResult | None = None
    tcp_queries: int = 0
    tcp_lost: int = 0
    tcp_wrong: list[str] = field(default_factory=list)
    tcp_p50_ms: float = 0.0
    tcp_p99_ms: float = 0.0
    tcp_max_ms: float = 0.0
    rss_start_kb: int = 0
    rss_settled_kb: int = 0
    rss_end_kb: int = 0
    rss_max_kb: int = 0
    rss_series: list[tuple[int, int]] = field(default_factory=list)
    cache_entries: int = 0
    upstream_queries: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def write_queries(path: Path, names: int) -> int:
    """The dnsperf file: a walk through all ``names`` soak.test names (3 in 10 lines)."""
    lines = []
    walk = nx = 0
    i = 0
    while walk < names:
        k = i % 10
        if k < 3:
            lines.append(("www.example.test A", "c2.moat.test A", "www.example.test AAAA",
                          "mx.example.test MX", "alias.example.test A")[i % 5])
        elif k < 5:
            lines.append(f"b{(i * 7919) % BLOCKED}.bad.test A")
        elif k < 8:
            lines.append(f"n{walk}.soak.test A")
            walk += 1
        elif k == 8:
            lines.append(f"nx{nx}.soak.test A")
            nx += 1
        else:
            lines.append(f"w{i % 5000}.wild.example.test A")
        i += 1
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def run(seconds: float = 600, qps: int = 1000, names: int = 20000, sample: float = 5.0,
        rss_margin_kb: int = 5 * 1024, tcp_rate: float = 20, log=print) -> SoakResult:  # noqa: ANN001
    r = SoakResult(seconds=seconds, qps=qps, names=names)
    tmp = Path(tempfile.mkdtemp(prefix="moat-soak-"))
    try:
        rpz = tmp / "blocked.rpz"
        rpz.write_text(RPZ_SOA + "".join(f"b{i}.bad.test CNAME .\n" for i in range(BLOCKED)))
        queries = tmp / "queries.txt"
        lines = write_queries(queries, names)
        loop = lines / qps
        # a walked name comes back after one pass over the file: expired by then
        ttl = max(1, min(30, int(loop * 0.8)))
        zone = make_zone("soak.test.", (f"n{i}" for i in range(names)), ttl=ttl,
                         soa_minimum=min(10, ttl))
        zones = {"example.test.": EXAMPLE_ZONE, "soak.test.": zone}
        warm = max(seconds * 0.25, 5.0)
        if loop > warm:
            log(f"note: one pass over the query file takes {loop:.0f} s, longer than the "
                f"warm-up ({warm:.0f} s): RSS may still be filling when it is measured")
        with stack(args=("--rpz", str(rpz)), zones=zones) as st:
            log(f"moat pid {st.pid} on {st.host}:{st.port}; {names} zone names (TTL {ttl} s),"
                f" {BLOCKED} blocked, {lines} query lines ({loop:.0f} s per pass at {qps} q/s)")
            before = scrape(st.metrics)
            r.rss_start_kb = rss_kb(st.pid)
            sampler = RssSampler(st.pid, sample).start()
            tcp_names = [("www.example.test", "NOERROR"), ("b17.bad.test", "NXDOMAIN"),
                         ("n7.soak.test", "NOERROR"), ("nx-tcp.soak.test", "NXDOMAIN"),
                         ("c2.moat.test", "NOERROR")]
            prober = Prober(st.host, st.port, tcp_names, tcp_rate, tcp_every=1)
            perf = dnsperf(st.host, st.port, queries, qps=qps, seconds=seconds, clients=8)
            t0 = time.monotonic()
            next_log = t0 + 60
            try:
                prober.start()
                for _ in range(int(seconds * 10) + 600):  # bounded; dnsperf ends it
                    if perf.poll() is not None:
                        break
                    time.sleep(0.1)
                    if time.monotonic() >= next_log:
                        next_log += 60
                        log(f"  {time.monotonic() - t0:.0f} s, RSS {rss_kb(st.pid)} kB")
                r.perf = finish(perf, timeout=seconds + 60)
            finally:
                prober.stop()
                samples = sampler.stop()
            after = scrape(st.metrics)
            r.cache_entries = int(metric(after, "moat_cache_entries"))
            r.upstream_queries = int(metric(after, "moat_upstream_queries_total") -
                                     metric(before, "moat_upstream_queries_total"))
            r.rss_max_kb = max(kb for _, kb in samples)
            settle = [kb for t, kb in samples if warm <= t <= warm + seconds * 0.15] or \
                [samples[-1][1]]
            r.rss_settled_kb = max(settle)
            tail = [kb for t, kb in samples if t >= seconds * 0.9] or [samples[-1][1]]
            r.rss_end_kb = int(statistics.median(tail))
            step = max(1, len(samples) // 12)
            r.rss_series = [(int(t), kb) for t, kb in samples[::step]]
            rtts = prober.rtts()
            r.tcp_queries = len(prober.samples)
            r.tcp_lost = prober.lost()
            r.tcp_wrong = prober.wrong[:20]
            r.tcp_p50_ms = percentile(rtts, 50) * 1e3
            r.tcp_p99_ms = percentile(rtts, 99) * 1e3
            r.tcp_max_ms = max(rtts, default=0.0) * 1e3

            p = r.perf
            if p.lost:
                r.problems.append(f"dnsperf lost {p.lost} of {p.sent} queries")
            if p.sent < qps * seconds * 0.9:
                r.problems.append(f"dnsperf sent {p.sent}, expected about {qps * seconds:.0f}")
            bad = {k: v for k, v in p.rcodes.items() if k not in ("NOERROR", "NXDOMAIN")}
            if bad:
                r.problems.append(f"unexpected rcodes from moat: {bad}")
            if r.tcp_lost or prober.wrong:
                r.problems.append(f"TCP client: {r.tcp_lost} lost, wrong: {prober.wrong[:3]}")
            if r.rss_end_kb - r.rss_settled_kb > rss_margin_kb:
                r.problems.append(f"RSS grew from {r.rss_settled_kb} kB after warm-up to "
                                  f"{r.rss_end_kb} kB at the end (margin {rss_margin_kb} kB)")
            if r.upstream_queries < p.sent * 0.2:
                r.problems.append(f"only {r.upstream_queries} upstream queries: the walk "
                                  f"through soak.test was not uncached")
            r.problems += check_still_correct(st.host, st.port)
            if not st.moat.running():
                r.problems.append("moat exited")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return r


def report(r: SoakResult, log=print) -> None:  # noqa: ANN001
    p = r.perf or PerfResult()
    log(f"run:           {r.seconds:.0f} s at {r.qps} q/s; {r.names} walked names")
    log(f"dnsperf:       sent {p.sent}, completed {p.completed}, lost {p.lost}, "
        f"{p.qps:.0f} q/s; latency avg {p.avg_latency_ms or 0.0:.2f} ms, max "
        f"{p.max_latency_ms or 0.0:.2f} ms; {p.rcodes}")
    log(f"TCP client:    {r.tcp_queries} queries, lost {r.tcp_lost}, wrong {len(r.tcp_wrong)};"
        f" p50 {r.tcp_p50_ms:.2f} ms, p99 {r.tcp_p99_ms:.2f} ms, max {r.tcp_max_ms:.2f} ms")
    log(f"upstream:      {r.upstream_queries} queries; cache entries at the end "
        f"{r.cache_entries}")
    log(f"RSS kB:        start {r.rss_start_kb}, settled {r.rss_settled_kb}, end "
        f"{r.rss_end_kb}, max {r.rss_max_kb} (end - settled "
        f"{r.rss_end_kb - r.rss_settled_kb:+d})")
    log("RSS series:    " + ", ".join(f"{t}s:{kb}" for t, kb in r.rss_series))
    log("result:        " + ("OK" if r.ok else "FAILED\n  " + "\n  ".join(r.problems)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, help="overrides --minutes")
    ap.add_argument("--qps", type=int, default=1000)
    ap.add_argument("--names", type=int, default=20000, help="names walked in soak.test")
    ap.add_argument("--sample", type=float, default=5.0, help="RSS sampling interval, s")
    ap.add_argument("--rss-margin", type=int, default=5 * 1024, help="kB")
    args = ap.parse_args(argv)
    seconds = args.seconds if args.seconds else args.minutes * 60
    r = run(seconds, args.qps, args.names, args.sample, args.rss_margin)
    report(r)
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
