"""The edge listener's opening handshake, from RFC 6455 §4 and RFC 7692 §5
and §7.1 (docs/protocol.md §5): only a well-formed `GET <edge.path>
HTTP/1.1` upgrade is upgraded; every other request gets its HTTP error at
once, and any connection is answered or dropped within handshake_timeout;
permessage-deflate offers are accepted with valid parameters or declined,
never with a dropped handshake. A canary device keeps working throughout.
Raw sockets and the RFC device of rfcdevice.py."""

import base64
import os
import selectors
import socket
import time
import unittest

from harness import SUCCESS
from rfcdevice import (DEFAULT_PATH, EdgeSuite, accept_for, ao_post,
                       echoed_blob, http_exchange, upgrade_request)
from harness import ao_infotable_blob

HANDSHAKE_TIMEOUT = 2.0
PROMPT = 1.0  # an answer to a complete request comes within this


class Handshake(EdgeSuite):
    TRANSPORT = {"handshake_timeout": "2s"}

    def req(self, **kw):
        return upgrade_request("127.0.0.1", self.port, **kw)

    def exchange(self, request, **kw):
        return http_exchange(self.port, request, **kw)

    def assert_refused(self, request, statuses, what, header=None, must_close=False, prompt=True):
        ans, t = self.exchange(request, timeout=HANDSHAKE_TIMEOUT + 2.0)
        with self.subTest(case=what):
            self.assertNotEqual(ans.status, 101, "%s was upgraded: %r" % (what, ans))
            if statuses is None:  # garbage: an error answer, or closed with none
                self.assertTrue(ans.status in (400, 505) or (ans.status is None and ans.closed),
                                "%s: %r" % (what, ans))
            else:
                self.assertIn(ans.status, statuses, "%s: %r" % (what, ans))
            self.assertIsNotNone(t, "%s: neither answered nor closed in %.1fs" % (what, HANDSHAKE_TIMEOUT + 2))
            if prompt:
                self.assertLess(t, PROMPT, "%s answered after %.2fs" % (what, t))
            if header:
                name, want = header
                vals = [v.strip() for v in ",".join(ans.all(name)).split(",") if v.strip()]
                self.assertIn(want, vals, "%s: %s header %r" % (what, name, ans.all(name)))
            if must_close:
                self.assertTrue(ans.closed, "%s: connection not closed after the answer" % what)
        return ans

    # ------------------------------------------------------------ accepted

    def test_valid_upgrades(self):
        self.start_canary()
        # the canonical request (RFC 6455 §4.1), then a whole session on it
        d = self.device(deflate=None)
        self.assertIsNone(d.response.header("sec-websocket-extensions"))
        self.assertIsNone(d.response.header("sec-websocket-protocol"))
        code, _ = d.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        self.assertEqual(d.get(), SUCCESS)
        d.close()
        variants = {
            "Connection with other tokens": dict(headers=[("Connection", "keep-alive, Upgrade")]),
            "case-insensitive tokens": dict(headers=[("Upgrade", "WebSocket"), ("Connection", "upgrade")]),
            "Origin and Sec-WebSocket-Protocol-less": dict(headers=[("Origin", "http://device.example")]),
            "4 KiB of extra headers": dict(headers=[("X-Pad-%d" % i, "p" * 500) for i in range(8)]),
        }
        for what, kw in variants.items():
            req, key = self.req(**kw)
            ans, t = self.exchange(req, until_close=False)
            with self.subTest(case=what):
                self.assertEqual(ans.status, 101, "%s: %r" % (what, ans))
                self.assertEqual(ans.header("sec-websocket-accept"), accept_for(key))
        # lower-case header names, and a request written in 9 pieces
        req, key = self.req()
        low = b"\r\n".join(l.split(b":", 1)[0].lower() + b":" + l.split(b":", 1)[1] if b":" in l else l
                           for l in req.split(b"\r\n"))
        for what, data, cuts in (("lower-case names", low, None),
                                 ("written in pieces", req, list(range(7, len(req), len(req) // 9)))):
            ans, t = self.exchange(data, pieces=cuts, piece_delay=0.01, until_close=False)
            with self.subTest(case=what):
                self.assertEqual(ans.status, 101, "%s: %r" % (what, ans))
                self.assertEqual(ans.header("sec-websocket-accept"), accept_for(key))
        self.check_canary()

    def test_upgraded_device_not_dropped_at_handshake_timeout(self):
        d = self.device(deflate=True)
        time.sleep(HANDSHAKE_TIMEOUT + 1.0)
        code, _ = d.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        self.assertEqual(d.get(), SUCCESS)

    # ------------------------------------------------------------ refused

    def test_other_methods_405(self):
        self.start_canary()
        for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH", "HEAD", "TRACE"):
            req, _ = self.req(method=method)
            self.assert_refused(req, (405,), method, header=("allow", "GET"), must_close=True)
        req, _ = self.req(method="CONNECT", path="127.0.0.1:%d" % self.port)
        self.assert_refused(req, (405,), "CONNECT", header=("allow", "GET"), must_close=True)
        self.check_canary()

    def test_http_versions_and_garbage_400(self):
        self.start_canary()
        for version in ("HTTP/1.0", "HTTP/0.9"):
            req, _ = self.req(version=version)
            self.assert_refused(req, (400,), version)
        # HTTP/2.0 in an HTTP/1 request line: 400 (505 "version not supported" is as good)
        req, _ = self.req(version="HTTP/2.0")
        self.assert_refused(req, (400, 505), "HTTP/2.0")
        # an HTTP/0.9-style line (no version) and other garbage: 400 or closed
        req, _ = self.req(version=None)
        self.assert_refused(req, None, "request line without a version")
        for what, raw in (("empty lines", b"\r\n\r\n\r\n\r\n"),
                          ("binary", bytes(range(256)) + b"\r\n\r\n"),
                          ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
                          ("no method", b" /Thingworx/WS HTTP/1.1\r\nHost: x\r\n\r\n")):
            self.assert_refused(raw, None, what)
        # a TLS ClientHello on the plain port never ends a line: answered or
        # dropped within handshake_timeout
        hello = bytes.fromhex("16030100c8010000c40303") + os.urandom(32) + b"\x00" * 150
        self.assert_refused(hello, None, "TLS ClientHello", prompt=False)
        self.check_canary()

    def test_wrong_path_404(self):
        self.start_canary()
        for path in ("/", "/Thingworx/WSX", "/thingworx/ws", "/Thingworx/WS/more", "/Thingworx"):
            req, _ = self.req(path=path)
            self.assert_refused(req, (404,), "path %s" % path)
        # plain HTTP (no upgrade) to another path
        self.assert_refused(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", (404,), "plain GET /health")
        self.check_canary()

    def test_bad_upgrade_headers_400(self):
        self.start_canary()
        # no Upgrade header at all is plain HTTP to the path: 400, or 404
        # as for any plain HTTP request
        req, _ = self.req(omit=("Upgrade",))
        self.assert_refused(req, (400, 404), "no Upgrade")
        cases = {
            "Upgrade: h2c": dict(headers=[("Upgrade", "h2c")]),
            "no Connection": dict(omit=("Connection",)),
            "Connection: keep-alive": dict(headers=[("Connection", "keep-alive")]),
            "no Sec-WebSocket-Key": dict(omit=("Sec-WebSocket-Key",)),
            "key not base64": dict(key="this is not base64!!!!=="),
            "key of 15 bytes": dict(key=base64.b64encode(os.urandom(15)).decode()),
            "key of 17 bytes": dict(key=base64.b64encode(os.urandom(17)).decode()),
            "empty key": dict(key=" "),
        }
        for what, kw in cases.items():
            req, _ = self.req(**kw)
            self.assert_refused(req, (400,), what)
        # plain HTTP to the right path: not an upgrade
        self.assert_refused(("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % DEFAULT_PATH).encode(), (400, 404, 426),
                            "plain GET of the path")
        self.check_canary()

    def test_version_not_13_426(self):
        self.start_canary()
        for v in ("8", "12", "14", "7"):
            req, _ = self.req(headers=[("Sec-WebSocket-Version", v)])
            self.assert_refused(req, (426,), "version %s" % v, header=("sec-websocket-version", "13"))
        req, _ = self.req(omit=("Sec-WebSocket-Version",))
        self.assert_refused(req, (400, 426), "no version")
        self.check_canary()

    def test_headers_over_8k_431(self):
        self.start_canary()
        for what, hs in (("9 KiB in many headers", [("X-Pad-%d" % i, "a" * 900) for i in range(10)]),
                         ("one 9 KiB header", [("X-Pad", "b" * 9 * 1024)]),
                         ("64 KiB", [("X-Pad-%d" % i, "c" * 1000) for i in range(64)])):
            req, _ = self.req(headers=hs, app_key=self.env.app_key)
            self.assert_refused(req, (431, 400), what, prompt=False)
        # under the limit: upgraded
        req, key = self.req(headers=[("X-Pad-%d" % i, "d" * 500) for i in range(12)])
        ans, _ = self.exchange(req, until_close=False)
        self.assertEqual(ans.status, 101, "6 KiB of headers: %r" % ans)
        self.check_canary()

    def test_every_connection_answered_or_dropped_within_handshake_timeout(self):
        self.start_canary()
        req, _ = self.req()
        line = req.split(b"\r\n", 1)[0] + b"\r\n"
        sel = selectors.DefaultSelector()
        t0 = time.monotonic()
        socks = {}

        def opened(what, first=b""):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if first:
                s.sendall(first)
            s.setblocking(False)
            socks[s] = [what, time.monotonic(), None, b""]
            sel.register(s, selectors.EVENT_READ)
            return s

        opened("silent")
        opened("request line only", line)
        opened("half the headers", req[:len(req) // 2])
        opened("CONNECT line", b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: a\r\n" % self.port)
        opened("POST line", b"POST %s HTTP/1.1\r\n" % DEFAULT_PATH.encode())
        opened("one byte", b"G")
        slow = opened("slowloris", req[:1])
        sent = 1
        deadline = t0 + HANDSHAKE_TIMEOUT + 3.0
        while time.monotonic() < deadline and any(v[2] is None for v in socks.values()):
            # the slowloris keeps sending a byte every 200 ms (its request
            # would take ~40 s in all)
            if socks[slow][2] is None and sent < len(req) - 4 and \
                    time.monotonic() - t0 > sent * 0.2:
                try:
                    slow.send(req[sent:sent + 1])
                    sent += 1
                except OSError:
                    pass
            for key, _ in sel.select(0.05):
                s = key.fileobj
                v = socks[s]
                try:
                    chunk = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                v[3] += chunk
                if not chunk or b"\r\n\r\n" in v[3]:
                    v[2] = time.monotonic() - v[1]
                    sel.unregister(s)
        for s, (what, _, t, got) in socks.items():
            with self.subTest(case=what):
                self.assertFalse(got.startswith(b"HTTP/1.1 101"), "%s was upgraded" % what)
                self.assertIsNotNone(t, "%s neither answered nor dropped within %.1fs"
                                     % (what, HANDSHAKE_TIMEOUT + 3))
                self.assertLess(t, HANDSHAKE_TIMEOUT + 1.5, "%s held %.2fs" % (what, t))
            s.close()
        sel.close()
        self.check_canary()

    # ------------------------------------------------------------ permessage-deflate

    def exercise(self, d, what):
        """AUTH, then three POSTs of the same 2 KiB payload whose repeats
        are 700 bytes apart (a server that states a 2^9 window but uses a
        larger one is caught by the device's 2^9 inflater), and a GET."""
        code, _ = d.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS, what)
        block = os.urandom(700)
        data = block * 3
        for _ in range(3):
            rid = d.rid()
            d.send(ao_post(rid, d.session, data))
            code, chunks = d.answer(rid)
            self.assertEqual(code, SUCCESS, what)
            self.assertEqual(echoed_blob(chunks), ao_infotable_blob("data", data), what)
        self.assertEqual(d.get(), SUCCESS, what)

    def negotiate(self, offers, expect, what, default_window=None):
        """expect: an index among the permessage-deflate offers that must be
        the one accepted, None when the extension must be declined, or
        'any' when declining and accepting are both right."""
        with self.subTest(case=what):
            try:
                d = self.device(deflate=offers, accepted_offer=expect if isinstance(expect, int) else None,
                                check_window=True)
            except ConnectionError as e:
                self.fail("%s: handshake dropped: %s" % (what, e))
            if expect is None:
                self.assertIsNone(d.pmd, "%s: accepted %r" % (what, d.response.all("sec-websocket-extensions")))
            elif expect != "any":
                self.assertIsNotNone(d.pmd, "%s: declined" % what)
                if default_window is not None:
                    self.assertEqual(d.pmd["server_max_window_bits"], default_window,
                                     "%s: the server's window is not stated as %d: %r"
                                     % (what, default_window, d.pmd_params))
            self.exercise(d, what)
            d.close()
            return d

    def test_deflate_offers_accepted(self):
        self.start_canary()
        cases = [
            ("permessage-deflate", 0, "bare offer"),
            ("permessage-deflate; client_max_window_bits", 0, "client_max_window_bits without value"),
            ("permessage-deflate; client_max_window_bits=15", 0, "client_max_window_bits=15"),
            ("permessage-deflate; client_max_window_bits=9", 0, "client_max_window_bits=9"),
            ("permessage-deflate; server_no_context_takeover", 0, "server_no_context_takeover"),
            ("permessage-deflate; client_no_context_takeover", 0, "client_no_context_takeover"),
            ("permessage-deflate; server_max_window_bits=9", 0, "server_max_window_bits=9"),
            ("permessage-deflate; server_max_window_bits=15", 0, "server_max_window_bits=15"),
            ("permessage-deflate; server_max_window_bits=10", 0, "server_max_window_bits=10"),
            ("permessage-deflate; server_max_window_bits=8", "any", "server_max_window_bits=8"),
            ("permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
             "server_max_window_bits=12; client_max_window_bits", 0, "every parameter"),
            ("permessage-deflate;client_max_window_bits;server_max_window_bits=11", 0, "no spaces"),
            ('permessage-deflate; server_max_window_bits="9"', "any", "quoted value"),
        ]
        for offer, expect, what in cases:
            d = self.negotiate(offer, expect, what)
        # the bare offer states the server's small window (10 by default)
        self.negotiate("permessage-deflate", 0, "window stated", default_window=10)
        self.negotiate("permessage-deflate; client_max_window_bits", 0, "window stated (browser offer)",
                       default_window=10)
        self.check_canary()

    def test_deflate_offers_declined_or_next_taken(self):
        self.start_canary()
        declined = [
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=09",
            "permessage-deflate; server_max_window_bits=abc",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits=10; client_max_window_bits=11",
            "permessage-deflate; foo=bar",
            "permessage-deflate; x-unknown",
            "permessage-deflate; client_max_window_bits=" + "1" * 1000,
            "permessage-deflate; x=" + "a" * 1000,
            "permessage-deflate; " + "b" * 1000,
            "x-webkit-deflate-frame",
            "deflate-frame; no_context_takeover",
        ]
        for offer in declined:
            self.negotiate(offer, None, "declined: %s" % offer[:70])
        # several offers: the first acceptable one is taken
        multi = [
            (["permessage-deflate; server_max_window_bits=12, permessage-deflate; server_max_window_bits=9"],
             0, "two valid offers: the first"),
            (["permessage-deflate; server_max_window_bits=16, permessage-deflate; server_no_context_takeover"],
             1, "invalid then valid"),
            (["permessage-deflate; foo, permessage-deflate; x=" + "a" * 1000 + ", permessage-deflate; "
              "server_no_context_takeover"], 2, "two invalid then valid"),
            (["x-webkit-deflate-frame", "permessage-deflate; server_no_context_takeover"], 0,
             "unknown extension, then an offer in a second header line"),
            (["permessage-deflate; client_max_window_bits=7", "permessage-deflate; client_max_window_bits=9"],
             1, "invalid line then valid line"),
            (["permessage-deflate, permessage-deflate"], 0, "the same offer twice"),
        ]
        for offers, expect, what in multi:
            self.negotiate(offers, expect, what)
        self.check_canary()


if __name__ == "__main__":
    unittest.main()
