"""deploy/systemd/moat.service under a real systemd (PID 1 of a podman container, in a
private network namespace of its own, so the Pi config's 0.0.0.0:53 and [::]:53 are free).

The image (tests/platform/systemd/Dockerfile) installs moat as README's "Raspberry Pi"
section says, with the unit and deploy/systemd/moat.toml unchanged except that the upstream is
an nsd inside the container (no query leaves it). Checked: the unit starts; port 53 is bound
by its dynamic unprivileged user holding only CAP_NET_BIND_SERVICE, with numpy,
pyahocorasick and uvloop working under MemoryDenyWriteExecute and the system call filter;
answers (forwarded and sinkholed, UDP and TCP); the verdict log in /var/log/moat; reload
(SIGHUP) keeps the process and loads a new policy version; after `kill -9` systemd starts a
new one; two workers (fork) run and stop cleanly; `systemd-analyze security` (online).

`--cap-add SYS_ADMIN` lets systemd set up the unit's mount namespacing (without it:
226/NAMESPACE); runc, not crun (see platform.sh).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import EXAMPLE_ZONE
from platformlib import (
    SYSTEMD_IMAGE,
    container,
    dig,
    measure,
    need_container_engine,
    network_namespace,
    platform_sh,
    podman,
    unique,
    wait_for,
)
from test_platform_lint import EXPECTED_GAPS, EXPOSURE_MAX, parse_security

pytestmark = [pytest.mark.platform, pytest.mark.slow]

NSD_CONF = """\
server:
  ip-address: 127.0.0.1@5300
  port: 5300
  do-ip6: no
  username: ""
  chroot: ""
  zonesdir: "/etc/moat-test"
  pidfile: "/run/moat-test-upstream/nsd.pid"
  database: ""
  xfrdfile: "/run/moat-test-upstream/xfrd.state"
  zonelistfile: "/run/moat-test-upstream/zone.list"
  xfrdir: "/run/moat-test-upstream"
  server-count: 1
  rrl-ratelimit: 0
  zonefiles-write: 0
remote-control:
  control-enable: no
zone:
  name: "example.test."
  zonefile: "/etc/moat-test/example.test.zone"
"""


class Box:
    """The running systemd container, in its network namespace."""

    def __init__(self, name: str, ns: str) -> None:
        self.name, self.ns = name, ns

    def sh(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        return podman("exec", self.name, *cmd, netns=self.ns, check=check,
                      timeout=timeout).stdout

    def prop(self, name: str) -> str:
        return self.sh("systemctl", "show", "-p", name, "--value", "moat.service").strip()

    def dig(self, name: str, qtype: str = "A", tcp: bool = False) -> tuple[str, list[str]]:
        return dig("127.0.0.1", 53, name, qtype, tcp=tcp, netns=self.ns)

    def status(self, pid: str) -> dict[str, str]:
        text = self.sh("cat", f"/proc/{pid}/status")
        return {k.strip(): v.strip() for k, _, v in
                (line.partition(":") for line in text.splitlines())}

    def journal(self) -> str:
        return self.sh("journalctl", "-u", "moat.service", "--no-pager", "-o", "cat")


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    need_container_engine()
    platform_sh("base")
    measure("podman build systemd test image", f"{platform_sh('systemd-image'):.1f} s")
    upstream = tmp_path_factory.mktemp("moat-test-upstream")
    (upstream / "nsd.conf").write_text(NSD_CONF)
    (upstream / "example.test.zone").write_text(EXAMPLE_ZONE)
    for p in (upstream, upstream / "nsd.conf", upstream / "example.test.zone"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    with network_namespace("systemd") as ns, container(unique("systemd"), netns=ns) as name:
        t0 = time.monotonic()
        podman("run", "-d", "--name", name, "--systemd=always", "--cap-add", "SYS_ADMIN",
               "--network", "host", "-v", f"{upstream}:/etc/moat-test:ro", SYSTEMD_IMAGE,
               netns=ns)
        b = Box(name, ns)
        try:
            wait_for("moat.service answers on port 53",
                     lambda: b.dig("c2.moat.test") == ("NOERROR", ["0.0.0.0"]), timeout=90)
        except AssertionError:
            print(podman("logs", name, netns=ns, check=False).stdout[-3000:])
            print(b.sh("systemctl", "status", "--no-pager", "moat.service", check=False))
            raise
        measure("systemd container boot -> moat answers", f"{time.monotonic() - t0:.1f} s")
        yield b
        t0 = time.monotonic()
        podman("stop", "-t", "30", name, netns=ns, timeout=60)
        measure("podman stop (systemd shutdown)", f"{time.monotonic() - t0:.1f} s")


def test_runs_unprivileged_on_port_53(box: Box) -> None:
    assert box.prop("ActiveState") == "active"
    pid = box.prop("MainPID")
    st = box.status(pid)
    uid = int(st["Uid"].split()[0])
    assert uid != 0 and {int(x) for x in st["Uid"].split()} == {uid}, st["Uid"]
    assert box.prop("User") == "moat"
    for key in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(st[key], 16) == 1 << 10, f"{key}={st[key]}"  # CAP_NET_BIND_SERVICE only
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", st
    # `ss -p` cannot name another user's process without CAP_SYS_PTRACE; -e gives the owner
    ss = box.sh("ss", "-Hlnute", "sport = :53")
    # (netid, local address) of each socket: UDP+TCP x 0.0.0.0+[::]. Not a count of ":53"
    # anywhere in the line: "sk:53" is a socket id that turns up now and then.
    listeners = re.findall(r"^(udp|tcp)\s+\S+\s+\d+\s+\d+\s+(\S+)\s", ss, re.M)
    assert sorted(listeners) == [("tcp", "0.0.0.0:53"), ("tcp", "[::]:53"),
                                 ("udp", "0.0.0.0:53"), ("udp", "[::]:53")], ss
    assert set(re.findall(r"uid:(\d+)", ss)) == {str(uid)}, ss
    assert "system.slice/moat.service" in ss
    measure("systemd: moat VmRSS", st["VmRSS"])


def test_answers_and_logs_verdicts(box: Box) -> None:
    for tcp in (False, True):
        assert box.dig("www.example.test", tcp=tcp) == ("NOERROR", ["192.0.2.10"])
        assert box.dig("c2.moat.test", tcp=tcp) == ("NOERROR", ["0.0.0.0"])
    assert box.dig("phishing.moat.test", "AAAA") == ("NOERROR", ["::"])
    log = wait_for("verdict in /var/log/moat/verdicts.jsonl",
                   lambda: "phishing.moat.test" in (text := box.sh(
                       "cat", "/var/log/moat/verdicts.jsonl", check=False)) and text,
                   timeout=10)
    assert '"category":"c2"' in log
    box.sh("test", "-d", "/var/lib/private/moat")  # DynamicUser's StateDirectory
    env = box.sh("cat", f"/proc/{box.prop('MainPID')}/environ").split("\0")
    assert "STATE_DIRECTORY=/var/lib/moat" in env and "RUNTIME_DIRECTORY=/run/moat" in env
    assert "policy version 1 loaded" in box.journal()
    metrics = box.sh("python3", "-c", "import urllib.request as u; print(u.urlopen("
                     "'http://127.0.0.1:9153/healthz', timeout=3).read().decode())")
    assert metrics.strip() == "ok"


def test_reload_is_sighup(box: Box) -> None:
    pid = box.prop("MainPID")
    before = box.journal().count("loaded (SIGHUP)")
    box.sh("systemctl", "reload", "moat.service")
    wait_for("a policy loaded on SIGHUP",
             lambda: box.journal().count("loaded (SIGHUP)") > before, timeout=15)
    assert box.prop("MainPID") == pid
    assert box.dig("c2.moat.test") == ("NOERROR", ["0.0.0.0"])


def test_restarted_after_kill_9(box: Box) -> None:
    pid = box.prop("MainPID")
    restarts = int(box.prop("NRestarts"))
    t0 = time.monotonic()
    box.sh("kill", "-9", pid)
    new = wait_for("a new MainPID",
                   lambda: (p := box.prop("MainPID")) not in ("0", pid) and p, timeout=30)
    wait_for("answers again", lambda: box.dig("c2.moat.test") == ("NOERROR", ["0.0.0.0"]),
             timeout=30)
    measure("systemd: kill -9 -> answering again (RestartSec=2s)",
            f"{time.monotonic() - t0:.1f} s")
    assert int(box.prop("NRestarts")) == restarts + 1
    assert new != pid


def test_two_workers_fork_and_stop_cleanly(box: Box) -> None:
    """workers = 2: the supervisor forks two processes (and a policy builder) inside the
    sandbox; `systemctl stop` (SIGTERM to the main process, KillMode=mixed) ends them all
    without systemd having to SIGKILL anything."""
    box.sh("sed", "-i", "s/^workers = 1$/workers = 2/", "/etc/moat/moat.toml")
    try:
        box.sh("systemctl", "restart", "moat.service")
        wait_for("answers with 2 workers",
                 lambda: box.dig("c2.moat.test") == ("NOERROR", ["0.0.0.0"]), timeout=30)
        wait_for("supervisor + 2 workers", lambda: box.sh(
            "pgrep", "-c", "-f", "venv/bin/moat serve", check=False).strip() == "3", timeout=15)
        assert box.dig("www.example.test", tcp=True) == ("NOERROR", ["192.0.2.10"])
        t0 = time.monotonic()
        box.sh("systemctl", "stop", "moat.service")
        measure("systemd: stop with 2 workers", f"{time.monotonic() - t0:.1f} s")
        journal = box.journal()
        assert "SIGKILL" not in journal and "Killing process" not in journal, journal[-3000:]
        assert box.prop("ActiveState") == "inactive"
    finally:
        box.sh("sed", "-i", "s/^workers = 2$/workers = 1/", "/etc/moat/moat.toml")
        box.sh("systemctl", "start", "moat.service", check=False)


def test_systemd_analyze_security_online(box: Box) -> None:
    out = box.sh("systemd-analyze", "security", "--no-pager", "moat.service", check=False)
    score, failed = parse_security(out)
    measure("systemd-analyze security moat.service (running)", score)
    assert score < EXPOSURE_MAX, out
    assert failed <= EXPECTED_GAPS, f"new gaps: {sorted(failed - EXPECTED_GAPS)}\n{out}"


def test_unit_file_is_the_shipped_one(box: Box) -> None:
    shipped = (Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "moat.service")
    assert box.sh("cat", "/etc/systemd/system/moat.service") == shipped.read_text()
