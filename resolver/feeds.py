"""Feeds that stay fresh: download the ``url`` sources and keep their copies current.

For every source with a ``url`` a :class:`FeedManager` keeps ``<state_dir>/feeds/<name>``
(the copy the policy build reads, see ``policy.build.state_paths``) and
``<state_dir>/feeds/<name>.meta`` (JSON: the validators ``etag`` / ``last_modified`` for
conditional requests, the URL they belong to, the SHA-256 of the copy and ``checked``, the
last time the server confirmed the copy was current).

Start-up: moat must never wait for the network when it can protect from disk. A source
that has a copy is refreshed in the background (first check when the copy is due, from
its age); only sources without any copy are fetched before :meth:`FeedManager.start`
returns, bounded by ``initial_timeout``. Then one task per source checks again every
``refresh`` seconds (±10 % jitter so several moats do not hit a provider in step; after a
failure sooner: 30 s doubling up to ``refresh``).

One download:

* the feed's host is looked up **through the configured upstreams** with dnspython (A,
  then AAAA when no IPv4 address connects), never through the system resolver: moat may
  be the host's only resolver and is not answering while it starts. An IP-literal host
  needs no lookup. HTTP proxies are not supported.
* a small HTTP/1.1 client on asyncio (``asyncio.open_connection(ip, port, ssl=ctx,
  server_hostname=host)``): the TCP connection goes to the resolved address, while the
  Host header, SNI and certificate check use the URL's host name (the default trust
  store, full verification). Why not urllib/http.client in a thread: they would resolve
  the name with the system resolver, and a thread cannot be cancelled; here one
  ``asyncio.timeout`` bounds the whole exchange (lookup, connect, TLS, headers, body) and
  ``stop()`` cancels at once. The client speaks just what is needed: GET with
  ``Connection: close``, status line + headers (bounded), Content-Length, chunked or
  read-to-close bodies, ``Content-Encoding: gzip`` (decompressed incrementally with an
  output cap, so a gzip bomb is "too_large"), up to 5 redirects (never https -> http).
* conditional request: ``If-None-Match`` / ``If-Modified-Since`` from the meta file, only
  when the copy exists and the meta belongs to the same URL. ``304`` = no change.
* ``200``: the body is streamed to a temporary file beside the copy, capped at
  ``max_bytes``; then checked: not empty, not HTML (a captive portal or error page), and
  a sample (the first 256 kB) parsed with the source's format must not be mostly rejected
  lines (the same rule the policy build applies to the whole file). Only then is it
  renamed over the copy (atomic) and ``on_change(name)`` awaited. A body identical to the
  copy (servers without validators) replaces nothing and changes nothing.
* every failure keeps the last good copy, is counted by result, and is logged once per
  failure streak with its reason (later failures of the streak at debug level; the
  recovery at info level).

Age: the copy's freshness is the later of the file's mtime (when it was written) and
``checked`` in the meta file (the last 304 or identical 200). The copy's mtime is never
touched on a 304, because the running policy identifies the file it read rules from by
(size, mtime) to show a matched rule's line (policy.engine.read_rule_line).

Metrics (:meth:`FeedManager.collect`):

* ``moat_feed_fetch_total{source,result}``: result is one of ``ok`` (200, new or
  identical content), ``not_modified`` (304), ``error`` (connect, TLS, HTTP status,
  protocol), ``too_large``, ``rejected`` (empty, HTML, does not parse), ``timeout``,
  ``dns`` (the host name did not resolve through the upstreams). Every result is exported
  for every source, from 0.
* ``moat_feed_age_seconds{source}``: now - freshness (see above); **+Inf** while a
  source has no copy at all, so ``moat_feed_age_seconds > X`` alerts also fire for a feed
  that never loaded.
* ``moat_feed_last_success_timestamp_seconds{source}``: Unix time of the last successful
  check (200 or 304), kept across restarts in the meta file; absent until there is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import math
import os
import random
import re
import ssl
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from policy.settings import SourceSettings

log = logging.getLogger("moat.feeds")

RESULTS = ("ok", "not_modified", "error", "too_large", "rejected", "timeout", "dns")
USER_AGENT = "moat-feeds/0.1 (protective DNS resolver; conditional GET)"
MAX_REDIRECTS = 5
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
SAMPLE_BYTES = 256 * 1024  # parsed before a new copy is accepted
READ_CHUNK = 64 * 1024
RETRY_FIRST = 30.0  # seconds after a first failure; doubles up to `refresh`
JITTER = 0.1


class FeedError(Exception):
    """A download that did not produce a new copy. ``result`` is a metric label."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


@dataclass(slots=True)
class FetchOutcome:
    result: str  # one of RESULTS
    changed: bool = False  # a new copy was installed
    reason: str = ""
    status: int = 0
    url: str = ""  # the final URL after redirects


@dataclass(slots=True)
class _Feed:
    src: SourceSettings
    counts: Counter[str] = field(default_factory=Counter)
    streak: int = 0  # consecutive failures
    last_error: str = ""
    task: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(slots=True)
class _Response:
    status: int
    reason: str
    headers: dict[str, str]


class _Sink:
    """Where a body goes: a temporary file, a hash, the first bytes, a size cap."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.size = 0
        self.head = bytearray()
        self.sha = hashlib.sha256()
        self.fh: Any = None  # opened at the first byte of a body

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self.size > self.max_bytes:
            raise FeedError("too_large", f"larger than max_bytes ({self.max_bytes})")
        if len(self.head) < SAMPLE_BYTES:
            self.head += data[:SAMPLE_BYTES - len(self.head)]
        self.sha.update(data)
        try:
            if self.fh is None:
                self.fh = open(self.path, "wb")  # noqa: SIM115 - closed in close()
            self.fh.write(data)
        except OSError as exc:  # disk full, read-only state directory
            raise FeedError("error", f"local file {self.path}: {exc}") from None

    def close(self) -> None:
        if self.fh is not None and not self.fh.closed:
            self.fh.close()

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


class _Gunzip:
    """Incremental gzip decoding with an output cap (a gzip bomb stops at the cap)."""

    def __init__(self, sink: _Sink) -> None:
        self.sink = sink
        self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def write(self, data: bytes) -> None:
        try:
            while data:
                room = self.sink.max_bytes - self.sink.size + 1
                out = self.d.decompress(data, max(room, 1))
                self.sink.write(out)
                data = self.d.unconsumed_tail
                if self.d.eof:
                    return  # trailing bytes after the gzip member are ignored
        except zlib.error as exc:
            raise FeedError("error", f"bad gzip data: {exc}") from None

    def finish(self) -> None:
        try:
            self.sink.write(self.d.flush())
        except zlib.error as exc:
            raise FeedError("error", f"bad gzip data: {exc}") from None
        if not self.d.eof:
            raise FeedError("error", "gzip body truncated")


def _host_header(host: str, port: int, tls: bool) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == (443 if tls else 80) else f"{shown}:{port}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


_HTML_TAG = re.compile(rb"<\s*(?:!doctype\s+html|html|head|body|title|script)\b", re.IGNORECASE)


def looks_like_html(head: bytes, content_type: str = "") -> bool:
    """A captive portal, login or error page instead of a list.

    No list format moat reads starts with ``<``; and a body the server calls text/html
    that carries an HTML tag near the top is a page, whatever it starts with.
    """
    text = head[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"<"):
        return True
    return "html" in content_type.lower() and _HTML_TAG.search(text[:2048]) is not None


def sample_problem(src: SourceSettings, head: bytes, complete: bool) -> str:
    """Why a new copy's first bytes do not look like the source's format ('' if fine).

    The same rule as policy.build._parse (more than 10 lines rejected and more than half
    of them), applied to a sample so that the main process never parses a whole list.
    """
    from policy import formats  # imported here: not needed unless a feed changes

    data = bytes(head)
    if not complete:  # cut at the last full line
        cut = data.rfind(b"\n")
        data = data[:cut + 1] if cut >= 0 else b""
        if not data:
            return ""
    fmt = src.format
    if fmt == "auto":
        fmt = formats.detect_format(src.name, data[:4096])
    try:
        parsed = formats.parse(data, fmt, src.name, origin=None)
    except (ValueError, UnicodeError) as exc:
        return f"does not parse as {fmt}: {exc}"
    lines = len(parsed) + len(parsed.problems) + len(parsed.ip_rules) + \
        len(parsed.patterns) + len(parsed.conditional)
    if len(parsed.problems) > 10 and len(parsed.problems) * 2 > lines:
        return (f"{len(parsed.problems)} of the first {lines} lines rejected: not a {fmt} "
                f"list (first: {parsed.problems[0]})")
    return ""


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()


def _fsync_and_replace(tmp: Path, target: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    with contextlib.suppress(OSError):  # the rename itself, on filesystems that need it
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _same_file(path: Path, size: int, digest: str) -> bool:
    try:
        if path.stat().st_size != size:
            return False
        sha = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                sha.update(chunk)
        return sha.hexdigest() == digest
    except OSError:
        return False


async def wait_for_first_copies(first: dict[str, asyncio.Task[Any]], timeout: float,
                                noun: str, verb: str) -> None:
    """Start-up: wait (bounded) for the sources that have no copy on disk yet; the others
    never make moat wait. Shared by feeds and zone transfers."""
    if not first:
        return
    log.info("%s %d %s(s) with no local copy yet: %s (waiting up to %.0fs)", verb,
             len(first), noun, ", ".join(first), timeout)
    _, pending = await asyncio.wait(first.values(), timeout=timeout)
    for name, task in first.items():
        if task in pending:
            log.warning("%s %s: no copy after %.0fs; moat starts without it and keeps trying",
                        noun, name, timeout)


class FeedManager:
    """Downloads the ``url`` sources into ``<state_dir>/feeds`` and keeps them fresh."""

    def __init__(self, sources: Sequence[SourceSettings], state_dir: str,
                 upstreams: Sequence[tuple[str, int]],
                 on_change: Callable[[str], Awaitable[Any]],
                 clock: Callable[[], float] = time.time) -> None:
        self.state_dir = state_dir
        self.dir = Path(state_dir) / "feeds"
        self.upstreams = [(str(h), int(p)) for h, p in upstreams]
        self.on_change = on_change
        self.clock = clock
        self.feeds: dict[str, _Feed] = {s.name: _Feed(s) for s in sources if s.url}
        self.ssl_context = ssl.create_default_context()
        self._started = False
        self._stopping = False
        self._initial: set[asyncio.Task[Any]] = set()

    # --- paths and state ------------------------------------------------------------

    def copy_path(self, name: str) -> Path:
        return self.dir / name

    def meta_path(self, name: str) -> Path:
        return self.dir / f"{name}.meta"

    def has_copy(self, name: str) -> bool:
        return self.copy_path(name).is_file()

    def fresh_since(self, name: str) -> float | None:
        """When the copy was last known to be current (None: no copy)."""
        try:
            mtime = self.copy_path(name).stat().st_mtime
        except OSError:
            return None
        checked = _read_meta(self.meta_path(name)).get("checked")
        if isinstance(checked, int | float) and checked > mtime:
            return float(checked)
        return mtime

    def age(self, name: str) -> float:
        since = self.fresh_since(name)
        return math.inf if since is None else max(0.0, self.clock() - since)

    def counts(self, name: str) -> Counter[str]:
        return self.feeds[name].counts

    def set_upstreams(self, upstreams: Sequence[tuple[str, int]]) -> None:
        """The upstream list changed (config reload): used from the next lookup on."""
        self.upstreams = [(str(h), int(p)) for h, p in upstreams]

    # --- lifetime -------------------------------------------------------------------

    async def start(self, initial_timeout: float) -> None:
        """Fetch the sources that have no copy (bounded), then refresh all in the background.

        Sources with a copy never delay this: the policy can be built from disk at once.
        ``on_change`` is not called for downloads finished before this returns (the
        caller builds its first policy afterwards); later ones call it.
        """
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # every download will fail and say so; moat still starts
            log.error("cannot create %s: %s", self.dir, exc)
        self._stopping = False
        missing = [f for f in self.feeds.values() if not self.has_copy(f.src.name)]
        first = {f.src.name: asyncio.create_task(self.refresh(f.src.name),
                                                 name=f"feed-initial-{f.src.name}")
                 for f in missing}
        self._initial.update(first.values())
        await wait_for_first_copies(first, initial_timeout, "feed", "downloading")
        self._started = True
        for name, feed in self.feeds.items():
            feed.task = asyncio.create_task(self._loop(name, first.get(name)),
                                            name=f"feed-{name}")

    async def stop(self) -> None:
        """Cancel every download and timer and wait for them."""
        self._stopping = True
        tasks = [f.task for f in self.feeds.values() if f.task is not None]
        tasks += list(self._initial)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._initial.clear()
        for feed in self.feeds.values():
            feed.task = None

    async def reconfigure(self, sources: Sequence[SourceSettings],
                          upstreams: Sequence[tuple[str, int]] | None = None) -> None:
        """A new config: stop feeds that went or changed, start new ones (no waiting)."""
        if upstreams is not None:
            self.set_upstreams(upstreams)
        wanted = {s.name: s for s in sources if s.url}
        for name in list(self.feeds):
            feed = self.feeds[name]
            if wanted.get(name) != feed.src:
                if feed.task is not None:
                    feed.task.cancel()
                    await asyncio.gather(feed.task, return_exceptions=True)
                del self.feeds[name]
        for name, src in wanted.items():
            if name not in self.feeds:
                self.feeds[name] = feed = _Feed(src)
                if self._started:
                    feed.task = asyncio.create_task(self._loop(name, None), name=f"feed-{name}")

    async def _loop(self, name: str, initial: asyncio.Task[Any] | None) -> None:
        feed = self.feeds[name]
        src = feed.src
        if initial is not None:  # the first download, started by start(): let it end
            with contextlib.suppress(Exception):
                await initial
            self._initial.discard(initial)
        else:
            # A copy from disk: check when it is due, not at every restart (at once if
            # the config now names another URL).
            age = self.age(name)
            same_url = _read_meta(self.meta_path(name)).get("url") == src.url
            due = 0.0 if math.isinf(age) or not same_url else max(0.0, src.refresh - age)
            await asyncio.sleep(due + random.uniform(0, min(5.0, src.refresh * JITTER)))
            await self.refresh(name)
        while not self._stopping:
            await asyncio.sleep(self._next_delay(feed))
            await self.refresh(name)

    def _next_delay(self, feed: _Feed) -> float:
        refresh = max(feed.src.refresh, 1.0)
        if feed.streak:
            delay = min(refresh, RETRY_FIRST * 2 ** (feed.streak - 1))
        else:
            delay = refresh
        return delay * random.uniform(1 - JITTER, 1 + JITTER)

    # --- one refresh ----------------------------------------------------------------

    async def refresh(self, name: str) -> FetchOutcome:
        """Check one feed now; count, log, install a new copy, call ``on_change``."""
        feed = self.feeds[name]
        async with feed.lock:  # never two downloads of one feed at once
            try:
                outcome = await self._fetch(feed.src)
            except Exception as exc:  # noqa: BLE001 - a bug must not end the refresh timer
                log.exception("feed %s: internal error", name)
                outcome = FetchOutcome("error", reason=f"internal error: {exc!r}")
        feed.counts[outcome.result] += 1
        src = feed.src
        if outcome.result in ("ok", "not_modified"):
            if feed.streak:
                log.info("feed %s: downloaded again after %d failed attempt(s)", name,
                         feed.streak)
            feed.streak = 0
            feed.last_error = ""
            if outcome.changed:
                log.info("feed %s: new copy from %s", name, outcome.url or src.url)
                if self._started and not self._stopping:
                    try:
                        await self.on_change(name)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - the feed itself is fine
                        log.error("feed %s: reacting to the new copy failed: %s", name, exc)
            else:
                log.debug("feed %s: unchanged (%s)", name, outcome.result)
        else:
            feed.streak += 1
            feed.last_error = outcome.reason
            keep = "keeping the last good copy" if self.has_copy(name) else \
                "no copy yet: the source does not protect"
            if feed.streak == 1:
                log.warning("feed %s: download from %s failed (%s): %s; %s", name, src.url,
                            outcome.result, outcome.reason, keep)
            else:
                log.debug("feed %s: still failing (%d in a row, %s): %s", name, feed.streak,
                          outcome.result, outcome.reason)
        return outcome

    async def _fetch(self, src: SourceSettings) -> FetchOutcome:
        name = src.name
        meta_path = self.meta_path(name)
        meta = _read_meta(meta_path)
        headers: dict[str, str] = {}
        if self.has_copy(name) and meta.get("url") == src.url:
            if meta.get("etag"):
                headers["If-None-Match"] = str(meta["etag"])
            if meta.get("last_modified"):
                headers["If-Modified-Since"] = str(meta["last_modified"])
        tmp = self.dir / f".{name}.download-{os.getpid()}"
        sink = _Sink(tmp, src.max_bytes)
        final_url = src.url
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            try:
                deadline = asyncio.get_running_loop().time() + src.timeout
                async with asyncio.timeout_at(deadline):
                    resp, final_url = await self._get(src.url, headers, sink, deadline)
            except TimeoutError:
                raise FeedError("timeout", f"no complete answer within {src.timeout:g}s") \
                    from None
            except OSError as exc:  # local file errors are FeedErrors already: the network
                raise FeedError("error", f"connection: {type(exc).__name__}: {exc}") from None
            sink.close()
            now = self.clock()
            if resp.status == 304:
                if not headers:
                    raise FeedError("error", "HTTP 304 to a request without validators")
                meta.update(checked=now)
                await asyncio.to_thread(_write_json_atomic, meta_path, meta)
                return FetchOutcome("not_modified", status=304, url=final_url)
            if sink.size == 0:
                raise FeedError("rejected", "empty body")
            if looks_like_html(bytes(sink.head), resp.headers.get("content-type", "")):
                raise FeedError("rejected", "an HTML page, not a list (captive portal or "
                                "error page?)")
            digest = sink.sha.hexdigest()
            new_meta = {"url": src.url, "etag": resp.headers.get("etag", ""),
                        "last_modified": resp.headers.get("last-modified", ""),
                        "sha256": digest, "size": sink.size, "checked": now,
                        "final_url": final_url}
            copy = self.copy_path(name)
            if await asyncio.to_thread(_same_file, copy, sink.size, digest):
                sink.discard()
                await asyncio.to_thread(_write_json_atomic, meta_path, new_meta)
                return FetchOutcome("ok", changed=False, status=resp.status, url=final_url)
            complete = sink.size <= SAMPLE_BYTES
            problem = await asyncio.to_thread(sample_problem, src, bytes(sink.head), complete)
            if problem:
                raise FeedError("rejected", problem)
            await asyncio.to_thread(_fsync_and_replace, tmp, copy)
            await asyncio.to_thread(_write_json_atomic, meta_path, new_meta)
            return FetchOutcome("ok", changed=True, status=resp.status, url=final_url)
        except FeedError as exc:
            sink.discard()
            return FetchOutcome(exc.result, reason=exc.reason, url=final_url)
        except OSError as exc:  # the state directory, installing the copy
            sink.discard()
            return FetchOutcome("error", reason=f"local file: {exc}", url=final_url)
        except BaseException:
            sink.discard()
            raise

    # --- HTTP -----------------------------------------------------------------------

    async def _get(self, url: str, headers: dict[str, str], sink: _Sink,
                   deadline: float) -> tuple[_Response, str]:
        for _ in range(MAX_REDIRECTS + 1):
            resp, location = await self._exchange(url, headers, sink, deadline)
            if location is None:
                return resp, url
            new = urljoin(url, location)
            if urlsplit(url).scheme == "https" and urlsplit(new).scheme != "https":
                raise FeedError("error", f"refusing a redirect from https to {new}")
            if urlsplit(new).scheme not in ("http", "https"):
                raise FeedError("error", f"redirect to an unsupported URL {new!r}")
            log.debug("feed: %s redirects to %s", url, new)
            url = new
        raise FeedError("error", f"more than {MAX_REDIRECTS} redirects")

    async def _exchange(self, url: str, headers: dict[str, str], sink: _Sink,
                        deadline: float) -> tuple[_Response, str | None]:
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        host = parts.hostname or ""
        if not host:
            raise FeedError("error", f"no host in {url!r}")
        try:
            port = parts.port or (443 if tls else 80)
        except ValueError:
            raise FeedError("error", f"bad port in {url!r}") from None
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        reader, writer = await self._connect(host, port, tls, deadline)
        try:
            lines = [f"GET {path} HTTP/1.1", f"Host: {_host_header(host, port, tls)}",
                     f"User-Agent: {USER_AGENT}", "Accept: */*", "Accept-Encoding: gzip",
                     "Connection: close"]
            lines += [f"{k}: {v}" for k, v in headers.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            await writer.drain()
            resp = await self._read_head(reader)
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.headers.get("location")
                if not location:
                    raise FeedError("error", f"HTTP {resp.status} without a Location")
                return resp, location
            if resp.status == 304:
                return resp, None
            if resp.status != 200:
                raise FeedError("error", f"HTTP {resp.status} {resp.reason}".strip())
            await self._read_body(reader, resp, sink)
            return resp, None
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _connect(self, host: str, port: int, tls: bool, deadline: float
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ctx = self.ssl_context if tls else None
        tried: list[str] = []
        last: BaseException | None = None
        lookups = [None] if _is_ip(host) else ["A", "AAAA"]
        dns_errors: list[str] = []
        for rdtype in lookups:
            if rdtype is None:
                addresses = [host]
            else:
                try:
                    addresses = await self._resolve(host, rdtype, deadline)
                except FeedError as exc:
                    dns_errors.append(exc.reason)
                    if rdtype == "A" and not exc.reason.endswith("no address"):
                        # NXDOMAIN, or no upstream answered: AAAA would fare no better.
                        raise FeedError("dns", f"{host}: {exc.reason}") from None
                    continue
            for ip in addresses:
                tried.append(ip)
                try:
                    return await asyncio.open_connection(
                        ip, port, ssl=ctx, server_hostname=host if tls else None,
                        limit=MAX_HEADER_BYTES)
                except ssl.SSLError as exc:  # the name or certificate, not this address
                    raise FeedError("error", f"TLS with {host} ({ip}): {exc}") from None
                except OSError as exc:
                    last = exc
        if not tried:
            raise FeedError("dns", f"{host}: " + "; ".join(dns_errors))
        raise FeedError("error", f"cannot connect to {host} port {port} "
                        f"({', '.join(tried)}): {last}")

    async def _resolve(self, host: str, rdtype: str, deadline: float) -> list[str]:
        """Addresses of ``host`` from the configured upstreams (not the system resolver).

        The lookup ends a little before the download's deadline, so that a silent
        upstream is reported as ``dns`` rather than ``timeout``.
        """
        if not self.upstreams:
            raise FeedError("dns", "no upstreams configured")
        left = deadline - asyncio.get_running_loop().time()
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in self.upstreams]
        resolver.lifetime = max(0.05, min(5.0, left * 0.8))
        resolver.timeout = min(2.0, resolver.lifetime)
        resolver.cache = None
        try:
            answer = await resolver.resolve(host, rdtype, search=False,
                                            raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise FeedError("dns", f"{rdtype}: NXDOMAIN") from None
        except dns.resolver.NoNameservers as exc:
            raise FeedError("dns", f"{rdtype}: no upstream answered ({exc})") from None
        except dns.exception.Timeout:
            raise FeedError("dns", f"{rdtype}: upstreams timed out") from None
        except dns.exception.DNSException as exc:
            raise FeedError("dns", f"{rdtype}: {exc}") from None
        # answer.rrset: the final RRset, after any CNAME chain (dnspython checked it).
        out = [rd.address for rd in answer.rrset] if answer.rrset is not None else []
        if not out:
            raise FeedError("dns", f"{rdtype}: no address")
        return out

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> _Response:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                raise FeedError("error", "connection closed before an HTTP answer" if
                                not exc.partial else "truncated HTTP status line") from None
            except asyncio.LimitOverrunError:
                raise FeedError("error", "HTTP status line too long") from None
            m = re.match(rb"HTTP/1\.[01] (\d{3})(?: (.*))?\r?\n$", line)
            if not m:
                raise FeedError("error", f"not an HTTP answer: {line[:80]!r}")
            status = int(m.group(1))
            headers: dict[str, str] = {}
            total = len(line)
            for _ in range(MAX_HEADERS + 1):
                try:
                    hline = await reader.readuntil(b"\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    raise FeedError("error", "bad HTTP header block") from None
                total += len(hline)
                if total > MAX_HEADER_BYTES:
                    raise FeedError("error", "HTTP headers too large")
                if hline in (b"\r\n", b"\n"):
                    break
                key, sep, value = hline.decode("latin-1").partition(":")
                if not sep:
                    raise FeedError("error", f"bad HTTP header {hline[:80]!r}")
                key = key.strip().lower()
                value = value.strip()
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
            else:
                raise FeedError("error", "too many HTTP headers")
            if 100 <= status < 200:
                continue  # an interim answer (100 Continue, 103 Early Hints)
            reason = (m.group(2) or b"").decode("latin-1", "replace").strip()
            return _Response(status, reason, headers)

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, resp: _Response, sink: _Sink) -> None:
        encoding = resp.headers.get("content-encoding", "identity").strip().lower()
        gz: _Gunzip | None = None
        write: Callable[[bytes], None]
        if encoding in ("gzip", "x-gzip"):
            gz = _Gunzip(sink)
            write = gz.write
        elif encoding in ("", "identity"):
            write = sink.write
        else:
            raise FeedError("error", f"unsupported Content-Encoding {encoding!r}")
        te = resp.headers.get("transfer-encoding", "").lower()
        if te:
            if te.split(",")[-1].strip() != "chunked":
                raise FeedError("error", f"unsupported Transfer-Encoding {te!r}")
            await FeedManager._read_chunked(reader, write, sink.max_bytes)
        elif "content-length" in resp.headers:
            try:
                length = int(resp.headers["content-length"].split(",")[0])
            except ValueError:
                raise FeedError("error", "bad Content-Length") from None
            if length > sink.max_bytes:
                raise FeedError("too_large", f"Content-Length {length} is larger than "
                                f"max_bytes ({sink.max_bytes})")
            remaining = length
            while remaining:
                chunk = await reader.read(min(READ_CHUNK, remaining))
                if not chunk:
                    raise FeedError("error", f"connection closed {remaining} bytes before "
                                    "the end of the body")
                remaining -= len(chunk)
                write(chunk)
        else:
            received = 0
            while chunk := await reader.read(READ_CHUNK):
                received += len(chunk)
                if received > sink.max_bytes:
                    raise FeedError("too_large", f"larger than max_bytes ({sink.max_bytes})")
                write(chunk)
        if gz is not None:
            gz.finish()

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader, write: Callable[[bytes], None],
                            max_bytes: int) -> None:
        received = 0
        while True:
            try:
                line = await reader.readuntil(b"\n")
                size = int(line.split(b";")[0].strip(), 16)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                raise FeedError("error", "bad chunked body") from None
            if size == 0:
                for _ in range(MAX_HEADERS + 1):  # trailers, then the blank line
                    try:
                        tline = await reader.readuntil(b"\n")
                    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                        return  # closed after the last chunk: the body is complete
                    if tline in (b"\r\n", b"\n"):
                        return
                return
            received += size
            if received > max_bytes:
                raise FeedError("too_large", f"larger than max_bytes ({max_bytes})")
            remaining = size
            while remaining:
                chunk = await reader.read(min(READ_CHUNK, remaining))
                if not chunk:
                    raise FeedError("error", "connection closed inside a chunk")
                remaining -= len(chunk)
                write(chunk)
            try:
                await reader.readexactly(2)  # CRLF after the chunk
            except asyncio.IncompleteReadError:
                raise FeedError("error", "bad chunked body") from None

    # --- metrics --------------------------------------------------------------------

    def collect(self) -> list[Metric]:
        fetch = CounterMetricFamily("moat_feed_fetch", "Feed downloads by result",
                                    labels=["source", "result"])
        age = GaugeMetricFamily("moat_feed_age_seconds",
                                "Seconds since the feed's copy was last known current "
                                "(+Inf: no copy)", labels=["source"])
        last = GaugeMetricFamily("moat_feed_last_success_timestamp_seconds",
                                 "Unix time of the last successful check (200 or 304)",
                                 labels=["source"])
        for name, feed in sorted(self.feeds.items()):
            for result in RESULTS:
                fetch.add_metric([name, result], feed.counts[result])
            age.add_metric([name], self.age(name))
            since = self.fresh_since(name)
            if since is not None:
                last.add_metric([name], since)
        return [fetch, age, last]


def http_date(ts: float) -> str:
    """An HTTP date (for tests and tools): ``Sun, 06 Nov 1994 08:49:37 GMT``."""
    return formatdate(ts, usegmt=True)


__all__ = ["FeedManager", "FeedError", "FetchOutcome", "RESULTS", "looks_like_html",
           "sample_problem", "http_date"]
