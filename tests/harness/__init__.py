"""Integration-test harness: real DNS daemons, a fault-injecting fake upstream
and moat itself, all on loopback.

Import as ``from harness import ...`` (``tests/`` is put on ``sys.path`` by
``tests/conftest.py``).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

from .fake_upstream import BEHAVIOURS, FakeUpstream, ReceivedQuery
from .moat_proc import REPO_ROOT, MoatProcess, MoatStartError, format_hostport, parse_hostport
from .ports import free_port, free_port_on, is_port_free
from .servers import (
    EXAMPLE_ORIGIN,
    EXAMPLE_RECORDS,
    EXAMPLE_ZONE,
    DaemonStartError,
    DnsmasqServer,
    KnotServer,
    ManagedProcess,
    MissingBinaryError,
    NsdServer,
    UnboundServer,
    bump_serial,
    dns_query,
    find_binary,
    live_processes,
    make_zone,
    pid_alive,
    reap_all,
)

__all__ = [
    "BEHAVIOURS",
    "EXAMPLE_ORIGIN",
    "EXAMPLE_RECORDS",
    "EXAMPLE_ZONE",
    "REPO_ROOT",
    "SHARED_DATA",
    "DaemonStartError",
    "DnsmasqServer",
    "FakeUpstream",
    "KnotServer",
    "ManagedProcess",
    "MissingBinaryError",
    "MoatProcess",
    "MoatStartError",
    "NsdServer",
    "ReceivedQuery",
    "UnboundServer",
    "bump_serial",
    "in_ci",
    "dns_query",
    "find_binary",
    "format_hostport",
    "free_port",
    "free_port_on",
    "is_port_free",
    "make_zone",
    "missing",
    "parse_hostport",
    "pid_alive",
    "live_processes",
    "reap_all",
    "require_binary",
    "resolver_available",
    "shared_data",
]

# /work/shared/data locally; in CI a copy of shared/ sits beside the clone.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def missing(reason: str) -> None:
    """Something a test needs is absent: fail when CI == "true", else skip."""
    import pytest

    if in_ci():
        pytest.fail(f"{reason} (CI=true: missing software is a failure)", pytrace=False)
    pytest.skip(reason)


def require_binary(name: str) -> str:
    """Path of program ``name``; skips the test if missing (fails when CI == "true")."""
    try:
        return find_binary(name)
    except MissingBinaryError as e:
        missing(f"{e}; install the Debian package that provides it")
        raise  # unreachable: missing() raises


def shared_data() -> Path:
    """Path to shared/data; skips the test if absent (fails when CI == "true")."""
    if not SHARED_DATA.is_dir():
        missing(f"shared data directory {SHARED_DATA} is absent")
    return SHARED_DATA


@functools.cache
def resolver_available() -> bool:
    """True once ``python -m resolver`` can be run from the repo root."""
    code = (
        "import importlib.util, sys; "
        "sys.exit(0 if importlib.util.find_spec('resolver.__main__') else 1)"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    try:
        res = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0
