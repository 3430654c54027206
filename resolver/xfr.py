"""RPZ by zone transfer: AXFR first, then IXFR on the SOA timers and on NOTIFY.

For every source with ``zone`` and ``primary`` a :class:`ZoneTransfers` keeps
``<state_dir>/zones/<name>.zone`` (the copy the policy build reads, see
``policy.build.state_paths``): a master file written by dnspython with ``$ORIGIN <zone>``
first, owners relative to the zone, the SOA included. The policy's RPZ parser reads it
with origin = the zone name. Beside it ``<name>.xfr.json`` keeps the time of the last
successful check, so that SOA expiry counts across restarts without touching the zone
file's mtime (the running policy identifies the file it read by (size, mtime)).

The protocol is dnspython's: ``dns.xfr.make_query`` (IXFR from the serial of the copy
held in memory, AXFR when there is none) and ``dns.query.inbound_xfr`` with a
``dns.zone.Zone`` as the transaction manager, TSIG-signed when a key is configured
(``dns.tsigkeyring.from_text``; algorithms such as ``hmac-sha256``). A transfer runs in a
worker thread: loading a large zone file, applying a large AXFR and writing the file are
CPU work that must not stall the event loop that answers queries. The zone stays in
memory between transfers (an IXFR is applied to it), so RAM grows with the zone's size.

Timers (RFC 1996 / RFC 1034 secondary behaviour, from the copy's SOA):

* on start: a check at once (IXFR from the copy on disk, if any);
* after a successful check: the next one after SOA ``refresh``; after a failure: after
  SOA ``retry`` (30 s while there is no SOA at all); ±10 % jitter, at least 1 s;
* on NOTIFY from the primary: at once (at most one transfer every 0.5 s per zone);
* when no check succeeded for SOA ``expire`` seconds the zone is **expired**: logged at
  error level (once per failure streak) and exported as ``moat_zone_expired``, but the
  last copy keeps protecting: moat never drops a protecting zone by itself.

IXFR falls back to AXFR when the primary answers with a full zone (dnspython detects it;
the metrics then say ``kind="axfr"``), refuses IXFR or sends a broken one, or its serial
went backwards (the primary was reset: its zone wins).

NOTIFY (:meth:`ZoneTransfers.handle_notify`, called by the pipeline for opcode 4 on
moat's own UDP and TCP listeners): accepted only for a configured zone, from its
primary's IP address (any source port; IPv4-mapped IPv6 is compared as IPv4), and, when
the source has a TSIG key, only when signed with that key and valid. Accepted: a NOTIFY
response (same ID, QR, opcode NOTIFY, AA, question copied, TSIG-signed when the request
was) and a transfer is scheduled. Anything else: REFUSED, unsigned (counted, logged at
debug level). It never blocks.

Metrics (:meth:`ZoneTransfers.collect`): ``moat_zone_transfers_total{source,kind,result}``
(kind ``axfr`` / ``ixfr`` as performed; result ``ok`` (changed), ``uptodate``, ``refused``
(REFUSED/NOTAUTH/NOTIMP...), ``timeout``, ``tsig`` (signature problems), ``error``),
``moat_zone_serial{source}`` (absent until a copy exists), ``moat_notify_total{source,
result}`` (accepted, refused; ``source="-"`` for a zone moat does not have),
``moat_zone_last_success_timestamp_seconds{source}``, ``moat_zone_expired{source}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.xfr
import dns.zone
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from policy.settings import SourceSettings

from .config import parse_hostport
from .feeds import wait_for_first_copies

log = logging.getLogger("moat.xfr")

KINDS = ("axfr", "ixfr")
RESULTS = ("ok", "uptodate", "refused", "timeout", "tsig", "error")
NOTIFY_RESULTS = ("accepted", "refused")
NO_SOA_RETRY = 30.0
MIN_TIMER = 1.0
MAX_TIMER = 7 * 86400.0
NOTIFY_HOLDOFF = 0.5
JITTER = 0.1
UNKNOWN_SOURCE = "-"

_TSIG_ERRORS: tuple[type[BaseException], ...] = (
    dns.tsig.BadSignature, dns.tsig.BadTime, dns.tsig.BadKey, dns.tsig.BadAlgorithm,
    dns.tsig.PeerError, dns.message.UnknownTSIGKey)
_REFUSAL_RCODES = {dns.rcode.REFUSED, dns.rcode.NOTAUTH, dns.rcode.NOTIMP, dns.rcode.NOTZONE}


class _Zone(dns.zone.Zone):
    """A zone that notes whether a transfer replaced it whole (an AXFR, or an IXFR that
    the primary answered with the full zone)."""

    replaced: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replaced = False

    def writer(self, replacement: bool = False) -> Any:
        if replacement:
            self.replaced = True
        return super().writer(replacement)


@dataclass(slots=True)
class XfrOutcome:
    kind: str  # axfr | ixfr: what was performed
    result: str  # one of RESULTS
    changed: bool = False
    serial: int | None = None
    reason: str = ""
    attempts: list[tuple[str, str]] = field(default_factory=list)  # (kind, result) counted


@dataclass(slots=True)
class _Source:
    src: SourceSettings
    origin: dns.name.Name
    primary: tuple[str, int]
    key: dns.tsig.Key | None
    zone: _Zone | None = None
    loaded: bool = False  # tried to read the copy from disk
    serial: int | None = None
    refresh: float | None = None  # SOA timers of the copy
    retry: float | None = None
    expire: float | None = None
    last_ok: float | None = None  # wall time of the last successful check
    streak: int = 0  # consecutive failed checks
    failing: bool = False
    expired: bool = False
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    notifies: Counter[str] = field(default_factory=Counter)
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # a NOTIFY came
    rearm: asyncio.Event = field(default_factory=asyncio.Event)  # the timer moved
    next_due: float = 0.0  # loop time of the next check
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None
    last_start: float = 0.0  # loop time of the last transfer start


def _in_networks(host: str, networks: Sequence[str]) -> bool:
    """``notify_from``: where else NOTIFY may come from (NAT, a Kubernetes Service)."""
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


def _ip(text: str) -> str:
    """Normalised address text; IPv4-mapped IPv6 as IPv4; no scope."""
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _make_key(src: SourceSettings) -> dns.tsig.Key | None:
    if src.tsig is None:
        return None
    ring = dns.tsigkeyring.from_text({src.tsig.name: (src.tsig.algorithm, src.tsig.secret)})
    return next(iter(ring.values()))


def _soa(zone: dns.zone.Zone) -> Any:
    rdataset = zone.get_rdataset(dns.name.empty, dns.rdatatype.SOA)  # relativized zones
    return rdataset[0] if rdataset else None


def _write_zone(zone: dns.zone.Zone, target: Path) -> None:
    """A master file: ``$ORIGIN``, the apex SOA first, owners relative to the origin.

    Written to a temporary file, fsynced and renamed over the copy (atomic).
    """
    origin = zone.origin
    assert origin is not None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(f"$ORIGIN {origin.to_text()}\n")
            for name in sorted(zone.keys()):  # DNSSEC order: the apex first
                node = zone[name]
                # The SOA first, as in any zone file; then by type.
                for rdataset in sorted(node.rdatasets,
                                       key=lambda r: (r.rdtype != dns.rdatatype.SOA, r.rdtype)):
                    fh.write(rdataset.to_text(name, origin=origin, relativize=True))
                    fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class ZoneTransfers:
    """Keeps ``<state_dir>/zones/<name>.zone`` current for every zone source."""

    def __init__(self, sources: Sequence[SourceSettings], state_dir: str,
                 on_change: Callable[[str], Awaitable[Any]],
                 clock: Callable[[], float] = time.time,
                 on_notify: Callable[[str], None] | None = None) -> None:
        """``on_notify(name)``: also called (synchronously) for every accepted NOTIFY.
        A worker process that only answers NOTIFY (never started) uses it to pass the
        news to the process that runs the transfers (``request_refresh(name)`` there)."""
        self.state_dir = state_dir
        self.on_notify = on_notify
        self.dir = Path(state_dir) / "zones"
        self.on_change = on_change
        self.clock = clock
        self.zones: dict[str, _Source] = {}
        self._by_origin: dict[dns.name.Name, _Source] = {}
        self.notify_unknown = 0
        self._started = False
        self._stopping = False
        self._initial: set[asyncio.Task[Any]] = set()
        for src in sources:
            if src.zone and src.primary:
                z = _Source(src=src, origin=dns.name.from_text(src.zone),
                            primary=parse_hostport(src.primary, 53), key=_make_key(src))
                self.zones[src.name] = z
                self._by_origin[z.origin] = z

    # --- paths ----------------------------------------------------------------------

    def zone_path(self, name: str) -> Path:
        return self.dir / f"{name}.zone"

    def state_path(self, name: str) -> Path:
        return self.dir / f"{name}.xfr.json"

    def serial(self, name: str) -> int | None:
        return self.zones[name].serial

    # --- lifetime -------------------------------------------------------------------

    async def start(self, initial_timeout: float) -> None:
        """Transfer the zones with no copy on disk (bounded wait), then keep all current.

        Zones with a copy never delay this. ``on_change`` is not called for transfers
        finished before this returns (the caller builds its first policy afterwards).
        """
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # every transfer will fail and say so; moat still starts
            log.error("cannot create %s: %s", self.dir, exc)
        self._stopping = False
        first = {name: asyncio.create_task(self.refresh(name), name=f"xfr-initial-{name}")
                 for name in self.zones if not self.zone_path(name).is_file()}
        self._initial.update(first.values())
        await wait_for_first_copies(first, initial_timeout, "zone", "transferring")
        self._started = True
        for name, z in self.zones.items():
            z.task = asyncio.create_task(self._loop(name, first.get(name)), name=f"xfr-{name}")

    async def stop(self) -> None:
        """Cancel timers and transfers and wait for the tasks (a transfer thread already
        running ends by its own timeout; its result is still written, nothing is called)."""
        self._stopping = True
        tasks = [z.task for z in self.zones.values() if z.task is not None]
        tasks += list(self._initial)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._initial.clear()
        for z in self.zones.values():
            z.task = None

    def request_refresh(self, name: str) -> None:
        """Check zone ``name`` now (as a NOTIFY would)."""
        self.zones[name].wake.set()
        self.zones[name].rearm.set()

    async def _loop(self, name: str, initial: asyncio.Task[Any] | None) -> None:
        z = self.zones[name]
        if initial is not None:  # the first transfer, started by start(): let it end
            with contextlib.suppress(Exception):
                await initial
            self._initial.discard(initial)
        # Otherwise next_due is 0: an IXFR from the copy on disk at once (usually
        # "up to date").
        loop = asyncio.get_running_loop()
        while not self._stopping:
            now = loop.time()
            if z.wake.is_set():  # a NOTIFY: at once, but not more often than the holdoff
                wait = z.last_start + NOTIFY_HOLDOFF - now
                if wait > 0:
                    await asyncio.sleep(wait)
                await self.refresh(name)
            elif now >= z.next_due:
                await self.refresh(name)
            else:
                # Sleep until due; a NOTIFY or a check made elsewhere (which moves the
                # timer) sets `rearm` and the timer is computed again.
                z.rearm.clear()
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel
                # that arrives as the event fires, and stop() would then wait forever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(z.next_due - now):
                        await z.rearm.wait()

    @staticmethod
    def _next_delay(z: _Source) -> float:
        if z.streak == 0 and z.refresh is not None:
            base = z.refresh
        elif z.retry is not None:
            base = z.retry
        else:
            base = NO_SOA_RETRY
        base = min(max(base, MIN_TIMER), MAX_TIMER)
        return base * random.uniform(1 - JITTER, 1 + JITTER)

    # --- one check ------------------------------------------------------------------

    async def refresh(self, name: str) -> XfrOutcome:
        """Transfer zone ``name`` now (IXFR when there is a copy); count, log, write, notify."""
        z = self.zones[name]
        loop = asyncio.get_running_loop()
        async with z.lock:
            z.wake.clear()  # a NOTIFY from now on asks for another check
            z.last_start = loop.time()
            try:
                outcome = await loop.run_in_executor(None, self._transfer, z)
            except Exception as exc:  # noqa: BLE001 - a bug must not end the timers
                log.exception("zone source %s: internal error", name)
                outcome = XfrOutcome("axfr" if z.serial is None else "ixfr", "error",
                                     reason=f"internal error: {exc!r}", serial=z.serial)
                outcome.attempts.append((outcome.kind, "error"))
        for attempt in outcome.attempts:
            z.counts[attempt] += 1
        if outcome.result not in ("ok", "uptodate"):
            z.streak += 1
        else:
            z.streak = 0
        z.next_due = loop.time() + self._next_delay(z)  # SOA refresh, or retry after failure
        z.rearm.set()
        now = self.clock()
        if outcome.result in ("ok", "uptodate"):
            if z.expired or z.failing:
                log.info("zone source %s: transfers from %s work again", name, z.src.primary)
            z.failing = False
            z.expired = False
            z.last_ok = now
            await asyncio.to_thread(self._save_state, z)
            if outcome.changed:
                log.info("zone source %s: %s from %s, serial %s", name, outcome.kind.upper(),
                         z.src.primary, outcome.serial)
                if self._started and not self._stopping:
                    try:
                        await self.on_change(name)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - the copy itself is fine
                        log.error("zone source %s: reacting to the new copy failed: %s",
                                  name, exc)
            else:
                log.debug("zone source %s: serial %s is current", name, outcome.serial)
        else:
            z.failing = True
            keep = f"keeping the copy with serial {z.serial}" if z.serial is not None else \
                "no copy yet: the source does not protect"
            if z.streak == 1:
                log.warning("zone source %s: %s from %s failed (%s): %s; %s", name,
                            outcome.kind.upper(), z.src.primary, outcome.result,
                            outcome.reason, keep)
            else:
                log.debug("zone source %s: still failing (%d in a row): %s", name, z.streak,
                          outcome.reason)
            self._check_expiry(z, now)
        return outcome

    def _check_expiry(self, z: _Source, now: float) -> None:
        if z.expire is None or z.last_ok is None or z.expired:
            return
        if now - z.last_ok > z.expire:
            z.expired = True
            log.error("zone source %s (%s from %s) EXPIRED: no successful refresh for %.0fs "
                      "(SOA expire %.0fs). Still serving the last copy (serial %s): moat never "
                      "drops a protecting zone by itself. Fix the primary or remove the "
                      "source.", z.src.name, z.src.zone, z.src.primary, now - z.last_ok,
                      z.expire, z.serial)

    def _save_state(self, z: _Source) -> None:
        path = self.state_path(z.src.name)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps({"checked": z.last_ok, "serial": z.serial,
                                       "zone": z.src.zone, "primary": z.src.primary}))
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("cannot write %s: %s", path, exc)

    # --- the transfer (in a worker thread) ------------------------------------------

    def _load_copy(self, z: _Source) -> None:
        """Read the copy on disk once, so the first transfer can be an IXFR."""
        z.loaded = True
        path = self.zone_path(z.src.name)
        if not path.is_file():
            return
        try:
            zone = dns.zone.from_file(str(path), origin=z.origin, relativize=True,
                                      zone_factory=_Zone, check_origin=True)
        except (OSError, dns.exception.DNSException, ValueError) as exc:
            log.warning("zone source %s: cannot read the copy %s (%s); a full transfer "
                        "replaces it", z.src.name, path, exc)
            return
        self._adopt(z, zone)  # type: ignore[arg-type]
        try:
            state = json.loads(self.state_path(z.src.name).read_text())
            checked = float(state.get("checked") or 0)
        except (OSError, ValueError, TypeError):
            checked = 0.0
        z.last_ok = max(checked, path.stat().st_mtime)

    @staticmethod
    def _adopt(z: _Source, zone: _Zone) -> None:
        soa = _soa(zone)
        z.zone = zone
        if soa is not None:
            z.serial = int(soa.serial)
            z.refresh, z.retry, z.expire = float(soa.refresh), float(soa.retry), \
                float(soa.expire)

    def _transfer(self, z: _Source) -> XfrOutcome:
        if not z.loaded:
            self._load_copy(z)
        timeout = z.src.timeout
        lifetime = max(timeout * 20, 60.0)
        host, port = z.primary
        attempts: list[tuple[str, str]] = []
        reason = ""
        if z.zone is not None and z.serial is not None:
            zone = z.zone
            zone.replaced = False
            try:
                query, _ = dns.xfr.make_query(zone, serial=z.serial, keyring=z.key)
                dns.query.inbound_xfr(host, zone, query, port=port, timeout=timeout,
                                      lifetime=lifetime)
            except Exception as exc:  # noqa: BLE001 - classified below
                result, reason = self._classify(exc)
                kind = "axfr" if zone.replaced else "ixfr"
                attempts.append((kind, result))
                if result in ("timeout", "tsig") or isinstance(exc, OSError):
                    return XfrOutcome(kind, result, reason=reason, serial=z.serial,
                                      attempts=attempts)
                log.info("zone source %s: IXFR failed (%s); trying AXFR", z.src.name, reason)
            else:
                kind = "axfr" if zone.replaced else "ixfr"
                new_serial = (_soa(zone).serial if _soa(zone) is not None else None)
                if not zone.replaced and new_serial == z.serial:
                    attempts.append((kind, "uptodate"))
                    return XfrOutcome(kind, "uptodate", serial=z.serial, attempts=attempts)
                self._adopt(z, zone)
                out = self._store(z, kind, attempts)
                return out
        fresh = _Zone(z.origin, dns.rdataclass.IN, relativize=True)
        try:
            query, _ = dns.xfr.make_query(fresh, serial=None, keyring=z.key)
            dns.query.inbound_xfr(host, fresh, query, port=port, timeout=timeout,
                                  lifetime=lifetime)
            if _soa(fresh) is None:
                raise dns.exception.FormError("the transferred zone has no SOA")
        except Exception as exc:  # noqa: BLE001 - classified here
            result, reason2 = self._classify(exc)
            attempts.append(("axfr", result))
            return XfrOutcome("axfr", result, reason="; ".join(r for r in (reason, reason2) if r),
                              serial=z.serial, attempts=attempts)
        self._adopt(z, fresh)
        return self._store(z, "axfr", attempts)

    def _store(self, z: _Source, kind: str, attempts: list[tuple[str, str]]) -> XfrOutcome:
        assert z.zone is not None
        try:
            _write_zone(z.zone, self.zone_path(z.src.name))
        except OSError as exc:
            attempts.append((kind, "error"))
            return XfrOutcome(kind, "error", reason=f"cannot write the zone file: {exc}",
                              serial=z.serial, attempts=attempts)
        attempts.append((kind, "ok"))
        return XfrOutcome(kind, "ok", changed=True, serial=z.serial, attempts=attempts)

    @staticmethod
    def _classify(exc: BaseException) -> tuple[str, str]:
        if isinstance(exc, dns.exception.Timeout | TimeoutError):
            return "timeout", "timed out"
        if isinstance(exc, _TSIG_ERRORS):
            return "tsig", f"TSIG: {type(exc).__name__} {exc}".strip()
        if isinstance(exc, dns.xfr.TransferError):
            result = "refused" if exc.rcode in _REFUSAL_RCODES else "error"
            return result, f"the primary answered {dns.rcode.to_text(exc.rcode)}"
        if isinstance(exc, dns.xfr.SerialWentBackwards):
            return "error", "the primary's serial went backwards"
        if isinstance(exc, ConnectionRefusedError):
            return "error", "connection refused"
        if isinstance(exc, EOFError):
            return "error", "the primary closed the connection"
        return "error", f"{type(exc).__name__}: {exc}"

    # --- NOTIFY ---------------------------------------------------------------------

    def handle_notify(self, raw: bytes, addr: Any) -> bytes | None:
        """Answer a DNS NOTIFY (opcode 4) and schedule a transfer. Never blocks."""
        try:
            msg = dns.message.from_wire(raw, keyring=False)
        except Exception as exc:  # noqa: BLE001 - garbage from the network
            self.notify_unknown += 1
            log.debug("NOTIFY from %s: unreadable (%s); dropped", addr, exc)
            return None
        if msg.flags & dns.flags.QR or msg.opcode() != dns.opcode.NOTIFY:
            return None
        try:
            host = _ip(str(addr[0]))
        except (ValueError, IndexError, TypeError):
            host = str(addr)
        if len(msg.question) != 1 or msg.question[0].rdtype != dns.rdatatype.SOA:
            self.notify_unknown += 1
            log.debug("NOTIFY from %s: not one SOA question; refused", host)
            return self._answer(msg, dns.rcode.FORMERR)
        qname = msg.question[0].name
        z = self._by_origin.get(qname)
        if z is None:
            self.notify_unknown += 1
            log.debug("NOTIFY from %s for %s: not a zone moat transfers; refused", host, qname)
            return self._answer(msg, dns.rcode.REFUSED)
        if host != z.primary[0] and not _in_networks(host, z.src.notify_from):
            z.notifies["refused"] += 1
            log.debug("NOTIFY for %s from %s: not the primary %s; refused", qname, host,
                      z.src.primary)
            return self._answer(msg, dns.rcode.REFUSED)
        if z.key is not None:
            try:
                msg = dns.message.from_wire(raw, keyring={z.key.name: z.key})
                signed = msg.had_tsig
            except Exception as exc:  # noqa: BLE001 - bad/unknown key, bad time
                signed = False
                log.debug("NOTIFY for %s from %s: TSIG check failed (%s)", qname, host,
                          type(exc).__name__)
            if not signed:
                z.notifies["refused"] += 1
                log.debug("NOTIFY for %s from %s: no valid TSIG with key %s; refused", qname,
                          host, z.key.name)
                return self._answer(msg, dns.rcode.REFUSED)
        z.notifies["accepted"] += 1
        log.info("NOTIFY for %s from %s: checking for a new serial", qname, host)
        z.wake.set()
        z.rearm.set()
        if self.on_notify is not None:
            try:
                self.on_notify(z.src.name)
            except Exception as exc:  # noqa: BLE001 - the answer goes out regardless
                log.error("NOTIFY for %s: passing it on failed: %s", qname, exc)
        return self._answer(msg, dns.rcode.NOERROR, aa=True)

    @staticmethod
    def _answer(msg: dns.message.Message, rcode: dns.rcode.Rcode,
                aa: bool = False) -> bytes | None:
        try:
            resp = dns.message.make_response(msg)
            resp.set_rcode(rcode)
            if aa:
                resp.flags |= dns.flags.AA
            return resp.to_wire()
        except Exception as exc:  # noqa: BLE001 - never let a NOTIFY hurt the listener
            log.debug("cannot answer a NOTIFY: %s", exc)
            return None

    # --- metrics --------------------------------------------------------------------

    def collect(self) -> list[Metric]:
        xfrs = CounterMetricFamily("moat_zone_transfers", "Zone transfers by kind and result",
                                   labels=["source", "kind", "result"])
        serial = GaugeMetricFamily("moat_zone_serial", "SOA serial of the zone's copy",
                                   labels=["source"])
        notify = CounterMetricFamily("moat_notify", "DNS NOTIFY messages received",
                                     labels=["source", "result"])
        last = GaugeMetricFamily("moat_zone_last_success_timestamp_seconds",
                                 "Unix time of the last successful check of the zone",
                                 labels=["source"])
        expired = GaugeMetricFamily("moat_zone_expired",
                                    "1 when no check succeeded for the SOA expire time "
                                    "(the last copy is still served)", labels=["source"])
        for name, z in sorted(self.zones.items()):
            for kind in KINDS:
                for result in RESULTS:
                    xfrs.add_metric([name, kind, result], z.counts[(kind, result)])
            if z.serial is not None:
                serial.add_metric([name], z.serial)
            for result in NOTIFY_RESULTS:
                notify.add_metric([name, result], z.notifies[result])
            if z.last_ok is not None:
                last.add_metric([name], z.last_ok)
            expired.add_metric([name], 1.0 if z.expired else 0.0)
        notify.add_metric([UNKNOWN_SOURCE, "refused"], self.notify_unknown)
        return [xfrs, serial, notify, last, expired]


__all__ = ["ZoneTransfers", "XfrOutcome", "KINDS", "RESULTS", "NOTIFY_RESULTS"]
