"""Reading moat's /metrics in tests: fetch the exposition text, sum a metric's samples."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(where: int | str, timeout: float = 5.0) -> str:
    """moat's /metrics text. ``where``: a port on 127.0.0.1, or "HOST:PORT". Retried for
    up to ``timeout`` seconds, for a moat that has only just started."""
    url = f"http://127.0.0.1:{where}/metrics" if isinstance(where, int) else \
        f"http://{where}/metrics"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.read().decode()
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        got = dict(_LABEL.findall(m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
    return total
