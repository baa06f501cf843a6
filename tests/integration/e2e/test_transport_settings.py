"""The core's transport settings reach the transport (plugin ABI 1.1):
platform.ping_interval / idle_read_timeout find a frozen platform, and
edge.idle_timeout drops a silent device; and a rotated edge certificate is
read again on SIGHUP without dropping anyone."""

import os
import shutil
import signal
import time
import unittest

from harness import (GET, SUCCESS, E2ETest, Edgemux, PKI, Platform, ao_parse, ao_request,
                     wait_until)


class TransportSettings(E2ETest):
    def test_platform_ping_and_idle_read_from_core_keys(self):
        plat = Platform(self.env, 1)
        emx = Edgemux(self.env, "emx-ping", plat.ports,
                      overrides={"platform": {"ping_interval": "200ms", "idle_read_timeout": "1s",
                                              "all_down_grace": "30s"}})
        emx.wait_ready()
        plat.proc.signal(signal.SIGSTOP)  # answers no ping, reads nothing
        try:
            t0 = time.monotonic()
            wait_until(lambda: "no data or pong" in emx.log(), 8, what="pipe dropped as silent")
            self.assertLess(time.monotonic() - t0, 5)
            wait_until(lambda: emx.http("/ready")[0] == 503, 5, what="/ready 503")
        finally:
            plat.proc.signal(signal.SIGCONT)
        emx.wait_ready(10)  # reconnected once the platform runs again

    def test_edge_idle_timeout_from_core_key(self):
        plat = Platform(self.env, 1)
        emx = Edgemux(self.env, "emx-idle", plat.ports, overrides={"edge": {"idle_timeout": "1s"}})
        emx.wait_ready()
        e = emx.edge(app_key=self.env.app_key)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        t0 = time.monotonic()
        with self.assertRaises(Exception):
            e.recv(timeout=6)  # silent: dropped, with or without a close frame
        self.assertLess(time.monotonic() - t0, 5)


class CertificateRotation(E2ETest):
    def test_sighup_reads_rotated_certificate_keeping_devices(self):
        pki = PKI(self.env)
        crt1, key1, _ = pki.issue("edge1", dns=["localhost"], ips=["127.0.0.1"])
        crt2, key2, _ = pki.issue("edge2", dns=["localhost"], ips=["127.0.0.1"])
        live_crt, live_key = self.env.path("edge.crt"), self.env.path("edge.key")
        shutil.copy(crt1, live_crt)
        shutil.copy(key1, live_key)
        plat = Platform(self.env, 1)
        emx = Edgemux(self.env, "emx-rot", plat.ports,
                      overrides={"edge": {"tls_cert": live_crt, "tls_key": live_key}})
        emx.wait_ready()

        def serial_seen():
            e = emx.edge(app_key=self.env.app_key, tls_ctx=pki.client_context(),
                         server_hostname="localhost")
            der = e.sock.getpeercert(binary_form=True)
            return e, der

        old, der1 = serial_seen()
        code, sid = old.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        # rotate the files in place, as a certificate manager does, then HUP
        for src, dst in ((crt2, live_crt), (key2, live_key)):
            shutil.copy(src, dst + ".new")
            os.rename(dst + ".new", dst)
        emx.proc.signal(signal.SIGHUP)
        wait_until(lambda: "edge TLS certificate read from" in emx.log(), 5, what="reload logged")
        new, der2 = serial_seen()
        self.assertNotEqual(der1, der2, "a new connection still got the old certificate")
        # the device connected before the reload is still served
        old.send(ao_request(GET, 2, sid))
        self.assertEqual(ao_parse(old.recv())[0], SUCCESS)
        new.close()
        old.close()


if __name__ == "__main__":
    unittest.main()
