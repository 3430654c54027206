"""``moat report``: figures from realistic rotated/gzipped verdict logs, in text, JSON and
HTML (the HTML rendered by headless Chromium: fails when CI=true and it is missing)."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness import REPO_ROOT, require_binary

if str(REPO_ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) lacks it
    sys.path.insert(0, str(REPO_ROOT))

from resolver import cli, report  # noqa: E402

NOW = dt.datetime(2024, 5, 2, 12, 0, 0, tzinfo=dt.UTC)
NAS, LAPTOP, PHONE, TABLET, TV, PRINTER = (
    "192.168.1.23", "192.168.1.40", "192.168.1.51", "192.168.1.52", "192.168.1.15",
    "192.168.1.12")
OTHERS = [f"192.168.1.{i}" for i in range(10, 20)]  # includes TV and PRINTER
XSS_NAME = '"><img src=x onerror=alert(1)><script>alert(2)</script>.evil.tk'
ESC_NAME = "\x1b]0;pwned\x07\x1b[2Jsecure-bank-verify.co"
UNSEEN_DEVICE = "192.168.1.99"  # only in lines older than --since 24h


def line(ts: str, client: str | None, qname: str, action: str = "allow",
         category: str | None = None, family: str | None = None) -> str:
    """One log line shaped exactly like resolver/querylog.py's QueryLog.format."""
    verdict = action != "allow"
    rec = {
        "ts": ts, "client": client, "port": 40000 if client else None, "transport": "udp",
        "qname": qname, "qtype": "A", "action": action,
        "trigger": "qname" if verdict else None, "category": category, "family": family,
        "source": "threats" if verdict else None, "rule": f"{qname} CNAME ." if verdict
        else None, "where": "threats.rpz:12" if verdict else None,
        "matched": qname if verdict else None, "policy_version": 7 if verdict else None,
        "rcode": "NXDOMAIN" if action == "nxdomain" else "NOERROR",
        "cached": False, "answer_source": "policy" if verdict else "upstream",
        "latency_ms": 0.412,
    }
    return json.dumps(rec, separators=(",", ":"), ensure_ascii=False)


def events() -> list[str]:
    """The network's last two days, oldest first."""
    out: list[tuple[str, str]] = []

    def add(ts: str, *a: Any, **kw: Any) -> None:
        out.append((ts, line(ts, *a, **kw)))

    # older than --since 24h (NOW - 24h = 2024-05-01T12:00Z)
    add("2024-04-30T10:00:00.000Z", NAS, "t2q2r.cf", "sinkhole", "c2", "QSnatch")
    add("2024-04-30T10:00:05.000Z", UNSEEN_DEVICE, "example.org")
    add("2024-05-01T11:59:59.999Z", UNSEEN_DEVICE, "example.org")
    # the QNAP NAS beacons to QSnatch DGA names: 12 hits in the window
    for i, hour in enumerate(range(13, 23)):
        name = "t2q2r.cf" if i % 2 == 0 else "gc9nz.tk"
        add(f"2024-05-01T{hour}:05:00.000Z", NAS, name, "sinkhole", "c2", "QSnatch")
    add("2024-05-02T09:30:00.250Z", NAS, "t2q2r.cf", "sinkhole", "c2", "QSnatch")
    add("2024-05-02T11:45:12.345Z", NAS, "xk3b1.ga", "sinkhole", "c2", "QSnatch")
    # the laptop: an Emotet dropper, then its C2
    add("2024-05-01T18:09:30.000Z", LAPTOP, "invoice-dl.xyz", "nxdomain", "malware", "Emotet")
    for ts in ("2024-05-01T18:10:00.000Z", "2024-05-01T18:40:00.000Z",
               "2024-05-02T08:15:00.000Z"):
        add(ts, LAPTOP, "ajaxcdn-update.top", "nxdomain", "c2", "Emotet")
    # phishing
    add("2024-05-01T16:20:00.000Z", PHONE, "paypa1-login.com", "sinkhole", "phishing")
    add("2024-05-02T07:00:00.000Z", PHONE, "paypa1-login.com", "sinkhole", "phishing")
    add("2024-05-01T21:00:00.000Z", TABLET, XSS_NAME, "sinkhole", "phishing")
    add("2024-05-02T10:00:00.000Z", TABLET, ESC_NAME, "sinkhole", "phishing")
    # shadow mode: logged, not blocked
    add("2024-05-01T23:30:00.000Z", TV, "coinhive.com", "log-only", "malware")
    # an allow-list hole: not a hit
    add("2024-05-01T14:00:00.000Z", PRINTER, "allowed-tracker.example", "passthru",
        "allowlist")
    # plenty of ordinary queries: 14 devices, 3 each
    for client in [*OTHERS, NAS, LAPTOP, PHONE, TABLET]:
        for ts, name in (("2024-05-01T13:00:00.500Z", "www.debian.org"),
                         ("2024-05-01T20:00:00.500Z", "time.cloudflare.com"),
                         ("2024-05-02T06:00:00.500Z", "connectivitycheck.gstatic.com")):
            add(ts, client, name)
    out.sort(key=lambda e: e[0])
    return [text for _, text in out]


def write_logs(d: Path, lines: list[str] | None = None) -> list[Path]:
    """verdicts.jsonl.2.gz (oldest), .1 (with a malformed and a blank line), current."""
    lines = events() if lines is None else lines
    old = [x for x in lines if json.loads(x)["ts"] < "2024-05-01T16:00"]
    mid = [x for x in lines if "2024-05-01T16:00" <= json.loads(x)["ts"] < "2024-05-02"]
    new = [x for x in lines if json.loads(x)["ts"] >= "2024-05-02"]
    with gzip.open(d / "verdicts.jsonl.2.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(old) + "\n")
    broken = '{"ts":"2024-05-01T20:00:00.000Z","client":"192.168'  # a torn write
    (d / "verdicts.jsonl.1").write_text("\n".join(mid[:3] + [broken, ""] + mid[3:]) + "\n",
                                        encoding="utf-8")
    (d / "verdicts.jsonl").write_text("\n".join(new) + "\n", encoding="utf-8")
    # any order on the command line
    return [d / "verdicts.jsonl.1", d / "verdicts.jsonl", d / "verdicts.jsonl.2.gz"]


@pytest.fixture
def logs(tmp_path: Path) -> list[Path]:
    return write_logs(tmp_path)


@pytest.fixture
def fixed_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "_utcnow", lambda: NOW)


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    rc = cli.main(["report", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> dict[str, Any]:
    rc, out, err = run(capsys, *argv, "--format", "json")
    assert rc == 0, err
    return json.loads(out)


# --- JSON: the figures ---------------------------------------------------------------


def test_json_figures_last_24h(logs: list[Path], fixed_now: None,
                               capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(capsys, *logs, "--since", "24h")
    assert doc["schema"] == "moat-report/1"
    assert doc["window"] == {"since": "24h", "from": "2024-05-01T12:00:00.000Z",
                             "to": "2024-05-02T12:00:00.000Z",
                             "first_seen": "2024-05-01T13:00:00.500Z",
                             "last_seen": "2024-05-02T11:45:12.345Z"}
    inp = doc["input"]
    assert inp["files"] == [str(p) for p in logs]
    assert (inp["lines"], inp["used_lines"], inp["malformed_lines"],
            inp["outside_window"], inp["allow_lines"]) == (68, 64, 1, 3, 42)
    assert inp["client_kinds"] == ["address"]
    assert doc["devices"]["active"] == 14  # 192.168.1.99 is only in older lines
    assert doc["devices"]["denominator"] == "all-queries"
    assert doc["totals"] == {"hits": 21, "blocked": 20, "log_only": 1,
                             "devices_with_hits": 5}
    assert doc["categories"] == [
        {"category": "c2", "hits": 15, "blocked": 15, "log_only": 0, "devices": 2,
         "share": 0.1429},
        {"category": "phishing", "hits": 4, "blocked": 4, "log_only": 0, "devices": 2,
         "share": 0.1429},
        {"category": "malware", "hits": 2, "blocked": 1, "log_only": 1, "devices": 2,
         "share": 0.1429},
    ]
    assert doc["families"] == [
        {"family": "QSnatch", "hits": 12, "devices": 1, "categories": {"c2": 12}},
        {"family": "Emotet", "hits": 4, "devices": 1, "categories": {"c2": 3, "malware": 1}},
    ]
    assert list(doc["devices_by_category"]) == ["c2", "malware", "phishing"]
    assert doc["devices_by_category"]["c2"] == [
        {"client": NAS, "families": {"QSnatch": 12},
         "first_seen": "2024-05-01T13:05:00.000Z", "last_seen": "2024-05-02T11:45:12.345Z",
         "queries": 12, "log_only": 0,
         "top_names": [{"name": "t2q2r.cf", "count": 6}, {"name": "gc9nz.tk", "count": 5},
                       {"name": "xk3b1.ga", "count": 1}]},
        {"client": LAPTOP, "families": {"Emotet": 3},
         "first_seen": "2024-05-01T18:10:00.000Z", "last_seen": "2024-05-02T08:15:00.000Z",
         "queries": 3, "log_only": 0,
         "top_names": [{"name": "ajaxcdn-update.top", "count": 3}]},
    ]
    malware = doc["devices_by_category"]["malware"]
    assert [(d["client"], d["families"], d["queries"], d["log_only"]) for d in malware] == [
        (TV, {}, 1, 1), (LAPTOP, {"Emotet": 1}, 1, 0)]
    phishing = doc["devices_by_category"]["phishing"]
    assert [(d["client"], d["queries"], d["first_seen"], d["last_seen"])
            for d in phishing] == [
        (PHONE, 2, "2024-05-01T16:20:00.000Z", "2024-05-02T07:00:00.000Z"),
        (TABLET, 2, "2024-05-01T21:00:00.000Z", "2024-05-02T10:00:00.000Z")]
    assert [(n["name"], n["count"], n["category"], n["family"], n["devices"])
            for n in doc["top_blocked_names"]] == [
        ("t2q2r.cf", 6, "c2", "QSnatch", 1), ("gc9nz.tk", 5, "c2", "QSnatch", 1),
        ("ajaxcdn-update.top", 3, "c2", "Emotet", 1),
        ("paypa1-login.com", 2, "phishing", None, 1),
        (ESC_NAME, 1, "phishing", None, 1), (XSS_NAME, 1, "phishing", None, 1),
        ("invoice-dl.xyz", 1, "malware", "Emotet", 1), ("xk3b1.ga", 1, "c2", "QSnatch", 1)]
    assert doc["top_clients"] == [
        {"client": NAS, "hits": 12, "queries": 15, "categories": {"c2": 12}},
        {"client": LAPTOP, "hits": 4, "queries": 7, "categories": {"c2": 3, "malware": 1}},
        {"client": PHONE, "hits": 2, "queries": 5, "categories": {"phishing": 2}},
        {"client": TABLET, "hits": 2, "queries": 5, "categories": {"phishing": 2}},
        {"client": TV, "hits": 1, "queries": 4, "categories": {"malware": 1}},
    ]
    timeline = {h["hour"]: h["categories"] for h in doc["timeline"]}
    assert len(timeline) == 16
    assert list(timeline) == sorted(timeline)
    assert timeline["2024-05-01T13:00:00.000Z"] == {"c2": 1}
    assert timeline["2024-05-01T18:00:00.000Z"] == {"c2": 3, "malware": 1}
    assert timeline["2024-05-01T21:00:00.000Z"] == {"c2": 1, "phishing": 1}
    assert timeline["2024-05-01T23:00:00.000Z"] == {"malware": 1}
    assert timeline["2024-05-02T11:00:00.000Z"] == {"c2": 1}
    assert sum(h["hits"] for h in doc["timeline"]) == 21


def test_json_all_lines_without_since(logs: list[Path], fixed_now: None,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(capsys, *logs)
    assert doc["window"]["since"] is None and doc["window"]["from"] is None
    assert doc["window"]["first_seen"] == "2024-04-30T10:00:00.000Z"
    assert (doc["input"]["used_lines"], doc["input"]["outside_window"]) == (67, 0)
    assert doc["devices"]["active"] == 15
    nas = doc["devices_by_category"]["c2"][0]
    assert (nas["client"], nas["queries"], nas["first_seen"]) == (
        NAS, 13, "2024-04-30T10:00:00.000Z")
    assert doc["categories"][0]["share"] == round(2 / 15, 4)


def test_rotated_files_in_any_order_give_the_same_report(
        logs: list[Path], fixed_now: None, capsys: pytest.CaptureFixture[str]) -> None:
    a = run_json(capsys, *logs, "--since", "24h")
    b = run_json(capsys, *reversed(logs), "--since", "24h")
    a["input"].pop("files"), b["input"].pop("files")
    assert a == b
    # the same file named twice is read once
    c = run_json(capsys, *logs, logs[0], "--since", "24h")
    assert c["input"]["files"] == [str(p) for p in logs]
    assert c["totals"] == a["totals"]


def test_since_units(logs: list[Path], fixed_now: None,
                     capsys: pytest.CaptureFixture[str]) -> None:
    # NOW - 5h15m = 2024-05-02T06:45Z: the NAS's last two beacons, the laptop's last
    doc = run_json(capsys, *logs, "--since", "5h15m")
    assert doc["window"]["from"] == "2024-05-02T06:45:00.000Z"
    assert [(d["client"], d["queries"]) for d in doc["devices_by_category"]["c2"]] == [
        (NAS, 2), (LAPTOP, 1)]
    assert run_json(capsys, *logs, "--since", "90m")["totals"]["hits"] == 1
    assert run_json(capsys, *logs, "--since", "7d")["totals"]["hits"] == 22
    assert report.parse_age("2w") == dt.timedelta(days=14)
    assert report.parse_age("") is None


# --- text ------------------------------------------------------------------------------


def test_text_headline_and_sections(logs: list[Path], fixed_now: None,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, *logs, "--since", "24h")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == ("2 of 14 devices contacted C2: 192.168.1.23 (QSnatch), "
                        "192.168.1.40 (Emotet)")
    assert lines[1] == "  2 of 14 devices hit malware names: 192.168.1.15, 192.168.1.40 (Emotet)"
    assert lines[2] == "  2 of 14 devices hit phishing names: 192.168.1.51, 192.168.1.52"
    assert "1 malformed line skipped" in out
    assert "3 older" in out
    assert "Devices:  14 active; active devices = distinct clients of all queries" in out
    assert "Hits:     21 (20 blocked, 1 log-only) from 5 devices" in out
    assert "C2: 2 devices (14% of active devices)" in out
    nas_row = next(x for x in lines if x.strip().startswith(NAS) and "QSnatch" in x)
    assert re.search(r"QSnatch\s+12\s+2024-05-01T13:05:00.000Z\s+2024-05-02T11:45:12.345Z\s+"
                     r"t2q2r.cf \(6\), gc9nz.tk \(5\), xk3b1.ga \(1\)$", nas_row), nas_row
    assert re.search(r"^\s+QSnatch\s+12\s+1\s+c2$", out, re.M)
    assert re.search(r"^\s+Emotet\s+4\s+1\s+c2, malware$", out, re.M)
    assert re.search(r"^\s+c2\s+15\s+15\s+0\s+2\s+14%$", out, re.M)
    assert re.search(r"^\s+malware\s+2\s+1\s+1\s+2\s+14%$", out, re.M)
    assert re.search(r"^\s+t2q2r.cf\s+6\s+c2\s+QSnatch\s+1$", out, re.M)
    assert re.search(r"^\s+2024-05-01 18:00\s+c2 3, malware 1$", out, re.M)
    assert re.search(r"^\s+192.168.1.15\s+-\s+1 \(1 log-only\)\s+2024-05-01T23:30", out, re.M)
    # attacker-controlled names cannot drive the terminal
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;pwned\\x07\\x1b[2Jsecure-bank-verify.co" in out


def test_text_verdict_only_log_says_its_denominator(tmp_path: Path, fixed_now: None,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    verdicts = [x for x in events() if json.loads(x)["action"] != "allow"]
    paths = write_logs(tmp_path, verdicts)
    doc = run_json(capsys, *paths, "--since", "24h")
    # NAS, laptop, phone, tablet, TV and the printer (its passthru line) have verdicts
    assert doc["devices"]["active"] == 6
    assert doc["devices"]["denominator"] == "verdict-lines"
    assert doc["categories"][0]["share"] == round(2 / 6, 4)
    rc, out, _ = run(capsys, *paths, "--since", "24h")
    assert out.splitlines()[0].startswith("2 of 6 devices contacted C2: 192.168.1.23")
    assert "no 'allow' lines" in out
    assert "devices that only made allowed queries are not counted" in out


def test_hashed_and_omitted_clients(tmp_path: Path, fixed_now: None,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    nas_hash = "3f9a0c5be2d417a8"
    lines = [
        line("2024-05-02T10:00:00.000Z", nas_hash, "t2q2r.cf", "sinkhole", "c2", "QSnatch"),
        line("2024-05-02T10:10:00.000Z", nas_hash, "gc9nz.tk", "sinkhole", "c2", "QSnatch"),
        line("2024-05-02T10:11:00.000Z", "0123456789abcdef", "www.debian.org"),
        line("2024-05-02T10:20:00.000Z", None, "t2q2r.cf", "sinkhole", "c2", "QSnatch"),
        line("2024-05-02T10:21:00.000Z", None, "www.debian.org"),
    ]
    log = tmp_path / "verdicts.jsonl"
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    doc = run_json(capsys, log)
    assert doc["input"]["client_kinds"] == ["hashed", "omitted"]
    assert doc["input"]["unknown_client_lines"] == 2
    assert doc["devices"]["active"] == 2  # "unknown" is not a device
    assert [(d["client"], d["queries"]) for d in doc["devices_by_category"]["c2"]] == [
        (nas_hash, 2), ("unknown", 1)]
    assert doc["categories"][0] == {"category": "c2", "hits": 3, "blocked": 3,
                                    "log_only": 0, "devices": 1, "share": 0.5}
    rc, out, _ = run(capsys, log)
    assert out.splitlines()[0] == (f"1 of 2 devices contacted C2: {nas_hash} (QSnatch), "
                                   "unknown (QSnatch)")
    assert "pseudonymised (hashed)" in out
    assert "2 lines without a client (privacy switch) are grouped as 'unknown'" in out


def test_empty_log(tmp_path: Path, fixed_now: None,
                   capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "verdicts.jsonl"
    log.write_text("", encoding="utf-8")
    rc, out, _ = run(capsys, log)
    assert rc == 0
    assert out.splitlines()[0] == "0 of 0 devices contacted C2"
    for fmt in ("json", "html"):
        rc, _, err = run(capsys, log, "--format", fmt)
        assert rc == 0, err


def test_long_spans_are_summarised_per_day(tmp_path: Path, fixed_now: None,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    start = NOW - dt.timedelta(days=20)
    lines = [line(report.fmt_time(start + dt.timedelta(hours=5 * i)), NAS, "t2q2r.cf",
                  "sinkhole", "c2", "QSnatch") for i in range(96)]  # 96 distinct hours
    log = tmp_path / "verdicts.jsonl"
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    doc = run_json(capsys, log)
    assert len(doc["timeline"]) == 96
    rc, out, _ = run(capsys, log)
    assert "Timeline (UTC, per day, only days with hits)" in out
    assert re.search(r"^\s+2024-04-12\s+c2 3$", out, re.M)  # 12:00, 17:00, 22:00
    assert re.search(r"^\s+2024-04-13\s+c2 5$", out, re.M)  # 03:00 ... 23:00
    rc, out, _ = run(capsys, log, "--format", "html")
    assert "one column per day" in out


# --- errors ------------------------------------------------------------------------------


def test_unreadable_file_exits_2(logs: list[Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, logs[0], tmp_path / "nope.jsonl")
    assert rc == 2 and out == ""
    assert "cannot read" in err and "nope.jsonl" in err
    bad = tmp_path / "verdicts.jsonl.3.gz"
    bad.write_bytes(gzip.compress(b'{"ts":"2024-05-01T00:00:00Z"}\n' * 50)[:40])  # truncated
    rc, out, err = run(capsys, bad)
    assert rc == 2 and "cannot read" in err and "verdicts.jsonl.3.gz" in err
    rc, _, err = run(capsys, logs[0], "--since", "yesterday")
    assert rc == 2 and "--since" in err
    rc, _, err = run(capsys, logs[0], "-o", tmp_path / "no" / "such" / "dir.txt")
    assert rc == 2 and "cannot write" in err


def test_cli_subprocess_writes_output_file(logs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "resolver", "report", *map(str, logs),
                           "--format", "json", "-o", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["devices_by_category"]["c2"][0]["client"] == NAS
    assert doc["input"]["malformed_lines"] == 1


def test_streams_a_large_log(tmp_path: Path, fixed_now: None,
                             capsys: pytest.CaptureFixture[str]) -> None:
    """~100k allowed lines plus beacons: aggregates stay small, the run stays quick."""
    log = tmp_path / "verdicts.jsonl"
    allowed = line("2024-05-02T10:00:00.000Z", "192.168.1.10", "www.debian.org")
    beacon = line("2024-05-02T10:05:00.000Z", NAS, "t2q2r.cf", "sinkhole", "c2", "QSnatch")
    with log.open("w", encoding="utf-8") as f:
        for i in range(100_000):
            f.write((beacon if i % 1000 == 0 else allowed) + "\n")
    started = time.monotonic()
    doc = run_json(capsys, log)
    assert time.monotonic() - started < 30
    assert doc["totals"]["hits"] == 100
    assert doc["devices"]["active"] == 2


# --- HTML --------------------------------------------------------------------------------

_NETWORK_REF = re.compile(r"https?://|@import|url\(|<(?:script|link|img|iframe|object|embed)\b",
                          re.I)


def html_report(logs: list[Path], tmp_path: Path,
                capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / "report.html"
    rc, _, err = run(capsys, *logs, "--since", "24h", "--format", "html", "-o", out)
    assert rc == 0, err
    return out


def test_html_is_self_contained_and_escaped(logs: list[Path], tmp_path: Path,
                                            fixed_now: None,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    text = html_report(logs, tmp_path, capsys).read_text(encoding="utf-8")
    assert _NETWORK_REF.search(text) is None, _NETWORK_REF.search(text)
    for tag in re.findall(r"<[a-zA-Z][^>]*>", text):
        assert not re.search(r"\s(?:src|href|xlink:href|action|on\w+)\s*=", tag, re.I), tag
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;&lt;script&gt;" in text
    assert "\x1b" not in text and "\\x1b]0;pwned" in text  # control characters made visible
    assert "<svg" in text and "<style>" in text
    assert "default-src 'none'" in text  # CSP: no fetches, no scripts


def png_pixels(data: bytes) -> np.ndarray:
    """Decode an 8-bit non-interlaced PNG (what Chromium writes) to an HxWxC array."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, bytearray()
    width = height = depth = colour = interlace = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        elif kind == b"IEND":
            break
    assert depth == 8 and interlace == 0 and colour in (0, 2, 4, 6)
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    stride = width * bpp
    raw = zlib.decompress(bytes(idat))
    assert len(raw) == height * (stride + 1)
    img = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int64)
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        cur = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int64)
        if ftype == 1:  # Sub: running sum per channel
            cur = np.cumsum(cur.reshape(width, bpp), axis=0).reshape(-1) % 256
        elif ftype == 2:  # Up
            cur = (cur + prev) % 256
        elif ftype in (3, 4):  # Average, Paeth: sequential
            row, up = cur.tolist(), prev.tolist()
            for x in range(stride):
                a = row[x - bpp] if x >= bpp else 0
                b = up[x]
                if ftype == 3:
                    row[x] = (row[x] + (a + b) // 2) & 255
                else:
                    c = up[x - bpp] if x >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                    row[x] = (row[x] + pred) & 255
            cur = np.array(row, dtype=np.int64)
        img[y] = cur
        prev = cur
    return img.reshape(height, width, bpp)


@pytest.fixture(scope="module")
def chromium() -> str:
    return require_binary("chromium")


def run_chromium(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"chromium-profile-{time.monotonic_ns()}"
    profile.mkdir()
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", *args]
    env = {k: v for k, v in os.environ.items() if not k.endswith("_proxy")}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def rendered(chromium: str, logs: list[Path], tmp_path: Path, fixed_now: None,
             capsys: pytest.CaptureFixture[str]) -> Iterator[tuple[Path, str]]:
    page = html_report(logs, tmp_path, capsys)
    png = tmp_path / "report.png"
    shot = run_chromium(chromium, tmp_path, f"--screenshot={png}", "--window-size=1200,2000",
                        page.as_uri())
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    dom = run_chromium(chromium, tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    yield png, dom.stdout


def test_html_renders_in_chromium(rendered: tuple[Path, str]) -> None:
    png, dom = rendered
    pixels = png_pixels(png.read_bytes())
    assert pixels.shape[:2] == (2000, 1200)
    rgb = pixels[..., :3].astype(np.int32)
    # not blank: rows differ, and many colours are drawn
    flat = rgb.reshape(-1, 3)
    colours = np.unique(flat[:, 0] * 65536 + flat[:, 1] * 256 + flat[:, 2])
    assert len(colours) > 20
    rows_with_ink = int(np.sum(np.any(rgb != rgb[:, :1, :], axis=(1, 2))))
    assert rows_with_ink > 300
    # the SVG bars were painted: the C2 colour (#c62828) covers a block of pixels
    c2 = np.all(np.abs(rgb - np.array([0xC6, 0x28, 0x28])) <= 12, axis=2)
    assert int(c2.sum()) > 500

    assert "2 of 14 devices contacted C2: 192.168.1.23 (QSnatch), 192.168.1.40 (Emotet)" in dom
    assert "QSnatch (12)" in dom
    assert "t2q2r.cf (6)" in dom and "gc9nz.tk (5)" in dom
    assert "2024-05-01T13:05:00.000Z" in dom and "2024-05-02T11:45:12.345Z" in dom
    assert re.search(r"<b>14</b><span>active devices</span>", dom)
    assert re.search(r"<b>1</b><span>malformed lines skipped</span>", dom)
    # the attacker's name is text in the DOM, not elements
    assert "&lt;img src=x onerror=alert(1)&gt;" in dom
    assert "<img" not in dom and "<script" not in dom


def test_png_decoder_on_a_known_image() -> None:
    """The test's own PNG decoder, on an image with every filter type."""
    width, height = 5, 5
    pixels = np.arange(width * height * 3, dtype=np.uint8).reshape(height, width, 3) * 7
    raw = bytearray()
    prev = np.zeros(width * 3, dtype=np.int64)
    for y in range(height):
        ftype = y % 5
        row = pixels[y].reshape(-1).astype(np.int64)
        enc = []
        for x in range(width * 3):
            a = int(row[x - 3]) if x >= 3 else 0
            b = int(prev[x])
            c = int(prev[x - 3]) if x >= 3 else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            paeth = a if pa <= pb and pa <= pc else b if pb <= pc else c
            pred = [0, a, b, (a + b) // 2, paeth][ftype]
            enc.append((int(row[x]) - pred) & 255)
        raw += bytes([ftype, *enc])
        prev = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8,
                                                              2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b""))
    assert np.array_equal(png_pixels(png), pixels)
