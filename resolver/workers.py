"""Several worker processes on one port (``--workers N``), one policy in memory.

    supervisor (this module)                      worker i (resolver/app.py, role "worker")
      builds the policy in a forked child  ---->    maps the same index file (shared pages)
      binds N socket sets with SO_REUSEPORT ---->   serves its own set; the kernel spreads
      drops privileges, serves /metrics   <----     clients over the sets by address/port
      sums the workers' counters          <----     pushes a counter snapshot every second
      on SIGHUP: rebuilds, tells workers  ---->     maps the new index, swaps, acknowledges
      restarts a worker that dies                   (its sockets stay open in the supervisor)

Why processes: one Python process answers on one core. Why the policy is not copied:
every worker maps the index file the supervisor's build child wrote (in a tmpfs), so
the kernel keeps one copy of its pages however many workers there are. Python's string
hash is seeded per interpreter and the index is keyed by it, so workers are forked from
the supervisor (same seed), never started afresh.

Metrics may lag by up to a second (the snapshot interval). With workers the verdict log
is one file per worker (``verdicts-w1.jsonl``...; ``moat report`` reads them together).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from policy.build import BuildReport, all_sources, build_in_child

from . import config as config_mod
from .config import Config, ConfigError

log = logging.getLogger("moat.workers")
_LEN = struct.Struct("!I")
SNAPSHOT_INTERVAL = 1.0


def _send(sock: socket.socket, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LEN.pack(len(data)) + data)


async def _recv(reader: asyncio.StreamReader) -> Any:
    (length,) = _LEN.unpack(await reader.readexactly(4))
    return pickle.loads(await reader.readexactly(length))


class Worker:
    """The supervisor's handle on one worker process."""

    def __init__(self, index: int, sockets: list[tuple[str, int, Any, Any]]) -> None:
        self.index = index
        self.sockets = sockets
        self.pid = 0
        self.channel: socket.socket | None = None
        self.snapshot: dict[str, Any] | None = None
        self.policy_version = 0
        self.reader_task: asyncio.Task[None] | None = None


class Supervisor:
    def __init__(self, config: Config, *, extra_rpz: tuple[str, ...] = (),
                 overrides: dict[str, Any] | None = None) -> None:
        from .config import default_state_dir

        self.config = config
        self.extra_rpz = extra_rpz
        self.overrides = overrides or {}
        self.state_dir = config.server.state_dir or default_state_dir()
        self.workers: list[Worker] = []
        self.version = 0
        self.policy_path = ""
        self.reloads: Counter[str] = Counter()
        self.last_reload = 0.0
        self.policy_rule_counts: list[tuple[str, str, int]] = []
        self.stopping = False
        self._reload_lock: asyncio.Lock | None = None
        self._stop: asyncio.Event | None = None
        self.metrics_server: Any = None
        self.feeds: Any = None
        self.zones: Any = None

    # --- what the metrics view needs -------------------------------------------------

    def healthy(self) -> bool:
        return bool(self.workers) and all(
            w.snapshot is not None and w.snapshot["listening"] and w.policy_version > 0
            for w in self.workers)

    def extra_metrics(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily("moat_workers", "Worker processes serving queries")
        g.add_metric([], sum(1 for w in self.workers if w.pid))
        yield g
        for manager in (self.feeds, self.zones):
            if manager is not None:
                yield from manager.collect()

    # --- policy --------------------------------------------------------------------

    def build(self, starting: bool = False) -> BuildReport | None:
        """Build the next policy version into an index file that workers will map
        (``starting``: no worker answers yet, the build may use a second core)."""
        self.version += 1
        try:
            policy, report = build_in_child(self.config.policy, self.version, self.state_dir,
                                            self.extra_rpz, unlink=False, starting=starting)
        except Exception as exc:  # noqa: BLE001 - keep the last good policy
            self.reloads["failed"] += 1
            log.error("policy build %d failed (%s); workers keep the current one",
                      self.version, exc)
            self.version -= 1
            return None
        from .app import record_build

        record_build(self, report, "build", report.seconds)
        # Keep the index file's name until every worker maps the new one (and for
        # workers restarted later).
        self._retired = self.policy_path
        self.policy_path = policy.index_file
        return report

    # --- processes -----------------------------------------------------------------

    def _fork_worker(self, w: Worker) -> None:
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the worker
            parent_end.close()
            code = 1
            try:
                code = _worker_main(self, w, child_end)
            except BaseException:  # noqa: BLE001
                logging.getLogger("moat").exception("worker %d crashed", w.index)
            finally:
                os._exit(code)
        child_end.close()
        w.pid = pid
        w.channel = parent_end
        w.snapshot = None
        w.policy_version = 0

    def run(self) -> int:
        from .cli import _new_loop

        loop = _new_loop()
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(self._supervise())
        finally:
            loop.close()

    async def _start_sources(self) -> None:
        """Feeds by URL and zones by transfer live here, in the supervisor."""
        from .app import start_network_sources
        from .upstream import Upstream

        self.feeds, self.zones = await start_network_sources(
            all_sources(self.config.policy, self.extra_rpz), self.state_dir,
            [(Upstream(h, p).host, p) for h, p in self.config.upstream.servers],
            self._source_changed)

    async def _source_changed(self, name: str) -> None:
        log.info("new copy of %s", name)
        await self.reload(reread_config=False)

    async def _supervise(self) -> int:
        loop = asyncio.get_running_loop()
        self._reload_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        await self._start_sources()
        report = await loop.run_in_executor(None, self.build, True)
        if report is None:
            log.error("no policy: not starting")
            return 1
        from .app import bind_sockets

        for i in range(self.config.server.workers):
            self.workers.append(Worker(i + 1, bind_sockets(self.config.server, reuse_port=True)))
        for w in self.workers:
            self._fork_worker(w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        loop.create_task(self._watch_workers())  # (uvloop keeps SIGCHLD for itself)
        for w in self.workers:
            w.reader_task = loop.create_task(self._read_worker(w))
        self._start_metrics()
        self._drop_privileges()
        addrs = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
                          for h, p, _, _ in self.workers[0].sockets)
        log.info("moat supervisor: %d workers on %s", len(self.workers), addrs)
        await self._stop.wait()
        return await self._shutdown()

    def _start_metrics(self) -> None:
        if not self.config.metrics.listen:
            return
        from prometheus_client import CollectorRegistry

        from .metrics import MetricsServer, MoatCollector, merged_view

        registry = CollectorRegistry()
        registry.register(MoatCollector(lambda: merged_view(
            [w.snapshot for w in self.workers if w.snapshot is not None], self)))
        host, port = config_mod.parse_hostport(self.config.metrics.listen)
        self.metrics_server = MetricsServer(host, port, registry, self.healthy)
        self.metrics_server.start()

    def _drop_privileges(self) -> None:
        from .app import drop_privileges

        drop_privileges(self.config.server.user, self.state_dir)

    async def _read_worker(self, w: Worker) -> None:
        assert w.channel is not None
        reader, _writer = await asyncio.open_connection(sock=w.channel)
        try:
            while True:
                kind, *rest = await _recv(reader)
                if kind == "stats":
                    w.snapshot = rest[0]
                elif kind == "notify" and self.zones is not None:
                    self.zones.request_refresh(rest[0])  # a worker got NOTIFY for it
                elif kind == "ready" or kind == "ack":
                    w.policy_version = rest[0]
                    self._maybe_retire()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass

    def _maybe_retire(self) -> None:
        """Unlink the previous index file once every worker maps the current one."""
        old = getattr(self, "_retired", "")
        if old and all(w.policy_version == self.version for w in self.workers):
            with contextlib.suppress(OSError):
                os.unlink(old)
            self._retired = ""

    async def reload(self, reread_config: bool = True) -> None:
        assert self._reload_lock is not None
        async with self._reload_lock:
            if reread_config and self.config.path:
                try:
                    new = config_mod.load(self.config.path, self.overrides)
                    self.config = replace(new, server=self.config.server,
                                          metrics=self.config.metrics)
                except ConfigError as exc:
                    self.reloads["config-rejected"] += 1
                    log.error("config reload rejected, keeping the running config:\n  %s",
                              "\n  ".join(exc.problems))
            loop = asyncio.get_running_loop()
            report = await loop.run_in_executor(None, self.build)  # the workers answer
            if report is None:
                return
            for w in self.workers:
                self._tell(w, ("policy", self.policy_path, self.version,
                               self.config if self.config.path else None))

    def _tell(self, w: Worker, message: Any) -> None:
        if w.channel is None:
            return
        try:
            _send(w.channel, message)
        except OSError as exc:
            log.warning("worker %d: cannot send %s: %s", w.index, message[0], exc)

    async def _watch_workers(self) -> None:
        while not self.stopping:
            await self._reap()
            await asyncio.sleep(0.25)

    async def _reap(self) -> None:
        # Only our workers' pids: a policy build child is waited for by build_in_child.
        for w in self.workers:
            if not w.pid:
                continue
            try:
                pid, status = os.waitpid(w.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = w.pid, 0
            if pid == 0:
                continue
            if True:
                    w.pid = 0
                    if w.reader_task is not None:
                        w.reader_task.cancel()
                    if w.channel is not None:
                        w.channel.close()
                        w.channel = None
                    if not self.stopping:
                        log.error("worker %d (pid %d) exited (%s); restarting it", w.index,
                                  pid, os.waitstatus_to_exitcode(status))
                        await asyncio.sleep(0.5)  # no tight loop if it keeps crashing
                        self._fork_worker(w)
                        w.reader_task = asyncio.get_running_loop().create_task(
                            self._read_worker(w))
                        if self.policy_path:
                            self._tell(w, ("policy", self.policy_path, self.version, None))

    async def _shutdown(self) -> int:
        self.stopping = True
        if self.feeds is not None:
            await self.feeds.stop()
        if self.zones is not None:
            await self.zones.stop()
        log.info("stopping %d workers", len(self.workers))
        for w in self.workers:
            if w.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_grace + 3.0
        while any(w.pid for w in self.workers) and time.monotonic() < deadline:
            await self._reap()
            await asyncio.sleep(0.05)
        for w in self.workers:
            if w.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        for path in (self.policy_path, getattr(self, "_retired", "")):
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        log.info("stopped")
        return 0


def worker_config(cfg: Config, index: int) -> Config:
    """A worker's own config: its own verdict log file (verdicts-w1.jsonl, ...)."""
    if cfg.log.query_log and cfg.log.query_log != "-":
        root, ext = os.path.splitext(cfg.log.query_log)
        cfg = replace(cfg, log=replace(cfg.log, query_log=f"{root}-w{index}{ext}"))
    return cfg


def _worker_main(sup: Supervisor, w: Worker, channel: socket.socket) -> int:
    """Runs in the forked worker process."""
    from . import __version__
    from .app import App
    from .cli import _new_loop

    # The supervisor's signal handlers and loop are not ours: start clean.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    asyncio.events._set_running_loop(None)
    # Keep this worker's sockets, close the other workers' copies.
    for other in sup.workers:
        if other is not w:
            for _h, _p, usock, tsock in other.sockets:
                usock.close()
                tsock.close()
    cfg = worker_config(sup.config, w.index)
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    app = App(cfg, extra_rpz=sup.extra_rpz, role="worker", sockets=w.sockets)
    app.adopt_policy(sup.policy_path, sup.version)
    if any(s.zone and s.primary for s in all_sources(cfg.policy, sup.extra_rpz)):
        # NOTIFY reaches the workers' sockets: check and answer it here, transfer there.
        from .xfr import ZoneTransfers

        async def unused(name: str) -> None:
            return None

        checker = ZoneTransfers(all_sources(cfg.policy, sup.extra_rpz), app.state_dir, unused,
                                on_notify=lambda name: _send(channel, ("notify", name)))
        app.pipeline.notify_handler = checker.handle_notify

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the supervisor reloads
        await app.start()
        reader, _ = await asyncio.open_connection(sock=channel)
        _send(channel, ("ready", app.holder.policy.version))

        async def commands() -> None:
            try:
                while True:
                    kind, *rest = await _recv(reader)
                    if kind == "policy":
                        path, version, new_cfg = rest
                        if new_cfg is not None:
                            app._apply_config(worker_config(new_cfg, w.index))
                        app.adopt_policy(path, version)
                        log.info("worker %d: policy version %d", w.index, version)
                        _send(channel, ("ack", version))
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                stop.set()  # the supervisor is gone: stop too

        async def push_stats() -> None:
            while True:
                with contextlib.suppress(OSError):
                    _send(channel, ("stats", app.snapshot()))
                await asyncio.sleep(SNAPSHOT_INTERVAL)

        tasks = [loop.create_task(commands()), loop.create_task(push_stats())]
        log.debug("worker %d (moat %s) serving", w.index, __version__)
        await stop.wait()
        for t in tasks:
            t.cancel()
        await app.shutdown()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return 0
