"""deploy/kubernetes/ without a cluster: the manifests against the Kubernetes API schemas
(kubernetes-validate from PyPI, strict: unknown fields fail), their cross-references (ports,
probes, selectors, the fixed ClusterIP in moat's config), the restricted Pod Security
profile, and the configs inside them for real: moat.toml loads in moat, and Knot with the
policy primary's knot.conf serves the RPZ zone that a real `moat serve` with the ConfigMap's
moat.toml transfers and enforces (paths, addresses and ports rewritten to loopback).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import dns.rcode
import pytest
import yaml
from harness import ManagedProcess, dns_query, free_port_on
from platformlib import REPO_ROOT, measure, run, tool, wait_for

from resolver import config as moat_config

pytestmark = pytest.mark.platform

K8S = REPO_ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"


def docs() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"] if "metadata" in doc else "")] = doc
    return out


def test_manifests_match_the_api_schemas() -> None:
    validate = tool("kubernetes-validate")
    files = [str(p) for p in sorted(K8S.rglob("*.yaml"))
             if p.name != "kustomization.yaml" and "prometheus-operator" not in p.parts]
    res = run([validate, "--strict", "-k", KUBERNETES_VERSION, *files], check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ERROR" not in res.stdout + res.stderr


def test_kinds_and_kustomization() -> None:
    d = docs()
    kinds = sorted(k for k, _ in d)
    assert kinds == sorted(["ConfigMap", "ConfigMap", "Deployment", "Deployment", "Kustomization",
                            "Namespace", "PodDisruptionBudget", "Service", "Service",
                            "ServiceMonitor"]), kinds
    kust = d[("Kustomization", "")]
    listed = set(kust["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files
    for (kind, _), doc in d.items():
        if kind not in ("Namespace", "Kustomization"):
            assert doc["metadata"]["namespace"] == "moat", (kind, doc["metadata"])


def container(deploy: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def test_replicas_ports_probes_and_scraping() -> None:
    d = docs()
    dep, svc = d[("Deployment", "moat")], d[("Service", "moat")]
    assert dep["spec"]["replicas"] == 3
    pod = dep["spec"]["template"]
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true",
                                              "prometheus.io/port": "9153",
                                              "prometheus.io/path": "/metrics"}
    c = container(dep, "moat")
    ports = {p["name"]: (p["containerPort"], p["protocol"]) for p in c["ports"]}
    assert ports == {"dns-udp": (5353, "UDP"), "dns-tcp": (5353, "TCP"),
                     "metrics": (9153, "TCP")}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe
    # the Service: 53/UDP and 53/TCP onto the named container ports, and metrics
    sp = {(p["port"], p["protocol"]): p["targetPort"] for p in svc["spec"]["ports"]}
    assert sp == {(53, "UDP"): "dns-udp", (53, "TCP"): "dns-tcp", (9153, "TCP"): "metrics"}
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    sm = d[("ServiceMonitor", "moat")]
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    pdb = d[("PodDisruptionBudget", "moat")]
    assert pdb["spec"]["minAvailable"] < dep["spec"]["replicas"]


@pytest.mark.parametrize("name", ["moat", "policy-primary"])
def test_pods_meet_the_restricted_pod_security_profile(name: str) -> None:
    dep = docs()[("Deployment", name)]
    spec = dep["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert "limits" in c["resources"] and "requests" in c["resources"], c["name"]
        for p in c.get("ports", []):
            assert p["containerPort"] >= 1024, "no capability to bind a port below 1024"


def moat_toml() -> str:
    return docs()[("ConfigMap", "moat-config")]["data"]["moat.toml"]


def test_moat_config_in_the_configmap(tmp_path: Path) -> None:
    path = tmp_path / "moat.toml"
    path.write_text(moat_toml())
    cfg = moat_config.load(str(path))
    d = docs()
    c = container(d[("Deployment", "moat")], "moat")
    dns_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "dns-udp")
    assert {port for _, port in cfg.server.listen} == {dns_port}
    assert cfg.metrics.listen == "0.0.0.0:9153"
    assert cfg.server.state_dir == "/var/lib/moat"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/etc/moat", "/var/lib/moat", "/run/moat", "/tmp"} <= mounts
    # the policy primary: moat needs an IP, so the Service has a fixed ClusterIP
    (src,) = [s for s in cfg.policy.sources if s.zone]
    primary = d[("Service", "policy-primary")]["spec"]
    assert src.primary == f"{primary['clusterIP']}:53"
    assert {(p["port"], p["protocol"]) for p in primary["ports"]} == {(53, "UDP"), (53, "TCP")}
    knot_conf = d[("ConfigMap", "policy-primary")]["data"]["knot.conf"]
    assert f"domain: {src.zone.rstrip('.')}" in knot_conf


def test_policy_primary_and_moat_configs_work_together(tmp_path: Path, moat: Any,
                                                       nsd_upstream: Any) -> None:
    """Knot with the shipped knot.conf and zone, moat with the shipped moat.toml: only the
    directories and addresses are moved to loopback."""
    knotd, knotc = tool("knotd"), tool("knotc")
    cm = docs()[("ConfigMap", "policy-primary")]["data"]
    port = free_port_on("127.0.0.1")
    dirs = {d: tmp_path / d for d in ("rundir", "storage", "zones")}
    for p in dirs.values():
        p.mkdir()
    conf = cm["knot.conf"].replace("[ 0.0.0.0@5353, ::@5353 ]", f"127.0.0.1@{port}")
    for d, p in dirs.items():
        conf = conf.replace(f" /{d}\n", f" {p}\n")
    assert str(dirs["zones"]) in conf and f"127.0.0.1@{port}" in conf, conf
    conf = conf.replace("[ 10.0.0.0/8,", "[ 127.0.0.0/8, 10.0.0.0/8,")  # loopback clients
    (tmp_path / "knot.conf").write_text(conf)
    zone = dirs["zones"] / "rpz.example.zone"
    zone.write_text(cm["rpz.example.zone"])
    run([knotc, "-c", str(tmp_path / "knot.conf"), "conf-check"])
    knot = ManagedProcess([knotd, "-c", str(tmp_path / "knot.conf")],
                          log_path=tmp_path / "knot.log", name="knotd")
    knot.start()
    try:
        def serial() -> int | None:
            try:
                r = dns_query("127.0.0.1", port, "rpz.example.", "SOA", timeout=1)
            except Exception:  # noqa: BLE001 - not up yet
                return None
            return int(r.answer[0][0].serial) if r.answer else None

        first = wait_for("knot serves rpz.example", serial, timeout=15)

        text = moat_toml()
        text = re.sub(r'listen = \["0\.0\.0\.0:5353", "\[::\]:5353"\]', "", text)
        text = text.replace('primary = "10.96.0.153:53"', f'primary = "127.0.0.1:{port}"')
        text = text.replace('listen = "0.0.0.0:9153"', 'listen = "127.0.0.1:0"')
        text = text.replace('state_dir = "/var/lib/moat"\n', "")
        text = text.replace('servers = ["9.9.9.9", "149.112.112.112"]',
                            f'servers = ["{nsd_upstream.addr}"]')
        (tmp_path / "moat.toml").write_text(text)
        proc = moat("--config", str(tmp_path / "moat.toml"), ready_timeout=30)

        def rcode(name: str) -> str:
            return dns.rcode.to_text(proc.query(name, "A").rcode())

        wait_for("moat enforces the zone", lambda: rcode("malware-download.example") ==
                 "NXDOMAIN", timeout=20)
        assert rcode("www.c2-panel.example") == "NXDOMAIN"
        r = proc.query("phishing-login.example", "A")
        assert [rr.to_text() for rrset in r.answer for rr in rrset] == ["192.0.2.80"]
        assert rcode("ok.malware-download.example") != "NXDOMAIN"  # passthru: forwarded
        assert rcode("c2.moat.test") == "NOERROR"

        # What the reloader sidecar does after an edit (serial untouched): a new serial,
        # and the change is served as an IXFR from the old one.
        zone.write_text(cm["rpz.example.zone"] + "new-threat.example CNAME .\n")
        t0 = time.monotonic()
        time.sleep(1.1)  # unixtime serial: at least one second later
        run([knotc, "-s", str(dirs["rundir"] / "knot.sock"), "zone-reload", "rpz.example"])
        second = wait_for("a new serial", lambda: (s := serial()) and s > first and s,
                          timeout=15)
        measure("k8s policy primary: edit -> new serial (knotc zone-reload)",
                f"{time.monotonic() - t0:.1f} s")
        ixfr = run([tool("dig"), "@127.0.0.1", "-p", str(port), f"IXFR={first}",
                    "rpz.example.", "+noall", "+answer"]).stdout
        soas = [ln for ln in ixfr.splitlines() if ln.split()[3:4] == ["SOA"]]
        assert len(soas) == 4 and str(second) in soas[0], ixfr  # new, old, new, new: a diff
        assert "new-threat.example.rpz.example." in ixfr
        assert "malware-download.example.rpz.example." not in ixfr  # not the whole zone
    finally:
        knot.stop(timeout=5)
