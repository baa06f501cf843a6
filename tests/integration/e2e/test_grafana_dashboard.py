"""The Grafana dashboard (dist/grafana) and the alert rules (dist/prometheus)
against a real edgemux: every PromQL expression in them names only series
that a scrape of a running edgemux's /metrics holds, with label names those
series carry and label values they take. And the dashboard is a valid
dashboard: panels with ids, grid positions and targets, datasource
references that resolve to the provisioned Prometheus datasource.

Grafana is not packaged in Debian, so the JSON is checked here rather than
loaded into a Grafana; test_prometheus.py runs every dashboard query in a
real Prometheus."""

import json
import os
import re
import unittest

import promql
from harness import E2ETest, Edgemux, Platform, edge_sim

GRAFANA_DIR = os.path.join(promql.SOURCE_DIR, "dist", "grafana")
PANEL_TYPES = {"row", "timeseries", "stat", "heatmap", "gauge", "bargauge", "table", "text"}


def provisioned_datasources():
    """[{name, uid, type, url}] of provisioning/datasources/prometheus.yml
    (a flat list of `- name:` items; no YAML library needed)."""
    path = os.path.join(GRAFANA_DIR, "provisioning", "datasources", "prometheus.yml")
    items = []
    for line in open(path).read().splitlines():
        m = re.match(r'\s*(-\s+)?(name|uid|type|url):\s*(\S+)', line)
        if not m:
            continue
        if m.group(1):
            items.append({})
        items[-1][m.group(2)] = m.group(3).strip("'\"")
    return items


class DashboardStatic(unittest.TestCase):
    """The JSON as a dashboard, without a running edgemux."""

    def setUp(self):
        self.dash = promql.load_dashboard()

    def all_panels(self):
        out = []
        for p in self.dash["panels"]:
            out.append(p)
            out.extend(p.get("panels", []))
        return out

    def test_is_a_dashboard(self):
        d = self.dash
        for key, kind in (("uid", str), ("title", str), ("schemaVersion", int), ("panels", list),
                          ("templating", dict), ("time", dict)):
            self.assertIsInstance(d.get(key), kind, key)
        self.assertRegex(d["uid"], r"^[A-Za-z0-9_-]{1,40}$")
        panels = self.all_panels()
        self.assertGreater(len(panels), 10)
        ids = [p.get("id") for p in panels]
        self.assertTrue(all(isinstance(i, int) for i in ids), ids)
        self.assertEqual(len(ids), len(set(ids)), "panel ids repeat")
        cells = {}
        for p in panels:
            where = "panel %r" % p.get("title")
            self.assertIn(p.get("type"), PANEL_TYPES, where)
            self.assertTrue(p.get("title"), "a panel without a title: %r" % p)
            g = p.get("gridPos", {})
            for k in ("x", "y", "w", "h"):
                self.assertIsInstance(g.get(k), int, "%s gridPos.%s" % (where, k))
            self.assertTrue(0 <= g["x"] and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, where)
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    self.assertNotIn((x, y), cells, "%s overlaps %s" % (where, cells.get((x, y))))
                    cells[(x, y)] = where
            if p["type"] == "row":
                continue
            targets = p.get("targets", [])
            self.assertTrue(targets, "%s has no query" % where)
            refs = [t.get("refId") for t in targets]
            self.assertEqual(len(refs), len(set(refs)), "%s: refIds repeat" % where)
            for t in targets:
                self.assertTrue(t.get("expr", "").strip(), "%s: a target without expr" % where)

    def test_datasources_resolve(self):
        """Every datasource reference names the provisioned Prometheus, directly
        or through the dashboard's datasource variable defaulting to it."""
        provisioned = provisioned_datasources()
        self.assertEqual([p["type"] for p in provisioned], ["prometheus"])
        prom_uid = provisioned[0]["uid"]
        self.assertTrue(provisioned[0]["url"].startswith("http://prometheus:9090"), provisioned)
        variables = {v["name"]: v for v in self.dash["templating"]["list"]}
        ds_vars = {n for n, v in variables.items() if v.get("type") == "datasource"}
        for n in ds_vars:
            self.assertEqual(variables[n].get("query"), "prometheus", n)
            self.assertEqual(variables[n].get("current", {}).get("value"), prom_uid,
                             "variable $%s does not default to the provisioned datasource" % n)

        def check(ref, where):
            self.assertIsInstance(ref, dict, "%s: datasource %r" % (where, ref))
            uid = ref.get("uid", "")
            m = re.fullmatch(r'\$\{?([A-Za-z_]\w*)\}?', uid)
            if m:
                self.assertIn(m.group(1), ds_vars, "%s: unknown datasource variable %s" % (where, uid))
            else:
                self.assertEqual(uid, prom_uid, "%s: datasource uid %r is not provisioned" % (where, uid))
            self.assertEqual(ref.get("type"), "prometheus", where)

        n = 0
        for p in self.all_panels():
            if p["type"] == "row":
                continue
            check(p.get("datasource"), "panel %r" % p["title"])
            for t in p["targets"]:
                check(t.get("datasource", p.get("datasource")), "panel %r %s" % (p["title"], t["refId"]))
                n += 1
        for a in self.dash.get("annotations", {}).get("list", []):
            if a.get("builtIn"):
                continue
            check(a.get("datasource"), "annotation %r" % a.get("name"))
        for v in variables.values():
            if v.get("type") == "query":
                check(v.get("datasource"), "variable $%s" % v["name"])
        self.assertGreater(n, 20)

    def test_dashboard_provider(self):
        text = open(os.path.join(GRAFANA_DIR, "provisioning", "dashboards", "edgemux.yml")).read()
        self.assertRegex(text, r"(?m)^\s*type:\s*file\s*$")
        m = re.search(r"(?m)^\s*path:\s*(\S+)", text)
        self.assertIsNotNone(m, "no path in the dashboard provider")
        # docker-compose.yml mounts the dashboard where the provider reads
        compose = open(os.path.join(promql.SOURCE_DIR, "docker-compose.yml")).read()
        self.assertIn("./dist/grafana/edgemux-dashboard.json:%s/" % m.group(1), compose)
        self.assertIn("./dist/grafana/provisioning:/etc/grafana/provisioning", compose)

    def test_covers_the_areas(self):
        """Traffic and answers per instance, pipes and writability, devices,
        latency quantiles, reloads and discovery, tunnels and worker loops
        each have a panel."""
        exprs = "\n".join(e for _, e in promql.dashboard_queries(self.dash))
        for needle in ("emx_instance_requests_total", "emx_answers_total", "emx_pipes{",
                       "emx_pipe_writable", "emx_edges_connected", "emx_reloads_total",
                       "emx_discovery_updates_total", "emx_discovery_failures_total",
                       "emx_tunnel_sockets_open", "emx_tunnel_bytes_total",
                       "emx_tunnel_sockets_refused_total", "emx_worker_sockets{",
                       "emx_worker_pipes_connected"):
            self.assertIn(needle, exprs)
        self.assertRegex(exprs, r"histogram_quantile\(0\.99, sum by \([^)]*\ble\b[^)]*\) "
                                r"\(rate\(emx_request_latency_seconds_bucket\{")
        # code by code, as the alert rules count them
        for code_reasons in ("no_instance", "pipe_lost", "timeout|edge_timeout"):
            self.assertIn(code_reasons, exprs)


class DashboardNames(E2ETest):
    """Every expression against the series of a running edgemux."""

    def test_expressions_name_exported_series(self):
        plat = Platform(self.env, 2)
        emx = Edgemux(self.env, "emx-dash", plat.ports)
        emx.wait_ready()
        rc, out, _ = edge_sim(self.env, emx.edge_port, "--edges", "2", "--rate", "10",
                              "--duration", "1s", "--drain", "3s", ledger=False, timeout=60)
        self.assertEqual(rc, 0, out)
        status, text = emx.http("/metrics")
        self.assertEqual(status, 200)
        exported = promql.parse_metrics(text)
        self.assertIn("emx_request_latency_seconds_bucket", exported)
        self.assertIn("emx_discovery_last_good_age_seconds", exported)

        dash = promql.load_dashboard()
        variables = {v["name"] for v in dash["templating"]["list"]}
        problems = []
        queries = promql.dashboard_queries(dash)
        self.assertGreater(len(queries), 30)
        for where, expr in queries:
            m = re.fullmatch(r'label_values\((.*),\s*([A-Za-z_]\w*)\)', expr.strip())
            if m:
                sel = promql.substitute_grafana(m.group(1), variables)
                problems += promql.check_expr(sel, exported, where)
                label = m.group(2)
                name = promql.selectors(sel)[0][0]
                if label not in promql.TARGET_LABELS and label not in exported.get(name, {}):
                    problems.append("%s: %s has no label %s" % (where, name, label))
                continue
            try:
                problems += promql.check_expr(promql.substitute_grafana(expr, variables), exported, where)
            except ValueError as e:
                problems.append("%s: %s" % (where, e))
        rules = promql.rule_exprs()
        self.assertGreater(len(rules), 10)
        for name, expr in rules:
            problems += promql.check_expr(expr, exported, "alert %s" % name)
        self.assertFalse(problems, "\n" + "\n".join(problems))

    def test_checker_finds_wrong_names(self):
        """The check itself: a misspelt series, label or label value is found."""
        exported = promql.parse_metrics(
            '# TYPE emx_answers_total counter\n'
            'emx_answers_total{reason="no_instance"} 1\n'
            'emx_pipes{instance="p1",state="up"} 2\n')
        ok = 'sum by (exported_instance) (rate(emx_answers_total{job=~".*",reason=~"no_instance"}[1m]))'
        self.assertEqual(promql.check_expr(ok, exported, "x"), [])
        self.assertEqual(promql.check_expr('emx_pipes{exported_instance="p1",state="up"} > 0', exported, "x"), [])
        for bad in ('rate(emx_answer_total[1m])', 'emx_answers_total{code="0xA0"}',
                    'emx_answers_total{reason=~"no_instance|no_instances"}', 'emx_pipes{state="UP"}',
                    'emx_pipes{instance_id="p1"}', 'emx_pipes > on (x) emx_pipe_gone'):
            self.assertTrue(promql.check_expr(bad, exported, "x"), bad)


if __name__ == "__main__":
    unittest.main()
