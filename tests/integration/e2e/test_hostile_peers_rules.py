"""Hostile-peer suite, routing rules (issue 12 items 1, 3, 4): a platform
written from docs/protocol.md §6 (hostile.py) is edgemux's only instance. It
answers the canary at once and chosen requests slowly: an answer that takes
2.5 s (stall_after 1 s), a multipart answer whose chunks come 3 s apart
(request_timeout 4 s). Every request still gets exactly one whole answer,
and the canary (a GET every 200 ms) sees nothing. Then a SIGTERM drain under
steady load: no device loses a request it had in flight."""

import signal
import threading
import time
import unittest

from harness import (GET, SUCCESS, Edgemux, Env, Platform, RawEdge, ao_header, ao_parse, ao_request,
                     ao_str)
from hostile import HostilePlatform, HostileSuite, Reader, client_frame

SLOW_S = 2.5
CHUNK_GAP_S = 3.0


def slow_answer(platform, pipe, msg):
    code, rid, eid, sid, _ = ao_parse(msg)
    platform.later(SLOW_S, pipe.send, ao_header(SUCCESS, rid, eid, sid) + b"\x00\xff")


def slow_chunks(platform, pipe, msg):
    """Three chunks of 4 KiB, CHUNK_GAP_S apart (each within
    request_timeout of the one before, all of them well past it)."""
    code, rid, eid, sid, _ = ao_parse(msg)
    for i in range(3):
        chunk = ao_header(SUCCESS, rid, eid, sid, multipart=(i + 1, 3, 8192)) + b"\x0A" + ao_str("SlowChunks") + \
            (b"\x00" if i == 0 else b"") + b"c" * 4096
        platform.later(i * CHUNK_GAP_S, pipe.send, chunk)


class HostileRules(HostileSuite):
    def setup_topology(self, env, shared):
        hostile = HostilePlatform(env.app_key)
        hostile.behaviours = {"Slow": slow_answer, "SlowChunks": slow_chunks}
        shared["cleanups"].append(hostile.close)
        emx = Edgemux(env, "emx-hostile-rules", [hostile.port], overrides={
            "log": {"level": "info"},
            "platform": {"stall_after": "1s", "request_timeout": "4s"}})
        shared.update(emx=emx, hostile=hostile)

    def device(self):
        e = RawEdge(self.emx.edge_port, app_key=self.env.app_key)
        self.track(e)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        r = Reader(e.sock, e.buf)
        self.addCleanup(r.stop)
        return e.sock, sid, r

    def test_slow_platform_answers(self):
        """Item 1: a platform that thinks for 2.5 s (stall_after 1 s) on one
        request while it answers others: its pipe is not stalled, the slow
        request gets its answer, the device's next request gets 0x40.

        The others are each device's own quick GETs every 200 ms while it
        waits (as the canary's are): with several workers the canary
        shares pipes only with the devices of its own worker, and a
        worker's pipes that carry nothing but slow requests are stalled
        by the rule (nothing received for stall_after, protocol.md §6.3)."""
        def one(i, out):
            s, sid, r = self.device()
            t = time.monotonic()
            s.sendall(client_frame(ao_request(GET, 10, sid, thing="Slow")))
            quick = []
            while time.monotonic() < t + 1.5:  # past stall_after: the slow request is still unanswered
                time.sleep(0.2)
                quick.append(100 + len(quick))
                s.sendall(client_frame(ao_request(GET, quick[-1], sid)))
            s.sendall(client_frame(ao_request(GET, 11, sid)))
            r.wait(lambda r: 10 in r.by_rid and 11 in r.by_rid and all(q in r.by_rid for q in quick), 6.0)
            out[i] = (r.by_rid.get(10), r.by_rid.get(11), round(time.monotonic() - t, 2),
                      sorted({c for q in quick for c in r.by_rid.get(q, [None])}, key=str))

        def run(obs):
            out = {}
            threads = [threading.Thread(target=one, args=(i, out)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(15)
            obs["devices"] = {i: {"slow": ["0x%02x" % c for c in (a or [])], "next": ["0x%02x" % c for c in (b or [])],
                                  "s": s, "quick": [c if c is None else "0x%02x" % c for c in q]}
                              for i, (a, b, s, q) in sorted(out.items())}
            self.assertEqual(len(out), 4)
            for a, b, _, q in out.values():
                self.assertEqual((a, b, q), ([SUCCESS], [SUCCESS], [SUCCESS]))
        self.attack("4 devices each wait 2.5 s for one answer (stall_after 1 s) and send another request meanwhile",
                    run)

    def test_slow_multipart_answers(self):
        """Item 3: each chunk re-arms the request's timer, so an answer whose
        chunks come 3 s apart (request_timeout 4 s) arrives whole, with no
        0xA4 after part of it."""
        def one(i, out):
            s, sid, r = self.device()
            t = time.monotonic()
            s.sendall(client_frame(ao_request(GET, 20, sid, thing="SlowChunks")))
            r.wait(lambda r: 20 in r.by_rid, 3 * CHUNK_GAP_S + 4)
            time.sleep(0.5)  # anything after the answer would show here
            out[i] = (r.by_rid.get(20), round(time.monotonic() - t, 2))

        def run(obs):
            out = {}
            threads = [threading.Thread(target=one, args=(i, out)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
            obs["devices"] = {i: {"answers": ["0x%02x" % c for c in (a or [])], "s": s}
                              for i, (a, s) in sorted(out.items())}
            self.assertEqual(len(out), 4)
            for a, _ in out.values():
                self.assertEqual(a, [SUCCESS])  # the last chunk of one whole answer, nothing else
        row = self.attack("4 devices get 3-chunk answers with 3 s between chunks (request_timeout 4 s)", run)
        self.assertNotIn("emx_answers_abandoned_total", row["counters"])

    def test_drain_under_load(self):
        """Item 4: SIGTERM while 20 devices send 20 requests/s each (platform
        answers take 200 ms): every request sent before a device's 1001
        close frame (less the 50 ms the close frame may be on its way, when
        a request is lost by the protocol itself) gets exactly one answer,
        0x40 or 0xA0 "server shutting down", and edgemux exits 0. Its own
        edgemux; no canary (edgemux is meant to stop)."""
        env = Env()
        self.addCleanup(env.cleanup)
        plat = Platform(env, 1, extra=["--latency", "200"])
        emx = Edgemux(env, "emx-drain", plat.ports, overrides={
            "log": {"level": "info"}, "edge": {"drain_spread": "2s"}})
        emx.wait_ready()
        stop = threading.Event()
        results = []
        lock = threading.Lock()

        def device():
            e = RawEdge(emx.edge_port, app_key=env.app_key)
            code, sid = e.auth(env.app_key)
            r = Reader(e.sock, e.buf)
            sent = {}
            rid = 100
            try:
                while not stop.is_set() and r.close_code is None and not r.eof:
                    rid += 1
                    sent[rid] = time.monotonic()
                    try:
                        e.sock.sendall(client_frame(ao_request(GET, rid, sid)))
                    except OSError:
                        break
                    time.sleep(0.05)
                r.wait(lambda r: r.eof, 10.0)
            finally:
                r.stop()
                e.close()
            with lock:
                results.append((sent, dict(r.by_rid), r.close_code, r.close_at or time.monotonic()))

        threads = [threading.Thread(target=device) for _ in range(20)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        t_term = time.monotonic()
        emx.proc.signal(signal.SIGTERM)
        try:
            emx.proc.p.wait(15)
        except Exception:
            pass
        stop.set()
        for t in threads:
            t.join(15)
        status = emx.proc.p.returncode
        lost, twice, codes, closes = [], [], {}, {}
        for sent, answers, close, close_at in results:
            closes[close] = closes.get(close, 0) + 1
            for rid, ts in sent.items():
                got = answers.get(rid, [])
                for c in got:
                    codes["0x%02x" % c] = codes.get("0x%02x" % c, 0) + 1
                if len(got) > 1:
                    twice.append((rid, got))
                elif not got and ts < close_at - 0.05:
                    lost.append(rid)
        obs = {"devices": len(results), "requests": sum(len(r[0]) for r in results), "answers": codes,
               "closes": {str(k): v for k, v in closes.items()}, "lost": len(lost), "answered_twice": len(twice),
               "exit": status, "drain_s": round(time.monotonic() - t_term, 1)}
        print("\nSIGTERM drain under load: %s" % obs)
        type(self).results.append({"attack": "SIGTERM drain while 20 devices send 20 requests/s (answers take 200 ms)",
                                   "test": self.id().split(".", 1)[-1], "observed": obs})
        self.assertEqual(len(results), 20)
        self.assertEqual(status, 0, emx.log()[-2000:])
        self.assertEqual(closes, {1001: 20})
        self.assertEqual(twice, [])
        self.assertEqual(lost, [], "requests in flight lost by the drain")
        self.assertEqual(set(codes) - {"0x40", "0xa0"}, set())


if __name__ == "__main__":
    unittest.main()
