"""What the shipped Prometheus rules and Grafana dashboard ask of edgemux's
/metrics: the series names and label matchers in their PromQL, checked
against a real scrape. Python 3 standard library only.

The extraction is not a PromQL parser; it handles what PromQL the files use:
strings, label matchers, ranges and subqueries, grouping clauses, function
calls, keywords, numbers and durations, and Grafana's $variables."""

import json
import os
import re

SOURCE_DIR = os.environ.get("EMX_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", "..", ".."))
RULES = os.path.join(SOURCE_DIR, "dist", "prometheus", "edgemux-rules.yml")
DASHBOARD = os.path.join(SOURCE_DIR, "dist", "grafana", "edgemux-dashboard.json")

# Labels Prometheus adds to every scraped series; edgemux's own `instance`
# (the platform instance) arrives as `exported_instance` (honor_labels false).
TARGET_LABELS = {"job", "instance"}
# Series Prometheus makes itself, with the target labels only.
PROMETHEUS_SERIES = {"up"}

KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
            "offset", "bool", "inf", "nan", "atan2"}

# Grafana's built-in interval variables, given values PromQL accepts.
GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "1m", "__range": "5m"}


def parse_metrics(text):
    """{name: {label: set(values)}} of a Prometheus text exposition, with
    `instance` renamed to `exported_instance` as a default scrape does."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? \S+$', line)
        if not m:
            raise ValueError("unparsed /metrics line: %r" % line)
        labels = out.setdefault(m.group(1), {})
        for k, v in re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""):
            labels.setdefault("exported_instance" if k == "instance" else k, set()).add(v)
    return out


def substitute_grafana(expr, variables=()):
    """An expression with Grafana's variables replaced: intervals by
    durations, dashboard variables (names in `variables`) by `.*` (they are
    only used in regex matchers)."""
    def repl(m):
        name = m.group(1) or m.group(2)
        if name in GRAFANA_INTERVALS:
            return GRAFANA_INTERVALS[name]
        if name in variables:
            return ".*"
        raise ValueError("unknown Grafana variable $%s in %r" % (name, expr))
    return re.sub(r'\$\{([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?\}|\$([A-Za-z_][A-Za-z0-9_]*)', repl, expr)


def selectors(expr):
    """[(metric name, [(label, op, value)])] of every series selector in a
    PromQL expression (no Grafana variables left in it)."""
    # Label matchers first, with their strings intact; then blank them.
    matchers = {}

    def take(m):
        key = "\x00%d\x00" % len(matchers)
        matchers[key] = re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', m.group(0))
        return key

    e = re.sub(r'\{[^{}]*\}', take, expr)
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', ' ', e)             # strings (quantile args etc.)
    e = re.sub(r'\[[^\]]*\]', ' ', e)                                        # ranges, subqueries
    e = re.sub(r'\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)', ' ', e)
    e = re.sub(r'\boffset\s+\S+', ' ', e)
    out = []
    used = set()
    for m in re.finditer(r'(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\x00\d+\x00)?\s*(\()?', e):
        name, key, call = m.group(1), m.group(2), m.group(3)
        if call and not key:
            continue  # a function or aggregation
        if name.lower() in KEYWORDS:
            continue
        used.add(key)
        out.append((name, matchers.get(key, [])))
    # A selector without a name ({__name__=...}) is not used by these files.
    if set(matchers) - used:
        raise ValueError("a selector without a metric name in %r" % expr)
    return out


def check_expr(expr, exported, where):
    """Problems (strings) with one expression against the exported
    {name: {label: values}}: unknown series names, label names a series does
    not have, and literal label values it never takes."""
    problems = []
    sels = selectors(expr)
    if not sels:
        problems.append("%s: no series in %r" % (where, expr))
    for name, ms in sels:
        if name in PROMETHEUS_SERIES:
            labels = {}
        elif name in exported:
            labels = exported[name]
        else:
            problems.append("%s: series %s is not exported by edgemux (%r)" % (where, name, expr))
            continue
        for label, op, value in ms:
            if label in TARGET_LABELS:
                continue
            if label == "__name__" or label not in labels:
                problems.append("%s: %s has no label %s (%r)" % (where, name, label, expr))
                continue
            if op == "=" :
                wanted = [value]
            elif op == "=~" and re.fullmatch(r'[A-Za-z0-9_.+|-]+', value):
                wanted = value.split("|")
            else:
                wanted = []
            for v in wanted:
                if v not in labels[label]:
                    problems.append("%s: %s{%s} never takes the value %r (has %s) in %r"
                                    % (where, name, label, v, sorted(labels[label]), expr))
    return problems


def rule_exprs(path=RULES):
    """[(alert name, expr)] of a rules file written as edgemux-rules.yml is:
    `- alert: NAME` then `expr: ONE LINE` or `expr: |` and an indented block."""
    out = []
    lines = open(path).read().splitlines()
    name = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r'\s*- (?:alert|record): *(\S+)', line)
        if m:
            name = m.group(1)
        m = re.match(r'(\s*)expr: *(.*)$', line)
        if m:
            indent, rest = len(m.group(1)), m.group(2).strip()
            if rest in ("|", ">", "|-", ">-"):
                block = []
                i += 1
                while i < len(lines) and (not lines[i].strip() or
                                          len(lines[i]) - len(lines[i].lstrip()) > indent):
                    block.append(lines[i].strip())
                    i += 1
                out.append((name, "\n".join(block).strip()))
                continue
            out.append((name, rest.strip("'\"")))
        i += 1
    return out


def dashboard_queries(dash):
    """[(where, expr)] of every PromQL expression in a dashboard: panel
    targets (rows' nested panels too) and annotation queries. Template
    variable queries come back as (where, "label_values(...)")."""
    out = []

    def panels(ps):
        for p in ps:
            for t in p.get("targets", []):
                if "expr" in t:
                    out.append(("panel %r target %s" % (p.get("title"), t.get("refId")), t["expr"]))
            panels(p.get("panels", []))

    panels(dash.get("panels", []))
    for a in dash.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out.append(("annotation %r" % a.get("name"), a["expr"]))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            out.append(("variable %r" % v.get("name"), q))
    return out


def load_dashboard(path=DASHBOARD):
    with open(path) as f:
        return json.load(f)
