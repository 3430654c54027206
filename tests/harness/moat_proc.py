"""Run moat (``python -m resolver serve ...``) as a real subprocess for tests."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import dns.message

from .ports import free_port_on
from .servers import ManagedProcess, dns_query, find_binary

__all__ = ["REPO_ROOT", "MoatProcess", "MoatStartError", "format_hostport", "parse_hostport"]

REPO_ROOT = Path(__file__).resolve().parents[2]

_ADDR_IN_USE = re.compile(r"address already in use|EADDRINUSE|\[Errno 98\]", re.I)


class MoatStartError(RuntimeError):
    """moat exited early or did not answer DNS within the ready timeout."""


def parse_hostport(value: str, default_port: int = 53) -> tuple[str, int]:
    """``"127.0.0.1:5353"`` / ``"[::1]:5353"`` / ``"127.0.0.1"`` -> (host, port)."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if value.count(":") == 1:
        host, port = value.split(":")
        return host, int(port)
    return value, default_port  # bare IPv4 or bare IPv6 address


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen_values(args: Sequence[str]) -> list[str]:
    out = []
    it = iter(range(len(args)))
    for i in it:
        a = args[i]
        if a == "--listen" and i + 1 < len(args):
            out.append(args[i + 1])
            next(it, None)
        elif a.startswith("--listen="):
            out.append(a.split("=", 1)[1])
    return out


class MoatProcess:
    """moat started as ``[sys.executable, "-m", "resolver", "serve", *args]``.

    * ``listen=None`` and no ``--listen`` in ``args``: a free port is picked and
      ``--listen 127.0.0.1:PORT`` added. ``listen="HOST:PORT"`` adds that.
    * ``env`` entries are laid over ``os.environ``; PYTHONPATH gets the repo
      root first and PYTHONUNBUFFERED=1 is set; cwd is the repo root.
    * Startup waits (``ready_timeout`` s) until moat answers a UDP query on its
      first listen address; any response counts (``probe`` = (name, type,
      class), default ``version.bind. TXT CH``).
    * stdout/stderr go to files: ``stderr_text()``, ``stdout_text()``.
    * ``stop()`` sends SIGTERM and returns the exit code; if moat is still
      alive after ``timeout`` it is SIGKILLed and ``stop`` raises AssertionError.
    * ``command`` replaces ``[sys.executable, "-m", "resolver", "serve"]``
      (used by the harness self-tests with a stand-in server).
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        ready_timeout: float = 10.0,
        listen: str | None = None,
        *,
        start: bool = True,
        command: Sequence[str] | None = None,
        probe: tuple[str, str, str] = ("version.bind.", "TXT", "CH"),
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.base_args = [str(a) for a in args]
        self.extra_env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.listen_arg = listen
        self.command = list(command) if command else [sys.executable, "-m", "resolver", "serve"]
        self.probe = probe
        self.cwd = Path(cwd) if cwd else REPO_ROOT
        self.workdir = Path(tempfile.mkdtemp(prefix="moat-proc-"))
        self.state_dir = self.workdir / "state"
        self.proc: ManagedProcess | None = None
        self.args: list[str] = []
        self.listen: list[tuple[str, int]] = []
        self.returncode: int | None = None
        self._final_stderr: str | None = None
        self._final_stdout: str | None = None
        if start:
            self.start()

    # ------------------------------------------------------------------ #
    @property
    def host(self) -> str:
        return self.listen[0][0]

    @property
    def port(self) -> int:
        return self.listen[0][1]

    @property
    def addr(self) -> str:
        return format_hostport(self.host, self.port)

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("moat not started")
        return self.proc.pid

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "stderr.log"

    @property
    def stdout_path(self) -> Path:
        return self.workdir / "stdout.log"

    def running(self) -> bool:
        return self.proc is not None and self.proc.running()

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        pp = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def start(self) -> MoatProcess:
        if self.proc is not None:
            raise RuntimeError("moat already started")
        given = _listen_values(self.base_args)
        auto = self.listen_arg is None and not given
        attempts = 3 if auto else 1
        last = ""
        for attempt in range(attempts):
            args = list(self.base_args)
            if "--user" not in args and os.geteuid() == 0 and self.command[-1] == "serve":
                args += ["--user", "root"]  # tests run as root: no privilege drop
            if "--state-dir" not in args and self.command[-1] == "serve":
                args += ["--state-dir", str(self.state_dir)]
            if auto:
                port = free_port_on("127.0.0.1")
                args = ["--listen", f"127.0.0.1:{port}", *args]
            elif self.listen_arg is not None:
                args = ["--listen", self.listen_arg, *args]
            self.args = args
            self.listen = [parse_hostport(v) for v in _listen_values(args)]
            for p in (self.stderr_path, self.stdout_path):
                p.write_bytes(b"")
            self.proc = ManagedProcess(
                [*self.command, *args],
                log_path=self.stderr_path,
                stdout_path=self.stdout_path,
                merge_stderr=False,
                cwd=self.cwd,
                env=self._env(),
                name="moat",
            )
            self.proc.start()
            ok, why = self._wait_ready()
            if ok:
                return self
            err = self.stderr_text()
            self.proc.stop(timeout=3)
            self.returncode = self.proc.poll()
            last = (
                f"moat did not become ready on {self.addr} within {self.ready_timeout}s "
                f"({why}).\ncommand: {' '.join(self.proc.argv)}\n--- moat stderr ---\n{err}"
                f"\n--- moat stdout ---\n{self.stdout_text()}"
            )
            if not (auto and _ADDR_IN_USE.search(err) and attempt + 1 < attempts):
                break
            self.proc = None
        self._final_stderr = self._read(self.stderr_path)
        self._final_stdout = self._read(self.stdout_path)
        shutil.rmtree(self.workdir, ignore_errors=True)
        raise MoatStartError(last)

    def _wait_ready(self) -> tuple[bool, str]:
        assert self.proc is not None
        if not self.listen:
            return False, "no --listen address to probe"
        host, port = self.listen[0]
        name, rdtype, rdclass = self.probe
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        sent_ids: set[int] = set()
        deadline = time.monotonic() + self.ready_timeout
        next_send = 0.0
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.settimeout(0.05)
            for _ in range(100_000):  # bounded; the deadline ends it far earlier
                rc = self.proc.poll()
                if rc is not None:
                    return False, f"exited with code {rc}"
                now = time.monotonic()
                if now >= deadline:
                    return False, "timed out"
                if now >= next_send and len(sent_ids) < 1000:
                    q = dns.message.make_query(name, rdtype, rdclass)
                    q.id = secrets.randbelow(65536)
                    sent_ids.add(q.id)
                    try:
                        s.sendto(q.to_wire(), (host, port))
                    except OSError:
                        pass
                    next_send = now + 0.2
                try:
                    data = s.recv(65535)
                except (TimeoutError, ConnectionRefusedError):
                    continue
                except OSError:
                    continue
                if len(data) >= 2 and int.from_bytes(data[:2], "big") in sent_ids:
                    return True, ""
        return False, "timed out"

    # ------------------------------------------------------------------ #
    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr_text(self) -> str:
        """Everything moat wrote to stderr so far (its logs)."""
        if self._final_stderr is not None:
            return self._final_stderr
        return self._read(self.stderr_path)

    def stdout_text(self) -> str:
        if self._final_stdout is not None:
            return self._final_stdout
        return self._read(self.stdout_path)

    def wait_for_stderr(self, pattern: str, timeout: float = 5.0) -> re.Match[str]:
        """Wait (bounded) until ``pattern`` (regex) appears in stderr; return the match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.stderr_text())
            if m:
                return m
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{pattern!r} not in moat stderr after {timeout}s:\n{self.stderr_text()}"
                )
            time.sleep(0.05)

    def query(
        self,
        name: str,
        rdtype: str | int = "A",
        tcp: bool = False,
        *,
        timeout: float = 3.0,
        where: str | None = None,
        port: int | None = None,
        rdclass: str | int = "IN",
        **kw: object,
    ) -> dns.message.Message:
        """One query to moat with dnspython; ``kw`` go to ``dns.message.make_query``
        (``want_dnssec``, ``use_edns``, ``payload``, ``flags``, ``options``...).
        Raises dns.exception.Timeout if moat does not answer within ``timeout``."""
        return dns_query(
            where or self.host,
            port or self.port,
            name,
            rdtype,
            tcp=tcp,
            timeout=timeout,
            rdclass=rdclass,
            **kw,
        )

    def dig(self, *args: str, timeout: float = 15.0, check: bool = False) -> str:
        """Run the real ``dig @HOST -p PORT +time=2 +tries=1 *args``; returns stdout."""
        cmd = [
            find_binary("dig"),
            f"@{self.host}",
            "-p",
            str(self.port),
            "+time=2",
            "+tries=1",
            *args,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {res.returncode}\n{res.stdout}{res.stderr}"
            )
        return res.stdout

    def signal(self, sig: int) -> None:
        """Send ``sig`` (e.g. signal.SIGHUP) to the moat process."""
        if self.proc is None or not self.proc.running():
            raise RuntimeError(f"moat is not running (exit code {self.returncode})")
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait; returns the exit code. Kills (-9) and raises
        AssertionError if moat is still running after ``timeout`` s."""
        if self.proc is None:
            return self.returncode
        if self._final_stderr is not None and not self.proc.running():
            return self.returncode
        rc = self.proc.stop(timeout=timeout)
        self.returncode = rc
        self._final_stderr = self._read(self.stderr_path)
        self._final_stdout = self._read(self.stdout_path)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.proc.killed:
            raise AssertionError(
                f"moat (pid {self.proc.pid}) did not exit within {timeout}s of SIGTERM and "
                f"was killed with SIGKILL\n--- moat stderr ---\n{self._final_stderr}"
            )
        return rc

    def __enter__(self) -> MoatProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running() else f"exited {self.returncode}"
        return f"<MoatProcess {self.addr if self.listen else '?'} {state}>"
