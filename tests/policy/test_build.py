"""Building a policy in a forked child, and the start-up build's second process: the same
rules, problems and verdicts as a build in this process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from policy.build import build_in_child, build_policy
from policy.formats import _common, rpz
from policy.settings import PolicySettings, SourceSettings


def plain_text(count: int, broken: int | None = None) -> str:
    lines = [f"n{i}.example-{i % 7}.test CNAME ." for i in range(count)]
    if broken is not None:
        lines[broken] = "bad..example CNAME ."
    return "\n".join(lines) + "\n"


@pytest.fixture
def small_second_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A second process for runs of a few kB (forked children inherit the settings);
    every fork, in this process or a child, appends the forking pid to the file returned."""
    monkeypatch.setattr(_common, "SECOND_PROCESS_MIN", 1 << 12)
    monkeypatch.setattr(_common, "_PROBE", 1 << 10)
    log = tmp_path / "forks"
    log.write_text("")
    real_fork = os.fork

    def fork() -> int:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return real_fork()

    monkeypatch.setattr(os, "fork", fork)
    return log


def forks(log: Path) -> list[int]:
    return [int(pid) for pid in log.read_text().split()]


def line_at_middle(text: str) -> int:
    """The line where run_end's second half starts."""
    probe = text.rfind("\n", 0, _common._PROBE) + 1
    mid = text.find("\n", (probe + len(text)) // 2) + 1
    return text.count("\n", 0, mid)


@pytest.mark.parametrize("broken", [None, 3, 20, 1500, "middle", "before middle", 2999])
def test_run_end_in_two_processes_is_the_same_end(broken, small_second_process,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "SECOND_PROCESS", True)
    if isinstance(broken, str):
        mid_line = line_at_middle(plain_text(3000))
        broken = mid_line if broken == "middle" else mid_line - 1
    text = plain_text(3000, broken)
    rx = rpz._RUN0[False]
    m = rx.match(text)
    assert _common.run_end(rx, text, 0) == (m.end() if m else 0)
    # forked only when the first 1 kB was a run (not for a run broken at line 3 or 20)
    assert forks(small_second_process) == ([] if broken in (3, 20) else [os.getpid()])


def test_run_end_forks_nothing_unless_allowed(small_second_process: Path) -> None:
    text = plain_text(3000)
    assert _common.run_end(rpz._RUN0[False], text, 0) == len(text)
    assert forks(small_second_process) == []


@pytest.mark.parametrize("broken", [None, 2500])
def test_starting_build_in_child_equals_build_here(tmp_path: Path, broken,
                                                  small_second_process: Path) -> None:
    path = tmp_path / "big.rpz"
    path.write_text("$TTL 60\n@ SOA ns. host. 1 2 3 4 5\n NS ns.\n" + plain_text(3000, broken))
    settings = PolicySettings(selftest=False, sources=(
        SourceSettings(name="big", path=str(path), format="rpz", category="c2"),))
    here, here_report = build_policy(settings, 1, str(tmp_path / "state-a"))
    child, child_report = build_in_child(settings, 1, str(tmp_path / "state-b"), starting=True)
    # this process forked the build child, which forked the second process (once per
    # long run: the list after the broken line is a second run)
    builder, *helpers = forks(small_second_process)
    assert builder == os.getpid() and len(helpers) == 1 + (broken is not None)
    assert builder not in helpers
    assert child_report.rules == here_report.rules == 3000 - (broken is not None)
    assert child_report.sources[0].problems == here_report.sources[0].problems
    if broken is not None:
        assert child_report.sources[0].problems[0].startswith(f"{path}:{broken + 4}: ")
    for i in (0, 1, 1499, 1500, 2501, 2999):
        name = f"n{i}.example-{i % 7}.test"
        v = child.check_query(name, 1, "192.0.2.1")
        assert v is not None and v == here.check_query(name, 1, "192.0.2.1")
        assert v.where == f"{path}:{i + 4}"
    assert child.check_query("n1.example-1.test.other", 1, "192.0.2.1") is None


def test_a_reload_build_uses_one_process(tmp_path: Path, small_second_process: Path) -> None:
    # later builds run beside a server that answers: they leave the other core to it
    path = tmp_path / "big.rpz"
    path.write_text(plain_text(3000))
    settings = PolicySettings(selftest=False, sources=(
        SourceSettings(name="big", path=str(path), format="rpz"),))
    _, report = build_in_child(settings, 2, str(tmp_path / "state"))
    assert report.rules == 3000 and forks(small_second_process) == [os.getpid()]
