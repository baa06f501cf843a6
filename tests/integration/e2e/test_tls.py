"""wss on both hops with a CA made at test time. The edge hop is edgemux's
own listener (edge.tls_cert/tls_key); platform-sim has no TLS, so HAProxy
in mode tcp ends TLS in front of it (a config generated here). A platform
certificate that does not match the instance's address is refused."""

import time
import unittest

from harness import (GET, SUCCESS, E2ETest, Edgemux, HAProxyTCP, PKI, Platform, ao_parse,
                     ao_request, free_port, pipes, wait_until)


class TLS(E2ETest):
    def setUp(self):
        super().setUp()
        self.pki = PKI(self.env)
        self.plat = Platform(self.env, 2)

    def test_wss_on_both_hops(self):
        _, _, plat_pem = self.pki.issue("platform", dns=["localhost"], ips=["127.0.0.1"])
        edge_crt, edge_key, _ = self.pki.issue("edgemux", dns=["localhost"], ips=["127.0.0.1"])
        tls_port = free_port()
        HAProxyTCP(self.env, [(tls_port, self.plat.ports[0], plat_pem)])
        emx = Edgemux(self.env, "emx-tls", [tls_port], start=False,
                      overrides={"edge": {"tls_cert": edge_crt, "tls_key": edge_key,
                                          "drain_spread": "100ms"},
                                 "platform": {"tls_ca": self.pki.cert}})
        emx.write_instances([tls_port], tls=True)
        emx.start()
        emx.wait_ready()
        wait_until(lambda: self.plat.pipes_connected() == [pipes(), 0], 10, what="pipes over TLS")
        e = emx.edge(app_key=self.env.app_key, tls_ctx=self.pki.client_context())
        self.assertEqual(e.sock.version()[:3], "TLS")
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        e.send(ao_request(GET, 2, sid))
        code, rid, _, _, _ = ao_parse(e.recv())
        self.assertEqual((code, rid), (SUCCESS, 2))
        self.assertIn("(tls)", emx.log())
        st = self.plat.stats()
        self.assertEqual(st["violations"], 0, st["violations_by_kind"])
        self.assertGreaterEqual(st["instances"][0]["msgs_in"], 2 + 2)  # pipe AUTHs, edge AUTH, GET
        # A plain WebSocket client on the TLS edge port gets no upgrade.
        with self.assertRaises(Exception):
            emx.edge(app_key=self.env.app_key, timeout=2)

    def test_platform_certificate_for_another_name_refused(self):
        _, _, bad_pem = self.pki.issue("elsewhere", dns=["example.invalid"])
        tls_port = free_port()
        HAProxyTCP(self.env, [(tls_port, self.plat.ports[1], bad_pem)])
        emx = Edgemux(self.env, "emx-badcert", [tls_port], start=False,
                      overrides={"platform": {"tls_ca": self.pki.cert, "reconnect_max": "300ms"}})
        emx.write_instances([tls_port], tls=True)
        emx.start()
        # The TLS handshake is attempted (HAProxy accepts), never a pipe.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            self.assertEqual(emx.http("/ready")[0], 503)
            self.assertEqual(self.plat.pipes_connected(), [0, 0])
            time.sleep(0.2)
        self.assertEqual(self.plat.stats()["instances"][1]["accepted"], 0,
                         "a connection got through to the platform")
        log = emx.log().lower()
        # the pipe's own line names OpenSSL's reason (lws's lines are off
        # with several workers)
        self.assertRegex(log, r"pipe \d failed \(1006 certificate check failed: ip address mismatch\)",
                         "the log does not say why the pipe failed:\n" + emx.log()[-3000:])


if __name__ == "__main__":
    unittest.main()
