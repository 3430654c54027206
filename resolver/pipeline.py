"""The request path, in one place. Read this file to know what happens to a query.

    transport (server.py) hands over bytes + client address
      1. decode       header, question, OPT (wire.parse_query); malformed -> FORMERR or drop
      2. guard        anything raised below -> SERVFAIL, counted, logged once
      3. ACL          clients outside the allowed networks -> REFUSED
      4. rate limit   per-prefix token bucket; over it: TC=1 ("slip") or drop
      5. shed         too many queries in flight -> REFUSED (a cache hit never sheds)
      6. query policy QNAME / client-IP / pattern triggers (policy.check_query) -> rewrite
      7. special      qtype ANY -> RFC 8482 minimal answer; class other than IN -> REFUSED
      8. cache        fresh entry -> 9 -> answer (no upstream, no task)
      9. answer policy names and addresses in the answer (CNAME cloaking, response-IP,
                       rebinding), memoised on the cache entry per policy version
     10. forward      (cache miss only; async) coalesce identical questions, ask upstreams,
                       store, then 9; all upstreams failed -> stale entry or SERVFAIL
     11. encode       fit the client's UDP size (TC=1 if it does not), send
     12. finish       metrics counters and the verdict log (queued, written off the loop)

Everything up to 9 is synchronous: a cache hit or a blocked name is answered inside the
datagram callback without creating a task. Only a cache miss creates one, and identical
concurrent misses share it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from dataclasses import dataclass
from typing import Any, Protocol

from policy import PolicyView
from policy.rules import Action
from policy.verdict import Verdict

from . import synth, wire
from .acl import AccessList
from .cache import AnswerCache, CacheEntry, answer_from_entry, make_entry
from .fastpath import FastPath
from .metrics import ClientTracker
from .pipeline_memo import MEMO_LIMIT, evict_oldest
from .querylog import QueryLog
from .ratelimit import ADMIT, SLIP, RateLimiter
from .rebinding import RebindingGuard
from .stats import QTYPE_LABELS, Stats
from .upstream import UpstreamError, UpstreamPool

log = logging.getLogger("moat.pipeline")

_ANSWERS_NORMALLY = (Action.PASSTHRU, Action.LOG_ONLY)


class Responder(Protocol):
    """The transport side of a query: where the answer goes."""

    transport: str  # "udp" or "tcp"

    def send(self, data: bytes, addr: Any) -> None: ...

    def done_without_answer(self) -> None:
        """The query ended without an answer (dropped): TCP uses it for idle accounting."""


class PolicyHolder:
    """The current policy snapshot. Replaced whole on reload; each query reads it once.

    ``swap`` replaces it and tells the subscribers (the pipeline drops its memos)."""

    __slots__ = ("policy", "_subscribers")

    def __init__(self, policy: PolicyView) -> None:
        self.policy = policy
        self._subscribers: list[Any] = []

    def subscribe(self, callback: Any) -> None:
        self._subscribers.append(callback)
        callback(self.policy)

    def swap(self, policy: PolicyView) -> None:
        self.policy = policy
        for callback in self._subscribers:
            callback(policy)


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    max_in_flight: int = 2000  # concurrent cache misses before shedding


class Request:
    """One query on its way through the pipeline."""

    __slots__ = ("query", "addr", "responder", "t0", "verdict")

    def __init__(self, query: wire.Query, addr: Any, responder: Responder, t0: float) -> None:
        self.query = query
        self.addr = addr
        self.responder = responder
        self.t0 = t0
        self.verdict: Verdict | None = None


class Pipeline:
    def __init__(self, *, holder: PolicyHolder, cache: AnswerCache, upstreams: UpstreamPool,
                 acl: AccessList, ratelimit: RateLimiter, rebinding: RebindingGuard,
                 querylog: QueryLog, stats: Stats,
                 settings: PipelineSettings = PipelineSettings()) -> None:
        self.holder = holder
        self.cache = cache
        self.upstreams = upstreams
        self.acl = acl
        self.ratelimit = ratelimit
        self.rebinding = rebinding
        self.querylog = querylog
        self.stats = stats
        self.settings = settings
        self.in_flight: dict[bytes, asyncio.Future[tuple[bytes, wire.Message,
                                                         CacheEntry | None] | None]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.pending = 0  # requests waiting for an upstream answer
        #: query-policy verdicts by question: a Verdict, None, or (most blocked names) a
        #: compact reference that policy.verdict_of expands
        self._memo: dict[bytes, Verdict | int | None] = {}
        self._memo_version = -1
        self._logged_errors: set[str] = set()
        self.clients = ClientTracker()
        self.fast = FastPath(self)
        #: Handles DNS NOTIFY (opcode 4) from RPZ primaries: (raw message, client address)
        #: -> answer bytes or None. Set by resolver/xfr.py when zones are configured.
        self.notify_handler: Any = None
        holder.subscribe(self._policy_changed)

    def _policy_changed(self, policy: PolicyView) -> None:
        self._memo.clear()  # in place: the fast path holds this dict
        self._memo_version = policy.version
        self.fast.policy_changed(policy.version, bool(policy.closed))

    def parts_changed(self) -> None:
        """The ACL, rate limiter or cache were replaced (config reload)."""
        self.fast.parts_changed()

    # --- 1..9: the synchronous part -------------------------------------------------

    def handle(self, data: bytes, addr: Any, responder: Responder,
               ratelimit_decision: int | None = None) -> None:
        """Answer one query. ``ratelimit_decision``: already made by the fast path."""
        t0 = time.perf_counter()
        # 1. decode
        try:
            query = wire.parse_query(data)
        except wire.WireError as err:
            self._malformed(err, data, addr, responder, t0)
            return
        qtype = query.qtype
        # Fold rare qtypes at once: 65536 possible keys would be memory an attacker controls.
        self.stats.queries[(responder.transport, qtype if qtype in QTYPE_LABELS else 0)] += 1
        req = Request(query, addr, responder, t0)
        # 2. guard
        try:
            self._admit_and_answer(req, ratelimit_decision)
        except Exception as exc:  # noqa: BLE001 - the guard: never let a query crash moat
            self._internal_error(req, exc)

    def _admit_and_answer(self, req: Request, decision: int | None) -> None:
        query = req.query
        host = req.addr[0]
        # 3. ACL
        if not self.acl.allows(host):
            self.stats.shed["acl"] += 1
            self._reply(req, wire.error_response(query.data, wire.REFUSED, query), "shed")
            return
        # 4. rate limit
        if decision is None:
            limited = self.ratelimit.limits(host)
            self.fast.learn_host(host, limited)
            decision = self.ratelimit.check(host) if limited else ADMIT
        if decision != ADMIT:
            if decision == SLIP and req.responder.transport == "udp":
                self.stats.shed["ratelimit-slip"] += 1
                self._reply(req, wire.truncated_response(query), "shed")
            elif req.responder.transport == "tcp":
                self.stats.shed["ratelimit-refused"] += 1
                self._reply(req, wire.error_response(query.data, wire.REFUSED, query), "shed")
            else:
                self.stats.shed["ratelimit-drop"] += 1
                self._finish(req, None, "shed")
            return
        # 6. query policy
        policy = self.holder.policy
        if policy.closed:  # a fail-closed source never loaded: no unprotected answers
            self._reply(req, self._not_ready(query, policy.closed), "policy")
            return
        verdict = self._query_verdict(policy, query, host)
        if verdict is not None:
            req.verdict = verdict
            if verdict.action not in _ANSWERS_NORMALLY and not (
                    verdict.action == Action.TCP_ONLY and req.responder.transport == "tcp"):
                self._apply(req, verdict, query_time=not policy.client_dependent)
                return
            # PASSTHRU, LOG_ONLY, TCP-ONLY over TCP: on to the normal answer
        # 7. special qtypes and classes
        if query.qtype == wire.TYPE_ANY:
            self._reply(req, synth.any_answer(query), "local")
            return
        if query.qclass != wire.CLASS_IN:
            self._reply(req, wire.error_response(query.data, wire.REFUSED, query), "error")
            return
        # 8. cache
        entry = self.cache.get(query.key)
        if entry is not None:
            now = time.monotonic()
            if now < entry.expires:
                self.cache.hits += 1
                self._answer_with(req, entry, entry.body_at(now), "cache", policy)
                return
            if now >= entry.dead_after:
                self.cache.drop(query.key)
        self.cache.misses += 1
        # 5. shed (only cache misses cost upstream work and memory)
        if self.pending >= self.settings.max_in_flight:
            self.stats.shed["in-flight"] += 1
            self._reply(req, wire.error_response(query.data, wire.REFUSED, query), "shed")
            return
        # 10. forward
        self._forward(req)

    @staticmethod
    def _not_ready(query: wire.Query, closed: tuple[str, ...]) -> bytes:
        ede = wire.ede_option(wire.EDE_NOT_READY, f"moat: policy source {', '.join(closed)} "
                              "has not loaded yet (fail = closed)") if query.edns else b""
        return wire.error_response(query.data, wire.SERVFAIL, query, ede)

    def _query_verdict(self, policy: PolicyView, query: wire.Query, host: str) -> Verdict | None:
        if policy.client_dependent:
            return policy.check_query(query.qname, query.qtype, host)
        if self._memo_version != policy.version:
            self._memo.clear()  # in place: the fast path holds this dict
            self._memo_version = policy.version
        memo = self._memo
        key = query.key
        try:
            verdict = memo[key]
        except KeyError:
            verdict = policy.check_query_ref(query.qname, query.qtype, host)
            if len(memo) >= MEMO_LIMIT:
                evict_oldest(memo)
            memo[key] = verdict
        if isinstance(verdict, int):  # a compact reference (what most blocked names get)
            return policy.verdict_of(verdict, query.qname)
        return verdict

    # --- 9: answer policy and the answer from an entry ------------------------------

    def _answer_verdict(self, entry: CacheEntry, query: wire.Query, host: str,
                        policy: PolicyView) -> Verdict | None:
        if entry.policy_version == policy.version and not policy.client_dependent:
            return entry.verdict
        verdict = None
        if entry.names or entry.addresses:
            verdict = policy.check_answer(entry.names, entry.addresses, query.qtype, host)
        if verdict is None and entry.addresses:
            verdict = self.rebinding.check(query.qname, entry.addresses, policy.version)
        entry.policy_version = policy.version
        entry.verdict = verdict
        return verdict

    def _answer_with(self, req: Request, entry: CacheEntry, body: bytes, source: str,
                     policy: PolicyView, ede: bytes = b"") -> None:
        query = req.query
        if req.verdict is None or req.verdict.action != Action.PASSTHRU:
            verdict = self._answer_verdict(entry, query, req.addr[0], policy)
            if verdict is not None and (req.verdict is None or
                                        verdict.action not in _ANSWERS_NORMALLY):
                req.verdict = verdict
                if verdict.action not in _ANSWERS_NORMALLY:
                    self._apply(req, verdict)
                    return
        if req.verdict is not None and req.verdict.action == Action.TCP_ONLY and \
                req.responder.transport == "udp":
            self._reply(req, wire.truncated_response(query), "policy")
            return
        answer = answer_from_entry(entry, query, body)
        if ede and query.edns:
            answer = _with_ede(answer, ede)
        self._reply(req, answer, source)

    # --- policy actions -------------------------------------------------------------

    def _apply(self, req: Request, verdict: Verdict, query_time: bool = False) -> None:
        """Answer as ``verdict`` says. A query-time answer is remembered for the fast path
        (it depends only on the question, the query's shape and the policy version)."""
        query = req.query
        action = verdict.action
        if action == Action.DROP:
            self._finish(req, None, "policy")
        elif action == Action.TCP_ONLY:
            if req.responder.transport == "udp":
                self._reply(req, wire.truncated_response(query), "policy")
            else:
                self._forward(req)  # over TCP the answer is the normal one
        elif action == Action.LOCAL_DATA and synth.cname_target(query, verdict) is not None:
            self._chase(req, verdict)
        else:
            answer = synth.blocked_answer(query, verdict)
            if query_time and req.responder.transport == "udp":
                self.fast.remember_synth(query, answer, verdict)
            self._reply(req, answer, "policy")

    # --- 10: forwarding (async) -----------------------------------------------------

    def _forward(self, req: Request, question: bytes | None = None,
                 store: bool = True) -> None:
        """Resolve through the upstreams; identical concurrent questions share one task."""
        query = req.query
        key = query.key if question is None else question + query.key[-1:]
        fut = self.in_flight.get(key)
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            self.in_flight[key] = fut
            q = question if question is not None else query.key[:-1]
            task = loop.create_task(self._resolve(key, q, query.do, query.cd, fut, store))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self.pending += 1
        if question is None:
            fut.add_done_callback(lambda f: self._complete(req, f))
        else:
            fut.add_done_callback(lambda f: self._complete_chase(req, f))

    async def _resolve(self, key: bytes, question: bytes, do: bool, cd: bool,
                       fut: asyncio.Future[Any], store: bool) -> None:
        try:
            data, msg, _upstream = await self.upstreams.resolve(question, do=do, cd=cd)
            now = time.monotonic()
            entry = self.cache.store(key, msg, data, now) if store else None
            fut.set_result((data, msg, entry))
        except UpstreamError:
            fut.set_result(None)
        except Exception as exc:  # noqa: BLE001
            fut.set_exception(exc)
        finally:
            self.in_flight.pop(key, None)

    def _complete(self, req: Request, fut: asyncio.Future[Any]) -> None:
        self.pending -= 1
        try:
            result = fut.result()
            policy = self.holder.policy
            if result is None or result[1].rcode in (wire.SERVFAIL, wire.REFUSED):
                # Nobody answered, or every upstream said SERVFAIL/REFUSED (e.g. the
                # authorities are down): a stale answer beats an error (RFC 8767).
                if self._upstreams_failed(req, policy, result):
                    return
            data, msg, entry = result
            now = time.monotonic()
            if entry is not None:
                # Straight from the upstream: its TTLs as given (age 0).
                self._answer_with(req, entry, entry.body_at(entry.stored), "upstream", policy)
                return
            # Not cacheable (SERVFAIL passed on, NODATA without SOA, ...): answer from a
            # throw-away entry so the same code builds the answer and checks policy.
            transient = make_entry(msg, data, now, self.cache.settings, transient=True)
            if transient is None:
                self._reply(req, wire.error_response(req.query.data, wire.SERVFAIL, req.query),
                            "error")
                return
            self._answer_with(req, transient, transient.body, "upstream", policy)
        except Exception as exc:  # noqa: BLE001
            self._internal_error(req, exc)

    def _upstreams_failed(self, req: Request, policy: PolicyView, result: Any) -> bool:
        """Upstreams failed: serve stale (RFC 8767) if we can. Without a stale entry:
        SERVFAIL when nobody answered (True), or False to pass the upstream's own
        SERVFAIL/REFUSED answer on."""
        query = req.query
        entry = self.cache.get(query.key)
        now = time.monotonic()
        if entry is not None and now < entry.dead_after:
            self.cache.stale_served += 1
            body = entry.body_stale(self.cache.settings.stale_ttl)
            ede = wire.ede_option(wire.EDE_STALE, "moat: upstreams failed, stale answer")
            self._answer_with(req, entry, body, "stale", policy, ede)
            return True
        if result is not None:
            return False
        self._reply(req, wire.error_response(query.data, wire.SERVFAIL, query), "error")
        return True

    # --- walled gardens: Local-Data CNAME, target resolved without policy ------------

    def _chase(self, req: Request, verdict: Verdict) -> None:
        if self.pending >= self.settings.max_in_flight:  # 5. shed, as for cache misses
            self.stats.shed["in-flight"] += 1
            self._reply(req, wire.error_response(req.query.data, wire.REFUSED, req.query),
                        "shed")
            return
        target = synth.cname_target(req.query, verdict)
        assert target is not None
        question = target[0] + wire.TYPE_CLASS.pack(req.query.qtype, req.query.qclass)
        self._forward(req, question=question.lower(), store=False)

    def _complete_chase(self, req: Request, fut: asyncio.Future[Any]) -> None:
        self.pending -= 1
        try:
            verdict = req.verdict
            assert verdict is not None
            result = fut.result()
            target = synth.cname_target(req.query, verdict)
            assert target is not None
            if result is None:
                # The garden did not resolve: still answer the CNAME we own.
                self._reply(req, synth.blocked_answer(req.query, verdict), "policy")
                return
            data, msg, _entry = result
            self._reply(req, synth.chase_answer(req.query, target[0], target[1], data, msg,
                                                verdict), "policy")
        except Exception as exc:  # noqa: BLE001
            self._internal_error(req, exc)

    # --- 11, 12: encode, send, finish -----------------------------------------------

    def _reply(self, req: Request, answer: bytes, source: str) -> None:
        if req.responder.transport == "udp" and len(answer) > req.query.payload:
            answer = wire.truncated_response(req.query)
        req.responder.send(answer, req.addr)
        self._finish(req, answer, source)

    def _finish(self, req: Request, answer: bytes | None, source: str) -> None:
        stats = self.stats
        elapsed = time.perf_counter() - req.t0
        if answer is None:
            req.responder.done_without_answer()
            rcode = -1
        else:
            rcode = answer[3] & 0x0F
        stats.responses[(rcode, source)] += 1
        stats.observe_duration(elapsed)
        self.clients.seen(req.addr[0], req.t0)
        verdict = req.verdict
        if verdict is not None:
            if verdict.action != Action.PASSTHRU:
                self.clients.threat(verdict.category, req.addr[0], req.t0)
            stats.policy_hits[(verdict.category, verdict.family, verdict.action.label,
                               verdict.source)] += 1
            if self.querylog.enabled:
                self._log(req, verdict, rcode, source, elapsed)
        elif self.querylog.log_all:
            self._log(req, None, rcode, source, elapsed)

    def _log(self, req: Request, verdict: Verdict | None, rcode: int, source: str,
             elapsed: float) -> None:
        addr = req.addr
        self.querylog.record(addr[0], addr[1], req.responder.transport, req.query.qname,
                             req.query.qtype, verdict, rcode, source, elapsed)

    # --- errors ---------------------------------------------------------------------

    def _malformed(self, err: wire.WireError, data: bytes, addr: Any, responder: Responder,
                   t0: float) -> None:
        kind = err.kind
        query: wire.Query | None = getattr(err, "query", None)
        if kind == "opcode" and query is not None and query.opcode == 4 and \
                self.notify_handler is not None:
            answer = self.notify_handler(data, addr)  # a zone changed on an RPZ primary
            if answer is not None:
                responder.send(answer, addr)
            else:
                responder.done_without_answer()
            return
        self.stats.malformed[kind] += 1
        if kind in ("short", "response"):
            responder.done_without_answer()
            return  # nothing sensible to answer (or an answer: never reply to one)
        rcode = {"opcode": wire.NOTIMP, "badvers": wire.BADVERS}.get(kind, wire.FORMERR)
        answer = wire.error_response(data, rcode, query if kind != "opt" else None)
        responder.send(answer, addr)
        self.stats.responses[(rcode, "error")] += 1
        self.stats.observe_duration(time.perf_counter() - t0)

    def _internal_error(self, req: Request, exc: BaseException) -> None:
        name = type(exc).__name__
        self.stats.errors[name] += 1
        if name not in self._logged_errors:  # once per exception type, with the traceback
            self._logged_errors.add(name)
            log.error("internal error answering %s: %s\n%s", req.query.qname, exc,
                      "".join(traceback.format_exception(exc)))
        try:
            self._reply(req, wire.error_response(req.query.data, wire.SERVFAIL, req.query),
                        "error")
        except Exception:  # noqa: BLE001 - the transport itself is broken; nothing to do
            pass

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for queries that are waiting on upstreams."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)


def _with_ede(answer: bytes, ede: bytes) -> bytes:
    """Append an EDE option to the OPT record that ends ``answer`` (moat's own OPT)."""
    rdlen = wire.U16.unpack_from(answer, len(answer) - 2)[0]
    if rdlen:
        return answer
    return answer[:-2] + wire.U16.pack(len(ede)) + ede
