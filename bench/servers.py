"""The upstream (nsd) and the servers under test, each pinned to a core with taskset.

Process handling comes from the test harness (tests/harness/servers.py):
``ManagedProcess`` runs a daemon in its own session, stops it with SIGTERM then
SIGKILL (by PID, with whatever it forked) and is reaped at interpreter exit.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype

from . import names, procfs

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

from harness.ports import free_port_on  # noqa: E402
from harness.servers import ManagedProcess, NsdServer, find_binary  # noqa: E402

#: Every process this run started: (pid, program), for the no-leftovers check.
STARTED: list[tuple[int, str]] = []


class StartError(RuntimeError):
    pass


# --- the upstream ---------------------------------------------------------------------


class PinnedNsd(NsdServer):
    """nsd (``rrl-ratelimit: 0``, from the harness) started under ``taskset -c CPU``."""

    binary = "taskset"  # the harness replaces argv[0] with this program's path

    def __init__(self, zones: dict[str, str], cpu: str = "0", **kw: Any) -> None:
        super().__init__(zones, **kw)
        self.cpu = cpu

    def _prepare(self, workdir: Path) -> list[str]:
        argv = super()._prepare(workdir)
        return ["taskset", "-c", self.cpu, find_binary("nsd"), *argv[1:]]

    def start(self) -> PinnedNsd:
        super().start()
        assert self.proc is not None
        STARTED.append((self.proc.pid, "nsd"))
        return self


# --- probing ----------------------------------------------------------------------------


def ask(port: int, name: str, rdtype: str = "A", timeout: float = 1.0,
        host: str = "127.0.0.1") -> dns.message.Message | None:
    """One UDP query; None on timeout or refusal (nobody listening yet)."""
    q = dns.message.make_query(name, rdtype)
    q.id = secrets.randbelow(65536)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            s.send(q.to_wire())
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                data = s.recv(65535)
                if len(data) >= 2 and int.from_bytes(data[:2], "big") == q.id:
                    return dns.message.from_wire(data)
        except (OSError, dns.exception.DNSException):
            return None
    return None


def blocked(msg: dns.message.Message | None) -> bool:
    """NXDOMAIN (RPZ ``CNAME .``, dnsmasq ``address=/x/``) or a 0.0.0.0 sinkhole answer."""
    if msg is None:
        return False
    if msg.rcode() == dns.rcode.NXDOMAIN:
        return True
    for rrset in msg.answer:
        if rrset.rdtype == dns.rdatatype.A and any(r.address == "0.0.0.0" for r in rrset):
            return True
    return False


def answered(msg: dns.message.Message | None) -> bool:
    """NOERROR with an A record (a forwarded or cached upstream answer)."""
    return msg is not None and msg.rcode() == dns.rcode.NOERROR and any(
        r.rdtype == dns.rdatatype.A for r in msg.answer)


# --- servers under test ---------------------------------------------------------------


class Server:
    """A server under test, started under ``taskset -c cpu``; subclasses give ``argv``."""

    kind = "server"

    def __init__(self, label: str, workdir: Path, upstream: tuple[str, int], *,
                 rpz: Path, dnsmasq_conf: Path, hits_file: Path, cpu: str = "1") -> None:
        self.label = label
        self.workdir = workdir
        self.upstream = upstream
        self.rpz = rpz
        self.dnsmasq_conf = dnsmasq_conf
        self.hits_file = hits_file
        self.cpu = cpu
        self.port = 0
        self.proc: ManagedProcess | None = None
        self.t_start = 0.0
        self.pids_seen: set[int] = set()
        self.peak_child_rss_kb = 0
        self.peak_tree_rss_kb = 0

    # subclass hooks
    def argv(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    def cwd(self) -> str:
        return str(self.workdir)

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        return self.proc.output() if self.proc is not None else ""

    def start(self, probe: str, timeout: float) -> float:
        """Start, wait until ``probe`` answers as blocked; returns the seconds taken."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        last = ""
        for _attempt in range(3):  # a free port can be taken between check and bind
            self.port = free_port_on("127.0.0.1")
            argv = ["taskset", "-c", self.cpu, *self.argv()]
            log = self.workdir / f"{self.label}.log"
            log.write_bytes(b"")
            self.proc = ManagedProcess(argv, log_path=log, cwd=self.cwd(), env=self.env(),
                                       name=self.label)
            self.t_start = time.monotonic()
            self.proc.start()
            STARTED.append((self.proc.pid, self.label))
            ok, why = self._wait_blocked(probe, timeout)
            if ok:
                return time.monotonic() - self.t_start
            out = self.log_text()
            self.stop()
            last = f"{self.label} not ready ({why}); output:\n{out[-3000:]}"
            if "in use" not in out.lower():
                break
        raise StartError(last)

    def _wait_blocked(self, probe: str, timeout: float) -> tuple[bool, str]:
        assert self.proc is not None
        deadline = self.t_start + timeout
        n = 0
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                return False, f"exited with code {rc}"
            if n % 5 == 0:
                self._sample_tree()
            n += 1
            if blocked(ask(self.port, probe, timeout=0.05)):
                self._sample_tree()
                return True, ""
            time.sleep(0.01)
        return False, f"{probe} not blocked within {timeout:.0f}s"

    def _sample_tree(self) -> None:
        pids = procfs.tree(self.pid)
        total = 0
        for p in pids:
            st = procfs.status(p)
            rss = st.get("VmRSS", 0)
            total += rss
            if p != self.pid:
                self.peak_child_rss_kb = max(self.peak_child_rss_kb, st.get("VmHWM", rss))
        self.peak_tree_rss_kb = max(self.peak_tree_rss_kb, total)
        self.pids_seen.update(pids)

    def memory(self) -> dict[str, Any]:
        """VmRSS/VmHWM/RssAnon/RssFile/RssShmem of the main process, the tree's RSS sum."""
        pids = procfs.tree(self.pid)
        main = procfs.status(self.pid)
        others = {p: {**procfs.status(p), "Pss": procfs.pss_kb(p)} for p in pids[1:]}
        pss = procfs.pss_kb(self.pid) + sum(int(o.get("Pss", 0)) for o in others.values())
        return {
            "pid": self.pid,
            "processes": len(pids),
            "rss_kb": main.get("VmRSS", 0),
            "hwm_kb": main.get("VmHWM", 0),
            "anon_kb": main.get("RssAnon", 0),
            "file_kb": main.get("RssFile", 0),
            "shmem_kb": main.get("RssShmem", 0),
            "threads": main.get("Threads", 0),
            "tree_rss_kb": main.get("VmRSS", 0) + sum(s.get("VmRSS", 0)
                                                      for s in others.values()),
            "tree_pss_kb": pss,
            "children": [{"pid": p, **s} for p, s in others.items()],
        }

    def cpu_seconds(self) -> float:
        return procfs.tree_cpu_seconds(self.pid) if self.proc is not None else 0.0

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        with contextlib.suppress(Exception):
            return self.proc.stop(timeout=10)
        return None


class Moat(Server):
    kind = "moat"

    def __init__(self, *a: Any, workers: int = 1, cache_size: int = 100000,
                 **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.workers = workers
        self.cache_size = cache_size

    def argv(self) -> list[str]:
        conf = self.workdir / "moat.toml"
        conf.write_text(
            "[log]\nlevel = \"warning\"\n\n"
            f"[cache]\nsize = {self.cache_size}\n\n"
            "[policy]\nselftest = true\n\n"
            "# loopback is exempt by default anyway\n[ratelimit]\nenabled = false\n")
        argv = [sys.executable, "-m", "resolver", "serve",
                "--listen", f"127.0.0.1:{self.port}",
                "--upstream", f"{self.upstream[0]}:{self.upstream[1]}",
                "--rpz", str(self.rpz), "--config", str(conf),
                "--state-dir", str(self.workdir / "state")]
        if os.geteuid() == 0:
            argv += ["--user", "root"]
        if self.workers > 1:
            argv += ["--workers", str(self.workers)]
        return argv

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        pp = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def cwd(self) -> str:
        return str(REPO)

    def memory(self) -> dict[str, Any]:
        mem = super().memory()
        maps = procfs.mappings(self.pid, "moat-policy")
        mem["policy_maps"] = maps
        mem["policy_map_size_kb"] = sum(int(m.get("Size", 0)) for m in maps)  # type: ignore[call-overload]
        mem["policy_map_rss_kb"] = sum(int(m.get("Rss", 0)) for m in maps)  # type: ignore[call-overload]
        return mem


class Dnsmasq(Server):
    kind = "dnsmasq"

    def argv(self) -> list[str]:
        h, p = self.upstream
        return [find_binary("dnsmasq"), "--keep-in-foreground",
                f"--conf-file={self.dnsmasq_conf}",  # the list (replaces /etc/dnsmasq.conf)
                "--no-resolv", "--no-hosts", "--no-poll",
                f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
                f"--server={h}#{p}", f"--pid-file={self.workdir}/dnsmasq.pid",
                "--log-facility=-", "--user=root",
                "--cache-size=10000",
                # moat allows 2000 queries in flight; dnsmasq's default is 150
                "--dns-forward-max=2000"]


class Unbound(Server):
    kind = "unbound"

    def argv(self) -> list[str]:
        h, p = self.upstream
        conf = self.workdir / "unbound.conf"
        conf.write_text("\n".join([
            "server:",
            f"  interface: 127.0.0.1@{self.port}",
            f"  port: {self.port}",
            "  do-daemonize: no",
            '  username: ""',
            '  chroot: ""',
            f'  directory: "{self.workdir}"',
            f'  pidfile: "{self.workdir}/unbound.pid"',
            '  logfile: ""',
            "  use-syslog: no",
            "  verbosity: 0",
            "  num-threads: 1",
            "  do-ip6: no",
            "  access-control: 127.0.0.0/8 allow",
            "  do-not-query-localhost: no",
            # rpz needs the respip module; no DNSSEC validation (plain test zone)
            '  module-config: "respip iterator"',
            '  local-zone: "test." nodefault',  # RFC 6761 default would answer test. itself
            '  domain-insecure: "test."',
            "remote-control:",
            "  control-enable: no",
            "forward-zone:",
            '  name: "."',
            f"  forward-addr: {h}@{p}",
            "rpz:",
            f'  name: "{names.RPZ_ORIGIN}"',
            f'  zonefile: "{self.rpz}"',
            "  rpz-log: no",
            "",
        ]))
        return [find_binary("unbound"), "-d", "-c", str(conf)]


class Ceiling(Server):
    kind = "ceiling"

    def __init__(self, *a: Any, loop: str = "uvloop", **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.loop = loop

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "bench.ceiling", "--listen", f"127.0.0.1:{self.port}",
                "--names", str(self.hits_file), "--loop", self.loop]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        pp = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
        return env

    def cwd(self) -> str:
        return str(REPO)


SERVER_KINDS = ("moat", "moat-w2", "dnsmasq", "unbound", "ceiling-uvloop", "ceiling-asyncio")


def make_server(label: str, workdir: Path, upstream: tuple[str, int], **kw: Any) -> Server:
    if label == "moat":
        return Moat(label, workdir, upstream, **kw)
    if label == "moat-w2":
        return Moat(label, workdir, upstream, workers=2, **kw)
    if label == "dnsmasq":
        return Dnsmasq(label, workdir, upstream, **kw)
    if label == "unbound":
        return Unbound(label, workdir, upstream, **kw)
    if label == "ceiling-uvloop":
        return Ceiling(label, workdir, upstream, loop="uvloop", **kw)
    if label == "ceiling-asyncio":
        return Ceiling(label, workdir, upstream, loop="asyncio", **kw)
    raise ValueError(f"unknown server {label!r} (one of {', '.join(SERVER_KINDS)})")


def leftovers() -> list[str]:
    """Processes this run started that are still alive (same program name)."""
    out = []
    for pid, label in STARTED:
        if procfs.alive(pid):
            out.append(f"{label} (pid {pid}: {' '.join(procfs.cmdline(pid))[:120]})")
    return out
