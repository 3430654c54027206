"""Golden answers over the wire: the real `moat serve` with an RPZ policy, a real nsd
upstream (harness.EXAMPLE_ZONE), and real clients (dnspython, dig)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from harness.ports import free_port
from harness.scrape import metric, scrape

pytestmark = pytest.mark.integration

SOA = "$TTL 300\n@ SOA ns.rpz.test. hostmaster.rpz.test. 1 3600 600 86400 60\n@ NS ns.rpz.test.\n"

RULES = """
nx.example.test        CNAME .
nodata.example.test    CNAME *.
drop.example.test      CNAME rpz-drop.
tcp.example.test       CNAME rpz-tcp-only.
local.example.test     A     192.0.2.77
local.example.test     TXT   "moat local data"
walled.example.test    CNAME www.example.test.
*.sub.garden.test      CNAME *.wild.example.test.
*.evil.test            CNAME .
ok.evil.test           CNAME rpz-passthru.
"""


def write_rpz(path: Path, rules: str) -> Path:
    path.write_text(SOA + rules)
    return path


def ede_texts(msg) -> list[tuple[int, str]]:
    return [(o.code, o.text or "") for o in msg.options if o.otype == dns.edns.EDE]


@pytest.fixture
def policy_moat(tmp_path, moat, nsd_upstream):
    rpz = write_rpz(tmp_path / "threats.rpz", RULES)
    return moat("--rpz", str(rpz), upstream=nsd_upstream)


def test_nxdomain_rule_answers_nxdomain_with_soa_and_ede(policy_moat):
    r = policy_moat.query("nx.example.test", "A", use_edns=0)
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert [rr.rdtype for rr in r.authority] == [dns.rdatatype.SOA]
    (code, text), = ede_texts(r)
    assert code == 15 and "malware" in text and "threats" in text  # category and source


def test_non_edns_client_gets_no_ede_but_the_same_rcode(policy_moat):
    r = policy_moat.query("nx.example.test", "A", use_edns=False)
    assert r.rcode() == dns.rcode.NXDOMAIN and r.edns < 0


def test_nodata_rule(policy_moat):
    r = policy_moat.query("nodata.example.test", "A")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    assert r.authority and r.authority[0].rdtype == dns.rdatatype.SOA


def test_drop_rule_sends_nothing(policy_moat):
    with pytest.raises(dns.exception.Timeout):
        policy_moat.query("drop.example.test", "A", timeout=1.0)
    assert policy_moat.query("www.example.test").answer  # and moat is fine


def test_tcp_only_rule_truncates_udp_and_answers_tcp(policy_moat):
    r = policy_moat.query("tcp.example.test", "A")
    assert r.flags & dns.flags.TC and not r.answer
    assert r.question[0].name.to_text() == "tcp.example.test."
    r = policy_moat.query("tcp.example.test", "A", tcp=True)
    assert not r.flags & dns.flags.TC
    assert r.rcode() == dns.rcode.NXDOMAIN  # nsd's own answer: the name does not exist


def test_local_data_answers_its_types_and_nodata_for_others(policy_moat):
    r = policy_moat.query("local.example.test", "A")
    assert [rr.to_text() for rr in r.answer[0]] == ["192.0.2.77"]
    r = policy_moat.query("local.example.test", "TXT")
    assert r.answer[0][0].strings == (b"moat local data",)
    r = policy_moat.query("local.example.test", "MX")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer


def test_walled_garden_cname_is_resolved_through_the_upstream(policy_moat):
    r = policy_moat.query("walled.example.test", "A")
    texts = [rrset.to_text() for rrset in r.answer]
    assert "CNAME www.example.test." in texts[0]
    assert any("192.0.2.10" in t for t in texts[1:]), texts


def test_wildcard_cname_target_gets_the_query_name(policy_moat):
    r = policy_moat.query("x.sub.garden.test", "A")
    cname = r.answer[0]
    assert cname.rdtype == dns.rdatatype.CNAME
    assert cname[0].target.to_text() == "x.sub.garden.test.wild.example.test."
    assert any(rr.to_text() == "192.0.2.50" for rrset in r.answer[1:] for rr in rrset)


def test_passthru_hole_and_wildcard(policy_moat):
    assert policy_moat.query("a.evil.test").rcode() == dns.rcode.NXDOMAIN
    r = policy_moat.query("ok.evil.test")  # passthru: nsd's own NXDOMAIN for a foreign zone
    assert r.rcode() in (dns.rcode.REFUSED, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL)
    assert not ede_texts(r)


def test_dig_shows_the_block(policy_moat):
    out = policy_moat.dig("nx.example.test", "A")
    assert "status: NXDOMAIN" in out and "EDE: 15 (Blocked)" in out


def test_cname_cloaking_is_blocked_at_answer_time(tmp_path, moat, nsd_upstream):
    rpz = write_rpz(tmp_path / "cloak.rpz", "www.example.test CNAME .\n")
    m = moat("--rpz", str(rpz), upstream=nsd_upstream)
    r = m.query("alias.example.test", "A")  # alias CNAME www: clean name, blocked target
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert m.query("mail.example.test").answer  # others unaffected


def test_response_ip_trigger_blocks_answers_with_that_address(tmp_path, moat, nsd_upstream):
    rpz = write_rpz(tmp_path / "ip.rpz", "32.10.2.0.192.rpz-ip CNAME *.\n")
    m = moat("--rpz", str(rpz), upstream=nsd_upstream)
    r = m.query("www.example.test", "A")  # www has 192.0.2.10
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    r = m.query("alias.example.test", "A")  # reaching it through a CNAME changes nothing
    assert not r.answer
    assert m.query("mail.example.test").answer[0][0].to_text() == "192.0.2.25"


def test_hosts_list_sinkholes_a_and_aaaa_and_nodata_for_other_types(tmp_path, moat,
                                                                    nsd_upstream):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("0.0.0.0 mail.example.test\n")
    conf = tmp_path / "moat.toml"
    conf.write_text(f"""
[[policy.source]]
name = "phish"
path = "{hosts}"
format = "hosts"
category = "phishing"
""")
    m = moat("--config", str(conf), upstream=nsd_upstream)
    assert m.query("mail.example.test", "A").answer[0][0].to_text() == "0.0.0.0"
    assert m.query("mail.example.test", "AAAA").answer[0][0].to_text() == "::"
    r = m.query("mail.example.test", "MX")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer


def test_cached_answer_is_rechecked_after_a_reload(tmp_path, moat, nsd_upstream):
    rpz = write_rpz(tmp_path / "live.rpz", "nothing.example.test CNAME .\n")
    m = moat("--rpz", str(rpz), upstream=nsd_upstream)
    assert m.query("www.example.test").answer  # now cached
    write_rpz(rpz, "nothing.example.test CNAME .\nwww.example.test CNAME .\n")
    m.signal(signal.SIGHUP)
    m.wait_for_stderr(r"policy version 2 loaded", timeout=10)
    r = m.query("www.example.test")
    assert r.rcode() == dns.rcode.NXDOMAIN  # the cache was not flushed, the policy applies


def test_broken_policy_file_keeps_the_last_good_rules(tmp_path, moat, nsd_upstream):
    rpz = write_rpz(tmp_path / "keep.rpz", "www.example.test CNAME .\n")
    mport = free_port()
    m = moat("--rpz", str(rpz), "--metrics", f"127.0.0.1:{mport}", upstream=nsd_upstream)
    assert m.query("www.example.test").rcode() == dns.rcode.NXDOMAIN
    assert metric(scrape(mport), "moat_policy_reloads_total", result="partial") == 0
    rpz.write_text("<html>this is not a zone</html>\n" * 40)
    m.signal(signal.SIGHUP)
    m.wait_for_stderr(r"serving its last good copy", timeout=10)
    assert m.query("www.example.test").rcode() == dns.rcode.NXDOMAIN
    text = scrape(mport)  # the failure is counted, the rules of the last good copy too
    assert metric(text, "moat_policy_reloads_total", result="partial") == 1
    assert metric(text, "moat_policy_rules", source="keep") == 1


def test_selftest_names_block_by_category(moat, nsd_upstream):
    m = moat(upstream=nsd_upstream)
    for cat in ("malware", "phishing", "c2"):
        r = m.query(f"{cat}.moat.test", "A", use_edns=0)
        assert r.answer[0][0].to_text() == "0.0.0.0"
        (code, text), = ede_texts(r)
        assert code == 15 and cat in text


def test_verdicts_are_logged_with_the_rule_and_client(tmp_path, moat, nsd_upstream):
    rpz = write_rpz(tmp_path / "log.rpz", "nx.example.test CNAME . ; family=QSnatch\n")
    log = tmp_path / "verdicts.jsonl"
    m = moat("--rpz", str(rpz), "--query-log", str(log), upstream=nsd_upstream)
    m.query("nx.example.test")
    m.query("www.example.test")  # allowed: not a verdict, not logged by default
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (log.exists() and log.read_text().strip()):
        time.sleep(0.1)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert line["qname"] == "nx.example.test" and line["action"] == "nxdomain"
    assert line["client"] == "127.0.0.1" and line["family"] == "QSnatch"
    assert line["rule"] == "nx.example.test CNAME . ; family=QSnatch"
    assert line["where"].endswith("log.rpz:4") and line["rcode"] == "NXDOMAIN"
    assert line["ts"].endswith("Z") and line["source"] == "log"


def test_reload_of_a_large_policy_loses_no_query(tmp_path, moat, nsd_upstream):
    """Queries keep flowing while a 200k-rule policy is rebuilt and swapped three times."""
    rpz = tmp_path / "big.rpz"
    rpz.write_text(SOA + "".join(f"n{i}.blocked.test CNAME .\n" for i in range(200000)))
    m = moat("--rpz", str(rpz), upstream=nsd_upstream, ready_timeout=60)
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def client() -> None:
        i = 0
        while not stop.is_set() and i < 20000:
            i += 1
            name = "www.example.test" if i % 2 else f"n{i % 1000}.blocked.test"
            try:
                r = m.query(name, timeout=2.0)
            except dns.exception.Timeout:
                failures.append(f"timeout {name}")
                continue
            expect = dns.rcode.NOERROR if i % 2 else dns.rcode.NXDOMAIN
            if r.rcode() != expect:
                failures.append(f"{name}: {dns.rcode.to_text(r.rcode())}")
            answered[0] += 1

    t = threading.Thread(target=client)
    t.start()
    try:
        for version in (2, 3, 4):
            m.signal(signal.SIGHUP)
            m.wait_for_stderr(rf"policy version {version} loaded", timeout=60)
    finally:
        stop.set()
        t.join(timeout=30)
    assert not failures, failures[:10]
    assert answered[0] > 100


def test_no_query_is_answered_before_the_policy_is_loaded(tmp_path, moat, nsd_upstream):
    """A client that asks from the moment moat starts (a Pi rebooting while the house
    is online) never gets an unprotected answer: the listeners open after the policy
    has loaded, even when that takes a while."""
    rpz = tmp_path / "big.rpz"
    rpz.write_text(SOA + "www.example.test CNAME .\n" +
                   "".join(f"n{i}.filler.test CNAME .\n" for i in range(300000)))
    port = free_port()
    answers: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        q = dns.message.make_query("www.example.test", "A")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(0.005)
        try:
            while not stop.is_set() and len(answers) < 1000:
                sock.sendto(q.to_wire(), ("127.0.0.1", port))
                try:
                    answers.append(dns.message.from_wire(sock.recv(4096)).rcode())
                except (TimeoutError, ConnectionRefusedError):
                    pass
        finally:
            sock.close()

    t = threading.Thread(target=poll)
    t.start()
    try:
        m = moat("--rpz", str(rpz), listen=f"127.0.0.1:{port}", upstream=nsd_upstream,
                 ready_timeout=60)
        deadline = time.monotonic() + 5
        while not answers and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        t.join(timeout=10)
    assert answers and set(answers) == {dns.rcode.NXDOMAIN}, answers[:20]
    assert "policy version 1 loaded" in m.stderr_text()


def test_a_long_list_is_read_in_two_halves_at_start_with_lines_kept(tmp_path, moat,
                                                                     nsd_upstream):
    # 160k plain lines (5 MB): the first build checks the two halves of the list in two
    # processes; a broken line in the second half is reported with its line, and names on
    # both sides of the middle and after the broken line are blocked with their own line
    n = 160_000
    lines = [f"h{i}.list-{i % 97}.test CNAME ." for i in range(n)]
    lines[120_000] = "broken..list.test CNAME ."
    rpz = write_rpz(tmp_path / "long.rpz", "\n".join(lines) + "\n")
    log = tmp_path / "verdicts.jsonl"
    m = moat("--rpz", str(rpz), "--query-log", str(log), upstream=nsd_upstream)
    m.wait_for_stderr(rf"long\.rpz:{120_000 + 4}: owner 'broken\.\.list\.test'", timeout=10)
    probes = (0, 79_999, 80_000, 119_999, 120_001, n - 1)
    for i in probes:
        assert m.query(f"h{i}.list-{i % 97}.test").rcode() == dns.rcode.NXDOMAIN, i
    assert m.query("www.example.test").answer  # not listed: answered
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and \
            len(log.read_text().splitlines() if log.exists() else []) < len(probes):
        time.sleep(0.1)
    wheres = [json.loads(x)["where"] for x in log.read_text().splitlines()]
    assert wheres == [f"{rpz}:{i + 4}" for i in probes]
