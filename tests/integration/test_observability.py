"""Seeing the threats: per-category counters scraped over HTTP, and the verdict log
(fields, rotation with a cap on files, an unwritable file, privacy, stdout and the flush
on shutdown). A real `moat serve` with a real nsd upstream and real clients."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest
from harness.ports import free_port
from harness.waiting import wait_for
from prometheus_client.parser import text_string_to_metric_families

from resolver.querylog import FIELDS

pytestmark = pytest.mark.integration

SOA = "$TTL 300\n@ SOA ns.rpz.test. hostmaster.rpz.test. 1 3600 600 86400 60\n@ NS ns.rpz.test.\n"


def write_config(tmp_path: Path, extra: str = "", *, metrics_port: int | None = None) -> str:
    """A config with a C2 zone (QSnatch), a phishing list and nothing else."""
    (tmp_path / "c2.rpz").write_text(SOA + "nas-c2.example.test CNAME . ; family=QSnatch\n")
    (tmp_path / "phish.txt").write_text("# a plain list\nbank-login.example.test\n")
    metrics = f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n' if metrics_port else ""
    text = f"""
[policy]
selftest = false
[[policy.source]]
name = "c2-feed"
category = "c2"
path = "{tmp_path / 'c2.rpz'}"
[[policy.source]]
name = "phish-list"
category = "phishing"
path = "{tmp_path / 'phish.txt'}"
{metrics}{extra}
"""
    path = tmp_path / "moat.toml"
    path.write_text(text)
    return str(path)


def samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """/metrics parsed by prometheus-client's own parser: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(snap: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    """The sum over samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in snap.items() if n == name and want <= ls)


def ask(port: int, name: str, *, source: str = "127.0.0.1", tcp: bool = False
        ) -> dns.message.Message:
    q = dns.message.make_query(name, "A")
    if tcp:
        return dns.query.tcp(q, "127.0.0.1", port=port, timeout=3, source=source)
    return dns.query.udp(q, "127.0.0.1", port=port, timeout=3, source=source)


def log_lines(*paths: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``paths`` in order (missing files: none)."""
    lines = []
    for p in paths:
        if p.exists():
            lines += [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    return lines


# --- Prometheus ----------------------------------------------------------------------


def test_threat_counters_per_category_family_and_client(tmp_path, moat, nsd_upstream) -> None:
    """A NAS asks for its QSnatch C2 name again and again (the repeats are answered by
    the UDP fast path, which must count them too), once over TCP; a second device hits
    a phishing name; an allowed name is answered from the cache. The counters a person
    reads to see which devices are infected say exactly that."""
    mport = free_port()
    m = moat("--config", write_config(tmp_path, metrics_port=mport), upstream=nsd_upstream)
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/healthz", timeout=5) as resp:
        assert resp.status == 200
    before = samples(mport)
    for _ in range(5):
        assert ask(m.port, "nas-c2.example.test").rcode() == dns.rcode.NXDOMAIN
    assert ask(m.port, "nas-c2.example.test", tcp=True).rcode() == dns.rcode.NXDOMAIN
    for _ in range(2):
        r = ask(m.port, "bank-login.example.test", source="127.0.0.2")
        assert r.answer[0][0].to_text() == "0.0.0.0"  # lists sinkhole by default
    for _ in range(3):
        assert ask(m.port, "www.example.test").rcode() == dns.rcode.NOERROR
    after = samples(mport)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("moat_policy_hits_total", category="c2", family="QSnatch",
                 action="nxdomain", source="c2-feed") == 6
    assert delta("moat_policy_hits_total", category="phishing", family="",
                 action="sinkhole", source="phish-list") == 2
    assert delta("moat_policy_hits_total") == 8
    assert value(after, "moat_clients_with_threat_hits", category="c2") == 1
    assert value(after, "moat_clients_with_threat_hits", category="phishing") == 1
    assert delta("moat_queries_total", transport="udp", qtype="A") == 10
    assert delta("moat_queries_total", transport="tcp", qtype="A") == 1
    assert delta("moat_responses_total", rcode="NXDOMAIN", source="policy") == 6
    assert delta("moat_responses_total", rcode="NOERROR", source="policy") == 2
    assert delta("moat_responses_total", rcode="NOERROR", source="upstream") == 1
    assert delta("moat_cache_hits_total") == 2
    assert delta("moat_request_duration_seconds_count") == 11
    assert value(after, "moat_policy_rules", source="c2-feed", category="c2") == 1


# --- the verdict log -------------------------------------------------------------------


def test_verdict_log_lines_carry_every_field(tmp_path, moat, nsd_upstream) -> None:
    log = tmp_path / "verdicts.jsonl"
    m = moat("--config", write_config(tmp_path), "--query-log", str(log),
             upstream=nsd_upstream)
    for _ in range(3):  # the first via the pipeline, the rest via the fast path
        ask(m.port, "nas-c2.example.test")
    ask(m.port, "www.example.test")  # allowed: no verdict, no line by default
    lines = wait_for(lambda: len(log_lines(log)) >= 3 and log_lines(log), what="3 lines")
    time.sleep(0.5)
    lines = log_lines(log)
    assert len(lines) == 3
    for line in lines:
        assert tuple(line) == FIELDS
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
        assert line["client"] == "127.0.0.1" and isinstance(line["port"], int)
        assert line["transport"] == "udp" and line["qname"] == "nas-c2.example.test"
        assert line["qtype"] == "A" and line["action"] == "nxdomain"
        assert line["trigger"] == "qname" and line["category"] == "c2"
        assert line["family"] == "QSnatch" and line["source"] == "c2-feed"
        assert line["rule"] == "nas-c2.example.test CNAME . ; family=QSnatch"
        assert line["where"] == f"{tmp_path / 'c2.rpz'}:4"
        assert line["matched"] == "nas-c2.example.test" and line["policy_version"] >= 1
        assert line["rcode"] == "NXDOMAIN" and line["cached"] is False
        assert line["answer_source"] == "policy" and line["latency_ms"] >= 0


def test_verdict_log_rotates_by_size_and_keeps_at_most_n_files(tmp_path, moat,
                                                               nsd_upstream) -> None:
    """A home user's SD card must not fill up: 300 logged queries at a 4 kB cap and two
    backups leave three files, none much over the cap, and the newest lines kept."""
    log = tmp_path / "logs" / "verdicts.jsonl"
    cfg = write_config(tmp_path, f"""
[log]
query_log = "{log}"
max_bytes = 4000
backups = 2
log_all_queries = true
""")
    m = moat("--config", cfg, upstream=nsd_upstream)
    for i in range(300):
        ask(m.port, f"host{i}.example.test" if i % 2 else "nas-c2.example.test")
        if i % 50 == 0:
            time.sleep(0.3)  # let the writer flush (and rotate) several times
    ask(m.port, "last.example.test")
    wait_for(lambda: m.stop() == 0, what="moat to stop (and flush)")
    files = {p.name for p in log.parent.iterdir()}
    # the current file is opened again at the next line, so a rotation may be the last act
    assert {"verdicts.jsonl.1", "verdicts.jsonl.2"} <= files <= {
        "verdicts.jsonl", "verdicts.jsonl.1", "verdicts.jsonl.2"}, files
    for p in log.parent.iterdir():
        # rotation happens after a write crosses the cap: one flush's batch over at most
        assert p.stat().st_size < 4000 + 300 * 450, (p.name, p.stat().st_size)
    kept = log_lines(log.parent / "verdicts.jsonl.2", log.parent / "verdicts.jsonl.1", log)
    assert 0 < len(kept) < 301  # older files were deleted
    assert [x["qname"] for x in kept][-1] == "last.example.test"
    assert {x["action"] for x in kept} == {"allow", "nxdomain"}


def test_unwritable_verdict_log_keeps_resolving_and_counts_drops(tmp_path, moat,
                                                                 nsd_upstream) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the log directory should be\n")
    mport = free_port()
    cfg = write_config(tmp_path, f'[log]\nquery_log = "{blocker / "verdicts.jsonl"}"\n',
                       metrics_port=mport)
    m = moat("--config", cfg, upstream=nsd_upstream)
    for _ in range(3):
        assert ask(m.port, "nas-c2.example.test").rcode() == dns.rcode.NXDOMAIN
        assert ask(m.port, "www.example.test").rcode() == dns.rcode.NOERROR
        time.sleep(0.4)  # several flush attempts
    wait_for(lambda: value(samples(mport), "moat_dropped_log_lines_total") >= 3,
             what="3 dropped lines counted")
    said = re.findall(r"cannot write the verdict log", m.stderr_text())
    assert len(said) == 1, m.stderr_text()  # said once, not once per line


@pytest.mark.parametrize("privacy", ["hash", "omit"])
def test_client_privacy(tmp_path, moat, nsd_upstream, privacy: str) -> None:
    log = tmp_path / "verdicts.jsonl"
    cfg = write_config(tmp_path, f'[log]\nquery_log = "{log}"\nclient_privacy = "{privacy}"\n')
    m = moat("--config", cfg, upstream=nsd_upstream)
    ask(m.port, "nas-c2.example.test")
    ask(m.port, "nas-c2.example.test")
    ask(m.port, "nas-c2.example.test", source="127.0.0.2")
    lines = wait_for(lambda: len(log_lines(log)) == 3 and log_lines(log), what="3 lines")
    text = log.read_text()
    assert "127.0.0.1" not in text and "127.0.0.2" not in text
    assert all(x["port"] is None for x in lines)
    clients = [x["client"] for x in lines]
    if privacy == "omit":
        assert clients == [None, None, None]
    else:  # the same device keeps one pseudonym (the report can still count devices)
        assert all(re.fullmatch(r"[0-9a-f]{16}", c) for c in clients)
        assert clients[0] == clients[1] != clients[2]


def test_verdict_log_to_stdout_is_flushed_on_shutdown(tmp_path, moat, nsd_upstream) -> None:
    """Docker logs to stdout; SIGTERM right after a verdict still writes its line."""
    m = moat("--config", write_config(tmp_path), "--query-log", "-", upstream=nsd_upstream)
    ask(m.port, "nas-c2.example.test")
    assert m.stop() == 0
    lines = [json.loads(x) for x in m.stdout_text().splitlines() if x.startswith("{")]
    assert [(x["qname"], x["category"]) for x in lines] == [("nas-c2.example.test", "c2")]

