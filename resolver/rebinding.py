"""DNS rebinding protection: a public name must not resolve to a private address.

A page on evil.example can make a browser talk to the router or the NAS if evil.example
resolves to 192.168.1.1. Answers containing loopback, RFC 1918, shared (100.64/10),
link-local, unspecified, IPv6 ULA/link-local/loopback or IPv4-mapped private addresses are
rewritten, as a verdict of category ``rebinding``, unless the name is under one of the
allowed local domains (``lan``, ``home.arpa``, ...). It runs with the answer-time policy
checks, so its verdict is memoised on the cache entry like theirs.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from policy.rules import Action, Trigger
from policy.verdict import Verdict

PRIVATE_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.168.0.0/16", "::/128", "::1/128", "fc00::/7", "fe80::/10"))


@dataclass(frozen=True, slots=True)
class RebindingSettings:
    enabled: bool = True
    action: str = "nodata"  # what a rebinding answer becomes
    allow_domains: tuple[str, ...] = ("lan", "home.arpa", "local", "localdomain", "internal",
                                      "localhost", "intranet", "corp", "home")


class RebindingGuard:
    def __init__(self, settings: RebindingSettings) -> None:
        self.s = settings
        self.allow = tuple(d.strip(".").lower() for d in settings.allow_domains)
        self.action = Action.from_label(settings.action)

    def _allowed_name(self, qname: str) -> bool:
        for d in self.allow:
            if qname == d or qname.endswith("." + d):
                return True
        return False

    def check(self, qname: str, addresses: tuple[str, ...] | list[str],
              policy_version: int) -> Verdict | None:
        if not self.s.enabled or not addresses or self._allowed_name(qname):
            return None
        for text in addresses:
            ip = ipaddress.ip_address(text)
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if any(ip in n for n in PRIVATE_NETWORKS if n.version == ip.version):
                return Verdict(action=self.action, trigger=Trigger.REBINDING,
                               category="rebinding", family="", source="rebinding-protection",
                               rule="private address in the answer for a public name",
                               where="builtin", matched=text, policy_version=policy_version)
        return None
