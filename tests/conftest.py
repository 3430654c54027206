"""Shared fixtures for moat's tests (see tests/harness for the machinery).

Fixtures
    nsd_upstream   session  NsdServer serving harness.EXAMPLE_ZONE (example.test.)
    fake_upstream  function FakeUpstream("answer"); set .behaviour to inject faults
    moat           function factory: moat(*args, upstream=..., listen=None, env=None,
                            ready_timeout=10) -> started MoatProcess, stopped at teardown
    require_binary function the helper harness.require_binary(name) -> path
    shared_data    session  Path to shared/data (skip, or fail when CI=true, if absent)

Rule for missing software: a test fails when CI == "true", otherwise it skips
with the reason (harness.missing / harness.require_binary).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(_TESTS_DIR))

from harness import (  # noqa: E402
    EXAMPLE_ZONE,
    FakeUpstream,
    MoatProcess,
    NsdServer,
    format_hostport,
    missing,
    reap_all,
    resolver_available,
)
from harness import require_binary as _require_binary  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _upstream_args(upstream: Any) -> list[str]:
    """--upstream arguments for: a server/FakeUpstream (has .addr), "HOST:PORT",
    a (host, port) tuple, or a list of these."""
    if upstream is None:
        return []
    if isinstance(upstream, tuple) and len(upstream) == 2 and isinstance(upstream[1], int):
        return ["--upstream", format_hostport(upstream[0], upstream[1])]
    if isinstance(upstream, str):
        return ["--upstream", upstream]
    if hasattr(upstream, "addr"):
        return ["--upstream", upstream.addr]
    if isinstance(upstream, Sequence):
        out: list[str] = []
        for u in upstream:
            out += _upstream_args(u)
        return out
    raise TypeError(f"cannot turn {upstream!r} into --upstream")


@pytest.fixture(scope="session", autouse=True)
def _reap_harness_processes() -> Iterator[None]:
    """At the end of the session kill anything the harness started and a test left."""
    yield
    left = reap_all()
    if left:
        print(f"\n[harness] killed processes left running: {', '.join(left)}", file=sys.stderr)


@pytest.fixture(name="require_binary")
def require_binary_fixture() -> Callable[[str], str]:
    """``require_binary("kdig")`` -> path; skip (fail when CI=true) if missing."""
    return _require_binary


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to shared/data beside the repo; skip (fail when CI=true) if absent."""
    if not SHARED_DATA.is_dir():
        missing(f"shared data directory {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def nsd_upstream() -> Iterator[NsdServer]:
    """A real NSD serving EXAMPLE_ZONE (example.test.) on 127.0.0.1, for the whole session."""
    _require_binary("nsd")
    with NsdServer({"example.test.": EXAMPLE_ZONE}) as server:
        yield server


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    """A FakeUpstream answering A 192.0.2.1; change ``.behaviour`` to inject faults."""
    with FakeUpstream("answer") as fake:
        yield fake


@pytest.fixture
def moat(request: pytest.FixtureRequest) -> Iterator[Callable[..., MoatProcess]]:
    """Factory: ``moat(*args, upstream=nsd_upstream)`` starts ``python -m resolver serve``.

    ``upstream``: server object (``.addr``), "HOST:PORT", (host, port) or a list
    of these -> ``--upstream``. ``listen=None`` picks a free 127.0.0.1 port.
    Every process is stopped at teardown; one that needed SIGKILL fails the test.
    moat's stderr is attached to the test report.
    """
    started: list[MoatProcess] = []

    def start(
        *args: str,
        upstream: Any = None,
        listen: str | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 10.0,
    ) -> MoatProcess:
        if not resolver_available():
            missing("`python -m resolver` is not runnable yet (no resolver/__main__.py)")
        proc = MoatProcess(
            [*_upstream_args(upstream), *args],
            env=env,
            ready_timeout=ready_timeout,
            listen=listen,
            start=False,
        )
        started.append(proc)
        proc.start()
        return proc

    yield start

    errors = []
    for i, proc in enumerate(started):
        try:
            proc.stop()
        except AssertionError as e:
            errors.append(str(e))
        text = proc.stderr_text()
        if text:
            request.node.add_report_section("teardown", f"moat[{i}] stderr", text)
    if errors:
        pytest.fail("\n\n".join(errors), pytrace=False)
