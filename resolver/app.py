"""The running server: builds the parts from the config, owns their lifetime.

Start-up order matters: the policy is built first and the listeners open only after it
is loaded, so moat never answers unprotected. Then privileges are dropped (when started as
root to bind port 53), then metrics and the verdict log start.

Signals: SIGTERM/SIGINT stop accepting, let in-flight queries finish (bounded by
``server.shutdown_grace``), flush the log and exit 0. SIGHUP re-reads the config file
(an invalid one is reported and the running config kept) and rebuilds the policy.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from policy import EmptyPolicy
from policy.build import (
    BuildReport,
    PendingBuild,
    all_sources,
    build_in_child,
    open_index_file,
)

from . import config as config_mod
from .acl import AccessList
from .cache import AnswerCache
from .config import Config, ConfigError, default_state_dir
from .feeds import FeedManager
from .metrics import MetricsServer, MoatCollector
from .pipeline import Pipeline, PipelineSettings, PolicyHolder
from .querylog import QueryLog
from .ratelimit import RateLimiter
from .rebinding import RebindingGuard
from .server import TcpConnection, TcpLimits, TcpState, UdpListener, tcp_socket, udp_socket
from .stats import Stats
from .upstream import UpstreamPool, UpstreamSettings
from .xfr import ZoneTransfers

log = logging.getLogger("moat")


class App:
    def __init__(self, config: Config, *, extra_rpz: tuple[str, ...] = (),
                 overrides: dict[str, Any] | None = None,
                 registry: CollectorRegistry | None = None, role: str = "single",
                 sockets: list[tuple[str, int, Any, Any]] | None = None,
                 first_build: PendingBuild | None = None) -> None:
        """``role``: "single" (the whole server) or "worker" (one of several processes
        sharing the port: listeners on ``sockets``, the policy pushed by the supervisor,
        metrics and feeds handled there; see resolver/workers.py). ``first_build``: the
        first policy (version 1), already building (see resolver/cli.py)."""
        self.role = role
        self.sockets = sockets
        self.config = config
        self.extra_rpz = extra_rpz
        self.overrides = overrides or {}
        self.state_dir = config.server.state_dir or default_state_dir()
        self.stats = Stats()
        self.holder = PolicyHolder(EmptyPolicy())
        self.cache = AnswerCache(config.cache)
        self.upstreams = UpstreamPool(self._upstream_settings(config))
        self.querylog = QueryLog(config.log.querylog(), self.stats)
        self.pipeline = Pipeline(
            holder=self.holder, cache=self.cache, upstreams=self.upstreams,
            acl=AccessList(config.acl.allow), ratelimit=RateLimiter(config.ratelimit),
            rebinding=RebindingGuard(config.rebinding), querylog=self.querylog,
            stats=self.stats,
            settings=PipelineSettings(max_in_flight=config.server.max_in_flight))
        self.clients = self.pipeline.clients
        self.tcp_state: TcpState | None = None
        self.udp: list[UdpListener] = []
        self.tcp_servers: list[asyncio.base_events.Server] = []
        self.bound: list[tuple[str, int]] = []
        self.metrics_server: MetricsServer | None = None
        self.registry = registry or CollectorRegistry()
        self.registry.register(MoatCollector(lambda: self))
        self.reloads: Counter[str] = Counter()
        self.last_reload = 0.0
        self.last_report: BuildReport | None = None
        self.policy_rule_counts: list[tuple[str, str, int]] = []
        self.policy_loaded = False
        self.listening = False
        self._version = 0
        self._reload_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._extra_collectors: list[Any] = []
        self.feeds: FeedManager | None = None
        self.zones: ZoneTransfers | None = None
        self._changed_sources: set[str] = set()
        self._rebuild_pending = False
        self._first_build = first_build

    @staticmethod
    def _upstream_settings(cfg: Config) -> UpstreamSettings:
        return UpstreamSettings(servers=cfg.upstream.servers, timeout=cfg.upstream.timeout,
                                deadline=cfg.upstream.deadline,
                                tcp_timeout=cfg.upstream.tcp_timeout)

    def healthy(self) -> bool:
        return self.listening and self.policy_loaded

    def extra_metrics(self) -> Iterable[Metric]:
        for collector in self._extra_collectors:
            yield from collector()

    def snapshot(self) -> dict[str, Any]:
        """This process's counters as plain data (a worker sends them to the supervisor)."""
        st = self.stats
        fast = self.pipeline.fast
        tcp = self.tcp_state
        return {
            "queries": dict(st.queries), "responses": dict(st.responses),
            "malformed": dict(st.malformed), "policy_hits": dict(st.policy_hits),
            "shed": dict(st.shed), "errors": dict(st.errors),
            "duration_buckets": list(st.duration_buckets), "duration_sum": st.duration_sum,
            "dropped_log_lines": st.dropped_log_lines,
            "cache": (self.cache.hits, self.cache.misses, self.cache.stale_served,
                      len(self.cache)),
            "upstreams": [(u.label, dict(u.results), list(u.latency_buckets), u.latency_sum)
                          for u in self.upstreams.upstreams],
            "ignored": (self.upstreams.mismatched, self.upstreams.malformed),
            "ignored_by": {u.label: u.ignored for u in self.upstreams.upstreams},
            "fast": (dict(fast.counts), fast.quick, fast.quick_sum, dict(fast.synth_counts)),
            "tcp": (tcp.refused, tcp.timed_out) if tcp is not None else (0, 0),
            "clients": (dict(self.clients.active),
                        {c: dict(d) for c, d in self.clients.by_category.items()}),
            "policy_version": self.holder.policy.version,
            "listening": self.listening,
        }

    def adopt_policy(self, path: str, version: int) -> None:
        """Worker: map a policy the supervisor built (resolver/workers.py) and swap it in."""
        policy, report = open_index_file(path, unlink=False)
        self.holder.swap(policy)
        self.policy_loaded = True
        self.last_reload = time.time()
        self.last_report = report

    # --- policy -----------------------------------------------------------------------

    async def reload_policy(self, reason: str = "reload") -> BuildReport | None:
        """Build a new policy beside the live one and swap it in (one reference)."""
        async with self._reload_lock:
            self._version += 1
            version = self._version
            cfg = self.config
            t0 = time.perf_counter()
            loop = asyncio.get_running_loop()
            first, self._first_build = self._first_build, None
            try:
                if first is not None:  # the first build (version 1), already running
                    policy, report = await loop.run_in_executor(None, first.result)
                else:
                    policy, report = await loop.run_in_executor(
                        None, functools.partial(build_in_child, cfg.policy, version,
                                                self.state_dir, self.extra_rpz,
                                                starting=not self.listening))
            except Exception as exc:  # noqa: BLE001 - keep serving the last good policy
                self._version -= 1  # versions count policies that served
                self.reloads["failed"] += 1
                log.error("policy build %d failed (%s); still serving version %d", version,
                          exc, self.holder.policy.version)
                return None
            self.holder.swap(policy)  # queries from now on see the new policy
            self.policy_loaded = True
            self.last_report = report
            record_build(self, report, reason, time.perf_counter() - t0)
            return report

    def _drop_privileges(self) -> None:
        drop_privileges(self.config.server.user, self.state_dir)

    # --- sources that come over the network (feeds by URL, zones by AXFR/IXFR) --------

    async def _start_sources(self) -> None:
        self.feeds, self.zones = await start_network_sources(
            all_sources(self.config.policy, self.extra_rpz), self.state_dir,
            [(u.host, u.port) for u in self.upstreams.upstreams], self._source_changed)
        if self.feeds is not None:
            self._extra_collectors.append(self.feeds.collect)
        if self.zones is not None:
            self._extra_collectors.append(self.zones.collect)
            self.pipeline.notify_handler = self.zones.handle_notify

    async def _source_changed(self, name: str) -> None:
        """A new copy of a feed or zone: rebuild; changes within 0.5 s share one rebuild."""
        self._changed_sources.add(name)
        if self._rebuild_pending:
            return
        self._rebuild_pending = True
        try:
            await asyncio.sleep(0.5)
        finally:
            self._rebuild_pending = False
        names = ", ".join(sorted(self._changed_sources))
        self._changed_sources.clear()
        await self.reload_policy(f"new copy of {names}")

    async def _stop_sources(self) -> None:
        if self.feeds is not None:
            await self.feeds.stop()
        if self.zones is not None:
            self.pipeline.notify_handler = None
            await self.zones.stop()

    # --- start, run, stop -------------------------------------------------------------

    async def start(self) -> None:
        """Policy first, then listeners, then drop privileges, then metrics and log."""
        if self.role == "single":
            await self._start_sources()
            await self.reload_policy("start")
        if self.config.metrics.listen and self.role == "single":
            # Before the DNS listeners: a probe that sees DNS answers can scrape at once
            # (/healthz says unhealthy until the listeners are up).
            host, port = config_mod.parse_hostport(self.config.metrics.listen)
            self.metrics_server = MetricsServer(host, port, self.registry, self.healthy)
            self.metrics_server.start()
            log.info("metrics on http://%s/metrics",
                     f"[{host}]:{self.metrics_server.port}" if ":" in host
                     else f"{host}:{self.metrics_server.port}")
        await self._open_listeners()
        self._drop_privileges()
        self.querylog.start()
        self.listening = True
        if self.role == "single":
            self._warn_open_resolver()
            self._start_timers()

    async def _open_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config.server
        limits = TcpLimits(idle_timeout=cfg.tcp_idle_timeout, read_timeout=cfg.tcp_read_timeout,
                           max_connections=cfg.tcp_max_connections,
                           max_per_client=cfg.tcp_max_connections_per_client)
        state = self.tcp_state = TcpState(limits)
        sockets = self.sockets if self.sockets is not None else bind_sockets(cfg)
        for host, port, usock, tsock in sockets:
            listener = UdpListener(self.pipeline)
            await loop.create_datagram_endpoint(lambda li=listener: li, sock=usock)  # type: ignore[misc]
            self.udp.append(listener)
            server = await loop.create_server(lambda: TcpConnection(self.pipeline, state),
                                              sock=tsock)
            self.tcp_servers.append(server)
            self.bound.append((host, port))

    def _warn_open_resolver(self) -> None:
        import ipaddress

        acl = self.pipeline.acl
        for host, port in self.bound:
            ip = ipaddress.ip_address(host)
            public = ip.is_global or ip.is_unspecified
            if public and acl.wide_open:
                log.warning("listening on %s:%d with an ACL that allows everyone: this is an "
                            "open resolver; restrict [acl] allow", host, port)

    def _start_timers(self) -> None:
        pol = self.config.policy
        if pol.reload_interval > 0:
            self._spawn(self._every(pol.reload_interval, "timer"))
        if pol.watch > 0:
            self._spawn(self._watch(pol.watch))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _every(self, seconds: float, reason: str) -> None:
        while True:
            await asyncio.sleep(seconds)
            await self.reload_policy(reason)

    def _file_stamps(self) -> dict[str, tuple[int, int]]:
        stamps = {}
        for src in all_sources(self.config.policy, self.extra_rpz):
            if src.path:
                try:
                    st = os.stat(src.path)
                    stamps[src.path] = (st.st_size, st.st_mtime_ns)
                except OSError:
                    stamps[src.path] = (-1, -1)
        return stamps

    async def _watch(self, seconds: float) -> None:
        before = self._file_stamps()
        while True:
            await asyncio.sleep(seconds)
            now = self._file_stamps()
            if now != before:
                before = now
                await self.reload_policy("file changed")

    async def reload_config(self) -> None:
        """SIGHUP: re-read the config file; keep the running one if the new one is bad."""
        if self.config.path:
            try:
                new = config_mod.load(self.config.path, self.overrides)
            except ConfigError as exc:
                log.error("config reload rejected, keeping the running config:\n  %s",
                          "\n  ".join(exc.problems))
                self.reloads["config-rejected"] += 1
                await self.reload_policy("SIGHUP (old config)")
                return
            self._apply_config(new)
        await self.reload_policy("SIGHUP")

    def _apply_config(self, new: Config) -> None:
        old = self.config
        if new.server.listen != old.server.listen or new.metrics != old.metrics or \
                new.server.workers != old.server.workers:
            log.warning("listen addresses, workers and metrics changes take effect at the "
                        "next restart")
            new = replace(new, server=replace(new.server, listen=old.server.listen,
                                              workers=old.server.workers),
                          metrics=old.metrics)
        p = self.pipeline
        if new.upstream != old.upstream:
            self.upstreams = p.upstreams = UpstreamPool(self._upstream_settings(new))
            if self.feeds is not None:
                self.feeds.set_upstreams([(u.host, u.port) for u in self.upstreams.upstreams])
        if self.feeds is not None and new.policy.sources != old.policy.sources:
            self._spawn(self.feeds.reconfigure(all_sources(new.policy, self.extra_rpz)))
        if new.cache != old.cache:
            if new.cache.size != old.cache.size:
                self.cache = p.cache = AnswerCache(new.cache)
            else:
                self.cache.settings = new.cache
        p.acl = AccessList(new.acl.allow)
        p.ratelimit = RateLimiter(new.ratelimit)
        p.rebinding = RebindingGuard(new.rebinding)
        p.settings = PipelineSettings(max_in_flight=new.server.max_in_flight)
        if new.log != old.log:
            self.querylog.stop()
            self.querylog = p.querylog = QueryLog(new.log.querylog(), self.stats)
            self.querylog.start()
        p.parts_changed()
        self.config = new
        log.info("config reloaded from %s", new.path)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP,
                                lambda: self._spawn(self.reload_config()))
        await self.start()
        addrs = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.bound)
        log.info("moat %s listening on %s (udp+tcp), upstreams %s", _version(), addrs,
                 ", ".join(u.label for u in self.upstreams.upstreams))
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        log.info("shutting down: no new queries, finishing the ones in flight")
        for listener in self.udp:
            listener.stop_accepting()
        for server in self.tcp_servers:
            server.close()
        await self.pipeline.drain(self.config.server.shutdown_grace)
        for listener in self.udp:
            listener.close()
        await self._stop_sources()
        if self.tcp_state is not None:
            for conn in list(self.tcp_state.connections):
                conn.close()
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self.querylog.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.listening = False
        log.info("stopped")


#: At the very first start, how long to wait for sources with no copy on disk yet.
INITIAL_FETCH_TIMEOUT = 20.0


async def start_network_sources(sources: list[Any], state_dir: str,
                                upstreams: list[tuple[str, int]], on_change: Any
                                ) -> tuple[FeedManager | None, ZoneTransfers | None]:
    """Feeds by URL and zones by transfer, if any source has them; returns once the ones
    with a copy on disk are scheduled and the others had INITIAL_FETCH_TIMEOUT to arrive."""
    feeds = zones = None
    starts = []
    if any(s.url for s in sources):
        feeds = FeedManager(sources, state_dir, upstreams, on_change)
        starts.append(feeds.start(INITIAL_FETCH_TIMEOUT))
    if any(s.zone and s.primary for s in sources):
        zones = ZoneTransfers(sources, state_dir, on_change)
        starts.append(zones.start(INITIAL_FETCH_TIMEOUT))
    if starts:
        await asyncio.gather(*starts)
    return feeds, zones


def drop_privileges(wanted: str, state_dir: str) -> None:
    """When root: switch to ``wanted`` (default moat, else nobody), keeping the state
    directory writable for it. "root" keeps root."""
    if os.geteuid() != 0:
        return
    import grp
    import pwd

    if wanted == "root":
        log.warning("running as root (server.user = \"root\"): not recommended")
        return
    candidates = [wanted] if wanted else ["moat", "nobody"]
    for name in candidates:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        try:
            # The state directory (feed copies, last good lists) must stay writable.
            os.makedirs(state_dir, exist_ok=True)
            os.chown(state_dir, pw.pw_uid, pw.pw_gid)
            for root, dirs, files in os.walk(state_dir):
                for entry in dirs + files:
                    os.chown(os.path.join(root, entry), pw.pw_uid, pw.pw_gid)
            groups = [g.gr_gid for g in grp.getgrall() if name in g.gr_mem]
            os.setgroups(groups)
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
        except OSError as exc:
            raise SystemExit(f"moat: cannot drop privileges to {name}: {exc}") from None
        log.info("dropped privileges to user %s (uid %d) after binding", name, pw.pw_uid)
        return
    raise SystemExit(f"moat: started as root and no user to drop to "
                     f"(tried {', '.join(candidates)}); set server.user")


def record_build(owner: Any, report: BuildReport, reason: str, seconds: float) -> None:
    """A policy was built: the owner's (App or Supervisor) figures for metrics, and the log.
    Rules are counted by the build process (no big temporary arrays in the server)."""
    owner.last_reload = time.time()
    owner.policy_rule_counts = [(s.name, s.category, s.rules) for s in report.sources]
    owner.reloads["ok" if report.ok else "partial"] += 1
    log_report(report, reason, seconds)


def log_report(report: BuildReport, reason: str, seconds: float) -> None:
    per_source = ", ".join(f"{s.name}={s.rules}" for s in report.sources)
    log.info("policy version %d loaded (%s) in %.2fs: %d rules (%s)", report.version,
             reason, seconds, report.rules, per_source)
    for s in report.sources:
        if s.status == "failed":
            log.error("source %s (%s) did not load: %s", s.name, s.location, s.error)
            if s.fail_closed:
                log.error("source %s fails closed: every query gets SERVFAIL until it loads",
                          s.name)
        elif s.status == "last-good":
            log.warning("source %s (%s) failed (%s); serving its last good copy",
                        s.name, s.location, s.error)
        for p in s.problems:
            log.warning("%s", p)
        if s.problem_count > len(s.problems):
            log.warning("source %s: %d more lines skipped", s.name,
                        s.problem_count - len(s.problems))
        for kind, n in sorted(s.unsupported.items()):
            log.warning("source %s: %d %s rules are not supported and were skipped",
                        s.name, n, kind)


def bind_sockets(cfg: Any, reuse_port: bool = False) -> list[tuple[str, int, Any, Any]]:
    """UDP and TCP sockets for every listen address: (host, port, udp, tcp)."""
    out = []
    for host, port in cfg.listen:
        usock = udp_socket(host, port, reuse_port, cfg.udp_rcvbuf)
        port = usock.getsockname()[1]  # with port 0, the one the kernel chose
        out.append((host, port, usock, tcp_socket(host, port, reuse_port)))
    return out


def _version() -> str:
    from . import __version__

    return __version__
