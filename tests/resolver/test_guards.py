"""The access list and the rate limiter as tables: who is served by default, which
clients share a bucket, and what a flood gets (TC=1 on every Nth over-limit answer).
The wire-level behaviour is in tests/integration/test_protection.py."""

from __future__ import annotations

import pytest

from resolver.acl import AccessList
from resolver.ratelimit import ADMIT, DROP, SLIP, RateLimiter, RateLimitSettings

DEFAULT_SERVED = [
    "127.0.0.1", "127.8.9.10",  # loopback
    "10.1.2.3", "172.16.0.1", "172.31.255.254", "192.168.1.20",  # RFC 1918
    "100.64.0.1", "100.127.255.254",  # shared address space (CGNAT)
    "169.254.10.20",  # link-local
    "::1", "fd12:3456::1", "fc00::1", "fe80::1", "fe80::1%eth0",  # IPv6 loopback, ULA, LL
    "::ffff:192.168.1.20",  # an IPv4 client on a dual-stack socket
]
DEFAULT_REFUSED = [
    "8.8.8.8", "1.1.1.1", "172.32.0.1", "172.15.255.255", "100.128.0.1", "100.63.255.255",
    "192.169.0.1", "11.0.0.1", "2001:db8::1", "2a00:1450::1", "::ffff:8.8.8.8",
    "not-an-address", "",
]


@pytest.mark.parametrize("host", DEFAULT_SERVED)
def test_default_acl_serves_home_and_office_networks(host: str) -> None:
    assert AccessList().allows(host)


@pytest.mark.parametrize("host", DEFAULT_REFUSED)
def test_default_acl_refuses_everyone_else(host: str) -> None:
    acl = AccessList()
    assert not acl.allows(host)
    assert not acl.allows(host)  # memoised, same answer


def test_configured_acl_replaces_the_default_and_wide_open_is_noticed() -> None:
    acl = AccessList(("192.0.2.0/24",))
    assert acl.allows("192.0.2.77") and not acl.allows("10.0.0.1")
    assert not acl.wide_open and not AccessList().wide_open
    assert AccessList(("0.0.0.0/0", "::/0")).wide_open


def flood(rl: RateLimiter, host: str, n: int, now: float = 100.0) -> list[int]:
    return [rl.check(host, now) for _ in range(n)]


def test_clients_in_one_ipv4_24_share_a_bucket_and_the_next_24_does_not() -> None:
    rl = RateLimiter(RateLimitSettings(rate=1.0, burst=10.0, exempt=()))
    assert flood(rl, "192.0.2.1", 10) == [ADMIT] * 10
    assert rl.check("192.0.2.200", 100.0) != ADMIT  # same /24: the bucket is empty
    assert rl.check("192.0.3.1", 100.0) == ADMIT  # the next /24 has its own


def test_clients_in_one_ipv6_56_share_a_bucket_and_the_next_56_does_not() -> None:
    rl = RateLimiter(RateLimitSettings(rate=1.0, burst=10.0, exempt=()))
    assert flood(rl, "2001:db8:0:100::1", 10) == [ADMIT] * 10
    assert rl.check("2001:db8:0:1ff:ffff::9", 100.0) != ADMIT  # same /56
    assert rl.check("2001:db8:0:200::1", 100.0) == ADMIT  # next /56


def test_prefix_lengths_are_configurable() -> None:
    rl = RateLimiter(RateLimitSettings(rate=1.0, burst=2.0, ipv4_prefix=32, exempt=()))
    assert flood(rl, "192.0.2.1", 2) == [ADMIT, ADMIT]
    assert rl.check("192.0.2.1", 100.0) != ADMIT
    assert rl.check("192.0.2.2", 100.0) == ADMIT  # /32: every address on its own


@pytest.mark.parametrize("slip,expected", [
    (1, [SLIP] * 12),
    (2, [DROP, SLIP] * 6),
    (3, [DROP, DROP, SLIP] * 4),
    (0, [DROP] * 12),  # slip = 0: drop everything over the limit
])
def test_slip_answers_every_nth_over_limit_query_with_tc(slip: int, expected: list[int]
                                                         ) -> None:
    rl = RateLimiter(RateLimitSettings(rate=1.0, burst=5.0, slip=slip, exempt=()))
    assert flood(rl, "192.0.2.1", 5) == [ADMIT] * 5
    assert flood(rl, "192.0.2.1", 12) == expected


def test_the_bucket_refills_at_the_rate() -> None:
    rl = RateLimiter(RateLimitSettings(rate=10.0, burst=5.0, exempt=()))
    assert flood(rl, "192.0.2.1", 5) + [rl.check("192.0.2.1", 100.0)] == [ADMIT] * 5 + [DROP]
    assert flood(rl, "192.0.2.1", 3, now=100.35) == [ADMIT] * 3  # 0.35 s x 10/s
    assert rl.check("192.0.2.1", 100.35) != ADMIT


def test_loopback_is_exempt_by_default_and_the_switch_turns_it_all_off() -> None:
    rl = RateLimiter(RateLimitSettings(rate=1.0, burst=1.0))
    assert flood(rl, "127.0.0.1", 50) == [ADMIT] * 50 and not rl.limits("::1")
    assert rl.limits("192.0.2.1")
    off = RateLimiter(RateLimitSettings(enabled=False, rate=1.0, burst=1.0))
    assert flood(off, "192.0.2.1", 50) == [ADMIT] * 50 and not off.limits("192.0.2.1")
