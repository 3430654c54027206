"""deploy/docker-compose.yml (moat + Prometheus + Grafana) and its host-network variant.

Static (docker-compose 1.29 from Debian): both variants parse; every file they mount exists;
the Prometheus configs pass `promtool check config` with moat's alert rules beside them;
Grafana's provisioning points at the dashboard's mount and at $PROMETHEUS_URL.

Live: the host-network variant with docker-compose talking to podman's Docker API (a
`podman system service` started for the test), all inside a private network namespace (so
moat's port 53 and Prometheus' 9090 are the namespace's, not the machine's). moat runs from
the image the Dockerfile test builds; Prometheus from a stand-in image around Debian's
prometheus binary (no registry here). Grafana's image is not available from any package
registry, so its service is checked statically only. Prometheus must scrape moat (up == 1)
and load moat's alert rules.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from platformlib import (
    IMAGE,
    REPO_ROOT,
    dig,
    measure,
    need_container_engine,
    network_namespace,
    platform_sh,
    podman,
    podman_env,
    run,
    tool,
    unique,
    wait_for,
)

pytestmark = pytest.mark.platform

DEPLOY = REPO_ROOT / "deploy"
MAIN, HOST = DEPLOY / "docker-compose.yml", DEPLOY / "docker-compose.host.yml"


def compose_config(*files: Path) -> dict:  # type: ignore[type-arg]
    args = [tool("docker-compose")]
    for f in files:
        args += ["-f", str(f)]
    return yaml.safe_load(run([*args, "config"]).stdout)


def test_both_variants_parse_and_mount_existing_files() -> None:
    for files in ((MAIN,), (HOST,)):
        cfg = compose_config(*files)
        assert set(cfg["services"]) == {"moat", "prometheus", "grafana"}
        for name, svc in cfg["services"].items():
            for vol in svc.get("volumes", []):
                src = vol.split(":")[0] if isinstance(vol, str) else vol["source"]
                if src.startswith("/"):
                    assert Path(src).exists(), f"{name}: {src} does not exist"
        if files == (HOST,):
            assert all(s.get("network_mode") == "host" and "ports" not in s
                       for s in cfg["services"].values())
            assert cfg["services"]["grafana"]["environment"]["PROMETHEUS_URL"] == \
                "http://127.0.0.1:9090"
        else:
            moat = cfg["services"]["moat"]
            published = {(p["published"], p["protocol"]) for p in moat["ports"]
                         if isinstance(p, dict)}
            assert published == {(53, "udp"), (53, "tcp")}
            assert cfg["services"]["grafana"]["environment"]["PROMETHEUS_URL"] == \
                "http://prometheus:9090"


def test_prometheus_configs_and_grafana_provisioning(tmp_path: Path) -> None:
    promtool = tool("promtool")
    shutil.copy(DEPLOY / "prometheus" / "moat-alerts.yml", tmp_path / "moat-alerts.yml")
    targets = {}
    for name in ("prometheus.yml", "prometheus-host.yml"):
        shutil.copy(DEPLOY / "docker" / name, tmp_path / name)
        run([promtool, "check", "config", str(tmp_path / name)])
        cfg = yaml.safe_load((DEPLOY / "docker" / name).read_text())
        (job,) = cfg["scrape_configs"]
        assert job["job_name"] == "moat"  # the alert rules and the dashboard use job="moat"
        targets[name] = job["static_configs"][0]["targets"]
    assert targets == {"prometheus.yml": ["moat:9153"],
                       "prometheus-host.yml": ["127.0.0.1:9153"]}

    prov = DEPLOY / "docker" / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds[0]["type"] == "prometheus" and ds[0]["isDefault"] is True
    assert ds[0]["url"] == "$PROMETHEUS_URL"
    dash = yaml.safe_load((prov / "dashboards" / "moat.yml").read_text())["providers"][0]
    cfg = compose_config(MAIN)
    mounts = dict(v.split(":")[1::-1] for v in cfg["services"]["grafana"]["volumes"]
                  if v.startswith("/"))
    src = Path(mounts[dash["options"]["path"]])
    assert (src / "moat-dashboard.json").is_file()
    dashboard = json.loads((src / "moat-dashboard.json").read_text())
    assert dashboard["uid"] == "moat"
    home = cfg["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == dash["options"]["path"] + "/moat-dashboard.json"


@pytest.fixture
def podman_api(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(netns, DOCKER_HOST): podman's Docker API, serving inside a private namespace."""
    need_container_engine()
    tool("docker-compose")
    with network_namespace("compose") as ns:
        sock = tmp_path / "podman.sock"
        env = dict(podman_env())
        log = open(tmp_path / "podman-service.log", "wb")
        service = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{ns}", "podman", "system", "service", "--time=0",
             f"unix://{sock}"], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **env}, start_new_session=True)
        try:
            wait_for("podman API socket", lambda: sock.exists(), timeout=20)
            yield ns, f"unix://{sock}"
        finally:
            service.terminate()
            try:
                service.wait(timeout=10)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait(timeout=5)
            log.close()


@pytest.mark.slow
def test_host_variant_runs_moat_and_prometheus(podman_api: tuple[str, str]) -> None:
    ns, docker_host = podman_api
    cfg = compose_config(HOST)
    assert cfg["services"]["prometheus"]["image"] == compose_config(MAIN)["services"][
        "prometheus"]["image"]
    prom_image = cfg["services"]["prometheus"]["image"]
    platform_sh("image", IMAGE)
    platform_sh("prometheus-image", prom_image)
    podman("tag", IMAGE, cfg["services"]["moat"]["image"])
    project = unique("compose").replace("-", "")
    base = ["nsenter", f"--net=/run/netns/{ns}", tool("docker-compose"), "-p", project,
            "-f", str(HOST)]
    env = {"DOCKER_HOST": docker_host, "COMPOSE_DOCKER_CLI_BUILD": "0", "DOCKER_BUILDKIT": "0"}
    t0 = time.monotonic()
    try:
        run([*base, "up", "-d", "--no-build", "moat", "prometheus"], env=env, timeout=180)
        wait_for("moat answers on port 53 in the namespace",
                 lambda: dig("127.0.0.1", 53, "c2.moat.test", netns=ns) ==
                 ("NOERROR", ["0.0.0.0"]), timeout=60)
        measure("compose (host variant) up -> moat answers", f"{time.monotonic() - t0:.1f} s")

        def prom(path: str) -> dict:  # type: ignore[type-arg]
            code = ("import json, sys, urllib.request as u; print(u.build_opener("
                    "u.ProxyHandler({})).open('http://127.0.0.1:9090' + sys.argv[1], "
                    "timeout=3).read().decode())")
            res = run(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", code, path],
                      check=False)
            return json.loads(res.stdout) if res.returncode == 0 else {}

        def scraped() -> bool:
            r = prom("/api/v1/query?query=up%7Bjob%3D%22moat%22%7D")
            return bool(r.get("data", {}).get("result")) and \
                r["data"]["result"][0]["value"][1] == "1"

        wait_for("Prometheus scrapes moat (up{job=\"moat\"} == 1)", scraped, timeout=90,
                 interval=1)
        measure("compose (host variant) up -> Prometheus scraped moat",
                f"{time.monotonic() - t0:.1f} s")
        rules = prom("/api/v1/rules")
        names = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
        assert "MoatDeviceContactedC2" in names, sorted(names)
        r = prom("/api/v1/query?query=moat_up")
        assert r["data"]["result"], r
    finally:
        run([*base, "down", "-v", "-t", "10"], env=env, timeout=120, check=False)
