"""Bad input from devices and from platforms (DESIGN §3 outcomes table and
docs/protocol.md): each case gets its outcome, and a canary device driven by
edge-sim through the same edgemux sees no failure while they run."""

import json
import socket
import struct
import unittest

from harness import (AUTH, BAD_REQUEST, GET, SUCCESS, Closed, E2ETest, Edgemux, Platform,
                     RawEdge, ao_auth, ao_header, ao_parse, ao_request, ao_str, start_edge_sim,
                     wait_until)


class BadInput(E2ETest):
    def setUp(self):
        super().setUp()
        self.plat = Platform(self.env, 2)
        self.emx = Edgemux(self.env, "emx-bad", self.plat.ports,
                           overrides={"edge": {"max_message_size": "256KiB", "auth_timeout": "2s"}})
        self.emx.wait_ready()
        # The canary: 5 devices sending all along; none may see a failure.
        self.canary, self.canary_ledger = start_edge_sim(
            self.env, self.emx.edge_port, "--edges", 5, "--rate", 10, "--duration", "10s",
            "--drain", "5s")

    def tearDown(self):
        if self.canary.alive():
            self.canary.signal(2)  # SIGINT: edge-sim stops early and writes its ledger
        super().tearDown()

    def authed(self):
        e = self.emx.edge(app_key=self.env.app_key)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        return e, sid

    def answer_of(self, e, msg):
        e.send(msg)
        code, rid, _, _, _ = ao_parse(e.recv())
        return code, rid

    def test_device_bad_input(self):
        cases = []
        # malformed headers → 1007
        for raw in (b"", b"\x01", b"\x01\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00",
                    ao_header(GET, 2, 0, 0)[:14] + b"\x02",  # multipart byte 2
                    ao_header(GET, 2, 0, 0, multipart=(0, 1, 8192)),  # chunkId 0
                    ao_header(GET, 2, 0, 0, multipart=(3, 2, 8192)),  # chunkId > count
                    ao_header(GET, 2, 0, 0)[:14] + b"\x01\x00\x01\x00"):  # multipart header cut short
            e, sid = self.authed()
            e.send(raw)
            cases.append(("header %r" % raw[:20], e.expect_close(), 1007))
        # wrong version byte → 1007
        e, sid = self.authed()
        e.send(b"\x02" + ao_request(GET, 2, sid)[1:])
        cases.append(("version 2", e.expect_close(), 1007))
        # unknown code, truncated body, length past the end → 0x80, connection stays
        e, sid = self.authed()
        cases.append(("unknown code", self.answer_of(e, ao_header(0x33, 3, 0, sid) + b"\x00\xff")[0], BAD_REQUEST))
        cases.append(("truncated body", self.answer_of(e, ao_request(GET, 4, sid)[:20])[0], BAD_REQUEST))
        past = ao_header(GET, 5, 0, sid) + b"\x0A" + struct.pack(">I", 0x80000000 | 5000) + b"abc"
        cases.append(("length past end", self.answer_of(e, past)[0], BAD_REQUEST))
        cases.append(("still answers", self.answer_of(e, ao_request(GET, 6, sid))[0], SUCCESS))
        # a continuation chunk with no first chunk → 0x80 once
        cont = ao_header(GET, 7, 0, sid, multipart=(2, 3, 8192)) + b"\x0A" + ao_str("T") + b"xx"
        cases.append(("orphan chunk", self.answer_of(e, cont)[0], BAD_REQUEST))
        # AUTH not first → 1008
        e = self.emx.edge(app_key=self.env.app_key)
        e.send(ao_request(GET, 1, 0))
        cases.append(("request before AUTH", e.expect_close(), 1008))
        # oversize single message → 1009; oversize as fragments → 1009
        e, sid = self.authed()
        e.send(ao_request(GET, 8, sid) + b"\0" * (300 * 1024))
        cases.append(("oversize message", e.expect_close(), 1009))
        e, sid = self.authed()
        e.send_frame(0x2, b"\0" * 100000, fin=False)
        e.send_frame(0x0, b"\0" * 100000, fin=False)
        e.send_frame(0x0, b"\0" * 100000, fin=True)
        cases.append(("oversize fragments", e.expect_close(), 1009))
        # a 64-bit frame length from a device is legal WebSocket: answered if small enough
        e, sid = self.authed()
        msg = ao_request(GET, 9, sid)
        hdr = struct.pack(">BBQ", 0x82, 0x80 | 127, len(msg)) + b"\0\0\0\0"
        e.sock.sendall(hdr + msg)
        cases.append(("64-bit length, small message", ao_parse(e.recv())[0], SUCCESS))
        # text frame → 1003
        e, sid = self.authed()
        e.send_frame(0x1, b"06:44:02")
        cases.append(("text frame", e.expect_close(), 1003))
        # ping flood: answered by the transport, connection and others unaffected
        e, sid = self.authed()
        for _ in range(2000):
            e.send_frame(0x9, b"06:44:02")
        cases.append(("after ping flood", self.answer_of(e, ao_request(GET, 10, sid))[0], SUCCESS))
        for name, got, want in cases:
            with self.subTest(case=name):
                self.assertEqual(got, want, name)
        self.check_canary()

    def test_handshake_abuse(self):
        port = self.emx.edge_port
        # plain HTTP and a wrong path: 404, not an upgrade
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertIn(b" 404", s.recv(4096).split(b"\r\n")[0])
        e = RawEdge(port, path="/Thingworx/Other", expect_status=None)
        self.assertEqual(e.status, 404)
        # huge upgrade headers: refused, never accepted
        big = ["X-Pad-%d: %s" % (i, "a" * 1000) for i in range(64)]
        try:
            e = RawEdge(port, app_key=self.env.app_key, extra_headers=big, expect_status=None)
            self.assertNotEqual(e.status, 101)
        except (ConnectionError, OSError):
            pass
        # slowloris: a handshake that never finishes does not hold others up
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        slow.sendall(b"GET /Thingworx/WS HTTP/1.1\r\nHost: x\r\n")
        e, sid = self.authed()
        self.assertEqual(self.answer_of(e, ao_request(GET, 2, sid))[0], SUCCESS)
        slow.close()
        self.check_canary()

    def check_canary(self):
        status = self.canary.p.wait(60)
        self.assertEqual(status, 0, self.canary.output())
        with open(self.canary_ledger) as f:
            ledger = json.load(f)
        self.assertGreater(len(ledger), 50)
        bad = [r for r in ledger if r["outcome"] != "answered" or r["code"] != SUCCESS]
        self.assertEqual(bad, [], "the canary devices saw failures")
        self.assertEqual(self.plat.stats()["violations"], 0)
        self.assertTrue(self.emx.proc.alive())


if __name__ == "__main__":
    unittest.main()
