"""moat's policy engine: pure, synchronous, immutable once built.

In: a canonical name (lower case, A-labels, no trailing dot), a qtype, the client's
address, and for answers the names and addresses in them. Out: a Verdict or None.
No sockets, no asyncio, no logging on the lookup path. See policy/engine.py for the
precedence rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .rules import Action, Scope, Trigger
from .verdict import Verdict

__all__ = ["Action", "Scope", "Trigger", "Verdict", "PolicyView", "EmptyPolicy"]


class PolicyView(Protocol):
    """What the resolver needs from a policy snapshot."""

    version: int
    #: True when some rule depends on the client's address: verdicts cannot be memoised per name.
    client_dependent: bool
    #: Sources with ``fail = "closed"`` that have never loaded: while there are any, the
    #: resolver answers SERVFAIL rather than resolve without them.
    closed: tuple[str, ...]

    def check_query(self, qname: str, qtype: int, client: str) -> Verdict | None: ...

    def check_query_ref(self, qname: str, qtype: int, client: str
                        ) -> Verdict | int | None: ...

    def verdict_of(self, ref: int, qname: str) -> Verdict: ...

    def check_answer(self, names: Sequence[str], addresses: Sequence[str], qtype: int,
                     client: str) -> Verdict | None: ...


class EmptyPolicy:
    """Allows everything (used before the first policy is loaded, and in tests)."""

    version = 0
    client_dependent = False
    closed: tuple[str, ...] = ()

    def check_query(self, qname: str, qtype: int, client: str) -> Verdict | None:
        return None

    def check_query_ref(self, qname: str, qtype: int, client: str) -> Verdict | int | None:
        return None

    def verdict_of(self, ref: int, qname: str) -> Verdict:
        raise LookupError("the empty policy hands out no references")

    def check_answer(self, names: Sequence[str], addresses: Sequence[str], qtype: int,
                     client: str) -> Verdict | None:
        return None
