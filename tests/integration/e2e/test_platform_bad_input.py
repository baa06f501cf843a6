"""Bad input from the platform side: a fake platform instance (a small
WebSocket server here) accepts edgemux's pipes, answers their AUTH, then
sends requests for unknown endpointIds, answers to nothing pending, garbage
and text. edgemux answers what the contract says, drops the rest, and a real
platform-sim instance beside it keeps serving a canary device."""

import base64
import hashlib
import json
import socket
import struct
import threading
import time
import unittest

from harness import (GET, SERVICE_UNAVAILABLE, SUCCESS, WORKER_SHIFT, WORKERS, E2ETest, Edgemux,
                     Platform, ao_header, ao_parse, ao_str, pipes, start_edge_sim, wait_until,
                     worker_of_identity)

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class FakePlatform:
    """Accepts pipes; answers each pipe's AUTH with SUCCESS; records what
    edgemux sends; lets the test push raw messages down every pipe (a
    message about an endpointId built per pipe, with the pipe's worker in
    its top 4 bits, as a platform keying on the pipe identity sends it:
    protocol.md §6.2)."""

    def __init__(self):
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.pipes = []
        self.workers = []   # per pipe index: the worker its identity names
        self.received = []  # (pipe index, message)
        self.headers = []
        self.lock = threading.Lock()
        self.stop = False
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self):
        while not self.stop:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    def serve(self, c):
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = c.recv(4096)
            if not d:
                return
            buf += d
        head, buf = buf.split(b"\r\n\r\n", 1)
        hdrs = {}
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            hdrs[k.strip().lower()] = v.strip()
        accept = base64.b64encode(hashlib.sha1(hdrs[b"sec-websocket-key"] + GUID).digest())
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        with self.lock:
            idx = len(self.pipes)
            self.pipes.append(c)
            self.workers.append(worker_of_identity(hdrs.get(b"x-edgemux-server", b"")))
            self.headers.append(hdrs)
        try:
            while True:
                buf, msg, op = self.read_frame(c, buf)
                if op == 0x8:
                    return
                if op != 0x2:
                    continue
                with self.lock:
                    self.received.append((idx, msg))
                code, rid, eid, sid, _ = ao_parse(msg)
                if code == 0x14 and eid == 0:  # the pipe's own AUTH
                    self.send(c, ao_header(SUCCESS, rid, 0, sid) + b"\x00\xff")
        except (OSError, ValueError):
            return

    @staticmethod
    def read_frame(c, buf):
        def need(n):
            nonlocal buf
            while len(buf) < n:
                d = c.recv(65536)
                if not d:
                    raise OSError("closed")
                buf += d
        need(2)
        b0, b1 = buf[0], buf[1]
        n, off = b1 & 0x7F, 2
        if n == 126:
            need(4)
            n, off = struct.unpack(">H", buf[2:4])[0], 4
        elif n == 127:
            need(10)
            n, off = struct.unpack(">Q", buf[2:10])[0], 10
        mask = b""
        if b1 & 0x80:
            need(off + 4)
            mask, off = buf[off:off + 4], off + 4
        need(off + n)
        payload = bytearray(buf[off:off + n])
        if mask:
            for i in range(n):
                payload[i] ^= mask[i % 4]
        return buf[off + n:], bytes(payload), b0 & 0x0F

    @staticmethod
    def send(c, msg, opcode=0x2):
        n = len(msg)
        hdr = struct.pack(">BB", 0x80 | opcode, n) if n < 126 else struct.pack(">BBH", 0x80 | opcode, 126, n)
        c.sendall(hdr + msg)

    def send_all(self, msg, opcode=0x2):
        """msg down every pipe; a callable msg is called with the pipe's
        worker index for the message to send down it."""
        with self.lock:
            pipes = list(zip(self.pipes, self.workers))
        for c, k in pipes:
            try:
                self.send(c, msg(k) if callable(msg) else msg, opcode)
            except OSError:
                pass

    def answers(self):
        with self.lock:
            return [ao_parse(m) for _, m in self.received if ao_parse(m)[0] >= 0x40]

    def answers_by_pipe(self):
        """[(worker of the pipe, parsed answer)] for the answers edgemux sent."""
        with self.lock:
            return [(self.workers[i], ao_parse(m)) for i, m in self.received if ao_parse(m)[0] >= 0x40]

    def close(self):
        self.stop = True
        self.lsock.close()
        for c in self.pipes:
            try:
                c.close()
            except OSError:
                pass


class PlatformBadInput(E2ETest):
    def test_platform_garbage_is_contained(self):
        fake = FakePlatform()
        self.addCleanup(fake.close)
        plat = Platform(self.env, 1)
        emx = Edgemux(self.env, "emx-pbad", [plat.ports[0], fake.port],
                      overrides={"platform": {"request_timeout": "2s", "stall_after": "1s"}})
        emx.wait_ready()
        wait_until(lambda: len(fake.pipes) == pipes(), 10, what="pipes to the fake platform")
        # every worker's pipes connected (AUTH answered), so no canary
        # device lands on a worker that has none yet
        wait_until(lambda: emx.http("/instances")[1].count('"pipes_up":%d' % pipes()) == 2, 10,
                   what="every pipe connected")
        # the pipe upgrade carried the contract's headers: the server name,
        # or <name>/<k> for each of several workers (two pipes each), and
        # one boot id for the process
        for h in fake.headers:
            self.assertEqual(h.get(b"appkey"), self.env.app_key.encode())
            self.assertRegex(h.get(b"x-edgemux-boot", b"").decode(), r"^[0-9a-f]{16}$")
        if WORKERS == 1:
            self.assertEqual(sorted(h.get(b"x-edgemux-server") for h in fake.headers), [b"emx-pbad"] * 2)
        else:
            self.assertEqual(sorted(h.get(b"x-edgemux-server") for h in fake.headers),
                             sorted(b"emx-pbad/%d" % k for k in range(WORKERS) for _ in range(2)))
        self.assertEqual(len({h.get(b"x-edgemux-boot") for h in fake.headers}), 1)
        canary, ledger = start_edge_sim(self.env, emx.edge_port, "--edges", 4, "--rate", 10,
                                        "--duration", "6s", "--drain", "6s")
        time.sleep(1)
        # a request for an endpointId nobody has (of the pipe's worker) →
        # 0xA3 back on that pipe
        def ghost(k):
            return (ao_header(GET, 0x777, (k << WORKER_SHIFT) | 0x0ABCDEF, 42) + b"\x0A" + ao_str("Ghost") +
                    b"\x01" + ao_str("p") + b"\x00\xff")
        fake.send_all(ghost)
        wait_until(lambda: any(a[0] == SERVICE_UNAVAILABLE and a[1] == 0x777 and
                               a[2] == (k << WORKER_SHIFT) | 0x0ABCDEF
                               for k, a in fake.answers_by_pipe()), 5, what="0xA3 for an unknown endpoint")
        # answers to nothing pending, garbage, a text frame: dropped, nothing breaks
        fake.send_all(lambda k: ao_header(SUCCESS, 0x12345, (k << WORKER_SHIFT) | 1, 1) + b"\x00\xff")
        fake.send_all(b"\x01\x02\x03")
        fake.send_all(b"\x07" * 40)
        fake.send_all(b"hello", opcode=0x1)
        self.assertEqual(canary.p.wait(60), 0, canary.output())
        with open(ledger) as f:
            entries = json.load(f)
        # Requests that went to the fake instance are never answered by it:
        # edgemux answers them 0xA4 after request_timeout. Every request has
        # exactly one outcome, and nothing is left without an answer.
        self.assertGreater(len(entries), 20)
        for r in entries:
            self.assertEqual(r["outcome"], "answered", r)
            self.assertIn(r["code"], (SUCCESS, 0xA4, 0xA3, 0xA0), r)
        self.assertTrue(emx.proc.alive())
        self.assertEqual(emx.http("/health")[0], 200)
        self.assertEqual(plat.stats()["violations"], 0)


if __name__ == "__main__":
    unittest.main()
