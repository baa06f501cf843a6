"""RFC 6455 §5 (and RFC 7692 §6.1) on the edge hop after the upgrade
(docs/protocol.md §5): every broken frame ends in a close frame with its
code that reaches the device before the TCP connection ends; valid close
codes are echoed; pings are answered; message size limits (after
inflation, and the smaller pre-AUTH limit) close 1009. A canary device
must keep working after each case. Frames are built by rfcdevice.py from
the RFC, not by the project's client."""

import struct
import time
import unittest

from harness import AUTH, GET, SUCCESS, ao_auth, ao_header, ao_request, ao_str
from rfcdevice import (OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RANDOM, ZERO_KEY,
                       EdgeSuite, close_payload, frame)

MAX_MESSAGE = 256 * 1024     # edge.max_message_size in this suite
MAX_PREAUTH = 4096           # edge.max_preauth_message (its default)


def auth_of_size(rid, key, size):
    """An AUTH of exactly `size` bytes: the appKey claim and a padding claim."""
    base = ao_header(AUTH, rid, 0, 0xFFFFFFFF) + b"\x02" + ao_str("appKey") + ao_str(key) + ao_str("pad")
    n = size - len(base) - 1
    if n >= 128:
        n -= 3
    msg = base + ao_str(b"p" * n)
    assert len(msg) == size, (len(msg), size)
    return msg


class Frames(EdgeSuite):
    EDGE = {"max_message_size": "256KiB"}

    def case(self, what, want, send, deflate=True, auth=True, timeout=3.0, **dev):
        """A new device (authenticated unless auth=False) does send(d);
        the server must answer with a close frame carrying `want` (a code
        or a tuple of acceptable codes), then end the TCP connection."""
        with self.subTest(case=what):
            d = self.authed(deflate=deflate, **dev) if auth else self.device(deflate=deflate, **dev)
            try:
                send(d)
                code = d.expect_close(timeout)
                if isinstance(want, tuple):
                    self.assertIn(code, want, what)
                else:
                    self.assertEqual(code, want, what)
                self.assertTrue(d.closed_after(3.0), "%s: TCP connection still open after the close handshake" % what)
            finally:
                d.close()
            self.check_canary(what)

    def test_masking(self):
        self.start_canary()
        # RFC 6455 §5.1: a server MUST close on an unmasked client frame
        self.case("unmasked binary frame", 1002,
                  lambda d: d.send_raw(frame(OP_BINARY, ao_request(GET, 5, d.session), mask=None)),
                  deflate=False)
        self.case("unmasked ping", 1002, lambda d: d.send_raw(frame(OP_PING, b"p", mask=None)))
        self.case("unmasked close", 1002, lambda d: d.send_raw(frame(OP_CLOSE, close_payload(1000), mask=None)))
        self.case("unmasked before AUTH", 1002,
                  lambda d: d.send_raw(frame(OP_BINARY, ao_auth(1, self.env.app_key), mask=None)), auth=False)
        # the SDK's all-zero key, and random keys, are accepted (with and without deflate)
        for what, mask, deflate in (("zero key", ZERO_KEY, False), ("zero key, deflate", ZERO_KEY, True),
                                    ("random keys", RANDOM, False), ("random keys, deflate", RANDOM, True)):
            with self.subTest(case=what):
                d = self.authed(deflate=deflate, mask=mask)
                for _ in range(3):
                    self.assertEqual(d.get(), SUCCESS, what)
                d.close()
        self.check_canary()

    def test_reserved_bits(self):
        self.start_canary()
        msg = lambda d: ao_request(GET, d.rid(), d.session)
        self.case("RSV1 without permessage-deflate", 1002,
                  lambda d: d.send_frame(OP_BINARY, msg(d), rsv1=True), deflate=False)
        self.case("RSV1 without permessage-deflate, before AUTH", 1002,
                  lambda d: d.send_frame(OP_BINARY, ao_auth(1, self.env.app_key), rsv1=True), deflate=False,
                  auth=False)
        for deflate in (False, True):
            self.case("RSV2 (deflate %s)" % deflate, 1002, lambda d: d.send_frame(OP_BINARY, msg(d), rsv2=True),
                      deflate=deflate)
            self.case("RSV3 (deflate %s)" % deflate, 1002, lambda d: d.send_frame(OP_BINARY, msg(d), rsv3=True),
                      deflate=deflate)
        self.case("RSV2 on a ping", 1002, lambda d: d.send_frame(OP_PING, b"x", rsv2=True))
        # RFC 7692 §6.1: never RSV1 on a control frame
        self.case("RSV1 on a ping (deflate agreed)", 1002, lambda d: d.send_frame(OP_PING, b"x", rsv1=True))
        self.case("RSV1 on a close (deflate agreed)", 1002,
                  lambda d: d.send_frame(OP_CLOSE, close_payload(1000), rsv1=True))

        # RSV1 on the continuation of an uncompressed message: RFC 7692 §6.1
        # (the SDK's habit of RSV1 on every frame applies to compressed
        # messages only, tested in test_edge_deflate)
        def cont_rsv1(d):
            m = msg(d)
            d.send_raw(d.frame(OP_BINARY, m[:10], fin=False) + d.frame(OP_CONT, m[10:], rsv1=True))
        self.case("RSV1 on the continuation of an uncompressed message", 1002, cont_rsv1)
        self.case("RSV2 on a continuation", 1002,
                  lambda d: d.send_raw(d.frame(OP_BINARY, msg(d)[:10], fin=False) +
                                       d.frame(OP_CONT, b"x" * 10, rsv2=True)))
        self.check_canary()

    def test_reserved_opcodes(self):
        self.start_canary()
        for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF):
            self.case("opcode 0x%X" % op, 1002, lambda d, op=op: d.send_frame(op, b"x" * 15))
        self.case("opcode 0xB, empty, before AUTH", 1002, lambda d: d.send_frame(0xB, b""), auth=False)
        self.check_canary()

    def test_control_frames(self):
        self.start_canary()
        for op, name in ((OP_PING, "ping"), (OP_PONG, "pong")):
            self.case("%s of 126 bytes" % name, 1002, lambda d, op=op: d.send_frame(op, b"p" * 126))
            self.case("%s of 65535 bytes" % name, 1002, lambda d, op=op: d.send_frame(op, b"p" * 65535))
            self.case("%s without FIN" % name, 1002, lambda d, op=op: d.send_frame(op, b"p", fin=False))
        self.case("close of 126 bytes", 1002,
                  lambda d: d.send_frame(OP_CLOSE, close_payload(1000, b"r" * 124)))
        self.case("close without FIN", 1002, lambda d: d.send_frame(OP_CLOSE, close_payload(1000), fin=False))
        # a control frame of 125 bytes is fine
        with self.subTest(case="ping of 125 bytes"):
            d = self.authed()
            d.send_frame(OP_PING, bytes(range(125)))
            self.assertTrue(d.poll(lambda: d.pongs, 3.0), "no pong")
            self.assertEqual(d.pongs, [bytes(range(125))])
            self.assertEqual(d.get(), SUCCESS)
            d.close()
        self.check_canary()

    def test_fragmentation_errors(self):
        self.start_canary()
        self.case("continuation without a start (FIN)", 1002, lambda d: d.send_frame(OP_CONT, b"x" * 15))
        self.case("continuation without a start (no FIN)", 1002,
                  lambda d: d.send_frame(OP_CONT, b"x" * 15, fin=False))
        self.case("continuation without a start, no deflate", 1002,
                  lambda d: d.send_frame(OP_CONT, b"x" * 15), deflate=False)
        self.case("continuation after a whole message", 1002,
                  lambda d: d.send_raw(d.frame(OP_BINARY, ao_request(GET, 90, d.session)) +
                                       d.frame(OP_CONT, b"x" * 15)))
        for op, name in ((OP_BINARY, "binary"), (OP_TEXT, "text")):
            self.case("%s frame inside a fragmented message" % name, 1002,
                      lambda d, op=op: d.send_raw(d.frame(OP_BINARY, b"x" * 5, fin=False) +
                                                  d.frame(op, b"y" * 15)), deflate=False)
        self.case("binary frame inside a fragmented compressed message", 1002,
                  lambda d: d.send_raw(d.frame(OP_BINARY, d.comp.compress(ao_request(GET, 91, d.session))[:4],
                                               fin=False, rsv1=True) + d.frame(OP_BINARY, b"y" * 15)))
        self.check_canary()

    def test_lengths(self):
        self.start_canary()

        def header_only(length, first=0x82):
            return lambda d: d.send_raw(struct.pack(">BBQ", first, 0x80 | 127, length) + b"\x01\x02\x03\x04")
        # RFC 6455 §5.2: the most significant bit of a 64-bit length MUST be 0
        self.case("64-bit length with the top bit set", 1002, header_only(0x8000000000000010))
        self.case("64-bit length 2^64-1", 1002, header_only(0xFFFFFFFFFFFFFFFF))
        self.case("64-bit length with the top bit set, before AUTH", 1002, header_only(1 << 63), auth=False)
        # over edge.max_message_size: refused at the header, no payload needed
        t0 = time.monotonic()
        self.case("a frame declaring 2^62 bytes", 1009, header_only(1 << 62), timeout=2.0)
        self.case("a frame declaring 2^62 bytes, no deflate", 1009, header_only(1 << 62), deflate=False,
                  timeout=2.0)
        self.case("a frame declaring max_message_size + 1", 1009, header_only(MAX_MESSAGE + 1), timeout=2.0)
        self.case("a frame declaring 2^62 bytes, before AUTH", 1009, header_only(1 << 62), auth=False, timeout=2.0)
        self.case("a continuation declaring 2^62 bytes", 1009,
                  lambda d: d.send_raw(d.frame(OP_BINARY, b"\x01\x01", fin=False) +
                                       struct.pack(">BBQ", 0x80, 0x80 | 127, 1 << 62) + b"\x01\x02\x03\x04"),
                  deflate=False, timeout=2.0)
        # a 16-bit and a 64-bit length holding a small message: legal, answered
        for form in (16, 64):
            with self.subTest(case="%d-bit length of a small message" % form):
                d = self.authed(deflate=False)
                rid = d.rid()
                d.send_raw(d.frame(OP_BINARY, ao_request(GET, rid, d.session), length_form=form))
                self.assertEqual(d.answer(rid)[0], SUCCESS)
                d.close()
        self.check_canary()

    def test_close_frames(self):
        self.start_canary()
        self.case("close with a 1-byte payload", 1002, lambda d: d.send_frame(OP_CLOSE, b"\x03"))
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535):
            self.case("close code %d" % code, 1002, lambda d, c=code: d.send_frame(OP_CLOSE, close_payload(c)))
        for reason in (b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"ok\xe2\x82", b"\xf4\x90\x80\x80"):
            self.case("close reason %r (not UTF-8)" % reason, 1007,
                      lambda d, r=reason: d.send_frame(OP_CLOSE, close_payload(1000, r)))
        for code in (1000, 1001, 1003, 1011, 3000, 4000, 4999):
            self.case("close code %d echoed" % code, code, lambda d, c=code: d.send_frame(OP_CLOSE, close_payload(c)))
        self.case("close 1000 with a UTF-8 reason", 1000,
                  lambda d: d.send_frame(OP_CLOSE, close_payload(1000, "fermé ✓".encode())))
        self.case("close code 1000 before AUTH", 1000, lambda d: d.send_frame(OP_CLOSE, close_payload(1000)),
                  auth=False)
        # an empty close: answered with a close frame (empty or 1000)
        self.case("empty close", (None, 1000), lambda d: d.send_frame(OP_CLOSE, b""))
        # a close inside a fragmented message is a control frame: handshake as usual
        self.case("close between fragments", 1000,
                  lambda d: d.send_raw(d.frame(OP_BINARY, d.comp.compress(b"\x01\x01")[:2], fin=False, rsv1=True) +
                                       d.frame(OP_CLOSE, close_payload(1000))))
        self.check_canary()

    def test_text_frames_1003(self):
        self.start_canary()
        self.case("text frame", 1003, lambda d: d.send_frame(OP_TEXT, b"06:44:02"), deflate=False)
        self.case("text frame, deflate agreed", 1003, lambda d: d.send_frame(OP_TEXT, b"06:44:02"))
        self.case("compressed text frame", 1003,
                  lambda d: d.send_raw(b"".join(d.message_frames(b"hello world", opcode=OP_TEXT))))
        self.case("fragmented text message", 1003,
                  lambda d: d.send_raw(d.frame(OP_TEXT, b"hello ", fin=False) + d.frame(OP_CONT, b"world")),
                  deflate=False)
        self.case("text frame before AUTH", 1003, lambda d: d.send_frame(OP_TEXT, b"{}"), auth=False)
        self.check_canary()

    def test_pings(self):
        self.start_canary()
        for what, payload, auth in (("empty ping", b"", True), ("1-byte ping", b"\x00", True),
                                    ("125-byte ping", bytes(range(125)), True),
                                    ("binary ping", b"\xff\x00\xfe\x80", True),
                                    ("ping before AUTH", b"06:44:02", False)):
            with self.subTest(case=what):
                d = self.authed() if auth else self.device(deflate=True)
                d.send_frame(OP_PING, payload)
                self.assertTrue(d.poll(lambda: d.pongs, 3.0), "%s: no pong" % what)
                self.assertEqual(d.pongs, [payload], what)
                d.close()
        # an unsolicited pong is ignored
        d = self.authed()
        d.send_frame(OP_PONG, b"unsolicited")
        self.assertEqual(d.get(), SUCCESS)
        # every ping a device waits for is answered: 50 pings, one at a time
        for i in range(50):
            d.send_frame(OP_PING, b"%d" % i)
            self.assertTrue(d.poll(lambda: len(d.pongs) == i + 1, 3.0), "ping %d unanswered" % i)
        self.assertEqual(d.pongs, [b"%d" % i for i in range(50)])
        d.close()
        self.check_canary()

    def test_ping_flood(self):
        self.start_canary()
        d = self.authed()
        n = 10000
        flood = b"".join(d.frame(OP_PING, b"%05d" % i) for i in range(n))
        t0 = time.monotonic()
        self.assertTrue(d.send_raw(flood), "the server closed during the ping flood")
        last = b"%05d" % (n - 1)
        self.assertTrue(d.poll(lambda: last in d.pongs, 20.0),
                        "the last of %d pings was not answered (%d pongs)" % (n, len(d.pongs)))
        # pongs answer pings in order, each with its own payload
        idx = [int(p) for p in d.pongs]
        self.assertEqual(idx, sorted(idx), "pongs out of order")
        self.assertTrue(set(d.pongs) <= {b"%05d" % i for i in range(n)})
        print("\n%d pings: %d pongs in %.2fs" % (n, len(d.pongs), time.monotonic() - t0))
        for _ in range(3):
            self.assertEqual(d.get(), SUCCESS)
        d.close()
        self.check_canary()

    def test_control_frames_inside_fragmented_messages(self):
        self.start_canary()
        for deflate in (False, True):
            with self.subTest(deflate=deflate):
                d = self.authed(deflate=deflate)
                rid = d.rid()
                msg = ao_request(GET, rid, d.session)
                payload = d.comp.compress(msg) if deflate else msg
                cut = [2, 5, len(payload) - 1]
                parts = [payload[:cut[0]], payload[cut[0]:cut[1]], payload[cut[1]:cut[2]], payload[cut[2]:]]
                d.send_raw(d.frame(OP_BINARY, parts[0], fin=False, rsv1=deflate) +
                           d.frame(OP_PING, b"between-1") +
                           d.frame(OP_CONT, parts[1], fin=False) +
                           d.frame(OP_PONG, b"unsolicited") +
                           d.frame(OP_CONT, parts[2], fin=False) +
                           d.frame(OP_PING, b"between-2") +
                           d.frame(OP_CONT, parts[3], fin=True))
                self.assertEqual(d.answer(rid)[0], SUCCESS)
                # RFC 6455 §5.5.3: the most recent ping is answered (an
                # earlier one may be left out when both arrive together)
                self.assertTrue(d.poll(lambda: b"between-2" in d.pongs, 3.0), "pongs: %r" % d.pongs)
                self.assertTrue(set(d.pongs) <= {b"between-1", b"between-2"}, d.pongs)
                self.assertEqual(d.get(), SUCCESS)
                d.close()
        self.check_canary()

    def test_message_size_limits(self):
        self.start_canary()
        over = ao_request(GET, 50, 0) + b"\x00" * MAX_MESSAGE
        self.case("one frame over max_message_size", 1009, lambda d: d.send(over, compress=False))
        self.case("fragments over max_message_size", 1009,
                  lambda d: d.send(over, compress=False, frag=16384))
        # after inflation: ~300 bytes on the wire
        self.case("compressed message inflating over max_message_size", 1009, lambda d: d.send(over))
        self.case("compressed fragments inflating over max_message_size", 1009,
                  lambda d: d.send(over, frag=64))
        self.case("compressed, RSV1 on every frame, over max_message_size", 1009,
                  lambda d: d.send(over, frag=64, rsv1_on_continuation=True))
        # exactly max_message_size is accepted (answered: 0x80 for its body, or 0x40)
        with self.subTest(case="a message of exactly max_message_size"):
            d = self.authed()
            rid = d.rid()
            m = ao_request(GET, rid, d.session)
            d.send(m + b"\x00" * (MAX_MESSAGE - len(m)))
            code, _ = d.answer(rid)
            self.assertIn(code, (0x80, SUCCESS))
            self.assertEqual(d.get(), SUCCESS)
            d.close()
        self.check_canary()

    def test_preauth_message_limit(self):
        self.start_canary()
        key = self.env.app_key
        # up to max_preauth_message an AUTH is an AUTH (an SDK's is ~60 bytes)
        for deflate in (False, True):
            with self.subTest(case="AUTH of %d bytes, deflate %s" % (MAX_PREAUTH, deflate)):
                d = self.device(deflate=deflate)
                d.send(auth_of_size(1, key, MAX_PREAUTH))
                code = d.answer(1)[0]
                self.assertEqual(code, SUCCESS)
                d.session = 0
                d.close()
        big = auth_of_size(1, key, MAX_PREAUTH + 1)
        self.case("AUTH of max_preauth_message + 1 bytes", 1009, lambda d: d.send(big, compress=False),
                  auth=False, deflate=False)
        self.case("compressed AUTH inflating past max_preauth_message", 1009, lambda d: d.send(big), auth=False)
        self.case("AUTH in fragments past max_preauth_message", 1009,
                  lambda d: d.send(big, compress=False, frag=1000), auth=False)
        self.case("compressed AUTH in fragments past max_preauth_message", 1009,
                  lambda d: d.send(big, frag=10), auth=False)
        self.case("64 KiB before AUTH", 1009, lambda d: d.send(b"\x01" * 65536, compress=False), auth=False)
        self.case("frame header declaring 64 KiB before AUTH", 1009,
                  lambda d: d.send_raw(struct.pack(">BBH", 0x82, 0x80 | 126, 65535) + b"\x00\x00\x00\x00"),
                  auth=False, timeout=2.0)
        # after AUTH the larger limit applies
        with self.subTest(case="64 KiB after AUTH"):
            d = self.authed()
            rid = d.rid()
            m = ao_request(GET, rid, d.session)
            d.send(m + b"\x00" * 65536)
            self.assertIn(d.answer(rid)[0], (0x80, SUCCESS))
            d.close()
        self.check_canary()

    def test_invalid_deflate_data(self):
        self.start_canary()
        # RFC 7692 §8: data that does not inflate fails the connection: a
        # close frame (1007, invalid data, or 1002), never a crash
        for what, payload in (("reserved block type", b"\xff\xff\xff\xff"),
                              ("stored block with a bad length", b"\x00\x05\x00\x00\x00hello"),
                              # the second "Hello" of RFC 7692 §7.2.3.2 sent first:
                              # its match points before the start of the stream
                              ("distance too far back", bytes.fromhex("f200110000"))):
            self.case("RSV1 with %s" % what, (1002, 1007),
                      lambda d, p=payload: d.send_frame(OP_BINARY, p, rsv1=True))
        self.check_canary()


if __name__ == "__main__":
    unittest.main()
