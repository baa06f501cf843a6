"""Operations against the real binary: the admin API (/metrics, /instances,
/edges, maintenance), the HAProxy agent port, SIGHUP reload, SIGTERM drain,
device addresses from X-Forwarded-For, the per-edge limits, and no secret
in logs or metrics."""

import json
import re
import signal
import socket
import time
import unittest

from harness import (BIND, GET, SERVICE_UNAVAILABLE, SUCCESS, WORKERS, E2ETest, Edgemux, Platform,
                     ao_auth, ao_bind, ao_parse, ao_request, edge_sim, free_port, pipes,
                     wait_until)

FORBIDDEN = 0x83


def parse_metrics(text):
    """{(name, frozenset(labels.items())): value}; checks the exposition
    format on the way: every sample's family has HELP and TYPE, counters end
    in _total."""
    types, samples = {}, {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$', line)
        if not m:
            raise AssertionError("bad metrics line: %r" % line)
        name, labels = m.group(1), {}
        if m.group(3):
            for lm in re.finditer(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3)):
                labels[lm.group(1)] = lm.group(2)
        base = re.sub(r'_(bucket|sum|count)$', '', name)
        fam = name if name in types else base
        if fam not in types:
            raise AssertionError("sample without TYPE: %r" % line)
        if types[fam] == "counter" and not name.endswith("_total"):
            raise AssertionError("counter not ending in _total: %s" % name)
        samples[(name, frozenset(labels.items()))] = float(m.group(4))
    return samples


def metric(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def agent(port):
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        data = b""
        while True:
            chunk = s.recv(256)
            if not chunk:
                return data.decode()
            data += chunk


class Operations(E2ETest):
    def cluster(self, instances=2, overrides=None, psim_extra=()):
        self.plat = Platform(self.env, instances, extra=psim_extra)
        # the POST actions (maintenance, close) need the admin token
        self.emx = Edgemux(self.env, "emx-ops", self.plat.ports, overrides=overrides,
                           admin_token=True)
        self.emx.wait_ready()
        wait_until(lambda: all(n == pipes() for n in self.plat.pipes_connected()), 10,
                   what="every pipe connected")

    def authed_edge(self, **kw):
        e = self.emx.edge(app_key=self.env.app_key, **kw)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        return e, sid

    def metrics(self):
        status, body = self.emx.http("/metrics")
        self.assertEqual(status, 200)
        return parse_metrics(body)

    def edges(self, query=""):
        status, body = self.emx.http("/edges" + query)
        self.assertEqual(status, 200, body)
        return json.loads(body)["edges"]

    def test_metrics_count_what_happened(self):
        self.cluster()
        before = self.metrics()
        e, sid = self.authed_edge()
        for rid in range(2, 12):
            e.send(ao_request(GET, rid, sid))
            self.assertEqual(ao_parse(e.recv())[0], SUCCESS)
        bad = self.emx.edge(app_key="nope")
        bad.send(ao_auth(1, "wrong-key"))
        bad.recv()
        self.assertEqual(bad.expect_close(), 1008)
        m = self.metrics()
        self.assertEqual(metric(m, "emx_edges_connected"), 1)
        self.assertEqual(metric(m, "emx_edges_accepted_total"), 2)
        self.assertEqual(metric(m, "emx_edge_auth_total", result="ok"), 1)
        self.assertEqual(metric(m, "emx_edge_auth_total", result="failed"), 1)
        self.assertEqual(metric(m, "emx_pipes_connected"), 2 * pipes())
        self.assertEqual(metric(m, "emx_ready"), 1)
        # 11 requests forwarded (AUTH + 10 GETs) and the bad AUTH
        self.assertEqual(metric(m, "emx_request_latency_seconds_count"), 12)
        self.assertEqual(metric(m, "emx_request_latency_seconds_bucket", le="+Inf"), 12)
        routed = sum(metric(m, "emx_instance_requests_total", instance=i) or 0
                     for i in self.instance_ids())
        self.assertEqual(routed, 12)
        to_platform = sum(metric(m, "emx_instance_messages_total", instance=i,
                                 direction="to_platform") for i in self.instance_ids())
        # pipe AUTHs (one per pipe: 2 instances × pipes()) + 12 requests
        self.assertEqual(to_platform, 2 * pipes() + 12)
        for i in self.instance_ids():
            # every worker's pipes to the instance
            self.assertEqual(metric(m, "emx_pipes", instance=i, state="up"), pipes())
            # pipe labels are "<worker>.<index>" with several workers
            for k in range(WORKERS):
                label = "%d.0" % k if WORKERS > 1 else "0"
                self.assertEqual(metric(m, "emx_pipe_writable", instance=i, pipe=label), 1)
        # the one set the file gave (static reports changes only), counted
        # once however many workers got a copy of it
        self.assertEqual(metric(m, "emx_discovery_updates_total", plugin="static"), 1)
        self.assertIsNotNone(metric(m, "emx_discovery_last_good_age_seconds", plugin="static"))
        # edgemux's own answers by reason
        self.assertEqual(metric(before, "emx_answers_total", reason="keep_alive"), 0)
        e.send(ao_request(0x30, 50, sid))  # unknown code: 0x80
        e.recv()
        m = self.metrics()
        self.assertEqual(metric(m, "emx_answers_total", reason="bad_request"), 1)
        _, text = self.emx.http("/metrics")
        self.assertNotIn(self.env.app_key, text)

    def instance_ids(self):
        status, body = self.emx.http("/instances")
        self.assertEqual(status, 200)
        return [i["id"] for i in json.loads(body)["instances"]]

    def test_instances_and_maintenance(self):
        self.cluster()
        status, body = self.emx.http("/instances")
        self.assertEqual(status, 200)
        inst = json.loads(body)["instances"]
        self.assertEqual(len(inst), 2)
        for i in inst:
            self.assertEqual(i["host"], "127.0.0.1")
            self.assertIn(i["port"], self.plat.ports)
            self.assertEqual(i["state"], "active")
            self.assertFalse(i["maintenance"])
            self.assertEqual(len(i["pipes"]), pipes())
            self.assertTrue(all(p["state"] == "up" and p["writable"] for p in i["pipes"]))
        self.assertNotIn(self.env.app_key, body)
        first = inst[0]["id"]
        self.assertEqual(self.emx.http("/instances/%s/maintenance" % first, "POST")[0], 200)
        self.assertEqual(self.emx.http("/instances/nope/maintenance", "POST")[0], 404)
        self.assertEqual(self.emx.http("/instances/%s/maintenance" % first)[0], 405)
        before = self.plat.msgs_in()
        e, sid = self.authed_edge()
        for rid in range(2, 22):
            e.send(ao_request(GET, rid, sid))
            self.assertEqual(ao_parse(e.recv())[0], SUCCESS)
        got = [a - b for a, b in zip(self.plat.msgs_in(), before)]
        idx = self.plat.ports.index(inst[0]["port"])
        self.assertEqual(got[idx], 0, got)  # nothing new to the instance in maintenance
        self.assertTrue(json.loads(self.emx.http("/instances")[1])["instances"][0]["maintenance"])
        self.assertEqual(self.emx.http("/instances/%s/maintenance" % first, "DELETE")[0], 200)
        before = self.plat.msgs_in()
        for rid in range(30, 50):
            e.send(ao_request(GET, rid, sid))
            self.assertEqual(ao_parse(e.recv())[0], SUCCESS)
        got = [a - b for a, b in zip(self.plat.msgs_in(), before)]
        self.assertGreater(got[idx], 0, got)
        # ?on=0 works as DELETE
        self.assertEqual(self.emx.http("/instances/%s/maintenance?on=1" % first, "POST")[0], 200)
        self.assertEqual(self.emx.http("/instances/%s/maintenance?on=0" % first, "POST")[0], 200)
        self.assertFalse(json.loads(self.emx.http("/instances")[1])["instances"][0]["maintenance"])

    def test_edges_find_and_close(self):
        self.cluster()
        e, sid = self.authed_edge()
        e.send(ao_bind(2, sid, ["PumpA", "Pump B"]))
        self.assertEqual(ao_parse(e.recv())[0], SUCCESS)
        other, osid = self.authed_edge()
        found = self.edges("?thing=Pump%20B")
        self.assertEqual(len(found), 1)
        dev = found[0]
        self.assertEqual(sorted(dev["things"]), ["Pump B", "PumpA"])
        self.assertEqual(dev["state"], "authed")
        self.assertEqual(dev["address"], "127.0.0.1")
        self.assertEqual(self.edges("?thing=Nothing"), [])
        by_id = self.edges("?endpoint=%d" % dev["endpointId"])
        self.assertEqual([d["endpointId"] for d in by_id], [dev["endpointId"]])
        self.assertEqual(len(self.edges()), 2)
        self.assertEqual(self.emx.http("/edges?endpoint=zz")[0], 400)
        self.assertEqual(self.emx.http("/edges/%d/close" % dev["endpointId"])[0], 405)
        self.assertEqual(self.emx.http("/edges/12345678/close", "POST")[0], 404)
        status, _ = self.emx.http("/edges/%s/close?code=1001&reason=moving" % dev["endpointIdHex"],
                                  "POST")
        self.assertEqual(status, 202)
        self.assertEqual(e.expect_close(), 1001)
        other.send(ao_request(GET, 9, osid))
        self.assertEqual(ao_parse(other.recv())[0], SUCCESS)  # the other one stays
        wait_until(lambda: len(self.edges()) == 1, 5, what="kicked edge gone")
        self.assertEqual(metric(self.metrics(), "emx_edges_kicked_total"), 1)

    def test_admin_parser_is_strict(self):
        self.cluster(instances=1)

        def raw(req):
            data = b""
            try:
                with socket.create_connection(("127.0.0.1", self.emx.admin_port), timeout=3) as s:
                    s.sendall(req)
                    while True:
                        chunk = s.recv(4096)
                        if not chunk:
                            return data
                        data += chunk
            except ConnectionResetError:
                # answered and closed before reading all we sent: the kernel
                # may reset; what arrived before counts
                return data or b" 431 (reset) "

        self.assertIn(b" 400 ", raw(b"GET metrics HTTP/1.1\r\n\r\n"))
        self.assertIn(b" 400 ", raw(b"get /metrics HTTP/1.1\r\n\r\n"))
        self.assertIn(b" 505 ", raw(b"GET /metrics HTTP/2.0\r\n\r\n"))
        self.assertIn(b" 400 ", raw(b"GET /edges%00 HTTP/1.1\r\n\r\n"))
        self.assertIn(b" 414 ", raw(b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n"))
        self.assertIn(b" 431 ", raw(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 3000))
        self.assertIn(b" 404 ", raw(b"GET /nothing HTTP/1.1\r\n\r\n"))
        self.assertEqual(self.emx.http("/health")[0], 200)

    def test_agent_ready_drain(self):
        aport = free_port()
        self.plat = Platform(self.env, 1)
        self.emx = Edgemux(self.env, "emx-ops", self.plat.ports,
                           overrides={"admin": {"agent_listen": "127.0.0.1:%d" % aport},
                                      "edge": {"max_connections": 10},
                                      "platform": {"all_down_grace": "30s"}})
        self.emx.wait_ready()
        self.assertEqual(agent(aport), "ready 100%\n")
        edges = [self.authed_edge()[0] for _ in range(5)]
        self.assertEqual(agent(aport), "ready 50%\n")  # 100% × (1 - 5/10)
        self.plat.cmd("crash 1")
        wait_until(lambda: agent(aport) == "drain\n", 5, what="agent drain")
        self.assertEqual(self.emx.http("/ready")[0], 503)
        self.plat.cmd("restore 1")
        wait_until(lambda: agent(aport).startswith("ready"), 10, what="agent ready again")
        self.assertNotIn("not in this version", self.emx.log())
        for e in edges:
            e.close()

    def test_sighup_reload(self):
        self.cluster(instances=1, overrides={"edge": {"max_pending": 500}})
        e, sid = self.authed_edge()
        # a limit change applies to the open edge
        with open(self.emx.config_path) as f:
            good = f.read()
        with open(self.emx.config_path, "w") as f:
            f.write(good.replace("max_pending: 500", "max_msgs_per_sec: 2\n  max_pending: 500")
                    .replace("port: %d" % self.emx.edge_port, "port: %d" % free_port()))
        self.emx.proc.signal(signal.SIGHUP)
        wait_until(lambda: "reload done" in self.emx.log(), 5, what="reload done")
        log = self.emx.log()
        self.assertIn("edge.port changed: needs a restart; not applied", log)
        codes = []
        for rid in range(2, 8):
            e.send(ao_request(GET, rid, sid))
            codes.append(ao_parse(e.recv())[0])
        self.assertIn(SERVICE_UNAVAILABLE, codes)  # the new rate limit holds
        self.assertEqual(codes[0], SUCCESS)
        # the edge was not dropped, and the old port still serves
        e2, _ = self.authed_edge()
        # an invalid config is refused and the old one stays
        with open(self.emx.config_path, "w") as f:
            f.write(good.replace("max_pending: 500", "max_pending: lots"))
        self.emx.proc.signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in self.emx.log(), 5, what="reload refused")
        self.assertIn("max_pending", self.emx.log().split("reload refused")[0].splitlines()[-1]
                      + self.emx.log())
        time.sleep(1.1)
        codes = []
        for rid in range(10, 16):
            e.send(ao_request(GET, rid, sid))
            codes.append(ao_parse(e.recv())[0])
        self.assertIn(SERVICE_UNAVAILABLE, codes)  # still the reloaded limit
        self.assertTrue(self.emx.proc.alive())
        m = self.metrics()
        self.assertEqual(metric(m, "emx_reloads_total", result="ok"), 1)
        self.assertEqual(metric(m, "emx_reloads_total", result="failed"), 1)
        self.assertEqual(metric(m, "emx_edges_closed_total"), 0)
        e2.close()

    def test_sighup_discovery_change(self):
        self.plat = Platform(self.env, 2)
        self.emx = Edgemux(self.env, "emx-ops", self.plat.ports[:1])
        self.emx.wait_ready()
        e, sid = self.authed_edge()
        other = self.env.path("other-instances.yaml")
        with open(other, "w") as f:
            f.write("instances:\n  - address: 127.0.0.1\n    port: %d\n" % self.plat.ports[1])
        with open(self.emx.config_path) as f:
            text = f.read()
        with open(self.emx.config_path, "w") as f:
            f.write(text.replace(self.emx.instances_file, other))
        self.emx.proc.signal(signal.SIGHUP)
        wait_until(lambda: [i["port"] for i in json.loads(self.emx.http("/instances")[1])
                            ["instances"] if i["state"] == "active"] == [self.plat.ports[1]],
                   10, what="discovery switched")
        self.assertIn("discovery changed", self.emx.log())
        wait_until(lambda: self.plat.pipes_connected()[1] == pipes(), 10, what="new pipes")
        e.send(ao_request(GET, 5, sid))
        self.assertEqual(ao_parse(e.recv())[0], SUCCESS)

    def test_sigterm_drain(self):
        self.cluster(instances=1, overrides={"edge": {"drain_spread": "1s"},
                                             "platform": {"request_timeout": "4s"}},
                     psim_extra=("--latency", "1500"))
        aport = None
        edges = [self.authed_edge() for _ in range(4)]
        for i, (e, sid) in enumerate(edges):
            e.send(ao_request(GET, 100 + i, sid))  # in flight when SIGTERM comes
        time.sleep(0.2)
        t0 = time.monotonic()
        self.emx.proc.signal(signal.SIGTERM)
        wait_until(lambda: self.emx.http("/ready")[0] != 200, 2, what="/ready not 200")
        for i, (e, sid) in enumerate(edges):
            code, rid, _, _, _ = ao_parse(e.recv(timeout=6))
            self.assertEqual((code, rid), (SUCCESS, 100 + i))
            self.assertEqual(e.expect_close(timeout=6), 1001)
        self.emx.proc.p.wait(10)
        elapsed = time.monotonic() - t0
        self.assertEqual(self.emx.proc.p.returncode, 0)
        self.assertLess(elapsed, 1 + 4 + 3 + 1)  # drain_spread + request_timeout + slack
        self.assertIn("drained in", self.emx.log())
        del aport

    def test_sigterm_refuses_new_edges_and_agent_drains(self):
        aport = free_port()
        self.plat = Platform(self.env, 1, extra=("--latency", "1500"))
        self.emx = Edgemux(self.env, "emx-ops", self.plat.ports,
                           overrides={"admin": {"agent_listen": "127.0.0.1:%d" % aport},
                                      "edge": {"drain_spread": "3s"}})
        self.emx.wait_ready()
        e, sid = self.authed_edge()
        e.send(ao_request(GET, 7, sid))
        self.emx.proc.signal(signal.SIGTERM)
        wait_until(lambda: agent(aport) == "drain\n", 2, what="agent drain")
        try:
            late = self.emx.edge(app_key=self.env.app_key, expect_status=None)
            if late.status == 101:
                self.assertIn(late.expect_close(timeout=3), (1001, 1006, 1008, 1011, 1013))
        except (ConnectionError, OSError):
            pass
        self.assertEqual(ao_parse(e.recv(timeout=5))[0], SUCCESS)
        self.assertEqual(e.expect_close(timeout=6), 1001)
        self.emx.proc.p.wait(15)
        self.assertEqual(self.emx.proc.p.returncode, 0)

    def test_forwarded_for_trusted_and_untrusted(self):
        self.cluster(instances=1, overrides={"edge": {"trusted_proxies": "[10.0.0.0/8, 127.0.0.1]"}})
        e, _ = self.authed_edge(extra_headers=("X-Forwarded-For: 198.51.100.9, 203.0.113.7",))
        found = self.edges()
        self.assertEqual([d["address"] for d in found], ["203.0.113.7"])
        self.assertIn("connected from 203.0.113.7 via 127.0.0.1", self.emx.log())
        e.close()
        wait_until(lambda: self.edges() == [], 5, what="edge gone")
        # not trusted: the header is ignored
        self.emx.proc.stop()
        self.emx = Edgemux(self.env, "emx-ops2", self.plat.ports,
                           overrides={"edge": {"trusted_proxies": "[10.0.0.0/8]"}})
        self.emx.wait_ready()
        e, _ = self.authed_edge(extra_headers=("X-Forwarded-For: 203.0.113.7",))
        self.assertEqual([d["address"] for d in self.edges()], ["127.0.0.1"])
        self.assertNotIn("203.0.113.7", self.emx.log())

    def test_per_source_cap_uses_real_address(self):
        self.cluster(instances=1, overrides={"edge": {"trusted_proxies": "[127.0.0.1]",
                                                      "max_connections_per_source": 2}})
        hdr = ("X-Forwarded-For: 203.0.113.7",)
        a = self.emx.edge(app_key=self.env.app_key, extra_headers=hdr)
        b = self.emx.edge(app_key=self.env.app_key, extra_headers=hdr)
        refused = False
        try:
            c = self.emx.edge(app_key=self.env.app_key, extra_headers=hdr, expect_status=None)
            if c.status == 101:
                c.expect_close(timeout=3)
            refused = True
        except (ConnectionError, OSError, AssertionError):
            refused = True
        self.assertTrue(refused)
        d = self.emx.edge(app_key=self.env.app_key, extra_headers=("X-Forwarded-For: 203.0.113.8",))
        self.assertEqual(d.auth(self.env.app_key)[0], SUCCESS)
        m = self.metrics()
        self.assertEqual(metric(m, "emx_edges_refused_total", reason="max_connections_per_source"), 1)
        self.assertEqual(metric(m, "emx_edges_forwarded_for_total"), 3)
        for x in (a, b, d):
            x.close()

    def test_rate_limit_and_things_limit(self):
        self.cluster(instances=1, overrides={"edge": {"max_msgs_per_sec": 5, "max_things": 2}})
        e, sid = self.authed_edge()  # the AUTH took one token
        for rid in range(2, 12):
            e.send(ao_request(GET, rid, sid))
        codes = [ao_parse(e.recv()) for _ in range(10)]
        limited = [c for c in codes if c[0] == SERVICE_UNAVAILABLE]
        self.assertGreaterEqual(len(limited), 5)
        time.sleep(1.1)
        e.send(ao_bind(20, sid, ["A", "B"]))
        self.assertEqual(ao_parse(e.recv())[:2], (SUCCESS, 20))
        e.send(ao_bind(21, sid, ["A", "C"]))
        self.assertEqual(ao_parse(e.recv())[:2], (FORBIDDEN, 21))
        e.send(ao_bind(22, sid, ["B"]))  # already bound: free
        self.assertEqual(ao_parse(e.recv())[:2], (SUCCESS, 22))
        m = self.metrics()
        self.assertGreaterEqual(metric(m, "emx_answers_total", reason="rate_limited"), 5)
        self.assertEqual(metric(m, "emx_answers_total", reason="too_many_things"), 1)
        self.assertEqual(self.plat.stats()["violations"], 0)

    def test_no_secret_in_logs_json(self):
        self.cluster(instances=1, overrides={"log": {"level": "debug", "format": "json"}})
        rc, out, _ = edge_sim(self.env, self.emx.edge_port, "--edges", 3, "--rate", 10,
                              "--duration", "1s", "--drain", "3s")
        self.assertEqual(rc, 0, out)
        bad = self.emx.edge(app_key="x")
        bad.send(ao_auth(1, "bad-secret-key-123"))
        bad.recv()
        bad.expect_close()
        self.emx.proc.signal(signal.SIGHUP)
        wait_until(lambda: "reload done" in self.emx.log(), 5, what="reload")
        self.emx.proc.stop()
        log = self.emx.log()
        self.assertNotIn(self.env.app_key, log)
        self.assertNotIn("bad-secret-key-123", log)
        lines = [l for l in log.splitlines() if l.strip()]
        self.assertGreater(len(lines), 5)
        tags = set()
        for l in lines:
            obj = json.loads(l)  # every line is one JSON object
            keys = {"ts", "level", "tag", "msg"}
            if WORKERS > 1 and "worker" in obj:
                # with several workers each worker's lines say which one
                self.assertIn(obj["worker"], range(WORKERS), l)
                keys.add("worker")
            self.assertEqual(set(obj), keys)
            tags.add(obj["tag"])
        self.assertIn("server", tags)
        self.assertTrue(any(t.startswith("discovery:static") for t in tags), tags)


if __name__ == "__main__":
    unittest.main()
