"""moat on arm64 (Raspberry Pi OS 64-bit = Debian bookworm arm64), emulated by qemu-user.

platform.sh arm64-venv makes a Debian bookworm arm64 rootfs (debootstrap --foreign, the
second stage under qemu in a private binfmt_misc: tests/platform/userns_binfmt.py; cached)
and installs moat there as a Pi user would: a venv, `pip install '.[fast]'` of the checkout,
every dependency an aarch64 wheel from PyPI (nothing compiles). Then `moat serve` runs under
emulation on a loopback port (the rootfs shares the host's network) with the test harness's
nsd as upstream; the self-test names and a forwarded name are asked over UDP and TCP;
start-up time and memory are measured, beside the same numbers for native x86_64.

qemu-user is not a Pi: it runs about 7-10x slower than native here, and the memory figures
include qemu's own (its translated-code cache): read them as an upper bound for a Pi.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from harness import ManagedProcess, free_port_on, missing
from platformlib import (
    PLATFORM_SH,
    dig,
    measure,
    need_root,
    platform_sh,
    proc_status,
    run,
    tools,
    wait_for,
)

pytestmark = [pytest.mark.platform, pytest.mark.slow]

QEMU = Path("/usr/libexec/qemu-binfmt/aarch64-binfmt-P")


@pytest.fixture(scope="module")
def rootfs() -> None:
    need_root()
    tools("debootstrap", "qemu-aarch64-static", "dig")
    if not QEMU.exists():
        missing(f"{QEMU} missing (Debian package qemu-user-static)")
    seconds = platform_sh("arm64-venv", timeout=2400)
    measure("arm64 rootfs + venv (fresh ~7-9 min; cached ~1 s)", f"{seconds:.0f} s")


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def moat_pid(wrapper: int) -> int:
    """The emulated moat process (the oldest descendant whose command line runs moat serve)."""
    found = []
    for p in descendants(wrapper):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ")
        except OSError:
            continue
        if b"bin/moat serve" in cmd and b"chroot" not in cmd and b"sh -c" not in cmd:
            found.append(p)
    assert found, "no moat process under the arm64 wrapper"
    return min(found)


def serve_checks(port: int) -> None:
    for tcp in (False, True):
        assert dig("127.0.0.1", port, "c2.moat.test", tcp=tcp) == ("NOERROR", ["0.0.0.0"])
        assert dig("127.0.0.1", port, "www.example.test", tcp=tcp) == \
            ("NOERROR", ["192.0.2.10"])
    assert dig("127.0.0.1", port, "malware.moat.test") == ("NOERROR", ["0.0.0.0"])
    assert dig("127.0.0.1", port, "phishing.moat.test", "AAAA") == ("NOERROR", ["::"])


def rate(port: int, n: int = 300) -> float:
    """Sequential UDP queries per second (a cached forwarded name)."""
    import dns.message
    import dns.query

    q = dns.message.make_query("www.example.test", "A")
    t0 = time.perf_counter()
    for _ in range(n):
        dns.query.udp(q, "127.0.0.1", port=port, timeout=2)
    return n / (time.perf_counter() - t0)


def test_moat_on_arm64(rootfs: None, nsd_upstream: Any, tmp_path: Path) -> None:
    out = run(["bash", str(PLATFORM_SH), "arm64-run", "/opt/moat/venv/bin/python", "-c",
               "import platform, ahocorasick, numpy, uvloop, dnslib, resolver, resolver.app; "
               "print(platform.machine(), numpy.__version__, resolver.__version__)"],
              timeout=300).stdout.split()
    assert out[0] == "aarch64", out
    measure("arm64: machine, numpy, moat", " ".join(out))

    port = free_port_on("127.0.0.1")
    proc = ManagedProcess(
        ["bash", str(PLATFORM_SH), "arm64-run", "/opt/moat/venv/bin/moat", "serve",
         "--listen", f"127.0.0.1:{port}", "--upstream", nsd_upstream.addr,
         "--state-dir", "/var/lib/moat", "--log-level", "info"],
        log_path=tmp_path / "moat-arm64.log",
        # the wrapper replaces bash: SIGTERM reaches it, it passes it on to moat
        env=dict(os.environ, IN_ROOTFS_EXEC="1"), name="moat-arm64")
    t0 = time.monotonic()
    proc.start()
    try:
        wait_for("moat under qemu answers", lambda: proc.poll() is None and dig(
            "127.0.0.1", port, "c2.moat.test")[0] == "NOERROR", timeout=180, interval=0.5)
        startup = time.monotonic() - t0
        serve_checks(port)
        st = proc_status(moat_pid(proc.pid))
        measure("arm64 (qemu): start -> first answer", f"{startup:.1f} s")
        measure("arm64 (qemu): VmRSS / VmHWM", f"{st['VmRSS']} / {st['VmHWM']}")
        measure("arm64 (qemu): sequential queries", f"{rate(port):.0f} q/s")
        log = proc.output()
        assert "policy version 1 loaded" in log and "listening on" in log, log
    finally:
        t1 = time.monotonic()
        code = proc.stop(timeout=30)
        measure("arm64 (qemu): SIGTERM -> exit", f"{time.monotonic() - t1:.1f} s")
    assert not proc.killed and code == 0, f"exit {code}\n{proc.output()[-3000:]}"


def test_native_numbers_for_comparison(moat: Any, nsd_upstream: Any) -> None:
    t0 = time.monotonic()
    proc = moat(upstream=nsd_upstream)
    measure("x86_64 (native): start -> first answer", f"{time.monotonic() - t0:.1f} s")
    serve_checks(proc.port)
    st = proc_status(proc.pid)
    measure("x86_64 (native): VmRSS / VmHWM", f"{st['VmRSS']} / {st['VmHWM']}")
    measure("x86_64 (native): sequential queries", f"{rate(proc.port):.0f} q/s")
    assert proc.running()
