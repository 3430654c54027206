"""Access control: which clients moat serves at all.

The default allows what a home or office network uses and nothing that could make moat an
open resolver on the Internet: loopback, RFC 1918, shared address space (100.64.0.0/10),
link-local, IPv6 loopback, ULA and link-local. Everyone else gets REFUSED (counted).
Decisions are memoised per client address (bounded), so the hot path is one dict lookup.
"""

from __future__ import annotations

import ipaddress

DEFAULT_ALLOW = ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                 "100.64.0.0/10", "169.254.0.0/16", "::1/128", "fc00::/7", "fe80::/10")

_MEMO_LIMIT = 65536


class AccessList:
    def __init__(self, allow: tuple[str, ...] = DEFAULT_ALLOW) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in allow)
        self._memo: dict[str, bool] = {}
        self.refused = 0

    @property
    def wide_open(self) -> bool:
        return any(n.prefixlen == 0 for n in self.networks)

    def allows(self, host: str) -> bool:
        ok = self._memo.get(host)
        if ok is None:
            ok = self._decide(host)
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[host] = ok
        return ok

    def _decide(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in n for n in self.networks if n.version == ip.version)
