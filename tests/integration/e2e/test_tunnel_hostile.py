"""Hostile and broken peers on both sides of a Remote Access tunnel
(TUNNELS.md §3.3, §4, §6, §8; docs/protocol.md §5 and §9.4).

One edgemux with two instances: platform-sim (priority 0: every device
request goes there) and a fake owner written here (priority 1: only
platform requests it sends itself reach devices through it). The fake
owner speaks the platform hop (hostile.HostilePlatform) and serves tunnel
back ends (/Thingworx/WSTunnelServer/<tid>) with whatever a test scripts;
it sends its own StartTunnel (TUNNELS.md §3.1) to a device so that
edgemux records it as the owner and dials it.

Every hostile peer is written here from RFC 6455 and TUNNELS.md with the
standard library; none of the project's C tools speak for it. After each
case: edgemux alive and answering /health, the canary tunnel (platform-sim)
echoes, the canary AlwaysOn device (hostile.Canary, a GET every 200 ms)
saw only 0x40 and no gap over 1 s, and edgemux's RSS is back within a
bound of its level before the case (harness.SLACK scales time and memory
bounds under sanitizers)."""

import base64
import hashlib
import json
import os
import re
import select
import shutil
import socket
import struct
import threading
import time
import unittest
import urllib.parse

from harness import POST, SLACK, Edgemux, Env, Platform, RawEdge, ao_header, ao_str, pipes, wait_until
from hostile import GUID, Canary, HostilePlatform, metrics, parse_frames, rss_kib, ws_frame
from tunneldevice import TUNNEL_PATH, TunnelDevice, TunnelSocket

KIB = 1024
MIB = 1024 * 1024
# edge.max_tunnels of this edgemux (records and sockets); with several
# workers it bounds the process's counts, which every worker adds to.
MAX_TUNNELS = 6
HANDSHAKE_S = 2.0                # transport.handshake_timeout
CONNECT_S = 1.0                  # transport.tunnel_connect_timeout
RSS_BOUND_KIB = 16 * 1024 * SLACK
MAX_FRAME = 8192 * 4 // 3        # the device's Max-Frame-Size for chunksize 8192


def accept_of(key):
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def status_of(data):
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", data)
    return int(m.group(1)) if m else 0


def masked(op, payload, fin=True, rsv=0, key=b"\0\0\0\0", length64=False):
    """A client frame (RFC 6455 §5.2), by hand."""
    b0 = (0x80 if fin else 0) | (rsv << 4) | op
    n = len(payload)
    if length64:
        hdr = struct.pack(">BBQ", b0, 0x80 | 127, n)
    elif n < 126:
        hdr = struct.pack(">BB", b0, 0x80 | n)
    elif n < 65536:
        hdr = struct.pack(">BBH", b0, 0x80 | 126, n)
    else:
        hdr = struct.pack(">BBQ", b0, 0x80 | 127, n)
    if key != b"\0\0\0\0":
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return hdr + key + payload


def raw_upgrade(port, head, timeout=5.0):
    """Send `head` (bytes) and read the answer's head: (status, head bytes,
    socket). Status 0: closed without an answer."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(head)
    buf = b""
    try:
        while b"\r\n\r\n" not in buf:
            d = s.recv(65536)
            if not d:
                break
            buf += d
    except (socket.timeout, ConnectionResetError):
        pass
    return status_of(buf), buf, s


def upgrade_head(path, key=True, version="HTTP/1.1", extra=()):
    lines = ["GET %s %s" % (path, version), "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Version: 13"]
    if key:
        lines.append("Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)).decode())
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def recv_exact(sock, n, timeout=30):
    sock.settimeout(timeout)
    buf = bytearray()
    while len(buf) < n:
        d = sock.recv(min(1 << 20, n - len(buf)))
        if not d:
            break
        buf.extend(d)
    return bytes(buf)


def start_tunnel_msg(rid, eid, sid, thing, tid, chunksize=8192, idle_ms=30000):
    """StartTunnel as TUNNELS.md §3.1 lays it out: POST, Thing, Services,
    no headers, one-row InfoTable tid, type, chunksize, idle_timeout,
    read_timeout, connection."""
    fields = (("tid", 0x00), ("type", 0x00), ("chunksize", 0x16), ("idle_timeout", 0x16),
              ("read_timeout", 0x16), ("connection", 0x00))
    shape = b"".join(b"\x01" + ao_str(n) + ao_str("") + bytes([t]) + b"\x00\x00" for n, t in fields) + b"\x00"
    row = (b"\x01" + struct.pack(">H", len(fields)) + b"\x00" + ao_str(tid) + b"\x00" + ao_str("tcp") +
           b"\x16" + struct.pack(">i", chunksize) + b"\x16" + struct.pack(">i", idle_ms) +
           b"\x16" + struct.pack(">i", 10) +
           b"\x00" + ao_str('{"host": "127.0.0.1", "port": 9}'))
    return (ao_header(POST, rid, eid, sid) + b"\x0a" + ao_str(thing) + b"\x02" + ao_str("StartTunnel") +
            b"\x00\x05" + shape + row + b"\x00")


def read_frame(ts, deadline):
    """One raw frame from a device's tunnel socket: (opcode, fin, length
    code (the 7-bit field), payload)."""
    b0, b1 = ts._read(2, deadline)
    n7 = b1 & 0x7F
    n = n7
    if n7 == 126:
        n = struct.unpack(">H", ts._read(2, deadline))[0]
    elif n7 == 127:
        n = struct.unpack(">Q", ts._read(8, deadline))[0]
    if b1 & 0x80:
        ts._read(4, deadline)
    return b0 & 0x0F, bool(b0 & 0x80), n7, ts._read(n, deadline), b1 & 0x80


def sim_tunnels(plat):
    rows, totals = {}, {}
    for line in plat.cmd("tunnels").splitlines():
        kind, _, rest = line.partition(" ")
        kv = {}
        for item in rest.split(" "):
            k, _, v = item.partition("=")
            kv[k] = urllib.parse.unquote(v)
        if kind == "tunnel":
            rows[kv["tid"]] = kv
        elif kind == "tunnels":
            totals = kv
    return rows, totals


# ---------------------------------------------------------------- the fake owner

class FakeTunnel:
    """The owner's end of one tunnel back end after its 101: frames from
    edgemux are collected by a thread (pings answered unless told)."""

    def __init__(self, sock, headers, rest=b"", answer_pings=True):
        self.sock = sock
        self.headers = headers
        self.buf = rest
        self.frames = []          # (opcode, fin, payload, masked)
        self.eof = False
        self.answer_pings = answer_pings
        self.reading = threading.Event()
        self.reading.set()
        self.lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            got, self.buf = parse_frames(self.buf)
            for op, fin, payload in got:
                with self.lock:
                    self.frames.append((op, fin, payload))
                if op == 0x9 and self.answer_pings:
                    self.send(ws_frame(payload, 0xA))
                if op == 0x8:  # echoed, then TCP closed (RFC 6455 §5.5.1)
                    self.send(ws_frame(payload[:2], 0x8))
                    self.eof = True
                    self.drop()
                    return
            if not self.reading.is_set():
                time.sleep(0.02)
                continue
            try:
                if not select.select([self.sock], [], [], 0.1)[0]:
                    continue
                d = self.sock.recv(1 << 16)
            except (OSError, ValueError):
                d = b""
            if not d:
                self.eof = True
                return
            self.buf += d

    def send(self, data):
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def ops(self):
        with self.lock:
            return [f[0] for f in self.frames]

    def close_frame(self):
        with self.lock:
            for op, _, payload in self.frames:
                if op == 0x8:
                    code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                    return code, payload[2:].decode(errors="replace")
        return None

    def drop(self):
        try:
            self.sock.close()
        except OSError:
            pass


class FakeOwner(HostilePlatform):
    """HostilePlatform's pipes, plus tunnel back ends: an upgrade on
    /Thingworx/WSTunnelServer/<tid> is handed to `scripts[tid](owner, sock,
    key, headers)`; without a script it is refused 404."""

    def __init__(self, app_key):
        super().__init__(app_key)
        self.scripts = {}
        self.last = None          # the newest FakeTunnel
        self.rid = 0x6000
        self.upgrades = []        # (tid, headers) of every tunnel upgrade

    def _serve(self, c):
        peek = b""
        try:
            c.settimeout(10)
            end = time.monotonic() + 10
            while b"\r\n" not in peek and time.monotonic() < end:
                peek = c.recv(4096, socket.MSG_PEEK)
                if not peek or len(peek) >= 4096:
                    break
                if b"\r\n" not in peek:
                    time.sleep(0.005)
        except OSError:
            pass
        parts = peek.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) >= 2 and parts[1].startswith(TUNNEL_PATH.encode()):
            self._tunnel(c, parts[1][len(TUNNEL_PATH):].decode(errors="replace"))
            return
        super()._serve(c)

    def _tunnel(self, c, tid):
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                d = c.recv(4096)
                if not d:
                    c.close()
                    return
                buf += d
        except OSError:
            c.close()
            return
        head, rest = buf.split(b"\r\n\r\n", 1)
        hdrs = {}
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            hdrs[k.strip().lower().decode()] = v.strip().decode(errors="replace")
        with self.lock:
            self.upgrades.append((tid, hdrs))
        script = self.scripts.get(tid)
        if script is None:
            c.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            c.close()
            return
        c.settimeout(None)
        script(self, c, hdrs.get("sec-websocket-key", "").encode(), hdrs, rest)

    def start_tunnel(self, eid, sid, thing, tid):
        """Send StartTunnel to endpoint `eid` down a pipe of the worker
        holding it (protocol.md §6.2; HostilePlatform.pipe_for): this
        instance becomes the tunnel's owner."""
        pipe = self.pipe_for(eid)
        self.rid += 1
        pipe.send(start_tunnel_msg(self.rid, eid, sid, thing, tid))


def s_accept(extra=b"", glue=b"", wrong_accept=False, answer_pings=True):
    """A script: answer 101 (optionally broken), then keep a FakeTunnel."""
    def script(owner, c, key, hdrs, rest):
        acc = b"x" * 28 if wrong_accept else accept_of(key)
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Accept: " + acc + b"\r\n" + extra + b"\r\n" + glue)
        ft = FakeTunnel(c, hdrs, rest, answer_pings)
        with owner.lock:
            owner.last = ft
    return script


def s_refuse(status, text):
    def script(owner, c, key, hdrs, rest):
        c.sendall(b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % (status, text))
        c.close()
    return script


def s_raw(answer, drip=False):
    """A script: write answer(key) (one byte per write when drip), keep the socket."""
    def script(owner, c, key, hdrs, rest):
        data = answer(key)
        try:
            if drip:
                for i in range(len(data)):
                    c.sendall(data[i:i + 1])
                    time.sleep(0.001)
            else:
                c.sendall(data)
        except OSError:
            pass
        with owner.lock:
            owner.held = getattr(owner, "held", []) + [c]
    return script


def s_silent(owner, c, key, hdrs, rest):
    """Accepts the connection and the request, answers nothing."""
    with owner.lock:
        owner.held = getattr(owner, "held", []) + [c]


# ---------------------------------------------------------------- the suite

class TunnelHostile(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.env = env = Env()
        cls.keep = False
        cls.plat = Platform(env, 1)
        cls.fake = FakeOwner(env.app_key)
        cls.emx = Edgemux(env, "emx-tun-hostile", [cls.plat.ports[0], cls.fake.port], start=False, overrides={
            "log": {"level": "info"},
            "edge": {"max_tunnels": MAX_TUNNELS, "max_tunnels_per_device": MAX_TUNNELS,
                     "tunnel_idle_timeout": "60s"},
            "transport": {"tunnel_connect_timeout": "%dms" % int(CONNECT_S * 1000),
                          "handshake_timeout": "%dms" % int(HANDSHAKE_S * 1000)}})
        cls.emx.write_instances([cls.plat.ports[0], cls.fake.port], priorities=[0, 1])
        cls.emx.start()
        cls.emx.wait_ready()
        # every worker's pipes to both instances (pipes() each), so no
        # device lands on a worker whose pipes are still connecting
        wait_until(lambda: cls.plat.pipes_connected()[0] >= pipes() and len(cls.fake.live_pipes()) >= pipes() and
                   cls.emx.http("/instances")[1].count('"pipes_up":%d' % pipes()) == 2, 10,
                   what="pipes to both instances")
        cls.stop = threading.Event()
        # the canary AlwaysOn device, in a process of its own
        cls.canary = Canary(env, cls.emx.edge_port)
        # the canary tunnel: a device echoing through platform-sim
        cls.cdev = TunnelDevice(RawEdge(cls.emx.edge_port, app_key=env.app_key), env.app_key, "CanaryDev")
        cls.cts, cls.crac_port, _ = cls.sim_start(cls.cdev, "t-canary")
        assert cls.cts.status == 101, cls.cts.head
        threading.Thread(target=cls.cts.echo_forever, args=(cls.stop,), daemon=True).start()
        cls.crac = socket.create_connection(("127.0.0.1", cls.crac_port), timeout=10)
        # the device the hostile cases use for their tunnels
        cls.hedge = RawEdge(cls.emx.edge_port, app_key=env.app_key)
        cls.hdev = TunnelDevice(cls.hedge, env.app_key, "HDev")
        cls.n = 0

    @classmethod
    def tearDownClass(cls):
        cls.stop.set()
        for s in (cls.crac, cls.cts.sock, cls.hedge.sock, cls.cdev.edge.sock):
            try:
                s.close()
            except OSError:
                pass
        cls.fake.close()
        cls.env.cleanup(keep=True)  # stops the processes; a sanitizer reports at exit
        log = cls.emx.log()
        bad = [l for l in log.splitlines() if "Sanitizer" in l or "runtime error:" in l]
        if cls.keep or bad:
            print("logs kept in", cls.env.dir)
        else:
            shutil.rmtree(cls.env.dir, ignore_errors=True)
        if bad:
            raise AssertionError("edgemux's sanitizer report:\n" + "\n".join(bad[:20]))

    @classmethod
    def sim_start(cls, dev, tid, chunksize=8192):
        """platform-sim starts a tunnel; the device answers and dials it.
        Returns (tunnel socket, RAC port, the tid the device saw)."""
        out = {}

        def ctl():
            out["reply"] = cls.plat.cmd("tunnel 1 %s %s 127.0.0.1 9 %d" % (dev.thing, tid, chunksize))

        t = threading.Thread(target=ctl)
        t.start()
        seen, cs = dev.take_start()
        ts = TunnelSocket(cls.emx.edge_port, seen, cls.env.app_key, chunksize=cs)
        t.join(20)
        m = re.match(r"answer 0x40 SUCCESS port (\d+)", out.get("reply", ""))
        if not m:
            raise AssertionError("tunnel %s: %r" % (tid, out))
        return ts, int(m.group(1)), seen

    # ---- per case

    def setUp(self):
        self.closers = []
        time.sleep(0.05)
        self.t0 = time.monotonic()
        self.rss0 = rss_kib(self.emx.proc.pid)
        self.m0 = metrics(self.emx)

    def tearDown(self):
        for c in self.closers:
            try:
                c()
            except Exception:
                pass
        errors = getattr(self._outcome, "errors", None) or []
        result = getattr(self._outcome, "result", None)
        if any(e for _, e in errors) or (result is not None and (result.failures or result.errors)):
            type(self).keep = True

    def track(self, obj):
        self.closers.append(obj.close if hasattr(obj, "close") and not isinstance(obj, TunnelSocket)
                            else obj.drop)
        return obj

    def tid(self, name):
        type(self).n += 1
        return "%s-%d" % (name, type(self).n)

    def sim(self, name):
        ts, rac_port, seen = self.sim_start(self.hdev, self.tid(name))
        self.track(ts)
        self.assertEqual(ts.status, 101, ts.head)
        self.assertEqual(ts.violations, [])
        return ts, rac_port, seen

    def rac(self, port):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.closers.append(s.close)
        return s

    def row(self, tid_seen):
        rows, _ = sim_tunnels(self.plat)
        return rows.get(tid_seen.split("~", 1)[-1], {})

    def wait_row_closed(self, seen, timeout=5.0):
        return wait_until(lambda: self.row(seen) if self.row(seen).get("state") == "closed" else None,
                          timeout * SLACK, what="platform side of %s closed" % seen)

    def expect_close(self, ts, codes, timeout=5.0):
        kind, (code, reason) = ts.recv_message(timeout=timeout * SLACK)
        self.assertEqual(kind, "close")
        self.assertIn(code, codes, reason)
        return code, reason

    def fake_tunnel(self, name, script):
        """The fake owner starts a tunnel for HDev; the device dials it.
        Returns (tunnel socket, platform tid)."""
        tid = self.tid(name)
        self.fake.scripts[tid] = script
        eid = wait_until(lambda: self.plat.binds()["things"].get("HDev", {}).get("endpoint"), 5,
                         what="HDev's endpointId")
        self.fake.start_tunnel(eid, self.hdev.sid, "HDev", tid)
        seen, cs = self.hdev.take_start()
        self.assertTrue(seen.endswith("~" + tid), seen)
        ts = TunnelSocket(self.emx.edge_port, seen, self.env.app_key, chunksize=cs)
        self.track(ts)
        return ts, tid

    def fake_open(self, name, **kw):
        self.fake.last = None
        ts, tid = self.fake_tunnel(name, s_accept(**kw))
        self.assertEqual(ts.status, 101, ts.head)
        ft = wait_until(lambda: self.fake.last, 5, what="the fake owner's tunnel")
        self.closers.append(ft.drop)
        return ts, ft

    def harmless(self, rss_bound_kib=RSS_BOUND_KIB):
        """Nothing else was harmed: edgemux alive and answering, the canary
        tunnel echoes, the canary device saw only 0x40 in time, RSS back."""
        self.assertTrue(self.emx.proc.alive(), "edgemux died:\n" + "\n".join(self.emx.log().splitlines()[-20:]))
        self.assertEqual(self.emx.http("/health")[0], 200)
        data = os.urandom(32 * KIB)
        self.crac.sendall(data)
        self.assertEqual(recv_exact(self.crac, len(data), timeout=5 * SLACK), data, "the canary tunnel")
        summary, problems = self.canary.window(self.t0, time.monotonic())
        self.assertEqual(problems, [], summary)
        pid = self.emx.proc.pid
        end = time.monotonic() + 5
        while rss_kib(pid) > self.rss0 + rss_bound_kib and time.monotonic() < end:
            time.sleep(0.2)
        self.assertLessEqual(rss_kib(pid) - self.rss0, rss_bound_kib, "RSS %d KiB before" % self.rss0)
        return summary

    def counter(self, name, before=None):
        m = metrics(self.emx)
        return m.get(name, 0) - (before if before is not None else self.m0).get(name, 0)

    # ================================================== device side

    def test_d1_upgrade_garbage(self):
        port = self.emx.edge_port
        _, totals0 = sim_tunnels(self.plat)
        outcomes = {}
        for label, path in (("percent", "a%2Fb"), ("colon", "x1:y"), ("at", "a@b"), ("hash", "a#b"),
                            ("tid 301 bytes", "t" * 301), ("empty", "")):
            st, head, s = raw_upgrade(port, upgrade_head(TUNNEL_PATH + path, extra=("appKey: k",)))
            s.close()
            outcomes[label] = st
        self.assertEqual(set(outcomes.values()), {404}, outcomes)
        st, _, s = raw_upgrade(port, b"GET /Thingworx/WSTunnelServer/a\x01b HTTP/1.1\r\nHost: x\r\n\r\n")
        s.close()
        self.assertIn(st, (400, 0))
        # a path no tid can have reaches no owner lookup: the core never heard of it
        self.assertEqual(self.counter('emx_tunnel_sockets_refused_total{reason="unknown_tid"}'), 0)
        # a 300-byte tid is a tid (unknown here): 404 from the lookup
        st, _, s = raw_upgrade(port, upgrade_head(TUNNEL_PATH + "t" * 300))
        s.close()
        self.assertEqual(st, 404)
        for label, head, want in (
                ("no Sec-WebSocket-Key", upgrade_head(TUNNEL_PATH + "k1", key=False), (400,)),
                ("HTTP/1.0", upgrade_head(TUNNEL_PATH + "k1", version="HTTP/1.0"), (400, 505)),
                ("POST", upgrade_head(TUNNEL_PATH + "k1").replace(b"GET", b"POST", 1), (405,)),
                ("version 8", upgrade_head(TUNNEL_PATH + "k1").replace(b"Version: 13", b"Version: 8"), (426,)),
                ("9 KiB of headers", upgrade_head(TUNNEL_PATH + "k1", extra=["X-Pad-%d: %s" % (i, "p" * 1000)
                                                                             for i in range(9)]), (431, 400))):
            st, _, s = raw_upgrade(port, head)
            s.close()
            outcomes[label] = st
            self.assertIn(st, want, label)
        # deflate offered on a real tunnel: a 101 without any extension
        tid = self.tid("deflate")
        out = {}
        th = threading.Thread(target=lambda: out.update(
            r=self.plat.cmd("tunnel 1 HDev %s 127.0.0.1 9" % tid)))
        th.start()
        seen, _ = self.hdev.take_start()
        st, head, s = raw_upgrade(port, upgrade_head(
            TUNNEL_PATH + seen, extra=("appKey: " + self.env.app_key, "Max-Frame-Size: 10922",
                                       "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")))
        self.closers.append(s.close)
        th.join(20)
        self.assertEqual(st, 101, head)
        self.assertNotIn(b"sec-websocket-extensions", head.lower())
        # and its data is uncompressed text
        s.sendall(masked(0x1, base64.b64encode(b"plain")))
        rac = self.rac(int(re.search(r"port (\d+)", out["r"]).group(1)))
        self.assertEqual(recv_exact(rac, 5, timeout=5), b"plain")
        s.close()
        # silent sockets, and half an upgrade, are dropped within handshake_timeout
        t = time.monotonic()
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        half = []
        for _ in range(5):
            h = socket.create_connection(("127.0.0.1", port))
            h.sendall(upgrade_head(TUNNEL_PATH + "half")[:40])
            half.append(h)
        for h in silent + half:
            self.closers.append(h.close)
        dropped = []
        for h in silent + half:
            h.settimeout(HANDSHAKE_S + 3 * SLACK)
            try:
                self.assertEqual(h.recv(100), b"")
            except ConnectionResetError:
                pass
            dropped.append(time.monotonic() - t)
        self.assertLess(max(dropped), HANDSHAKE_S + 1.0 * SLACK, dropped)
        self.assertGreater(min(dropped), HANDSHAKE_S - 0.3)
        _, totals = sim_tunnels(self.plat)
        self.assertEqual(totals["unknown_tid"], totals0["unknown_tid"])
        self.assertEqual(totals["wrong_instance"], totals0["wrong_instance"])
        print("\nupgrade garbage:", json.dumps(outcomes), "dropped after %.2f..%.2f s" % (min(dropped), max(dropped)))
        self.harmless()

    def device_attack(self, name, wire, codes):
        """Send `wire` on an open tunnel socket; edgemux closes it with one
        of `codes`; the device drops TCP (as the SDK) and the platform side
        is closed too."""
        ts, rac_port, seen = self.sim(name)
        ts.sock.sendall(wire)
        code, reason = self.expect_close(ts, codes)
        ts.drop()
        row = self.wait_row_closed(seen)
        return code, reason, row

    def test_d2_frames_after_101(self):
        got = {}
        cases = (
            ("unmasked", ws_frame(base64.b64encode(b"x"), 0x1), (1002,)),
            ("RSV1 without deflate", masked(0x1, b"QUJD", rsv=4), (1002,)),
            ("RSV2", masked(0x1, b"QUJD", rsv=2), (1002,)),
            ("reserved opcode 3", masked(0x3, b"x"), (1002,)),
            ("1 GiB frame header", masked(0x1, b"", length64=True)[:2] + struct.pack(">Q", 1 << 30) + b"\0" * 4,
             (1009,)),
            ("300 KiB in one frame header", struct.pack(">BBQ", 0x81, 0xFF, 300 * KIB) + b"\0" * 4, (1009,)),
            ("300 KiB message in 8 KiB fragments",
             b"".join(masked(0x1 if i == 0 else 0x0, b"A" * 8192, fin=False) for i in range(38)) +
             masked(0x0, b"A" * 8192), (1009,)),
            ("invalid UTF-8 text", masked(0x1, b"QU\xff\xfe"), (1007,)),
            ("fragmented ping", masked(0x9, b"p", fin=False), (1002,)),
            ("ping over 125 bytes", masked(0x9, b"p" * 126), (1002,)),
            ("continuation without start", masked(0x0, b"QUJD"), (1002,)),
            ("close with code 999", masked(0x8, struct.pack(">H", 999)), (1002,)),
            ("close with code 1005", masked(0x8, struct.pack(">H", 1005)), (1002,)),
            ("close with 1-byte payload", masked(0x8, b"\x03"), (1002,)),
        )
        for name, wire, codes in cases:
            code, reason, row = self.device_attack(name.replace(" ", "_")[:20], wire, codes)
            got[name] = [code, reason, "owner got %s %s" % (row.get("close_code"), row.get("close_reason"))]
        print("\nframes after the 101:", json.dumps(got))
        self.harmless()

    def test_d3_binary_pings_flood(self):
        ts, rac_port, seen = self.sim("binpings")
        rac = self.rac(rac_port)
        # binary messages: relayed unchanged, as binary, to the owner
        for i in range(3):
            ts.send_frame(0x2, b"bin%d" % i)
        wait_until(lambda: self.row(seen).get("binary_from_device") == "3", 5 * SLACK,
                   what="3 binary messages at the owner")
        # many pings: each hop answers its own; none reaches the owner
        wire0 = int(self.row(seen)["from_device_wire"])
        msgs0 = int(self.row(seen)["from_device_msgs"])
        n = 2000
        ts.sock.sendall(b"".join(masked(0x9, b"ping%05d" % i) for i in range(n)))
        pongs, last = 0, None
        deadline = time.monotonic() + 5 * SLACK
        while last != b"ping%05d" % (n - 1):
            op, fin, _, payload, mbit = read_frame(ts, deadline)
            self.assertEqual((op, mbit), (0xA, 0), "pong expected")
            pongs += 1
            last = payload
        ts.send_data(b"after pings")
        self.assertEqual(recv_exact(rac, 11, timeout=5), b"after pings")
        row = self.row(seen)
        self.assertLess(int(row["from_device_wire"]) - wire0, 200, "pings reached the owner")
        self.assertEqual(int(row["from_device_msgs"]), msgs0 + 1)
        # a flood of small messages: all arrive, in order, one message each
        m = 20000
        raw = b"".join(i.to_bytes(3, "big") for i in range(m))
        t = time.monotonic()
        ts.sock.sendall(b"".join(masked(0x1, base64.b64encode(raw[3 * i:3 * i + 3])) for i in range(m)))
        self.assertEqual(recv_exact(rac, len(raw), timeout=20 * SLACK), raw)
        took = time.monotonic() - t
        wait_until(lambda: int(self.row(seen).get("from_device_msgs", 0)) == msgs0 + 1 + m, 5 * SLACK,
                   what="every message counted")
        print("\nbinary/pings/flood: %d pongs for %d pings; %d messages in %.2f s" % (pongs, n, m, took))
        self.harmless()

    def test_d4_device_never_reads(self):
        """RAC sends 50 MiB; the device reads nothing: edgemux holds at most
        tunnel_max_queued plus buffers, the platform side is slowed, the
        others go on; then the device reads and gets every byte in order."""
        ts, rac_port, seen = self.sim("noread")
        ts.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KIB)
        rac = self.rac(rac_port)
        total = 50 * MIB
        payload = os.urandom(total)
        sent = [0]

        def writer():
            view = memoryview(payload)
            try:
                while sent[0] < total:
                    if not select.select([], [rac], [], 0.2)[1]:
                        continue
                    sent[0] += rac.send(view[sent[0]:sent[0] + 256 * KIB])
            except OSError:
                pass
        w = threading.Thread(target=writer, daemon=True)
        w.start()
        pid = self.emx.proc.pid
        peak = rss_kib(pid)
        samples = []
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            peak = max(peak, rss_kib(pid))
            samples.append(sent[0])
            time.sleep(0.1)
        # back-pressure: the platform side stopped taking bytes
        stalled_at = sent[0]
        time.sleep(1.0)
        self.assertLess(sent[0] - stalled_at, 512 * KIB, "the RAC side kept writing: no back-pressure")
        self.assertLess(sent[0], total // 2)
        peak = max(peak, rss_kib(pid))
        self.assertLess(peak - self.rss0, 20 * 1024 * SLACK, "edgemux RSS grew %d KiB" % (peak - self.rss0))
        # the rest of the process is unaffected meanwhile
        summary_during = self.harmless(rss_bound_kib=20 * 1024 * SLACK)
        # the device reads again: every byte, in order
        t = time.monotonic()
        h_got, got = hashlib.sha256(), 0
        deadline = time.monotonic() + 60 * SLACK
        while got < total:
            kind, data = ts.recv_message(timeout=max(1, deadline - time.monotonic()))
            self.assertEqual(kind, "text")
            h_got.update(data)
            got += len(data)
        w.join(10)
        self.assertEqual(got, total)
        self.assertEqual(h_got.hexdigest(), hashlib.sha256(payload).hexdigest(), "bytes out of order or changed")
        self.assertEqual(ts.violations, [])
        print("\nnever-reading device: RAC stalled at %.1f MiB of 50, edgemux RSS peak +%d KiB; "
              "drained in %.1f s; canary %s" % (stalled_at / MIB, peak - self.rss0, time.monotonic() - t,
                                                json.dumps(summary_during)))
        self.harmless()

    def test_d5_device_closes(self):
        # the SDK's own close: the owner gets its code and reason
        ts, rac_port, seen = self.sim("close-sdk")
        ts.close()
        ts.drop()
        row = self.wait_row_closed(seen)
        self.assertEqual(row["close_code"], "1000", row)
        self.assertEqual(row["close_reason"], "Normal Close Tunnel stopped by edge", row)
        # any valid code and reason pass on unchanged
        ts, rac_port, seen = self.sim("close-4000")
        ts.close(4000, "custom reason \u00e9")
        ts.drop()
        row = self.wait_row_closed(seen)
        self.assertEqual((row["close_code"], row["close_reason"]), ("4000", "custom reason \u00e9"), row)
        # TCP dropped without a close: the platform side is closed, the RAC let go
        ts, rac_port, seen = self.sim("close-drop")
        rac = self.rac(rac_port)
        ts.send_data(b"bye")
        self.assertEqual(recv_exact(rac, 3, timeout=5), b"bye")
        t = time.monotonic()
        ts.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        ts.drop()
        row = self.wait_row_closed(seen)
        try:
            self.assertEqual(recv_exact(rac, 1, timeout=5), b"", "the RAC was not closed")
        except ConnectionResetError:
            pass
        took = time.monotonic() - t
        self.assertLess(took, 1.0 * SLACK)
        # a close with an invalid code is covered by test_d2 (1002 back, owner closed)
        print("\ndevice closes: SDK close -> %s %s; TCP reset -> owner closed in %.2f s (%s)"
              % ("1000", "Normal Close Tunnel stopped by edge", took, row.get("close_why")))
        self.harmless()

    def test_d6_more_than_max_tunnels(self):
        _, body = self.emx.http("/tunnels")
        now = len(json.loads(body)["sockets"])
        held = []
        for i in range(MAX_TUNNELS - now):
            held.append(self.sim("limit"))
        refused = {}
        for i in range(12):
            st, head, s = raw_upgrade(self.emx.edge_port, upgrade_head(TUNNEL_PATH + "over-%d" % i))
            s.close()
            refused[st] = refused.get(st, 0) + 1
        # the fake's and the sim's tids alike: the cap comes first
        self.assertEqual(refused, {429: 12})
        self.assertEqual(self.counter('emx_tunnel_sockets_refused_total{reason="process_limit"}'), 12)
        # the tunnels within the cap work
        for ts, rac_port, _ in held:
            rac = self.rac(rac_port)
            ts.send_data(b"ok")
            self.assertEqual(recv_exact(rac, 2, timeout=5), b"ok")
        for ts, _, seen in held:
            ts.close()
            ts.drop()
            self.wait_row_closed(seen)
        # room again once they are gone
        wait_until(lambda: len(json.loads(self.emx.http("/tunnels")[1])["sockets"]) == now, 5,
                   what="relays released")
        st, _, s = raw_upgrade(self.emx.edge_port, upgrade_head(TUNNEL_PATH + "after-limit"))
        s.close()
        self.assertEqual(st, 404)
        self.harmless()

    def test_d7_unknown_tid_burst(self):
        _, totals0 = sim_tunnels(self.plat)
        n = 200
        heads = [upgrade_head(TUNNEL_PATH + ("nosuch-%d" % i if i % 2 else "x%08x~forged-%d" % (i, i)),
                              extra=("appKey: " + self.env.app_key,)) for i in range(n)]
        t = time.monotonic()
        socks = []
        for h in heads:
            s = socket.create_connection(("127.0.0.1", self.emx.edge_port), timeout=10)
            s.sendall(h)
            socks.append(s)
        statuses = {}
        for s in socks:
            buf = b""
            try:
                while b"\r\n\r\n" not in buf:
                    d = s.recv(4096)
                    if not d:
                        break
                    buf += d
            except OSError:
                pass
            s.close()
            st = status_of(buf)
            statuses[st] = statuses.get(st, 0) + 1
        took = time.monotonic() - t
        self.assertEqual(statuses, {404: n})
        self.assertLess(took, 3.0 * SLACK)
        _, totals = sim_tunnels(self.plat)
        self.assertEqual(totals["unknown_tid"], totals0["unknown_tid"], "a back-end socket was opened")
        self.assertEqual(totals["wrong_instance"], totals0["wrong_instance"])
        self.assertEqual(len([u for u in self.fake.upgrades if "forged" in u[0] or "nosuch" in u[0]]), 0)
        print("\n%d unknown-tid upgrades: %s in %.2f s" % (n, statuses, took))
        self.harmless()

    def test_d8_protocol_error_then_silence(self):
        """A device that breaks the protocol and then neither answers the
        close nor drops TCP: the owner's side is not held open for it."""
        ts, rac_port, seen = self.sim("err-silent")
        rac = self.rac(rac_port)
        t = time.monotonic()
        ts.sock.sendall(ws_frame(b"QUJD", 0x1))  # unmasked
        self.expect_close(ts, (1002,))
        row = self.wait_row_closed(seen, timeout=8)
        took = time.monotonic() - t
        try:
            self.assertEqual(recv_exact(rac, 1, timeout=5), b"")
        except ConnectionResetError:
            pass
        print("\nprotocol error, then a silent device: owner closed %s %r after %.2f s"
              % (row.get("close_code"), row.get("close_reason"), took))
        self.assertLess(took, 1.0 * SLACK)
        self.harmless()

    def test_d9_data_pipelined_with_the_upgrade(self):
        """A peer that sends a frame in the same write as its upgrade
        (RFC 6455 §4.1 says wait for the 101): never a stream out of step."""
        tid = self.tid("pipelined")
        out = {}
        th = threading.Thread(target=lambda: out.update(r=self.plat.cmd("tunnel 1 HDev %s 127.0.0.1 9" % tid)))
        th.start()
        seen, _ = self.hdev.take_start()
        st, head, s = raw_upgrade(self.emx.edge_port, upgrade_head(
            TUNNEL_PATH + seen, extra=("appKey: " + self.env.app_key, "Max-Frame-Size: 10922")) +
            masked(0x1, base64.b64encode(b"early")))
        self.closers.append(s.close)
        th.join(20)
        self.assertEqual(st, 101, head)
        rac = self.rac(int(re.search(r"port (\d+)", out["r"]).group(1)))
        s.sendall(masked(0x1, base64.b64encode(b"later")))
        got = recv_exact(rac, 10, timeout=3)
        print("\npipelined frame: the owner got %r" % got)
        self.assertEqual(got, b"earlylater")
        # more early data than the head buffer holds cannot be kept in step: 400
        tid = self.tid("pipelined-big")
        th = threading.Thread(target=lambda: out.update(r=self.plat.cmd("tunnel 1 HDev %s 127.0.0.1 9" % tid)))
        th.start()
        seen, _ = self.hdev.take_start()
        st, head, s = raw_upgrade(self.emx.edge_port, upgrade_head(
            TUNNEL_PATH + seen, extra=("appKey: " + self.env.app_key,)) +
            b"".join(masked(0x1, base64.b64encode(b"e" * 3000)) for _ in range(6)))
        s.close()
        th.join(20)
        self.assertEqual(st, 400, head)
        self.harmless()

    # ================================================== owner side: platform-sim's hooks

    def test_o1_sim_misbehaves(self):
        seen_ops = {}
        # data glued to the 101 by the owner: the device's 101 comes alone
        self.assertEqual(self.plat.cmd("tunnel-misbehave glue"), "ok")
        try:
            ts, rac_port, seen = self.sim("glue")
        finally:
            self.plat.cmd("tunnel-misbehave noglue")
        self.assertEqual(ts.glued, 0, "bytes arrived with the 101")
        op, fin, _, payload, _ = read_frame(ts, time.monotonic() + 5 * SLACK)
        self.assertEqual((op, fin, payload), (0x1, True, b"QUJD"))  # "ABC", base64
        seen_ops["glue"] = payload.decode()
        rac = self.rac(rac_port)
        for what in ("binary", "bigframe", "oversize", "ping"):
            self.assertEqual(self.plat.cmd("tunnel-misbehave %s %s" % (seen.split("~", 1)[-1], what)), "ok")
            if what == "ping":
                # the ping stays with edgemux: the next frame is the RAC's data
                rac.sendall(b"probe")
            deadline = time.monotonic() + 5 * SLACK
            frames = []
            while True:
                op, fin, n7, payload, mbit = read_frame(ts, deadline)
                frames.append((op, fin, len(payload)))
                self.assertLessEqual(len(payload), MAX_FRAME, what)
                self.assertNotEqual(n7, 127, what)
                self.assertEqual(mbit, 0)
                if fin:
                    break
            if what == "ping":
                self.assertEqual((frames[0][0], base64.b64decode(payload)), (0x1, b"probe"),
                                 "the owner's ping reached the device")
            seen_ops[what] = frames
        self.assertEqual(seen_ops["binary"][0][0], 0x2)  # binary stays binary
        self.assertGreater(len(seen_ops["bigframe"]), 1)  # cut to the device's Max-Frame-Size
        self.assertEqual(sum(f[2] for f in seen_ops["bigframe"]), MAX_FRAME + 1)
        print("\nplatform-sim misbehaves:", json.dumps(seen_ops))
        self.harmless()

    # ================================================== owner side: the fake owner

    def test_o2_owner_refuses_or_breaks_the_upgrade(self):
        got = {}
        for name, script, want in (
                ("wrong accept", s_accept(wrong_accept=True), 502),
                ("extension", s_accept(extra=b"Sec-WebSocket-Extensions: permessage-deflate\r\n"), 502),
                ("401", s_refuse(401, b"Unauthorized"), 401),
                ("403", s_refuse(403, b"Forbidden"), 403),
                ("503", s_refuse(503, b"Service Unavailable"), 503),
                ("200", s_refuse(200, b"OK"), 502),
                ("closed at once", lambda o, c, k, h, r: c.close(), 502),
                ("101 without Upgrade", s_raw(lambda key: b"HTTP/1.1 101 Switching Protocols\r\n"
                                              b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_of(key) +
                                              b"\r\n\r\n"), 502),
                ("101 with 9 KiB of headers", s_raw(lambda key: b"HTTP/1.1 101 Switching Protocols\r\n"
                                                    b"Upgrade: websocket\r\nConnection: Upgrade\r\n" +
                                                    b"X-Pad: " + b"p" * 9000 + b"\r\nSec-WebSocket-Accept: " +
                                                    accept_of(key) + b"\r\n\r\n"), 502),
                ("101 one byte at a time", s_raw(lambda key: b"HTTP/1.1 101 Switching Protocols\r\n"
                                                 b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                                                 b"Sec-WebSocket-Accept: " + accept_of(key) + b"\r\n\r\n",
                                                 drip=True), 101),
                ("never answers", s_silent, 504)):
            t = time.monotonic()
            ts, tid = self.fake_tunnel(name.replace(" ", "-"), script)
            took = time.monotonic() - t
            got[name] = [ts.status, round(took, 2)]
            self.assertEqual(ts.status, want, (name, ts.head))
            self.assertEqual(ts.glued, 0)
            if want == 504:
                self.assertGreaterEqual(took, CONNECT_S - 0.1)
                self.assertLess(took, CONNECT_S + 1.0 * SLACK)
            ts.drop()
        # the device leaves while the owner has not answered: edgemux lets
        # go of its back end
        ts, tid = None, self.tid("peer-left")
        self.fake.scripts[tid] = s_silent
        eid = self.plat.binds()["things"]["HDev"]["endpoint"]
        self.fake.start_tunnel(eid, self.hdev.sid, "HDev", tid)
        seen, _ = self.hdev.take_start()
        s = socket.create_connection(("127.0.0.1", self.emx.edge_port))
        s.sendall(upgrade_head(TUNNEL_PATH + seen, extra=("appKey: " + self.env.app_key,)))
        wait_until(lambda: any(u[0] == tid for u in self.fake.upgrades), 5, what="the back end's upgrade")
        held = self.fake.held[-1]
        s.close()
        held.settimeout(2 * SLACK)
        try:
            self.assertEqual(held.recv(10), b"", "the back end stayed open after the device left")
        except ConnectionResetError:
            pass
        got["device left before the owner answered"] = "back end closed"
        for c in getattr(self.fake, "held", []):
            c.close()
        self.fake.held = []
        # the fake saw the device's appKey and Max-Frame-Size copied, no extension offered
        hdrs = [h for t, h in self.fake.upgrades if t.startswith("never-answers")][-1]
        self.assertEqual(hdrs.get("appkey"), self.env.app_key)
        self.assertEqual(hdrs.get("max-frame-size"), str(MAX_FRAME))
        self.assertNotIn("sec-websocket-extensions", hdrs)
        print("\nowner refusals (device status, seconds):", json.dumps(got))
        self.harmless()

    def test_o3_owner_glues_data_to_its_101(self):
        ts, ft = self.fake_open("glue101", glue=ws_frame(base64.b64encode(b"glued"), 0x1))
        self.assertEqual(ts.glued, 0, "the owner's data came with the device's 101")
        kind, data = ts.recv_message(timeout=5)
        self.assertEqual((kind, data), ("text", b"glued"))
        self.harmless()

    def test_o4_owner_frames(self):
        got = {}
        # a text message in one frame far above the device's Max-Frame-Size,
        # and one with a 64-bit length (70,000 bytes): cut into fragments
        ts, ft = self.fake_open("bigframes")
        for name, frame, n in (
                ("20000 in one frame", ws_frame(b"A" * 20000, 0x1), 20000),
                ("70000 with a 64-bit length", struct.pack(">BBQ", 0x81, 127, 70000) + b"B" * 70000, 70000)):
            ft.send(frame)
            deadline = time.monotonic() + 5 * SLACK
            frames, total = [], 0
            while True:
                op, fin, n7, payload, mbit = read_frame(ts, deadline)
                frames.append(len(payload))
                self.assertNotEqual(n7, 127, "a 64-bit length toward the device")
                self.assertLessEqual(len(payload), MAX_FRAME)
                self.assertEqual(op, 0x1 if len(frames) == 1 else 0x0)
                total += len(payload)
                if fin:
                    break
            self.assertEqual(total, n)
            got[name] = frames
        # pings from the owner: answered by edgemux, never forwarded
        for i in range(50):
            ft.send(ws_frame(b"op%d" % i, 0x9))
        ft.send(ws_frame(base64.b64encode(b"after"), 0x1))
        op, fin, _, payload, _ = read_frame(ts, time.monotonic() + 5)
        self.assertEqual((op, payload), (0x1, base64.b64encode(b"after")), "a ping reached the device")
        wait_until(lambda: ft.ops().count(0xA) >= 1, 5, what="a pong to the owner")
        got["pongs to the owner"] = ft.ops().count(0xA)
        # a close whose reason holds "Tunnel stopped by edge": not that text toward the device
        ft.send(ws_frame(struct.pack(">H", 1000) + b"Normal Close Tunnel stopped by edge", 0x8))
        code, reason = self.expect_close(ts, (1000,))
        self.assertNotIn("Tunnel stopped by edge", reason)
        got["owner close 'Tunnel stopped by edge'"] = [code, reason]
        print("\nowner frames:", json.dumps(got))
        self.harmless()

    def test_o5_owner_masks_its_frames(self):
        ts, ft = self.fake_open("masked")
        ft.send(masked(0x1, base64.b64encode(b"hidden"), key=b"\x01\x02\x03\x04"))
        t = time.monotonic()
        code, reason = self.expect_close(ts, (1011,))
        self.assertLess(time.monotonic() - t, 1.0 * SLACK)
        wait_until(lambda: ft.close_frame() is not None, 5 * SLACK, what="a close toward the owner")
        self.assertEqual(ft.close_frame()[0], 1002)
        print("\nmasked owner frame: owner got %s, device got %s" % (ft.close_frame(), (code, reason)))
        self.harmless()

    def test_o6_owner_drops_tcp_mid_tunnel(self):
        ts, ft = self.fake_open("drop")
        ft.send(ws_frame(base64.b64encode(b"before"), 0x1))
        self.assertEqual(ts.recv_message(timeout=5), ("text", b"before"))
        t = time.monotonic()
        ft.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ft.drop()
        code, reason = self.expect_close(ts, (1011, 1001))
        took = time.monotonic() - t
        self.assertLess(took, 1.0 * SLACK)
        self.assertNotIn("Tunnel stopped by edge", reason)
        print("\nowner dropped TCP: device closed %d %r after %.3f s" % (code, reason, took))
        self.harmless()


    def test_o7_owner_stops_reading(self):
        """The device sends 20 MiB while the owner reads nothing: edgemux
        holds a bounded amount and stops reading the device; once the owner
        reads again every byte arrives in order."""
        ts, ft = self.fake_open("owner-noread")
        ft.reading.clear()
        total = 20 * MIB
        data = os.urandom(total)
        step = 8176
        wire = b"".join(masked(0x1, base64.b64encode(data[i:i + step])) for i in range(0, total, step))
        sent = [0]

        def writer():
            view = memoryview(wire)
            try:
                while sent[0] < len(wire):
                    if not select.select([], [ts.sock], [], 0.2)[1]:
                        continue
                    sent[0] += ts.sock.send(view[sent[0]:sent[0] + 256 * KIB])
            except OSError:
                pass
        w = threading.Thread(target=writer, daemon=True)
        w.start()
        pid = self.emx.proc.pid
        peak = rss_kib(pid)
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            peak = max(peak, rss_kib(pid))
            time.sleep(0.1)
        stalled_at = sent[0]
        time.sleep(0.7)
        peak = max(peak, rss_kib(pid))
        self.assertLess(sent[0] - stalled_at, 512 * KIB, "the device kept writing: no back-pressure")
        self.assertLess(sent[0], len(wire) // 2)
        self.assertLess(peak - self.rss0, 20 * 1024 * SLACK)
        self.harmless(rss_bound_kib=20 * 1024 * SLACK)
        ft.reading.set()
        t = time.monotonic()

        nmsgs = (total + step - 1) // step

        def received():
            with ft.lock:
                return sum(1 for op, _, _ in ft.frames if op == 0x1)
        wait_until(lambda: received() >= nmsgs, 60 * SLACK, interval=0.2, what="the owner got everything")
        w.join(10)
        with ft.lock:
            msgs = [p for op, fin, p in ft.frames if op == 0x1]
        got = b"".join(base64.b64decode(m) for m in msgs)
        self.assertEqual(len(got), total)
        self.assertTrue(got == data, "bytes out of order or changed")
        print("\nowner stopped reading: the device stalled at %.1f MiB of %.1f; edgemux RSS peak +%d KiB; "
              "drained in %.1f s" % (stalled_at / MIB, len(wire) / MIB, peak - self.rss0, time.monotonic() - t))
        self.harmless()


if __name__ == "__main__":
    unittest.main()
