"""Real DNS daemons from Debian, run in the foreground on loopback for tests.

Every class here writes its own configuration into a fresh temporary
directory, starts the daemon in the foreground on a free loopback port, waits
(bounded) until it answers DNS queries and stops it again (SIGTERM, then
SIGKILL after a deadline).  Use them as context managers::

    with NsdServer({"example.test.": EXAMPLE_ZONE}) as nsd:
        msg = nsd.query("www.example.test", "A")

The process helpers (``ManagedProcess``, ``reap_all``) are shared with
``moat_proc.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from .ports import free_port_on

__all__ = [
    "DaemonStartError",
    "DnsmasqServer",
    "EXAMPLE_ORIGIN",
    "EXAMPLE_RECORDS",
    "EXAMPLE_ZONE",
    "KnotServer",
    "ManagedProcess",
    "MissingBinaryError",
    "NsdServer",
    "UnboundServer",
    "bump_serial",
    "dns_query",
    "find_binary",
    "make_zone",
    "pid_alive",
    "reap_all",
]

# Seconds between SIGTERM and SIGKILL when stopping a daemon.
STOP_TIMEOUT = 10.0
# Per-attempt timeout of one readiness probe query.
PROBE_TIMEOUT = 0.5
# How often a daemon start is retried when an auto-chosen port was taken
# between free_port() and the daemon's bind().
PORT_RETRIES = 3

_KEEP_DIRS = os.environ.get("MOAT_HARNESS_KEEP") == "1"


# --------------------------------------------------------------------------- #
# Binaries
# --------------------------------------------------------------------------- #


class MissingBinaryError(RuntimeError):
    """A DNS program the harness needs is not installed."""


_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def find_binary(name: str) -> str:
    """Absolute path of ``name`` (also looking in sbin dirs not on a user's PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN_DIRS:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    raise MissingBinaryError(f"{name!r} is not installed (not on PATH nor in {_SBIN_DIRS})")


# --------------------------------------------------------------------------- #
# Process management
# --------------------------------------------------------------------------- #

_LIVE: set[ManagedProcess] = set()
_LIVE_LOCK = threading.Lock()


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    # state is the field after the ")" that closes the command name
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def _session_members(sid: int) -> list[int]:
    """PIDs (not zombies) whose session id AND process group are ``sid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # fields: state ppid pgrp session ...
        state, pgrp, session = fields[0], int(fields[2]), int(fields[3])
        if pgrp == sid and session == sid and state not in ("Z", "X"):
            out.append(int(entry))
    return out


class ManagedProcess:
    """A child process in its own session whose output goes to a log file.

    ``stop()`` sends SIGTERM to the main process, waits, then SIGKILLs it and
    any processes left in its session (its own forked workers), by PID.
    Every started process is tracked so ``reap_all()`` (run at interpreter exit
    and by the test session teardown) can kill whatever a failed test left.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        cwd: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        name: str | None = None,
        merge_stderr: bool = True,
        stdout_path: Path | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.stdout_path = stdout_path
        self.cwd = cwd
        self.env = env
        self.name = name or Path(self.argv[0]).name
        self.merge_stderr = merge_stderr
        self.popen: subprocess.Popen[bytes] | None = None
        self.killed = False

    # -- lifecycle --------------------------------------------------------- #
    def start(self) -> ManagedProcess:
        if self.popen is not None:
            raise RuntimeError(f"{self.name} already started")
        log = open(self.log_path, "ab")
        out = open(self.stdout_path, "ab") if self.stdout_path else log
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if self.merge_stderr else log,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
            )
        finally:
            log.close()
            if out is not log:
                out.close()
        with _LIVE_LOCK:
            _LIVE.add(self)
        return self

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} not started")
        return self.popen.pid

    def poll(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def send_signal(self, sig: int) -> None:
        if self.running():
            assert self.popen is not None
            self.popen.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code.

        ``self.killed`` tells whether SIGKILL was needed.
        """
        if self.popen is None:
            return None
        try:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.killed = True
                    self._kill_session()
                    self.popen.wait(timeout=5)
            # Workers forked by the daemon must not outlive it.
            self._kill_session(grace=2.0)
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(self)
        return self.popen.returncode

    def _kill_session(self, grace: float = 0.0) -> None:
        assert self.popen is not None
        sid = self.popen.pid
        deadline = time.monotonic() + grace
        while True:
            members = _session_members(sid)
            if not members:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
        end = time.monotonic() + 5
        while _session_members(sid) and time.monotonic() < end:
            time.sleep(0.05)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def live_processes() -> list[ManagedProcess]:
    with _LIVE_LOCK:
        return list(_LIVE)


def reap_all(spare: Iterable[ManagedProcess] = ()) -> list[str]:
    """Kill every harness process still running (but ``spare``). Returns descriptions."""
    keep = {id(p) for p in spare}
    with _LIVE_LOCK:
        live = [p for p in _LIVE if id(p) not in keep]
    left = []
    for p in live:
        if p.running():
            left.append(f"{p.name} (pid {p.pid})")
        with contextlib.suppress(Exception):
            p.stop(timeout=2)
    return left


atexit.register(reap_all)


# --------------------------------------------------------------------------- #
# DNS helpers
# --------------------------------------------------------------------------- #


def dns_query(
    host: str,
    port: int,
    name: str,
    rdtype: str | int = "A",
    *,
    tcp: bool = False,
    timeout: float = 2.0,
    rdclass: str | int = "IN",
    **make_query_kw: object,
) -> dns.message.Message:
    """Send one query with dnspython and return the response Message.

    ``make_query_kw`` go to ``dns.message.make_query`` (``want_dnssec``,
    ``use_edns``, ``payload``, ``flags``, ``options``, ...). A UDP response
    with TC=1 is returned as is (no retry over TCP).
    """
    q = dns.message.make_query(name, rdtype, rdclass, **make_query_kw)  # type: ignore[arg-type]
    if tcp:
        return dns.query.tcp(q, host, timeout=timeout, port=port)
    return dns.query.udp(q, host, timeout=timeout, port=port)


def _probe_any(host: str, port: int, timeout: float) -> bool:
    """Any DNS response to version.bind CH TXT counts."""
    try:
        dns_query(host, port, "version.bind.", "TXT", rdclass="CH", timeout=timeout)
        return True
    except (dns.exception.Timeout, OSError, dns.exception.DNSException):
        return False


def _probe_zones(host: str, port: int, zones: Iterable[str], timeout: float) -> bool:
    """Each zone's SOA must be served (NOERROR with an answer) and TCP must accept."""
    try:
        for zone in zones:
            r = dns_query(host, port, zone, "SOA", timeout=timeout)
            if r.rcode() != dns.rcode.NOERROR or not r.answer:
                return False
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect((host, port))
        return True
    except (OSError, dns.exception.DNSException):
        return False


def _fqdn(name: str) -> str:
    name = name.strip()
    return name if name.endswith(".") else name + "."


def _safe_filename(zone: str) -> str:
    base = _fqdn(zone).rstrip(".") or "root"
    return re.sub(r"[^A-Za-z0-9._-]", "_", base) + ".zone"


# --------------------------------------------------------------------------- #
# Daemon base class
# --------------------------------------------------------------------------- #


class DaemonStartError(RuntimeError):
    """A daemon did not come up (its output is included in the message)."""


_ADDR_IN_USE = re.compile(r"address already in use|addr(ess)? in use|EADDRINUSE", re.I)


class _Daemon:
    """Common start/wait/stop logic.  Subclasses implement ``_prepare`` and ``_ready``."""

    kind = "daemon"
    binary = ""

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        ready_timeout: float = 10.0,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.port: int = port or 0
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.workdir: Path | None = None
        self.proc: ManagedProcess | None = None
        self._final_logs: str | None = None
        self._extra_hosts: tuple[str, ...] = ()

    # -- overridables ------------------------------------------------------- #
    def _prepare(self, workdir: Path) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _ready(self, timeout: float) -> bool:
        return _probe_any(self.host, self.port, timeout)

    # -- public ------------------------------------------------------------- #
    @property
    def addr(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.kind} not started")
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.running()

    def start(self) -> _Daemon:
        if self.proc is not None:
            raise RuntimeError(f"{self.kind} already started")
        binary = find_binary(self.binary)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"moat-{self.kind}-"))
        attempts = 1 if self._requested_port else PORT_RETRIES
        last_error = ""
        for attempt in range(attempts):
            if not self._requested_port:
                self.port = free_port_on(self.host, *self._extra_hosts)
            argv = self._prepare(self.workdir)
            argv[0] = binary
            log = self.workdir / f"{self.kind}.out"
            log.write_bytes(b"")
            self.proc = ManagedProcess(argv, log_path=log, cwd=self.workdir, name=self.kind)
            self.proc.start()
            ok, why = self._wait_ready()
            if ok:
                return self
            out = self.proc.output()
            self.proc.stop(timeout=3)
            self.proc = None
            last_error = (
                f"{self.kind} did not become ready on {self.addr} within "
                f"{self.ready_timeout:.0f}s ({why}).\ncommand: {' '.join(argv)}\n"
                f"--- {self.kind} output ---\n{out}"
            )
            if not (_ADDR_IN_USE.search(out) and attempt + 1 < attempts):
                break
        self._cleanup_dir()
        raise DaemonStartError(last_error)

    def _wait_ready(self) -> tuple[bool, str]:
        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                return False, f"exited with code {rc}"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False, "timed out"
            if self._ready(min(PROBE_TIMEOUT, max(remaining, 0.05))):
                return True, ""
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))

    def stop(self) -> int | None:
        """Stop the daemon (SIGTERM, SIGKILL after ``stop_timeout``). Idempotent."""
        rc = None
        if self.proc is not None:
            rc = self.proc.stop(timeout=self.stop_timeout)
            self._final_logs = self._read_logs()
        self._cleanup_dir()
        return rc

    def logs(self) -> str:
        """Everything the daemon printed (also available after stop())."""
        if self._final_logs is not None and not self.running():
            return self._final_logs
        return self._read_logs()

    def query(
        self,
        name: str,
        rdtype: str | int = "A",
        *,
        tcp: bool = False,
        timeout: float = 2.0,
        **kw: object,
    ) -> dns.message.Message:
        return dns_query(self.host, self.port, name, rdtype, tcp=tcp, timeout=timeout, **kw)

    def __enter__(self):  # noqa: ANN204 - returns the subclass
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"<{type(self).__name__} {self.addr} {state}>"

    # -- internals ----------------------------------------------------------- #
    def _read_logs(self) -> str:
        return self.proc.output() if self.proc is not None else (self._final_logs or "")

    def _cleanup_dir(self) -> None:
        if self.workdir is not None and not _KEEP_DIRS:
            shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------- #
# NSD (authoritative)
# --------------------------------------------------------------------------- #


class NsdServer(_Daemon):
    """NSD 4 serving ``zones`` (zone name -> zone file text) on 127.0.0.1 (and ::1)."""

    kind = "nsd"
    binary = "nsd"

    def __init__(
        self,
        zones: dict[str, str],
        port: int | None = None,
        ipv6: bool = False,
        *,
        ready_timeout: float = 10.0,
        extra_conf: str = "",
    ) -> None:
        super().__init__(port, ready_timeout=ready_timeout)
        self.zones = {_fqdn(k): v for k, v in zones.items()}
        self.ipv6 = ipv6
        self.extra_conf = extra_conf
        if ipv6:
            self._extra_hosts = ("::1",)

    @property
    def addr6(self) -> str:
        return f"[::1]:{self.port}"

    def _prepare(self, workdir: Path) -> list[str]:
        zone_conf = []
        for zone, text in self.zones.items():
            fname = _safe_filename(zone)
            (workdir / fname).write_text(text)
            zone_conf.append(f'zone:\n  name: "{zone}"\n  zonefile: "{workdir / fname}"\n')
        addrs = [f"  ip-address: 127.0.0.1@{self.port}"]
        if self.ipv6:
            addrs.append(f"  ip-address: ::1@{self.port}")
        conf = "\n".join(
            [
                "server:",
                *addrs,
                f"  port: {self.port}",
                f"  do-ip6: {'yes' if self.ipv6 else 'no'}",
                '  username: ""',
                '  chroot: ""',
                f'  zonesdir: "{workdir}"',
                f'  pidfile: "{workdir}/nsd.pid"',
                '  database: ""',
                f'  xfrdfile: "{workdir}/xfrd.state"',
                f'  zonelistfile: "{workdir}/zone.list"',
                f'  xfrdir: "{workdir}"',
                "  server-count: 1",
                "  verbosity: 1",
                "  hide-version: no",
                # nsd rate-limits responses by default (and silently drops):
                "  rrl-ratelimit: 0",
                "  rrl-whitelist-ratelimit: 0",
                "  zonefiles-write: 0",
                self.extra_conf,
                "remote-control:",
                "  control-enable: no",
                "",
                *zone_conf,
            ]
        )
        (workdir / "nsd.conf").write_text(conf)
        # -d: stay in the foreground; log to stderr (no logfile configured).
        return [self.binary, "-d", "-c", str(workdir / "nsd.conf")]

    def _ready(self, timeout: float) -> bool:
        if not _probe_zones(self.host, self.port, self.zones, timeout):
            return False
        return not self.ipv6 or _probe_zones("::1", self.port, self.zones, timeout)


# --------------------------------------------------------------------------- #
# Knot (authoritative primary with journal, IXFR and NOTIFY)
# --------------------------------------------------------------------------- #


class KnotServer(_Daemon):
    """Knot DNS 3 primary for ``zones``; AXFR/IXFR + NOTIFY to ``notify_to``.

    Zones are loaded with ``zonefile-load: difference`` and the journal keeps
    the changes, so ``update_zone()`` with a bumped serial yields an IXFR
    from the old serial and a NOTIFY to every ``notify_to`` target.

    ``tsig`` is ``(key_name, algorithm, base64_secret)``, e.g.
    ``("xfr-key", "hmac-sha256", "c2VjcmV0...")``; when given, transfers must
    be TSIG-signed with it and NOTIFY messages are signed with it too.
    """

    kind = "knot"
    binary = "knotd"

    def __init__(
        self,
        zones: dict[str, str],
        port: int | None = None,
        notify_to: Iterable[tuple[str, int]] = (),
        allow_transfer: bool = True,
        tsig: tuple[str, str, str] | None = None,
        *,
        ready_timeout: float = 10.0,
    ) -> None:
        super().__init__(port, ready_timeout=ready_timeout)
        self.zones = {_fqdn(k): v for k, v in zones.items()}
        self.notify_to = [(h, int(p)) for h, p in notify_to]
        self.allow_transfer = allow_transfer
        self.tsig = tsig

    @property
    def control_socket(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "knot.sock"

    def zone_path(self, name: str) -> Path:
        assert self.workdir is not None
        return self.workdir / _safe_filename(name)

    def _prepare(self, workdir: Path) -> list[str]:
        (workdir / "db").mkdir(exist_ok=True)
        for zone, text in self.zones.items():
            self.zone_path(zone).write_text(text)
        lines = [
            "server:",
            f'  rundir: "{workdir}"',
            f'  pidfile: "{workdir}/knot.pid"',
            f"  listen: 127.0.0.1@{self.port}",
            "  udp-workers: 1",
            "  tcp-workers: 1",
            "  background-workers: 1",
            "  identity: moat-test-knot",
            "  version: knot-test",
            "log:",
            "  - target: stderr",
            "    any: info",
            "database:",
            f'  storage: "{workdir}/db"',
            "control:",
            f'  listen: "{workdir}/knot.sock"',
        ]
        key_ref = ""
        if self.tsig:
            kname, alg, secret = self.tsig
            key_id = _fqdn(kname).rstrip(".")
            alg = alg.lower().rstrip(".")
            lines += ["key:", f"  - id: {key_id}", f"    algorithm: {alg}", f"    secret: {secret}"]
            key_ref = key_id
        remotes = []
        if self.notify_to:
            lines.append("remote:")
            for i, (h, p) in enumerate(self.notify_to):
                rid = f"notify{i}"
                remotes.append(rid)
                lines += [f"  - id: {rid}", f"    address: {h}@{p}"]
                if key_ref:
                    lines.append(f"    key: {key_ref}")
        acls = []
        if self.allow_transfer:
            lines += [
                "acl:",
                "  - id: transfer",
                "    address: [ 127.0.0.0/8, ::1 ]",
                "    action: transfer",
            ]
            if key_ref:
                lines.append(f"    key: {key_ref}")
            acls.append("transfer")
        lines += [
            "template:",
            "  - id: default",
            f'    storage: "{workdir}"',
            # Compute the difference to the previous contents on reload and
            # keep it in the journal: that is what makes IXFR work.
            "    zonefile-load: difference",
            "    journal-content: changes",
            # Never write the zone file back (the test owns it).
            "    zonefile-sync: -1",
            "    provide-ixfr: on",
            "zone:",
        ]
        for zone in self.zones:
            lines += [f"  - domain: {zone}", f'    file: "{self.zone_path(zone)}"']
            if remotes:
                lines.append(f"    notify: [ {', '.join(remotes)} ]")
            if acls:
                lines.append(f"    acl: [ {', '.join(acls)} ]")
        (workdir / "knot.conf").write_text("\n".join(lines) + "\n")
        return [self.binary, "-c", str(workdir / "knot.conf")]

    def _ready(self, timeout: float) -> bool:
        # Knot answers SERVFAIL until a zone is loaded: wait for every SOA.
        return _probe_zones(self.host, self.port, self.zones, timeout) and (
            self.control_socket.exists()
        )

    def knotc(self, *args: str, timeout: float = 15.0, check: bool = True) -> str:
        """Run ``knotc`` against this server's control socket; returns its output."""
        knotc = find_binary("knotc")
        cmd = [knotc, "-s", str(self.control_socket), "-t", str(int(timeout)), *args]
        try:
            res = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout + 5, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{' '.join(cmd)} timed out\n{self.logs()}") from e
        out = res.stdout + res.stderr
        if check and res.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({res.returncode}): {out}\n--- knot ---\n{self.logs()}"
            )
        return out

    def serial(self, name: str) -> int:
        """The SOA serial knot currently serves for zone ``name``."""
        r = self.query(_fqdn(name), "SOA")
        for rrset in r.answer:
            if rrset.rdtype == dns.rdatatype.SOA:
                return int(rrset[0].serial)
        raise RuntimeError(f"no SOA for {name} from knot: {r}")

    def update_zone(self, name: str, new_text: str, timeout: float = 10.0) -> int:
        """Replace zone ``name``'s file with ``new_text`` and make knot reload it.

        The new text must carry a higher SOA serial; knot then stores the
        difference in its journal (IXFR from the old serial works) and sends
        NOTIFY to the configured targets. Returns the new serial, raising if
        knot does not serve a new serial within ``timeout`` seconds.
        """
        zone = _fqdn(name)
        if zone not in self.zones:
            raise KeyError(f"knot does not serve {zone}")
        old = self.serial(zone)
        path = self.zone_path(zone)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(new_text)
        os.replace(tmp, path)
        # Make sure the mtime moves even within the same second.
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, max(st.st_mtime_ns, time.time_ns()) + 1_000_000_000))
        self.zones[zone] = new_text
        self.knotc("-b", "zone-reload", zone, timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cur = self.serial(zone)
            if cur != old:
                return cur
            time.sleep(0.05)
        raise RuntimeError(
            f"knot still serves serial {old} for {zone} after reload (serial not bumped?)\n"
            f"--- knot ---\n{self.logs()}"
        )

    def notify(self, name: str) -> None:
        """Ask knot to send NOTIFY for ``name`` to the configured targets now."""
        self.knotc("-b", "zone-notify", _fqdn(name), check=False)


# --------------------------------------------------------------------------- #
# Unbound (recursive / forwarder)
# --------------------------------------------------------------------------- #


class UnboundServer(_Daemon):
    """Unbound 1.17 on 127.0.0.1, forwarding everything to ``forward_to``.

    Without ``forward_to`` it recurses from the root hints (no use here: no
    internet), so pass ``extra_conf`` with stub-zones in that case.
    ``extra_conf`` is inserted at the end of the ``server:`` clause and may
    open further clauses (``stub-zone:`` ...).
    """

    kind = "unbound"
    binary = "unbound"

    def __init__(
        self,
        forward_to: tuple[str, int] | None = None,
        extra_conf: str = "",
        port: int | None = None,
        *,
        ready_timeout: float = 10.0,
        threads: int = 1,
    ) -> None:
        super().__init__(port, ready_timeout=ready_timeout)
        self.forward_to = forward_to
        self.extra_conf = extra_conf
        self.threads = threads

    def _prepare(self, workdir: Path) -> list[str]:
        lines = [
            "server:",
            f"  interface: 127.0.0.1@{self.port}",
            f"  port: {self.port}",
            "  do-daemonize: no",
            '  username: ""',
            '  chroot: ""',
            f'  directory: "{workdir}"',
            f'  pidfile: "{workdir}/unbound.pid"',
            '  logfile: ""',
            "  use-syslog: no",
            "  log-time-ascii: yes",
            "  verbosity: 1",
            f"  num-threads: {self.threads}",
            "  do-ip6: no",
            "  access-control: 127.0.0.0/8 allow",
            "  access-control: ::1/128 allow",
            # Upstreams live on loopback:
            "  do-not-query-localhost: no",
            # Plain authoritative upstreams, no DNSSEC: no validator.
            '  module-config: "iterator"',
            # .test and private reverse zones are blocked by default.
            '  local-zone: "test." nodefault',
            '  domain-insecure: "test."',
            "  unblock-lan-zones: yes",
            "  insecure-lan-zones: yes",
            "  hide-version: no",
            self.extra_conf,
            "remote-control:",
            "  control-enable: no",
        ]
        if self.forward_to:
            h, p = self.forward_to
            lines += ["forward-zone:", '  name: "."', f"  forward-addr: {h}@{p}"]
        (workdir / "unbound.conf").write_text("\n".join(lines) + "\n")
        return [self.binary, "-d", "-c", str(workdir / "unbound.conf")]


# --------------------------------------------------------------------------- #
# dnsmasq (forwarder)
# --------------------------------------------------------------------------- #


class DnsmasqServer(_Daemon):
    """dnsmasq 2.90 on 127.0.0.1 forwarding to ``upstream`` (host, port)."""

    kind = "dnsmasq"
    binary = "dnsmasq"

    def __init__(
        self,
        upstream: tuple[str, int],
        extra_args: Iterable[str] = (),
        port: int | None = None,
        *,
        ready_timeout: float = 10.0,
    ) -> None:
        super().__init__(port, ready_timeout=ready_timeout)
        self.upstream = upstream
        self.extra_args = list(extra_args)

    def _prepare(self, workdir: Path) -> list[str]:
        h, p = self.upstream
        return [
            self.binary,
            "--keep-in-foreground",
            "--conf-file=/dev/null",  # ignore /etc/dnsmasq.conf and conf-dir
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            f"--port={self.port}",
            f"--listen-address={self.host}",
            "--bind-interfaces",
            f"--server={h}#{p}",
            f"--pid-file={workdir}/dnsmasq.pid",
            "--log-facility=-",  # log to stderr
            # As root dnsmasq drops to "nobody" by default; stay as we are.
            "--user=root",
            *self.extra_args,
        ]


# --------------------------------------------------------------------------- #
# Zones
# --------------------------------------------------------------------------- #

EXAMPLE_ORIGIN = "example.test."


def _txt_block(owner: str, count: int, width: int) -> str:
    lines = []
    for i in range(count):
        payload = (f"{owner}-{i:03d}-" + "x" * width)[:width]
        lines.append(f'{owner:<10} 300 IN TXT "{payload}"')
    return "\n".join(lines)


# Sizes (with nsd, 1232-byte EDNS buffer): "big" TXT answer is about 800
# bytes (> 512, fits 1232); "huge" is about 5.8 kB (> 4096: never fits UDP).
EXAMPLE_ZONE = f"""\
$ORIGIN example.test.
$TTL 300
@          300 IN SOA ns1.example.test. hostmaster.example.test. (
                   1       ; serial
                   3600    ; refresh
                   600     ; retry
                   86400   ; expire
                   60 )    ; minimum (negative-caching TTL)
@          300 IN NS  ns1.example.test.
@          300 IN A   192.0.2.1
ns1        300 IN A   127.0.0.1
www        300 IN A   192.0.2.10
www        300 IN AAAA 2001:db8::10
alias      300 IN CNAME www
chain      300 IN CNAME alias
mx         300 IN MX  10 mail.example.test.
mail       300 IN A   192.0.2.25
short      2   IN A   192.0.2.20
v4only     300 IN A   192.0.2.30
txtonly    300 IN TXT "only a TXT record here"
leaf.ent   300 IN A   192.0.2.40
*.wild     300 IN A   192.0.2.50
{_txt_block("big", 11, 60)}
{_txt_block("huge", 80, 60)}
"""
"""Standard test zone for ``example.test.``:

===================  ==============================================================
name                 content
===================  ==============================================================
apex                 SOA (minimum 60), NS ns1, A 192.0.2.1
ns1                  A 127.0.0.1
www                  A 192.0.2.10, AAAA 2001:db8::10
alias                CNAME www;  chain CNAME alias
mx                   MX 10 mail.example.test. (mail A 192.0.2.25)
short                A 192.0.2.20 with TTL 2
v4only               A only (AAAA -> NODATA);  txtonly TXT only (A -> NODATA)
ent                  empty non-terminal (leaf.ent A 192.0.2.40) -> NODATA
x.wild               wildcard *.wild A 192.0.2.50
big                  11 TXT: answer ~800 B (> 512, <= 1232)
huge                 80 TXT: answer ~5.8 kB (> 1232 and > 4096: TC over UDP)
anything else        NXDOMAIN with SOA (negative TTL 60)
===================  ==============================================================
"""

EXAMPLE_RECORDS = {
    "www.example.test.": {"A": "192.0.2.10", "AAAA": "2001:db8::10"},
    "example.test.": {"A": "192.0.2.1"},
    "short.example.test.": {"A": "192.0.2.20"},
    "mail.example.test.": {"A": "192.0.2.25"},
    "v4only.example.test.": {"A": "192.0.2.30"},
    "leaf.ent.example.test.": {"A": "192.0.2.40"},
}

_BENCH_NET = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544 benchmarking range


def make_zone(
    origin: str,
    names: Iterable[str],
    *,
    ttl: int = 300,
    addresses: str | Callable[[int, str], str] | None = None,
    serial: int = 1,
    soa_minimum: int = 60,
    extra: str = "",
) -> str:
    """Zone-file text for ``origin`` with one A record per name in ``names``.

    ``names`` are relative to ``origin`` unless they end with a dot.
    ``addresses``: None -> consecutive addresses in 198.18.0.0/15 (wrapping
    after 131070 names); a string -> that address for every name; a callable
    ``(index, name) -> address``. ``extra`` is appended verbatim. Built with
    one join, so 100k names take well under a second.
    """
    origin = _fqdn(origin)
    head = (
        f"$ORIGIN {origin}\n$TTL {ttl}\n"
        f"@ {ttl} IN SOA ns1.{origin} hostmaster.{origin} {serial} 3600 600 86400 {soa_minimum}\n"
        f"@ {ttl} IN NS ns1.{origin}\n"
        f"ns1 {ttl} IN A 127.0.0.1\n"
    )
    base = int(_BENCH_NET.network_address) + 1
    span = _BENCH_NET.num_addresses - 2
    parts = [head]
    for i, name in enumerate(names):
        if addresses is None:
            addr = str(ipaddress.IPv4Address(base + (i % span)))
        elif isinstance(addresses, str):
            addr = addresses
        else:
            addr = addresses(i, name)
        parts.append(f"{name} {ttl} IN A {addr}\n")
    if extra:
        parts.append(extra if extra.endswith("\n") else extra + "\n")
    return "".join(parts)


def bump_serial(zone_text: str, new_serial: int) -> str:
    """Replace the SOA serial in zone text produced by ``make_zone`` (one-line SOA)."""
    out, n = re.subn(
        r"^(\S+\s+(?:\d+\s+)?(?:IN\s+)?SOA\s+\S+\s+\S+\s+)\d+",
        lambda m: f"{m.group(1)}{new_serial}",
        zone_text,
        count=1,
        flags=re.M,
    )
    if n != 1:
        raise ValueError("no one-line SOA record found")
    return out
