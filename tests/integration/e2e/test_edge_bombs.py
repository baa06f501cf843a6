"""Compression bombs and pre-AUTH memory on the edge hop (issue 11 items 3
and 6; docs/protocol.md §5): inflation is bounded by edge.max_message_size
(edge.max_preauth_message before AUTH), the device receives a close frame
1009, and edgemux spends next to no CPU or memory on it. CPU is utime +
stime of /proc/PID/stat, memory VmRSS / VmHWM of /proc/PID/status."""

import struct
import time
import unittest
import zlib

from harness import AUTH, POST, ao_header, ao_str
from rfcdevice import OP_BINARY, OP_CONT, EdgeSuite, bomb_stream, sanitized_binary

GIB = 1 << 30
# The figures hold for the release build; under AddressSanitizer (the
# sanitizer tier) CPU and memory are inflated by the sanitizer itself, so
# its bounds are three times these: still far below what an unbounded
# inflater costs (seconds of CPU, hundreds of MiB).
SLACK = 3 if sanitized_binary() else 1
CPU_BUDGET = 0.1 * SLACK  # seconds of edgemux CPU per bomb
RSS_BUDGET_KIB = 16 * 1024 * SLACK  # RSS growth for the 200 pre-AUTH connections


def preauth_prefix():
    """An AUTH header and a claim whose value is declared 1 GiB long."""
    return (ao_header(AUTH, 1, 0, 0xFFFFFFFF) + b"\x01" + ao_str("appKey") +
            struct.pack(">I", 0x80000000 | GIB))


def post_prefix(rid, session):
    """A POST whose params are a BLOB InfoTable declared 1 GiB long."""
    return (ao_header(POST, rid, 0, session) + b"\x0A" + ao_str("SteamSensor") + b"\x01" + ao_str("Echo") +
            b"\x00\x05" + b"\x01" + ao_str("data") + ao_str("") + bytes([21]) + b"\x00\x00\x00" +
            b"\x01\x00\x01" + bytes([21]) + struct.pack(">I", GIB))


_BOMBS = {}


def bomb(prefix):
    if prefix not in _BOMBS:
        _BOMBS[prefix] = bomb_stream(prefix, GIB)
    return _BOMBS[prefix]


class Bombs(EdgeSuite):
    EDGE = {}  # edge.max_message_size 2 MiB, edge.max_preauth_message 4 KiB (defaults)

    def frames(self, d, stream, frag):
        """The bomb as one compressed message: one frame, or frames of
        `frag` bytes (with RSV1 on each, like the SDK, when sdk)."""
        if frag is None:
            return d.frame(OP_BINARY, stream, rsv1=True)
        out = []
        for i in range(0, len(stream), frag):
            first, last = i == 0, i + frag >= len(stream)
            out.append(d.frame(OP_BINARY if first else OP_CONT, stream[i:i + frag], fin=last, rsv1=first))
        return b"".join(out)

    def settle_cpu(self, cpu0):
        """edgemux CPU since cpu0, read after a pause so a process still
        inflating is caught."""
        time.sleep(0.5)
        return self.cpu() - cpu0

    def test_bomb_before_auth(self):
        self.start_canary()
        for what, frag in (("one frame", None), ("64 KiB frames", 65536), ("8 KiB frames", 8192)):
            with self.subTest(case=what):
                d = self.device(deflate=True)
                stream = bomb(preauth_prefix())
                wire = self.frames(d, stream, frag)
                cpu0 = self.cpu()
                d.send_raw(wire)
                code = d.expect_close(10.0)
                cpu = self.settle_cpu(cpu0)
                print("\nbomb before AUTH, %s: %d bytes on the wire, close %s, edgemux CPU %.3fs"
                      % (what, len(wire), code, cpu))
                self.assertEqual(code, 1009)
                self.assertLess(cpu, CPU_BUDGET)
                d.close()
                self.check_canary("after a bomb before AUTH")

    def test_bomb_after_auth(self):
        self.start_canary()
        for what, frag in (("one frame", None), ("64 KiB frames", 65536), ("8 KiB frames", 8192)):
            with self.subTest(case=what):
                d = self.authed()
                stream = bomb(post_prefix(2, d.session))
                wire = self.frames(d, stream, frag)
                cpu0 = self.cpu()
                d.send_raw(wire)
                code = d.expect_close(10.0)
                cpu = self.settle_cpu(cpu0)
                print("\nbomb after AUTH, %s: %d bytes on the wire, close %s, edgemux CPU %.3fs"
                      % (what, len(wire), code, cpu))
                self.assertEqual(code, 1009)
                self.assertLess(cpu, CPU_BUDGET)
                d.close()
                self.check_canary("after a bomb after AUTH")

    def test_eight_bombs_at_once(self):
        self.start_canary()
        devs = [self.authed() for _ in range(8)]
        wires = [self.frames(d, bomb(post_prefix(2, d.session)), 65536) for d in devs]
        cpu0 = self.cpu()
        # interleave the eight streams in 64 KiB writes
        pos = [0] * 8
        live = set(range(8))
        while live:
            for i in list(live):
                chunk = wires[i][pos[i]:pos[i] + 65536]
                if not chunk or not devs[i].send_raw(chunk):
                    live.discard(i)
                pos[i] += len(chunk)
        deadline = time.monotonic() + 15.0
        codes = []
        for d in devs:
            try:
                codes.append(d.expect_close(max(0.05, deadline - time.monotonic())))
            except AssertionError as e:
                codes.append(str(e))
        cpu = self.settle_cpu(cpu0)
        print("\neight bombs: closes %r, edgemux CPU %.3fs" % (codes, cpu))
        self.assertEqual(codes, [1009] * 8)
        self.assertLess(cpu, 8 * CPU_BUDGET)
        for d in devs:
            d.close()
        self.check_canary()

    def test_preauth_memory_200_connections(self):
        """Issue 11 item 3: 200 connections each send one non-final
        compressed frame of ~2 KiB that inflates to ~2 MiB: every one is
        closed 1009 and RSS grows by at most 16 MiB."""
        self.start_canary()
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        head = ao_header(AUTH, 1, 0, 0xFFFFFFFF) + b"\x01" + ao_str("appKey") + struct.pack(">I", 0x80000000 | GIB)
        payload = c.compress(head + bytes(2 << 20)) + c.flush(zlib.Z_SYNC_FLUSH)
        self.assertLess(len(payload), 2300)
        self.assertEqual(len(zlib.decompressobj(-15).decompress(payload)), len(head) + (2 << 20))
        time.sleep(0.2)
        rss0, hwm0 = self.rss_kib(), self.hwm_kib()
        devs = [self.device(deflate=True) for _ in range(200)]
        samples = [self.rss_kib()]
        for i, d in enumerate(devs):
            d.send_raw(d.frame(OP_BINARY, payload, fin=False, rsv1=True))
            if i % 10 == 9:
                samples.append(self.rss_kib())
        deadline = time.monotonic() + 10.0
        codes = {}
        for d in devs:
            try:
                code = d.expect_close(max(0.05, deadline - time.monotonic()))
            except AssertionError as e:
                code = "none (%s)" % str(e)[:40]
            codes[code] = codes.get(code, 0) + 1
            samples.append(self.rss_kib())
        hwm1 = self.hwm_kib()
        peak = max(samples + ([hwm1] if hwm1 > hwm0 else []))
        growth = peak - rss0
        print("\n200 pre-AUTH inflations: closes %r; RSS %d KiB before, peak %d KiB (+%d KiB, bound %d)"
              % (codes, rss0, peak, growth, RSS_BUDGET_KIB))
        self.assertEqual(codes, {1009: 200})
        self.assertLessEqual(growth, RSS_BUDGET_KIB, "RSS grew by %d KiB" % growth)
        for d in devs:
            d.close()
        self.check_canary()


if __name__ == "__main__":
    unittest.main()
