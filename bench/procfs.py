"""Readings from /proc: memory, CPU time, process trees, mappings (Linux only)."""

from __future__ import annotations

import contextlib
import os

CLK_TCK = os.sysconf("SC_CLK_TCK")
_STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "Threads")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    # Fields after the ")" that closes the command name: state is field 3.
    return text.rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    f = _stat_fields(pid)
    return f is not None and f[0] not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def children_map() -> dict[int, list[int]]:
    """ppid -> [pid] for every live process."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _stat_fields(int(entry))
        if f is None or f[0] in ("Z", "X"):
            continue
        out.setdefault(int(f[1]), []).append(int(entry))
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants (``pid`` first)."""
    if not alive(pid):
        return []
    kids = children_map()
    out, todo = [pid], [pid]
    while todo:
        for child in kids.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


def status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem (kB) and Threads; {} if gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in _STATUS_KEYS:
                    out[key] = int(value.split()[0])
    except (OSError, ValueError):
        return {}
    return out


def pss_kb(pid: int) -> int:
    """Proportional set size (shared pages divided among their users); 0 if gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime (+ cutime + cstime of reaped children) in seconds; 0 if gone."""
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    # stat fields 14-17 (1-based) are utime stime cutime cstime; f[0] is field 3.
    return sum(int(x) for x in f[11:15]) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in tree(pid))


def mappings(pid: int, contains: str) -> list[dict[str, object]]:
    """Mappings of ``pid`` whose path contains ``contains``: path, Size, Rss, Pss (kB)."""
    out: list[dict[str, object]] = []
    current: dict[str, object] | None = None
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/smaps") as fh:
            for line in fh:
                head = line.split(None, 5)
                if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                    path = head[5].strip() if len(head) > 5 else ""
                    current = {"path": path} if contains in path else None
                    if current is not None:
                        out.append(current)
                elif current is not None and line.split(":")[0] in ("Size", "Rss", "Pss"):
                    key, value = line.split(":", 1)
                    current[key] = int(value.split()[0])
    return out


def loadavg() -> tuple[float, float, float]:
    try:
        with open("/proc/loadavg") as fh:
            a, b, c = fh.read().split()[:3]
        return float(a), float(b), float(c)
    except (OSError, ValueError):
        return (0.0, 0.0, 0.0)


def system_cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, for the machine's load during a run."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return float(total - idle), float(total)
