"""Consul discovery end to end (rule 9): the real edgemux with the consul
plugin against tests/integration/consul/consul_fixture.py (Consul's
documented blocking-query API; Consul itself is not packaged in Debian).

An instance registered at the source carries traffic within 1 s; a
deregistered one is drained (its in-flight requests answered, no new ones,
then its pipes closed); the source stopped for a minute changes nothing
(EMX_CONSUL_DOWN_SECONDS sets the minute, for quicker local runs).

With several worker loops (server.workers) the one Consul watch (worker 0)
hands every set to every worker: within the same second an added instance
has every worker's pipes, and a deregistered one is drained by every
worker."""

import json
import os
import sys
import time
import unittest
import urllib.request

from consul_set import SERVICE, entry, preload_args
from discovery_workers import by_every_worker, every_worker_piped
from harness import (GET, SLACK, SOURCE_DIR, SUCCESS, E2ETest, Edgemux, Platform, Proc, ao_request,
                     pipes, wait_until)

FIXTURE = os.path.join(SOURCE_DIR, "tests", "integration", "consul", "consul_fixture.py")
LATENCY_MS = 1500
DOWN_SECONDS = float(os.environ.get("EMX_CONSUL_DOWN_SECONDS", "60"))


class Fixture:
    """consul_fixture.py as a process of the test's Env, on a fixed port once
    started so it can come back where edgemux looks for it."""

    def __init__(self, env, port=0, instances=()):
        self.env = env
        self.port_file = env.path("consul-port-%d" % len(env.procs))
        preload = preload_args(env, instances)
        self.proc = Proc([sys_python(), FIXTURE, "--port-file", self.port_file, "--port", str(port),
                          "--lifetime", str(DOWN_SECONDS + 240)] + preload,
                         env.path("consul-fixture-%d.log" % len(env.procs)), cwd=env.dir)
        env.procs.append(self.proc)

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
        req = urllib.request.Request("http://127.0.0.1:%d/_fixture/%s" % (self.port, action),
                                     data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def register(self, port, ident):
        return self.ctl("register", **entry(port, ident))

    def deregister(self, ident):
        return self.ctl("deregister", service=SERVICE, id=ident)

    def stop(self):
        self.proc.stop(5)


def sys_python():
    return sys.executable


class ConsulDiscovery(E2ETest):
    def setup(self, used, latency=0):
        extra = ("--latency", str(latency)) if latency else ()
        self.plat = Platform(self.env, 3, extra=extra)
        self.consul = Fixture(self.env)
        for i in used:
            self.consul.register(self.plat.ports[i], "tw-%d" % i)
        discovery = {"plugin": "consul", "address": "http://127.0.0.1:%d" % self.consul.port,
                     "service": SERVICE, "wait": "30s", "min_interval": "100ms",
                     "backoff_min": "200ms", "backoff_max": "2s", "timeout": "2s"}
        self.emx = Edgemux(self.env, "emx-consul", [], discovery=discovery,
                           overrides={"platform": {"request_timeout": "4s",
                                                   "all_down_grace": "1s"}})
        self.emx.wait_ready()
        want = [pipes() if i in used else 0 for i in range(3)]
        wait_until(lambda: self.plat.pipes_connected() == want, 10, what="pipes %r" % want)
        self.e = self.emx.edge(app_key=self.env.app_key)
        self.addCleanup(self.e.close)
        code, self.sid = self.e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        self.rid = 1

    def burst(self, n, wait=True, timeout=5):
        """n GETs at once; returns (their requestIds, msgs_in deltas)."""
        before = self.plat.msgs_in()
        rids = []
        for _ in range(n):
            self.rid += 1
            rids.append(self.rid)
            self.e.send(ao_request(GET, self.rid, self.sid))
        if not wait:
            return rids, None
        got = self.e.answers(lambda g: all(r in g for r in rids), timeout=timeout)
        for r in rids:
            self.assertEqual(got[r], [SUCCESS], (r, got))
        return rids, [a - b for a, b in zip(self.plat.msgs_in(), before)]

    def test_added_instance_carries_traffic_within_1s(self):
        self.setup([0, 1])
        _, d = self.burst(30)
        self.assertEqual(d[2], 0)
        t0 = time.monotonic()
        self.consul.register(self.plat.ports[2], "tw-2")
        # Small bursts until the new instance takes a share: within 1 s
        # (SLACK: sanitizer builds only).
        limit = 1.0 * SLACK
        while True:
            _, d = self.burst(6)
            if d[2] > 0:
                break
            self.assertLess(time.monotonic() - t0, limit, "no traffic to the new instance in 1 s")
            time.sleep(0.02)
        self.assertLess(time.monotonic() - t0, limit)
        # The edge is on one worker; within the same second every worker
        # (each its own identity) has its pipes to the new instance.
        wait_until(lambda: every_worker_piped(self.plat, 2, self.emx.name),
                   max(0.05, limit - (time.monotonic() - t0)),
                   what="every worker's pipes to the new instance within 1 s")
        wait_until(lambda: self.plat.pipes_connected() == [pipes()] * 3, 5, what="all pipes")
        _, d = self.burst(30)
        self.assertGreaterEqual(d[2], 8, "the new instance gets no fair share: %r" % d)
        self.assertEqual(sum(d), 30)

    def test_removed_instance_drained(self):
        self.setup([0, 1, 2], latency=LATENCY_MS)
        port = self.plat.ports[1]
        before = self.plat.msgs_in()
        first, _ = self.burst(9, wait=False)
        wait_until(lambda: sum(self.plat.msgs_in()) - sum(before) == 9, 3, what="requests landed")
        held = self.plat.msgs_in()[1] - before[1]
        self.assertGreater(held, 0)
        self.consul.deregister("tw-1")
        wait_until(lambda: by_every_worker(self.emx.log(), "127.0.0.1:%d) left discovery: draining" % port),
                   5, what="instance 2 draining (every worker)")
        later, _ = self.burst(9, wait=False)
        got = self.e.answers(lambda g: all(r in g for r in first + later),
                             timeout=LATENCY_MS / 1000.0 + 4)
        for r in first + later:
            self.assertEqual(got[r], [SUCCESS], (r, got))
        after = self.plat.msgs_in()
        self.assertEqual(after[1] - before[1], held, "new requests reached the drained instance")
        wait_until(lambda: self.plat.pipes_connected()[1] == 0, 5, what="drained pipes closed")
        self.assertTrue(by_every_worker(self.emx.log(), "127.0.0.1:%d) drained and removed" % port),
                        self.emx.log())
        self.assertEqual(self.plat.pipes_connected(), [pipes(), 0, pipes()])
        self.assertEqual(self.plat.stats()["violations"], 0)

    def test_source_down_changes_nothing(self):
        self.setup([0, 1, 2])
        port = self.consul.port
        self.consul.stop()
        wait_until(lambda: "discovery source failed" in self.emx.log(), 10,
                   what="the failure logged")
        deadline = time.monotonic() + DOWN_SECONDS
        while time.monotonic() < deadline:
            _, d = self.burst(9)
            self.assertTrue(all(x > 0 for x in d), "an instance lost traffic: %r" % d)
            self.assertEqual(self.plat.pipes_connected(), [pipes()] * 3)
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        self.assertNotIn("left discovery", self.emx.log())
        self.assertEqual(self.emx.http("/ready")[0], 200)
        # The source comes back on its port with the same instances: still
        # nothing changes, and the plugin says it answers again.
        self.consul = Fixture(self.env, port, [(self.plat.ports[i], "tw-%d" % i) for i in range(3)])
        wait_until(lambda: "consul answers again" in self.emx.log(), 10, what="source back")
        _, d = self.burst(9)
        self.assertTrue(all(x > 0 for x in d), d)
        self.assertEqual(self.plat.pipes_connected(), [pipes()] * 3)
        self.assertNotIn("left discovery", self.emx.log())


if __name__ == "__main__":
    unittest.main()
