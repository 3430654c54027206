"""Measure the feed parsers on generated lists (not a test: run it by hand).

    python tests/policy/measure_formats.py [--lines 1000000] [--repeat 3] [--careful]

Generates N realistic names (random labels under a few hundred TLD-like suffixes, a few
subdomain levels, some hyphens and digits, a small header) in each common line form and
prints the best-of-repeat wall-clock and CPU seconds per format and per million lines
(CPU time is the steadier figure on a shared machine). ``--careful`` also
times the per-line path alone (fast path off) for comparison.
"""

from __future__ import annotations

import argparse
import random
import re
import string
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from policy.formats import adblock, dnsmasq, domains, hosts, rpz, unbound  # noqa: E402

LABEL_CHARS = string.ascii_lowercase + string.digits


def make_names(n: int, seed: int = 7) -> list[str]:
    rnd = random.Random(seed)
    suffixes = ["".join(rnd.choices(string.ascii_lowercase, k=rnd.randint(2, 7)))
                for _ in range(250)]
    suffixes += [f"{rnd.choice(['co', 'com', 'net', 'org'])}.{s}" for s in suffixes[:50]]

    def label() -> str:
        s = "".join(rnd.choices(LABEL_CHARS, k=rnd.randint(3, 15)))
        if rnd.random() < 0.25:
            cut = rnd.randint(1, len(s) - 1)
            s = s[:cut] + "-" + s[cut:]
        return s

    names = []
    for _ in range(n):
        depth = rnd.choices((1, 2, 3, 4), weights=(50, 30, 15, 5))[0]
        names.append(".".join(label() for _ in range(depth)) + "." + rnd.choice(suffixes))
    return names


FORMS = {
    "hosts  0.0.0.0 name": (hosts.parse, "# Title: generated\n# Number of entries: {n}\n"
                            "127.0.0.1 localhost\n::1 localhost\n\n", "0.0.0.0 {}\n"),
    "domains  name": (domains.parse, "# generated\n", "{}\n"),
    "wildcard  *.name": (domains.parse_wildcard, "# generated\n", "*.{}\n"),
    "adblock  ||name^": (adblock.parse, "[Adblock Plus]\n! Number of entries: {n}\n", "||{}^\n"),
    "rpz  name CNAME .": (rpz.parse, "$TTL 300\n@ SOA ns. host. 1 3600 600 86400 300\n"
                          " NS ns.\n", "{} CNAME .\n"),
    "rpz  *.name CNAME .": (rpz.parse, "$TTL 300\n@ SOA ns. host. 1 3600 600 86400 300\n"
                            " NS ns.\n", "*.{} CNAME .\n"),
    "rpz  name CNAME . ; comment": (rpz.parse, "$TTL 30\n@ SOA a. b. 1 300 1800 604800 30\n"
                                   " NS localhost.\n",
                                   "{} CNAME . ; Malware download (2024-11-20), see "
                                   "https://urlhaus.abuse.ch/host/x/\n"),
    "dnsmasq  address=/name/": (dnsmasq.parse, "# generated\n", "address=/{}/\n"),
    "unbound  local-zone": (unbound.parse, "server:\n",
                            'local-zone: "{}." always_nxdomain\n'),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--careful", action="store_true", help="also time the per-line path")
    args = ap.parse_args()
    names = make_names(args.lines)
    print(f"{args.lines:,} lines per list, best of {args.repeat}")
    # the floor on this machine right now: one trivial regex match per line, and a split
    text = "".join(f"0.0.0.0 {x}\n" for x in names)
    floor = split = float("inf")
    for _ in range(args.repeat):
        c = time.process_time()
        re.findall(r"[^\n]*+\n", text)
        floor = min(floor, time.process_time() - c)
        c = time.process_time()
        text.split("\n")
        split = min(split, time.process_time() - c)
    print(f"{'baseline':26s} one trivial match per line: cpu {floor:.3f} s, "
          f"str.split: cpu {split:.3f} s")
    del text
    for label, (parse, header, form) in FORMS.items():
        data = (header.format(n=args.lines) + "".join(form.format(x) for x in names)).encode()
        best = float("inf")
        ps = None
        best_cpu = float("inf")
        for _ in range(args.repeat):
            ps = None  # free the previous result outside the timing
            t, c = time.perf_counter(), time.process_time()
            ps = parse(data, "gen")
            best = min(best, time.perf_counter() - t)
            best_cpu = min(best_cpu, time.process_time() - c)
        assert len(ps) == args.lines, (label, len(ps), ps.problems[:3])
        per_m = best * 1_000_000 / args.lines
        cpu_m = best_cpu * 1_000_000 / args.lines
        line = (f"{label:26s} {len(data) / 1e6:5.1f} MB  wall {best:6.3f} s  cpu {best_cpu:6.3f} s"
                f"  (per 1M lines: wall {per_m:.3f} s, cpu {cpu_m:.3f} s)")
        if args.careful:
            t = time.perf_counter()
            parse(data, "gen", None, fast=False)
            line += f"   careful only: {time.perf_counter() - t:.2f} s"
        print(line, flush=True)


if __name__ == "__main__":
    main()
