"""A platform instance that stops reading its pipes. What edgemux holds for
a pipe is bounded (transport.pipe_max_queued): a device answering a platform
request with endless chunks cannot grow memory, and a request routed to a
pipe that refuses is answered 0xA0. A platform that floods pings or requests
while not reading costs little CPU: pongs are coalesced, control frames are
read at a bounded rate, a pipe over its cap is not read, and a pipe that
stays unwritable is closed as stalled. A canary device on a healthy
instance keeps its round trips."""

import json
import os
import select
import socket
import struct
import threading
import time
import unittest

from harness import (GET, INTERNAL_ERROR, SLACK, SUCCESS, WORKER_SHIFT, E2ETest, Edgemux, Platform,
                     ao_header, ao_parse, ao_request, ao_str, pipes, wait_until)
import base64
import hashlib

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
AUTH = 0x14


def proc_cpu(pid):
    """User + system CPU seconds of a process."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def frames(buf):
    """Whole frames at the start of buf (edgemux masks): ([(op, payload)], rest)."""
    out = []
    while len(buf) >= 2:
        b0, b1 = buf[0], buf[1]
        n, off = b1 & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                break
            n, off = struct.unpack(">H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, off = struct.unpack(">Q", buf[2:10])[0], 10
        mask = b""
        if b1 & 0x80:
            mask, off = buf[off:off + 4], off + 4
        if len(buf) < off + n:
            break
        payload = bytes(buf[off:off + n])
        if mask and any(mask):
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        out.append((b0 & 0x0F, payload))
        buf = buf[off + n:]
    return out, buf


def frame(msg, opcode=0x2):
    n = len(msg)
    if n < 126:
        return struct.pack(">BB", 0x80 | opcode, n) + msg
    if n < 65536:
        return struct.pack(">BBH", 0x80 | opcode, 126, n) + msg
    return struct.pack(">BBQ", 0x80 | opcode, 127, n) + msg


class DeafPlatform:
    """Accepts pipes with a small receive buffer, answers every AUTH (the
    pipes' and devices'), and stops reading on demand; the test writes
    frames to its pipes. A request for a device goes down the pipe its
    AUTH came on (protocol.md §6.2: a pipe of the worker holding it);
    `workers` maps each pipe to the worker its X-Edgemux-Server identity
    names (`<name>/<k>`, or the bare name: worker 0)."""

    def __init__(self):
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.pipes = []
        self.workers = {}  # pipe socket -> worker index of its identity
        self.devices = []  # (pipe socket, endpointId, sessionId) of device AUTHs
        self.lock = threading.Lock()
        self.reading = threading.Event()
        self.reading.set()
        self.stop = False
        self.sent = 0
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
        try:
            while b"\r\n\r\n" not in buf:
                d = c.recv(4096)
                if not d:
                    return
                buf += d
            head, buf = buf.split(b"\r\n\r\n", 1)
            key = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n")
                   if l.lower().startswith(b"sec-websocket-key:")][0]
            ident = ([l.split(b":", 1)[1].strip().decode() for l in head.split(b"\r\n")
                      if l.lower().startswith(b"x-edgemux-server:")] or [""])[0]
            name, sep, k = ident.rpartition("/")
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            with self.lock:
                self.workers[c] = int(k) if sep and name and k.isdigit() else 0
                self.pipes.append(c)
            while not self.stop:
                if not self.reading.is_set():
                    time.sleep(0.05)
                    continue
                if not select.select([c], [], [], 0.05)[0]:
                    continue
                d = c.recv(65536)
                if not d:
                    return
                got, buf = frames(buf + d)
                for op, msg in got:
                    if op != 0x2 or len(msg) < 15:
                        continue
                    code, rid, eid, sid, _ = ao_parse(msg)
                    if code != AUTH:
                        continue
                    if eid == 0:  # the pipe's own AUTH
                        self.write(c, frame(ao_header(SUCCESS, rid, 0, sid) + b"\x00\xff"))
                    else:
                        dsid = 0x5000 + len(self.devices)
                        with self.lock:
                            self.devices.append((c, eid, dsid))
                        self.write(c, frame(ao_header(SUCCESS, rid, eid, dsid) + b"\x00\xff"))
        except OSError:
            return

    def write(self, c, data, timeout=None):
        """Write what the socket takes within timeout (None: all); returns bytes written."""
        n, end = 0, None if timeout is None else time.monotonic() + timeout
        try:
            while n < len(data):
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    break
                if not select.select([], [c], [], left)[1]:
                    break
                n += c.send(data[n:])
        except (OSError, ValueError):  # closed by edgemux or by the test
            pass
        with self.lock:
            self.sent += n
        return n

    def close(self):
        self.stop = True
        self.reading.set()
        self.lsock.close()
        for c in list(self.pipes):
            try:
                c.close()
            except OSError:
                pass


def write_instances(emx, entries):
    with open(emx.instances_file + ".tmp", "w") as f:
        f.write("instances:\n")
        for port, prio in entries:
            f.write("  - address: 127.0.0.1\n    port: %d\n    priority: %d\n" % (port, prio))
    os.rename(emx.instances_file + ".tmp", emx.instances_file)


def pipes_up(emx):
    """pipes_up of each instance in /instances (summed over workers)."""
    status, body = emx.http("/instances")
    if status != 200:
        return []
    data = json.loads(body)
    insts = data["instances"] if isinstance(data, dict) else data
    return [i["pipes_up"] for i in insts]


class PipeBackpressure(E2ETest):
    def start(self, name, entries, overrides):
        emx = Edgemux(self.env, name, [], start=False, overrides=overrides)
        write_instances(emx, entries)
        emx.start()
        emx.wait_ready()
        # Every worker's pipes up before a device connects: /ready needs
        # only one, and a device accepted by a worker whose pipes are still
        # connecting would get its AUTH answered 0xA0.
        per = overrides.get("platform", {}).get("pipes_per_instance", 2)
        wait_until(lambda: pipes_up(emx) == [pipes(per)] * len(entries), 10, what="every pipe connected")
        return emx

    def device_answers_flood(self, emx, deaf):
        """A device authenticates through the deaf platform, which then stops
        reading and asks it one thing; the device answers with 200 chunks of
        256 KiB. Returns (RSS growth, the device, its session)."""
        e = emx.edge(app_key=self.env.app_key)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        pipe, eid, _ = deaf.devices[0]
        time.sleep(0.5)
        rss0 = proc_rss(emx.proc.pid)
        deaf.reading.clear()
        req = ao_header(GET, 0x4242, eid, sid) + b"\x0A" + ao_str("SteamSensor") + b"\x01" + ao_str("p") + b"\x00\xff"
        deaf.write(pipe, frame(req))
        code, rid, reid, rsid, _ = ao_parse(e.recv(timeout=5))
        self.assertEqual(code, GET)
        chunk = b"\x00" * (256 << 10)
        for i in range(1, 201):
            e.send(ao_header(SUCCESS, rid, reid, rsid, multipart=(i, 200, 8192)) + chunk)
        time.sleep(1.5)
        return proc_rss(emx.proc.pid) - rss0, e, sid

    def test_device_answers_to_a_deaf_platform_are_bounded(self):
        deaf = DeafPlatform()
        self.addCleanup(deaf.close)
        emx = self.start("emx-bp", [(deaf.port, 0)], {})
        growth, e, sid = self.device_answers_flood(emx, deaf)
        print("RSS growth after 50 MiB of answers toward a deaf platform: %.1f MiB" % (growth / 2**20))
        self.assertLess(growth, (16 << 20) * SLACK)
        self.assertTrue(emx.proc.alive())
        self.assertEqual(emx.http("/health")[0], 200)

    def test_request_to_a_refusing_pipe_is_answered_a0(self):
        # the transport's cap below the core's watermark: the router still
        # sees the pipe writable, send() refuses, the request gets 0xA0
        deaf = DeafPlatform()
        self.addCleanup(deaf.close)
        emx = self.start("emx-bp-a0", [(deaf.port, 0)],
                         {"transport": {"pipe_max_queued": "64KiB"},
                          "platform": {"high_watermark": "8MiB", "low_watermark": "4MiB",
                                       "pipes_per_instance": 1}})
        growth, e, sid = self.device_answers_flood(emx, deaf)
        self.assertLess(growth, (16 << 20) * SLACK)
        e.send(ao_request(GET, 77, sid))
        code, rid, _, _, _ = ao_parse(e.recv(timeout=5))
        self.assertEqual((code, rid), (INTERNAL_ERROR, 77))

    def flood_with_canary(self, what, overrides=None, seconds=5.0):
        plat = Platform(self.env, 1)
        deaf = DeafPlatform()
        self.addCleanup(deaf.close)
        emx = self.start("emx-flood", [(plat.ports[0], 0), (deaf.port, 1)], overrides or {})
        wait_until(lambda: len(deaf.pipes) == pipes(), 10, what="pipes to the deaf platform")
        # the canary authenticates on the healthy instance (the better tier)
        wait_until(lambda: plat.pipes_connected() == [pipes()], 10, what="pipes to the platform")
        canary = emx.edge(app_key=self.env.app_key)
        code, sid = canary.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        deaf.reading.clear()
        stop = threading.Event()

        def flood(c):
            data = what(deaf.workers[c]) if callable(what) else what
            data = data * (65536 // len(data))
            while not stop.is_set():
                if not deaf.write(c, data, timeout=0.2):
                    time.sleep(0.01)

        threads = [threading.Thread(target=flood, args=(c,), daemon=True) for c in deaf.pipes]
        for t in threads:
            t.start()
        time.sleep(0.5)
        pid = emx.proc.pid
        cpu0, rss0 = proc_cpu(pid), proc_rss(pid)
        rtts, rid = [], 100
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            rid += 1
            t0 = time.monotonic()
            canary.send(ao_request(GET, rid, sid))
            code, arid, _, _, _ = ao_parse(canary.recv(timeout=5))
            rtts.append(time.monotonic() - t0)
            self.assertEqual((code, arid), (SUCCESS, rid))
            time.sleep(0.02)
        cpu = proc_cpu(pid) - cpu0
        growth = proc_rss(pid) - rss0
        sent = deaf.sent
        stop.set()
        for t in threads:
            t.join(2)
        rtts.sort()
        print("%s flood for %.0f s: edgemux CPU %.3f s, RSS %+.1f MiB, canary %d GETs, p99 %.2f ms, "
              "max %.2f ms, flooder wrote %.1f MiB" % (what(0)[:1].hex() if callable(what) else what[:1].hex(), seconds, cpu, growth / 2**20,
                                                      len(rtts), rtts[int(len(rtts) * 0.99)] * 1e3,
                                                      rtts[-1] * 1e3, sent / 2**20))
        self.assertGreater(sent, 64 << 10, "the flood never got going")
        self.assertLess(cpu, 0.1 * seconds * SLACK)
        self.assertLess(growth, (16 << 20) * SLACK)
        # latency is inflated by a sanitizer build's instrumentation (SLACK)
        self.assertLess(rtts[-1], 0.2 * SLACK)
        self.assertEqual(emx.http("/health")[0], 200)
        return emx

    def test_ping_flood_from_a_deaf_platform(self):
        self.flood_with_canary(b"\x89\x00")

    def test_request_flood_from_a_deaf_platform_is_closed_as_stalled(self):
        # requests for an endpoint nobody has: each is answered 0xA3 toward
        # a platform that does not read (an endpointId of the pipe's own
        # worker, as a platform keying on the pipe identity would send)
        def get(worker):
            eid = (worker << WORKER_SHIFT) | 0x0ABCDEF
            return frame(ao_header(GET, 0x777, eid, 42) + b"\x0A" + ao_str("Ghost") + b"\x01" + ao_str("p") +
                         b"\x00\xff")
        emx = self.flood_with_canary(get, {"platform": {"idle_read_timeout": "3s",
                                                               "ping_interval": "1s"}})
        wait_until(lambda: "stalled: the platform stopped reading" in emx.log(), 10,
                   what="the deaf pipe closed as stalled")


if __name__ == "__main__":
    unittest.main()
