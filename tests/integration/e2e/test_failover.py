"""Losing an instance: one killed with SIGKILL, one that stops reading
(skipped once stalled or past the high watermark, used again once it
resumes). Rules 1, 2 and 7 and the 0xA3 row of the outcomes table, against
the real binary."""

import struct
import time
import unittest

from harness import (GATEWAY_TIMEOUT, GET, SERVICE_UNAVAILABLE, SUCCESS, UNAUTHORIZED, WORKERS, E2ETest,
                     Edgemux, Platform, ao_auth, ao_header, ao_infotable_blob, ao_parse, ao_request,
                     ao_str, pipes, wait_until)


def big_request(request_id, session_id, size):
    """A GET whose params are a BLOB InfoTable of `size` bytes (echoed back)."""
    return (ao_header(GET, request_id, 0, session_id) + b"\x0A" + ao_str("SteamSensor") + b"\x01" +
            ao_str("Blob") + b"\x00" + b"\x05" + ao_infotable_blob("data", b"w" * size))


class KilledInstance(E2ETest):
    """Separate platform-sim processes, one instance each, so one can be
    SIGKILLed. They share no session table: an edge's sessionId is valid only
    at the process that answered its AUTH, and the others answer its requests
    0x81 "unknown session" at once. The test uses that: the requests the
    issuing process holds (delayed by --latency) are the ones in flight when
    it is killed, and every request still gets exactly one answer."""

    LATENCY_MS = 3000

    def test_sigkill_inflight_answered_a3_and_nothing_more_sent(self):
        plats = [Platform(self.env, 1, extra=("--latency", str(self.LATENCY_MS))) for _ in range(3)]
        emx = Edgemux(self.env, "emx-kill", [p.ports[0] for p in plats],
                      overrides={"platform": {"request_timeout": "5s", "all_down_grace": "1s"},
                                 "edge": {"drain_spread": "100ms"}})
        emx.wait_ready()
        wait_until(lambda: all(p.pipes_connected() == [pipes()] for p in plats), 10,
                   what="every pipe connected")

        # AUTH: find the process that issued the edge's session.
        sessions = [p.stats()["sessions"] for p in plats]
        e = emx.edge(app_key=self.env.app_key)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        grew = [i for i, p in enumerate(plats) if p.stats()["sessions"] > sessions[i]]
        self.assertEqual(len(grew), 1, grew)
        victim = plats[grew[0]]
        survivors = [p for p in plats if p is not victim]

        # Nine GETs, round robin: the victim holds its share (latency), the
        # others answer 0x81 at once.
        before = victim.msgs_in()[0]
        rids = list(range(2, 11))
        for rid in rids:
            e.send(ao_request(GET, rid, sid))
        got = e.answers(lambda g: len(g) + (victim.msgs_in()[0] - before) >= len(rids), timeout=5)
        held = victim.msgs_in()[0] - before
        self.assertGreater(held, 0, "no request in flight on the victim")
        self.assertTrue(all(c == [UNAUTHORIZED] for c in got.values()), got)

        t0 = time.monotonic()
        victim.kill()
        e.answers(lambda g: len(g) >= len(rids), timeout=4, into=got)
        self.assertLess(time.monotonic() - t0, self.LATENCY_MS / 1000.0,
                        "in-flight requests were not answered when the pipe died")
        a3 = [rid for rid, codes in got.items() if codes == [SERVICE_UNAVAILABLE]]
        self.assertEqual(len(a3), held, got)
        for rid in rids:
            self.assertEqual(len(got[rid]), 1, "request %d: answers %r" % (rid, got[rid]))
        self.assertEqual(e.quiet_for(0.3), [], "a second answer arrived")

        # Nothing more goes to the killed instance: every message a new edge
        # sends lands at a survivor, and every request is answered by one.
        # (A new edge may land on another worker, with pipes of its own:
        # every worker has seen them close first; with one worker, e's 0xA3
        # answers already say so.)
        prefixes = [""] if WORKERS == 1 else ["w%d: " % k for k in range(WORKERS)]
        wait_until(lambda: all("%sinstance 127.0.0.1:%d pipe %d closed" % (w, victim.ports[0], i)
                               in emx.log() for w in prefixes for i in (0, 1)), 5,
                   what="every worker saw the killed instance's pipes close")
        counts = [p.msgs_in()[0] for p in survivors]
        e2 = emx.edge(app_key=self.env.app_key)
        code, sid2 = e2.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        rids2 = list(range(2, 22))
        for rid in rids2:
            e2.send(ao_request(GET, rid, sid2))
        got2 = e2.answers(lambda g: len(g) >= len(rids2), timeout=self.LATENCY_MS / 1000.0 + 3)
        for rid in rids2:
            self.assertEqual(len(got2[rid]), 1, got2)
            self.assertIn(got2[rid][0], (SUCCESS, UNAUTHORIZED), got2)
        landed = sum(p.msgs_in()[0] for p in survivors) - sum(counts)
        self.assertEqual(landed, 1 + len(rids2), "messages reached the killed instance's slot")
        # e's pending count is zero again: it can still send.
        e.send(ao_header(0x1F, 99, 0, sid))
        self.assertEqual(e.answers(lambda g: 99 in g, timeout=3)[99], [SUCCESS])
        for i in (0, 1):
            self.assertIn("instance 127.0.0.1:%d pipe %d closed" % (victim.ports[0], i), emx.log())


class StoppedReader(E2ETest):
    def cluster(self, platform_overrides, edge_overrides=None):
        self.plat = Platform(self.env, 3)
        ov = {"platform": dict({"request_timeout": "3s", "all_down_grace": "1s"}, **platform_overrides),
              "edge": dict({"drain_spread": "100ms"}, **(edge_overrides or {}))}
        self.emx = Edgemux(self.env, "emx-slow", self.plat.ports, overrides=ov)
        self.emx.wait_ready()
        wait_until(lambda: self.plat.pipes_connected() == [pipes()] * 3, 10, what="every pipe connected")
        self.e = self.emx.edge(app_key=self.env.app_key)
        code, self.sid = self.e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        self.got = {}
        self.rid = 1

    def send_and_wait(self, msg_fn, timeout):
        """Send one request; True if answered within timeout."""
        self.rid += 1
        rid = self.rid
        self.e.send(msg_fn(rid))
        try:
            self.e.answers(lambda g: rid in g, timeout=timeout, into=self.got)
            return True
        except AssertionError:
            return False

    def resumed_and_used_again(self, sent):
        self.assertEqual(self.plat.cmd("resume-reading 2"), "ok")
        # Whatever was stuck on instance 2 gets exactly one answer: its
        # platform's, or 0xA4 from edgemux.
        self.e.answers(lambda g: all(r in g for r in sent), timeout=8, into=self.got)
        for r in sent:
            self.assertEqual(len(self.got[r]), 1, (r, self.got[r]))
            self.assertIn(self.got[r][0], (SUCCESS, GATEWAY_TIMEOUT))
        wait_until(lambda: self.plat.stats()["instances"][1]["reading"], 2, what="reading again")
        time.sleep(0.3)
        before = self.plat.msgs_in()
        for _ in range(30):
            self.assertTrue(self.send_and_wait(lambda r: ao_request(GET, r, self.sid), 2))
        after = self.plat.msgs_in()
        got = [a - b for a, b in zip(after, before)]
        self.assertGreaterEqual(got[1], 8, "instance 2 not used again after it resumed: %r" % got)
        self.assertEqual(self.plat.stats()["violations"], 0)

    def test_stalled_instance_skipped_then_used_again(self):
        self.cluster({"stall_after": "300ms", "high_watermark": "16KiB", "low_watermark": "8KiB"})
        self.assertEqual(self.plat.cmd("stop-reading 2"), "ok")
        # Some requests land on instance 2 (both its pipes) and stay there.
        first = []
        for _ in range(12):
            self.rid += 1
            first.append(self.rid)
            self.e.send(ao_request(GET, self.rid, self.sid))
            time.sleep(0.03)
        self.e.answers_for(0.6, into=self.got)  # past stall_after
        stuck = [r for r in first if r not in self.got]
        self.assertGreaterEqual(len(stuck), 2, "nothing was sent to instance 2")
        # Now instance 2 is skipped: every request is answered at once by 1 or 3.
        before = self.plat.msgs_in()
        for _ in range(30):
            self.assertTrue(self.send_and_wait(lambda r: ao_request(GET, r, self.sid), 1.0),
                            "a request went to the stalled instance")
        after = self.plat.msgs_in()
        self.assertEqual(after[0] - before[0] + after[2] - before[2], 30)
        self.resumed_and_used_again(first)

    def test_instance_past_high_watermark_skipped_then_used_again(self):
        # stall_after is long: only the queued bytes can make it unwritable.
        # One device fills the pipe here, so its own share of bytes in
        # flight (edge.max_bytes_in_flight) is off: the requests stuck on
        # instance 2 would otherwise take it and answer the GETs 0xA3.
        self.cluster({"stall_after": "60s", "high_watermark": "64KiB", "low_watermark": "32KiB",
                      "sndbuf": "32KiB", "request_timeout": "6s"},
                     {"max_bytes_in_flight": 0})
        self.assertEqual(self.plat.cmd("stop-reading 2"), "ok")
        sent, streak, n = [], 0, 0
        t0 = time.monotonic()
        while streak < 12 and n < 150 and time.monotonic() - t0 < 5:
            n += 1
            answered = self.send_and_wait(lambda r: big_request(r, self.sid, 60 * 1024), 0.3)
            sent.append(self.rid)
            streak = streak + 1 if answered else 0
        self.assertGreaterEqual(streak, 12, "instance 2 still took requests after %d big requests" % n)
        # Skipped for good (still not reading), while 1 and 3 take everything.
        before = self.plat.msgs_in()
        for _ in range(15):
            self.assertTrue(self.send_and_wait(lambda r: ao_request(GET, r, self.sid), 1.0))
        after = self.plat.msgs_in()
        self.assertEqual(after[0] - before[0] + after[2] - before[2], 15)
        self.resumed_and_used_again(sent)


class AuthInFlight(E2ETest):
    def test_auth_in_flight_when_pipe_dies_a3_then_auth_again(self):
        # Outcomes table: an AUTH answered by edgemux itself (0xA3, pipe
        # lost) leaves the edge open and unauthenticated; it may AUTH again.
        plat = Platform(self.env, 2)
        emx = Edgemux(self.env, "emx-auth", plat.ports,
                      overrides={"platform": {"request_timeout": "4s", "all_down_grace": "5s"},
                                 "edge": {"drain_spread": "100ms"}})
        emx.wait_ready()
        wait_until(lambda: plat.pipes_connected() == [pipes()] * 2, 10, what="every pipe connected")
        for n in (1, 2):
            self.assertEqual(plat.cmd("stop-reading %d" % n), "ok")
        e = emx.edge(app_key=self.env.app_key)
        e.send(ao_auth(1, self.env.app_key))
        self.assertEqual(e.quiet_for(0.3), [])  # held by a platform that does not read
        for n in (1, 2):
            self.assertEqual(plat.cmd("crash %d" % n), "ok")
        code, rid, _, _, _ = ao_parse(e.recv(timeout=3))
        self.assertEqual((code, rid), (SERVICE_UNAVAILABLE, 1))
        for n in (1, 2):
            self.assertEqual(plat.cmd("resume-reading %d" % n), "ok")
            self.assertEqual(plat.cmd("restore %d" % n), "ok")
        emx.wait_ready(5)
        # /ready is 200 once any worker has a pipe again; the edge's worker
        # may reconnect a moment later (each worker has its own pipes).
        wait_until(lambda: plat.pipes_connected() == [pipes()] * 2, 10, what="every pipe reconnected")
        self.assertEqual(e.auth(self.env.app_key, request_id=2)[0], SUCCESS)


if __name__ == "__main__":
    unittest.main()
