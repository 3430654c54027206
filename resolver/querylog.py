"""The verdict log: one JSON line per policy verdict (and per query when asked).

The request path only appends a tuple to a deque (no formatting, no I/O). A writer
thread wakes every ``flush_interval``, formats the lines, writes them, rotates the file
by size and keeps at most ``backups`` old files (``verdicts.jsonl.1`` ... ``.N``), so a
Raspberry Pi's SD card cannot fill up. On an unwritable file or a full disk moat keeps
resolving: the lines are counted as dropped, the problem is logged once, and the writer
tries again later. The queue is bounded the same way. Shutdown flushes what is queued.

Field names are constants in FIELDS (the report tool reads them by these names).
"""

from __future__ import annotations

import collections
import datetime as _dt
import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

from policy.verdict import Verdict

from . import wire
from .stats import Stats

log = logging.getLogger("moat.querylog")

FIELDS = ("ts", "client", "port", "transport", "qname", "qtype", "action", "trigger",
          "category", "family", "source", "rule", "where", "matched", "policy_version",
          "rcode", "cached", "answer_source", "latency_ms")


@dataclass(frozen=True, slots=True)
class QueryLogSettings:
    path: str | None = None  # None: off; "-": stdout
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 5
    log_all_queries: bool = False
    client_privacy: str = "full"  # full | hash | omit
    hash_key: str = ""  # secret for "hash"; empty: random per start
    queue_limit: int = 100000
    flush_interval: float = 0.25


class QueryLog:
    def __init__(self, settings: QueryLogSettings, stats: Stats) -> None:
        self.s = settings
        self.stats = stats
        self.enabled = settings.path is not None
        self.log_all = settings.log_all_queries and self.enabled
        self._queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self._key = (settings.hash_key or secrets.token_hex(16)).encode()
        self._file: IO[str] | None = None
        self._size = 0
        self._warned = False
        self._retry_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- request path ---------------------------------------------------------------

    def record(self, host: str, port: int, transport: str, qname: str, qtype: int,
               verdict: Verdict | None, rcode: int, answer_source: str,
               latency: float) -> None:
        if len(self._queue) >= self.s.queue_limit:
            self.stats.dropped_log_lines += 1
            return
        self._queue.append((time.time(), host, port, transport, qname, qtype, verdict,
                            rcode, answer_source, latency))

    # --- writer thread --------------------------------------------------------------

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="moat-querylog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Flush what is queued and close the file."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.flush()
        if self._file is not None and self._file is not sys.stdout:
            try:
                self._file.close()
            except OSError:
                pass
        self._file = None

    def _run(self) -> None:
        while not self._stop.wait(self.s.flush_interval):
            self.flush()

    def format(self, item: tuple[Any, ...]) -> str:
        ts, host, port, transport, qname, qtype, v, rcode, answer_source, latency = item
        when = _dt.datetime.fromtimestamp(ts, _dt.UTC)
        client: str | None = host
        if self.s.client_privacy == "omit":
            client, port = None, None
        elif self.s.client_privacy == "hash":
            client = hmac.new(self._key, host.encode(), hashlib.sha256).hexdigest()[:16]
            port = None
        rec = {
            "ts": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "client": client, "port": port, "transport": transport, "qname": qname,
            "qtype": wire.qtype_name(qtype),
            "action": v.action.label if v else "allow",
            "trigger": v.trigger.value if v else None,
            "category": v.category if v else None,
            "family": (v.family or None) if v else None,
            "source": v.source if v else None,
            "rule": str(v.rule) if v else None,
            "where": v.where if v else None,
            "matched": v.matched if v else None,
            "policy_version": v.policy_version if v else None,
            "rcode": wire.RCODE_NAMES.get(rcode, str(rcode)) if rcode >= 0 else "DROP",
            "cached": answer_source in ("cache", "stale"),
            "answer_source": answer_source,
            "latency_ms": round(latency * 1000, 3),
        }
        return json.dumps(rec, separators=(",", ":"), ensure_ascii=False)

    def flush(self) -> None:
        queue = self._queue
        if not queue:
            return
        lines = []
        while queue:
            try:
                lines.append(self.format(queue.popleft()))
            except IndexError:
                break
        if self._file is None and not self._open():
            self.stats.dropped_log_lines += len(lines)
            return
        text = "\n".join(lines) + "\n"
        try:
            assert self._file is not None
            self._file.write(text)
            self._file.flush()
            self._size += len(text.encode("utf-8"))
            if self.s.path != "-" and self._size >= self.s.max_bytes:
                self._rotate()
        except OSError as exc:
            self.stats.dropped_log_lines += len(lines)
            self._fail(exc)

    def _open(self) -> bool:
        if self.s.path == "-":
            self._file = sys.stdout
            return True
        if time.monotonic() < self._retry_at:
            return False
        assert self.s.path is not None
        try:
            d = os.path.dirname(self.s.path)
            if d:
                os.makedirs(d, exist_ok=True)
            self._file = open(self.s.path, "a", encoding="utf-8")  # noqa: SIM115
            self._size = self._file.tell()
            if self._warned:
                log.warning("verdict log %s is writable again", self.s.path)
                self._warned = False
            return True
        except OSError as exc:
            self._fail(exc)
            return False

    def _fail(self, exc: OSError) -> None:
        if not self._warned:
            log.error("cannot write the verdict log %s (%s); moat keeps resolving and counts "
                      "the lines it drops (moat_dropped_log_lines_total)", self.s.path, exc)
            self._warned = True
        if self._file is not None and self._file is not sys.stdout:
            try:
                self._file.close()
            except OSError:
                pass
        self._file = None
        self._retry_at = time.monotonic() + 5.0

    def _rotate(self) -> None:
        assert self.s.path is not None and self._file is not None
        self._file.close()
        self._file = None
        path = self.s.path
        if self.s.backups <= 0:
            os.replace(path, path + ".1")
            os.remove(path + ".1")
        else:
            for i in range(self.s.backups - 1, 0, -1):
                if os.path.exists(f"{path}.{i}"):
                    os.replace(f"{path}.{i}", f"{path}.{i + 1}")
            os.replace(path, f"{path}.1")
        self._size = 0
