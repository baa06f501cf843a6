"""systemd notifications: edgemux run as systemd runs a Type=notify service
(NOTIFY_SOCKET naming a unix datagram socket, WATCHDOG_USEC for WatchdogSec=)
sends READY=1 once it serves, WATCHDOG=1 at half the interval, and
STOPPING=1 when SIGTERM arrives; every message from edgemux's own PID (the
unit uses NotifyAccess=main)."""

import os
import signal
import socket
import struct
import time
import unittest

from harness import EMX_BIN, E2ETest, Edgemux, Platform, Proc, wait_until


class NotifySocket:
    """The service manager's end: a datagram socket that records every
    message with the sender's PID (SO_PASSCRED, as systemd does)."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        self.msgs = []  # (monotonic time, pid, {key: value})

    def poll(self, timeout):
        """Read what arrives within timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.sock.settimeout(left)
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except (socket.timeout, TimeoutError):
                return
            pid = None
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", cdata[:12])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.msgs.append((time.monotonic(), pid, fields))

    def wait_for(self, key, timeout):
        """The first message holding key, waiting up to timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.msgs:
                if key in m[2]:
                    return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no %s within %.1fs; got %r" % (key, timeout, self.msgs))
            self.poll(min(left, 0.2))

    def count(self, key):
        return sum(1 for m in self.msgs if key in m[2])

    def close(self):
        self.sock.close()


class NotifyTest(E2ETest):
    def start(self, name, extra_env):
        plat = Platform(self.env, instances=1)
        emx = Edgemux(self.env, name, plat.ports, start=False)
        ns = NotifySocket(self.env.path("%s.notify" % name))
        self.addCleanup(ns.close)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
        env.update(extra_env, NOTIFY_SOCKET=ns.sock.getsockname())
        emx.proc = Proc([EMX_BIN, "-c", emx.config_path], self.env.path("%s.log" % name), env=env)
        self.env.procs.append(emx.proc)
        return emx, ns

    def test_ready_watchdog_stopping(self):
        emx, ns = self.start("emx-notify", {"WATCHDOG_USEC": "400000"})
        _, pid, fields = ns.wait_for("READY", 10)
        self.assertEqual(pid, emx.proc.pid, "READY=1 must come from the main PID")
        self.assertEqual(fields["READY"], "1")
        self.assertIn("emx-notify", fields.get("STATUS", ""))
        # READY means serving: the admin and edge listeners already answer.
        self.assertEqual(emx.http("/health")[0], 200)
        socket.create_connection(("127.0.0.1", emx.edge_port), timeout=2).close()
        emx.wait_ready()

        # WatchdogSec=0.4s: pings every 200 ms, so 1.2 s holds about six.
        before = ns.count("WATCHDOG")
        t0 = time.monotonic()
        ns.poll(1.2)
        pings = [m for m in ns.msgs if "WATCHDOG" in m[2] and m[0] >= t0]
        self.assertGreaterEqual(len(pings), 4, ns.msgs)
        self.assertLessEqual(len(pings), 8, ns.msgs)
        self.assertTrue(all(p[1] == emx.proc.pid and p[2]["WATCHDOG"] == "1" for p in pings))
        gaps = [b[0] - a[0] for a, b in zip(pings, pings[1:])]
        self.assertLess(max(gaps), 0.4, "a ping gap reached the watchdog interval: %r" % gaps)
        self.assertGreater(ns.count("WATCHDOG"), before)

        self.assertFalse(any("STOPPING" in m[2] for m in ns.msgs))
        emx.proc.signal(signal.SIGTERM)
        _, pid, fields = ns.wait_for("STOPPING", 10)
        self.assertEqual(pid, emx.proc.pid)
        self.assertEqual(fields["STOPPING"], "1")
        wait_until(lambda: not emx.proc.alive(), 15, what="edgemux exit after SIGTERM")
        self.assertEqual(emx.proc.p.returncode, 0, emx.log())
        self.assertEqual(ns.count("READY"), 1)

    def test_reload_reports_reloading_then_ready(self):
        # SIGHUP with the same (valid) config: RELOADING=1, then READY=1 again,
        # and the service keeps running.
        emx, ns = self.start("emx-reload", {})
        ns.wait_for("READY", 10)
        emx.wait_ready()
        emx.proc.signal(signal.SIGHUP)
        t_reload, pid, fields = ns.wait_for("RELOADING", 10)
        self.assertEqual(pid, emx.proc.pid)
        self.assertIn("MONOTONIC_USEC", fields)
        wait_until(lambda: any("READY" in m[2] and m[0] >= t_reload for m in ns.msgs) or ns.poll(0.1),
                   10, what="READY=1 after the reload")
        self.assertTrue(emx.proc.alive(), emx.log())
        self.assertEqual(emx.http("/health")[0], 200)

    def test_no_watchdog_unless_asked(self):
        # No WATCHDOG_USEC (WatchdogSec= unset): READY and STOPPING only.
        emx, ns = self.start("emx-nowd", {})
        ns.wait_for("READY", 10)
        ns.poll(0.6)
        self.assertEqual(ns.count("WATCHDOG"), 0, ns.msgs)
        emx.proc.signal(signal.SIGTERM)
        ns.wait_for("STOPPING", 10)
        wait_until(lambda: not emx.proc.alive(), 15, what="edgemux exit after SIGTERM")
        self.assertEqual(emx.proc.p.returncode, 0, emx.log())

    def test_watchdog_meant_for_another_process(self):
        # WATCHDOG_PID names someone else (the variable leaked from a parent):
        # edgemux must not ping on that process's behalf.
        emx, ns = self.start("emx-otherwd", {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
        ns.wait_for("READY", 10)
        ns.poll(0.6)
        self.assertEqual(ns.count("WATCHDOG"), 0, ns.msgs)


if __name__ == "__main__":
    unittest.main()
