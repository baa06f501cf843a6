"""Static discovery reloads (rule 9): editing the instances file, in place or
by rename, adds an instance that then gets traffic, and drains a removed
one: no new requests, its pending ones answered, then its pipes closed.

With several worker loops (server.workers) every worker gets the file's set:
an added instance has every worker's pipes, a removed one is drained and
removed by every worker."""

import unittest

from discovery_workers import by_every_worker, every_worker_piped
from harness import GET, SUCCESS, E2ETest, Edgemux, Platform, ao_request, pipes, wait_until

LATENCY_MS = 1500


class StaticReload(E2ETest):
    def setup(self, ports_used, latency=0):
        extra = ("--latency", str(latency)) if latency else ()
        self.plat = Platform(self.env, 3, extra=extra)
        self.emx = Edgemux(self.env, "emx-disc", [self.plat.ports[i] for i in ports_used],
                           overrides={"platform": {"request_timeout": "4s", "all_down_grace": "1s"},
                                      "edge": {"drain_spread": "100ms"}})
        self.emx.wait_ready()
        want = [pipes() if i in ports_used else 0 for i in range(3)]
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

    def added(self, rename):
        self.setup([0, 1])
        _, d = self.burst(30)
        self.assertEqual(d[2], 0)
        self.emx.write_instances(self.plat.ports, rename=rename)
        wait_until(lambda: self.plat.pipes_connected() == [pipes()] * 3, 10,
                   what="pipes to the new instance")
        self.assertTrue(every_worker_piped(self.plat, 2, self.emx.name), self.plat.stats())
        _, d = self.burst(30)
        self.assertGreaterEqual(d[2], 8, "the new instance gets no traffic: %r" % d)
        self.assertEqual(sum(d), 30)

    def removed(self, rename):
        self.setup([0, 1, 2], latency=LATENCY_MS)
        port = self.plat.ports[1]
        before = self.plat.msgs_in()
        # Requests in flight on every instance, instance 2 among them.
        first, _ = self.burst(9, wait=False)
        wait_until(lambda: sum(self.plat.msgs_in()) - sum(before) == 9, 3, what="requests landed")
        held = self.plat.msgs_in()[1] - before[1]
        self.assertGreater(held, 0)
        self.emx.write_instances([self.plat.ports[0], self.plat.ports[2]], rename=rename)
        wait_until(lambda: by_every_worker(self.emx.log(), "127.0.0.1:%d) left discovery: draining" % port),
                   5, what="instance 2 draining (every worker)")
        # No new request goes to the drained instance ...
        later, _ = self.burst(9, wait=False)
        # ... and what it held is answered by it, not cut off (0xA3).
        got = self.e.answers(lambda g: all(r in g for r in first + later),
                             timeout=LATENCY_MS / 1000.0 + 4)
        for r in first + later:
            self.assertEqual(got[r], [SUCCESS], (r, got))
        after = self.plat.msgs_in()
        self.assertEqual(after[1] - before[1], held, "new requests reached the drained instance")
        # Then its pipes are closed and the instance is gone.
        wait_until(lambda: self.plat.pipes_connected()[1] == 0, 5, what="drained pipes closed")
        self.assertTrue(by_every_worker(self.emx.log(), "127.0.0.1:%d) drained and removed" % port),
                        self.emx.log())
        self.assertEqual(self.plat.pipes_connected(), [pipes(), 0, pipes()])
        self.assertEqual(self.plat.stats()["violations"], 0)

    def test_added_instance_gets_traffic_rename(self):
        self.added(rename=True)

    def test_added_instance_gets_traffic_in_place(self):
        self.added(rename=False)

    def test_removed_instance_drained_in_place(self):
        self.removed(rename=False)

    def test_removed_instance_drained_rename(self):
        self.removed(rename=True)


if __name__ == "__main__":
    unittest.main()
