"""``python -m bench``: options, the run plan, the measurements of one server instance.

The plan, for each repetition (servers interleaved, their order rotated per rep):
    every server with the empty list (the start-up probe name only): start-up, memory
    for each list size: every server, each a fresh process with that list:
        start-up (until the list's last name answers as blocked), memory after load,
        then per workload (hit, blocked, mix): a saturating dnsperf run (server CPU time
        read from /proc before and after) and a fixed-rate run (-Q, -v) for percentiles
    the Python ceilings (uvloop, asyncio) once per repetition
Placement: nsd and dnsperf on core 0, the server under test on core 1 (taskset).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import dnsperf, names, procfs, report
from .servers import (
    REPO,
    SERVER_KINDS,
    PinnedNsd,
    Server,
    StartError,
    answered,
    ask,
    blocked,
    find_binary,
    leftovers,
    make_server,
)

DEFAULT_SERVERS = ("moat", "dnsmasq", "unbound", "ceiling-uvloop", "ceiling-asyncio")
PROGRAMS = {"nsd": "nsd", "dnsperf": "dnsperf", "taskset": "taskset", "dnsmasq": "dnsmasq",
            "unbound": "unbound"}
LOG_PROBLEM_WORDS = ("error", "warn", "traceback", "exception", "fail", "critical")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark moat against dnsmasq, unbound and a Python ceiling on "
                    "loopback (nsd upstream, dnsperf load, taskset placement).")
    p.add_argument("--quick", action="store_true",
                   help="short run: --sizes 10000 --reps 1 --duration 3 "
                        "--latency-duration 1 (each can still be given)")
    p.add_argument("--sizes", help="list sizes, comma-separated (default 10000,100000,"
                                   "1000000; quick: 10000)")
    p.add_argument("--reps", type=int, help="repetitions (default 3; quick: 1)")
    p.add_argument("--duration", type=float, help="seconds per saturating dnsperf run "
                                                  "(default 10; quick: 3)")
    p.add_argument("--latency-duration", type=float,
                   help="seconds per fixed-rate latency run (default 2; quick: 1)")
    p.add_argument("--latency-qps", type=int, default=2000,
                   help="rate of the latency run, dnsperf -Q (default 2000)")
    p.add_argument("--only", help=f"servers, comma-separated, from: {', '.join(SERVER_KINDS)};"
                                  " 'ceiling' means both ceilings (default: "
                                  f"{','.join(DEFAULT_SERVERS)})")
    p.add_argument("--clients", type=int, default=4, help="dnsperf -c (default 4)")
    p.add_argument("--outstanding", type=int, default=100, help="dnsperf -q (default 100)")
    p.add_argument("--dnsperf-timeout", type=float, default=2.0,
                   help="dnsperf -t: a query is lost after this (default 2 s)")
    p.add_argument("--zone-names", type=int, default=100_000,
                   help="host names in the upstream zone (default 100000)")
    p.add_argument("--hit-names", type=int, default=500,
                   help="distinct names of the cache-hit workload (default 500)")
    p.add_argument("--blocked-names", type=int, default=100_000,
                   help="distinct listed names in the blocked workload (default 100000)")
    p.add_argument("--mix-lines-per-s", type=int, default=350_000,
                   help="lines of the mix input per second of run; the mix never wraps "
                        "(dnsperf -n 1) so misses stay misses (default 350000)")
    p.add_argument("--start-timeout", type=float, default=300.0,
                   help="seconds a server may take until the list blocks (default 300)")
    p.add_argument("--budget", type=float,
                   help="stop starting new measurements after this many seconds "
                        "(default 1750; quick: 170)")
    p.add_argument("--w2-all-sizes", action="store_true",
                   help="measure moat --workers 2 at every list size (default: the largest "
                        "only; its workers share core 1 with each other)")
    p.add_argument("--json", metavar="FILE", help="write the raw figures here")
    p.add_argument("--workdir", help="where generated files go (default: a new temporary "
                                     "directory, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--report", metavar="JSON",
                   help="print the table and notes of a saved run (--json output) again")
    p.add_argument("--calibrate", action="store_true",
                   help="only try dnsperf -c/-q settings on the hit workload and print them")
    return p


def _servers(only: str | None) -> list[str]:
    if not only:
        return list(DEFAULT_SERVERS)
    out: list[str] = []
    for item in only.split(","):
        item = item.strip()
        if not item:
            continue
        expand = ["ceiling-uvloop", "ceiling-asyncio"] if item == "ceiling" else [item]
        for s in expand:
            if s not in SERVER_KINDS:
                raise SystemExit(f"bench: unknown server {s!r} (one of "
                                 f"{', '.join(SERVER_KINDS)}, ceiling)")
            if s not in out:
                out.append(s)
    return out


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Stop(Exception):
    """SIGTERM: unwind through the finally blocks."""


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        q = args.quick
        self.sizes = [int(s) for s in (args.sizes or ("10000" if q else
                                                      "10000,100000,1000000")).split(",")]
        self.reps = args.reps or (1 if q else 3)
        self.duration = args.duration or (3.0 if q else 10.0)
        self.lat_duration = args.latency_duration or (1.0 if q else 2.0)
        self.budget = args.budget or (170.0 if q else 1750.0)
        self.servers = _servers(args.only)
        self.t0 = time.monotonic()
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="moat-bench-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.nsd: PinnedNsd | None = None
        self.live: list[Server] = []
        self.runs: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}
        self.token = secrets.token_hex(3)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    # --- preparation ----------------------------------------------------------------

    def check_programs(self) -> None:
        need = ["nsd", "dnsperf", "taskset"] + [s for s in ("dnsmasq", "unbound")
                                                if s in self.servers]
        missing = []
        for prog in need:
            try:
                find_binary(PROGRAMS[prog])
            except RuntimeError:
                missing.append(prog)
        if missing:
            raise SystemExit(f"bench: missing programs: {', '.join(missing)}")
        if (os.cpu_count() or 1) < 2:
            _log("warning: fewer than 2 CPUs; taskset placement on cores 0 and 1 fails")

    def prepare(self) -> None:
        a = self.args
        t = time.monotonic()
        biggest = max(self.sizes)
        all_names = names.blocklist(biggest)
        self.files: dict[int, dict[str, Any]] = {}
        for size in [0, *self.sizes]:
            lst = names.list_for_size(all_names, size)
            d = self.work / f"list-{size}"
            d.mkdir(exist_ok=True)
            rpz, dmq, blk = d / "list.rpz", d / "list.dnsmasq.conf", d / "blocked.txt"
            names.write_rpz(rpz, lst)
            names.write_dnsmasq(dmq, lst)
            sample = names.blocked_sample(lst[1:] or lst, a.blocked_names)
            names.write_queries(blk, sample)
            self.files[size] = {"rpz": rpz, "dnsmasq": dmq, "blocked": blk,
                                "blocked_pool": sample, "probe": lst[-1],
                                "first": lst[1] if len(lst) > 1 else lst[0],
                                "rpz_bytes": rpz.stat().st_size}
        self.hits = names.hit_names(a.hit_names)
        self.hits_file = self.work / "hits.txt"
        names.write_queries(self.hits_file, self.hits)
        self.meta["generate_s"] = round(time.monotonic() - t, 2)
        self.meta["list_examples"] = all_names[:12]
        _log(f"generated lists {[0, *self.sizes]} in {self.meta['generate_s']} s under "
             f"{self.work}")

    def start_upstream(self) -> None:
        t = time.monotonic()
        zone = names.upstream_zone_text(self.args.zone_names)
        self.nsd = PinnedNsd({names.ZONE: zone}, cpu="0", ready_timeout=60)
        self.nsd.start()
        self.upstream = (self.nsd.host, self.nsd.port)
        ok = answered(ask(self.nsd.port, self.hits[0])) and answered(
            ask(self.nsd.port, f"x{self.token}.{names.MISS_PARENT}"))
        if not ok:
            raise SystemExit(f"bench: nsd does not answer the bench zone:\n{self.nsd.logs()}")
        self.meta["upstream"] = {"program": "nsd", "addr": self.nsd.addr,
                                 "zone_names": self.args.zone_names,
                                 "start_s": round(time.monotonic() - t, 2)}
        _log(f"nsd serving {names.ZONE} ({self.args.zone_names} names) on {self.nsd.addr}")

    def probe_workers(self) -> None:
        """Does ``moat serve --workers 2`` run two serving processes? (Once, empty list.)"""
        srv = make_server("moat-w2", self.work / "workers-probe", self.upstream,
                          rpz=self.files[0]["rpz"], dnsmasq_conf=self.files[0]["dnsmasq"],
                          hits_file=self.hits_file)
        self.live.append(srv)
        info: dict[str, Any] = {}
        try:
            info["startup_s"] = round(srv.start(self.files[0]["probe"], 60), 3)
            time.sleep(1.5)  # workers may be forked once the policy is loaded
            pids = procfs.tree(srv.pid)
            info["processes"] = len(pids)
            info["cmdlines"] = [" ".join(procfs.cmdline(p))[:200] for p in pids]
            info["works"] = len(pids) >= 2
        except StartError as exc:
            info.update(works=False, error=str(exc)[:1500])
        finally:
            info["exit_code"] = srv.stop()
            self.live.remove(srv)
        self.meta["moat_workers_probe"] = info
        if info.get("works"):
            _log(f"moat --workers 2 runs {info['processes']} processes")
            if not self.args.only and "moat-w2" not in self.servers:
                self.servers.insert(1, "moat-w2")
        else:
            _log("moat --workers 2 does NOT run more than one process "
                 f"({info.get('processes', '?')} process(es)); not measured separately")

    def mix_files(self, rep: int) -> tuple[Path, Path]:
        """Fresh miss names for this repetition (every server instance is a new process,
        so within a rep they are new to each; the latency run has its own)."""
        a = self.args
        blocked_pool = self.files[max(self.sizes)]["blocked_pool"]
        sat, lat = self.work / f"mix-sat-{rep}.txt", self.work / f"mix-lat-{rep}.txt"
        for old in self.work.glob("mix-*.txt"):
            old.unlink()
        t = time.monotonic()
        n_sat = int(a.mix_lines_per_s * self.duration)
        n_lat = int(a.latency_qps * self.lat_duration * 1.3) + 200
        # listed names of the smallest list are listed in every bigger list too
        pool = self.files[min(self.sizes)]["blocked_pool"] or blocked_pool
        names.write_mix(sat, n_sat, self.hits, pool, f"s{self.token}r{rep}x", seed=rep)
        names.write_mix(lat, n_lat, self.hits, pool, f"l{self.token}r{rep}x", seed=rep + 100)
        _log(f"mix inputs for rep {rep}: {n_sat} + {n_lat} lines in "
             f"{time.monotonic() - t:.1f} s")
        return sat, lat

    # --- one server instance ----------------------------------------------------------

    def perf(self, addr: tuple[str, int], datafile: Path, **kw: Any) -> dnsperf.PerfResult:
        return dnsperf.run(addr, str(datafile), clients=kw.pop("clients", self.args.clients),
                           outstanding=kw.pop("outstanding", self.args.outstanding),
                           timeout=self.args.dnsperf_timeout, **kw)

    def saturate(self, srv: Server, datafile: Path, **kw: Any) -> dict[str, Any]:
        """A saturating dnsperf run, with the CPU time the server, nsd, dnsperf and
        everything else on the machine used meanwhile."""
        assert self.nsd is not None
        cpu0, nsd0, busy0 = srv.cpu_seconds(), procfs.tree_cpu_seconds(self.nsd.pid), \
            procfs.system_cpu_busy()
        t0 = time.monotonic()
        sat = self.perf(srv.addr, datafile, duration=kw.pop("duration", self.duration), **kw)
        wall = time.monotonic() - t0
        cpu = srv.cpu_seconds() - cpu0
        nsd = procfs.tree_cpu_seconds(self.nsd.pid) - nsd0
        busy1 = procfs.system_cpu_busy()
        machine = (busy1[0] - busy0[0]) / procfs.CLK_TCK
        loadgen = (sat.loadgen_cpu or 0) * (sat.run_time or wall)
        run_time = max(sat.run_time or wall, 1e-3)
        return {
            "sat": sat.to_json(),
            "cpu_s": round(cpu, 3),
            "cpu_frac": round(cpu / run_time, 3),
            "q_per_cpu_s": round(sat.completed / cpu, 1) if cpu > 0 else None,
            "upstream_cpu_frac": round(nsd / run_time, 3),
            # CPU used by processes that are not part of the benchmark (other users)
            "foreign_cpu_frac": round(max(machine - cpu - nsd - loadgen, 0) / wall, 3),
        }

    def run_instance(self, label: str, size: int | str, rep: int,
                     mix: tuple[Path, Path] | None, memory_only: bool) -> dict[str, Any]:
        # the ceiling has no list: its blocked workload uses the smallest list's names
        files = self.files[min(self.sizes) if size == "-" else int(size)]
        rec: dict[str, Any] = {"server": label, "size": str(size), "rep": rep,
                               "t": round(self.elapsed(), 1), "checks_failed": []}
        srv = make_server(label, self.work / f"r{rep}-{label}-{size}", self.upstream,
                          rpz=files["rpz"], dnsmasq_conf=files["dnsmasq"],
                          hits_file=self.hits_file)
        self.live.append(srv)
        try:
            try:
                rec["startup_s"] = round(srv.start(files["probe"], self.args.start_timeout), 3)
            except StartError as exc:
                rec["error"] = f"start-up failed: {exc}"
                return rec
            rec["pid"] = srv.pid
            time.sleep(0.3)
            rec["mem_load"] = srv.memory()
            rec["processes_seen"] = len(srv.pids_seen)
            rec["peak_child_rss_kb"] = srv.peak_child_rss_kb
            rec["peak_tree_rss_kb"] = srv.peak_tree_rss_kb
            if not label.startswith("ceiling"):
                if not blocked(ask(srv.port, files["first"], timeout=2)):
                    rec["checks_failed"].append(f"{files['first']} is not blocked")
                if not answered(ask(srv.port, self.hits[-1], timeout=2)):
                    rec["checks_failed"].append(f"{self.hits[-1]} gets no A answer")
            if memory_only:
                return rec
            rec["workloads"] = {}
            assert mix is not None
            plans = (("hit", self.hits_file, self.hits_file, False),
                     ("blocked", files["blocked"], files["blocked"], False),
                     ("mix", mix[0], mix[1], True))
            for w, sat_file, lat_file, once in plans:
                wr: dict[str, Any] = {}
                if w == "hit":  # warm the cache: every hit name once
                    warm = self.perf(srv.addr, self.hits_file, duration=10, once=True,
                                     max_qps=20000, clients=1, outstanding=50)
                    wr["warm"] = {"completed": warm.completed, "lost": warm.lost}
                wr.update(self.saturate(srv, sat_file, once=once))
                cpu0 = srv.cpu_seconds()
                lat = self.perf(srv.addr, lat_file, duration=self.lat_duration, once=once,
                                max_qps=self.args.latency_qps, verbose=True)
                wr["lat"] = lat.to_json()
                wr["lat_cpu_s"] = round(srv.cpu_seconds() - cpu0, 3)
                rec["workloads"][w] = wr
                if srv.proc is None or not srv.proc.running():
                    rec["error"] = f"{label} died during the {w} workload"
                    break
            rec["mem_after"] = srv.memory() if srv.proc and srv.proc.running() else None
            return rec
        finally:
            log = srv.log_text()
            rec["exit_code"] = srv.stop()
            rec["killed"] = bool(srv.proc and srv.proc.killed)
            rec["log_problems"] = [line for line in log.splitlines()
                                   if any(w in line.lower() for w in LOG_PROBLEM_WORDS)
                                   and "running as root" not in line][:20]
            rec["log_tail"] = log[-1500:] if rec.get("error") or rec["log_problems"] else ""
            self.live.remove(srv)
            if not self.args.keep:
                shutil.rmtree(srv.workdir, ignore_errors=True)

    # --- the plan ---------------------------------------------------------------------

    def plan(self) -> list[tuple[int, str, int | str, bool]]:
        """(rep, server, size, memory_only), interleaved, order rotated per rep."""
        steps: list[tuple[int, str, int | str, bool]] = []
        listed = [s for s in self.servers if not s.startswith("ceiling")]
        ceilings = [s for s in self.servers if s.startswith("ceiling")]
        for rep in range(self.reps):
            rot = listed[rep % len(listed):] + listed[:rep % len(listed)] if listed else []
            for s in rot:
                steps.append((rep, s, 0, True))
            for i, size in enumerate(self.sizes):
                for s in rot:
                    if s == "moat-w2" and size != max(self.sizes) and \
                            not self.args.w2_all_sizes:
                        continue
                    steps.append((rep, s, size, False))
                if i == 0:  # the ceilings between the list servers, once per rep
                    for c in ceilings[rep % max(len(ceilings), 1):] + \
                            ceilings[:rep % max(len(ceilings), 1)]:
                        steps.append((rep, c, "-", False))
        return steps

    def estimate(self, steps: list[tuple[int, str, int | str, bool]]) -> float:
        per_full = 3 * (self.duration + self.lat_duration + 1.0) + 3
        return sum(2.0 if mem else per_full for _, _, _, mem in steps)

    def run(self) -> int:
        self.check_programs()
        steps = self.plan()
        _log(f"servers {self.servers}, sizes {self.sizes}, reps {self.reps}, duration "
             f"{self.duration:g}s, latency {self.args.latency_qps} q/s for "
             f"{self.lat_duration:g}s; {len(steps)} server runs, roughly "
             f"{self.estimate(steps) / 60:.0f} min plus start-ups")
        self.prepare()
        self.start_upstream()
        if "moat" in self.servers or "moat-w2" in self.servers:
            self.probe_workers()
            steps = self.plan()
        mix: tuple[Path, Path] | None = None
        mix_rep = -1
        for i, (rep, label, size, mem_only) in enumerate(steps):
            if self.elapsed() > self.budget:
                _log(f"time budget {self.budget:.0f}s used up: skipping the remaining "
                     f"{len(steps) - i} server runs")
                for rest in steps[i:]:
                    self.runs.append({"server": rest[1], "size": str(rest[2]), "rep": rest[0],
                                      "skipped": True})
                break
            if not mem_only and mix_rep != rep:
                mix, mix_rep = self.mix_files(rep), rep
            _log(f"[{i + 1}/{len(steps)}] rep {rep + 1}: {label}, list {size}"
                 + (" (memory and start-up)" if mem_only else ""))
            rec = self.run_instance(label, size, rep, mix, mem_only)
            self.runs.append(rec)
            _log("    " + _brief(rec))
        return 0

    def stop_all(self) -> None:
        for srv in list(self.live):
            srv.stop()
        if self.nsd is not None:
            with contextlib.suppress(Exception):
                self.nsd.stop()

    # --- calibration --------------------------------------------------------------------

    def calibrate(self) -> None:
        """dnsperf -c/-q settings against the hit workload of each server (one list)."""
        self.check_programs()
        self.sizes = [self.sizes[0]]
        self.prepare()
        self.start_upstream()
        settings = [(1, 50), (4, 100), (8, 200), (16, 400)]
        for label in self.servers:
            srv = make_server(label, self.work / f"cal-{label}", self.upstream,
                              rpz=self.files[self.sizes[0]]["rpz"],
                              dnsmasq_conf=self.files[self.sizes[0]]["dnsmasq"],
                              hits_file=self.hits_file)
            self.live.append(srv)
            try:
                srv.start(self.files[self.sizes[0]]["probe"], self.args.start_timeout)
                self.perf(srv.addr, self.hits_file, duration=10, once=True, max_qps=20000)
                for w, f in (("hit", self.hits_file),
                             ("blocked", self.files[self.sizes[0]]["blocked"])):
                    for c, q in settings:
                        m = self.saturate(srv, f, clients=c, outstanding=q)
                        r = m["sat"]
                        print(f"{label:16} {w:8} -c {c:<3} -q {q:<5} qps {r['qps']:9.0f}  "
                              f"q/CPU-s {m['q_per_cpu_s'] or 0:9.0f}  server CPU "
                              f"{m['cpu_frac']:.2f}  avg {r['avg_latency_ms'] or 0:7.3f} ms  "
                              f"lost {r['lost']:6}  dnsperf CPU {r['loadgen_cpu']}  others "
                              f"{m['foreign_cpu_frac']:.2f}", flush=True)
            finally:
                srv.stop()
                self.live.remove(srv)


def _brief(rec: dict[str, Any]) -> str:
    if rec.get("error"):
        return "ERROR " + rec["error"].splitlines()[0][:200]
    parts = [f"start {rec.get('startup_s')} s",
             f"RSS {((rec.get('mem_load') or {}).get('rss_kb') or 0) / 1024:.1f} MB"]
    for w, wr in (rec.get("workloads") or {}).items():
        sat, lat = wr.get("sat") or {}, wr.get("lat") or {}
        parts.append(f"{w} {sat.get('qps', 0):.0f} q/s ({wr.get('q_per_cpu_s') or 0:.0f}/CPU-s"
                     f", p99 {lat.get('p99_ms') or 0:.2f} ms, lost {sat.get('lost')})")
    if rec.get("checks_failed"):
        parts.append("CHECKS FAILED: " + "; ".join(rec["checks_failed"]))
    return ", ".join(parts)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "kernel": platform.release(),
           "cpus": str(os.cpu_count())}
    for prog, args in (("nsd", ["-v"]), ("unbound", ["-V"]), ("dnsmasq", ["-v"]),
                       ("dnsperf", ["-h"])):
        try:
            res = subprocess.run([find_binary(prog), *args], capture_output=True, text=True,
                                 timeout=10, check=False)
            text = (res.stdout + res.stderr).splitlines()
            line = next((x for x in text if "ersion" in x), text[0] if text else "")
            out[prog] = line.strip()
        except (OSError, RuntimeError, subprocess.TimeoutExpired):
            out[prog] = "?"
    try:
        import uvloop

        out["uvloop"] = uvloop.__version__
    except ImportError:
        out["uvloop"] = "absent"
    try:
        out["moat_commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
            text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                "resolver", "policy"], capture_output=True, text=True,
                               timeout=10, check=False).stdout
        out["moat_tree"] = "modified" if dirty.strip() else "clean"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


def print_results(doc: dict[str, Any]) -> None:
    st = doc["settings"]
    summary = report.summarise(doc["runs"])
    order = [s for s in ("moat", "moat-w2", "dnsmasq", "unbound", "ceiling-uvloop",
                         "ceiling-asyncio") if s in summary]
    print()
    print(f"moat benchmark: lists {st['sizes']}, {st['reps']} reps (medians), dnsperf "
          f"-c {st['dnsperf']['clients']} -q {st['dnsperf']['outstanding']} -l "
          f"{st['duration_s']:g} (latency: -Q {st['latency_qps']} for "
          f"{st['latency_duration_s']:g}s); servers on core 1, nsd + dnsperf on core 0; "
          f"{doc['elapsed_s'] / 60:.1f} min")
    if summary:
        print(report.table(summary, order))
    print("\nlist: 'empty' = only the start-up probe name. RSS MB: summed over the server's "
          "processes after the list loaded; +RSS MB: minus the same server's with the empty "
          "list; RSS end: after the workloads. qps and avg ms: saturating run; p50/p99: "
          "fixed-rate run; q/CPU-s: completed queries per CPU-second of the server's process "
          "tree; lost: saturating run.")
    if doc.get("notes"):
        print("\nnotes:")
        for n in doc["notes"]:
            print(f"  - {n}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.report:
        with open(args.report) as fh:
            doc = json.load(fh)
        doc["notes"] = report.notes(report.summarise(doc["runs"]), doc["runs"]) + [
            n for n in doc.get("notes", []) if n.startswith(("moat --workers", "PROCESSES"))]
        print_results(doc)
        return 0
    bench = Bench(args)

    def on_term(signum: int, frame: Any) -> None:
        raise Stop()

    old = signal.signal(signal.SIGTERM, on_term)
    status = 1
    interrupted = ""
    load_before = procfs.loadavg()
    busy0 = procfs.system_cpu_busy()
    try:
        if args.calibrate:
            bench.calibrate()
            return 0
        status = bench.run()
    except (KeyboardInterrupt, Stop):
        interrupted = "interrupted"
        _log("interrupted: stopping every process")
        status = 130
    except SystemExit as exc:
        if exc.code not in (0, None):
            _log(str(exc.code))
        status = exc.code if isinstance(exc.code, int) else 2
        interrupted = str(exc.code)
    finally:
        bench.stop_all()
        signal.signal(signal.SIGTERM, old)
        if args.calibrate and not args.keep and not args.workdir:
            shutil.rmtree(bench.work, ignore_errors=True)
    if args.calibrate:
        return status
    busy1 = procfs.system_cpu_busy()
    left = leftovers()
    summary = report.summarise(bench.runs)
    notes = report.notes(summary, bench.runs)
    wp = bench.meta.get("moat_workers_probe")
    if wp and not wp.get("works"):
        notes.insert(0, f"moat --workers 2: {wp.get('processes', '?')} process(es) after start-up"
                     f" ({wp.get('error') or 'the option only sets SO_REUSEPORT?'}); "
                     "not measured separately")
    if left:
        notes.append("PROCESSES LEFT RUNNING: " + "; ".join(left))
    elapsed = bench.elapsed()
    settings = {
        "sizes": bench.sizes, "reps": bench.reps, "duration_s": bench.duration,
        "latency_duration_s": bench.lat_duration, "latency_qps": args.latency_qps,
        "dnsperf": {"clients": args.clients, "outstanding": args.outstanding,
                    "timeout_s": args.dnsperf_timeout},
        "hit_names": args.hit_names, "blocked_names": args.blocked_names,
        "mix": {"hits": 0.8, "blocked": 0.1, "misses": 0.1,
                "lines_per_s": args.mix_lines_per_s},
        "placement": {"nsd": "core 0", "dnsperf": "core 0", "servers": "core 1"},
        "servers": bench.servers,
    }
    cpu_busy = (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1)
    doc = {
        "command": " ".join([sys.executable, "-m", "bench", *(argv or sys.argv[1:])]),
        "elapsed_s": round(elapsed, 1), "status": status, "interrupted": interrupted,
        "settings": settings, "versions": _versions(), "meta": bench.meta,
        "machine": {"loadavg_before": load_before, "loadavg_after": procfs.loadavg(),
                    "cpu_busy_fraction_during_run": round(cpu_busy, 3)},
        "summary": summary, "ratios": report.ratios(summary), "notes": notes,
        "runs": bench.runs, "started_processes": [list(x) for x in _started()],
        "left_running": left,
    }
    print_results(doc)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1, default=str)
        print(f"\nraw figures: {args.json}")
    if not args.keep and not args.workdir:
        shutil.rmtree(bench.work, ignore_errors=True)
    return status


def _started() -> list[tuple[int, str]]:
    from .servers import STARTED

    return STARTED
