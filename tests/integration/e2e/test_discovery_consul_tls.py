"""Consul discovery over HTTPS, end to end: the real edgemux with the consul
plugin (address https://..., ca_file) against
tests/integration/consul/consul_fixture.py serving HTTPS with a certificate
made at test time (harness.PKI).

- The fixture's certificate is issued for 127.0.0.1/localhost by the CA in
  ca_file: the registered instances are found, pipes open, edge-sim traffic
  is answered (ledger checked), and a registration made later arrives
  through a blocking query over TLS.
- The certificate comes from another CA: the plugin refuses the handshake
  (no HTTP request reaches the fixture), reports a source failure with the
  TLS reason, no instance is added and /ready stays 503.
- After a good set, the fixture comes back on its port with a certificate of
  the right CA for another host name: the host name check fails, the last
  good set is kept (pipes, traffic, /ready 200); the good certificate back,
  the plugin says Consul answers again.

With several worker loops (server.workers) the one Consul watch runs on
worker 0 and every worker logs each source failure it is handed: the
failures are counted on worker 0's lines (one per failed query), and every
worker has its pipes to each instance."""

import json
import os
import re
import ssl
import sys
import time
import unittest
import urllib.request

from consul_set import SERVICE, entry, preload_args
from discovery_workers import every_worker_piped, worker0_lines
from harness import (PKI, SOURCE_DIR, E2ETest, Edgemux, Platform, Proc, check_ledger, edge_sim,
                     pipes, wait_until)

FIXTURE = os.path.join(SOURCE_DIR, "tests", "integration", "consul", "consul_fixture.py")
# libcurl's (OpenSSL) wording of a failed verification: an unknown issuer, or
# a certificate for another name.
BAD_CA = r"SSL certificate problem: (unable to get local issuer certificate|self[- ]signed)"
BAD_NAME = r"SSL: no alternative certificate subject name matches target host name '127\.0\.0\.1'"


class TLSFixture:
    """consul_fixture.py over HTTPS with the given certificate and key; its
    control endpoint is reached over HTTPS too (trusting `ca`, no name check:
    the test drives it even when its certificate names another host)."""

    def __init__(self, env, cert, key, ca, port=0, instances=()):
        self.env = env
        n = len(env.procs)
        self.port_file = env.path("consul-port-%d" % n)
        preload = preload_args(env, instances)
        self.proc = Proc([sys.executable, FIXTURE, "--port-file", self.port_file, "--port", str(port),
                          "--lifetime", "120", "--tls-cert", cert, "--tls-key", key] + preload,
                         env.path("consul-fixture-%d.log" % n), cwd=env.dir)
        env.procs.append(self.proc)
        self.ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        self.ctx.check_hostname = False

        def port_written():
            if not self.proc.alive():
                raise AssertionError("consul fixture exited:\n" + self.proc.output())
            try:
                with open(self.port_file) as f:
                    return int(f.read())
            except (OSError, ValueError):
                return 0

        self.port = wait_until(port_written, 10, what="consul fixture port")

    def ctl(self, action, **body):
        req = urllib.request.Request("https://127.0.0.1:%d/_fixture/%s" % (self.port, action),
                                     data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=5, context=self.ctx) as r:
            return json.loads(r.read())

    def register(self, port, ident):
        return self.ctl("register", **entry(port, ident))

    def stop(self):
        self.proc.stop(5)


class ConsulDiscoveryTLS(E2ETest):
    def setUp(self):
        super().setUp()
        self.pki = PKI(self.env)
        self.good = self.pki.issue("consul", dns=("localhost",), ips=("127.0.0.1",))
        self.plat = Platform(self.env, 3)

    def edgemux(self, fixture, name="emx-consul-tls"):
        discovery = {"plugin": "consul", "address": "https://127.0.0.1:%d" % fixture.port,
                     "service": SERVICE, "ca_file": self.pki.cert, "wait": "30s",
                     "min_interval": "100ms", "backoff_min": "200ms", "backoff_max": "1s",
                     "timeout": "2s"}
        return Edgemux(self.env, name, [], discovery=discovery,
                       overrides={"platform": {"request_timeout": "4s", "all_down_grace": "1s"}})

    def traffic(self, emx):
        """edge-sim for a second; returns the messages per instance."""
        before = self.plat.msgs_in()
        rc, out, ledger = edge_sim(self.env, emx.edge_port, "--edges", 2, "--rate", 20,
                                   "--duration", "1s", "--drain", "3s")
        self.assertEqual(rc, 0, out)
        check_ledger(self, ledger, out)
        return [a - b for a, b in zip(self.plat.msgs_in(), before)]

    def failures(self, emx):
        # one line per failed query: worker 0's (each worker repeats it)
        return re.findall(r"discovery source failed \(([^\n]*)\); keeping the last good set",
                          worker0_lines(emx.log()))

    def instances(self, emx):
        status, body = emx.http("/instances")
        self.assertEqual(status, 200)
        return json.loads(body)["instances"]

    def test_https_with_ca_file_finds_instances_and_carries_traffic(self):
        consul = TLSFixture(self.env, self.good[0], self.good[1], self.pki.cert)
        consul.register(self.plat.ports[0], "tw-0")
        consul.register(self.plat.ports[1], "tw-1")
        emx = self.edgemux(consul)
        emx.wait_ready()
        wait_until(lambda: self.plat.pipes_connected() == [pipes(), pipes(), 0], 10,
                   what="pipes [2, 2, 0] per worker")
        self.assertEqual(sorted(i["port"] for i in self.instances(emx)), sorted(self.plat.ports[:2]))
        d = self.traffic(emx)
        self.assertGreater(d[0], 0, d)
        self.assertGreater(d[1], 0, d)
        self.assertEqual(d[2], 0, d)
        # The plugin now holds a blocking query over TLS: a registration
        # reaches it through that query.
        wait_until(lambda: consul.ctl("stats")["blocking"] >= 1, 5, what="a blocking query")
        consul.register(self.plat.ports[2], "tw-2")
        wait_until(lambda: self.plat.pipes_connected() == [pipes()] * 3, 5,
                   what="pipes [2, 2, 2] per worker")
        self.assertTrue(every_worker_piped(self.plat, 2, emx.name), self.plat.stats())
        d = self.traffic(emx)
        self.assertTrue(all(x > 0 for x in d), d)
        self.assertEqual(self.failures(emx), [])

    def test_certificate_of_another_ca_is_refused(self):
        other = PKI(self.env, "other-ca")
        crt, key, _ = other.issue("consul-other", dns=("localhost",), ips=("127.0.0.1",))
        consul = TLSFixture(self.env, crt, key, other.cert)
        for i in range(3):
            consul.register(self.plat.ports[i], "tw-%d" % i)
        emx = self.edgemux(consul)
        # The first failure, then retries (backoff 200 ms .. 1 s): every one
        # a TLS verification failure naming the address.
        wait_until(lambda: len(self.failures(emx)) >= 3, 10, what="three failed queries")
        for reason in self.failures(emx):
            self.assertRegex(reason, r"^https://127\.0\.0\.1:%d: %s" % (consul.port, BAD_CA))
        # The handshake failed: no query reached the fixture.
        self.assertEqual(consul.ctl("stats")["queries"], 0)
        self.assertIn("unknown ca", consul.proc.output().lower())
        self.assertEqual(self.instances(emx), [])
        self.assertEqual(emx.http("/ready")[0], 503)
        self.assertEqual(self.plat.pipes_connected(), [0, 0, 0])
        self.assertNotIn(" added (", emx.log())

    def test_bad_certificate_later_keeps_the_last_good_set(self):
        consul = TLSFixture(self.env, self.good[0], self.good[1], self.pki.cert)
        for i in range(3):
            consul.register(self.plat.ports[i], "tw-%d" % i)
        emx = self.edgemux(consul)
        emx.wait_ready()
        wait_until(lambda: self.plat.pipes_connected() == [pipes()] * 3, 10, what="all pipes")
        port = consul.port
        # Back on its port with a certificate of the right CA for another name
        # (and no instances registered: were it trusted, all would leave).
        consul.stop()
        wrong = self.pki.issue("consul-wrong-name", dns=("consul.other.example",))
        consul = TLSFixture(self.env, wrong[0], wrong[1], self.pki.cert, port=port)
        wait_until(lambda: any(re.match(r"https://127\.0\.0\.1:%d: %s" % (port, BAD_NAME), r)
                               for r in self.failures(emx)), 10,
                   what="a host name verification failure")
        seen = len(self.failures(emx))
        wait_until(lambda: len(self.failures(emx)) >= seen + 2, 10, what="two more failures")
        self.assertEqual(consul.ctl("stats")["queries"], 0)
        self.assertNotIn("left discovery", emx.log())
        self.assertEqual(len(self.instances(emx)), 3)
        self.assertEqual(emx.http("/ready")[0], 200)
        self.assertEqual(self.plat.pipes_connected(), [pipes()] * 3)
        d = self.traffic(emx)
        self.assertTrue(all(x > 0 for x in d), d)
        # The good certificate back, same instances: the plugin answers again
        # and nothing changes.
        consul.stop()
        consul = TLSFixture(self.env, self.good[0], self.good[1], self.pki.cert, port=port,
                            instances=[(self.plat.ports[i], "tw-%d" % i) for i in range(3)])
        wait_until(lambda: "consul answers again" in emx.log(), 10, what="source back")
        time.sleep(0.3)
        self.assertNotIn("left discovery", emx.log())
        self.assertEqual(self.plat.pipes_connected(), [pipes()] * 3)


if __name__ == "__main__":
    unittest.main()
