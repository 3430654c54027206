"""The policy engine alone: load time, memory and lookups per second by list size.

    python -m bench.policy [--sizes 10000,100000,1000000] [--lookups 200000]

For each size: the list is written as an RPZ zone (the same generated names as
``python -m bench``), then built the way the server builds it (``build_in_child``: a
forked process parses and writes the index, this process maps it), and measured:

* load: seconds until the policy can answer, at start-up (``starting=True``: nothing
  answers yet, a second process may help) and as a reload (one process, beside a server);
* memory: this process's RSS before and after, and after every page of the index has
  been touched (the worst case: a long-running server has looked up everything);
* lookups: µs per call and calls per second over ``--lookups`` distinct names each:
  listed names with ``Policy.check_query`` (the verdict built) and ``check_query_ref``
  (what the resolver calls: a reference to the verdict), clean names (misses).

Prints a table; ``--json FILE`` writes the figures. Runs in one process, bounded by the
sizes and counts given. No network.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from policy.build import build_in_child
from policy.settings import PolicySettings, SourceSettings

from .names import blocklist, write_rpz
from .procfs import status


def _rss_mb() -> float:
    return status(os.getpid()).get("VmRSS", 0) / 1024


def _seconds(check: Callable[[str, int, str], object], names: list[str]) -> float:
    """Seconds to check every name (an A query from one client)."""
    t0 = time.perf_counter()
    for name in names:
        check(name, 1, "192.0.2.1")
    return time.perf_counter() - t0


def prepare(size: int, all_names: list[str], lookups: int, workdir: Path
            ) -> tuple[Path, list[str]]:
    """The list file of ``size`` names and the listed names to look up."""
    names = all_names[:size]
    path = workdir / f"list-{size}.rpz"
    write_rpz(path, names)
    rng = random.Random(size)
    return path, [rng.choice(names) for _ in range(lookups)]


def measure(size: int, path: Path, hits: list[str], lookups: int,
            workdir: Path) -> dict[str, float]:
    settings = PolicySettings(selftest=False, sources=(
        SourceSettings(name="bench", path=str(path), format="rpz"),))
    misses = [f"clean{i}.example-{i % 977}.com" for i in range(lookups)]
    t0 = time.perf_counter()
    first, _ = build_in_child(settings, 1, str(workdir / "state"), starting=True)
    load_start = time.perf_counter() - t0
    del first
    gc.collect()
    rss0 = _rss_mb()  # after the query names exist: what follows is the policy's
    t0 = time.perf_counter()
    policy, report = build_in_child(settings, 2, str(workdir / "state"))
    load = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    hit_s = _seconds(policy.check_query, hits)
    miss_s = _seconds(policy.check_query, misses)
    hit_ref_s = _seconds(policy.check_query_ref, hits)
    # Touch every page of the mapped index: the resident size of a server that has
    # looked everything up.
    index = policy.index
    total = 0
    for view in (index.keys, index.meta, index.dir):
        for i in range(0, len(view), 512):
            total += view[i] & 1
    rss_touched = _rss_mb()
    index_mb = (len(index.keys) * 16 + len(index.dir) * 4) / 2**20
    return {"size": size, "rules": report.rules, "load_start_s": load_start, "load_s": load,
            "rss_before_mb": rss0,
            "rss_loaded_mb": rss_loaded, "rss_touched_mb": rss_touched,
            "added_mb": rss_touched - rss0, "index_mb": index_mb,
            "bytes_per_name": (rss_touched - rss0) * 2**20 / size,
            "hit_us": hit_s / lookups * 1e6, "hit_ref_us": hit_ref_s / lookups * 1e6,
            "miss_us": miss_s / lookups * 1e6,
            "lookups_per_s": 2 * lookups / (hit_s + miss_s), "_touch": total}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.policy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--lookups", type=int, default=200000)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="moat-bench-policy-") as tmp:
        all_names = blocklist(max(sizes))
        prepared = {size: prepare(size, all_names, args.lookups, Path(tmp)) for size in sizes}
        # The generated names go before the builds: the build forks this process, and a
        # server forks with no million strings in its heap either.
        del all_names
        gc.collect()
        for size in sizes:
            rows.append(measure(size, *prepared[size], args.lookups, Path(tmp)))
            r = rows[-1]
            print(f"{size:>9,} names: load {r['load_start_s']:.2f} s at start, "
                  f"{r['load_s']:.2f} s as a reload, +{r['added_mb']:.1f} MB RSS "
                  f"(index {r['index_mb']:.1f} MB, {r['bytes_per_name']:.0f} B/name), "
                  f"hit {r['hit_us']:.2f} us (ref {r['hit_ref_us']:.2f} us), "
                  f"miss {r['miss_us']:.2f} us, "
                  f"{r['lookups_per_s'] / 1000:.0f}k lookups/s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
