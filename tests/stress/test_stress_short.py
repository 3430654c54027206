"""Short CI versions of the stress scripts in this directory (see README.md here): the
same code and the same checks, at sizes that run in about a minute and a half together.

* fuzz_server: 30,000 mutated packets over UDP and TCP; moat still answers correctly,
  counts every malformed packet, RSS flat, no internal error;
* reload_under_load: a 100,000-name RPZ reloaded 3 times under 2000 q/s; nothing lost,
  no wrong answer during the swaps, RSS flat across reloads;
* soak: 45 s of a realistic mix at 1000 q/s plus a TCP client; nothing lost, RSS flat
  after warm-up.

They need nsd and dnsperf (fail when CI == "true" and one is missing, skip otherwise).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzz_server  # noqa: E402
import reload_under_load  # noqa: E402
import soak  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_fuzz_server_short(require_binary) -> None:
    require_binary("nsd")
    r = fuzz_server.run(packets=30_000, rate=20_000, deadline=90)
    fuzz_server.report(r)
    assert r.ok, "\n".join(r.problems)
    assert r.packets == 30_000 and r.tcp_frames > 1000 and r.tcp_connections > 100
    assert r.expected_malformed > 20_000  # the mutations mostly do break the packets


def test_reload_under_load_short(require_binary) -> None:
    require_binary("nsd")
    require_binary("dnsperf")
    r = reload_under_load.run(names=100_000, reloads=3, qps=2000, probe_rate=200)
    reload_under_load.report(r)
    assert r.ok, "\n".join(r.problems)
    assert len(r.load_s) == 3 and r.perf is not None and r.perf.lost == 0


def test_soak_short(require_binary) -> None:
    require_binary("nsd")
    require_binary("dnsperf")
    r = soak.run(seconds=45, qps=1000, names=1500, sample=1.0)
    soak.report(r)
    assert r.ok, "\n".join(r.problems)
    assert r.perf is not None and r.perf.lost == 0 and r.perf.sent >= 40_000
