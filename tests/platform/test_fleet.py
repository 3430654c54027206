"""A fleet on loopback: moat instances behind dnsdist (deploy/dnsdist/dnsdist.conf, as
shipped, addresses from its environment variables), and a policy primary (Knot) whose RPZ
zone every instance pulls by zone transfer.

What dnsdist guarantees, and so what is asserted: it health-checks every backend each second
(c2.moat.test must resolve) and marks one down after 2 failed checks in a row. Between a
moat going away and that moment (at most about 2 intervals + the 1 s check timeout), queries
that the hashing sends to it are lost: the client times out and retries, as with any resolver
restart. Their number is measured and bounded by that window. Once dnsdist has marked the
backend down, no query fails (every one of a bounded batch is answered), and when the moat
comes back (2 good checks) it gets its share again.

The transfer part runs once resolver/app.py wires resolver/xfr.py in (skipped before).
Everything listens on 127.0.0.1 only; every loop is bounded; the harness stops every
process (by PID) at the end, also on failure.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.rcode
import pytest
from harness import REPO_ROOT, KnotServer, ManagedProcess, dns_query, free_port_on
from platformlib import measure, need_root, tool, wait_for

pytestmark = [pytest.mark.platform, pytest.mark.integration, pytest.mark.slow]

DNSDIST_CONF = REPO_ROOT / "deploy" / "dnsdist" / "dnsdist.conf"
CHECK_INTERVAL, MAX_CHECK_FAILURES, CHECK_TIMEOUT = 1.0, 2, 1.0  # as in dnsdist.conf
ORIGIN = "rpz.test."


class Dnsdist:
    """dnsdist in the foreground with the shipped config; its API tells the backends' state."""

    def __init__(self, backends: list[str], workdir: Path) -> None:
        self.port = free_port_on("127.0.0.1")
        self.web = free_port_on("127.0.0.1")
        self.key = secrets.token_hex(16)
        env = dict(os.environ, MOAT_BACKENDS=" ".join(backends),
                   DNSDIST_LISTEN=f"127.0.0.1:{self.port}", DNSDIST_API_KEY=self.key,
                   DNSDIST_WEBSERVER=f"127.0.0.1:{self.web}")
        self.proc = ManagedProcess(
            [tool("dnsdist"), "--supervised", "--disable-syslog", "-C", str(DNSDIST_CONF)],
            log_path=workdir / "dnsdist.log", env=env, name="dnsdist")

    def __enter__(self) -> Dnsdist:
        self.proc.start()
        wait_for("dnsdist API", lambda: self.proc.poll() is None and self._try_servers(),
                 timeout=15)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stop(timeout=5)

    def _try_servers(self) -> list[dict[str, Any]] | None:
        try:
            return self.servers()
        except OSError:
            assert self.proc.poll() is None, self.proc.output()
            return None

    def servers(self) -> list[dict[str, Any]]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.web}/api/v1/servers/localhost",
                                     headers={"X-API-Key": self.key})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=2) as resp:
            data = json.load(resp)
        return sorted(data["servers"], key=lambda s: s["name"])

    def states(self) -> list[str]:
        return [s["state"].lower() for s in self.servers()]

    def queries(self) -> list[int]:
        return [int(s["queries"]) for s in self.servers()]


def ask(port: int, name: str, timeout: float = 1.0) -> str:
    """rcode text of one UDP query to 127.0.0.1:port, or "timeout"."""
    try:
        return dns.rcode.to_text(dns_query("127.0.0.1", port, name, "A",
                                           timeout=timeout).rcode())
    except (dns.exception.Timeout, OSError):
        return "timeout"


def burst(port: int, names: list[str], timeout: float = 1.0) -> list[tuple[str, str]]:
    """Ask every name once; the failures as (name, outcome). Answered = NOERROR/NXDOMAIN."""
    out = []
    for name in names:
        rc = ask(port, name, timeout)
        if rc not in ("NOERROR", "NXDOMAIN"):
            out.append((name, rc))
    return out


NAMES = [f"host{i}.example.test" for i in range(150)] + ["www.example.test", "c2.moat.test"]


def failover(dd: Dnsdist, down: Callable[[], object], up: Callable[[], object],
             victim: int, label: str) -> None:
    """Both up and used; ``down()`` makes backend ``victim`` stop answering (it returns at
    once); count the queries lost until dnsdist marks it down; then none may fail; ``up()``
    brings it back; dnsdist marks it up and uses it again."""
    wait_for("both backends up", lambda: dd.states() == ["up", "up"], timeout=20)
    assert burst(dd.port, NAMES) == []
    used = dd.queries()
    assert all(q > 0 for q in used), f"consistent hashing used only some backends: {used}"

    t0 = time.monotonic()
    down()
    lost = asked = 0
    deadline = t0 + 15
    for i in range(100_000):  # bounded by the deadline, far earlier
        if dd.states()[victim] == "down":
            break
        assert time.monotonic() < deadline, "dnsdist did not mark the stopped moat down"
        asked += 1
        if ask(dd.port, NAMES[i % len(NAMES)], timeout=0.5) not in ("NOERROR", "NXDOMAIN"):
            lost += 1
    window = time.monotonic() - t0
    measure(f"fleet ({label}): -> dnsdist marks it down", f"{window:.1f} s")
    measure(f"fleet ({label}): queries lost meanwhile", f"{lost} of {asked}")
    # at most MAX_CHECK_FAILURES checks, each at most CHECK_TIMEOUT late, + one interval
    assert window < CHECK_INTERVAL * (MAX_CHECK_FAILURES + 1) + CHECK_TIMEOUT + 2.0

    failures = burst(dd.port, NAMES * 2)
    assert failures == [], f"{len(failures)} queries failed after the backend was marked down"
    before = dd.queries()[victim]

    t0 = time.monotonic()
    up()
    wait_for("the backend up again", lambda: dd.states()[victim] == "up", timeout=20)
    measure(f"fleet ({label}): back -> dnsdist marks it up", f"{time.monotonic() - t0:.1f} s")
    assert burst(dd.port, NAMES) == []
    assert dd.queries()[victim] > before


@pytest.fixture
def fleet_tools() -> None:
    need_root()
    for t in ("dnsdist", "dig"):
        tool(t)


def test_dnsdist_fails_over_between_two_moats(fleet_tools: None, moat: Any,
                                              nsd_upstream: Any, tmp_path: Path) -> None:
    ports = [free_port_on("127.0.0.1") for _ in range(2)]
    procs = [moat(listen=f"127.0.0.1:{p}", upstream=nsd_upstream) for p in ports]
    with Dnsdist([f"127.0.0.1:{p}" for p in ports], tmp_path) as dd:
        assert ask(dd.port, "c2.moat.test") == "NOERROR"
        r = dns_query("127.0.0.1", dd.port, "www.example.test", "A")
        assert [rr.to_text() for rrset in r.answer for rr in rrset] == ["192.0.2.10"]

        # The worst case: a moat that hangs (SIGSTOP) answers nothing, not even ICMP errors,
        # so dnsdist notices only by health-check timeouts.
        pid = procs[1].pid
        try:
            failover(dd, lambda: os.kill(pid, signal.SIGSTOP), lambda: os.kill(pid, signal.SIGCONT),
                     victim=1, label="a moat hangs (SIGSTOP)")
        finally:
            os.kill(pid, signal.SIGCONT)


# --- the policy primary: RPZ by zone transfer, NOTIFY to every instance --------------------


def xfr_wired() -> bool:
    app = REPO_ROOT / "resolver" / "app.py"
    return (REPO_ROOT / "resolver" / "xfr.py").exists() and "ZoneTransfers" in app.read_text()


def rpz(serial: int, *rules: str) -> str:
    return (f"$ORIGIN {ORIGIN}\n$TTL 60\n"
            f"@ 60 IN SOA ns1.rpz.test. hostmaster.rpz.test. {serial} 3600 600 86400 60\n"
            "@ 60 IN NS localhost.\n" + "\n".join(rules) + "\n")


RULES = ("bad.example CNAME .", "*.evil.example CNAME .")


@pytest.fixture
def knot_tools() -> None:
    need_root()
    for t in ("knotd", "knotc", "dnsdist"):
        tool(t)


def test_fleet_follows_the_policy_primary(knot_tools: None, moat: Any, nsd_upstream: Any,
                                          tmp_path: Path) -> None:
    if not xfr_wired():
        pytest.skip("resolver/app.py does not construct ZoneTransfers yet (RPZ by transfer)")
    ports = [free_port_on("127.0.0.1") for _ in range(2)]
    with KnotServer({ORIGIN: rpz(1, *RULES)},
                    notify_to=[("127.0.0.1", p) for p in ports]) as knot:
        cfg = tmp_path / "moat.toml"
        cfg.write_text(
            "[[policy.source]]\n"
            'name = "rpz-primary"\n'
            f'zone = "{ORIGIN.rstrip(".")}"\n'
            f'primary = "127.0.0.1:{knot.port}"\n'
            'category = "malware"\n'
            'timeout = "3s"\n')
        t0 = time.monotonic()
        procs = [moat("--config", str(cfg), listen=f"127.0.0.1:{p}", upstream=nsd_upstream,
                      ready_timeout=30) for p in ports]
        for p in ports:
            wait_for(f"moat on {p} blocks bad.example (AXFR)",
                     lambda p=p: ask(p, "bad.example") == "NXDOMAIN", timeout=20)
        measure("fleet: 2 moats started and transferred the zone",
                f"{time.monotonic() - t0:.1f} s")

        with Dnsdist([f"127.0.0.1:{p}" for p in ports], tmp_path) as dd:
            assert ask(dd.port, "x.evil.example") == "NXDOMAIN"
            t0 = time.monotonic()
            knot.update_zone(ORIGIN, rpz(2, *RULES, "new.example CNAME ."))
            for p in ports:
                wait_for(f"moat on {p} blocks new.example (NOTIFY + IXFR)",
                         lambda p=p: ask(p, "new.example") == "NXDOMAIN", timeout=15)
            measure("fleet: zone change on the primary -> blocked on both moats",
                    f"{time.monotonic() - t0:.1f} s")
            assert ask(dd.port, "new.example") == "NXDOMAIN"

            def restart() -> None:
                procs[0].stop()  # reap the one that got SIGTERM (exited by now)
                procs[0] = moat("--config", str(cfg), listen=f"127.0.0.1:{ports[0]}",
                                upstream=nsd_upstream, ready_timeout=30)

            failover(dd, lambda: procs[0].signal(signal.SIGTERM), restart, victim=0,
                     label="a moat is stopped (SIGTERM)")
            # the restarted instance (a fresh state directory) transferred the zone again
            wait_for("restarted moat blocks new.example",
                     lambda: ask(ports[0], "new.example") == "NXDOMAIN", timeout=15)


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    t0 = time.monotonic()
    yield
    assert time.monotonic() - t0 < 300, "a fleet test ran for more than 5 minutes"
