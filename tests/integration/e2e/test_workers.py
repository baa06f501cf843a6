"""server.workers > 1: one edgemux process, four worker loops. Edges spread
over the workers' SO_REUSEPORT listeners; each worker has its own pipes and
platform-hop identity ("name/index"), so a platform request for a Thing
comes back on a pipe of the worker that holds the edge; the admin port and
the agent answer for the whole process; all-down, SIGHUP and SIGTERM reach
every worker.

EMX_E2E_WORKERS (harness) runs other e2e tests with several workers; this
file always uses four."""

import re
import signal
import threading
import time
import unittest

from harness import (GET, SUCCESS, SLACK, E2ETest, Edgemux, Platform, ao_bind, ao_parse, ao_request,
                     ao_response, check_ledger, start_edge_sim, wait_until, worker_of)

WORKERS = 4


def parse_metrics(text):
    """{(name, frozenset(labels)): value} of a Prometheus text scrape."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        if not m:
            continue
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(ms, name, **labels):
    return ms.get((name, frozenset(labels.items())))


def per_worker(ms, name, **labels):
    """[value of worker 0, 1, ...] of an emx_worker_* family."""
    return [value(ms, name, worker=str(k), **labels) for k in range(WORKERS)]


class Workers(E2ETest):
    def cluster(self, overrides=None, name="emx-w"):
        self.plat = Platform(self.env, 3)
        ov = {"server": {"workers": WORKERS},
              "platform": {"request_timeout": "2s", "all_down_grace": "500ms"},
              "edge": {"drain_spread": "300ms"}}
        for k, v in (overrides or {}).items():
            ov.setdefault(k, {}).update(v)
        self.emx = Edgemux(self.env, name, self.plat.ports, overrides=ov, admin_token=True)
        self.emx.wait_ready()
        # pipes_per_instance (2) per worker to every instance
        wait_until(lambda: self.plat.pipes_connected() == [2 * WORKERS] * 3, 15,
                   what="every worker's pipes connected")

    def metrics(self):
        status, body = self.emx.http("/metrics")
        self.assertEqual(status, 200)
        return parse_metrics(body)

    def authed_edges(self, per_worker_min=1, limit=80):
        """Raw edges (AUTHed) until every worker holds at least
        per_worker_min of them; returns {worker: [(edge, sid, endpointId)]}."""
        by = {k: [] for k in range(WORKERS)}
        for i in range(limit):
            e = self.emx.edge(app_key=self.env.app_key)
            code, sid = e.auth(self.env.app_key)
            self.assertEqual(code, SUCCESS)
            # the edge's endpointId, from the admin API's newest edge
            status, body = self.emx.http("/edges")
            self.assertEqual(status, 200)
            ids = [int(x) for x in re.findall(r'"endpointId":(\d+)', body)]
            known = {eid for lst in by.values() for _, _, eid in lst}
            new = [x for x in ids if x not in known]
            self.assertEqual(len(new), 1, body)
            by[worker_of(new[0])].append((e, sid, new[0]))
            if all(len(v) >= per_worker_min for v in by.values()):
                return by
        self.fail("edges did not reach every worker: %r" % {k: len(v) for k, v in by.items()})

    def test_spread_and_metrics_sum(self):
        self.cluster()
        ms = self.metrics()
        self.assertEqual(per_worker(ms, "emx_worker_pipes_connected"), [6.0] * WORKERS)
        self.assertEqual(value(ms, "emx_pipes_connected"), 24.0)

        proc, ledger = start_edge_sim(self.env, self.emx.edge_port, "--edges", 200, "--rate", 1,
                                      "--duration", "6s", "--drain", "3s")
        wait_until(lambda: value(self.metrics(), "emx_edges_connected") == 200, 20,
                   what="200 edges connected")
        ms = self.metrics()
        shares = per_worker(ms, "emx_worker_edges_connected")
        # One sample: the kernel's SO_REUSEPORT hash alone misses +-25 %
        # about one time in twelve; a worker holding clearly more sockets
        # than the least loaded one hands new ones over (docs/operations.md).
        handed = per_worker(ms, "emx_worker_sockets_handed_in_total")
        print("shares of 200 edges:", shares, "handed in:", handed)
        for k, n in enumerate(shares):
            self.assertTrue(37.5 <= n <= 62.5, "worker %d holds %d of 200 edges: %r" % (k, n, shares))
        # one scrape is one moment of every worker: totals are the sums
        self.assertEqual(sum(shares), value(ms, "emx_edges_connected"))
        self.assertEqual(sum(per_worker(ms, "emx_worker_edges_accepted_total")),
                         value(ms, "emx_edges_accepted_total"))
        self.assertEqual(sum(per_worker(ms, "emx_worker_pipes_connected")),
                         value(ms, "emx_pipes_connected"))
        for d in ("from_edge", "to_edge"):
            self.assertEqual(sum(per_worker(ms, "emx_worker_edge_messages_total", direction=d)),
                             value(ms, "emx_edge_messages_total", direction=d))
        # requests flow on every worker
        wait_until(lambda: min(per_worker(self.metrics(), "emx_worker_edge_messages_total",
                                          direction="to_edge")) > 100, 15,
                   what="answers on every worker")
        ms = self.metrics()
        self.assertEqual(sum(per_worker(ms, "emx_worker_edge_messages_total", direction="to_edge")),
                         value(ms, "emx_edge_messages_total", direction="to_edge"))
        proc.p.wait(60)
        import json
        with open(ledger) as f:
            check_ledger(self, json.load(f), proc.output())
        st = self.plat.stats()
        self.assertEqual(st["violations"], 0, st["violations_by_kind"])
        # /instances: every worker's pipes under each instance
        status, body = self.emx.http("/instances")
        self.assertEqual(status, 200)
        import json as _j
        insts = _j.loads(body)["instances"]
        self.assertEqual(len(insts), 3)
        for inst in insts:
            self.assertEqual(len(inst["pipes"]), 2 * WORKERS)
            self.assertEqual(sorted({p["worker"] for p in inst["pipes"]}), list(range(WORKERS)))
            self.assertEqual(inst["pipes_up"], 2 * WORKERS)

    def platform_get(self, instance, thing):
        out = {}
        t = threading.Thread(target=lambda: out.setdefault(
            "r", self.plat.cmd("get %d %s Temperature" % (instance, thing))), daemon=True)
        t.start()

        def reply(timeout=20):
            t.join(timeout)
            return out.get("r")
        return reply

    def test_platform_gets_and_admin_actions_reach_every_worker(self):
        self.cluster()
        by = self.authed_edges()
        rid = 10
        for k in range(WORKERS):
            e, sid, eid = by[k][0]
            thing = "W-%d" % k
            rid += 1
            e.send(ao_bind(rid, sid, [thing]))
            self.assertEqual(e.answers(lambda g: rid in g)[rid], [SUCCESS])
            b = self.plat.binds()["things"][thing]
            # the platform-hop identity of the worker that holds the edge
            self.assertEqual(b["server"], "emx-w/%d" % k, b)
        for k in range(WORKERS):
            e, sid, eid = by[k][0]
            for inst in (1, 2, 3):
                reply = self.platform_get(inst, "W-%d" % k)
                msg = e.recv(timeout=5)
                code, prid, peid, psid, _ = ao_parse(msg)
                self.assertEqual(code, GET)
                self.assertEqual(worker_of(peid), k)
                e.send(ao_response(SUCCESS, prid, peid, psid))
                self.assertEqual(reply(), "answer 0x40 SUCCESS", "worker %d instance %d" % (k, inst))
        st = self.plat.stats()
        self.assertEqual(st["violations"], 0, st["violations_by_kind"])
        self.assertEqual(st["platform_requests"]["answered"], 3 * WORKERS)

        # /edges finds an edge on any worker by its endpointId
        e3, _, eid3 = by[3][0]
        status, body = self.emx.http("/edges?endpoint=%d" % eid3)
        self.assertEqual(status, 200)
        self.assertIn('"endpointId":%d' % eid3, body)
        status, body = self.emx.http("/edges?thing=W-2")
        self.assertIn('"count":1', body)

        # maintenance reaches every worker: no request of any worker goes there
        inst_id = "127.0.0.1:%d" % self.plat.ports[0]
        status, body = self.emx.http("/instances/%s/maintenance" % inst_id, method="POST")
        self.assertEqual(status, 200, body)
        time.sleep(0.2)
        before = self.plat.msgs_in()
        for k in range(WORKERS):
            e, sid, eid = by[k][0]
            for i in range(6):
                rid += 1
                e.send(ao_request(GET, rid, sid))
                self.assertEqual(e.answers(lambda g: rid in g)[rid], [SUCCESS])
        after = self.plat.msgs_in()
        self.assertEqual(after[0] - before[0], 0, (before, after))
        self.assertEqual(sum(after) - sum(before), 6 * WORKERS)

        # an operator's close reaches the worker that holds the edge
        status, body = self.emx.http("/edges/%d/close?code=1008" % eid3, method="POST")
        self.assertEqual(status, 202, body)
        self.assertEqual(e3.expect_close(5), 1008)
        status, _ = self.emx.http("/edges/%d/close" % eid3, method="POST")
        self.assertEqual(status, 404)

    def test_all_down_closes_every_workers_edges(self):
        self.cluster()
        by = self.authed_edges(per_worker_min=2)
        self.plat.kill()
        for k in range(WORKERS):
            for e, _, _ in by[k]:
                self.assertEqual(e.expect_close(5 * SLACK), 1013, "worker %d" % k)
        wait_until(lambda: self.emx.http("/ready")[0] == 503, 5, what="/ready 503")
        ms = self.metrics()
        self.assertEqual(value(ms, "emx_pipes_connected"), 0.0)
        self.assertGreaterEqual(value(ms, "emx_all_down_closes_total"),
                                sum(len(v) for v in by.values()))

    def test_sighup_then_sigterm(self):
        self.cluster()
        by = self.authed_edges()
        n = sum(len(v) for v in by.values())
        # Reload: edge.max_connections to what is open now reaches every
        # worker (the limit counts the whole process).
        with open(self.emx.config_path) as f:
            text = f.read()
        text = text.replace("edge:\n", "edge:\n  max_connections: %d\n" % n, 1)
        with open(self.emx.config_path, "w") as f:
            f.write(text)
        self.emx.proc.signal(signal.SIGHUP)
        wait_until(lambda: "reload done" in self.emx.log(), 10, what="reload done")
        self.assertEqual(value(self.metrics(), "emx_reloads_total", result="ok"), 1.0)
        refused = 0
        for i in range(12):
            try:
                e = self.emx.edge(app_key=self.env.app_key, expect_status=None)
                if e.status == 101:
                    try:
                        e.expect_close(2)
                    except AssertionError:
                        pass
                e.close()
            except (ConnectionError, OSError):
                pass
        ms = self.metrics()
        refused = value(ms, "emx_edges_refused_total", reason="max_connections")
        self.assertEqual(refused, 12.0)
        self.assertEqual(sum(per_worker(ms, "emx_worker_edges_refused_total")), 12.0)
        # the old edges stayed, on every worker
        self.assertEqual(value(ms, "emx_edges_connected"), float(n))
        for k in range(WORKERS):
            e, sid, _ = by[k][0]
            e.send(ao_request(GET, 50, sid))
            self.assertEqual(e.answers(lambda g: 50 in g)[50], [SUCCESS])
        # SIGTERM: every worker drains its edges with 1001; the process exits 0
        self.emx.proc.signal(signal.SIGTERM)
        for k in range(WORKERS):
            for e, _, _ in by[k]:
                self.assertEqual(e.expect_close(5), 1001, "worker %d" % k)
        wait_until(lambda: not self.emx.proc.alive(), 15, what="edgemux exit")
        self.assertEqual(self.emx.proc.p.returncode, 0)
        log = self.emx.log()
        self.assertIn("drained in", log)
        self.assertIn("stopped", log)


if __name__ == "__main__":
    unittest.main()
