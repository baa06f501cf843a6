"""The demo front end (haproxy-conf/demo.cfg) in front of two edgemux:
edges through HAProxy get answers from both, HAProxy's /ready checks keep
edges away from an edgemux that has no platform pipe, and edgemux logs the
device's address from HAProxy's X-Forwarded-For."""

import unittest

from harness import (GET, SUCCESS, WORKERS, E2ETest, Edgemux, HAProxy, Platform, RawEdge, ao_parse,
                     ao_request, check_ledger, closed_ports, edge_sim, pipes, wait_until)

OVERRIDES = {"platform": {"request_timeout": "2s", "all_down_grace": "1s"},
             "edge": {"drain_spread": "100ms"}}


def msgs_by_edgemux(plat):
    """Messages a platform received per edgemux: an edgemux with several
    workers has one identity per worker ("name/k"), summed here."""
    out = {}
    for server, n in plat.msgs_in_by_server().items():
        name = server
        if WORKERS > 1:
            name, k = server.rsplit("/", 1)
            assert 0 <= int(k) < WORKERS, server
        out[name] = out.get(name, 0) + n
    return out


class FrontEnd(E2ETest):
    def two_edgemux(self, second_ports=None, trusted=None):
        self.plat = Platform(self.env, 3)
        ov = {k: dict(v) for k, v in OVERRIDES.items()}
        if trusted:
            ov["edge"]["trusted_proxies"] = trusted
        self.emx1 = Edgemux(self.env, "emx-1", self.plat.ports, overrides=ov)
        self.emx2 = Edgemux(self.env, "emx-2", second_ports or self.plat.ports, overrides=ov)
        self.emx1.wait_ready()
        self.hap = HAProxy(self.env, self.emx1, self.emx2)

    def test_edges_through_haproxy_get_answers_from_both_edgemux(self):
        self.two_edgemux()
        self.emx2.wait_ready()
        wait_until(lambda: self.plat.pipes_connected() == [2 * pipes()] * 3, 10, what="pipes of both edgemux")
        before = msgs_by_edgemux(self.plat)
        rc, out, ledger = edge_sim(self.env, self.hap.edge_port, "--edges", 10, "--rate", 10,
                                   "--duration", "3s", "--drain", "5s", "--retry-interval", "200ms")
        self.assertEqual(rc, 0, out)
        codes = check_ledger(self, ledger, out)
        self.assertEqual(set(codes), {SUCCESS}, codes)
        self.assertGreater(len(ledger), 200, out)
        after = msgs_by_edgemux(self.plat)
        for name in ("emx-1", "emx-2"):  # leastconn spreads the edges
            self.assertGreater(after.get(name, 0) - before.get(name, 0), 20, (before, after))
        self.assertEqual(self.plat.stats()["violations"], 0)
        # A raw edge through HAProxy too.
        e = RawEdge(self.hap.edge_port, app_key=self.env.app_key)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        e.send(ao_request(GET, 2, sid))
        self.assertEqual(ao_parse(e.recv())[:2], (SUCCESS, 2))

    def test_haproxy_skips_edgemux_that_is_not_ready(self):
        # emx-2's only instance does not exist: /ready stays 503.
        self.two_edgemux(second_ports=closed_ports(1))
        self.assertEqual(self.emx2.http("/ready")[0], 503)
        wait_until(lambda: "edgemux-2 is DOWN" in self.hap.proc.output(), 10,
                   what="HAProxy marks emx-2 down")
        rc, out, ledger = edge_sim(self.env, self.hap.edge_port, "--edges", 6, "--rate", 5,
                                   "--duration", "2s", "--drain", "5s")
        self.assertEqual(rc, 0, out)
        codes = check_ledger(self, ledger, out)
        self.assertEqual(set(codes), {SUCCESS}, codes)
        self.assertNotIn("connected from", self.emx2.log(), "an edge reached the unready edgemux")
        self.assertIn("connected from", self.emx1.log())

    def test_device_address_from_x_forwarded_for_logged(self):
        # HAProxy (option forwardfor) is a trusted proxy: edgemux logs the
        # device's address from X-Forwarded-For. The device comes from
        # 127.0.0.2; HAProxy connects from 127.0.0.1.
        self.two_edgemux(trusted="[127.0.0.1]")
        self.emx2.wait_ready()
        e = RawEdge(self.hap.edge_port, app_key=self.env.app_key, source_address=("127.0.0.2", 0))
        self.assertEqual(e.auth(self.env.app_key)[0], SUCCESS)
        wait_until(lambda: "connected from 127.0.0.2 via 127.0.0.1:" in self.emx1.log() + self.emx2.log(),
                   5, what="the device address in an edgemux log")


if __name__ == "__main__":
    unittest.main()
