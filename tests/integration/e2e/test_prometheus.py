"""Prometheus scraping a running edgemux: Debian's prometheus, started here on
loopback with a temporary config, scrapes the admin /metrics every second
while edge-sim sends requests; its HTTP API must give the values /metrics
gives (a counter between the /metrics read before and the one after), with
edgemux's platform `instance` label arriving as `exported_instance` as the
alert rules expect. The rules of dist/prometheus load and evaluate without
error against the live series, and the all-down rule goes pending when the
platform dies. `promtool check metrics` accepts the /metrics text.
"""

import json
import os
import shutil
import subprocess
import time
import unittest
import urllib.parse
import urllib.request

import promql
from harness import (WORKERS, E2ETest, Edgemux, Platform, Proc, free_port, pipes, start_edge_sim,
                     wait_until)

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

# Counters compared one by one (label sets as Prometheus stores them).
COUNTERS = [
    ("emx_edges_accepted_total", {}),
    ("emx_edge_auth_total", {"result": "ok"}),
    ("emx_edge_messages_total", {"direction": "from_edge"}),
    ("emx_edge_bytes_total", {"direction": "to_edge"}),
    ("emx_request_latency_seconds_count", {}),
    ("emx_request_latency_seconds_bucket", {"le": "+Inf"}),
]


def scraped_after(prom, t):
    """True once Prometheus holds a scrape of edgemux that began after t."""
    res = prom.query('timestamp(emx_ready{job="edgemux"})')
    return bool(res) and all(v > t for _, v, _ in res)


def parse_samples(text):
    """{(name, frozenset(labels)): value} of a /metrics text."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, rest = head.partition("{")
        labels = {}
        if rest:
            for part in rest.rstrip("}").split('",'):
                k, _, v = part.partition('="')
                labels[k] = v.rstrip('"')
        out[(name, frozenset(labels.items()))] = float(value)
    return out


class Prometheus:
    """A prometheus process of the test's own: config, data and port."""

    def __init__(self, env, targets, rule_files=()):
        self.env = env
        self.port = free_port()
        self.data = env.path("prometheus-data")
        os.makedirs(self.data, exist_ok=True)
        self.config = env.path("prometheus.yml")
        lines = ["global:", "  scrape_interval: 1s", "  scrape_timeout: 900ms",
                 "  evaluation_interval: 1s"]
        if rule_files:
            lines.append("rule_files:")
            lines += ["  - %s" % f for f in rule_files]
        lines += ["scrape_configs:", "  - job_name: edgemux", "    static_configs:",
                  "      - targets: [%s]" % ", ".join("'%s'" % t for t in targets)]
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.proc = Proc([PROMETHEUS, "--config.file=" + self.config,
                          "--storage.tsdb.path=" + self.data,
                          "--web.listen-address=127.0.0.1:%d" % self.port,
                          "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                         env.path("prometheus.log"))
        env.procs.append(self.proc)

        def ready():
            if not self.proc.alive():
                raise AssertionError("prometheus exited:\n" + self.proc.output())
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/-/ready" % self.port, timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(ready, 30, interval=0.2, what="prometheus /-/ready")

    def api(self, path, **params):
        url = "http://127.0.0.1:%d/api/v1/%s" % (self.port, path)
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read().decode())
        if body.get("status") != "success":
            raise AssertionError("prometheus %s: %r" % (path, body))
        return body["data"]

    def query(self, expr):
        """[(labels, value, timestamp)] of an instant query."""
        data = self.api("query", query=expr)
        return [(r["metric"], float(r["value"][1]), float(r["value"][0])) for r in data["result"]]


@unittest.skipUnless(PROMETHEUS and PROMTOOL,
                     "prometheus/promtool not installed (Debian package prometheus; scripts/deps.sh)")
class PrometheusScrape(E2ETest):
    def setUp(self):
        super().setUp()
        self.plat = Platform(self.env, 2)
        self.emx = Edgemux(self.env, "emx-prom", self.plat.ports)
        self.emx.wait_ready()
        self.target = "127.0.0.1:%d" % self.emx.admin_port

    def metrics(self):
        status, body = self.emx.http("/metrics")
        self.assertEqual(status, 200)
        return body

    def test_values_match_metrics_and_rules_evaluate(self):
        prom = Prometheus(self.env, [self.target], rule_files=[promql.RULES])
        wait_until(lambda: any(v == 1 for _, v, _ in prom.query('up{job="edgemux"}')), 20,
                   interval=0.2, what="prometheus scraping edgemux (up == 1)")

        # promtool's lint of the exposition itself
        text = self.metrics()
        r = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True,
                           timeout=30)
        self.assertEqual(r.returncode, 0, "promtool check metrics:\n%s" % (r.stdout + r.stderr).decode())

        # Traffic while Prometheus scrapes: counters move between reads.
        sim, _ = start_edge_sim(self.env, self.emx.edge_port, "--edges", "4", "--rate", "20",
                                "--duration", "8s", "--drain", "3s")
        wait_until(lambda: parse_samples(self.metrics()).get(("emx_edges_connected", frozenset()), 0) >= 4,
                   10, what="edge-sim's 4 devices connected")
        checked = 0
        for _ in range(3):
            before = parse_samples(self.metrics())
            after_read = time.time()
            # a scrape that began after the first read: its values are at
            # least those, and at most those of the read that follows
            wait_until(lambda: scraped_after(prom, after_read), 10, interval=0.1,
                       what="a scrape after the /metrics read")
            got = {}
            for name, labels in COUNTERS:
                sel = ",".join(['job="edgemux"'] + ['%s="%s"' % kv for kv in labels.items()])
                res = prom.query("%s{%s}" % (name, sel))
                self.assertEqual(len(res), 1, "%s{%s}: %r" % (name, sel, res))
                self.assertEqual(res[0][0].get("instance"), self.target)
                got[(name, frozenset(labels.items()))] = res[0][1]
            later = parse_samples(self.metrics())
            for key, value in got.items():
                self.assertLessEqual(before[key], value, "%s: prometheus below the earlier /metrics" % (key,))
                self.assertLessEqual(value, later[key], "%s: prometheus above the later /metrics" % (key,))
                checked += 1
            time.sleep(0.7)
        self.assertEqual(checked, 3 * len(COUNTERS))
        self.assertEqual(sim.p.wait(40), 0, "edge-sim failed:\n" + sim.output())

        # Traffic stopped: counters and gauges hold still, and the latest
        # scrape equals /metrics exactly, label for label.
        wait_until(lambda: parse_samples(self.metrics()).get(("emx_edges_connected", frozenset()), 1) == 0,
                   15, what="edge-sim's devices gone")
        now = parse_samples(self.metrics())
        settled = time.time()
        wait_until(lambda: scraped_after(prom, settled), 10, interval=0.1,
                   what="a scrape after traffic stopped")
        self.assertEqual(prom.query('emx_edges_connected{job="edgemux"}')[0][1], 0)
        self.assertGreater(now[("emx_edges_accepted_total", frozenset())], 0)
        moved = prom.query('increase(emx_edge_messages_total{job="edgemux",direction="from_edge"}[1m])')
        self.assertTrue(moved and moved[0][1] > 0, "the scrapes saw no device traffic: %r" % moved)
        for name in ("emx_edges_accepted_total", "emx_edges_closed_total", "emx_ready",
                     "emx_pipes_connected", "emx_request_latency_seconds_count"):
            res = prom.query('%s{job="edgemux"}' % name)
            self.assertEqual(len(res), 1, name)
            self.assertEqual(res[0][1], now[(name, frozenset())], name)

        # Per platform instance: edgemux's `instance` arrives as exported_instance.
        ids = sorted(i["id"] for i in json.loads(self.emx.http("/instances")[1])["instances"])
        self.assertEqual(len(ids), 2)
        res = prom.query('emx_instance_requests_total{job="edgemux"}')
        self.assertEqual(sorted(r[0].get("exported_instance") for r in res), ids)
        for labels, value, _ in res:
            self.assertEqual(labels["instance"], self.target)
            key = ("emx_instance_requests_total", frozenset({("instance", labels["exported_instance"])}))
            self.assertEqual(value, now[key], labels)
        self.assertGreater(sum(r[1] for r in res), 0)
        # an instance's pipes are every worker's (pipes_per_instance each)
        up = prom.query('sum by (exported_instance) (emx_pipes{job="edgemux",state="up"})')
        self.assertEqual({r[0]["exported_instance"]: r[1] for r in up}, {i: pipes() for i in ids})
        self.assertEqual(now[("emx_pipes_connected", frozenset())], 2 * pipes())
        # the per-worker series add up to the process totals
        for name, total in (("emx_worker_pipes_connected", "emx_pipes_connected"),
                            ("emx_worker_edges_accepted_total", "emx_edges_accepted_total")):
            res = prom.query('%s{job="edgemux"}' % name)
            self.assertEqual(sorted(r[0]["worker"] for r in res),
                             sorted(str(k) for k in range(WORKERS)), name)
            self.assertEqual(sum(r[1] for r in res), now[(total, frozenset())], name)
        # discovery reported one set: counted once, not once per worker
        self.assertEqual(now[("emx_discovery_updates_total", frozenset({("plugin", "static")}))], 1)

        # The latency histogram works with histogram_quantile.
        q = prom.query('histogram_quantile(0.5, sum by (le) (rate(emx_request_latency_seconds_bucket{job="edgemux"}[1m])))')
        self.assertEqual(len(q), 1)
        self.assertTrue(0 < q[0][1] <= 16.384, q)

        # Every rule of dist/prometheus loaded and evaluates without error.
        def rules_evaluated():
            groups = prom.api("rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return rules if rules and all(r.get("lastEvaluation", "").startswith("20") and
                                          r["health"] == "ok" for r in rules) else None

        rules = wait_until(rules_evaluated, 15, interval=0.2, what="the alert rules evaluated")
        names = {r["name"] for r in rules}
        self.assertEqual(names, {n for n, _ in promql.rule_exprs()})
        firing = [r["name"] for r in rules if r["state"] != "inactive"]
        self.assertEqual(firing, [], "alerts active on a healthy edgemux")

        # The platform dies: the all-down rule goes pending (for: 1m), and
        # the per-instance one stays quiet (all-down covers it).
        self.plat.kill()
        wait_until(lambda: prom.query('emx_pipes_connected{job="edgemux"} == 0'), 15, interval=0.2,
                   what="prometheus seeing no pipe connected")

        def pending():
            alerts = prom.api("alerts")["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "EdgemuxAllPipesDown"]

        alerts = wait_until(pending, 10, interval=0.2, what="EdgemuxAllPipesDown pending")
        self.assertEqual(alerts[0]["state"], "pending")
        self.assertEqual(alerts[0]["labels"]["instance"], self.target)
        self.assertEqual(alerts[0]["labels"]["severity"], "critical")
        wait_until(lambda: not [a for a in prom.api("alerts")["alerts"]
                                if a["labels"]["alertname"] == "EdgemuxInstanceNoPipes"],
                   10, interval=0.2, what="EdgemuxInstanceNoPipes quiet while all pipes are down")

    def test_dashboard_queries_return_data(self):
        """Every PromQL expression of the Grafana dashboard runs in Prometheus
        against the live series and returns at least one series."""
        prom = Prometheus(self.env, [self.target])
        sim, _ = start_edge_sim(self.env, self.emx.edge_port, "--edges", "3", "--rate", "10",
                                "--duration", "4s", "--drain", "3s")
        self.assertEqual(sim.p.wait(40), 0, "edge-sim failed:\n" + sim.output())
        # a couple of minutes' worth is not needed: rate() needs two scrapes
        wait_until(lambda: prom.query('count_over_time(emx_ready{job="edgemux"}[1m]) > 3'), 20,
                   interval=0.2, what="four scrapes")
        dash = promql.load_dashboard()
        variables = {v["name"] for v in dash.get("templating", {}).get("list", [])}
        empty = []
        n = 0
        for where, expr in promql.dashboard_queries(dash):
            if expr.startswith("label_values("):
                continue
            q = promql.substitute_grafana(expr, variables)
            n += 1
            try:
                # annotations mark events (a reload): empty while none happened
                if not prom.query(q) and not where.startswith("annotation"):
                    empty.append("%s: %s" % (where, q))
            except urllib.error.HTTPError as e:
                self.fail("%s: prometheus refused %r: %s" % (where, q, e.read().decode()))
        self.assertGreater(n, 10)
        self.assertEqual(empty, [], "dashboard queries without data:\n" + "\n".join(empty))


if __name__ == "__main__":
    unittest.main()
