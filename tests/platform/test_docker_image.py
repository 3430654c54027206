"""The Dockerfile for real: built with podman (runc) from the unchanged `FROM
python:3.11-slim-bookworm`, which resolves to a local stand-in made with debootstrap (no image
registry is reachable here; tests/platform/platform.sh base), then run.

* on the host's loopback (`--network host`) with a config of the test's (a free port, the
  test harness's nsd as upstream): non-root, only CAP_NET_BIND_SERVICE, HEALTHCHECK healthy,
  a forwarded and a sinkholed answer over UDP and TCP, verdicts on stdout, `podman stop`
  (SIGTERM) ends it at once with status 0;
* in a private network namespace with the image's own config: port 53 as uid 10053 thanks to
  the file capability on moat's interpreter; with `no-new-privileges` (which makes the kernel
  ignore file capabilities) binding port 53 fails, which proves where the right comes from.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import EXAMPLE_ZONE, NsdServer, free_port_on, require_binary
from platformlib import (
    IMAGE,
    container,
    dig,
    measure,
    need_container_engine,
    network_namespace,
    platform_sh,
    podman,
    proc_status,
    run,
    unique,
    wait_for,
)

pytestmark = [pytest.mark.platform, pytest.mark.slow]

CAP_NET_BIND_SERVICE = 1 << 10
MOAT_UID = 10053


@pytest.fixture(scope="module")
def image() -> str:
    need_container_engine()
    base = platform_sh("base")
    measure("stand-in base image (debootstrap + import; cached: ~1 s)", f"{base:.1f} s")
    build = platform_sh("image", IMAGE)
    measure("podman build Dockerfile", f"{build:.1f} s")
    size = int(podman("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout.strip())
    measure("image size", f"{size / 1e6:.0f} MB")
    info = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    cfg = info["Config"]
    assert cfg["User"] == f"{MOAT_UID}:{MOAT_UID}"
    assert {"53/udp", "53/tcp", "9153/tcp"} <= set(cfg["ExposedPorts"])
    assert "/var/lib/moat" in cfg["Volumes"]
    check = info.get("Healthcheck") or cfg.get("Healthcheck")  # podman: top level
    assert check and check["Test"][0] == "CMD", check
    assert cfg["Entrypoint"] == ["/opt/moat/bin/moat", "serve"]
    assert cfg["Cmd"] == ["--config", "/etc/moat/moat.toml", "--query-log", "-"]
    return IMAGE


@pytest.fixture(scope="module")
def nsd() -> Iterator[NsdServer]:
    require_binary("nsd")
    with NsdServer({"example.test.": EXAMPLE_ZONE}) as server:
        yield server


def container_pid(name: str, netns: str | None = None) -> int:
    pid = int(podman("inspect", "-f", "{{.State.Pid}}", name, netns=netns).stdout.strip())
    assert pid > 0, f"{name} is not running"
    return pid


def healthy(name: str, netns: str | None = None) -> bool:
    # The check runs in the container's network: from the namespace it was started in.
    return podman("healthcheck", "run", name, check=False, netns=netns).returncode == 0


def test_container_on_loopback(image: str, nsd: NsdServer, tmp_path: Path) -> None:
    port, metrics = free_port_on("127.0.0.1"), free_port_on("127.0.0.1")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "moat.toml").write_text(
        "[server]\n"
        f'listen = ["127.0.0.1:{port}"]\n'
        "[upstream]\n"
        f'servers = ["{nsd.addr}"]\n'
        "[metrics]\n"
        f'listen = "127.0.0.1:{metrics}"\n')
    etc.chmod(0o755)
    (etc / "moat.toml").chmod(0o644)
    with container(unique("docker")) as name:
        t0 = time.monotonic()
        podman("run", "-d", "--name", name, "--network", "host",
               "-v", f"{etc}:/etc/moat:ro",
               "-e", f"MOAT_HEALTH_URL=http://127.0.0.1:{metrics}/healthz", image)
        wait_for("first answer", lambda: dig("127.0.0.1", port, "c2.moat.test")[0] == "NOERROR",
                 timeout=60)
        t_answer = time.monotonic() - t0
        wait_for("podman healthcheck run: healthy", lambda: healthy(name), timeout=60)
        measure("container start -> first answer", f"{t_answer:.1f} s")
        measure("container start -> healthy", f"{time.monotonic() - t0:.1f} s")

        pid = container_pid(name)
        st = proc_status(pid)
        uids = {int(x) for x in st["Uid"].split()}
        assert uids == {MOAT_UID}, st["Uid"]
        assert int(st["CapEff"], 16) == CAP_NET_BIND_SERVICE, st["CapEff"]
        assert int(st["CapPrm"], 16) == CAP_NET_BIND_SERVICE, st["CapPrm"]
        measure("container moat VmRSS after start", st["VmRSS"])
        top = podman("top", name, "user", "args").stdout
        assert "moat serve" in top and "root" not in top, top

        for tcp in (False, True):
            assert dig("127.0.0.1", port, "www.example.test", tcp=tcp) == \
                ("NOERROR", ["192.0.2.10"])
            assert dig("127.0.0.1", port, "c2.moat.test", tcp=tcp) == ("NOERROR", ["0.0.0.0"])
        assert dig("127.0.0.1", port, "phishing.moat.test", "AAAA") == ("NOERROR", ["::"])

        logs = podman("logs", name).stdout
        verdicts = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
        assert any(v["qname"] == "c2.moat.test" and v["category"] == "c2" for v in verdicts), \
            logs[-2000:]

        t0 = time.monotonic()
        podman("stop", "-t", "10", name, timeout=30)
        stop = time.monotonic() - t0
        measure("podman stop (SIGTERM -> exit)", f"{stop:.1f} s")
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, state
        assert stop < 5, f"podman stop took {stop:.1f}s: SIGTERM not handled?"


def test_port_53_in_a_private_network_namespace(image: str) -> None:
    """The image as shipped (its own /etc/moat/moat.toml: 0.0.0.0:53, [::]:53, metrics 9153)
    in a namespace with only `lo` (no route anywhere: the upstream is never reached)."""
    with network_namespace("docker53") as ns, container(unique("docker53"), netns=ns) as name:
        podman("run", "-d", "--name", name, "--network", "host", image,
               "--config", "/etc/moat/moat.toml", "--query-log", "-",
               "--upstream", "127.0.0.1:9", netns=ns)
        wait_for("answer on port 53",
                 lambda: dig("127.0.0.1", 53, "c2.moat.test", netns=ns)[0] == "NOERROR",
                 timeout=60)
        assert dig("127.0.0.1", 53, "c2.moat.test", netns=ns) == ("NOERROR", ["0.0.0.0"])
        assert dig("::1", 53, "malware.moat.test", "AAAA", tcp=True, netns=ns) == \
            ("NOERROR", ["::"])
        wait_for("healthy (image's own MOAT_HEALTH_URL)", lambda: healthy(name, ns), timeout=30)
        ss = run(["nsenter", f"--net=/run/netns/{ns}", "ss", "-Hlnue", "sport = :53"]).stdout
        owners = {int(u) for u in re.findall(r"uid:(\d+)", ss)}
        assert owners == {MOAT_UID}, ss
        st = proc_status(container_pid(name, ns))
        assert {int(x) for x in st["Uid"].split()} == {MOAT_UID}
        podman("stop", "-t", "10", name, netns=ns, timeout=30)

    # Control: no-new-privileges makes the kernel ignore file capabilities -> EACCES on 53.
    with network_namespace("docker53nnp") as ns, container(unique("nnp"), netns=ns) as name:
        podman("run", "--name", name, "--network", "host",
               "--security-opt", "no-new-privileges", image,
               "--config", "/etc/moat/moat.toml", "--upstream", "127.0.0.1:9",
               netns=ns, timeout=60, check=False)
        state = json.loads(podman("inspect", name, netns=ns).stdout)[0]["State"]
        logs = podman("logs", name, netns=ns).stdout + podman("logs", name, netns=ns).stderr
        assert state["ExitCode"] != 0, logs
        assert "Permission denied" in logs or "cannot start" in logs, logs
