"""The policy engine's semantics, as tables: policy text, a query, the expected verdict.

Each case builds a real policy (policy.build.build_policy) from RPZ or list text written
to files, so parsing, indexing and precedence are exercised together.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from policy.build import build_policy
from policy.rules import Action, Trigger
from policy.settings import CategorySettings, PolicySettings, SourceSettings

SOA = "$TTL 300\n@ SOA ns.rpz.test. hostmaster.rpz.test. 1 3600 600 86400 60\n@ NS ns.rpz.test.\n"
A, AAAA, TXT, MX, CNAME = 1, 28, 16, 15, 5


def make_policy(tmp_path: Path, *sources: tuple[str, str, dict], selftest: bool = False,
                **policy_kw: object):
    """sources: (name, text, settings overrides); text is written to a file per source."""
    settings = []
    for name, text, kw in sources:
        fmt = kw.pop("format", "rpz")
        path = tmp_path / f"{name}.{fmt}"
        body = textwrap.dedent(text)
        if fmt == "rpz":
            body = SOA + body
        path.write_text(body)
        settings.append(SourceSettings(name=name, path=str(path), format=fmt, **kw))
    policy, report = build_policy(PolicySettings(sources=tuple(settings), selftest=selftest,
                                                 **policy_kw), 7)  # type: ignore[arg-type]
    return policy, report


def check(policy, name: str, qtype: int = A, client: str = "192.0.2.200"):
    return policy.check_query(name, qtype, client)


# --- QNAME triggers and actions -----------------------------------------------------

QNAME_CASES = [
    # (rpz rules, query name, expected action or None, expected trigger)
    ("bad.test CNAME .", "bad.test", Action.NXDOMAIN, Trigger.QNAME),
    ("bad.test CNAME .", "www.bad.test", None, None),  # exact only, as in RPZ
    ("bad.test CNAME .", "notbad.test", None, None),
    ("*.bad.test CNAME .", "www.bad.test", Action.NXDOMAIN, Trigger.WILDCARD),
    ("*.bad.test CNAME .", "a.b.c.bad.test", Action.NXDOMAIN, Trigger.WILDCARD),
    ("*.bad.test CNAME .", "bad.test", None, None),  # the wildcard does not cover its parent
    ("bad.test CNAME *.", "bad.test", Action.NODATA, Trigger.QNAME),
    ("bad.test CNAME rpz-drop.", "bad.test", Action.DROP, Trigger.QNAME),
    ("bad.test CNAME rpz-tcp-only.", "bad.test", Action.TCP_ONLY, Trigger.QNAME),
    ("bad.test CNAME rpz-passthru.", "bad.test", Action.PASSTHRU, Trigger.QNAME),
    ("bad.test A 192.0.2.53", "bad.test", Action.LOCAL_DATA, Trigger.QNAME),
    ("bad.test CNAME garden.example.", "bad.test", Action.LOCAL_DATA, Trigger.QNAME),
    # exact beats wildcard
    ("*.ex.test CNAME .\nwww.ex.test CNAME *.", "www.ex.test", Action.NODATA, Trigger.QNAME),
    # the longest (closest) wildcard wins
    ("*.ex.test CNAME .\n*.sub.ex.test CNAME *.", "a.sub.ex.test", Action.NODATA,
     Trigger.WILDCARD),
    ("*.ex.test CNAME .\n*.sub.ex.test CNAME *.", "a.other.ex.test", Action.NXDOMAIN,
     Trigger.WILDCARD),
    # a PASSTHRU hole below a blocked subtree
    ("*.bad.test CNAME .\nok.bad.test CNAME rpz-passthru.", "ok.bad.test", Action.PASSTHRU,
     Trigger.QNAME),
    ("*.bad.test CNAME .\nok.bad.test CNAME rpz-passthru.", "no.bad.test", Action.NXDOMAIN,
     Trigger.WILDCARD),
    # names are compared case-insensitively (the resolver hands over lower case)
    ("MixedCase.Test CNAME .", "mixedcase.test", Action.NXDOMAIN, Trigger.QNAME),
    # a whole TLD by wildcard
    ("*.zip CNAME .", "anything.zip", Action.NXDOMAIN, Trigger.WILDCARD),
]


@pytest.mark.parametrize("rules,name,action,trigger", QNAME_CASES)
def test_qname_triggers_and_actions(tmp_path, rules, name, action, trigger):
    policy, report = make_policy(tmp_path, ("feed", rules, {}))
    assert report.sources[0].problem_count == 0, report.sources[0].problems
    verdict = check(policy, name)
    if action is None:
        assert verdict is None
    else:
        assert verdict is not None, f"{name} should match"
        assert (verdict.action, verdict.trigger) == (action, trigger)
        assert verdict.source == "feed"
        assert verdict.policy_version == 7


def test_local_data_answers_its_types(tmp_path):
    policy, _ = make_policy(tmp_path, ("feed", """
        sink.test A 192.0.2.53
        sink.test AAAA 2001:db8::53
        txt.test TXT "listed for phishing"
        garden.test CNAME *.walled.example.
    """, {}))
    v = check(policy, "sink.test")
    assert v.action == Action.LOCAL_DATA
    types = sorted(r.rtype for r in v.local_data)
    assert types == [A, AAAA]  # a multi-RR rule: both records belong to one rule
    v = check(policy, "txt.test", TXT)
    assert [r.rtype for r in v.local_data] == [TXT]
    v = check(policy, "garden.test")
    assert v.local_data[0].wildcard_target == "walled.example"


# --- precedence -----------------------------------------------------------------------


def test_first_source_with_a_match_wins_even_by_wildcard(tmp_path):
    policy, _ = make_policy(tmp_path, ("first", "*.ex.test CNAME *.", {}),
                            ("second", "www.ex.test CNAME .", {}))
    v = check(policy, "www.ex.test")
    assert (v.source, v.action) == ("first", Action.NODATA)


def test_passthru_in_an_earlier_source_is_an_allow_hole(tmp_path):
    policy, _ = make_policy(tmp_path, ("allow", "safe.bad.test CNAME rpz-passthru.", {}),
                            ("block", "*.bad.test CNAME .", {}))
    assert check(policy, "safe.bad.test").action == Action.PASSTHRU
    assert check(policy, "evil.bad.test").action == Action.NXDOMAIN


def test_log_only_source_is_shadow_mode(tmp_path):
    policy, _ = make_policy(tmp_path, ("trial", "a.test CNAME .\nb.test CNAME .",
                                       {"action": "log-only"}),
                            ("real", "b.test CNAME *.", {}))
    v = check(policy, "a.test")
    assert (v.action, v.source) == (Action.LOG_ONLY, "trial")  # recorded, answered normally
    v = check(policy, "b.test")  # the later enforcing source still applies
    assert (v.action, v.source) == (Action.NODATA, "real")


def test_action_override_keeps_passthru(tmp_path):
    policy, _ = make_policy(tmp_path, ("feed", """
        bad.test A 192.0.2.53
        ok.test CNAME rpz-passthru.
    """, {"action": "nxdomain"}))
    assert check(policy, "bad.test").action == Action.NXDOMAIN
    assert check(policy, "ok.test").action == Action.PASSTHRU


def test_client_ip_beats_qname_within_a_source(tmp_path):
    policy, _ = make_policy(tmp_path, ("feed", """
        32.10.2.0.192.rpz-client-ip CNAME rpz-drop.
        bad.test CNAME .
    """, {}))
    assert policy.client_dependent
    v = check(policy, "bad.test", client="192.0.2.10")
    assert (v.action, v.trigger) == (Action.DROP, Trigger.CLIENT_IP)
    v = check(policy, "bad.test", client="192.0.2.11")
    assert (v.action, v.trigger) == (Action.NXDOMAIN, Trigger.QNAME)
    v = check(policy, "good.test", client="192.0.2.10")
    assert v.action == Action.DROP  # a client-IP trigger applies to every name


def test_response_ip_longest_prefix_and_ipv6(tmp_path):
    policy, _ = make_policy(tmp_path, ("feed", """
        24.0.113.0.203.rpz-ip CNAME .
        32.7.113.0.203.rpz-ip CNAME *.
        48.zz.db8.2001.rpz-ip CNAME .
    """, {}))
    v = policy.check_answer([], ["203.0.113.9"], A, "192.0.2.1")
    assert (v.action, v.trigger) == (Action.NXDOMAIN, Trigger.RESPONSE_IP)
    assert policy.check_answer([], ["203.0.113.7"], A, "192.0.2.1").action == Action.NODATA
    assert policy.check_answer([], ["203.0.114.7"], A, "192.0.2.1") is None
    v = policy.check_answer([], ["2001:db8:0:1::5"], AAAA, "192.0.2.1")
    assert v is not None and v.action == Action.NXDOMAIN
    assert policy.check_answer([], ["2001:db9::5"], AAAA, "192.0.2.1") is None


def test_cname_cloaking_is_caught_in_the_answer(tmp_path):
    policy, _ = make_policy(tmp_path, ("feed", "*.tracker.test CNAME .", {}))
    assert check(policy, "metrics.shop.test") is None  # the query name is clean
    v = policy.check_answer(["x1.tracker.test"], ["192.0.2.1"], A, "192.0.2.1")
    assert v.action == Action.NXDOMAIN and v.matched == "x1.tracker.test"


def test_answer_time_precedence_qname_before_response_ip_in_one_source(tmp_path):
    policy, _ = make_policy(tmp_path, ("feed", """
        24.0.113.0.203.rpz-ip CNAME *.
        cdn.bad.test CNAME .
    """, {}))
    v = policy.check_answer(["cdn.bad.test"], ["203.0.113.9"], A, "192.0.2.1")
    assert v.trigger == Trigger.QNAME and v.action == Action.NXDOMAIN


# --- what a verdict tells a person -----------------------------------------------------


def test_verdict_names_the_rule_as_written_and_its_line(tmp_path):
    policy, _ = make_policy(tmp_path, ("urlhaus", """
        ; a comment
        good.test CNAME rpz-passthru.
        Evil-Host.test CNAME . ; Malware download (2024-11-26)
    """, {"category": "malware", "family": "Emotet"}))
    v = check(policy, "evil-host.test")
    assert v.category == "malware" and v.family == "Emotet" and v.source == "urlhaus"
    assert str(v.rule) == "Evil-Host.test CNAME . ; Malware download (2024-11-26)"
    path = tmp_path / "urlhaus.rpz"
    line = path.read_text().splitlines().index(str(v.rule)) + 1
    assert v.where == f"{path}:{line}"


def test_family_from_the_feed_overrides_the_source_family(tmp_path):
    policy, _ = make_policy(tmp_path, ("dga", """
        t2q2r.cf CNAME . ; family=QSnatch category=c2
        uammskmq.org CNAME . ; family=Pykspa category=c2
        plain.test CNAME .
    """, {"category": "c2", "family": "unknown-dga"}))
    assert check(policy, "t2q2r.cf").family == "QSnatch"
    assert check(policy, "uammskmq.org").family == "Pykspa"
    assert check(policy, "plain.test").family == "unknown-dga"


# --- plain lists, sinkholes, keywords ------------------------------------------------------


def test_plain_lists_get_the_default_action_and_category_sinkholes(tmp_path):
    policy, _ = make_policy(
        tmp_path,
        ("phish", "0.0.0.0 login-examplebank.test\n", {"format": "hosts", "category": "phishing"}),
        ("c2", "||gate.loader-c2.test^\n", {"format": "adblock", "category": "c2"}),
        categories={"phishing": CategorySettings(sinkhole_ipv4=("192.0.2.80",))})
    v = check(policy, "login-examplebank.test")
    assert v.action == Action.SINKHOLE and v.sinkhole_v4 == ("192.0.2.80",)
    assert check(policy, "www.login-examplebank.test") is None  # hosts files are exact
    v = check(policy, "x.gate.loader-c2.test")  # AdBlock || covers the subtree
    assert v.action == Action.SINKHOLE and v.sinkhole_v4 == ("0.0.0.0",)


def test_keyword_rule_spares_the_brands_own_domains(tmp_path):
    settings = PolicySettings(selftest=False, sources=(SourceSettings(
        name="brand", category="phishing", keywords=("examplebank",),
        keywords_unless_under=("examplebank.com",)),))
    policy, _ = build_policy(settings, 1)
    assert check(policy, "examplebank-login.secure-verify.test").trigger == Trigger.PATTERN
    assert check(policy, "www.examplebank.com") is None
    assert check(policy, "examplebank.com") is None
    assert check(policy, "unrelated.test") is None


def test_selftest_names_are_blocked_in_their_category():
    policy, _ = build_policy(PolicySettings(), 1)
    for cat in ("malware", "phishing", "c2"):
        v = check(policy, f"{cat}.moat.test")
        assert v.category == cat and v.action == Action.SINKHOLE
        assert check(policy, f"sub.{cat}.moat.test").category == cat
    assert check(policy, "other.moat.test") is None


# --- bad input never costs the rest ---------------------------------------------------------


def test_broken_line_is_reported_with_file_and_line_and_skipped(tmp_path):
    policy, report = make_policy(tmp_path, ("feed", """
        one.test CNAME .
        bad owner.test CNAME .
        two.test CNAME .
    """, {}))
    src = report.sources[0]
    assert src.problem_count == 1
    assert src.problems[0].startswith(f"{tmp_path / 'feed.rpz'}:")
    assert check(policy, "one.test") is not None and check(policy, "two.test") is not None


def test_nsdname_and_nsip_are_counted_as_unsupported(tmp_path):
    _, report = make_policy(tmp_path, ("feed", """
        ns.bad.test.rpz-nsdname CNAME .
        32.1.51.100.198.rpz-nsip CNAME .
        ok.test CNAME .
    """, {}))
    src = report.sources[0]
    assert sum(src.unsupported.values()) == 2
    assert src.rules == 1
    # never silently: the start-up log says what was skipped (resolver/app.py log_report)
    import logging

    from resolver.app import log_report

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("moat")
    logger.addHandler(handler)
    try:
        log_report(report, "start", 0.1)
    finally:
        logger.removeHandler(handler)
    warned = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("feed" in w and "not supported" in w for w in warned), warned


def test_a_verdict_is_immutable(tmp_path):
    policy, _ = make_policy(tmp_path, ("feed", "bad.test CNAME .\n", {}))
    v = check(policy, "bad.test")
    with pytest.raises(AttributeError):
        v.action = Action.PASSTHRU  # type: ignore[misc]
    assert not hasattr(v, "__dict__") and hash(v) == hash(check(policy, "bad.test"))


def test_failed_source_serves_its_last_good_copy(tmp_path):
    state = tmp_path / "state"
    path = tmp_path / "list.txt"
    path.write_text("evil.test\n")
    settings = PolicySettings(selftest=False, sources=(
        SourceSettings(name="l", path=str(path), format="domains"),))
    policy, report = build_policy(settings, 1, str(state))
    assert report.sources[0].status == "loaded" and check(policy, "evil.test") is not None
    path.write_text("<html><body>502 Bad Gateway</body></html>\n" * 30)  # not a list
    policy, report = build_policy(settings, 2, str(state))
    assert report.sources[0].status == "last-good"
    assert check(policy, "evil.test") is not None
    path.unlink()
    policy, report = build_policy(settings, 3, str(state))
    assert report.sources[0].status == "last-good" and check(policy, "evil.test") is not None


def test_a_source_that_never_loaded_does_not_stop_the_others(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("evil.test\n")
    settings = PolicySettings(selftest=False, sources=(
        SourceSettings(name="missing", path=str(tmp_path / "nope.txt"), format="domains"),
        SourceSettings(name="good", path=str(good), format="domains")))
    policy, report = build_policy(settings, 1)
    assert [s.status for s in report.sources] == ["failed", "loaded"]
    assert "cannot read" in report.sources[0].error
    assert check(policy, "evil.test").source == "good"


def test_memo_references_expand_to_the_verdicts_check_query_gives(tmp_path):
    """The resolver memoises most blocked names as compact references
    (Policy.check_query_ref); expanded with verdict_of they must be the very verdict
    check_query gives: action, trigger, category, family, rule as written, line, local
    data, shadow mode, precedence."""
    policy, report = make_policy(
        tmp_path,
        ("shadow", "*.shadow.test CNAME .\n", {"action": "log-only"}),
        ("c2", """
            nas.c2.test CNAME . ; family=QSnatch
            *.dga.test CNAME *.
            ok.dga.test CNAME rpz-passthru.
            local.test A 192.0.2.7
            local.test TXT "hi"
            both.test CNAME .
            """, {"category": "c2", "family": "Pykspa"}),
        ("later", "both.test CNAME *.\n", {"category": "malware"}),
        ("list", "bank-login.example\n", {"format": "domains", "category": "phishing"}))
    assert report.ok and report.rules == 8, report  # local.test A + TXT: one rule
    deep = "a." * 70 + "dga.test"  # deeper than a reference records: a Verdict
    names = ["nas.c2.test", "x.y.dga.test", "ok.dga.test", "local.test", "a.shadow.test",
             "both.test", "bank-login.example", "clean.example", deep]
    refs = 0
    for name in names:
        for qtype in (A, AAAA, TXT):
            want = check(policy, name, qtype)
            got = policy.check_query_ref(name, qtype, "192.0.2.200")
            if isinstance(got, int):
                refs += 1
                got = policy.verdict_of(got, name)
            assert got == want, (name, qtype)
            if want is not None:
                assert (str(got.rule), got.where, got.local_data, got.matched) == \
                    (str(want.rule), want.where, want.local_data, want.matched)
    assert check(policy, deep).trigger == Trigger.WILDCARD
    assert not isinstance(policy.check_query_ref(deep, A, "192.0.2.200"), int)
    # nas, x.y.dga, local, a.shadow, bank-login: one rule each; ok.dga and both.test: a
    # rule of c2 (the first enforcing source) on the name itself, so the lookup stops
    # there; clean.example has none; deep is deeper than a reference records
    assert refs == 7 * 3


PRECEDENCE_CASES = [
    # (first source, second source, query, expected (source, action), the same with the
    # first source in shadow mode (log-only))
    # the first source's rule on the name itself: nothing can beat it
    ("www.ex.test CNAME .", "*.ex.test CNAME *.", "www.ex.test", ("one", Action.NXDOMAIN),
     ("two", Action.NODATA)),
    # the second source's rule on the name itself loses to the first's wildcard above it
    ("*.ex.test CNAME *.", "www.ex.test CNAME .", "www.ex.test", ("one", Action.NODATA),
     ("two", Action.NXDOMAIN)),
    ("*.test CNAME *.", "www.ex.test CNAME .", "www.ex.test", ("one", Action.NODATA),
     ("two", Action.NXDOMAIN)),
    # an allowlist entry in the first source on a parent
    ("*.ex.test CNAME rpz-passthru.", "www.ex.test CNAME .", "www.ex.test",
     ("one", Action.PASSTHRU), ("two", Action.NXDOMAIN)),
    # the first source's exact rule does not cover names below it
    ("ex.test CNAME .", "*.ex.test CNAME *.", "www.ex.test", ("two", Action.NODATA),
     ("two", Action.NODATA)),
    ("ex.test CNAME .", "*.ex.test CNAME *.", "ex.test", ("one", Action.NXDOMAIN),
     ("one", Action.LOG_ONLY)),
]


@pytest.mark.parametrize("first,second,name,want,want_shadow", PRECEDENCE_CASES)
@pytest.mark.parametrize("first_log_only", [False, True])
def test_lookup_stops_only_where_nothing_can_take_precedence(
        tmp_path, first, second, name, want, want_shadow, first_log_only):
    """A lookup stops at a rule on the name itself from the first enforcing source (it
    wins over every other name rule); anywhere else every parent is still looked up.
    With the first source in shadow mode, the second is the first enforcing one."""
    policy, _ = make_policy(tmp_path,
                            ("one", first, {"action": "log-only"} if first_log_only else {}),
                            ("two", second, {}))
    v = check(policy, name)
    assert (v.source, v.action) == (want_shadow if first_log_only else want)
    ref = policy.check_query_ref(name, A, "192.0.2.200")
    if isinstance(ref, int):
        ref = policy.verdict_of(ref, name)
    assert ref == v


@pytest.mark.parametrize("override,action", [("sinkhole", Action.SINKHOLE),
                                             ("nodata", Action.NODATA),
                                             ("nxdomain", Action.NXDOMAIN),
                                             ("drop", Action.DROP),
                                             ("tcp-only", Action.TCP_ONLY)])
def test_action_override_applies_to_every_rule_of_the_source(tmp_path, override, action):
    policy, _ = make_policy(tmp_path, ("feed", """
        nx.test CNAME .
        local.test A 192.0.2.53
        *.wild.test CNAME *.
    """, {"action": override}))
    for name in ("nx.test", "local.test", "a.wild.test"):
        assert check(policy, name).action == action, name


def test_sinkhole_addresses_per_source_beat_per_category_beat_the_default(tmp_path):
    """An operator points each category (or one feed) at its own block page."""
    policy, _ = make_policy(
        tmp_path,
        ("own", "a.test\n", {"format": "domains", "category": "phishing",
                             "sinkhole_ipv4": ("192.0.2.1",), "sinkhole_ipv6": ("2001:db8::1",)}),
        ("cat", "b.test\n", {"format": "domains", "category": "phishing"}),
        ("plain", "c.test\n", {"format": "domains", "category": "malware"}),
        categories={"phishing": CategorySettings(sinkhole_ipv4=("192.0.2.80",),
                                                 sinkhole_ipv6=("2001:db8::80",))},
        sinkhole_ipv4=("192.0.2.99",), sinkhole_ipv6=("2001:db8::99",))
    got = {n: (check(policy, n).sinkhole_v4, check(policy, n).sinkhole_v6)
           for n in ("a.test", "b.test", "c.test")}
    assert got == {"a.test": (("192.0.2.1",), ("2001:db8::1",)),
                   "b.test": (("192.0.2.80",), ("2001:db8::80",)),
                   "c.test": (("192.0.2.99",), ("2001:db8::99",))}
