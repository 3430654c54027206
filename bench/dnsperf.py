"""Running dnsperf (pinned with taskset) and reading its report."""

from __future__ import annotations

import contextlib
import re
import resource
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any

_NUM = r"([0-9]+(?:\.[0-9]+)?)"


@dataclass
class PerfResult:
    sent: int = 0
    completed: int = 0
    lost: int = 0
    qps: float = 0.0
    run_time: float = 0.0
    avg_latency_ms: float | None = None
    min_latency_ms: float | None = None
    max_latency_ms: float | None = None
    rcodes: dict[str, int] = field(default_factory=dict)
    ended: str = ""  # "time limit" / "end of file" / ...
    #: CPU seconds dnsperf itself used, per second of run: near 1.0 = the load
    #: generator, not the server, is the limit.
    loadgen_cpu: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    samples: int = 0
    timeouts: int = 0
    error: str = ""
    argv: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def parse(text: str, verbose: bool = False) -> PerfResult:
    r = PerfResult()

    def grab(label: str) -> str | None:
        m = re.search(rf"^\s*{re.escape(label)}\s*{_NUM}", text, re.M)
        return m.group(1) if m else None

    r.sent = int(grab("Queries sent:") or 0)
    r.completed = int(grab("Queries completed:") or 0)
    r.lost = int(grab("Queries lost:") or 0)
    r.qps = float(grab("Queries per second:") or 0.0)
    r.run_time = float(grab("Run time (s):") or 0.0)
    m = re.search(rf"Average Latency \(s\):\s*{_NUM} \(min {_NUM}, max {_NUM}\)", text)
    if m:
        r.avg_latency_ms, r.min_latency_ms, r.max_latency_ms = (
            float(m.group(i)) * 1000 for i in (1, 2, 3))
    m = re.search(r"Response codes:\s*(.*)$", text, re.M)
    if m:
        for code, n in re.findall(r"([A-Z]+) ([0-9]+) \(", m.group(1)):
            r.rcodes[code] = int(n)
    m = re.search(r"Testing complete \(([^)]*)\)", text)
    r.ended = m.group(1) if m else ""
    if verbose:
        lat: list[float] = []
        for line in text.splitlines():
            if not line.startswith("> "):
                continue
            parts = line.split()
            if parts[1] == "T":
                r.timeouts += 1
                continue
            with contextlib.suppress(ValueError, IndexError):
                lat.append(float(parts[-1]) * 1000)
        lat.sort()
        r.samples = len(lat)
        r.p50_ms, r.p90_ms, r.p99_ms, r.p999_ms = (
            percentile(lat, q) for q in (50, 90, 99, 99.9))
    if not r.sent and not r.error:
        r.error = "no statistics in dnsperf output: " + text[-800:]
    return r


def run(server: tuple[str, int], datafile: str, *, duration: float, clients: int = 1,
        outstanding: int = 100, max_qps: int | None = None, once: bool = False,
        timeout: float = 2.0, verbose: bool = False, cpu: str | None = "0",
        extra: tuple[str, ...] = ()) -> PerfResult:
    """One dnsperf run: ``-l duration``, ``-c clients``, ``-q outstanding``,
    ``-Q max_qps`` (fixed rate), ``-n 1`` when ``once`` (never wrap the input),
    ``-v`` when ``verbose`` (per-query latency: percentiles)."""
    argv = ["dnsperf", "-s", server[0], "-p", str(server[1]), "-d", datafile,
            "-l", f"{duration:g}", "-c", str(clients), "-q", str(outstanding),
            "-t", f"{timeout:g}", *extra]
    if max_qps:
        argv += ["-Q", str(max_qps)]
    if once:
        argv += ["-n", "1"]
    if verbose:
        argv.append("-v")
    if cpu is not None:
        argv = ["taskset", "-c", cpu, *argv]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=duration + timeout + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        r = parse(out.decode(errors="replace"), verbose)
        r.error = f"dnsperf did not finish within {duration + timeout + 30:.0f}s; killed"
        r.argv = argv
        return r
    finally:
        if proc.poll() is None:  # Ctrl-C while waiting: dnsperf must not outlive us
            proc.kill()
            proc.wait(timeout=10)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = parse(out.decode(errors="replace"), verbose)
    r.argv = argv
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    r.loadgen_cpu = round(used / max(r.run_time or wall, 1e-3), 3)
    if proc.returncode != 0 and not r.error:
        r.error = f"dnsperf exited with {proc.returncode}: {out.decode(errors='replace')[-800:]}"
    return r
