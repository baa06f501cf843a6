"""permessage-deflate on the edge hop, RFC 7692 §7.2 (docs/protocol.md §4,
§5): compressed messages from a device written from the RFC, with Python's
own zlib, are all answered right: context takeover both ways, bursts of
identical messages in flight, messages split at every byte (small) or at
random places (large, multipart), RSV1 on continuation frames (the C
SDK's habit), empty and BFINAL messages, and the byte streams of issue 11
(the 130-byte abort stream before AUTH, POSTs of zeros). platform-sim
echoes a request's params, so every answer's content is checked. A canary
device keeps working throughout."""

import random
import time
import unittest

from harness import GET, POST, PUT, SUCCESS, ao_infotable_blob, ao_multipart_request, ao_request
from rfcdevice import (OP_BINARY, OP_CONT, ZERO_KEY, Compressor, Decompressor,
                       TAIL, EdgeSuite, ServerViolation, accept_for, ao_post, deflate_max_distance,
                       echoed_blob, frame)


def mixed(rng, n):
    """n bytes of random, repeated, zero and text runs."""
    out = bytearray()
    words = [b"Temperature", b"SteamSensor", b"value", b"42.5", b"true", b"\x00\x01\x02"]
    while len(out) < n:
        kind = rng.randrange(4)
        k = rng.randrange(1, 600)
        if kind == 0:
            out += rng.randbytes(k)
        elif kind == 1 and out:
            start = rng.randrange(len(out))
            out += bytes(out[start:start + k])
        elif kind == 2:
            out += bytes(k)
        else:
            out += b" ".join(rng.choice(words) for _ in range(k // 8 + 1))
    return bytes(out[:n])


class SelfCheck(unittest.TestCase):
    """The device against the RFCs' own examples (no server)."""

    def test_rfc_examples(self):
        self.assertEqual(accept_for("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")  # 6455 §1.3
        # RFC 6455 §5.7: a masked text frame "Hello"
        self.assertEqual(frame(0x1, b"Hello", mask=bytes.fromhex("37fa213d")).hex(), "818537fa213d7f9f4d5158")
        self.assertEqual(frame(0x1, b"Hello", mask=None).hex(), "810548656c6c6f")
        # RFC 7692 §7.2.3.1 and §7.2.3.2: "Hello" twice with a shared window
        c = Compressor(15)
        self.assertEqual(frame(0x1, c.compress(b"Hello"), rsv1=True, mask=None).hex(), "c107f248cdc9c90700")
        self.assertEqual(frame(0x1, c.compress(b"Hello"), rsv1=True, mask=None).hex(), "c105f200110000")
        self.assertEqual(frame(OP_BINARY, Compressor(15).compress(b"Hello"), rsv1=True, mask=None).hex(),
                         "c207f248cdc9c90700")
        d = Decompressor(15)
        self.assertEqual(d.decompress(bytes.fromhex("f248cdc9c90700")), b"Hello")
        self.assertEqual(d.decompress(bytes.fromhex("f200110000")), b"Hello")
        for hexs in ("000500faff48656c6c6f00",        # §7.2.3.3 no compression
                     "f348cdc9c9070000",              # §7.2.3.4 BFINAL set
                     "f24805000000ffffcac9c90700"):   # §7.2.3.5 two DEFLATE blocks
            self.assertEqual(Decompressor(15).decompress(bytes.fromhex(hexs)), b"Hello", hexs)
        self.assertEqual(Decompressor(15).decompress(b"\x00"), b"")  # §7.2.3.6 empty
        # no context takeover: each message inflates alone
        c = Compressor(15, no_context_takeover=True)
        d = Decompressor(15, no_context_takeover=True)
        for _ in range(3):
            self.assertEqual(d.decompress(c.compress(b"Hello Hello Hello")), b"Hello Hello Hello")
        # the window check: repeats 700 bytes apart use distance 700 with a
        # 2^10 window and cannot with 2^9
        rnd = random.Random(1).randbytes(700) * 3
        self.assertEqual(deflate_max_distance(Compressor(10).compress(rnd) + TAIL), 700)
        self.assertLessEqual(deflate_max_distance(Compressor(9).compress(rnd) + TAIL), 512)
        self.assertEqual(deflate_max_distance(bytes.fromhex("f200110000") + TAIL), 5)
        with self.assertRaises(ValueError):
            deflate_max_distance(b"\xff\xff" + TAIL)
        # across messages, zlib does check: a 2^9 inflater refuses a
        # reference 700 bytes back into the previous message
        c, d = Compressor(10), Decompressor(9)
        d.decompress(c.compress(rnd[:700]))
        with self.assertRaises(ServerViolation):
            d.decompress(c.compress(rnd[:700]))


class Deflate(EdgeSuite):

    def post_echo(self, d, data, code=POST, **send):
        """A request carrying data, checked against platform-sim's echo."""
        rid = d.rid()
        d.send(ao_post(rid, d.session, data, code=code), **send)
        acode, chunks = d.answer(rid, timeout=10.0)
        self.assertEqual(acode, SUCCESS)
        self.assertEqual(echoed_blob(chunks), ao_infotable_blob("data", data), "echo differs")

    def multipart_echo(self, d, data, chunk_size=8192, code=PUT, frag=None, cuts=None, rng=None, timeout=20.0,
                       rsv1_on_continuation=None):
        """A multipart request whose BLOB is data; every chunk a compressed
        message; frag / cuts per chunk (callables of the frame bytes when
        rng is used)."""
        rid = d.rid()
        chunks = ao_multipart_request(code, rid, d.session, 1, chunk_size=chunk_size, fill=data)
        for c in chunks:
            f = frag(c) if callable(frag) else frag
            frames = b"".join(d.message_frames(c, frag=f, rsv1_on_continuation=rsv1_on_continuation))
            k = cuts(frames) if callable(cuts) else cuts
            self.assertTrue(d.send_raw(frames, cuts=k), "the server closed while a chunk was sent")
        acode, answer = d.answer(rid, timeout=timeout)
        self.assertEqual(acode, SUCCESS)
        self.assertEqual(echoed_blob(answer), ao_infotable_blob("data", data), "multipart echo differs")
        return len(chunks)

    # ------------------------------------------------------------ context takeover

    def test_context_takeover_both_ways(self):
        self.start_canary()
        d = self.authed(deflate="permessage-deflate", check_window=True)
        self.assertFalse(d.pmd["client_no_context_takeover"])
        rng = random.Random(7)
        data = mixed(rng, 2048)
        sizes = []
        for _ in range(10):
            sizes.append(len(d.comp.compress(ao_post(1, d.session, data))))
        # our own compressor refers back to earlier messages: later copies are tiny
        self.assertLess(sizes[-1], sizes[0] // 4, sizes)
        d.comp = Compressor(d.pmd["client_max_window_bits"] or 15)  # fresh again for the server
        d.wire_sizes.clear()
        for _ in range(10):
            self.post_echo(d, data)
        if not d.pmd["server_no_context_takeover"]:
            wire = [n for c, n in d.wire_sizes if c]
            print("\nanswers on the wire (server context takeover): %r" % wire)
        for _ in range(20):
            self.post_echo(d, mixed(rng, rng.randrange(1, 6000)))
        self.check_canary()

    def test_bursts_of_identical_requests(self):
        self.start_canary()
        rng = random.Random(11)
        for offer in ("permessage-deflate", "permessage-deflate; client_max_window_bits",
                      "permessage-deflate; server_no_context_takeover",
                      "permessage-deflate; client_no_context_takeover",
                      "permessage-deflate; server_max_window_bits=9"):
            with self.subTest(offer=offer):
                d = self.authed(deflate=offer, check_window=True)
                for burst in range(5):
                    data = mixed(rng, 2048 - 60)
                    rids = [d.rid() for _ in range(20)]
                    wire = b"".join(b"".join(d.message_frames(ao_post(r, d.session, data))) for r in rids)
                    self.assertTrue(d.send_raw(wire), "closed during the burst")
                    for r in rids:
                        code, chunks = d.answer(r, timeout=10.0)
                        self.assertEqual(code, SUCCESS, "burst %d" % burst)
                        self.assertEqual(echoed_blob(chunks), ao_infotable_blob("data", data))
                d.close()
        self.check_canary()

    def test_server_no_context_takeover(self):
        # every compressed answer inflates with a fresh inflater (Device does so when agreed)
        self.start_canary()
        d = self.authed(deflate="permessage-deflate; server_no_context_takeover", check_window=True)
        self.assertTrue(d.pmd["server_no_context_takeover"])
        data = random.Random(3).randbytes(300) * 6
        for _ in range(10):
            self.post_echo(d, data)
        self.assertGreater(sum(1 for c, _ in d.wire_sizes if c), 5, "no compressed answers to check")
        self.check_canary()

    # ------------------------------------------------------------ split anywhere

    def test_small_messages_split_at_every_byte(self):
        """Each kind of small message, compressed, is written as two TCP
        writes cut at every offset of its frame, and its compressed payload
        is cut into two frames at every offset (RSV1 on the first frame
        only, RFC 7692, and on both, the SDK). With the compressor reset
        per message (valid in either mode: no back-references) the frames
        keep their length, so every offset is covered; with context
        takeover repeated content shrinks, and the cuts go as far as the
        frames reach (fresh random content keeps its length)."""
        self.start_canary()
        rng = random.Random(5)
        kinds = {"GET": lambda: None, "random 60": lambda: rng.randbytes(60),
                 "repeated 400": lambda: b"abcdefgh" * 50, "zeros 300": lambda: bytes(300),
                 "mixed 200": lambda: mixed(rng, 200)}
        for what, make in kinds.items():
            for takeover in (False, True):
                with self.subTest(payload=what, context_takeover=takeover):
                    d = self.authed()
                    if not takeover:
                        d.comp = Compressor(d.pmd["client_max_window_bits"] or 15, no_context_takeover=True)
                    # (every message compressed is sent: the server's
                    # inflater follows the device's compressor)
                    k = 1
                    while True:
                        rid = d.rid()
                        data = make()
                        msg = ao_request(GET, rid, d.session) if data is None else ao_post(rid, d.session, data)
                        wire = b"".join(d.message_frames(msg))
                        # two TCP writes, cut at k, arriving apart
                        self.assertTrue(d.send_raw(wire, cuts=[k], delay=0.002), "closed at cut %d" % k)
                        code, chunks = d.answer(rid)
                        self.assertEqual(code, SUCCESS, "%s cut at %d" % (what, k))
                        if data is not None:
                            self.assertEqual(echoed_blob(chunks), ao_infotable_blob("data", data))
                        if k >= len(wire) - 1:
                            break
                        k += 1
                    tcp_cuts = k
                    for sdk in (False, True):
                        k = 1
                        while True:
                            rid = d.rid()
                            data = make()
                            msg = ao_request(GET, rid, d.session) if data is None else ao_post(rid, d.session, data)
                            payload = d.comp.compress(msg)
                            c = min(k, len(payload))  # the second frame may be empty
                            wire = (d.frame(OP_BINARY, payload[:c], fin=False, rsv1=True) +
                                    d.frame(OP_CONT, payload[c:], rsv1=sdk))
                            self.assertTrue(d.send_raw(wire), "closed at fragment cut %d" % k)
                            code, _ = d.answer(rid)
                            self.assertEqual(code, SUCCESS, "%s fragments cut at %d (SDK %s)" % (what, k, sdk))
                            if k >= len(payload):
                                break
                            k += 1
                    if not takeover:
                        self.assertGreater(tcp_cuts, 15, "%s: frames too short to mean anything" % what)
                    print("\n%s, context takeover %s: TCP cuts 1..%d, fragment cuts 1..%d"
                          % (what, takeover, tcp_cuts, k))
                    d.close()
        self.check_canary()

    def test_small_multipart_split_at_every_byte(self):
        self.start_canary()
        d = self.authed()
        data = mixed(random.Random(9), 300)
        k = 1
        longest = 1
        while k < longest or k == 1:
            rid = d.rid()
            chunks = ao_multipart_request(PUT, rid, d.session, 1, chunk_size=100, fill=data)
            for c in chunks:
                wire = b"".join(d.message_frames(c))
                longest = max(longest, len(wire))
                self.assertTrue(d.send_raw(wire, cuts=[k], delay=0.001), "closed at cut %d" % k)
            code, answer = d.answer(rid)
            self.assertEqual(code, SUCCESS, "cut at %d" % k)
            self.assertEqual(echoed_blob(answer), ao_infotable_blob("data", data))
            k += 1
        self.check_canary()

    def test_large_messages_split_at_random(self):
        self.start_canary()
        rng = random.Random(13)
        rand_frag = lambda payload_len: lambda c: sorted(rng.randrange(1, 8192) for _ in range(rng.randrange(0, 6)))
        rand_cuts = lambda b: sorted(rng.randrange(1, max(2, len(b))) for _ in range(rng.randrange(0, 20)))
        for sdk in (False, True):
            with self.subTest(rsv1_on_continuation=sdk):
                d = self.authed(rsv1_on_continuation=sdk)
                for i in range(6):
                    data = mixed(rng, 48 * 1024)
                    n = self.multipart_echo(d, data, frag=rand_frag(0), cuts=rand_cuts)
                    self.assertGreater(n, 5)
                # one large single message (not multipart), fragmented at random
                data = mixed(rng, 200 * 1024)
                rid = d.rid()
                msg = ao_post(rid, d.session, data)
                payload_frames = d.message_frames(msg, frag=sorted(rng.randrange(1, 60000) for _ in range(12)))
                wire = b"".join(payload_frames)
                self.assertTrue(d.send_raw(wire, cuts=rand_cuts(wire)))
                code, chunks = d.answer(rid, timeout=10.0)
                self.assertEqual(code, SUCCESS)
                self.assertEqual(echoed_blob(chunks), ao_infotable_blob("data", data))
                # 1 MiB multipart
                t0 = time.monotonic()
                n = self.multipart_echo(d, mixed(rng, 1 << 20), frag=rand_frag(0), cuts=rand_cuts, timeout=30.0)
                self.assertGreater(n, 120)
                print("\n1 MiB multipart (%d chunks) echoed in %.2fs" % (n, time.monotonic() - t0))
                d.close()
        self.check_canary()

    def test_rsv1_on_every_frame_sdk_style(self):
        self.start_canary()
        d = self.authed(rsv1_on_continuation=True, mask=ZERO_KEY)
        rng = random.Random(17)
        for size in (10, 100, 1000, 5000, 20000):
            for frag in (1, 7, 100, 4096):
                self.post_echo(d, mixed(rng, size), frag=frag)
        self.check_canary()

    def test_answers_keep_to_max_frame_size(self):
        # docs/protocol.md §4: no frame to a device over its Max-Frame-Size
        # (fragmenting after compression), no 64-bit length; the device
        # raises ServerViolation on either
        self.start_canary()
        rng = random.Random(29)
        for mfs in (1024, 4096, 8192):
            for deflate in (True, None):
                with self.subTest(max_frame_size=mfs, deflate=deflate):
                    d = self.authed(deflate=deflate, max_frame_size=mfs)
                    self.post_echo(d, rng.randbytes(6000))
                    self.post_echo(d, mixed(rng, 7000))
                    self.multipart_echo(d, mixed(rng, 48 * 1024))
                    d.close()
        self.check_canary()

    # ------------------------------------------------------------ odd but valid

    def test_empty_compressed_messages(self):
        self.start_canary()
        # an empty message (compressed as nothing, or as RFC 7692 §7.2.3.6's
        # single 00 byte) is an empty AlwaysOn message: close 1007
        for what, wire in (("empty payload", lambda d: d.frame(OP_BINARY, b"", rsv1=True)),
                           ("00", lambda d: d.frame(OP_BINARY, b"\x00", rsv1=True)),
                           ("empty, in two frames", lambda d: d.frame(OP_BINARY, b"", fin=False, rsv1=True) +
                            d.frame(OP_CONT, b"")),
                           ("compressed empty, our compressor", lambda d: d.frame(OP_BINARY, d.comp.compress(b""),
                                                                               rsv1=True))):
            with self.subTest(case=what):
                d = self.authed()
                d.send_raw(wire(d))
                self.assertEqual(d.expect_close(), 1007, what)
                d.close()
                self.check_canary(what)
        # empty frames inside a compressed message, and empty compressed
        # frames between messages in the compressor's stream, are fine
        d = self.authed()
        rid = d.rid()
        payload = d.comp.compress(ao_request(GET, rid, d.session))
        d.send_raw(d.frame(OP_BINARY, b"", fin=False, rsv1=True) + d.frame(OP_CONT, payload[:3], fin=False) +
                   d.frame(OP_CONT, b"", fin=False) + d.frame(OP_CONT, payload[3:], fin=False) +
                   d.frame(OP_CONT, b""))
        self.assertEqual(d.answer(rid)[0], SUCCESS)
        self.assertEqual(d.get(), SUCCESS)
        # an uncompressed message between compressed ones (RSV1 clear) is fine
        self.assertEqual(d.get(compress=False), SUCCESS)
        self.assertEqual(d.get(), SUCCESS)
        self.check_canary()

    def test_bfinal_message_without_client_context(self):
        # RFC 7692 §7.2.3.4: a message may end with a BFINAL block. Only
        # where client_no_context_takeover is agreed (each message a new
        # stream for the server).
        self.start_canary()
        d = self.authed(deflate="permessage-deflate; client_no_context_takeover")
        if not d.pmd["client_no_context_takeover"]:
            self.skipTest("client_no_context_takeover not in the response")
        for _ in range(5):
            rid = d.rid()
            d.send_raw(d.frame(OP_BINARY, d.comp.compress_final(ao_request(GET, rid, d.session)), rsv1=True))
            self.assertEqual(d.answer(rid)[0], SUCCESS)
        self.assertEqual(d.get(), SUCCESS)
        self.check_canary()

    # ------------------------------------------------------------ issue 11

    def abort_stream(self, d, chunk_size=4096, total=12000):
        chunks = ao_multipart_request(PUT, 1, 0, total, chunk_size=chunk_size, fill=b"\x00")[:3]
        return b"".join(b"".join(d.message_frames(c)) for c in chunks)

    def test_issue11_abort_stream_before_auth(self):
        self.start_canary()
        rng = random.Random(19)
        for i in range(12):
            size = 4096 if i == 0 else rng.randrange(500, 8192)
            with self.subTest(chunk_size=size):
                d = self.device(deflate=True)
                wire = self.abort_stream(d, chunk_size=size, total=size * 3)
                if i == 0:
                    print("\nabort stream: %d bytes" % len(wire))
                    self.assertLess(len(wire), 200)
                d.send_raw(wire)
                # AUTH first: closed (1008, or 1009 for its size), the process lives
                self.assertIn(d.expect_close(), (1008, 1009))
                d.close()
                self.check_canary("after the abort stream")
        # another device still works
        d = self.authed()
        self.assertEqual(d.get(), SUCCESS)
        self.check_canary()

    def test_issue11_posts_of_zeros(self):
        self.start_canary()
        d = self.authed()
        for _ in range(2):
            self.post_echo(d, bytes(16384))
        self.check_canary("after two POSTs of 16 KiB of zeros")
        rng = random.Random(23)
        sizes = [rng.choice((rng.randrange(0, 100), rng.randrange(0, 20000), rng.randrange(0, 70000)))
                 for _ in range(200)]
        # in groups of 10 in flight
        for g in range(0, 200, 10):
            rids = []
            wire = b""
            for n in sizes[g:g + 10]:
                rid = d.rid()
                rids.append((rid, n))
                wire += b"".join(d.message_frames(ao_post(rid, d.session, bytes(n))))
            self.assertTrue(d.send_raw(wire))
            for rid, n in rids:
                code, chunks = d.answer(rid, timeout=10.0)
                self.assertEqual(code, SUCCESS, "POST of %d zeros" % n)
                self.assertEqual(echoed_blob(chunks), ao_infotable_blob("data", bytes(n)))
        self.check_canary()


if __name__ == "__main__":
    unittest.main()
