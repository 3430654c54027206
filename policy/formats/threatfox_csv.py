"""abuse.ch ThreatFox CSV export (``/export/csv/recent/``, ``/export/csv/full/``).

Comment lines start with ``#``; the column header is itself a comment
(``# "first_seen_utc","ioc_id","ioc_value",...``) and is used to find the columns when present.
Rows are fully quoted fields separated by ``", "``.

* ``ioc_type`` ``domain`` -> exact block of the name; ``url`` -> exact block of the URL's host
  (an IP host is ``unsupported["ip-host"]``); ``ip:port`` -> ``unsupported["ip:port"]``
  (an IP-list indicator, not a QNAME rule); hashes -> ``unsupported["hash"]``; other types
  -> ``unsupported["ioc:<type>"]``.
* ``malware_printable`` is the family tag of the entry.
* A row with the wrong number of columns is a problem; ``# Number of entries: N`` sets
  ``declared_entries``. ``is_compromised`` and ``confidence_level`` are not filters here.
"""

from __future__ import annotations

import csv
from urllib.parse import urlsplit

from policy.rules import ParsedSource, Scope

from ._common import BAD_UTF8, Row, assemble, comment_header, decode, no_gc, split_lines
from .names import check_name, ip_literal

_DEFAULT_COLUMNS = ["first_seen_utc", "ioc_id", "ioc_value", "ioc_type", "threat_type",
                    "fk_malware", "malware_alias", "malware_printable", "last_seen_utc",
                    "confidence_level", "is_compromised", "reference", "tags", "anonymous",
                    "reporter"]


def _header(comment: str) -> list[str] | None:
    body = comment.lstrip("#").strip()
    if not body.startswith('"') or "ioc_value" not in body:
        return None
    try:
        cols = next(csv.reader([body], skipinitialspace=True))
    except (csv.Error, StopIteration):
        return None
    return [c.strip().lower() for c in cols]


def parse(data: bytes, path: str = "", origin: str | None = None, *,
          fast: bool = True) -> ParsedSource:
    ps = ParsedSource(path=path, format="threatfox-csv")
    text, bad = decode(data)
    columns = _DEFAULT_COLUMNS
    rows: list[Row] = []
    with no_gc():
        for lineno, line in enumerate(split_lines(text), 1):
            if line == BAD_UTF8:
                ps.problem(lineno, bad[lineno])
                continue
            s = line.strip()
            if not s or s[0] == "#":
                if s:
                    cols = _header(s)
                    if cols:
                        columns = cols
                    comment_header(ps, s)
                ps.ignored += 1
                continue
            try:
                row = next(csv.reader([s], skipinitialspace=True, strict=True))
            except (csv.Error, StopIteration) as e:
                ps.problem(lineno, f"not a CSV row: {e}")
                continue
            if len(row) != len(columns):
                ps.problem(lineno, f"{len(row)} columns, expected {len(columns)}")
                continue
            rec = dict(zip(columns, row, strict=True))
            value = rec.get("ioc_value", "").strip()
            ioc_type = rec.get("ioc_type", "").strip().lower()
            family = rec.get("malware_printable", "").strip()
            if family.lower() in ("", "none", "null"):
                family = ""
            if ioc_type == "url":
                try:
                    host = urlsplit(value).hostname
                except ValueError:
                    host = None
                if not host:
                    ps.problem(lineno, f"url IOC without a host: {value!r}")
                    continue
                if ip_literal(host) is not None:
                    ps.unsupported["ip-host"] += 1
                    ps.skipped[lineno] = f"url IOC on an IP address ({host}): not a DNS rule"
                    continue
                value = host
            elif ioc_type != "domain":
                kind = "hash" if ioc_type.endswith("_hash") else \
                    ioc_type if ioc_type == "ip:port" else f"ioc:{ioc_type or '?'}"
                ps.unsupported[kind] += 1
                ps.skipped[lineno] = f"{ioc_type} IOC: not a DNS rule"
                continue
            name, why = check_name(value)
            if name is None:
                ps.problem(lineno, f"{value!r} is not a valid name: {why}")
                continue
            rows.append(Row(lineno, name, Scope.EXACT, family=family or None))
        assemble(ps, None, rows)
    return ps
