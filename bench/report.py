"""Medians over repetitions, ratios, the printed table, notes on what looked wrong."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from typing import Any

WORKLOADS = ("hit", "blocked", "mix")
#: The rcode each workload must get (dnsperf's "Response codes").
EXPECTED_RCODE = {"hit": "NOERROR", "blocked": "NXDOMAIN", "mix": None}


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """{server: {size: medians}} from the per-instance records."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        if r.get("skipped"):
            continue
        groups.setdefault((r["server"], str(r["size"])), []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for (server, size), rs in groups.items():
        ok = [r for r in rs if not r.get("error")]

        def med(fn: Callable[[dict[str, Any]], float | None], src: list[dict[str, Any]] = ok
                ) -> float | None:
            return median(fn(r) for r in src)

        s: dict[str, Any] = {
            "reps": len(rs), "ok": len(ok),
            "errors": [r["error"] for r in rs if r.get("error")],
            "startup_s": med(lambda r: r.get("startup_s")),
            "rss_mb": med(lambda r: _kb_mb(_get(r, "mem_load", "rss_kb"))),
            "hwm_mb": med(lambda r: _kb_mb(_get(r, "mem_load", "hwm_kb"))),
            "anon_mb": med(lambda r: _kb_mb(_get(r, "mem_load", "anon_kb"))),
            "file_mb": med(lambda r: _kb_mb(_get(r, "mem_load", "file_kb"))),
            "shmem_mb": med(lambda r: _kb_mb(_get(r, "mem_load", "shmem_kb"))),
            "tree_rss_mb": med(lambda r: _kb_mb(_get(r, "mem_load", "tree_rss_kb"))),
            "tree_pss_mb": med(lambda r: _kb_mb(_get(r, "mem_load", "tree_pss_kb"))),
            "tree_rss_after_mb": med(lambda r: _kb_mb(_get(r, "mem_after", "tree_rss_kb"))),
            "processes": med(lambda r: _get(r, "mem_load", "processes")),
            "processes_seen": med(lambda r: r.get("processes_seen")),
            "peak_child_rss_mb": med(lambda r: _kb_mb(r.get("peak_child_rss_kb"))),
            "policy_map_mb": med(lambda r: _kb_mb(_get(r, "mem_load", "policy_map_size_kb"))),
            "policy_map_rss_mb": med(lambda r: _kb_mb(_get(r, "mem_load",
                                                            "policy_map_rss_kb"))),
            "rss_after_mb": med(lambda r: _kb_mb(_get(r, "mem_after", "rss_kb"))),
            "hwm_after_mb": med(lambda r: _kb_mb(_get(r, "mem_after", "hwm_kb"))),
            "shmem_after_mb": med(lambda r: _kb_mb(_get(r, "mem_after", "shmem_kb"))),
            "workloads": {},
        }
        for w in WORKLOADS:
            have = [r for r in ok if _get(r, "workloads", w, "sat") is not None]
            if not have:
                continue
            s["workloads"][w] = {
                "qps": med(lambda r, w=w: _get(r, "workloads", w, "sat", "qps"), have),
                "q_per_cpu_s": med(lambda r, w=w: _get(r, "workloads", w, "q_per_cpu_s"), have),
                "server_cpu_frac": med(lambda r, w=w: _get(r, "workloads", w, "cpu_frac"),
                                       have),
                "foreign_cpu_frac": med(lambda r, w=w: _get(r, "workloads", w,
                                                            "foreign_cpu_frac"), have),
                "loadgen_cpu": med(lambda r, w=w: _get(r, "workloads", w, "sat",
                                                       "loadgen_cpu"), have),
                "avg_ms": med(lambda r, w=w: _get(r, "workloads", w, "sat", "avg_latency_ms"),
                              have),
                "p50_ms": med(lambda r, w=w: _get(r, "workloads", w, "lat", "p50_ms"), have),
                "p99_ms": med(lambda r, w=w: _get(r, "workloads", w, "lat", "p99_ms"), have),
                "lost": med(lambda r, w=w: _lost(r, w), have),
                "lost_pct": med(lambda r, w=w: _lost_pct(r, w), have),
                "lat_lost": med(lambda r, w=w: _get(r, "workloads", w, "lat", "lost"), have),
            }
        out.setdefault(server, {})[size] = s
    # Added RSS against the same server's empty list (the probe name only).
    for _server, sizes in out.items():
        base = sizes.get("0", {}).get("rss_mb")
        base_tree = sizes.get("0", {}).get("tree_rss_mb")
        for size, s in sizes.items():
            if size not in ("0", "-"):
                s["added_rss_mb"] = None if base is None or s["rss_mb"] is None \
                    else s["rss_mb"] - base
                s["added_tree_rss_mb"] = None if base_tree is None or s["tree_rss_mb"] is None \
                    else s["tree_rss_mb"] - base_tree
    return out


def _kb_mb(kb: Any) -> float | None:
    return None if kb is None else kb / 1024


def _lost(r: dict[str, Any], w: str) -> float | None:
    return _get(r, "workloads", w, "sat", "lost")


def _lost_pct(r: dict[str, Any], w: str) -> float | None:
    sent = _get(r, "workloads", w, "sat", "sent")
    lost = _get(r, "workloads", w, "sat", "lost")
    return None if not sent else 100.0 * lost / sent


RATIO_PAIRS = (("moat", "dnsmasq"), ("moat", "unbound"), ("moat", "ceiling-uvloop"))


def ratios(summary: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for a, b in RATIO_PAIRS:
        if a not in summary or b not in summary:
            continue
        for size, sa in summary[a].items():
            if size == "0":
                continue
            sb = summary[b].get(size) or summary[b].get("-")
            if not sb:
                continue
            row: dict[str, Any] = {"pair": f"{a}/{b}", "size": size}
            for key in ("startup_s", "tree_rss_mb", "tree_rss_after_mb"):
                row[key] = _div(sa.get(key), sb.get(key)) if b != "ceiling-uvloop" else None
            for w in WORKLOADS:
                wa, wb = sa["workloads"].get(w), sb["workloads"].get(w)
                if not wa or not wb:
                    continue
                row[w] = {k: _div(wa.get(k), wb.get(k))
                          for k in ("qps", "q_per_cpu_s", "avg_ms", "p50_ms", "p99_ms")}
            out.append(row)
    return out


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# --- the table ------------------------------------------------------------------------


def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _k(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def _size_label(size: str) -> str:
    if size == "-":
        return "-"
    n = int(size)
    if n == 0:
        return "empty"
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def table(summary: dict[str, Any], server_order: list[str]) -> str:
    head = ["server", "list", "start s", "RSS MB", "+RSS MB", "RSS end", "workload", "qps",
            "q/CPU-s", "avg ms", "p50 ms", "p99 ms", "lost"]
    rows: list[list[str]] = []

    def sort_key(size: str) -> int:
        return -1 if size == "-" else int(size)

    for server in server_order:
        for size in sorted(summary.get(server, {}), key=sort_key):
            s = summary[server][size]
            first = [server, _size_label(size), _f(s.get("startup_s"), "{:.2f}"),
                     _f(s.get("tree_rss_mb")), _f(s.get("added_tree_rss_mb")),
                     _f(s.get("tree_rss_after_mb"))]
            if not s["workloads"]:
                note = "(memory and start-up only)" if size == "0" else \
                    f"FAILED: {(s['errors'] or ['no data'])[0][:60]}"
                rows.append([*first, note, "", "", "", "", "", ""])
                continue
            for i, w in enumerate(WORKLOADS):
                ws = s["workloads"].get(w)
                lead = first if i == 0 else [""] * len(first)
                if not ws:
                    rows.append([*lead, w, "-", "-", "-", "-", "-", "-"])
                    continue
                lost = ws.get("lost")
                lost_s = "-" if lost is None else f"{lost:.0f}"
                if lost and ws.get("lost_pct") is not None:
                    lost_s += f" ({ws['lost_pct']:.2f}%)"
                rows.append([*lead, w, _k(ws.get("qps")), _k(ws.get("q_per_cpu_s")),
                             _f(ws.get("avg_ms"), "{:.2f}"), _f(ws.get("p50_ms"), "{:.3f}"),
                             _f(ws.get("p99_ms"), "{:.3f}"), lost_s])
            if s.get("errors"):
                rows.append(["", "", "", "", "", "", f"errors in {len(s['errors'])} of "
                             f"{s['reps']} reps", "", "", "", "", "", ""])
    rat = ratios(summary)
    if rat:
        rows.append(["-" * 3] * len(head))
        for r in rat:
            first = [r["pair"], _size_label(r["size"]), _x(r.get("startup_s")),
                     _x(r.get("tree_rss_mb")), "", _x(r.get("tree_rss_after_mb"))]
            for i, w in enumerate(WORKLOADS):
                ws = r.get(w)
                lead = first if i == 0 else [""] * len(first)
                if not ws:
                    continue
                rows.append([*lead, w, _x(ws["qps"]), _x(ws["q_per_cpu_s"]), _x(ws["avg_ms"]),
                             _x(ws["p50_ms"]), _x(ws["p99_ms"]), ""])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
             "-+-".join("-" * w for w in widths)]
    for row in rows:
        if row[0] == "---":
            lines.append("-+-".join("-" * w for w in widths))
            continue
        lines.append(" | ".join(
            c.ljust(w) if j in (0, 1, 6) else c.rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))))
    return "\n".join(lines)


def notes(summary: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    """What the lead should look at: moat's memory split, errors, lost queries, bad rcodes."""
    out = []
    for size, s in sorted(summary.get("moat", {}).items(),
                          key=lambda kv: -1 if kv[0] == "-" else int(kv[0])):
        out.append(
            f"moat {_size_label(size)}: VmRSS {_f(s['rss_mb'])} MB after load = RssAnon "
            f"{_f(s['anon_mb'])} + RssFile {_f(s['file_mb'])} + RssShmem {_f(s['shmem_mb'])}"
            f" (policy index mapped from /dev/shm: {_f(s['policy_map_mb'])} MB mapped, "
            f"{_f(s['policy_map_rss_mb'])} MB resident; RssShmem after the workloads "
            f"{_f(s['shmem_after_mb'])} MB); VmHWM {_f(s['hwm_mb'])} MB; "
            f"processes after load {_f(s['processes'], '{:.0f}')}, seen during start-up "
            f"{_f(s['processes_seen'], '{:.0f}')} ("
            + (f"the forked policy builder peaked at {_f(s['peak_child_rss_mb'])} MB VmHWM "
               "as sampled" if s.get("peak_child_rss_mb") else
               "the policy builder finished between samples")
            + f"); RSS after the workloads {_f(s['rss_after_mb'])} MB")
    for size, s in summary.get("moat-w2", {}).items():
        out.append(
            f"moat-w2 {_size_label(size)}: {_f(s['processes'], '{:.0f}')} processes after load "
            f"(supervisor + workers, all on core 1); RSS summed over them "
            f"{_f(s['tree_rss_mb'])} MB, PSS summed (shared pages counted once) "
            f"{_f(s['tree_pss_mb'])} MB; supervisor VmRSS {_f(s['rss_mb'])} MB; after the "
            f"workloads RSS sum {_f(s['tree_rss_after_mb'])} MB")
    foreign: list[float] = []
    for r in runs:
        tag = f"{r['server']} size {r['size']} rep {r['rep']}"
        if r.get("error"):
            out.append(f"ERROR {tag}: {r['error'][:1500]}")
        for w, wr in (r.get("workloads") or {}).items():
            for kind in ("sat", "lat"):
                pr = wr.get(kind) or {}
                if pr.get("error"):
                    out.append(f"dnsperf problem {tag} {w}/{kind}: {pr['error'][:300]}")
                if pr.get("lost"):
                    out.append(f"lost queries {tag} {w}/{kind}: {pr['lost']} of {pr['sent']}")
                exp = EXPECTED_RCODE.get(w)
                rc = pr.get("rcodes") or {}
                done = sum(rc.values())
                if exp and done and rc.get(exp, 0) < 0.99 * done:
                    out.append(f"unexpected rcodes {tag} {w}/{kind}: {rc} (expected {exp})")
                if rc.get("SERVFAIL"):
                    out.append(f"SERVFAIL answers {tag} {w}/{kind}: {rc['SERVFAIL']} of {done}")
                if kind == "sat" and w == "mix" and pr.get("ended") == "end of file":
                    out.append(f"mix input ran out early {tag} (run {pr.get('run_time')} s): "
                               "raise --mix-lines-per-s")
            if wr.get("foreign_cpu_frac") is not None:
                foreign.append(wr["foreign_cpu_frac"])
            if (wr.get("sat") or {}).get("loadgen_cpu", 0) and \
                    wr["sat"]["loadgen_cpu"] > 0.9:
                out.append(f"load generator saturated {tag} {w}: dnsperf used "
                           f"{wr['sat']['loadgen_cpu']:.2f} CPU-s/s; qps is dnsperf's limit,"
                           " see q/CPU-s")
        for c in r.get("checks_failed", []):
            out.append(f"check failed {tag}: {c}")
        for line in r.get("log_problems", [])[:10]:
            out.append(f"log {tag}: {line[:300]}")
        if r.get("exit_code") not in (None, 0) and not r.get("skipped"):
            out.append(f"exit code {tag}: {r['exit_code']} (after SIGTERM)"
                       + (" - needed SIGKILL" if r.get("killed") else ""))
    noisy = [f for f in foreign if f > 0.25]
    if noisy:
        out.append(f"machine noise: in {len(noisy)} of {len(foreign)} saturating runs, "
                   f"processes outside the benchmark used more than 0.25 CPU-s/s (median "
                   f"{statistics.median(foreign):.2f}, max {max(foreign):.2f} of 2 cores): "
                   "qps and latency then measure contention; q/CPU-s is the robust figure")
    skipped = [r for r in runs if r.get("skipped")]
    if skipped:
        out.append(f"time budget: {len(skipped)} server runs skipped")
    return out
