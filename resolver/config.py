"""Configuration: TOML (tomllib) into one frozen dataclass per section, flags on top.

Every problem is collected with its dotted key path (``policy.source[2].action: unknown
action 'nxdomian'``) and reported together; unknown keys are errors. Durations may be
numbers of seconds or strings like ``"500ms"``, ``"10s"``, ``"5m"``, ``"1h"``, ``"2d"``.
Command-line flags override the file (see resolver/cli.py).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from policy.settings import CategorySettings, PolicySettings, SourceSettings, TsigKey

from .acl import DEFAULT_ALLOW
from .cache import CacheSettings
from .querylog import QueryLogSettings
from .ratelimit import RateLimitSettings
from .rebinding import RebindingSettings

DEFAULT_LISTEN = ("127.0.0.1:5353", "[::1]:5353")
#: Quad9: a public resolver that itself blocks malicious domains. Tests never use these.
DEFAULT_UPSTREAMS = ("9.9.9.9", "149.112.112.112")


def default_state_dir() -> str:
    env = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if env:
        return env
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                             ".local", "state")
    return os.path.join(base, "moat")


class ConfigError(Exception):
    """Raised with every problem found, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- value converters ---------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration (e.g. 10, \"500ms\", \"5m\", \"1d\")")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """``1.2.3.4:53``, ``[::1]:53``, ``::1`` (port from default), ``1.2.3.4``."""
    value = value.strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.%a-zA-Z0-9]+)\](?::(\d+))?", value)
    if m:
        host, port = m.group(1), m.group(2)
    elif value.count(":") == 1:
        host, port = value.split(":")
    elif value.count(":") > 1:  # a bare IPv6 address
        host, port = value, None
    else:
        host, port = value, None
    if port is None:
        if default_port is None:
            raise ValueError(f"{value!r}: a port is required (HOST:PORT, IPv6 as [::1]:PORT)")
        port_n = default_port
    else:
        port_n = int(port)
    if not 0 <= port_n <= 65535:
        raise ValueError(f"{value!r}: port out of range")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"{value!r}: {host!r} is not an IP address") from None
    return host, port_n


def _listen_list(value: object) -> tuple[tuple[str, int], ...]:
    return tuple(parse_hostport(str(v)) for v in _as_list(value))


def _upstream_list(value: object) -> tuple[tuple[str, int], ...]:
    items = tuple(parse_hostport(str(v), 53) for v in _as_list(value))
    if not items:
        raise ValueError("at least one upstream is required")
    return items


def _networks(value: object) -> tuple[str, ...]:
    return tuple(str(ipaddress.ip_network(str(v), strict=False)) for v in _as_list(value))


def _as_list(value: object) -> list[Any]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return list(value)
    raise ValueError("expected a list")


def _choice(*words: str):
    def convert(value: object) -> str:
        w = str(value).strip().lower()
        if w not in words:
            raise ValueError(f"{value!r}: one of {', '.join(words)}")
        return w
    return convert


def _optional_hostport(value: object) -> str:
    text = str(value).strip()
    if text:
        parse_hostport(text)
    return text


# --- sections -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listen: tuple[tuple[str, int], ...] = field(
        default=tuple(parse_hostport(x) for x in DEFAULT_LISTEN),
        metadata={"convert": _listen_list})
    workers: int = field(default=1, metadata={
        "doc": "worker processes sharing the port (SO_REUSEPORT)"})
    user: str = field(default="", metadata={
        "doc": "when started as root: drop to this user after binding (default: moat, "
               "else nobody)"})
    state_dir: str = field(default="", metadata={
        "doc": "feeds' last good copies and policy indexes (default: $STATE_DIRECTORY, "
               "else ~/.local/state/moat)"})
    tcp_idle_timeout: float = field(default=10.0, metadata={"duration": True})
    tcp_read_timeout: float = field(default=5.0, metadata={
        "duration": True, "doc": "a started TCP message must complete within this"})
    tcp_max_connections: int = 256
    tcp_max_connections_per_client: int = 32
    max_in_flight: int = 2000
    shutdown_grace: float = field(default=2.0, metadata={"duration": True})
    udp_rcvbuf: int = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    servers: tuple[tuple[str, int], ...] = field(
        default=tuple(parse_hostport(x, 53) for x in DEFAULT_UPSTREAMS),
        metadata={"convert": _upstream_list})
    timeout: float = field(default=1.0, metadata={"duration": True})
    deadline: float = field(default=3.0, metadata={
        "duration": True, "doc": "answer SERVFAIL (or stale) after this"})
    tcp_timeout: float = field(default=2.0, metadata={"duration": True})


@dataclass(frozen=True, slots=True)
class AclSettings:
    allow: tuple[str, ...] = field(default=DEFAULT_ALLOW, metadata={"convert": _networks})


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    listen: str = field(default="", metadata={
        "convert": _optional_hostport, "doc": "HOST:PORT for /metrics and /healthz ('' off)"})


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = field(default="info", metadata={
        "convert": _choice("debug", "info", "warning", "error")})
    query_log: str = field(default="", metadata={
        "doc": "verdict log file ('-' for stdout, '' off)"})
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 5
    log_all_queries: bool = False
    client_privacy: str = field(default="full", metadata={
        "convert": _choice("full", "hash", "omit")})
    hash_key: str = ""

    def querylog(self) -> QueryLogSettings:
        return QueryLogSettings(path=self.query_log or None, max_bytes=self.max_bytes,
                                backups=self.backups, log_all_queries=self.log_all_queries,
                                client_privacy=self.client_privacy, hash_key=self.hash_key)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerSettings = ServerSettings()
    upstream: UpstreamConfig = UpstreamConfig()
    cache: CacheSettings = CacheSettings()
    policy: PolicySettings = PolicySettings()
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    acl: AclSettings = AclSettings()
    ratelimit: RateLimitSettings = RateLimitSettings()
    rebinding: RebindingSettings = RebindingSettings()
    path: str = field(default="", metadata={"internal": True})


# Conversions for fields of dataclasses defined elsewhere (CacheSettings, ...).
_EXTRA_META: dict[tuple[type, str], dict[str, Any]] = {
    (CacheSettings, "stale_window"): {"duration": True},
    (RateLimitSettings, "exempt"): {"convert": _networks},
    (RebindingSettings, "action"): {"convert": _choice("nxdomain", "nodata", "drop", "log-only")},
}


# --- the loader ---------------------------------------------------------------------


def _meta(cls: type, f: dataclasses.Field[Any]) -> dict[str, Any]:
    meta = dict(f.metadata)
    meta.update(_EXTRA_META.get((cls, f.name), {}))
    return meta


def _build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    """Make ``cls`` from a TOML table, appending problems as ``path.key: message``."""
    if not isinstance(data, dict):
        problems.append(f"{path or '<top>'}: expected a table")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {(_meta(cls, f).get("toml_key") or f.name): f for f in dataclasses.fields(cls)
              if not f.metadata.get("internal")}
    values: dict[str, Any] = {}
    for key, raw in data.items():
        where = f"{path}.{key}" if path else key
        f = fields.get(key)
        if f is None:
            problems.append(f"{where}: unknown key")
            continue
        try:
            values[f.name] = _convert(cls, f, hints[f.name], raw, where, problems)
        except (ValueError, TypeError, KeyError) as exc:
            msg = str(exc) if not isinstance(exc, KeyError) else f"invalid value {raw!r}"
            problems.append(f"{where}: {msg}")
    for key, f in fields.items():
        if _meta(cls, f).get("required") and f.name not in values:
            problems.append(f"{path}.{key}: required" if path else f"{key}: required")
    try:
        return cls(**values)
    except TypeError as exc:
        problems.append(f"{path or '<top>'}: {exc}")
        return cls()


def _convert(cls: type, f: dataclasses.Field[Any], hint: Any, raw: Any, where: str,
             problems: list[str]) -> Any:
    meta = _meta(cls, f)
    if "convert" in meta:
        return meta["convert"](raw)
    if meta.get("duration"):
        return parse_duration(raw)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):  # X | None
        inner = [a for a in args if a is not type(None)]
        if raw is None:
            return None
        hint, origin, args = inner[0], typing.get_origin(inner[0]), typing.get_args(inner[0])
    if dataclasses.is_dataclass(hint):
        return _build(hint, raw, where, problems)  # type: ignore[arg-type]
    if origin is tuple:
        item = args[0]
        if not isinstance(raw, list):
            raise ValueError("expected a list")
        if dataclasses.is_dataclass(item):
            return tuple(_build(item, r, f"{where}[{i}]", problems)  # type: ignore[arg-type]
                         for i, r in enumerate(raw))
        return tuple(_scalar(item, r) for r in raw)
    if origin is dict:
        if not isinstance(raw, dict):
            raise ValueError("expected a table")
        item = args[1]
        return {k: _build(item, v, f"{where}.{k}", problems) for k, v in raw.items()}
    return _scalar(hint, raw)


def _scalar(hint: Any, raw: Any) -> Any:
    if hint is bool:
        if not isinstance(raw, bool):
            raise ValueError(f"expected true or false, got {raw!r}")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"expected an integer, got {raw!r}")
        if raw < 0:
            raise ValueError("cannot be negative")
        return raw
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError(f"expected a number, got {raw!r}")
        return float(raw)
    if hint is str:
        if not isinstance(raw, str):
            raise ValueError(f"expected a string, got {raw!r}")
        return raw
    raise TypeError(f"unsupported type {hint}")


def _check(cfg: Config, problems: list[str]) -> None:
    """Rules that span keys."""
    names = [s.name for s in cfg.policy.sources]
    for i, s in enumerate(cfg.policy.sources):
        where = f"policy.source[{i}]"
        kinds = [k for k in ("path", "url", "zone") if getattr(s, k)]
        if len(kinds) > 1:
            problems.append(f"{where}: give one of path, url, zone (not {', '.join(kinds)})")
        if not kinds and not s.keywords and not s.names:
            problems.append(f"{where}: needs path, url, zone, keywords or names")
        if s.zone and not s.primary:
            problems.append(f"{where}.primary: required with zone")
        if s.primary:
            try:
                parse_hostport(s.primary, 53)
            except ValueError as exc:
                problems.append(f"{where}.primary: {exc}")
        if s.url and not s.url.startswith(("http://", "https://")):
            problems.append(f"{where}.url: must start with http:// or https://")
        if names.count(s.name) > 1 and names.index(s.name) != i:
            problems.append(f"{where}.name: duplicate source name {s.name!r}")
        if s.format not in ("auto", "rpz", "hosts", "domains", "wildcard-domains", "adblock",
                            "dnsmasq", "unbound", "threatfox-csv", "urls"):
            problems.append(f"{where}.format: unknown format {s.format!r}")
    if not cfg.server.listen:
        problems.append("server.listen: at least one address is required")
    if cfg.server.workers < 1:
        problems.append("server.workers: must be at least 1")
    if cfg.upstream.timeout <= 0 or cfg.upstream.deadline < cfg.upstream.timeout:
        problems.append("upstream.deadline: must be at least upstream.timeout (> 0)")
    if cfg.cache.min_ttl > cfg.cache.max_ttl:
        problems.append("cache.min_ttl: larger than cache.max_ttl")
    if cfg.cache.size < 1:
        problems.append("cache.size: must be at least 1")


def load(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read the TOML file (if any), apply ``overrides`` (a TOML-shaped dict), validate."""
    problems: list[str] = []
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            merged = dict(data.get(section, {}) or {})
            merged.update(values)
            data[section] = merged
        else:
            data[section] = values
    cfg = _build(Config, data, "", problems)
    if not problems:
        _check(cfg, problems)
    if problems:
        raise ConfigError([f"{path}: {p}" if path else p for p in problems])
    return dataclasses.replace(cfg, path=os.path.abspath(path) if path else "")


__all__ = ["Config", "ConfigError", "load", "parse_duration", "parse_hostport",
           "SourceSettings", "CategorySettings", "TsigKey", "PolicySettings"]
