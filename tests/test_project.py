"""The project keeps its promises to a new user: README's commands, its config examples and
the code's own checks (ruff, mypy) stay true."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from resolver import config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    """The commands of the first code block (README opens with them)."""
    block = re.search(r"```sh\n(.*?)```", README, re.S)
    assert block, "README must open with a sh code block"
    return [line for line in block.group(1).splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_command():
    first = README.split("```sh", 1)[0]
    assert first.strip() == "# moat", "the two commands come first"
    commands = readme_commands()
    assert len(commands) == 2
    run, test = commands
    assert "moat serve" in run and "pip install" in run
    assert "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci, f".ci/run must run README's test command: {test!r}"


def test_readme_run_command_uses_a_safe_default():
    """No flags: moat's defaults listen on loopback, on an unprivileged port."""
    run = readme_commands()[0]
    assert "--listen" not in run
    defaults = config.load(None)
    assert all(host in ("127.0.0.1", "::1") and port > 1024
               for host, port in defaults.server.listen)


CONFIG_EXAMPLES = sorted(p for p in (ROOT / "deploy").rglob("*.toml"))


@pytest.mark.parametrize("path", CONFIG_EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_example_in_deploy_loads(path):
    config.load(str(path))


def readme_toml_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", README, re.S)


@pytest.mark.parametrize("index", range(len(readme_toml_blocks())))
def test_every_config_example_in_readme_loads(tmp_path, index):
    text = readme_toml_blocks()[index]
    tomllib.loads(text)
    path = tmp_path / "example.toml"
    path.write_text(text)
    config.load(str(path))


def _tool(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing (tests/setup.sh installs the dev extra)")
        pytest.skip(f"{name} not installed")
    return found


def test_ruff_is_clean():
    res = subprocess.run([_tool("ruff"), "check", "resolver", "policy", "bench"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_is_clean():
    res = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
