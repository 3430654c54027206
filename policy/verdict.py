"""The verdict: what the policy decided about one query or answer, and why.

It is the only thing that crosses from ``policy/`` into ``resolver/``: the resolver turns
it into an answer (resolver/synth.py), a log line and metric labels. ``rule`` and
``where`` go to logs only, never to metric labels (they are unbounded).
"""

from __future__ import annotations

from typing import NamedTuple

from .rules import Action, LocalRecord, Trigger


class Verdict(NamedTuple):
    """Immutable and without a ``__dict__``. A NamedTuple rather than a frozen dataclass:
    a blocked query makes one, and a frozen dataclass costs about three times as much to
    build (every field goes through ``object.__setattr__``)."""

    action: Action
    trigger: Trigger
    category: str  # malware, phishing, c2, ... (bounded: from config)
    family: str  # QSnatch, Emotet, ... or "" (bounded: from config and feeds)
    source: str  # the source's configured name
    rule: object  # the rule as written: str(rule) (read from the source file lazily)
    matched: str  # what triggered: the name, CNAME target, address or client address
    policy_version: int
    ttl: int = 60  # TTL of synthesised records
    local_data: tuple[LocalRecord, ...] = ()
    sinkhole_v4: tuple[str, ...] = ("0.0.0.0",)
    sinkhole_v6: tuple[str, ...] = ("::",)
    source_index: int = 0  # precedence position of the source (lower wins)

    @property
    def where(self) -> str:
        """``path:line`` of the rule; "builtin" for moat's own rules (rebinding)."""
        return getattr(self.rule, "where", "builtin")

    @property
    def blocks(self) -> bool:
        """True when the client does not get the normal answer."""
        return self.action not in (Action.PASSTHRU, Action.LOG_ONLY, Action.TCP_ONLY)
