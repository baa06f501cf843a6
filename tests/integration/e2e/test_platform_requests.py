"""Platform -> edge requests and binds (the platform-hop contract, rule 5):
a platform GET is answered on the pipe it came from, whichever instance of
the cluster sent it; an edge that leaves has its Things unbound."""

import json
import threading
import unittest

from harness import (BIND, GET, SUCCESS, WORKERS, E2ETest, Edgemux, Platform, ao_bind, ao_parse,
                     ao_response, check_ledger, pipes, start_edge_sim, wait_until, worker_of)



class PlatformRequests(E2ETest):
    def cluster(self, overrides=None):
        self.plat = Platform(self.env, 3)
        ov = {"platform": {"request_timeout": "2s", "all_down_grace": "1s"},
              "edge": {"drain_spread": "100ms"}}
        for k, v in (overrides or {}).items():
            ov.setdefault(k, {}).update(v)
        self.emx = Edgemux(self.env, "emx-pr", self.plat.ports, overrides=ov)
        self.emx.wait_ready()
        wait_until(lambda: self.plat.pipes_connected() == [pipes()] * 3, 10, what="every pipe connected")

    def bound_edge(self, things):
        """A raw edge that AUTHed and BOUND things; returns (edge, session,
        1-based instance that took the BIND)."""
        e = self.emx.edge(app_key=self.env.app_key)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        before = self.plat.msgs_in()
        e.send(ao_bind(2, sid, things))
        self.assertEqual(e.answers(lambda g: 2 in g)[2], [SUCCESS])
        deltas = [a - b for a, b in zip(self.plat.msgs_in(), before)]
        self.assertEqual(sorted(deltas), [0, 0, 1])
        binds = self.plat.binds()["things"]
        for t in things:
            self.assertIn(t, binds)
            self.assertEqual(binds[t]["server"], self.identity(binds[t]["endpoint"]))
        if WORKERS > 1:  # the endpointId the platform saw is the edge's own
            status, body = self.emx.http("/edges")
            self.assertEqual(status, 200)
            self.assertEqual([e_["endpointId"] for e_ in json.loads(body)["edges"]],
                             [binds[things[0]]["endpoint"]])
        return e, sid, deltas.index(1) + 1

    def identity(self, endpoint):
        """The X-Edgemux-Server of the pipes that carry the edge with this
        endpointId: the server name, or name/worker with several workers."""
        return "emx-pr" if WORKERS == 1 else "emx-pr/%d" % (worker_of(endpoint))

    def platform_get(self, instance, thing, prop="Temperature"):
        """Sends `get` on the control channel in a thread; returns a
        function that waits for its reply."""
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", self.plat.cmd(
            "get %d %s %s" % (instance, thing, prop))), daemon=True)
        t.start()

        def reply(timeout=20):
            t.join(timeout)
            return out.get("r")
        return reply

    def test_platform_get_answered_on_the_pipe_it_came_from(self):
        self.cluster()
        e, sid, bound_at = self.bound_edge(["Dev-1"])
        order = [bound_at] + [n for n in (1, 2, 3) if n != bound_at]
        for n in order:  # the binding instance, then the two others
            msgs_before = self.plat.msgs_in()
            reply = self.platform_get(n, "Dev-1")
            msg = e.recv(timeout=5)
            code, rid, eid, psid, mp = ao_parse(msg)
            self.assertEqual(code, GET)
            self.assertIn(b"Dev-1", msg)
            e.send(ao_response(SUCCESS, rid, eid, psid))
            self.assertEqual(reply(), "answer 0x40 SUCCESS", "instance %d" % n)
            # The answer came back to instance n (platform-sim matches it
            # only on the connection that sent the request).
            deltas = [a - b for a, b in zip(self.plat.msgs_in(), msgs_before)]
            self.assertEqual(deltas, [1 if i + 1 == n else 0 for i in range(3)], (n, deltas))
        st = self.plat.stats()
        self.assertEqual(st["violations"], 0, st["violations_by_kind"])
        self.assertEqual(st["platform_requests"], {"sent": 3, "answered": 3, "timeouts": 0})

    def test_platform_get_unanswered_is_a4(self):
        self.cluster({"edge": {"request_timeout": "1s"}})
        e, sid, bound_at = self.bound_edge(["Dev-2"])
        reply = self.platform_get(bound_at % 3 + 1, "Dev-2")
        code, rid, eid, psid, _ = ao_parse(e.recv(timeout=5))
        self.assertEqual(code, GET)
        self.assertEqual(reply(), "answer 0xA4 GATEWAY_TIMEOUT")
        e.send(ao_response(SUCCESS, rid, eid, psid))  # late: dropped, edge stays
        e.send(ao_bind(3, sid, ["Dev-3"]))
        self.assertEqual(e.answers(lambda g: 3 in g)[3], [SUCCESS])
        self.assertEqual(self.plat.stats()["violations"], 0)

    def test_edge_that_leaves_is_unbound(self):
        self.cluster()
        e, sid, bound_at = self.bound_edge(["Dev-A", "Dev-B"])
        unbinds = self.plat.stats()["requests_by_code"].get("0x0B", 0)
        e.close()
        wait_until(lambda: not ({"Dev-A", "Dev-B"} & set(self.plat.binds()["things"])), 5,
                   what="Things unbound")
        st = self.plat.stats()
        self.assertEqual(st["requests_by_code"].get("0x0B", 0) - unbinds, 1)  # one UNBIND
        self.assertEqual(st["violations"], 0, st["violations_by_kind"])

    def test_edge_that_leaves_is_unbound_through_another_instance(self):
        # The instance that took the BIND is gone: the UNBIND goes to the
        # next connected one (the cluster shares its bind table).
        self.cluster()
        e, sid, bound_at = self.bound_edge(["Dev-C"])
        self.assertEqual(self.plat.cmd("crash %d" % bound_at), "ok")
        port = self.plat.ports[bound_at - 1]
        # every worker (its lines start "wK: ") has its own pipes to it
        prefixes = [""] if WORKERS == 1 else ["w%d: " % k for k in range(WORKERS)]
        wait_until(lambda: all("%sinstance 127.0.0.1:%d pipe %d closed" % (w, port, i) in self.emx.log()
                               for w in prefixes for i in (0, 1)), 5,
                   what="edgemux saw the crashed instance's pipes close")
        e.close()
        wait_until(lambda: "Dev-C" not in self.plat.binds()["things"], 5, what="Dev-C unbound")
        self.assertEqual(self.plat.stats()["violations"], 0)

    def test_edge_sim_answers_platform_gets_and_is_unbound_when_it_leaves(self):
        self.cluster()
        p, lpath = start_edge_sim(self.env, self.emx.edge_port, "--edges", 2, "--things", 2,
                                  "--rate", 5, "--duration", "3s", "--drain", "4s")
        wait_until(lambda: {"sim-edge-0-thing-1", "sim-edge-1-thing-0"} <= set(self.plat.binds()["things"]),
                   10, what="edge-sim bound its Things")
        for n, thing in ((1, "sim-edge-0-thing-1"), (2, "sim-edge-1-thing-0"), (3, "sim-edge-0-thing-0")):
            r = self.plat.cmd("get %d %s Temperature" % (n, thing))
            self.assertTrue(r.startswith("answer 0x"), r)
        p.p.wait(20)
        out = p.output()
        with open(lpath) as f:
            ledger = json.load(f)
        self.assertEqual(p.p.returncode, 0, out)
        codes = check_ledger(self, ledger, out)
        self.assertEqual(set(codes), {SUCCESS}, codes)
        wait_until(lambda: not any(t.startswith("sim-edge-") for t in self.plat.binds()["things"]), 5,
                   what="edge-sim's Things unbound after it left")
        st = self.plat.stats()
        self.assertEqual(st["violations"], 0, st["violations_by_kind"])
        self.assertEqual(st["platform_requests"]["answered"], 3)


if __name__ == "__main__":
    unittest.main()
