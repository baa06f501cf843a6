"""What a device sees at the edge: AUTH gating, size limits, frame sizes,
routing round robin, and the all-down rule, against the real binary."""

import re
import socket
import struct
import time
import unittest
import zlib

from harness import (AUTH, BAD_REQUEST, GET, INTERNAL_ERROR, KEEP_ALIVE, SUCCESS, E2ETest,
                     Edgemux, Platform, ao_auth, ao_bind, ao_header, ao_parse, ao_request,
                     WORKERS, edge_sim, pipes, wait_until)


class EdgeOutcomes(E2ETest):
    def cluster(self, instances=3, overrides=None, psim_extra=()):
        self.plat = Platform(self.env, instances, extra=psim_extra)
        self.emx = Edgemux(self.env, "emx-a", self.plat.ports, overrides=overrides)
        self.emx.wait_ready()
        wait_until(lambda: all(n == pipes() for n in self.plat.pipes_connected()), 10,
                   what="every pipe connected")

    def test_round_robin_across_three_instances(self):
        self.cluster()
        before = self.plat.msgs_in()
        rc, out, ledger = edge_sim(self.env, self.emx.edge_port, "--edges", 10, "--rate", 30,
                                   "--duration", "3s", "--drain", "5s")
        self.assertEqual(rc, 0, out)
        after = self.plat.msgs_in()
        got = [a - b for a, b in zip(after, before)]
        total = sum(got)
        self.assertGreater(total, 300, out)
        for n in got:  # each instance within 10% of a third
            self.assertLess(abs(n - total / 3), total * 0.10, got)
        self.assertIn("no_answer 0", out)
        self.assertEqual(self.plat.stats()["violations"], 0)

    def test_auth_first_and_keepalive(self):
        self.cluster()
        e = self.emx.edge(app_key=self.env.app_key)
        e.send(ao_request(GET, 1, 0))  # anything before AUTH
        self.assertEqual(e.expect_close(), 1008)
        e = self.emx.edge(app_key=self.env.app_key)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        e.send(ao_header(KEEP_ALIVE, 7, 0, sid))
        code, rid, eid, _, _ = ao_parse(e.recv())
        self.assertEqual((code, rid, eid), (SUCCESS, 7, 0))
        e.send(ao_header(0x30, 8, 0, sid) + b"\x00\xff")  # unknown code
        code, rid, _, _, _ = ao_parse(e.recv())
        self.assertEqual((code, rid), (BAD_REQUEST, 8))
        self.assertEqual(self.plat.stats()["violations"], 0)  # KEEP_ALIVE never forwarded

    def test_no_auth_closed_after_auth_timeout(self):
        self.cluster(overrides={"edge": {"auth_timeout": "1s"}})
        e = self.emx.edge(app_key=self.env.app_key)
        t0 = time.monotonic()
        self.assertEqual(e.expect_close(timeout=5), 1008)
        self.assertGreater(time.monotonic() - t0, 0.8)

    def test_bad_auth_delivered_then_closed(self):
        self.cluster()
        e = self.emx.edge(app_key="wrong")
        e.send(ao_auth(1, "wrong-key"))
        code, rid, _, _, _ = ao_parse(e.recv())
        self.assertEqual((code, rid), (0x81, 1))
        self.assertEqual(e.expect_close(), 1008)

    def test_oversize_message_closed_1009(self):
        self.cluster(overrides={"edge": {"max_message_size": "64KiB"}})
        e = self.emx.edge(app_key=self.env.app_key)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        e.send(ao_request(GET, 2, sid) + b"\x00" * (70 * 1024))
        self.assertEqual(e.expect_close(), 1009)

    def test_short_header_closed_1007_and_text_1003(self):
        self.cluster()
        e = self.emx.edge(app_key=self.env.app_key)
        e.auth(self.env.app_key)
        e.send(b"\x01\x01\x00")
        self.assertEqual(e.expect_close(), 1007)
        e = self.emx.edge(app_key=self.env.app_key)
        e.send_frame(0x1, b"hello")
        self.assertEqual(e.expect_close(), 1003)

    def _big_answer(self, deflate, size, chunk_size):
        self.cluster(psim_extra=("--response-size", str(size), "--chunk-size", str(chunk_size)))
        hdrs = ("Sec-WebSocket-Extensions: permessage-deflate",) if deflate else ()
        e = self.emx.edge(app_key=self.env.app_key, max_frame_size=4096, extra_headers=hdrs)
        if deflate:
            self.assertIn("permessage-deflate", e.response_head.lower())
        inflater = zlib.decompressobj(-15)

        def message():
            parts, rsv = [], None
            while True:
                opcode, fin, payload = e.recv_frame()
                if opcode in (0x9, 0xA):
                    continue
                self.assertIn(opcode, (0x0, 0x2))
                if rsv is None:
                    rsv = e.frames[-1][3]
                parts.append(payload)
                if fin:
                    msg = b"".join(parts)
                    return inflater.decompress(msg + b"\x00\x00\xff\xff") if rsv & 4 else msg

        e.send(ao_auth(1, self.env.app_key))
        code, _, _, sid, _ = ao_parse(message())
        self.assertEqual(code, SUCCESS)
        e.send(ao_request(GET, 2, sid))
        total, last = 0, False
        while not last:  # the answer, whole or in chunks
            msg = message()
            code, rid, _, _, mp = ao_parse(msg)
            self.assertEqual((code, rid), (SUCCESS, 2))
            total += len(msg)
            last = not mp or struct.unpack(">HH", msg[15:19])[0] == struct.unpack(">HH", msg[15:19])[1]
        self.assertGreater(total, size)
        for opcode, fin, length, rsv, len7 in e.frames:
            self.assertLessEqual(length, 4096)
            self.assertNotEqual(len7, 127, "64-bit frame length sent to an edge")
        if deflate:
            self.assertTrue(any(f[3] & 4 for f in e.frames), "deflate negotiated but not used")

    def test_max_frame_size_4096_plain_100k_answer(self):
        self._big_answer(deflate=False, size=100 * 1024, chunk_size=8192)

    def test_max_frame_size_4096_deflate_100k_answer(self):
        self._big_answer(deflate=True, size=100 * 1024, chunk_size=8192)

    def test_max_frame_size_4096_one_60k_message(self):
        # One 60 KB AlwaysOn message: edgemux itself cuts it into frames.
        self._big_answer(deflate=False, size=60000, chunk_size=65535)

    def test_max_frame_size_4096_deflate_one_60k_message(self):
        self._big_answer(deflate=True, size=60000, chunk_size=65535)

    def test_slow_consumer_closed_1008(self):
        # An edge that sends requests but does not read its 60 KB answers:
        # once the kernel buffers are full, edgemux's queue to it passes
        # edge.max_queued and the edge is closed 1008 (the server checks the
        # limit lazily; this shows it still holds end to end).
        self.cluster(instances=1, overrides={"edge": {"max_queued": "256KiB"}},
                     psim_extra=("--response-size", "60000"))
        e = self.emx.edge(app_key=self.env.app_key)
        e.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        # edgemux closes it 1008; with the device's unread requests still in
        # edgemux's receive buffer the kernel may turn that close into a
        # reset (seen by a send or a read here), and then the close frame
        # never reaches the device.
        try:
            for i in range(2, 800):
                e.send(ao_request(GET, i, sid))
            time.sleep(1)
            self.assertEqual(e.expect_close(timeout=30), 1008)
        except (ConnectionResetError, BrokenPipeError):
            pass
        e.close()
        wait_until(lambda: re.search(r"closed \(1008 slow consumer\)", self.emx.log()), 5,
                   what="edgemux's 1008 slow consumer close")

    def test_all_down_closes_edges_1013_and_recovers(self):
        self.cluster(overrides={"platform": {"all_down_grace": "1s"}})
        e = self.emx.edge(app_key=self.env.app_key)
        self.assertEqual(e.auth(self.env.app_key)[0], SUCCESS)
        for n in (1, 2, 3):
            self.assertEqual(self.plat.cmd("crash %d" % n), "ok")
        t0 = time.monotonic()
        self.assertEqual(e.expect_close(timeout=8), 1013)
        self.assertGreater(time.monotonic() - t0, 0.8)  # not before all_down_grace
        wait_until(lambda: self.emx.http("/ready")[0] == 503, 5, what="/ready 503")
        if WORKERS > 1:
            # each worker times its own all-down grace: wait until every one
            # has closed its edges, or the new edge below may land on a
            # worker whose grace ends just after it connected
            wait_until(lambda: len(set(re.findall(r"\] w(\d+): no platform pipe for ",
                                                  self.emx.log()))) == WORKERS, 5,
                       what="every worker's all-down")
        # A new edge is still accepted, and its request is answered 0xA0.
        e2 = self.emx.edge(app_key=self.env.app_key)
        e2.send(ao_auth(1, self.env.app_key))
        code, rid, _, _, _ = ao_parse(e2.recv())
        self.assertEqual((code, rid), (INTERNAL_ERROR, 1))
        for n in (1, 2, 3):
            self.plat.cmd("restore %d" % n)
        self.emx.wait_ready(10)
        # /ready is 200 once any worker has a pipe again; e2's worker may
        # reconnect a moment later (each worker has its own pipes), so wait
        # for every pipe of every worker before its AUTH.
        wait_until(lambda: all(n == pipes() for n in self.plat.pipes_connected()), 10,
                   what="every pipe reconnected")
        self.assertEqual(e2.auth(self.env.app_key, request_id=2)[0], SUCCESS)


if __name__ == "__main__":
    unittest.main()
