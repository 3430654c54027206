"""The Grafana dashboard and the Prometheus rules in deploy/ against what moat exports.

* ``promtool check rules`` / ``check config`` / ``test rules`` (the unit tests in
  deploy/prometheus/moat-alerts.test.yml) pass. promtool comes with Debian's
  ``prometheus`` package; missing, these tests skip (fail when CI == "true").
* Every metric name and label name used in a PromQL expression of the dashboard, the
  alert rules and the alert unit tests is one that moat exports. The exported names come
  from a real collector: an ``App`` built from a config (no listeners started), read
  through ``registry.collect()`` (families carry names, types and label names even
  without samples) and cross-checked with the text exposition of ``generate_latest``.
  Labels in ``by (...)``, selectors and ``on (...)`` must exist on the metric, and the
  labels a legend (``{{category}}``) or an annotation (``$labels.category``) shows must
  survive the expression's aggregations. Every dashboard query must parse (promtool).
* The dashboard JSON is importable: uid "moat", unique panel ids, a datasource on every
  panel and query, panels inside the 24-column grid without overlapping.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness import missing

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "moat-dashboard.json"
PROM_DIR = ROOT / "deploy" / "prometheus"
RULES = PROM_DIR / "moat-alerts.yml"
RULES_TEST = PROM_DIR / "moat-alerts.test.yml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"

#: Labels Prometheus adds to every scraped series (target labels).
TARGET_LABELS = frozenset({"instance", "job"})

#: Series Prometheus itself makes for every target: name -> labels.
PROMETHEUS_SERIES: dict[str, frozenset[str]] = {
    "up": TARGET_LABELS,
    "scrape_duration_seconds": TARGET_LABELS,
    "scrape_samples_scraped": TARGET_LABELS,
}

#: Metrics the dashboard and alerts already use but App does not export yet (URL feeds:
#: resolver/feeds.py FeedManager.collect, not yet wired into App): name -> labels. Once
#: App exports one, its real labels are checked instead and the entry here is only a
#: leftover (a warning says so).
PENDING_SERIES: dict[str, frozenset[str]] = {
    "moat_feed_fetch_total": frozenset({"source", "result"}),
    "moat_feed_age_seconds": frozenset({"source"}),
    "moat_feed_last_success_timestamp_seconds": frozenset({"source"}),
}

SEVERITIES = {"critical", "warning", "info"}


# --- helpers -------------------------------------------------------------------------


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        missing("PyYAML is not installed (pip install pyyaml)")
    return yaml


def _load_yaml(path: Path) -> Any:
    return _yaml().safe_load(path.read_text())


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing("promtool not found: apt-get install prometheus (Debian) provides it")
    assert path is not None
    return path


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False, stdin=subprocess.DEVNULL)


# --- what moat exports ---------------------------------------------------------------


@dataclass
class Exported:
    #: series name as Prometheus stores it -> label names (le/quantile included where due)
    series: dict[str, frozenset[str]] = field(default_factory=dict)
    #: family name (as prometheus-client reports it) -> type
    families: dict[str, str] = field(default_factory=dict)
    #: sample names that appeared in the text exposition
    exposed: set[str] = field(default_factory=set)
    #: names on its "# TYPE" lines (every family, with samples or not)
    typed: set[str] = field(default_factory=set)


def _series_of(name: str, mtype: str, labels: frozenset[str]) -> dict[str, frozenset[str]]:
    """Series names the Prometheus server sees for a family (prometheus-client naming)."""
    if mtype == "counter":
        return {name if name.endswith("_total") else f"{name}_total": labels,
                f"{name}_created": labels}
    if mtype in ("histogram", "gaugehistogram"):
        return {f"{name}_bucket": labels | {"le"}, f"{name}_count": labels,
                f"{name}_sum": labels}
    if mtype == "summary":
        return {name: labels | {"quantile"}, f"{name}_count": labels, f"{name}_sum": labels}
    if mtype == "info":
        return {f"{name}_info": labels}
    return {name: labels}


def _exposition_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
            assert m, line
            names.add(m.group(0))
    return names


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    from prometheus_client import generate_latest

    from resolver import config as config_mod
    from resolver.app import App

    state = tmp_path_factory.mktemp("state")
    overrides = {
        "server": {"state_dir": str(state)},
        "metrics": {"listen": "127.0.0.1:0"},  # configured, never started here
        "policy": {"source": [
            {"name": "c2-feed", "url": "https://feeds.invalid/c2.txt", "category": "c2"},
            {"name": "local", "names": ["bad.example"], "category": "malware"},
        ]},
    }

    async def build() -> tuple[list[Any], str]:
        app = App(config_mod.load(None, overrides))
        families = list(app.registry.collect())
        text = generate_latest(app.registry).decode()
        return families, text

    families, text = asyncio.run(build())
    out = Exported()
    for fam in families:
        labels = set(getattr(fam, "_labelnames", ()))  # set even without samples
        for s in fam.samples:
            labels |= set(s.labels) - {"le", "quantile"}
        series = _series_of(fam.name, fam.type, frozenset(labels))
        sample_names = {s.name for s in fam.samples}
        assert sample_names <= set(series), (
            f"{fam.name} ({fam.type}): samples {sorted(sample_names - set(series))} are not "
            f"among the series names derived for it ({sorted(series)})")
        out.families[fam.name] = fam.type
        out.series.update(series)
    out.exposed = _exposition_names(text)
    out.typed = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    return out


def test_collector_names_match_exposition(exported: Exported) -> None:
    """The names derived from collect() are the ones the /metrics text carries."""
    assert exported.exposed, "generate_latest printed no samples at all"
    unknown = exported.exposed - set(exported.series)
    assert not unknown, f"exposed but not derived from collect(): {sorted(unknown)}"
    # prometheus-client writes a counter's TYPE line with _total, others as named.
    for name, mtype in exported.families.items():
        typed = f"{name}_total" if mtype == "counter" and not name.endswith("_total") else name
        assert typed in exported.typed, f"{name} ({mtype}) has no # TYPE line"
    for name in ("moat_queries_total", "moat_up", "moat_request_duration_seconds_bucket",
                 "moat_upstream_latency_seconds_count"):
        assert name in exported.series, name
    # Every labelled family's labels are known even without samples (checked below).
    assert exported.series["moat_queries_total"] >= {"transport", "qtype"}
    assert exported.series["moat_policy_hits_total"] >= {"category", "family", "action",
                                                         "source"}
    for name in exported.series:
        assert name.startswith("moat_"), name


def _known(exported: Exported) -> dict[str, frozenset[str]]:
    known = dict(PROMETHEUS_SERIES)
    for name, labels in PENDING_SERIES.items():
        if name in exported.series:
            warnings.warn(f"{name} is exported now: drop it from PENDING_SERIES in "
                          f"{Path(__file__).name}", stacklevel=1)
        else:
            known[name] = labels | TARGET_LABELS
    known.update({k: v | TARGET_LABELS for k, v in exported.series.items()})
    return known


# --- a PromQL tokenizer good enough for these expressions ----------------------------

_TOKEN = re.compile(r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<var>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])
  | (?P<number>(?:\d+(?:ms|[smhdwy]))+|0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=,(){}\[\]@:])
""", re.X)

AGGREGATIONS = frozenset({"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                          "count_values", "bottomk", "topk", "quantile", "limitk",
                          "limit_ratio"})
SET_OPERATORS = frozenset({"and", "or", "unless"})
KEYWORDS = SET_OPERATORS | {"bool", "offset", "inf", "nan"}
#: Aggregations that keep the labels of their input when used without by/without.
KEEP_LABELS = frozenset({"topk", "bottomk", "limitk", "limit_ratio"})
LABEL_LIST_MODIFIERS = frozenset({"by", "without", "on", "ignoring", "group_left",
                                  "group_right"})


@dataclass
class Selector:
    metric: str
    labels: set[str]
    pos: int  # token index
    filtered: bool = False  # right operand of and/unless: its labels do not reach the result


@dataclass
class Grouping:
    kind: str  # by, without, on, ignoring, group_left, group_right; "": aggregation alone
    labels: list[str]
    span: tuple[int, int] | None  # aggregations: the argument's tokens


@dataclass
class Parsed:
    expr: str
    selectors: list[Selector]
    groupings: list[Grouping]

    def metrics_in(self, span: tuple[int, int] | None) -> list[Selector]:
        if span is None:
            return list(self.selectors)
        return [s for s in self.selectors if span[0] < s.pos < span[1]]


def tokenize(expr: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot tokenize {expr[pos:pos + 20]!r} in {expr!r}")
        pos = m.end()
        kind = m.lastgroup
        assert kind is not None
        if kind != "ws":
            tokens.append((kind, m.group(0)))
    return tokens


def _matching(tokens: list[tuple[str, str]], i: int, open_: str, close: str) -> int:
    depth = 0
    for j in range(i, len(tokens)):
        if tokens[j] == ("op", open_):
            depth += 1
        elif tokens[j] == ("op", close):
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unbalanced {open_!r}")


def _label_list(tokens: list[tuple[str, str]], i: int) -> tuple[list[str], int]:
    """tokens[i] is '(': the label names up to ')' and the index after it."""
    end = _matching(tokens, i, "(", ")")
    names = [v for k, v in tokens[i + 1:end] if k == "ident"]
    assert all(v == "," for k, v in tokens[i + 1:end] if k != "ident"), tokens[i:end + 1]
    return names, end + 1


def parse_promql(expr: str) -> Parsed:
    """Metric selectors (with matcher labels) and grouping label lists of ``expr``."""
    tokens = tokenize(expr)
    out = Parsed(expr, [], [])
    consumed: set[int] = set()
    # and/unless at a paren depth make later selectors at that depth and deeper "filters"
    # (their labels do not reach the result) until an `or` there or the paren closes.
    filters: list[bool] = [False]
    i = 0
    while i < len(tokens):
        kind, val = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if (kind, val) == ("op", "["):  # range or subquery: durations, $__rate_interval
            i = _matching(tokens, i, "[", "]") + 1
            continue
        if (kind, val) == ("op", "("):
            filters.append(filters[-1])
        elif (kind, val) == ("op", ")"):
            filters.pop()
        if kind == "ident" and val in SET_OPERATORS:
            if val == "or":  # lower precedence: back to the enclosing state
                filters[-1] = filters[-2] if len(filters) > 1 else False
            else:
                filters[-1] = True
            i += 1
            continue
        if kind == "ident" and val in LABEL_LIST_MODIFIERS:
            if nxt == ("op", "("):
                labels, after = _label_list(tokens, i + 1)
                if i not in consumed:
                    out.groupings.append(Grouping(val, labels, None))
                i = after
            else:  # group_left without a list
                i += 1
            continue
        if kind == "ident" and val in AGGREGATIONS and nxt[1] in ("(", "by", "without"):
            j = i + 1
            grouping: tuple[str, list[str]] | None = None
            if tokens[j][1] in ("by", "without"):
                labels, after = _label_list(tokens, j + 1)
                grouping = (tokens[j][1], labels)
                consumed.add(j)
                j = after
            end = _matching(tokens, j, "(", ")")
            if end + 1 < len(tokens) and tokens[end + 1][1] in ("by", "without"):
                labels, _ = _label_list(tokens, end + 2)
                grouping = (tokens[end + 1][1], labels)
                consumed.add(end + 1)
            if grouping:
                out.groupings.append(Grouping(grouping[0], grouping[1], (j, end)))
            elif val not in KEEP_LABELS:  # sum(...) without by: no labels left
                out.groupings.append(Grouping("", [], (j, end)))
            i += 1
            continue
        if kind == "ident" and nxt == ("op", "("):  # a function
            i += 1
            continue
        if kind == "ident" and val.lower() in KEYWORDS:
            i += 1
            continue
        if kind == "ident" or (kind, val) == ("op", "{"):
            metric = val if kind == "ident" else ""
            j = i + 1 if kind == "ident" else i
            labels: set[str] = set()
            if j < len(tokens) and tokens[j] == ("op", "{"):
                end = _matching(tokens, j, "{", "}")
                body = tokens[j + 1:end]
                k = 0
                while k < len(body):
                    if body[k] == ("op", ","):
                        k += 1
                        continue
                    assert body[k][0] in ("ident", "string"), (expr, body[k])
                    assert body[k + 1][0] == "op" and body[k + 1][1] in ("=", "!=", "=~",
                                                                         "!~"), expr
                    assert body[k + 2][0] in ("string", "var"), (expr, body[k + 2])
                    name = body[k][1].strip("\"'")
                    if name == "__name__" and body[k + 1][1] == "=":
                        metric = body[k + 2][1].strip("\"'")
                    elif name != "__name__":
                        labels.add(name)
                    k += 3
                j = end + 1
            assert metric, f"selector without a metric name in {expr!r}"
            out.selectors.append(Selector(metric, labels, i, filtered=filters[-1]))
            i = j
            continue
        i += 1
    return out


def test_tokenizer_on_examples() -> None:
    p = parse_promql('histogram_quantile(0.99, sum by (le, upstream) (rate('
                     'moat_upstream_latency_seconds_bucket{job=~"$job", upstream!=""}'
                     '[$__rate_interval])))')
    assert [(s.metric, s.labels) for s in p.selectors] == [
        ("moat_upstream_latency_seconds_bucket", {"job", "upstream"})]
    assert [(g.kind, g.labels) for g in p.groupings] == [("by", ["le", "upstream"])]
    p = parse_promql('sum(x{a="1"}) by (a) / ignoring (a) group_left sum(y) > 0.5 and '
                     'time() - z offset 5m > 2 * 86400 or w unless v[1h:5m]')
    assert [s.metric for s in p.selectors] == ["x", "y", "z", "w", "v"]
    assert [s.filtered for s in p.selectors] == [False, False, True, False, True]
    assert [(g.kind, g.labels) for g in p.groupings] == [
        ("by", ["a"]), ("ignoring", ["a"]), ("", [])]
    p = parse_promql('{__name__="moat_up", instance="x"} == bool 0')
    assert [(s.metric, s.labels) for s in p.selectors] == [("moat_up", {"instance"})]


# --- the expressions -----------------------------------------------------------------


@dataclass
class Use:
    where: str
    expr: str
    legend: str = ""  # Grafana legendFormat / alert annotations ($labels.x)
    legend_labels: set[str] = field(default_factory=set)


def _walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _walk_panels(p.get("panels", []))


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_uses() -> list[Use]:
    d = _dashboard()
    uses = []
    for p in _walk_panels(d["panels"]):
        for t in p.get("targets", []):
            legend = t.get("legendFormat", "")
            uses.append(Use(f"panel {p['id']} {p.get('title')!r} {t.get('refId')}",
                            t["expr"], legend, set(re.findall(r"{{\s*(\w+)\s*}}", legend))))
    for a in d.get("annotations", {}).get("list", []):
        if a.get("expr"):
            text = a.get("textFormat", "") + a.get("titleFormat", "")
            uses.append(Use(f"annotation {a['name']!r}", a["expr"], text,
                            set(re.findall(r"{{\s*(\w+)\s*}}", text))))
    for v in d.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", q)
        assert m, f"variable {v['name']}: only label_values(selector, label) is understood"
        uses.append(Use(f"variable {v['name']}", m.group(1), "", {m.group(2)}))
    return uses


def rule_uses() -> list[Use]:
    uses = []
    for group in _load_yaml(RULES)["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            text = " ".join(rule.get("annotations", {}).values())
            uses.append(Use(f"rule {name}", rule["expr"], text,
                            set(re.findall(r"\$labels\.(\w+)", text))))
    return uses


def rule_test_uses() -> list[Use]:
    uses = []
    for test in _load_yaml(RULES_TEST)["tests"]:
        for s in test.get("input_series", []):
            uses.append(Use(f"test {test['name']!r} input", s["series"]))
    return uses


def result_labels(parsed: Parsed, known: dict[str, frozenset[str]]) -> set[str]:
    """Labels the result of the expression can carry (for legends and $labels.x).

    Per selector (right operands of and/unless left out): the labels of its outermost
    aggregation (by: those, without: the rest, neither: none), else its own labels.
    """
    out: set[str] = set()
    for s in parsed.selectors:
        if s.filtered:
            continue
        own = set(known.get(s.metric, frozenset()))
        around = [g for g in parsed.groupings
                  if g.span is not None and g.span[0] < s.pos < g.span[1]]
        if not around:
            out |= own
            continue
        outer = max(around, key=lambda g: g.span[1] - g.span[0] if g.span else 0)
        if outer.kind == "by":
            out |= set(outer.labels)
        elif outer.kind == "without":
            out |= own - set(outer.labels)
    return out


def _check_uses(uses: list[Use], known: dict[str, frozenset[str]]) -> list[str]:
    problems = []
    for use in uses:
        try:
            parsed = parse_promql(use.expr)
        except (ValueError, AssertionError) as exc:
            problems.append(f"{use.where}: cannot parse {use.expr!r}: {exc}")
            continue
        if not parsed.selectors:
            problems.append(f"{use.where}: no metric in {use.expr!r}")
        for s in parsed.selectors:
            if s.metric not in known:
                problems.append(f"{use.where}: {s.metric} is not a metric moat exports")
                continue
            for label in sorted(s.labels - known[s.metric]):
                problems.append(f"{use.where}: {s.metric} has no label {label!r}")
        everywhere = set().union(*(known.get(s.metric, set()) for s in parsed.selectors))
        for g in parsed.groupings:
            if g.kind in ("by", "without"):
                # Labels of the aggregated expression: on every selector in the span
                # except the right operands of and/unless (filters).
                scope = [s for s in parsed.metrics_in(g.span) if not s.filtered]
                for s in scope:
                    for label in g.labels:
                        if label not in known.get(s.metric, {label}):
                            problems.append(f"{use.where}: {g.kind} ({label}) but "
                                            f"{s.metric} has no label {label!r}")
            elif g.kind:
                for label in g.labels:
                    if label not in everywhere:
                        problems.append(f"{use.where}: {g.kind} ({label}): no metric of the "
                                        f"expression has that label")
        for label in sorted(use.legend_labels - result_labels(parsed, known)):
            problems.append(f"{use.where}: {{{{{label}}}}} in the legend/annotation is not a "
                            f"label of the result of {use.expr!r}")
    return problems


def test_dashboard_uses_exported_metrics_and_labels(exported: Exported) -> None:
    uses = dashboard_uses()
    assert len(uses) > 30
    assert _check_uses(uses, _known(exported)) == []


def test_rules_use_exported_metrics_and_labels(exported: Exported) -> None:
    uses = rule_uses()
    assert len(uses) >= 10
    assert _check_uses(uses, _known(exported)) == []


def test_rule_unit_tests_feed_exported_series(exported: Exported) -> None:
    uses = rule_test_uses()
    assert uses
    assert _check_uses(uses, _known(exported)) == []


def test_every_moat_metric_is_on_the_dashboard(exported: Exported) -> None:
    """A metric moat exports but nobody charts is a forgotten panel."""
    used = {s.metric for u in dashboard_uses() for s in parse_promql(u.expr).selectors}
    families = set()
    for name, mtype in exported.families.items():
        series = _series_of(name, mtype, frozenset())
        if not used & set(series):
            families.add(name)
    assert families == set(), f"exported but not on the dashboard: {sorted(families)}"


# --- the rule file -------------------------------------------------------------------


def test_rules_shape() -> None:
    doc = _load_yaml(RULES)
    names = []
    for group in doc["groups"]:
        assert group["name"].startswith("moat-")
        for rule in group["rules"]:
            name = rule["alert"]
            names.append(name)
            assert "for" in rule, f"{name}: no for:"
            assert rule["labels"]["severity"] in SEVERITIES, name
            ann = rule["annotations"]
            assert ann.get("summary") and ann.get("description"), name
            text = ann["summary"] + ann["description"]
            assert "$labels.instance" in text, f"{name}: say which moat"
            if name != "MoatDown":  # `up` is Prometheus', the rest are moat's metrics
                assert "moat_" in rule["expr"], name
    assert len(names) == len(set(names)), "duplicate alert names"
    for wanted in ("MoatDeviceContactedC2", "MoatC2DomainQueried", "MoatPolicyReloadFailing",
                   "MoatPolicyStale", "MoatUpstreamFailing", "MoatServfailHigh", "MoatDown",
                   "MoatNotServing", "MoatDroppedLogLines", "MoatFeedStale",
                   "MoatFeedFetchFailing", "MoatMalformedFlood"):
        assert wanted in names, wanted
    tested = {t["alertname"] for test in _load_yaml(RULES_TEST)["tests"]
              for t in test.get("alert_rule_test", [])}
    assert {"MoatDeviceContactedC2", "MoatC2DomainQueried", "MoatPolicyReloadFailing",
            "MoatFeedStale", "MoatDown"} <= tested


def test_promtool_check_rules() -> None:
    r = _run([_promtool(), "check", "rules", str(RULES)], PROM_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_check_config() -> None:
    promtool = _promtool()
    cfg = _load_yaml(PROM_CONFIG)
    rule_files = [PROM_DIR / f for f in cfg.get("rule_files", [])]
    if not rule_files or not all(f.is_file() for f in rule_files):
        pytest.skip(f"{PROM_CONFIG.name}: rule_files {rule_files} do not resolve here")
    assert RULES in [f.resolve() for f in rule_files]
    r = _run([promtool, "check", "config", str(PROM_CONFIG)], PROM_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = [j["job_name"] for j in cfg["scrape_configs"]]
    assert "moat" in jobs
    targets = [t for j in cfg["scrape_configs"] for sc in j.get("static_configs", [])
               for t in sc["targets"]]
    assert any(t.endswith(":9153") for t in targets)


def test_dashboard_promql_is_valid(tmp_path: Path) -> None:
    """Each dashboard query, Grafana variables replaced, parses as PromQL (promtool)."""
    promtool = _promtool()
    values = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "1m",
              "$job": ".*", "$instance": ".*"}
    rules = []
    for n, use in enumerate(dashboard_uses()):
        expr = use.expr
        for var, value in values.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{use.where}: unknown variable in {use.expr!r}"
        rules.append({"record": f"moat:dashboard_query:{n}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = _run([promtool, "check", "rules", str(path)], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_rules() -> None:
    r = _run([_promtool(), "test", "rules", RULES_TEST.name], PROM_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


# --- the dashboard -------------------------------------------------------------------


def test_dashboard_structure() -> None:
    d = _dashboard()
    assert d["uid"] == "moat"
    assert d.get("id") is None, "an exported dashboard must not carry a database id"
    assert d["title"]
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36  # Grafana 9+
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds_var = variables.get("DS_PROMETHEUS")
    inputs = {i["name"] for i in d.get("__inputs", [])}
    assert (ds_var and ds_var["type"] == "datasource" and ds_var["query"] == "prometheus") \
        or "DS_PROMETHEUS" in inputs, "no ${DS_PROMETHEUS} variable or input"

    panels = list(_walk_panels(d["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    assert all(isinstance(i, int) and i > 0 for i in ids)

    def ds_ok(ds: Any) -> bool:
        return isinstance(ds, dict) and ds.get("uid") == "${DS_PROMETHEUS}" \
            and ds.get("type") == "prometheus"

    for p in panels:
        if p["type"] == "row":
            continue
        assert ds_ok(p.get("datasource")), f"panel {p['id']} {p['title']!r}: datasource"
        assert p.get("targets"), f"panel {p['id']} {p['title']!r}: no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"panel {p['id']}: duplicate refIds"
        for t in p["targets"]:
            assert ds_ok(t.get("datasource")), f"panel {p['id']} {t['refId']}: datasource"
            assert t["expr"].strip()
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            assert ds_ok(v.get("datasource")), f"variable {v['name']}: datasource"
    for a in d["annotations"]["list"]:
        if a.get("expr"):
            assert ds_ok(a.get("datasource")), f"annotation {a['name']}: datasource"

    # The grid: 24 columns, no two panels on the same cells (rows span the width).
    cells: dict[tuple[int, int], int] = {}
    for p in d["panels"]:  # top level (collapsed rows keep theirs inside)
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["id"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {p['id']} overlap"
                cells[(x, y)] = p["id"]

    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows == ["Threats", "Traffic", "Upstreams", "Policy", "Health"]


def test_dashboard_rates_use_rate_interval() -> None:
    """rate()/increase() over $__rate_interval (or $__range for totals), never fixed."""
    for use in dashboard_uses():
        for m in re.finditer(r"\b(rate|irate|increase)\s*\(([^\[]*)\[([^\]]*)\]", use.expr):
            assert m.group(3) in ("$__rate_interval", "$__range"), \
                f"{use.where}: {m.group(1)} over [{m.group(3)}]"
        # Counters are only looked at through rate()/increase()/changes().
        for s in parse_promql(use.expr).selectors:
            if s.metric.endswith("_total"):
                assert re.search(r"\b(rate|increase)\s*\(\s*" + s.metric, use.expr), \
                    f"{use.where}: counter {s.metric} without rate()/increase()"
