"""SIGHUP reloads hold no resources: plugins a reload does not use are
released, replaced discovery instances are unloaded, and the open files of
the process stay flat over many reloads. A reload after server.user still
works when the files it reads are readable by that user."""

import os
import pwd
import signal
import time
import unittest

from harness import GET, SUCCESS, E2ETest, Edgemux, Platform, ao_parse, ao_request, wait_until


def open_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def mapped(pid, needle):
    with open("/proc/%d/maps" % pid) as f:
        return any(needle in line for line in f)


class ReloadResources(E2ETest):
    def reload(self, emx, text, n):
        """Write the config, SIGHUP, wait for the n-th 'reload done'."""
        with open(emx.config_path, "w") as f:
            f.write(text)
        emx.proc.signal(signal.SIGHUP)
        wait_until(lambda: emx.log().count("reload done") >= n, 10, what="reload %d" % n)

    def request_ok(self, emx, rid):
        e = emx.edge(app_key=self.env.app_key)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        e.send(ao_request(GET, rid, sid))
        self.assertEqual(ao_parse(e.recv())[0], SUCCESS)
        e.close()

    def test_fifty_reloads_keep_open_files_flat(self):
        plat = Platform(self.env, 1)
        emx = Edgemux(self.env, "emx-reload", plat.ports)
        emx.wait_ready()
        pid = emx.proc.pid
        with open(emx.config_path) as f:
            base = f.read()
        self.assertIn("reload_delay: 50ms", base)
        # Warm up: the first reloads may open what stays (a client vhost...).
        self.reload(emx, base.replace("reload_delay: 50ms", "reload_delay: 51ms"), 1)
        self.reload(emx, base, 2)
        time.sleep(1)
        before = open_fds(pid)
        n = 2
        for i in range(50):
            # Every other reload restarts discovery (its section changed);
            # the others keep it and only change a limit.
            if i % 2:
                text = base.replace("reload_delay: 50ms", "reload_delay: %dms" % (60 + i))
            else:
                text = base.replace("pipes_per_instance: 2",
                                    "pipes_per_instance: 2\n  high_watermark: %dKiB" % (64 + i))
            n += 1
            self.reload(emx, text, n)
        # Replaced instances go once the loop is quiet.
        deadline = time.monotonic() + 10
        while open_fds(pid) > before + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        after = open_fds(pid)
        self.assertLessEqual(after, before + 2, "open files %d -> %d over 50 reloads" % (before, after))
        wait_until(lambda: emx.log().count("unloaded") >= 25, 10, what="instances unloaded")
        self.assertLessEqual(open_fds(pid), before + 2)
        self.assertNotIn("reload refused", emx.log())
        emx.wait_ready()
        self.request_ok(emx, 5)
        self.assertEqual(emx.proc.stop(), 0)

    def test_switching_plugins_unloads_the_old_one(self):
        plat = Platform(self.env, 1)
        emx = Edgemux(self.env, "emx-switch", plat.ports)
        emx.wait_ready()
        pid = emx.proc.pid
        with open(emx.config_path) as f:
            static = f.read()
        # dns-srv asking a resolver nobody answers: it starts, and fails later.
        dns = static.replace(
            "  plugin: static\n  file: %s\n  reload_delay: 50ms\n" % emx.instances_file,
            "  plugin: dns-srv\n  names: [_tw._tcp.example.]\n  resolvers: ['127.0.0.1:9']\n"
            "  timeout: 50ms\n")
        self.assertNotEqual(dns, static)
        n = 0
        counts = []
        for i in range(10):
            n += 1
            self.reload(emx, dns, n)
            wait_until(lambda: mapped(pid, "emx-discovery-dns-srv.so"), 5, what="dns-srv mapped")
            n += 1
            self.reload(emx, static, n)
            # The dns-srv instance is stopped, destroyed, and its plugin unmapped.
            wait_until(lambda: not mapped(pid, "emx-discovery-dns-srv.so"), 10,
                       what="dns-srv unloaded")
            counts.append(open_fds(pid))
        self.assertLessEqual(counts[-1], counts[0] + 2, "open files over switches: %s" % counts)
        emx.wait_ready()
        self.request_ok(emx, 7)
        self.assertEqual(emx.proc.stop(), 0)


@unittest.skipUnless(os.geteuid() == 0, "needs root to switch users")
class ReloadAfterUserSwitch(E2ETest):
    """docs/operations.md: files are read again at a reload, as server.user."""

    def setUp(self):
        super().setUp()
        self.nobody = pwd.getpwnam("nobody")
        os.chmod(self.env.dir, 0o755)
        self.plat = Platform(self.env, 1)
        self.emx = Edgemux(self.env, "emx-hup-user", self.plat.ports, start=False,
                           overrides={"server": {"user": "nobody"}})
        os.chmod(self.emx.instances_file, 0o644)
        os.chmod(self.emx.config_path, 0o644)

    def hup(self, what):
        self.emx.proc.signal(signal.SIGHUP)
        wait_until(lambda: what in self.emx.log(), 10, what=what)

    def test_reload_reads_key_readable_by_group(self):
        # The documented install: root owns the key, the service's group reads it.
        os.chown(self.env.app_key_file, 0, self.nobody.pw_gid)
        os.chmod(self.env.app_key_file, 0o640)
        self.emx.start()
        self.emx.wait_ready()
        self.assertIn("running as nobody", self.emx.log())
        self.assertNotIn("will fail", self.emx.log())
        self.hup("reload done")
        self.assertNotIn("reload refused", self.emx.log())

    def test_unreadable_key_warned_at_start_and_reload_refused(self):
        os.chown(self.env.app_key_file, 0, 0)
        os.chmod(self.env.app_key_file, 0o600)
        self.emx.start()
        self.emx.wait_ready()
        log = self.emx.log()
        self.assertIn("platform.app_key_file", log)
        self.assertIn("not readable by nobody", log)
        self.hup("reload refused")
        self.assertIn("Permission denied", self.emx.log())
        # The running configuration stays.
        self.assertEqual(self.emx.http("/ready")[0], 200)


if __name__ == "__main__":
    unittest.main()
