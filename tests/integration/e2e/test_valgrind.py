"""One end-to-end scenario with edgemux under valgrind memcheck: traffic,
bad input, a platform crash and a clean SIGTERM exit with no memory error and
no definite leak."""

import os
import shutil
import unittest

from harness import SUCCESS, E2ETest, Edgemux, Platform, ao_parse, ao_request, edge_sim, wait_until, GET

VALGRIND = shutil.which("valgrind")


@unittest.skipUnless(VALGRIND, "valgrind is installed by scripts/deps.sh")
class Memcheck(E2ETest):
    def test_scenario_clean_under_memcheck(self):
        plat = Platform(self.env, 2)
        wrapper = [VALGRIND, "--tool=memcheck", "--leak-check=full", "--errors-for-leak-kinds=definite",
                   "--error-exitcode=99", "--num-callers=30", "--track-fds=no",
                   "--suppressions=" + os.path.join(os.path.dirname(os.path.abspath(__file__)), "valgrind.supp")]
        emx = Edgemux(self.env, "emx-vg", plat.ports, wrapper=wrapper, start_timeout=60,
                      overrides={"platform": {"all_down_grace": "500ms", "request_timeout": "2s"}})
        emx.wait_ready(60)
        rc, out, _ = edge_sim(self.env, emx.edge_port, "--edges", 5, "--rate", 5, "--duration", "2s",
                              "--drain", "5s", "--multipart-share", "20%", "--multipart-size", "40KiB")
        self.assertEqual(rc, 0, out)
        # bad input: short header, then a request before AUTH
        e = emx.edge(app_key=self.env.app_key, timeout=20)
        e.send(b"\x01\x02")
        self.assertEqual(e.expect_close(timeout=20), 1007)
        e = emx.edge(app_key=self.env.app_key, timeout=20)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        # every platform gone and back while an edge is connected
        plat.cmd("crash 1")
        plat.cmd("crash 2")
        self.assertEqual(e.expect_close(timeout=30), 1013)
        plat.cmd("restore 1")
        plat.cmd("restore 2")
        emx.wait_ready(60)
        e = emx.edge(app_key=self.env.app_key, timeout=20)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        e.send(ao_request(GET, 2, sid))
        self.assertEqual(ao_parse(e.recv(timeout=20))[0], SUCCESS)
        e.close()
        status = emx.proc.stop(timeout=60)
        log = emx.log()
        self.assertEqual(status, 0, log[-3000:])
        self.assertIn("ERROR SUMMARY: 0 errors", log)
        self.assertRegex(log, r"definitely lost: 0 bytes|All heap blocks were freed")

    def test_reloads_clean_under_memcheck(self):
        """SIGHUP reloads that keep, replace and switch the discovery plugin:
        replaced instances are destroyed and their plugins unloaded while the
        loop runs, with no memory error."""
        import signal
        plat = Platform(self.env, 1)
        wrapper = [VALGRIND, "--tool=memcheck", "--leak-check=full", "--errors-for-leak-kinds=definite",
                   "--error-exitcode=99", "--num-callers=30", "--track-fds=no",
                   "--suppressions=" + os.path.join(os.path.dirname(os.path.abspath(__file__)), "valgrind.supp")]
        emx = Edgemux(self.env, "emx-vg-hup", plat.ports, wrapper=wrapper, start_timeout=60)
        emx.wait_ready(60)
        with open(emx.config_path) as f:
            static = f.read()
        dns = static.replace(
            "  plugin: static\n  file: %s\n  reload_delay: 50ms\n" % emx.instances_file,
            "  plugin: dns-srv\n  names: [_tw._tcp.example.]\n  resolvers: ['127.0.0.1:9']\n")
        texts = [static.replace("reload_delay: 50ms", "reload_delay: 70ms"), static, dns, static,
                 static.replace("pipes_per_instance: 2", "pipes_per_instance: 2\n  max_connecting: 4")]
        for n, text in enumerate(texts, 1):
            with open(emx.config_path, "w") as f:
                f.write(text)
            emx.proc.signal(signal.SIGHUP)
            wait_until(lambda: emx.log().count("reload done") >= n, 60, what="reload %d" % n)
            wait_until(lambda: emx.log().count("unloaded") >= min(n, 4) - 1, 60, what="unloaded")
        emx.wait_ready(60)
        e = emx.edge(app_key=self.env.app_key, timeout=20)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        e.send(ao_request(GET, 2, sid))
        self.assertEqual(ao_parse(e.recv(timeout=20))[0], SUCCESS)
        e.close()
        status = emx.proc.stop(timeout=60)
        log = emx.log()
        self.assertEqual(status, 0, log[-3000:])
        self.assertIn("ERROR SUMMARY: 0 errors", log)
        self.assertRegex(log, r"definitely lost: 0 bytes|All heap blocks were freed")


if __name__ == "__main__":
    unittest.main()
