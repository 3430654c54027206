"""The ``moat`` command.

    moat serve   run the resolver (flags override the config file)
    moat check   print the verdict a query would get, without serving
    moat report  summarise verdict logs: which devices talk to which threats
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy is only used to sort indexes

from . import __version__  # noqa: E402
from . import config as config_mod  # noqa: E402


def _add_policy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--rpz", metavar="FILE", action="append", default=[],
                   help="an RPZ zone file; repeatable, in precedence order (before the "
                        "config's [[policy.source]] entries)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moat", description="moat: a protective DNS resolver that sinkholes malware, "
                                 "phishing and C2 domains and shows who asked for them.")
    parser.add_argument("--version", action="version", version=f"moat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the resolver",
                           description="Run the resolver. Flags override the config file.")
    _add_policy_flags(serve)
    serve.add_argument("--listen", metavar="HOST:PORT", action="append",
                       help="address to answer on, UDP and TCP; repeatable; IPv6 as "
                            "[::1]:5353 (default: 127.0.0.1:5353 and [::1]:5353)")
    serve.add_argument("--upstream", metavar="HOST[:PORT]", action="append",
                       help="upstream resolver; repeatable, in order of preference "
                            "(default: Quad9, 9.9.9.9 and 149.112.112.112)")
    serve.add_argument("--metrics", metavar="HOST:PORT",
                       help="serve Prometheus /metrics and /healthz here (default: off)")
    serve.add_argument("--query-log", metavar="FILE",
                       help="write the verdict log (JSON Lines) here; '-' for stdout")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                       help="diagnostic log level on stderr (default: info)")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="worker processes sharing the port (SO_REUSEPORT)")
    serve.add_argument("--state-dir", metavar="DIR",
                       help="where feed copies and last good lists are kept")
    serve.add_argument("--user", metavar="USER",
                       help="when started as root: the user to switch to after binding "
                            "(default: moat, else nobody; 'root' stays root)")

    check = sub.add_parser("check", help="print the verdict a query would get",
                           description="Load the configured policy and print the verdict a "
                                       "query would get, without serving.")
    _add_policy_flags(check)
    check.add_argument("name", help="the name to check, e.g. www.example.com")
    check.add_argument("--client", default="192.0.2.1", metavar="IP",
                       help="the client address (for client-IP rules)")
    check.add_argument("--qtype", default="A", metavar="TYPE", help="query type (default A)")
    check.add_argument("--json", action="store_true", help="print the verdict as JSON")

    report = sub.add_parser("report", help="summarise verdict logs",
                            description="Which devices contacted C2, malware and phishing "
                                        "domains: from verdict logs (rotated and gzipped too).")
    report.add_argument("logs", nargs="+", metavar="LOGFILE")
    report.add_argument("--since", default="", metavar="AGE",
                        help="only lines newer than this, e.g. 24h, 7d")
    report.add_argument("--format", choices=["text", "json", "html"], default="text")
    report.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, dict[str, Any]] = {}
    if getattr(args, "listen", None):
        o.setdefault("server", {})["listen"] = args.listen
    if getattr(args, "workers", None):
        o.setdefault("server", {})["workers"] = args.workers
    if getattr(args, "user", None):
        o.setdefault("server", {})["user"] = args.user
    if getattr(args, "state_dir", None):
        o.setdefault("server", {})["state_dir"] = args.state_dir
    if getattr(args, "upstream", None):
        o.setdefault("upstream", {})["servers"] = args.upstream
    if getattr(args, "metrics", None):
        o.setdefault("metrics", {})["listen"] = args.metrics
    if getattr(args, "query_log", None):
        o.setdefault("log", {})["query_log"] = args.query_log
    if getattr(args, "log_level", None):
        o.setdefault("log", {})["level"] = args.log_level
    return o


def _load_config(args: argparse.Namespace) -> config_mod.Config:
    try:
        return config_mod.load(args.config, _overrides(args))
    except config_mod.ConfigError as exc:
        print("moat: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (pip install 'moat[fast]'), asyncio's own loop otherwise."""
    import asyncio  # here, not at the top: ~60 ms that would delay the first build's fork

    if os.environ.get("MOAT_LOOP", "") != "asyncio":
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            pass
    return asyncio.new_event_loop()


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    _setup_logging(cfg.log.level)
    if cfg.server.workers > 1:
        from .workers import Supervisor

        return Supervisor(cfg, extra_rpz=tuple(args.rpz), overrides=_overrides(args)).run()
    first_build = None
    if not any(s.url or (s.zone and s.primary) for s in cfg.policy.sources):
        # Only files (no feed or zone for the first build to wait for, as in
        # app.start_network_sources): start building now, and import the server while
        # the child parses (about 0.1 s of 2 s with a 1M list).
        from policy.build import PendingBuild

        first_build = PendingBuild(cfg.policy, 1,
                                   cfg.server.state_dir or config_mod.default_state_dir(),
                                   tuple(args.rpz), starting=True)
    import asyncio

    from .app import App

    loop = _new_loop()
    asyncio.set_event_loop(loop)
    app = App(cfg, extra_rpz=tuple(args.rpz), overrides=_overrides(args),
              first_build=first_build)
    try:
        loop.run_until_complete(app.run())
    except OSError as exc:
        logging.getLogger("moat").error("cannot start: %s", exc)
        return 1
    finally:
        loop.close()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import json

    from policy.build import build_policy
    from policy.formats import normalise_name

    from . import wire
    from .config import default_state_dir

    cfg = _load_config(args)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="moat: %(message)s")
    state = cfg.server.state_dir or default_state_dir()
    policy, report = build_policy(cfg.policy, 1, state, tuple(args.rpz))
    for s in report.sources:
        if s.status in ("failed", "last-good"):
            print(f"moat: source {s.name}: {s.error}", file=sys.stderr)
    if policy.closed:
        print(f"moat: source {', '.join(policy.closed)} has never loaded and fails closed: "
              "a running moat would answer SERVFAIL to every query", file=sys.stderr)
    name = normalise_name(args.name) or args.name.lower().rstrip(".")
    qtype = wire.TYPE_CODES.get(args.qtype.upper())
    if qtype is None:
        qtype = int(args.qtype.upper().removeprefix("TYPE")) if args.qtype.upper().removeprefix(
            "TYPE").isdigit() else -1
    if qtype < 0:
        print(f"moat: unknown qtype {args.qtype}", file=sys.stderr)
        return 2
    verdict = policy.check_query(name, qtype, args.client)
    if args.json:
        out = None if verdict is None else {
            "action": verdict.action.label, "trigger": verdict.trigger.value,
            "category": verdict.category, "family": verdict.family or None,
            "source": verdict.source, "rule": str(verdict.rule), "where": verdict.where,
            "matched": verdict.matched, "policy_version": verdict.policy_version}
        print(json.dumps({"name": name, "qtype": args.qtype.upper(), "client": args.client,
                          "verdict": out}, indent=2))
    elif verdict is None:
        print(f"{name} {args.qtype.upper()}: allowed (no rule matches; "
              f"{report.rules} rules in {len(report.sources)} sources)")
    else:
        print(f"{name} {args.qtype.upper()}: {verdict.action.label.upper()}")
        print(f"  category: {verdict.category}" +
              (f"  family: {verdict.family}" if verdict.family else ""))
        print(f"  source:   {verdict.source}")
        print(f"  rule:     {verdict.rule}")
        print(f"  where:    {verdict.where}")
        print(f"  trigger:  {verdict.trigger.value} (matched {verdict.matched})")
        print("  note:     answer-time checks (CNAME targets, response IPs) need a real "
              "answer; run a query through moat to see those")
    return 0 if verdict is None or not verdict.blocks else 1


def cmd_report(args: argparse.Namespace) -> int:
    from .report import main as report_main

    return report_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "check":
        return cmd_check(args)
    if args.command == "report":
        return cmd_report(args)
    parser.print_help()
    return 2
