"""Helpers for the platform tests: run the build script, podman, network namespaces, dig.

Rule (as everywhere in moat's tests): software that is missing fails the test when
CI == "true" and skips it otherwise (``harness.missing``). Nothing here installs anything:
``tests/platform/platform.sh`` builds images and the arm64 rootfs (cached under
$MOAT_PLATFORM_WORK, default /var/tmp/moat-platform) from Debian and PyPI packages.

Every container and network namespace gets a name with this process's PID in it, and is
removed by name at the end of the test that made it, also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from harness import REPO_ROOT, find_binary, missing
from harness.servers import MissingBinaryError

HERE = Path(__file__).resolve().parent
PLATFORM_SH = HERE / "platform.sh"
WORK = Path(os.environ.get("MOAT_PLATFORM_WORK", "/var/tmp/moat-platform"))
IMAGE = os.environ.get("MOAT_IMAGE", "localhost/moat:test")
SYSTEMD_IMAGE = "localhost/moat-systemd:test"
MEASUREMENTS: dict[str, object] = {}


def measure(key: str, value: object) -> None:
    """Record a number for the summary printed at the end of the run (and a JSON file)."""
    MEASUREMENTS[key] = value
    print(f"[platform] {key}: {value}", file=sys.stderr)
    with contextlib.suppress(OSError):
        WORK.mkdir(parents=True, exist_ok=True)
        path = WORK / "measurements.json"
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {}
        old[key] = value
        path.write_text(json.dumps(old, indent=1, sort_keys=True))


def need_root() -> None:
    if os.geteuid() != 0:
        missing("the platform tests need root (containers, namespaces, binfmt_misc)")


def tool(name: str) -> str:
    """Path of a program: PATH, sbin, or beside this interpreter (a venv's bin: hadolint and
    shellcheck come from PyPI). Missing: fail in CI, skip elsewhere."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    try:
        return find_binary(name)
    except MissingBinaryError as exc:
        missing(f"{exc}")
        raise  # unreachable


def tools(*names: str) -> None:
    for n in names:
        tool(n)


def run(cmd: Sequence[str], *, timeout: float = 60, check: bool = True,
        env: dict[str, str] | None = None, input: str | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """Run a command (bounded); with ``check`` raise AssertionError showing its output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                             env=full_env, input=input, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n"
                             f"{exc.stdout or ''}{exc.stderr or ''}") from None
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}: {' '.join(cmd)}\n--- stdout ---\n"
                             f"{res.stdout[-4000:]}\n--- stderr ---\n{res.stderr[-4000:]}")
    return res


def platform_sh(*args: str, timeout: float = 1200) -> float:
    """Run tests/platform/platform.sh ARGS (builds, cached); returns its wall time."""
    t0 = time.monotonic()
    run(["bash", str(PLATFORM_SH), *args], timeout=timeout)
    return time.monotonic() - t0


_PODMAN_ENV: dict[str, str] = {}


def podman_env() -> dict[str, str]:
    """CONTAINERS_CONF / CONTAINERS_STORAGE_CONF for our private podman storage."""
    if not _PODMAN_ENV:
        out = run(["bash", str(PLATFORM_SH), "env"], timeout=60).stdout
        for m in re.finditer(r"^export (\w+)=(.*)$", out, re.M):
            _PODMAN_ENV[m.group(1)] = m.group(2)
    return _PODMAN_ENV


def need_container_engine() -> None:
    need_root()
    tools("podman", "runc", "debootstrap", "nsenter", "ip", "dig")


def podman(*args: str, timeout: float = 60, check: bool = True, netns: str | None = None,
           ) -> subprocess.CompletedProcess[str]:
    """podman ARGS with our storage. ``netns``: run it inside that network namespace
    (``nsenter --net``, not ``ip netns exec``, which remounts /sys and upsets runc); a
    container started with ``--network host`` there joins that namespace."""
    prefix = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    return run([*prefix, "podman", *args], timeout=timeout, check=check, env=podman_env())


def unique(tag: str) -> str:
    return f"moatplat-{os.getpid()}-{tag}"


@contextlib.contextmanager
def container(name: str, netns: str | None = None) -> Iterator[str]:
    """Remove container ``name`` (by name, with its anonymous volumes) when the block ends,
    however it ends."""
    podman("rm", "-f", "-v", "-t", "0", name, check=False, netns=netns)
    try:
        yield name
    finally:  # -v: also the anonymous volume of VOLUME /var/lib/moat
        podman("rm", "-f", "-v", "-t", "0", name, check=False, netns=netns, timeout=60)


@contextlib.contextmanager
def network_namespace(tag: str) -> Iterator[str]:
    """A private network namespace with only ``lo`` (up); deleted at the end."""
    name = unique(tag)
    run(["ip", "netns", "del", name], check=False)
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield name
    finally:
        run(["ip", "netns", "del", name], check=False)


def in_netns(netns: str | None, cmd: Sequence[str]) -> list[str]:
    return (["nsenter", f"--net=/run/netns/{netns}"] if netns else []) + list(cmd)


def dig(server: str, port: int, name: str, qtype: str = "A", *, tcp: bool = False,
        netns: str | None = None, timeout: float = 10) -> tuple[str, list[str]]:
    """(status, answers) from the real dig: status NOERROR/NXDOMAIN/... or "timeout"."""
    cmd = [find_binary("dig"), f"@{server}", "-p", str(port), "+time=2", "+tries=1",
           "+noall", "+comments", "+answer", name, qtype]
    if tcp:
        cmd.append("+tcp")
    res = run(in_netns(netns, cmd), timeout=timeout, check=False)
    m = re.search(r"status: (\w+)", res.stdout)
    if not m:
        return "timeout", []
    answers = [line.split()[-1] for line in res.stdout.splitlines()
               if line and not line.startswith(";") and len(line.split()) >= 5]
    return m.group(1), answers


def wait_for(what: str, predicate, timeout: float, interval: float = 0.2):  # type: ignore[no-untyped-def]
    """Poll ``predicate()`` until it returns something truthy (returned) or time runs out."""
    deadline = time.monotonic() + timeout
    last: object = None
    for _ in range(int(timeout / interval) + 2):
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def which_or_none(name: str) -> str | None:
    try:
        return find_binary(name)
    except MissingBinaryError:
        return shutil.which(name)


__all__ = ["HERE", "IMAGE", "MEASUREMENTS", "PLATFORM_SH", "REPO_ROOT", "SYSTEMD_IMAGE",
           "WORK", "container", "dig", "in_netns", "measure", "need_container_engine",
           "need_root", "network_namespace", "platform_sh", "podman", "podman_env",
           "proc_status", "run", "tool", "tools", "unique", "wait_for", "which_or_none"]
