"""resolver/config.py (TOML into settings, every problem reported with its key path) and
the command line: an invalid config stops `moat serve` with every problem listed,
--version, and the documented flags of `moat serve --help`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import REPO_ROOT

import resolver
from resolver import config
from resolver.config import ConfigError, load, parse_duration, parse_hostport


def write(tmp_path: Path, text: str, name: str = "moat.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def problems_of(path: str | None, overrides: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path, overrides)
    return info.value.problems


def test_defaults_without_a_file() -> None:
    cfg = load(None)
    assert cfg.server.listen == (("127.0.0.1", 5353), ("::1", 5353))
    assert cfg.upstream.timeout == 1.0 and cfg.upstream.deadline == 3.0
    assert cfg.cache.stale_ttl == 30 and cfg.path == ""
    # a real user's default: Quad9, a public protective resolver (tests pass loopback)
    assert cfg.upstream.servers == (("9.9.9.9", 53), ("149.112.112.112", 53))


def test_a_full_file_is_read(tmp_path: Path) -> None:
    path = write(tmp_path, """
[server]
listen = ["127.0.0.1:5300", "[::1]:5300"]
tcp_idle_timeout = "500ms"
tcp_max_connections = 3

[upstream]
servers = ["127.0.0.1:5301", "::1"]
timeout = "0.3s"
deadline = "1s"

[cache]
size = 2
min_ttl = 10
max_ttl = 100
stale_window = "2m"

[[policy.source]]
name = "local"
path = "/dev/null"
action = "NXDOMAIN"
""")
    cfg = load(path)
    assert cfg.server.listen == (("127.0.0.1", 5300), ("::1", 5300))
    assert cfg.server.tcp_idle_timeout == 0.5 and cfg.server.tcp_max_connections == 3
    assert cfg.upstream.servers == (("127.0.0.1", 5301), ("::1", 53))
    assert cfg.upstream.timeout == 0.3 and cfg.upstream.deadline == 1.0
    assert (cfg.cache.size, cfg.cache.min_ttl, cfg.cache.max_ttl) == (2, 10, 100)
    assert cfg.cache.stale_window == 120.0
    assert cfg.policy.sources[0].action == "nxdomain"
    assert cfg.path == os.path.abspath(path)


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[upstream]\nservers = ["127.0.0.1:1"]\ntimeout = 0.5\n')
    cfg = load(path, {"upstream": {"servers": ["127.0.0.2:2"]}})
    assert cfg.upstream.servers == (("127.0.0.2", 2),) and cfg.upstream.timeout == 0.5


@pytest.mark.parametrize("text,seconds", [(10, 10.0), (0.25, 0.25), ("500ms", 0.5),
                                          ("10s", 10.0), ("5m", 300.0), ("1h", 3600.0),
                                          ("2d", 172800.0), (" 3 ", 3.0)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", [True, -1, "ten", "5 weeks", "1.5.2s", ""])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_hostport() -> None:
    assert parse_hostport("127.0.0.1:53") == ("127.0.0.1", 53)
    assert parse_hostport("[::1]:5353") == ("::1", 5353)
    assert parse_hostport("::1", 53) == ("::1", 53)
    assert parse_hostport("192.0.2.1", 53) == ("192.0.2.1", 53)
    for bad in ("127.0.0.1", "dns.example:53", "127.0.0.1:70000", "[::1]:x"):
        with pytest.raises(ValueError):
            parse_hostport(bad)


BAD = """
[server]
listen = ["127.0.0.1:5300"]
tcp_max_conections = 4
tcp_idle_timeout = "soon"

[upstream]
servers = ["127.0.0.1:5301"]
timeout = "fast"

[cache]
size = "big"

[[policy.source]]
name = "feed"
path = "/dev/null"
action = "nxdomian"

[bogus]
x = 1
"""

BAD_KEYS = ["server.tcp_max_conections", "server.tcp_idle_timeout", "upstream.timeout",
            "cache.size", "policy.source[0].action", "bogus"]


def test_every_problem_is_reported_with_its_key_path(tmp_path: Path) -> None:
    path = write(tmp_path, BAD)
    problems = problems_of(path)
    for key in BAD_KEYS:
        assert any(f": {key}: " in p for p in problems), (key, problems)
    assert any("unknown key" in p for p in problems if "tcp_max_conections" in p)
    assert any("nxdomian" in p for p in problems)
    assert all(p.startswith(path) for p in problems)  # each names the file


def test_rules_across_keys(tmp_path: Path) -> None:
    path = write(tmp_path, '[upstream]\ntimeout = "2s"\ndeadline = "1s"\n'
                           '[cache]\nmin_ttl = 100\nmax_ttl = 10\n')
    problems = problems_of(path)
    assert any("upstream.deadline" in p for p in problems)
    assert any("cache.min_ttl" in p for p in problems)


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    assert "cannot read" in problems_of(str(tmp_path / "absent.toml"))[0]
    assert "not valid TOML" in problems_of(write(tmp_path, "[server\n"))[0]


def test_bad_flag_values_are_reported() -> None:
    problems = problems_of(None, {"server": {"listen": ["localhost:53"]},
                                  "upstream": {"servers": ["nope"]}})
    assert any(p.startswith("server.listen:") for p in problems)
    assert any(p.startswith("upstream.servers:") for p in problems)


# --- the command line (a real subprocess) --------------------------------------------


def run_moat(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"]
                                          if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "resolver", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_serve_rejects_an_invalid_config_listing_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, BAD)
    res = run_moat("serve", "--config", path, "--state-dir", str(tmp_path / "state"))
    assert res.returncode not in (0, None), res
    for key in BAD_KEYS:
        assert key in res.stderr, (key, res.stderr)
    assert "nxdomian" in res.stderr


def test_version() -> None:
    res = run_moat("--version")
    assert res.returncode == 0
    assert res.stdout.strip() == f"moat {resolver.__version__}"


def test_serve_help_documents_the_contract_flags() -> None:
    res = run_moat("serve", "--help")
    assert res.returncode == 0
    for flag in ("--config", "--listen", "--upstream", "--rpz", "--metrics", "--query-log",
                 "--log-level"):
        assert flag in res.stdout, flag


def test_config_module_exports() -> None:
    assert set(config.__all__) >= {"Config", "ConfigError", "load"}
