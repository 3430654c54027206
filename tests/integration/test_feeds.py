"""Feeds that stay fresh (resolver/feeds.py) against a real HTTP server and a real DNS
server on loopback.

* The HTTP server is Python's http.server in a thread, serving list files with ETag and
  Last-Modified and answering conditional requests with 304; per path it can also answer
  with an error status, slowly, gzip-encoded, chunked, or as a redirect. It records the
  headers of every request.
* The feed URLs name the host ``feeds.test``. Only NSD (the harness NsdServer, given to
  the FeedManager as its upstream) knows that name: a download that works proves that the
  host was looked up through the configured upstreams, not /etc/hosts or the system
  resolver.

The end-to-end test runs the real ``moat serve`` and is skipped until resolver/app.py
constructs the FeedManager. Every test is bounded in time and stops what it starts.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import math
import os
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.query
import dns.rcode
import pytest
from harness import REPO_ROOT, NsdServer, dns_query, free_port_on, make_zone, require_binary
from harness.waiting import wait_for_async as wait_for

from policy.settings import SourceSettings
from resolver import config as config_mod
from resolver.feeds import FeedManager, http_date

pytestmark = pytest.mark.integration

LIST1 = b"# test list\nlisted.example\nbad-one.example\n"
LIST2 = b"# test list\nlisted.example\nbad-one.example\nbad-two.example\n"
HTML = (b"<!DOCTYPE html>\n<html><head><title>Hotel WiFi</title></head>"
        b"<body>Please log in</body></html>\n")


# --- the HTTP server ----------------------------------------------------------------


@dataclass
class Entry:
    body: bytes = b""
    status: int = 200
    content_type: str = "text/plain; charset=utf-8"
    delay: float = 0.0
    gzip: bool = False
    chunked: bool = False
    no_length: bool = False  # neither Content-Length nor chunked: read to close
    location: str = ""  # a redirect
    validators: bool = True
    modified: float = field(default_factory=lambda: time.time() - 60)

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'


class Site:
    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.release = threading.Event()  # ends slow answers at teardown

    def put(self, path: str, body: bytes, **kw: Any) -> Entry:
        entry = Entry(body=body, **kw)
        self.entries[path] = entry
        return entry

    def last(self, path: str) -> dict[str, str]:
        for p, headers in reversed(self.requests):
            if p == path:
                return headers
        raise AssertionError(f"no request for {path}")

    def count(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        site: Site = self.server.site
        headers = {k.lower(): v for k, v in self.headers.items()}
        site.requests.append((self.path, headers))
        entry = site.entries.get(self.path)
        if entry is None:
            self._send(404, b"not found\n", "text/plain")
            return
        if entry.delay:
            site.release.wait(entry.delay)
        if entry.location:
            self.send_response(302)
            self.send_header("Location", entry.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if entry.status != 200:
            self._send(entry.status, entry.body, entry.content_type)
            return
        if entry.validators:
            inm = headers.get("if-none-match")
            ims = headers.get("if-modified-since")
            if inm == entry.etag or (inm is None and ims == http_date(entry.modified)):
                self.send_response(304)
                self.send_header("ETag", entry.etag)
                self.end_headers()
                return
        body = entry.body
        extra = {}
        if entry.gzip and "gzip" in headers.get("accept-encoding", ""):
            body = gzip.compress(body)
            extra["Content-Encoding"] = "gzip"
        if entry.validators:
            extra["ETag"] = entry.etag
            extra["Last-Modified"] = http_date(entry.modified)
        self._send(200, body, entry.content_type, extra, chunked=entry.chunked,
                   no_length=entry.no_length)

    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None,
              chunked: bool = False, no_length: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif no_length:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if chunked:
            for i in range(0, len(body), 700):
                part = body[i:i + 700]
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(body)


class HttpServer:
    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.site = Site()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.site = self.site  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.stopped = False

    def url(self, path: str, host: str = "feeds.test", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.site.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def http() -> Iterator[HttpServer]:
    server = HttpServer()
    try:
        yield server
    finally:
        server.stop()


FEEDS_ZONE = make_zone("feeds.test.", [], extra="@ 300 IN A 127.0.0.1\n"
                       "www 300 IN CNAME feeds.test.\n")


@pytest.fixture(scope="module")
def nsd() -> Iterator[NsdServer]:
    require_binary("nsd")
    with NsdServer({"feeds.test.": FEEDS_ZONE}) as server:
        yield server


# --- helpers ------------------------------------------------------------------------


def run(coro: Awaitable[Any], timeout: float = 30.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def src(name: str, url: str, **kw: Any) -> SourceSettings:
    kw.setdefault("format", "domains")
    kw.setdefault("timeout", 5.0)
    kw.setdefault("refresh", 3600.0)
    return SourceSettings(name=name, url=url, **kw)


class Changes:
    def __init__(self) -> None:
        self.names: list[str] = []

    async def __call__(self, name: str) -> None:
        self.names.append(name)


def manager(tmp_path: Path, nsd: NsdServer, *sources: SourceSettings,
            changes: Changes | None = None, **kw: Any) -> FeedManager:
    return FeedManager(list(sources), str(tmp_path), [(nsd.host, nsd.port)],
                       changes or Changes(), **kw)


def sample(fm: FeedManager, metric: str, **labels: str) -> float | None:
    for family in fm.collect():
        for s in family.samples:
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


# --- tests --------------------------------------------------------------------------


def test_fetch_conditional_change_and_metrics(tmp_path: Path, nsd: NsdServer,
                                              http: HttpServer) -> None:
    entry = http.site.put("/list.txt", LIST1)
    changes = Changes()
    fm = manager(tmp_path, nsd, src("list", http.url("/list.txt")), changes=changes)
    copy = tmp_path / "feeds" / "list"

    async def scenario() -> None:
        assert sample(fm, "moat_feed_age_seconds", source="list") == math.inf
        try:
            # No copy yet: start() waits for the first download (the host name resolves
            # only through NSD, the configured upstream).
            await fm.start(initial_timeout=10)
            assert copy.read_bytes() == LIST1
            assert http.site.last("/list.txt").get("host") == f"feeds.test:{http.port}"
            assert "if-none-match" not in http.site.last("/list.txt")
            # Finished inside start(): the caller builds its first policy next.
            assert changes.names == []

            # Second check: conditional, 304, nothing changes.
            mtime = copy.stat().st_mtime_ns
            out = await fm.refresh("list")
            assert out.result == "not_modified", out
            seen = http.site.last("/list.txt")
            assert seen.get("if-none-match") == entry.etag
            assert seen.get("if-modified-since") == http_date(entry.modified)
            assert changes.names == []
            assert copy.stat().st_mtime_ns == mtime  # the policy's (size, mtime) stays valid

            # A changed list: downloaded, installed, on_change called.
            http.site.put("/list.txt", LIST2)
            out = await fm.refresh("list")
            assert out.result == "ok" and out.changed, out
            assert copy.read_bytes() == LIST2
            assert changes.names == ["list"]

            # Metrics: counts by result, a finite age, a success time.
            assert sample(fm, "moat_feed_fetch_total", source="list", result="ok") == 2
            assert sample(fm, "moat_feed_fetch_total", source="list", result="not_modified") == 1
            assert sample(fm, "moat_feed_fetch_total", source="list", result="error") == 0
            age = sample(fm, "moat_feed_age_seconds", source="list")
            assert age is not None and 0 <= age < 30
            last = sample(fm, "moat_feed_last_success_timestamp_seconds", source="list")
            assert last is not None and abs(last - time.time()) < 30
        finally:
            await fm.stop()

    run(scenario())


def test_late_first_download_calls_on_change(tmp_path: Path, nsd: NsdServer,
                                             http: HttpServer) -> None:
    """start() stops waiting after initial_timeout; the download finishes in the
    background and then asks for a rebuild."""
    http.site.put("/slow.txt", LIST1, delay=1.0)
    changes = Changes()
    fm = manager(tmp_path, nsd, src("slow", http.url("/slow.txt")), changes=changes)

    async def scenario() -> None:
        try:
            t0 = time.monotonic()
            await fm.start(initial_timeout=0.2)
            assert time.monotonic() - t0 < 0.9
            assert not (tmp_path / "feeds" / "slow").exists()
            await wait_for(lambda: changes.names == ["slow"], 10, "the late download")
            assert (tmp_path / "feeds" / "slow").read_bytes() == LIST1
        finally:
            await fm.stop()

    run(scenario())


def test_bad_answers_keep_the_last_good_copy(tmp_path: Path, nsd: NsdServer,
                                             http: HttpServer,
                                             caplog: pytest.LogCaptureFixture) -> None:
    http.site.put("/list.txt", LIST1)
    changes = Changes()
    fm = manager(tmp_path, nsd, src("list", http.url("/list.txt")), changes=changes)
    copy = tmp_path / "feeds" / "list"

    async def scenario() -> None:
        assert (await fm.refresh("list")).result == "ok"
        assert changes.names == []  # not started: no rebuild requested
        cases = [
            # (what the server does, expected result)
            (dict(body=HTML, content_type="text/html"), "rejected"),  # captive portal
            (dict(body=b"  \r\n" + HTML, content_type="text/plain"), "rejected"),
            (dict(body=b"", validators=False), "rejected"),  # empty
            (dict(body=b"Internal error\n", status=500), "error"),
            (dict(body=b"gone\n", status=404), "error"),
            # 200 but not a list of this format: mostly rejected lines
            (dict(body=b"".join(b"error: quota exceeded for key %d, try later!\n" % i
                                for i in range(40))), "rejected"),
        ]
        for behaviour, expected in cases:
            http.site.put("/list.txt", **behaviour)  # type: ignore[arg-type]
            out = await fm.refresh("list")
            assert out.result == expected, (behaviour, out)
            assert copy.read_bytes() == LIST1, behaviour
        assert changes.names == []
        # One warning for the whole failure streak, with its reason.
        warnings = [r.getMessage() for r in caplog.records
                    if r.name == "moat.feeds" and r.levelname == "WARNING"]
        assert len(warnings) == 1 and "HTML" in warnings[0], warnings
        assert sample(fm, "moat_feed_fetch_total", source="list", result="rejected") == 4
        assert sample(fm, "moat_feed_fetch_total", source="list", result="error") == 2
        assert not list((tmp_path / "feeds").glob(".*download*"))  # no temp files left
        # The server recovers: downloaded again.
        http.site.put("/list.txt", LIST2)
        out = await fm.refresh("list")
        assert out.result == "ok" and out.changed
        assert copy.read_bytes() == LIST2

    run(scenario())


def test_size_cap_gzip_chunked_redirect(tmp_path: Path, nsd: NsdServer,
                                        http: HttpServer) -> None:
    big = b"# big\n" + b"".join(b"name%05d.example\n" % i for i in range(400))  # ~7 kB
    http.site.put("/big.txt", big)
    http.site.put("/big-chunked.txt", big, chunked=True)
    http.site.put("/big-close.txt", big, no_length=True)
    http.site.put("/bomb.txt", b"# bomb\n" + b"a.example\n" * 100_000, gzip=True)  # ~1 MB
    http.site.put("/gz.txt", big, gzip=True)
    http.site.put("/chunked.txt", big, chunked=True, gzip=True)
    http.site.put("/moved", b"", location="/gz.txt")
    http.site.put("/plain.txt", big)
    fm = manager(tmp_path, nsd,
                 src("big", http.url("/big.txt"), max_bytes=2000),
                 src("big-chunked", http.url("/big-chunked.txt"), max_bytes=2000),
                 src("big-close", http.url("/big-close.txt"), max_bytes=2000),
                 src("bomb", http.url("/bomb.txt"), max_bytes=100_000),
                 src("gz", http.url("/gz.txt")),
                 src("chunked", http.url("/chunked.txt")),
                 src("moved", http.url("/moved")),
                 # www.feeds.test is a CNAME to feeds.test in NSD's zone
                 src("cname", http.url("/plain.txt", host="www.feeds.test")))

    async def scenario() -> None:
        for name in ("big", "big-chunked", "big-close", "bomb"):
            out = await fm.refresh(name)
            assert out.result == "too_large", (name, out)
            assert not (tmp_path / "feeds" / name).exists()
            assert sample(fm, "moat_feed_fetch_total", source=name, result="too_large") == 1
        for name in ("gz", "chunked", "moved", "cname"):
            out = await fm.refresh(name)
            assert out.result == "ok", (name, out)
            assert (tmp_path / "feeds" / name).read_bytes() == big, name
        assert http.site.last("/gz.txt").get("accept-encoding") == "gzip"
        assert http.site.count("/moved") == 1
        assert http.site.last("/plain.txt").get("host") == f"www.feeds.test:{http.port}"

    run(scenario())


def test_timeout_is_bounded(tmp_path: Path, nsd: NsdServer, http: HttpServer) -> None:
    http.site.put("/stall.txt", LIST1, delay=30)
    fm = manager(tmp_path, nsd, src("stall", http.url("/stall.txt"), timeout=0.5))

    async def scenario() -> None:
        t0 = time.monotonic()
        out = await fm.refresh("stall")
        elapsed = time.monotonic() - t0
        assert out.result == "timeout", out
        assert elapsed < 2.0, elapsed
        assert sample(fm, "moat_feed_fetch_total", source="stall", result="timeout") == 1

    run(scenario())


def test_restart_with_the_network_down(tmp_path: Path, nsd: NsdServer,
                                       http: HttpServer) -> None:
    http.site.put("/list.txt", LIST1)
    source = src("list", http.url("/list.txt"), timeout=2.0)
    first = manager(tmp_path, nsd, source)
    assert run(first.refresh("list")).result == "ok"
    copy = tmp_path / "feeds" / "list"
    http.stop()
    dead_port = free_port_on("127.0.0.1")  # nothing listens there: no upstream answers

    async def scenario() -> None:
        # Upstreams unreachable: the copy on disk is used at once, start() never waits.
        fm = FeedManager([source], str(tmp_path), [("127.0.0.1", dead_port)], Changes())
        try:
            t0 = time.monotonic()
            await fm.start(initial_timeout=30)
            assert time.monotonic() - t0 < 0.5
            assert copy.read_bytes() == LIST1
            age = sample(fm, "moat_feed_age_seconds", source="list")
            assert age is not None and age < 60
            out = await fm.refresh("list")
            assert out.result == "dns", out
            assert copy.read_bytes() == LIST1
        finally:
            await fm.stop()
        # The upstream works but the HTTP server is gone: "error", copy kept.
        fm = FeedManager([source], str(tmp_path), [(nsd.host, nsd.port)], Changes())
        out = await fm.refresh("list")
        assert out.result == "error", out
        assert "connect" in out.reason
        assert copy.read_bytes() == LIST1
        assert sample(fm, "moat_feed_fetch_total", source="list", result="error") == 1

    run(scenario())


def test_start_does_not_wait_for_feeds_with_a_copy(tmp_path: Path, nsd: NsdServer,
                                                   http: HttpServer) -> None:
    """One feed has a copy (its server is slow), one has none: start() waits only for the
    one without, and the other refreshes in the background when it is due."""
    http.site.put("/have.txt", LIST2, delay=1)
    http.site.put("/need.txt", LIST1)
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    (feeds / "have").write_bytes(LIST1)
    old = time.time() - 7200  # older than refresh: due at once
    os.utime(feeds / "have", (old, old))
    changes = Changes()
    fm = manager(tmp_path, nsd, src("have", http.url("/have.txt"), refresh=20),
                 src("need", http.url("/need.txt")), changes=changes)

    async def scenario() -> None:
        try:
            t0 = time.monotonic()
            await fm.start(initial_timeout=10)
            assert time.monotonic() - t0 < 0.9  # "have" answers after 1 s: not waited for
            assert (feeds / "need").read_bytes() == LIST1
            assert (feeds / "have").read_bytes() == LIST1
            assert sample(fm, "moat_feed_age_seconds", source="have") > 7000
            await wait_for(lambda: changes.names == ["have"], 15, "the background refresh")
            assert (feeds / "have").read_bytes() == LIST2
            assert sample(fm, "moat_feed_age_seconds", source="have") < 60
        finally:
            await fm.stop()

    run(scenario())


def test_https_uses_the_host_name_for_sni_and_certificate(tmp_path: Path, nsd: NsdServer
                                                          ) -> None:
    """The TCP connection goes to the address NSD gave, the TLS handshake names the host."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, keyf = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=feeds.test", "-addext", "subjectAltName=DNS:feeds.test",
                    "-keyout", str(keyf), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, keyf)
    server = HttpServer(server_ctx)
    try:
        server.site.put("/list.txt", LIST1)
        fm = manager(tmp_path, nsd,
                     src("tls", server.url("/list.txt", scheme="https")),
                     src("tls-ip", server.url("/list.txt", host="127.0.0.1", scheme="https")))
        fm.ssl_context = ssl.create_default_context(cafile=str(cert))

        async def scenario() -> None:
            out = await fm.refresh("tls")
            assert out.result == "ok", out
            assert (tmp_path / "feeds" / "tls").read_bytes() == LIST1
            # The same server by IP address: the certificate does not name it.
            out = await fm.refresh("tls-ip")
            assert out.result == "error" and "TLS" in out.reason, out

        run(scenario())
    finally:
        server.stop()


def test_deploy_example_config_loads() -> None:
    cfg = config_mod.load(str(REPO_ROOT / "deploy" / "moat-feeds.toml"))
    by_name = {s.name: s for s in cfg.policy.sources}
    assert by_name["urlhaus-rpz"].url == "https://urlhaus.abuse.ch/downloads/rpz/"
    assert by_name["urlhaus-rpz"].format == "rpz"
    assert by_name["urlhaus-rpz"].refresh >= 300
    assert by_name["threatfox"].category == "c2"
    assert by_name["phishing-army"].category == "phishing"
    assert by_name["hagezi-tif"].format == "adblock"
    assert by_name["hagezi-tif"].refresh >= 86400
    for s in cfg.policy.sources:
        if s.url:
            assert s.url.startswith("https://"), s.name
            assert s.refresh >= 300, s.name
    # What FeedManager would manage: every URL source.
    fm = FeedManager(cfg.policy.sources, "/nonexistent", [("127.0.0.1", 53)], Changes())
    assert set(fm.feeds) == {s.name for s in cfg.policy.sources if s.url}


# --- end to end, through the real `moat serve` (enabled once app.py wires feeds) -------


def _feeds_wired() -> bool:
    return "FeedManager" in (REPO_ROOT / "resolver" / "app.py").read_text()


def test_moat_serve_blocks_a_fetched_list_and_follows_changes(
        tmp_path: Path, nsd: NsdServer, http: HttpServer, moat: Any) -> None:
    if not _feeds_wired():
        pytest.skip("resolver/app.py does not construct FeedManager yet")
    http.site.put("/e2e.txt", LIST1)
    cfg = tmp_path / "moat.toml"
    cfg.write_text(
        "[policy]\nselftest = false\n\n"
        "[[policy.source]]\n"
        'name = "e2e-list"\n'
        f'url = "{http.url("/e2e.txt")}"\n'
        'format = "domains"\n'
        'category = "malware"\n'
        'refresh = "1s"\n'
        'timeout = "3s"\n')
    proc = moat("--config", str(cfg), upstream=nsd, ready_timeout=20)
    r = dns_query(proc.host, proc.port, "listed.example", "A")
    assert [rd.address for rrset in r.answer for rd in rrset] == ["0.0.0.0"], r
    r = dns_query(proc.host, proc.port, "bad-two.example", "A")
    assert r.rcode() in (dns.rcode.NXDOMAIN, dns.rcode.REFUSED, dns.rcode.NOERROR)
    assert not [rd for rrset in r.answer for rd in rrset if getattr(rd, "address", "") ==
                "0.0.0.0"]
    http.site.put("/e2e.txt", LIST2)
    deadline = time.monotonic() + 20
    while True:
        r = dns_query(proc.host, proc.port, "bad-two.example", "A")
        if [rd.address for rrset in r.answer for rd in rrset] == ["0.0.0.0"]:
            break
        assert time.monotonic() < deadline, "bad-two.example not blocked after the list " \
            "changed\n" + proc.stderr_text()
        time.sleep(0.2)
    assert (Path(proc.state_dir) / "feeds" / "e2e-list").read_bytes() == LIST2


@pytest.mark.parametrize("fail", ["closed", "open"])
def test_a_feed_that_never_loaded_fails_closed_or_open(
        tmp_path: Path, nsd: NsdServer, http: HttpServer, moat: Any, fail: str) -> None:
    """A fresh install whose feed is down (404 here) and has no copy on disk yet: with
    ``fail = "closed"`` moat answers SERVFAIL with EDE 14 (Not Ready) naming the source
    rather than resolve unprotected, over UDP (also when asked again: the fast path)
    and TCP; ``fail = "open"`` resolves anyway. Once the feed loads, both protect."""
    cfg = tmp_path / "moat.toml"
    cfg.write_text(
        "[policy]\nselftest = false\n\n"
        "[[policy.source]]\n"
        'name = "must-have"\n'
        f'url = "{http.url("/late.txt")}"\n'
        'format = "domains"\n'
        'refresh = "1s"\n'
        'timeout = "3s"\n'
        f'fail = "{fail}"\n')
    proc = moat("--config", str(cfg), upstream=nsd, ready_timeout=30)
    ask = dns.message.make_query("feeds.test", "A", use_edns=0)
    for tcp in (False, False, True):
        q = dns.message.make_query("feeds.test", "A", use_edns=0)
        r = (dns.query.tcp if tcp else dns.query.udp)(q, proc.host, port=proc.port, timeout=3)
        if fail == "closed":
            assert r.rcode() == dns.rcode.SERVFAIL, r
            (ede,) = [o for o in r.options if o.otype == dns.edns.EDE]
            assert ede.code == 14 and "must-have" in (ede.text or ""), ede.to_text()
        else:  # (an answer rebinding protection empties: feeds.test is 127.0.0.1)
            assert r.rcode() == dns.rcode.NOERROR, r
            assert not [o for o in r.options if o.otype == dns.edns.EDE and o.code == 14]
    assert "must-have" in proc.stderr_text()
    http.site.put("/late.txt", LIST1)  # the feed comes back: retried after 1 s
    deadline = time.monotonic() + 20
    while True:
        r = dns_query(proc.host, proc.port, "listed.example", "A")
        if [rd.address for rrset in r.answer for rd in rrset] == ["0.0.0.0"]:
            break
        assert time.monotonic() < deadline, proc.stderr_text()
        time.sleep(0.2)
    r = dns.query.udp(ask, proc.host, port=proc.port, timeout=3)
    assert r.rcode() == dns.rcode.NOERROR, r
