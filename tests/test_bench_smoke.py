"""Smoke test of the benchmark: ``python -m bench`` end to end, small and short.

Needs nsd, dnsmasq, unbound, dnsperf and taskset (fails when CI == "true" and one is
missing, skips otherwise). About a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import REPO_ROOT, require_binary

SERVERS = ("moat", "dnsmasq", "unbound", "ceiling-uvloop", "ceiling-asyncio")
WORKLOADS = ("hit", "blocked", "mix")
PROGRAMS = ("nsd", "dnsmasq", "unbound", "dnsperf", "resolver", "bench.ceiling")


def _alive_cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return None
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


@pytest.mark.slow
@pytest.mark.integration
def test_bench_quick_end_to_end(tmp_path: Path) -> None:
    for prog in ("nsd", "dnsmasq", "unbound", "dnsperf", "taskset"):
        require_binary(prog)
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the benchmark pins to cores 0 and 1")
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"]
                                          if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "bench", "--quick", "--sizes", "1000", "--reps", "1",
           "--duration", "2", "--latency-duration", "0.5", "--json", str(out)]
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=150, check=False)
    assert res.returncode == 0, f"bench failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    assert "moat/dnsmasq" in res.stdout, res.stdout  # the table with its ratios
    doc = json.loads(out.read_text())
    summary = doc["summary"]
    for server in SERVERS:
        size = "-" if server.startswith("ceiling") else "1000"
        s = summary.get(server, {}).get(size)
        assert s, f"no figures for {server} (size {size}): {doc['notes']}"
        assert s["startup_s"] is not None and s["rss_mb"], (server, s)
        for w in WORKLOADS:
            ws = s["workloads"].get(w)
            assert ws, f"{server}: no {w} workload: {doc['notes']}"
            assert ws["qps"] and ws["qps"] > 0, (server, w, ws)
            assert ws["q_per_cpu_s"] and ws["q_per_cpu_s"] > 0, (server, w, ws)
            assert ws["avg_ms"] is not None, (server, w, ws)
            assert ws["p50_ms"] is not None and ws["p99_ms"] is not None, (server, w, ws)
            assert ws["lost"] is not None, (server, w, ws)
        if not server.startswith("ceiling"):  # the empty-list baseline
            assert summary[server]["0"]["rss_mb"], (server, summary[server].get("0"))
            assert s.get("added_rss_mb") is not None, (server, s)
    pairs = {r["pair"] for r in doc["ratios"]}
    assert {"moat/dnsmasq", "moat/unbound", "moat/ceiling-uvloop"} <= pairs, pairs
    # every list server blocked the list (NXDOMAIN) and answered the hits (NOERROR)
    for run in doc["runs"]:
        assert not run.get("error"), run["error"]
        assert not run.get("checks_failed"), (run["server"], run["checks_failed"])
    # nothing left behind
    assert doc["left_running"] == []
    assert doc["started_processes"], "the JSON lists the processes it started"
    for pid, label in doc["started_processes"]:
        cmdline = _alive_cmdline(int(pid))
        assert cmdline is None or not any(p in cmdline for p in PROGRAMS), (
            f"{label} (pid {pid}) still running: {cmdline}")
