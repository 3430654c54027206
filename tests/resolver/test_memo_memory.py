"""What remembering a blocked name costs in memory.

moat memoises the query-policy verdict per question so that a blocked name asked again is
answered in a few µs. A device that walks through tens of thousands of listed names (a DGA
family whose names are in a feed, a scan) fills that memo up to its bound: on a Raspberry
Pi it must stay small. Measured in-process with tracemalloc through the UDP fast path and
the pipeline, with the bytes on the wire checked too.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode

from policy.build import build_policy
from resolver import config as config_mod
from resolver.app import App

SOA = "$TTL 300\n@ SOA ns.rpz.test. hostmaster.rpz.test. 1 3600 600 86400 60\n@ NS ns.rpz.test.\n"
N = 20000
PEER = ("127.0.0.1", 40000)


class Transport:
    """Counts answers and keeps every 1000th (keeping all would be what is measured)."""

    def __init__(self) -> None:
        self.count = 0
        self.kept: list[bytes] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        if self.count % 1000 == 0:
            self.kept.append(data)
        self.count += 1


class Listener:
    """A UdpListener stand-in: the pipeline calls send(), the fast path _t.sendto()."""

    transport = "udp"

    def __init__(self) -> None:
        self._t = Transport()

    def send(self, data: bytes, addr: Any) -> None:
        self._t.sendto(data, addr)

    def done_without_answer(self) -> None:
        raise AssertionError("a blocked name went unanswered")


def names() -> list[str]:
    return [f"c2-{i:05d}-{i * 7919 % 100003:x}.bad-{i % 97}.test" for i in range(N)]


def test_remembering_a_blocked_name_costs_under_250_bytes(tmp_path: Path) -> None:
    rpz = tmp_path / "big.rpz"
    rpz.write_text(SOA + "".join(f"{n} CNAME .\n" for n in names()))
    cfg = config_mod.load(None, {
        "server": {"max_in_flight": 0}, "upstream": {"servers": ["127.0.0.1:9"]},
        "policy": {"selftest": False,
                   "source": [{"name": "big", "path": str(rpz), "category": "c2"}]}})
    queries = []
    for i, name in enumerate(names()):
        q = dns.message.make_query(name, "A")
        q.id = i & 0xFFFF
        queries.append(q.to_wire())

    async def body() -> int:
        app = App(cfg)
        policy, report = build_policy(cfg.policy, 1)
        assert report.rules == N
        app.holder.swap(policy)
        p = app.pipeline
        listener = Listener()
        p.handle(queries[0], PEER, listener)  # a new client and the first answer: pipeline
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i, data in enumerate(queries[1:], 1):
            if i % 4 == 0:  # some through the full pipeline (TCP, odd shapes go there)
                p.handle(data, PEER, listener)
            else:
                assert p.fast.answer(data, PEER, listener)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert listener._t.count == N
        listed = {n + "." for n in names()}
        for data in listener._t.kept:
            r = dns.message.from_wire(data)
            assert r.rcode() == dns.rcode.NXDOMAIN and r.question[0].name.to_text() in listed
        return grown

    per_name = asyncio.run(body()) / (N - 1)
    # ~150 bytes: the question key, a dict slot and a small int (a Verdict with its rule
    # and name object was ~510)
    assert per_name < 250, f"{per_name:.0f} bytes per remembered blocked name"
