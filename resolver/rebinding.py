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
import socket
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


_V4 = tuple((int(n.network_address), int(n.netmask)) for n in PRIVATE_NETWORKS
            if n.version == 4)
_V6 = tuple((int(n.network_address), int(n.netmask)) for n in PRIVATE_NETWORKS
            if n.version == 6)


def is_private(text: str) -> bool:
    """Whether an address (text, as in an answer) is in PRIVATE_NETWORKS. Integer masks:
    this runs for every address of every answer that enters the cache."""
    try:
        if ":" in text:
            value = int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
            if value >> 32 != 0xFFFF:  # not IPv4-mapped
                return any(value & mask == net for net, mask in _V6)
            value &= 0xFFFFFFFF
        else:
            value = int.from_bytes(socket.inet_aton(text), "big")
    except OSError:
        return False
    return any(value & mask == net for net, mask in _V4)


class RebindingGuard:
    def __init__(self, settings: RebindingSettings) -> None:
        self.s = settings
        self.allow = frozenset(d.strip(".").lower() for d in settings.allow_domains)
        self.action = Action.from_label(settings.action)

    def _allowed_name(self, qname: str) -> bool:
        name = qname
        while True:
            if name in self.allow:
                return True
            dot = name.find(".")
            if dot < 0:
                return False
            name = name[dot + 1:]

    def check(self, qname: str, addresses: tuple[str, ...] | list[str],
              policy_version: int) -> Verdict | None:
        if not self.s.enabled or not addresses:
            return None
        for text in addresses:
            if is_private(text) and not self._allowed_name(qname):
                return Verdict(action=self.action, trigger=Trigger.REBINDING,
                               category="rebinding", family="", source="rebinding-protection",
                               rule="private address in the answer for a public name",
                               matched=text, policy_version=policy_version)
        return None
