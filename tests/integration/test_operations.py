"""What a person operating moat does: start it as root on port 53 (it must drop to an
unprivileged user), ask `moat check` why a name is blocked, try a feed in shadow mode
(log-only), and rely on list files being picked up when they change. Real `moat`
processes, a real nsd upstream, real clients."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest
from harness import REPO_ROOT
from harness.ports import free_port, is_port_free
from harness.scrape import metric, scrape
from harness.waiting import wait_for

pytestmark = pytest.mark.integration

SOA = "$TTL 300\n@ SOA ns.rpz.test. hostmaster.rpz.test. 1 3600 600 86400 60\n@ NS ns.rpz.test.\n"


def proc_ids(pid: int) -> tuple[list[int], list[int], int]:
    """(real/effective/saved/fs uids, the same gids, CapEff) of a running process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return ([int(x) for x in fields["Uid"].split()], [int(x) for x in fields["Gid"].split()],
            int(fields["CapEff"].strip(), 16))


# --- privileges ------------------------------------------------------------------------


def test_started_as_root_it_binds_port_53_then_drops_to_an_unprivileged_user(
        moat, nsd_upstream, tmp_path) -> None:
    """The Raspberry Pi without systemd: `sudo moat serve` binds 53 and then runs as
    nobody (no capabilities left), still answering and still able to write its state."""
    if os.geteuid() != 0:
        pytest.skip("needs root (CI runs as root)")
    host = "127.0.0.153"
    if not is_port_free(53, host):
        pytest.skip(f"{host}:53 is in use on this machine")
    nobody = pwd.getpwnam("nobody")
    m = moat("--user", "nobody", listen=f"{host}:53", upstream=nsd_upstream)
    uids, gids, caps = proc_ids(m.pid)
    assert uids == [nobody.pw_uid] * 4 and gids == [nobody.pw_gid] * 4, (uids, gids)
    assert caps == 0
    assert "dropped privileges to user nobody" in m.stderr_text()
    q = dns.message.make_query("www.example.test", "A")
    r = dns.query.udp(q, host, port=53, timeout=3)
    assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].to_text() == "192.0.2.10"
    r = dns.query.tcp(dns.message.make_query("c2.moat.test", "A"), host, port=53, timeout=3)
    assert r.answer[0][0].to_text() == "0.0.0.0"  # the self-test still protects
    assert os.stat(m.state_dir).st_uid == nobody.pw_uid  # feed copies stay writable


# --- moat check ----------------------------------------------------------------------------


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "resolver", "check", *args],
                          capture_output=True, text=True, timeout=60, env=env, cwd=REPO_ROOT)


def test_moat_check_says_why_a_name_is_blocked(tmp_path) -> None:
    rpz = tmp_path / "c2.rpz"
    rpz.write_text(SOA + "nas-c2.example CNAME . ; family=QSnatch\n"
                   "*.dga.example CNAME *.\n"
                   "32.7.2.0.192.rpz-client-ip CNAME rpz-drop.\n"
                   "local.example TXT \"kept\"\n")
    cfg = tmp_path / "moat.toml"
    cfg.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
                   "[[policy.source]]\n"
                   f'name = "c2-feed"\ncategory = "c2"\npath = "{rpz}"\n')
    r = run_check("NAS-C2.example.", "--config", str(cfg))
    assert r.returncode == 1, r  # blocked: non-zero, for scripts
    assert "nas-c2.example A: NXDOMAIN" in r.stdout
    assert "category: c2" in r.stdout and "family: QSnatch" in r.stdout
    assert "source:   c2-feed" in r.stdout
    assert "rule:     nas-c2.example CNAME . ; family=QSnatch" in r.stdout
    assert f"where:    {rpz}:4" in r.stdout
    r = run_check("x.y.dga.example", "--config", str(cfg), "--json")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["verdict"]["action"] == "nodata" and out["verdict"]["trigger"] == "wildcard"
    assert out["verdict"]["rule"] == "*.dga.example CNAME *."
    r = run_check("www.example", "--config", str(cfg))
    assert r.returncode == 0 and "www.example A: allowed" in r.stdout
    # the client matters (rpz-client-ip), and so does the qtype (local data)
    r = run_check("www.example", "--config", str(cfg), "--client", "192.0.2.7")
    assert r.returncode == 1 and "DROP" in r.stdout and "client-ip" in r.stdout
    r = run_check("local.example", "--config", str(cfg), "--qtype", "TXT", "--json")
    assert json.loads(r.stdout)["verdict"]["action"] == "local-data"
    r = run_check("local.example", "--config", str(cfg), "--qtype", "BOGUS")
    assert r.returncode == 2 and "unknown qtype" in r.stderr


# --- shadow mode on the wire ---------------------------------------------------------------


def test_log_only_source_answers_normally_but_logs_and_counts(moat, nsd_upstream,
                                                              tmp_path) -> None:
    """Trying a new feed: its matches are logged and counted, the answer is the normal
    one (and a later enforcing source still blocks)."""
    (tmp_path / "trial.txt").write_text("www.example.test\nmail.example.test\n")
    (tmp_path / "enforced.rpz").write_text(SOA + "mail.example.test CNAME .\n")
    log = tmp_path / "verdicts.jsonl"
    mport = free_port()
    cfg = tmp_path / "moat.toml"
    cfg.write_text(f'[log]\nquery_log = "{log}"\n[metrics]\nlisten = "127.0.0.1:{mport}"\n'
                   "[[policy.source]]\n"
                   f'name = "trial"\ncategory = "phishing"\npath = "{tmp_path / "trial.txt"}"\n'
                   'action = "log-only"\n'
                   "[[policy.source]]\n"
                   f'name = "enforced"\npath = "{tmp_path / "enforced.rpz"}"\n')
    m = moat("--config", str(cfg), upstream=nsd_upstream)
    for _ in range(3):
        r = m.query("www.example.test", "A")
        assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].to_text() == "192.0.2.10"
    assert m.query("mail.example.test", "A").rcode() == dns.rcode.NXDOMAIN
    lines = wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 4 and
                     [json.loads(x) for x in log.read_text().splitlines()], timeout=10,
                     what="4 lines")
    www = [x for x in lines if x["qname"] == "www.example.test"]
    assert len(www) == 3 and {x["action"] for x in www} == {"log-only"}
    assert {x["rcode"] for x in www} == {"NOERROR"} and www[0]["source"] == "trial"
    mail = [x for x in lines if x["qname"] == "mail.example.test"]
    assert [(x["action"], x["source"]) for x in mail] == [("nxdomain", "enforced")]
    text = scrape(mport)
    assert metric(text, "moat_policy_hits_total", action="log-only", source="trial") == 3


# --- reloads without SIGHUP ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["watch", "reload_interval"])
def test_a_changed_list_file_is_picked_up_without_a_signal(moat, nsd_upstream, tmp_path,
                                                           how: str) -> None:
    lst = tmp_path / "list.txt"
    lst.write_text("first.example.test\n")
    cfg = tmp_path / "moat.toml"
    cfg.write_text(f'[policy]\n{how} = "1s"\n'
                   f'[[policy.source]]\nname = "home"\npath = "{lst}"\n')
    m = moat("--config", str(cfg), upstream=nsd_upstream)
    assert m.query("first.example.test", "A").answer[0][0].to_text() == "0.0.0.0"
    assert m.query("www.example.test", "A").answer[0][0].to_text() == "192.0.2.10"
    lst.write_text("first.example.test\nwww.example.test\n")
    wait_for(lambda: m.query("www.example.test", "A").answer[0][0].to_text() == "0.0.0.0",
             timeout=15, what="the new list line to take effect")
    assert "policy version 2 loaded" in m.stderr_text()


# --- one rewrite per response ----------------------------------------------------------------


def test_walled_garden_target_is_resolved_without_applying_policy_again(
        moat, nsd_upstream, tmp_path) -> None:
    """The garden host may itself be listed (a block page on a name the same feed
    blocks): the rewrite happens once, the garden's answer is not checked again."""
    rpz = tmp_path / "garden.rpz"
    rpz.write_text(SOA + "walled.example.test CNAME mail.example.test.\n"
                   "mail.example.test CNAME .\n")
    m = moat("--rpz", str(rpz), upstream=nsd_upstream)
    assert m.query("mail.example.test", "A").rcode() == dns.rcode.NXDOMAIN
    for _ in range(2):  # the second answer comes from the cache
        r = m.query("walled.example.test", "A")
        assert r.rcode() == dns.rcode.NOERROR, r
        texts = [rrset.to_text() for rrset in r.answer]
        assert "CNAME mail.example.test." in texts[0], texts
        assert any("192.0.2.25" in t for t in texts[1:]), texts
