"""``moat report``: which devices on this network talked to C2, malware and phishing names.

Reads moat's verdict logs (JSON Lines written by resolver/querylog.py, field names in
``querylog.FIELDS``): the current file, rotated ones (``verdicts.jsonl.1`` ...) and gzipped
ones (``.gz``, recognised by their magic bytes), given in any order. The files are streamed
line by line; only the aggregates are kept in memory. Malformed lines are skipped and
counted. ``--since AGE`` (``90m``, ``24h``, ``7d``, ``1d12h``; units s m h d w) keeps lines
newer than now (UTC) minus AGE. Exit status: 0, or 2 with a message for an unreadable file,
a bad ``--since`` or an unwritable ``--output``.

Pipeline: ``read_lines`` / ``parse_line`` -> ``Aggregate`` (add one record at a time)
-> ``Aggregate.to_dict`` (the JSON document below) -> ``render_text`` / ``render_json`` /
``render_html`` (all three render that one document).

Terms. A *hit* is a verdict line whose action is not ``allow`` (a plain query line) or
``passthru`` (an allow-list hole). A hit is *blocked* unless its action is ``log-only``
(shadow mode: the device got the real answer). A *device* is a distinct ``client`` value
(an address, or a 16-hex-digit hash when the log pseudonymises clients); lines whose
client is null (privacy switch ``omit``) are grouped as ``"unknown"`` and are not counted
as a device. *Active devices* are the distinct clients of all lines in the window: every
query when the log has ``allow`` lines (``log_all_queries``), otherwise only clients that
got a verdict, which undercounts them (``devices.denominator`` says which).

JSON document (``--format json``; keys are always present, lists may be empty; times
are RFC 3339 UTC with milliseconds and "Z"; shares are fractions rounded to 4 places,
null when there is no active device)::

    {
      "schema": "moat-report/1",
      "generated": TIME,
      "window": {"since": "24h" | null, "from": TIME | null, "to": TIME,
                 "first_seen": TIME | null, "last_seen": TIME | null},
      "input": {"files": [PATH, ...], "lines": N, "used_lines": N, "malformed_lines": N,
                "outside_window": N, "allow_lines": N,
                "client_kinds": ["address" | "hashed" | "omitted", ...],  # seen, sorted
                "unknown_client_lines": N},
      "devices": {"active": N, "denominator": "all-queries" | "verdict-lines",
                  "note": TEXT},
      "totals": {"hits": N, "blocked": N, "log_only": N, "devices_with_hits": N},
      "categories": [{"category": C, "hits": N, "blocked": N, "log_only": N,
                      "devices": N, "share": F | null}, ...],     # by hits, descending
      "families": [{"family": F, "hits": N, "devices": N,
                    "categories": {C: N, ...}}, ...],                # by hits, descending
      "devices_by_category": {          # "c2", "malware", "phishing" always, then others
        C: [{"client": ADDR | HASH | "unknown", "families": {FAMILY: N, ...},
             "first_seen": TIME, "last_seen": TIME, "queries": N,
             "log_only": N,               # of those queries, answered normally (shadow mode)
             "top_names": [{"name": QNAME, "count": N}, ...]}, ...],  # by queries
        ...},
      "top_blocked_names": [{"name": QNAME, "count": N, "category": C,
                             "family": F | null, "devices": N}, ...],
      "top_clients": [{"client": ..., "hits": N, "queries": N,
                       "categories": {C: N, ...}}, ...],              # by hits
      "timeline": [{"hour": TIME, "hits": N, "categories": {C: N, ...}}, ...]
    }                                         # timeline: UTC hours with hits, ascending

Everything taken from the log (names above all: they are attacker-controlled) is escaped
in the HTML and has control characters escaped in the text form. The HTML is one file
with inline CSS and inline SVG, no scripts and no fetches (its Content-Security-Policy
forbids them too), so it can be opened from a Raspberry Pi's disk.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import html
import json
import os
import re
import sys
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

SCHEMA = "moat-report/1"
UTC = dt.UTC
UNKNOWN = "unknown"
NOT_HITS = frozenset({"allow", "passthru"})  # plain query lines and allow-list holes
LOG_ONLY = "log-only"
THREAT_CATEGORIES = ("c2", "malware", "phishing")  # always in devices_by_category
TOP_NAMES_PER_DEVICE = 5
TOP_BLOCKED_NAMES = 20
TOP_CLIENTS = 10
HOURLY_TIMELINE_LIMIT = 14 * 24  # longer spans are drawn per day in the HTML
DAILY_TIMELINE_LIMIT = 400  # longer ones (a stray timestamp) draw only days with hits
_HASH_RE = re.compile(r"[0-9a-f]{16}")
_AGE_PART = re.compile(r"(\d+)\s*([smhdw])")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class ReportError(Exception):
    """A problem that ends the report with exit status 2 (the message says what)."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(UTC)


def fmt_time(t: dt.datetime) -> str:
    """RFC 3339 UTC with milliseconds and "Z", as in the log."""
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_age(text: str) -> dt.timedelta | None:
    """``""`` -> None (everything); ``90m``, ``24h``, ``7d``, ``1d12h`` -> a timedelta."""
    s = text.strip().lower()
    if not s:
        return None
    if not re.fullmatch(r"(?:\s*\d+\s*[smhdw])+\s*", s):
        raise ReportError(f"--since {text!r}: expected an age like 90m, 24h, 7d or 1d12h "
                          "(units s, m, h, d, w)")
    seconds = sum(int(n) * _AGE_UNITS[u] for n, u in _AGE_PART.findall(s))
    return dt.timedelta(seconds=seconds)


# --- parse --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """The fields of one log line that the report uses."""

    ts: dt.datetime
    client: str | None
    qname: str
    action: str
    category: str | None
    family: str | None


def read_lines(path: str) -> Iterator[str]:
    """The lines of a log file, plain or gzipped (by magic bytes), streamed."""
    try:
        with open(path, "rb") as raw:
            magic = raw.read(2)
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        if magic == b"\x1f\x8b":
            stream = gzip.open(path, "rt", encoding="utf-8", errors="replace")
        else:
            stream = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
        with stream:
            yield from stream
    except (OSError, EOFError, zlib.error) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from exc


def _opt_str(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("not a string")
    return value


def parse_line(line: str) -> Record | None:
    """One log line -> Record; None when the line is malformed."""
    try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
            return None
        ts, action, qname = obj.get("ts"), obj.get("action"), obj.get("qname")
        if not isinstance(ts, str) or not isinstance(action, str) or not action:
            return None
        if not isinstance(qname, str):
            return None
        when = dt.datetime.fromisoformat(ts)
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
        return Record(ts=when, client=_opt_str(obj.get("client")), qname=qname,
                      action=action, category=_opt_str(obj.get("category")),
                      family=_opt_str(obj.get("family")))
    except (ValueError, TypeError, OverflowError):
        return None


# --- aggregate ----------------------------------------------------------------------


@dataclass(slots=True)
class DeviceHits:
    """One device's hits in one category."""

    first: dt.datetime
    last: dt.datetime
    queries: int = 0
    log_only: int = 0
    families: Counter[str] = field(default_factory=Counter)
    names: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class NameHits:
    """One blocked name: how often, which category and family, asked by whom."""

    category: str
    family: str | None
    count: int = 0
    clients: set[str] = field(default_factory=set)


def _top(counter: Counter[str], n: int) -> list[tuple[str, int]]:
    """The n largest entries; ties by key, so the output is stable."""
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def _share(devices: int, active: int) -> float | None:
    return round(devices / active, 4) if active else None


class Aggregate:
    """Counts built one record at a time; ``to_dict`` makes the report document."""

    def __init__(self, not_before: dt.datetime | None = None) -> None:
        self.not_before = not_before
        self.lines = 0
        self.used = 0
        self.malformed = 0
        self.outside = 0
        self.allow_lines = 0
        self.unknown_client_lines = 0
        self.client_kinds: set[str] = set()  # "address", "hashed", "omitted"
        self.first: dt.datetime | None = None
        self.last: dt.datetime | None = None
        self.queries: Counter[str] = Counter()  # lines per client (devices only)
        self.verdict_clients: set[str] = set()  # clients of non-"allow" lines
        self.hits = 0
        self.log_only = 0
        self.cat_hits: Counter[str] = Counter()
        self.cat_log_only: Counter[str] = Counter()
        self.fam_hits: Counter[str] = Counter()
        self.fam_clients: dict[str, set[str]] = {}
        self.fam_categories: dict[str, Counter[str]] = {}
        self.by_category: dict[str, dict[str, DeviceHits]] = {}
        self.blocked_names: dict[str, NameHits] = {}
        self.client_hits: Counter[str] = Counter()
        self.client_categories: dict[str, Counter[str]] = {}
        self.timeline: dict[dt.datetime, Counter[str]] = {}

    def add_line(self, line: str) -> None:
        if not line.strip():
            return
        self.lines += 1
        rec = parse_line(line)
        if rec is None:
            self.malformed += 1
        else:
            self.add(rec)

    def add(self, rec: Record) -> None:
        if self.not_before is not None and rec.ts < self.not_before:
            self.outside += 1
            return
        self.used += 1
        if self.first is None or rec.ts < self.first:
            self.first = rec.ts
        if self.last is None or rec.ts > self.last:
            self.last = rec.ts
        client = rec.client
        if client is None:
            self.unknown_client_lines += 1
            self.client_kinds.add("omitted")
            client = UNKNOWN
        else:
            self.client_kinds.add("hashed" if _HASH_RE.fullmatch(client) else "address")
            self.queries[client] += 1
        if rec.action == "allow":
            self.allow_lines += 1
        elif rec.client is not None:
            self.verdict_clients.add(client)
        if rec.action in NOT_HITS:
            return
        self._add_hit(rec, client)

    def _add_hit(self, rec: Record, client: str) -> None:
        category = rec.category or "uncategorised"
        self.hits += 1
        self.cat_hits[category] += 1
        blocked = rec.action != LOG_ONLY
        if not blocked:
            self.log_only += 1
            self.cat_log_only[category] += 1
        if rec.family:
            self.fam_hits[rec.family] += 1
            self.fam_clients.setdefault(rec.family, set()).add(client)
            self.fam_categories.setdefault(rec.family, Counter())[category] += 1
        devices = self.by_category.setdefault(category, {})
        dev = devices.get(client)
        if dev is None:
            dev = devices[client] = DeviceHits(first=rec.ts, last=rec.ts)
        dev.first = min(dev.first, rec.ts)
        dev.last = max(dev.last, rec.ts)
        dev.queries += 1
        dev.log_only += not blocked
        dev.names[rec.qname] += 1
        if rec.family:
            dev.families[rec.family] += 1
        if blocked:
            name = self.blocked_names.get(rec.qname)
            if name is None:
                name = self.blocked_names[rec.qname] = NameHits(category, rec.family)
            name.count += 1
            name.category, name.family = category, rec.family or name.family
            name.clients.add(client)
        self.client_hits[client] += 1
        self.client_categories.setdefault(client, Counter())[category] += 1
        hour = rec.ts.replace(minute=0, second=0, microsecond=0)
        self.timeline.setdefault(hour, Counter())[category] += 1

    # --- the document -----------------------------------------------------------

    def _active(self) -> tuple[int, str, str]:
        if self.allow_lines:
            return (len(self.queries), "all-queries",
                    "active devices = distinct clients of all queries in the window "
                    "(the log has 'allow' lines)")
        return (len(self.verdict_clients), "verdict-lines",
                "active devices = distinct clients with a verdict: this log has no "
                "'allow' lines, so devices that only made allowed queries are not "
                "counted (set log_all_queries for the true figure)")

    def _category_order(self) -> list[str]:
        others = [c for c, _ in _top(self.cat_hits, len(self.cat_hits))
                  if c not in THREAT_CATEGORIES]
        return [*THREAT_CATEGORIES, *others]

    def _devices(self, category: str) -> list[dict[str, Any]]:
        devices = self.by_category.get(category, {})
        rows = sorted(devices.items(), key=lambda kv: (-kv[1].queries, kv[0]))
        return [{"client": client,
                 "families": dict(_top(d.families, len(d.families))),
                 "first_seen": fmt_time(d.first), "last_seen": fmt_time(d.last),
                 "queries": d.queries, "log_only": d.log_only,
                 "top_names": [{"name": n, "count": c}
                               for n, c in _top(d.names, TOP_NAMES_PER_DEVICE)]}
                for client, d in rows]

    def _device_count(self, clients: Iterable[str]) -> int:
        return sum(1 for c in clients if c != UNKNOWN)

    def to_dict(self, files: list[str], since: str, now: dt.datetime) -> dict[str, Any]:
        active, denominator, note = self._active()
        categories = [{"category": c, "hits": n, "blocked": n - self.cat_log_only[c],
                       "log_only": self.cat_log_only[c],
                       "devices": self._device_count(self.by_category[c]),
                       "share": _share(self._device_count(self.by_category[c]), active)}
                      for c, n in _top(self.cat_hits, len(self.cat_hits))]
        families = [{"family": f, "hits": n,
                     "devices": self._device_count(self.fam_clients[f]),
                     "categories": dict(_top(self.fam_categories[f], 100))}
                    for f, n in _top(self.fam_hits, len(self.fam_hits))]
        names = sorted(self.blocked_names.items(), key=lambda kv: (-kv[1].count, kv[0]))
        top_names = [{"name": n, "count": h.count, "category": h.category,
                      "family": h.family, "devices": self._device_count(h.clients)}
                     for n, h in names[:TOP_BLOCKED_NAMES]]
        top_clients = [{"client": c, "hits": n, "queries": self.queries.get(c, 0),
                        "categories": dict(_top(self.client_categories[c], 100))}
                       for c, n in _top(self.client_hits, TOP_CLIENTS)]
        timeline = [{"hour": fmt_time(h), "hits": sum(cs.values()),
                     "categories": dict(_top(cs, len(cs)))}
                    for h, cs in sorted(self.timeline.items())]
        return {
            "schema": SCHEMA,
            "generated": fmt_time(now),
            "window": {"since": since or None,
                       "from": fmt_time(self.not_before) if self.not_before else None,
                       "to": fmt_time(now),
                       "first_seen": fmt_time(self.first) if self.first else None,
                       "last_seen": fmt_time(self.last) if self.last else None},
            "input": {"files": files, "lines": self.lines, "used_lines": self.used,
                      "malformed_lines": self.malformed, "outside_window": self.outside,
                      "allow_lines": self.allow_lines,
                      "client_kinds": sorted(self.client_kinds),
                      "unknown_client_lines": self.unknown_client_lines},
            "devices": {"active": active, "denominator": denominator, "note": note},
            "totals": {"hits": self.hits, "blocked": self.hits - self.log_only,
                       "log_only": self.log_only,
                       "devices_with_hits": self._device_count(self.client_hits)},
            "categories": categories,
            "families": families,
            "devices_by_category": {c: self._devices(c) for c in self._category_order()},
            "top_blocked_names": top_names,
            "top_clients": top_clients,
            "timeline": timeline,
        }


def build_report(paths: Iterable[str], since: str = "",
                 now: dt.datetime | None = None) -> dict[str, Any]:
    """Read the logs and return the report document (raises ReportError)."""
    now = now or _utcnow()
    age = parse_age(since)
    agg = Aggregate(now - age if age is not None else None)
    files: list[str] = []
    seen: set[str] = set()
    for path in paths:
        key = os.path.realpath(path)
        if key in seen:  # the same file named twice would count twice
            continue
        seen.add(key)
        files.append(path)
        for line in read_lines(path):
            agg.add_line(line)
    return agg.to_dict(files, since, now)


# --- render -------------------------------------------------------------------------


def _label(category: str) -> str:
    return "C2" if category == "c2" else category


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{share * 100:.0f}%"


def _device_list(devices: list[dict[str, Any]], limit: int = 6) -> str:
    parts = []
    for d in devices[:limit]:
        fams = ", ".join(d["families"])
        parts.append(f"{d['client']} ({fams})" if fams else d["client"])
    if len(devices) > limit:
        parts.append(f"and {len(devices) - limit} more")
    return ", ".join(parts)


def headlines(doc: dict[str, Any]) -> list[str]:
    """One sentence per threat category: "2 of 14 devices contacted C2: ..."."""
    active = doc["devices"]["active"]
    out = []
    for category in THREAT_CATEGORIES:
        devices = doc["devices_by_category"][category]
        known = [d for d in devices if d["client"] != UNKNOWN]
        verb = "contacted" if category == "c2" else "hit"
        what = _label(category) if category == "c2" else f"{category} names"
        n = len(known)
        sentence = f"{n} of {_plural(active, 'device')} {verb} {what}"
        if devices:
            sentence += ": " + _device_list(devices)
        out.append(sentence)
    return out


def _clean(value: Any) -> str:
    """Log text for a terminal: control characters (escape sequences!) made visible."""
    s = str(value)
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() or ch == " " else
                   f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"
                   for ch in s)


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    if not rows:
        return []
    widths = [max(_width(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell + " " * (w - _width(cell)) for cell, w in zip(r, widths,
                                                                                 strict=True)
                               ).rstrip() for r in rows]


def _width(s: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in s)


def _input_line(doc: dict[str, Any]) -> str:
    inp = doc["input"]
    text = (f"{_plural(len(inp['files']), 'file')}, {_plural(inp['lines'], 'line')}, "
            f"{inp['used_lines']} in the window")
    if inp["outside_window"]:
        text += f", {inp['outside_window']} older"
    text += f"; {_plural(inp['malformed_lines'], 'malformed line')} skipped"
    return text


def _client_note(doc: dict[str, Any]) -> str | None:
    inp = doc["input"]
    notes = []
    if "hashed" in inp["client_kinds"]:
        notes.append("client addresses are pseudonymised (hashed) in this log")
    if inp["unknown_client_lines"]:
        notes.append(f"{_plural(inp['unknown_client_lines'], 'line')} without a client "
                     f"(privacy switch) are grouped as '{UNKNOWN}' and not counted as a "
                     "device")
    return "; ".join(notes) or None


def _timeline_rows(doc: dict[str, Any]) -> tuple[str, list[tuple[str, dict[str, int]]]]:
    """(unit, rows) for the text form: hours with hits, or days when there are many."""
    hours = doc["timeline"]
    if len(hours) <= 72:
        return "hour", [(h["hour"][:13].replace("T", " ") + ":00", h["categories"])
                        for h in hours]
    days: dict[str, Counter[str]] = {}
    for h in hours:
        days.setdefault(h["hour"][:10], Counter()).update(h["categories"])
    return "day", [(d, dict(_top(c, len(c)))) for d, c in days.items()]


def _queries(device: dict[str, Any]) -> str:
    n, log_only = device["queries"], device["log_only"]
    return f"{n} ({log_only} log-only)" if log_only else str(n)


def _short(s: str, n: int = 28) -> str:
    return s if len(s) <= n else s[:n - 1] + "…"


def render_text(doc: dict[str, Any]) -> str:
    out: list[str] = []
    heads = headlines(doc)
    out.append(_clean(heads[0]))
    out += ["  " + _clean(h) for h in heads[1:]]
    out.append("")
    w, dev = doc["window"], doc["devices"]
    span = (f"{w['first_seen']} .. {w['last_seen']}" if w["first_seen"] else "no lines")
    since = f" (--since {w['since']}: from {w['from']})" if w["since"] else ""
    out.append(f"Window:   {span}{since}")
    out.append(f"Input:    {_input_line(doc)}")
    out.append(f"Devices:  {dev['active']} active; {dev['note']}")
    note = _client_note(doc)
    if note:
        out.append(f"Clients:  {_clean(note)}")
    t = doc["totals"]
    out.append(f"Hits:     {t['hits']} ({t['blocked']} blocked, {t['log_only']} log-only) "
               f"from {_plural(t['devices_with_hits'], 'device')}")

    for category, devices in doc["devices_by_category"].items():
        if not devices:
            continue
        known = sum(1 for d in devices if d["client"] != UNKNOWN)
        share = _share(known, dev["active"])
        out += ["", f"{_label(category)}: {_plural(known, 'device')} "
                    f"({_pct(share)} of active devices)"]
        rows = [["device", "families", "queries", "first seen", "last seen", "top names"]]
        for d in devices:
            names = ", ".join(f"{n['name']} ({n['count']})" for n in d["top_names"])
            rows.append([_clean(d["client"]), _clean(", ".join(d["families"]) or "-"),
                         _queries(d), d["first_seen"], d["last_seen"], _clean(names)])
        out += _table(rows)

    if doc["categories"]:
        out += ["", "Hits per category"]
        rows = [["category", "hits", "blocked", "log-only", "devices", "share"]]
        rows += [[_clean(c["category"]), str(c["hits"]), str(c["blocked"]),
                  str(c["log_only"]), str(c["devices"]), _pct(c["share"])]
                 for c in doc["categories"]]
        out += _table(rows)
    if doc["families"]:
        out += ["", "Hits per family"]
        rows = [["family", "hits", "devices", "categories"]]
        rows += [[_clean(f["family"]), str(f["hits"]), str(f["devices"]),
                  _clean(", ".join(f["categories"]))] for f in doc["families"]]
        out += _table(rows)
    if doc["top_blocked_names"]:
        out += ["", "Top blocked names"]
        rows = [["name", "count", "category", "family", "devices"]]
        rows += [[_short(_clean(n["name"]), 60), str(n["count"]), _clean(n["category"]),
                  _clean(n["family"] or "-"), str(n["devices"])]
                 for n in doc["top_blocked_names"]]
        out += _table(rows)
    if doc["top_clients"]:
        out += ["", "Top clients"]
        rows = [["client", "hits", "queries", "categories"]]
        rows += [[_clean(c["client"]), str(c["hits"]), str(c["queries"]),
                  _clean(", ".join(f"{k} {v}" for k, v in c["categories"].items()))]
                 for c in doc["top_clients"]]
        out += _table(rows)
    if doc["timeline"]:
        unit, trows = _timeline_rows(doc)
        out += ["", f"Timeline (UTC, per {unit}, only {unit}s with hits)"]
        out += _table([[when, _clean(", ".join(f"{k} {v}" for k, v in cats.items()))]
                       for when, cats in trows])
    return "\n".join(out) + "\n"


def render_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


# --- HTML ---------------------------------------------------------------------------

_COLOURS = {"c2": "#c62828", "malware": "#ef6c00", "phishing": "#6a1b9a",
            "rebinding": "#1565c0"}
_PALETTE = ("#2e7d32", "#00838f", "#ad1457", "#5d4037", "#546e7a", "#9e9d24", "#283593")

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
margin:0;padding:24px 32px;color:#1d1d1f;background:#fafafa;line-height:1.4}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.meta{color:#555;font-size:13px}
.headline{font-size:18px;margin:14px 0 4px;padding:12px 16px;border-radius:6px;
background:#fff;border-left:6px solid #2e7d32}
.headline.alert{border-left-color:#c62828;background:#fff5f5}
.sub{margin:4px 0 0 22px;font-size:15px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:18px 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:130px}
.card b{display:block;font-size:22px}.card span{color:#555;font-size:12px}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:4px 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
.name{font-family:ui-monospace,"DejaVu Sans Mono",monospace;word-break:break-all}
.charts{display:flex;flex-wrap:wrap;gap:24px}svg{background:#fff;border:1px solid #ddd}
svg text{font-family:inherit;font-size:12px;fill:#1d1d1f}
.legend span{display:inline-block;margin-right:14px;font-size:13px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px}
.note{color:#555;font-size:13px}.ct{font-weight:600;margin:0 0 6px}
td.dev{white-space:nowrap;font-family:ui-monospace,"DejaVu Sans Mono",monospace}
td.t{white-space:nowrap}
"""


def _e(value: Any) -> str:
    """Log text for HTML: control characters made visible, then escaped."""
    return html.escape(_clean(value), quote=True)


def _colours(doc: dict[str, Any]) -> dict[str, str]:
    cats = list(doc["devices_by_category"])
    out: dict[str, str] = {}
    i = 0
    for c in cats:
        if c in _COLOURS:
            out[c] = _COLOURS[c]
        else:
            out[c] = _PALETTE[i % len(_PALETTE)]
            i += 1
    return out


def svg_bars(items: list[tuple[str, int, str]], width: int = 520) -> str:
    """A horizontal bar chart: (label, value, colour) per bar."""
    if not items:
        return '<p class="note">none</p>'
    label_w, row_h, pad = 170, 24, 8
    height = pad * 2 + row_h * len(items)
    top = max(v for _, v, _ in items) or 1
    plot = width - label_w - 60
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             'role="img">']
    for i, (label, value, colour) in enumerate(items):
        y = pad + i * row_h
        w = max(1, round(plot * value / top))
        parts.append(f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end">'
                     f'{_e(_short(label))}</text>'
                     f'<rect x="{label_w}" y="{y + 4}" width="{w}" height="{row_h - 8}" '
                     f'fill="{colour}"><title>{_e(label)}: {value}</title></rect>'
                     f'<text x="{label_w + w + 6}" y="{y + 16}">{value}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _timeline_buckets(doc: dict[str, Any]) -> tuple[str, list[tuple[str, dict[str, int]]]]:
    """Continuous buckets (zeros included): hours, or days when the span is long."""
    hours = [(dt.datetime.fromisoformat(h["hour"]), h["categories"]) for h in doc["timeline"]]
    if not hours:
        return "hour", []
    first, last = hours[0][0], hours[-1][0]
    by_hour = dict(hours)
    if (last - first) <= dt.timedelta(hours=HOURLY_TIMELINE_LIMIT):
        out = []
        t = first
        while t <= last:
            out.append((t.strftime("%m-%d %H:00"), by_hour.get(t, {})))
            t += dt.timedelta(hours=1)
        return "hour", out
    days: dict[dt.date, Counter[str]] = {}
    for t, cats in hours:
        days.setdefault(t.date(), Counter()).update(cats)
    if (last - first).days > DAILY_TIMELINE_LIMIT:  # a stray timestamp: days with hits only
        return "day with hits", [(d.strftime("%Y-%m-%d"), dict(c)) for d, c in days.items()]
    out = []
    d, end = first.date(), last.date()
    while d <= end:
        out.append((d.strftime("%Y-%m-%d"), dict(days.get(d, Counter()))))
        d += dt.timedelta(days=1)
    return "day", out


def svg_timeline(doc: dict[str, Any], colours: dict[str, str], width: int = 1100) -> str:
    """Stacked columns of hits per category per hour (or per day for long spans)."""
    unit, buckets = _timeline_buckets(doc)
    if not buckets:
        return '<p class="note">no hits in the window</p>'
    left, right, top_pad, plot_h, bottom = 50, 10, 12, 200, 48
    height = top_pad + plot_h + bottom
    plot_w = width - left - right
    n = len(buckets)
    step = plot_w / n
    bar_w = max(1.0, step * 0.8)
    peak = max(sum(c.values()) for _, c in buckets) or 1
    order = list(colours)
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             'role="img">',
             f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{width - right}" '
             f'y2="{top_pad + plot_h}" stroke="#888"/>',
             f'<text x="{left - 6}" y="{top_pad + 10}" text-anchor="end">{peak}</text>',
             f'<text x="{left - 6}" y="{top_pad + plot_h}" text-anchor="end">0</text>']
    label_every = max(1, round(n / 12))
    for i, (when, cats) in enumerate(buckets):
        x = left + i * step + (step - bar_w) / 2
        y = float(top_pad + plot_h)
        tip = ", ".join(f"{k} {v}" for k, v in cats.items()) or "no hits"
        parts.append(f"<g><title>{_e(when)} UTC: {_e(tip)}</title>")
        for cat in order + [c for c in cats if c not in colours]:
            v = cats.get(cat, 0)
            if not v:
                continue
            h = plot_h * v / peak
            y -= h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" '
                         f'height="{h:.1f}" fill="{colours.get(cat, "#777")}"/>')
        parts.append("</g>")
        if i % label_every == 0:
            lx = left + i * step + step / 2
            parts.append(f'<text x="{lx:.1f}" y="{top_pad + plot_h + 16}" '
                         f'text-anchor="middle">{_e(when)}</text>')
    parts.append(f'<text x="{left}" y="{height - 8}">UTC, one column per {unit}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _html_table(head: list[str], rows: list[list[tuple[str, str]]]) -> str:
    """rows of (css class, already-escaped html) cells."""
    out = ["<table><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f'<td class="{cls}">{cell}</td>' if cls else
                                    f"<td>{cell}</td>" for cls, cell in r) + "</tr>")
    out.append("</table>")
    return "".join(out)


def render_html(doc: dict[str, Any]) -> str:
    colours = _colours(doc)
    dev, t, w, inp = doc["devices"], doc["totals"], doc["window"], doc["input"]
    heads = headlines(doc)
    c2 = bool(doc["devices_by_category"]["c2"])
    body: list[str] = [
        "<h1>moat report</h1>",
        f'<div class="meta">generated {_e(doc["generated"])}; lines from '
        f'{_e(w["first_seen"] or "-")} to {_e(w["last_seen"] or "-")} (UTC)'
        + (f'; --since {_e(w["since"])}' if w["since"] else "") + "</div>",
        f'<div class="headline{" alert" if c2 else ""}">{_e(heads[0])}'
        + "".join(f'<div class="sub">{_e(h)}</div>' for h in heads[1:]) + "</div>",
        '<div class="cards">',
    ]
    cards = [(dev["active"], "active devices"), (t["devices_with_hits"], "devices with hits"),
             (t["hits"], "hits"), (t["blocked"], "blocked"), (t["log_only"], "log-only"),
             (inp["malformed_lines"], "malformed lines skipped")]
    body += [f"<div class=\"card\"><b>{v}</b><span>{_e(k)}</span></div>" for v, k in cards]
    body.append("</div>")
    body.append(f'<p class="note">{_e(dev["note"])}.</p>')
    note = _client_note(doc)
    if note:
        body.append(f'<p class="note">{_e(note)}.</p>')

    for category, devices in doc["devices_by_category"].items():
        if not devices:
            continue
        known = sum(1 for d in devices if d["client"] != UNKNOWN)
        body.append(f"<h2>{_e(_label(category))}: {_e(_plural(known, 'device'))} "
                    f"({_pct(_share(known, dev['active']))} of active devices)</h2>")
        rows = [[("dev", _e(d["client"])),
                 ("", _e(", ".join(f"{k} ({v})" for k, v in d["families"].items()) or "-")),
                 ("n", _e(_queries(d))), ("t", _e(d["first_seen"])),
                 ("t", _e(d["last_seen"])),
                 ("name", "<br>".join(f"{_e(n['name'])} ({n['count']})"
                                      for n in d["top_names"]))]
                for d in devices]
        body.append(_html_table(["device", "families", "queries", "first seen", "last seen",
                                 "top names"], rows))

    body.append('<h2>Hits</h2><div class="charts"><div><div class="ct">per category</div>')
    body.append(svg_bars([(c["category"], c["hits"], colours.get(c["category"], "#777"))
                          for c in doc["categories"]]))
    body.append('</div><div><div class="ct">per family</div>')
    fam_colour = {f["family"]: colours.get(next(iter(f["categories"]), ""), "#777")
                  for f in doc["families"]}
    body.append(svg_bars([(f["family"], f["hits"], fam_colour[f["family"]])
                          for f in doc["families"][:20]]))
    body.append("</div></div>")
    body.append(_html_table(
        ["category", "hits", "blocked", "log-only", "devices", "share of active devices"],
        [[("", _e(c["category"])), ("n", str(c["hits"])), ("n", str(c["blocked"])),
          ("n", str(c["log_only"])), ("n", str(c["devices"])), ("n", _pct(c["share"]))]
         for c in doc["categories"]]))

    body.append("<h2>Timeline</h2>")
    body.append('<div class="legend">' + "".join(
        f'<span><i style="background:{col}"></i>{_e(c)}</span>'
        for c, col in colours.items() if any(x["category"] == c for x in doc["categories"]))
        + "</div>")
    body.append(svg_timeline(doc, colours))

    body.append("<h2>Top blocked names</h2>")
    body.append(_html_table(["name", "count", "category", "family", "devices"], [
        [("name", _e(n["name"])), ("n", str(n["count"])), ("", _e(n["category"])),
         ("", _e(n["family"] or "-")), ("n", str(n["devices"]))]
        for n in doc["top_blocked_names"]]))
    body.append("<h2>Top clients</h2>")
    body.append(_html_table(["client", "hits", "queries", "categories"], [
        [("dev", _e(c["client"])), ("n", str(c["hits"])), ("n", str(c["queries"])),
         ("", _e(", ".join(f"{k} {v}" for k, v in c["categories"].items())))]
        for c in doc["top_clients"]]))
    body.append(f'<h2>Input</h2><p class="note">{_e(_input_line(doc))}.<br>'
                + "<br>".join(_e(f) for f in inp["files"]) + "</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "style-src 'unsafe-inline'\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>moat report {_e(doc['generated'])}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


RENDERERS = {"text": render_text, "json": render_json, "html": render_html}


def main(args: argparse.Namespace) -> int:
    """``moat report``: args.logs, args.since, args.format, args.output."""
    try:
        doc = build_report(args.logs, getattr(args, "since", "") or "")
    except ReportError as exc:
        print(f"moat report: {exc}", file=sys.stderr)
        return 2
    text = RENDERERS[getattr(args, "format", None) or "text"](doc)
    output = getattr(args, "output", None)
    if output and output != "-":
        try:
            with open(output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            print(f"moat report: cannot write {output}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
    else:
        sys.stdout.write(text)
    return 0
