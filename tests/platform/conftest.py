"""Platform tests: the Dockerfile, the systemd unit, arm64, the fleet, deploy/ manifests.

Every test here is marked ``platform``; the ones that build images or boot systemd are also
``slow``. They run as root (CI does), use only loopback and network namespaces they create,
and print what they measured at the end of the run (also kept in
$MOAT_PLATFORM_WORK/measurements.json).
"""

from __future__ import annotations

from typing import Any

from platformlib import MEASUREMENTS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not MEASUREMENTS:
        return
    terminalreporter.section("platform measurements")
    for key, value in MEASUREMENTS.items():
        terminalreporter.write_line(f"{key}: {value}")
