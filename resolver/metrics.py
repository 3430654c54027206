"""Prometheus metrics (prometheus-client) and the /healthz probe.

The request path only bumps plain counters (resolver/stats.py); this collector reads them
when Prometheus scrapes. Rules, checked by tests/resolver/test_metrics_lint.py: names start
with ``moat_``, counters end in ``_total``, durations are seconds, and label values come
from bounded sets only (category, family, action, source, transport, qtype-or-other,
rcode, upstream, result, kind, reason). Names, client addresses and rules never become
labels: they belong in the verdict log.

``moat_clients_with_threat_hits{category}`` counts distinct clients that got a verdict of
that category within ``THREAT_WINDOW`` seconds: the "share of devices talking to C2"
that threat reports quote (divide by ``moat_active_clients``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import stats as stats_mod
from . import wire

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("moat.metrics")

THREAT_WINDOW = 3600.0  # seconds: "recent" for moat_clients_with_threat_hits
ACTIVE_WINDOW = 3600.0
_MAX_TRACKED_CLIENTS = 65536


class ClientTracker:
    """Distinct clients seen recently, overall and per threat category (bounded)."""

    def __init__(self) -> None:
        self.active: dict[str, float] = {}
        self.by_category: dict[str, dict[str, float]] = {}

    def seen(self, host: str, now: float) -> None:
        active = self.active
        if host not in active and len(active) >= _MAX_TRACKED_CLIENTS:
            self._prune(active, now, ACTIVE_WINDOW)
        active[host] = now

    def threat(self, category: str, host: str, now: float) -> None:
        clients = self.by_category.get(category)
        if clients is None:
            clients = self.by_category[category] = {}
        if host not in clients and len(clients) >= _MAX_TRACKED_CLIENTS:
            self._prune(clients, now, THREAT_WINDOW)
        clients[host] = now

    @staticmethod
    def _prune(d: dict[str, float], now: float, window: float) -> None:
        for k in [k for k, t in d.items() if now - t > window]:
            del d[k]
        if len(d) >= _MAX_TRACKED_CLIENTS:
            d.clear()

    def counts(self, now: float) -> tuple[int, dict[str, int]]:
        active = sum(1 for t in list(self.active.values()) if now - t <= ACTIVE_WINDOW)
        cats = {c: sum(1 for t in list(d.values()) if now - t <= THREAT_WINDOW)
                for c, d in list(self.by_category.items())}
        return active, cats


def _histogram(name: str, doc: str, buckets: Iterable[float], counts: list[int], total: float,
               labels: list[str] | None = None, label_values: list[str] | None = None,
               family: HistogramMetricFamily | None = None) -> HistogramMetricFamily:
    fam = family or HistogramMetricFamily(name, doc, labels=labels)
    cumulative = []
    acc = 0
    for bound, n in zip(buckets, counts, strict=False):
        acc += n
        cumulative.append((repr(float(bound)), acc))
    acc += sum(counts[len(cumulative):])
    cumulative.append(("+Inf", acc))
    fam.add_metric(label_values or [], cumulative, total)
    return fam


class MoatCollector(Collector):
    """Reads a view of the server when scraped: the App itself, or (with several worker
    processes) a MergedView of their snapshots."""

    def __init__(self, view: Callable[[], Any]) -> None:
        self.view = view

    def collect(self) -> Iterable[Metric]:  # noqa: C901 - a flat list of metrics
        app: App = self.view()
        st = app.stats
        now = time.perf_counter()  # the clock ClientTracker is fed with

        # The fast path folds three counters into one (resolver/fastpath.py): unfold.
        fast = list(app.pipeline.fast.counts.items())
        fast_hits = sum(n for _, n in fast)
        queries = Counter(st.queries)
        responses = Counter(st.responses)
        policy_hits = Counter(st.policy_hits)
        for k, n in fast:
            queries[("udp", k >> 4)] += n
            responses[(k & 0xF, "cache")] += n
        for (cat, fam, action, src, qtype, rcode), n in list(
                app.pipeline.fast.synth_counts.items()):
            queries[("udp", qtype)] += n
            responses[(rcode, "policy")] += n
            policy_hits[(cat, fam, action, src)] += n

        c = CounterMetricFamily("moat_queries", "Queries received",
                                labels=["transport", "qtype"])
        folded: dict[tuple[str, str], int] = {}
        for (transport, qtype), n in queries.items():
            key = (transport, stats_mod.qtype_label(qtype))
            folded[key] = folded.get(key, 0) + n
        for (transport, qlabel), n in sorted(folded.items()):
            c.add_metric([transport, qlabel], n)
        yield c

        c = CounterMetricFamily("moat_responses", "Responses sent (DROP: none sent)",
                                labels=["rcode", "source"])
        for (rcode, source), n in sorted(responses.items()):
            c.add_metric([wire.RCODE_NAMES.get(rcode, "DROP" if rcode < 0 else "OTHER"),
                          source], n)
        yield c

        c = CounterMetricFamily("moat_policy_hits", "Policy verdicts by threat category",
                                labels=["category", "family", "action", "source"])
        for (cat, fam, action, src), n in sorted(policy_hits.items()):
            c.add_metric([cat, fam, action, src], n)
        yield c

        yield CounterMetricFamily("moat_cache_hits", "Answers served from the cache",
                                  value=app.cache.hits + fast_hits)
        yield CounterMetricFamily("moat_cache_misses", "Queries the cache could not answer",
                                  value=app.cache.misses)
        yield CounterMetricFamily("moat_cache_stale_served",
                                  "Stale answers served because every upstream failed",
                                  value=app.cache.stale_served)
        yield GaugeMetricFamily("moat_cache_entries", "Entries in the cache",
                                value=len(app.cache))

        c = CounterMetricFamily("moat_upstream_queries", "Exchanges with upstreams by result",
                                labels=["upstream", "result"])
        h = HistogramMetricFamily("moat_upstream_latency_seconds",
                                  "Time to a good upstream answer", labels=["upstream"])
        for u in app.upstreams.upstreams:
            for result, n in sorted(u.results.items()):
                c.add_metric([u.label, result], n)
            _histogram("", "", u.BUCKETS, u.latency_buckets, u.latency_sum,
                       label_values=[u.label], family=h)
        yield c
        yield h
        c = CounterMetricFamily("moat_upstream_ignored_answers",
                                "Packets on upstream sockets that were not the answer (wrong "
                                "source, ID or question, or malformed): a spoofing signal",
                                labels=["upstream"])
        for u in app.upstreams.upstreams:
            c.add_metric([u.label], getattr(u, "ignored", 0))
        yield c

        buckets = list(st.duration_buckets)
        buckets[0] += app.pipeline.fast.quick
        yield _histogram("moat_request_duration_seconds", "Time from query to answer",
                         stats_mod.DURATION_BUCKETS, buckets,
                         st.duration_sum + app.pipeline.fast.quick_sum)

        c = CounterMetricFamily("moat_malformed_queries", "Malformed queries by kind",
                                labels=["kind"])
        malformed = Counter(dict.fromkeys(stats_mod.MALFORMED_KINDS, 0))
        malformed.update(st.malformed)
        for kind, n in sorted(malformed.items()):
            c.add_metric([kind], n)
        yield c

        c = CounterMetricFamily("moat_shed_queries",
                                "Queries refused or dropped by ACL, rate limit or load limits",
                                labels=["reason"])
        shed = Counter(dict.fromkeys(stats_mod.SHED_REASONS, 0))
        shed.update(st.shed)
        for reason, n in sorted(shed.items()):
            c.add_metric([reason], n)
        tcp = app.tcp_state
        if tcp is not None:
            c.add_metric(["tcp-connection-cap"], tcp.refused)
            c.add_metric(["tcp-timeout"], tcp.timed_out)
        yield c

        c = CounterMetricFamily("moat_internal_errors", "Queries answered SERVFAIL after an "
                                "internal error", labels=["type"])
        for kind, n in sorted(list(st.errors.items())):
            c.add_metric([kind], n)
        yield c

        yield CounterMetricFamily("moat_dropped_log_lines",
                                  "Verdict log lines that could not be written",
                                  value=st.dropped_log_lines)

        g = GaugeMetricFamily("moat_policy_rules", "Rules loaded per source",
                              labels=["source", "category"])
        for src, cat, n in app.policy_rule_counts:
            g.add_metric([src, cat], n)
        yield g
        c = CounterMetricFamily("moat_policy_reloads", "Policy builds by result",
                                labels=["result"])
        reloads = Counter(dict.fromkeys(("ok", "partial", "failed", "config-rejected"), 0))
        reloads.update(app.reloads)
        for result, n in sorted(reloads.items()):
            c.add_metric([result], n)
        yield c
        yield GaugeMetricFamily("moat_policy_last_reload_timestamp_seconds",
                                "When the serving policy was built (Unix time)",
                                value=app.last_reload)
        yield GaugeMetricFamily("moat_policy_version", "Version of the serving policy",
                                value=app.holder.policy.version)

        active, cats = app.clients.counts(now)
        yield GaugeMetricFamily("moat_active_clients",
                                f"Distinct clients in the last {int(ACTIVE_WINDOW)} s",
                                value=active)
        g = GaugeMetricFamily("moat_clients_with_threat_hits",
                              f"Distinct clients with a verdict of this category in the "
                              f"last {int(THREAT_WINDOW)} s", labels=["category"])
        for cat, n in sorted(cats.items()):
            g.add_metric([cat], n)
        yield g

        yield from app.extra_metrics()

        yield GaugeMetricFamily("moat_up", "1 when listeners are up and a policy is loaded",
                                value=1 if app.healthy() else 0)


class _NS:
    """Attribute bag for MergedView (mirrors the App attributes the collector reads)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class _Entries(_NS):
    def __len__(self) -> int:
        return int(self.__dict__["entries"])


def merged_view(snapshots: list[dict[str, Any]], supervisor: Any) -> Any:
    """Sum worker snapshots (App.snapshot) into something MoatCollector can read.

    Counters add up; cache entries add up (each worker has its own cache); distinct
    clients are a union (the latest time seen wins)."""
    from .stats import Stats

    st = Stats()
    cache = [0, 0, 0, 0]
    ups: dict[str, Any] = {}  # label -> _NS of summed upstream figures
    ignored = [0, 0]
    fast_counts: Counter[int] = Counter()
    synth_counts: Counter[tuple[Any, ...]] = Counter()
    quick = [0, 0.0]
    tcp = [0, 0]
    clients = ClientTracker()
    for snap in snapshots:
        for name in ("queries", "responses", "malformed", "policy_hits", "shed", "errors"):
            getattr(st, name).update(snap[name])
        for i, n in enumerate(snap["duration_buckets"]):
            st.duration_buckets[i] += n
        st.duration_sum += snap["duration_sum"]
        st.dropped_log_lines += snap["dropped_log_lines"]
        for i, n in enumerate(snap["cache"]):
            cache[i] += n
        for label, results, buckets, total in snap["upstreams"]:
            u: Any = ups.get(label)
            if u is None:
                from .upstream import Upstream

                u = ups[label] = _NS(label=label, results=Counter(), BUCKETS=Upstream.BUCKETS,
                                     latency_buckets=[0] * len(buckets), latency_sum=0.0,
                                     ignored=0)
            u.results.update(results)
            u.ignored += snap.get("ignored_by", {}).get(label, 0)
            for i, n in enumerate(buckets):
                u.latency_buckets[i] += n
            u.latency_sum += total
        ignored[0] += snap["ignored"][0]
        ignored[1] += snap["ignored"][1]
        fast_counts.update(snap["fast"][0])
        quick[0] += snap["fast"][1]
        quick[1] += snap["fast"][2]
        synth_counts.update(snap["fast"][3])
        tcp[0] += snap["tcp"][0]
        tcp[1] += snap["tcp"][1]
        active, by_cat = snap["clients"]
        for host, t in active.items():
            clients.active[host] = max(t, clients.active.get(host, t))
        for cat, d in by_cat.items():
            target = clients.by_category.setdefault(cat, {})
            for host, t in d.items():
                target[host] = max(t, target.get(host, t))
    return _NS(
        stats=st,
        cache=_Entries(hits=cache[0], misses=cache[1], stale_served=cache[2], entries=cache[3]),
        upstreams=_NS(upstreams=list(ups.values()), mismatched=ignored[0], malformed=ignored[1]),
        pipeline=_NS(fast=_NS(counts=fast_counts, synth_counts=synth_counts, quick=quick[0],
                              quick_sum=quick[1])),
        tcp_state=_NS(refused=tcp[0], timed_out=tcp[1]),
        clients=clients,
        policy_rule_counts=supervisor.policy_rule_counts,
        reloads=supervisor.reloads,
        last_reload=supervisor.last_reload,
        holder=_NS(policy=_NS(version=supervisor.version)),
        extra_metrics=supervisor.extra_metrics,
        healthy=supervisor.healthy,
    )


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class _ThreadingWSGIServer(WSGIServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn(): a reverse DNS lookup through
        # the system resolver, which may be moat itself, not started yet.
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = self.server_address[1]
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        t = threading.Thread(target=self.process_request_thread,
                             args=(request, client_address), daemon=True)
        t.start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


def make_app(registry: CollectorRegistry, healthy: Callable[[], bool]) -> Callable[..., Any]:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") == "/healthz":
            ok = healthy()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"unhealthy\n"]
        if environ.get("PATH_INFO") not in ("/metrics", "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        return metrics_app(environ, start_response)

    return app


class MetricsServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 healthy: Callable[[], bool]) -> None:
        import socket

        class Server(_ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.httpd = make_server(host, port, make_app(registry, healthy),
                                 server_class=Server, handler_class=_QuietHandler)
        self.port = self.httpd.server_port
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="moat-metrics",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
