"""moat's benchmark: ``python -m bench`` (see ``python -m bench --help``).

Starts a real authoritative upstream (nsd) on loopback, generates blocklists of
realistic names at run time, and measures moat, dnsmasq and unbound side by side
(each forwarding to that upstream with the same list) plus a Python "ceiling"
(a minimal asyncio UDP responder answering from a dict), with dnsperf:
start-up time, resident memory, queries per second, queries per server CPU-second,
latency and lost queries, for cache hits, blocked names and a realistic mix.

Modules:
    names    blocklist, upstream zone and workload files (generated, never committed)
    procfs   /proc readings: memory, CPU time, process trees, mappings
    servers  the upstream and the servers under test (start, readiness, stop)
    ceiling  the Python ceiling responder (``python -m bench.ceiling``)
    dnsperf  running dnsperf and parsing its output
    report   medians, ratios, the table
    cli      options and the run plan
"""
