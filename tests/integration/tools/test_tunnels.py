"""Remote Access tunnels between the test tools, without edgemux: platform-sim
(two instances, one process) starts tunnels on an edge-sim device that is
connected directly to instance 1; a Python TCP echo server is the device's
local target and Python sockets stand for the Remote Access client (RAC).

Environment: EMX_PLATFORM_SIM, EMX_EDGE_SIM (the binaries). Standard library
only."""

import base64
import os
import re
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.parse

PLATFORM_SIM = os.environ.get("EMX_PLATFORM_SIM", "platform-sim")
EDGE_SIM = os.environ.get("EMX_EDGE_SIM", "edge-sim")
KEY = "d0a1b2c3-e4f5-4a6b-8c7d-9e0f1a2b3c4d"
THING = "sim-edge-0-thing-0"
MIB = 1 << 20


def wait_until(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError("timed out waiting for " + what)


class EchoServer:
    """A threaded TCP echo server: the tunnel's local target."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self.conns = 0
        self.lock = threading.Lock()
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closing:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        with c:
            while True:
                try:
                    d = c.recv(65536)
                except OSError:
                    return
                if not d:
                    return
                with self.lock:
                    self.received += len(d)
                c.sendall(d)

    def close(self):
        self.closing = True
        self.sock.close()


class Control:
    """platform-sim's control channel: one command, one reply (the `tunnels`
    reply ends with its `tunnels ...` totals line)."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.f = self.sock.makefile("rw")

    def cmd(self, line):
        self.f.write(line + "\n")
        self.f.flush()
        return self.f.readline().rstrip("\n")

    def tunnels(self):
        self.f.write("tunnels\n")
        self.f.flush()
        rows = {}
        while True:
            line = self.f.readline().rstrip("\n")
            kind, _, rest = line.partition(" ")
            kv = {}
            for item in rest.split(" "):
                k, _, v = item.partition("=")
                kv[k] = urllib.parse.unquote(v)
            if kind == "tunnels":
                return rows, kv
            if kind != "tunnel":
                raise AssertionError("unexpected tunnels line: " + line)
            rows[kv["tid"]] = kv

    def close(self):
        self.sock.close()


def recv_exact(sock, n, timeout=30):
    sock.settimeout(timeout)
    buf = bytearray()
    while len(buf) < n:
        d = sock.recv(min(65536, n - len(buf)))
        if not d:
            break
        buf.extend(d)
    return bytes(buf)


def http_upgrade(port, path, headers):
    """A raw WebSocket upgrade; returns (status, socket, bytes after the head)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    req = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n" % (path, key))
    for k, v in headers.items():
        req += "%s: %s\r\n" % (k, v)
    s.sendall((req + "\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        d = s.recv(4096)
        if not d:
            break
        head += d
    status = int(head.split(b" ", 2)[1]) if head else 0
    rest = head.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in head else b""
    return status, s, rest


def ws_send_text(sock, text):
    """A masked client text frame."""
    data = text.encode()
    mask = os.urandom(4)
    n = len(data)
    if n < 126:
        hdr = struct.pack(">BB", 0x81, 0x80 | n)
    else:
        hdr = struct.pack(">BBH", 0x81, 0x80 | 126, n)
    sock.sendall(hdr + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(data)))


def ws_recv(sock, pending=b""):
    """One server frame: (fin, opcode, payload, rest of the buffer)."""
    buf = bytearray(pending)

    def need(k):
        while len(buf) < k:
            d = sock.recv(65536)
            if not d:
                raise AssertionError("socket closed")
            buf.extend(d)
    need(2)
    b0, b1 = buf[0], buf[1]
    n, pos = b1 & 0x7F, 2
    if n == 126:
        need(4)
        n, pos = struct.unpack(">H", buf[2:4])[0], 4
    elif n == 127:
        need(10)
        n, pos = struct.unpack(">Q", buf[2:10])[0], 10
    need(pos + n)
    return b0 & 0x80, b0 & 0x0F, bytes(buf[pos:pos + n]), bytes(buf[pos + n:])


class Tunnels(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="emx-tunnels-")
        self.echo = EchoServer()
        self.addCleanup(self.echo.close)
        self.plog = open(os.path.join(self.tmp, "platform-sim.log"), "w+")
        self.plat = subprocess.Popen(
            [PLATFORM_SIM, "--instances", "2", "--port", "0", "--control", "0", "--app-key", KEY,
             "--quiet"], stdout=subprocess.PIPE, stderr=self.plog, text=True)
        self.addCleanup(self._stop_platform)
        line = self.plat.stdout.readline()
        m = re.search(r"control=(\d+) ports=(\d+),(\d+)", line)
        self.assertTrue(m, "platform-sim did not start: %r" % line)
        self.ctl_port, self.port1, self.port2 = (int(x) for x in m.groups())
        self.ctl = Control(self.ctl_port)
        self.addCleanup(self.ctl.close)
        self.elog = open(os.path.join(self.tmp, "edge-sim.log"), "w+")
        self.edge = subprocess.Popen(
            [EDGE_SIM, "--url", "ws://127.0.0.1:%d/Thingworx/WS" % self.port1, "--app-key", KEY,
             "--rate", "0", "--duration", "300", "--drain", "2", "--max-connect-delay", "10ms",
             "--quiet"], stdout=subprocess.PIPE, stderr=self.elog, text=True)
        self.addCleanup(self._kill_edge)
        wait_until(lambda: THING in self.ctl.cmd("binds"), 10, "the device's BIND")

    def _stop_platform(self):
        if self.plat.poll() is None:
            self.plat.terminate()
            self.plat.wait(10)
        self.plat.stdout.close()
        self.plog.close()

    def _kill_edge(self):
        if self.edge.poll() is None:
            self.edge.kill()
            self.edge.wait(10)
        self.edge.stdout.close()
        self.elog.close()

    def edge_summary(self):
        """SIGINT edge-sim, wait for its summary; returns (exit code, key=value dict)."""
        self.edge.send_signal(signal.SIGINT)
        out, _ = self.edge.communicate(timeout=30)
        kv = {}
        for m in re.finditer(r"(\w+)=(\d+)", out):
            kv[m.group(1)] = int(m.group(2))
        self.assertIn("glued_bytes", kv, out)
        return self.edge.returncode, kv, out

    def start_tunnel(self, tid, instance=1, extra=""):
        r = self.ctl.cmd("tunnel %d %s %s 127.0.0.1 %d%s" % (instance, THING, tid,
                                                             self.echo.port, extra))
        m = re.fullmatch(r"answer 0x40 SUCCESS port (\d+)", r)
        self.assertTrue(m, r)
        return int(m.group(1))

    def tunnel(self, tid):
        rows, _ = self.ctl.tunnels()
        return rows.get(tid)

    def wait_open(self, tid):
        wait_until(lambda: (self.tunnel(tid) or {}).get("state") == "open", 10,
                   "tunnel %s open" % tid)
        time.sleep(0.1)  # the relay starts 50 ms after the 101

    def test_echo_complete_wrong_instance(self):
        rac_port = self.start_tunnel("tun-1")
        self.wait_open("tun-1")
        rac = socket.create_connection(("127.0.0.1", rac_port), timeout=30)
        data = os.urandom(MIB)
        got = {}
        reader = threading.Thread(target=lambda: got.setdefault("d", recv_exact(rac, MIB)))
        reader.start()
        rac.sendall(data)
        reader.join(60)
        self.assertEqual(len(got.get("d", b"")), MIB)
        self.assertTrue(got["d"] == data, "echoed bytes differ")

        t = self.tunnel("tun-1")
        self.assertEqual(int(t["to_device_raw"]), MIB)
        self.assertEqual(int(t["from_device_raw"]), MIB)
        self.assertEqual(t["max_frame_size"], "10922")
        self.assertLessEqual(int(t["max_frame_to_device"]), 10922)
        self.assertEqual(t["user_agent"], "ThingWorx C SDK")
        self.assertEqual(t["xff_present"], "0")
        self.assertEqual(t["binary_from_device"], "0")
        self.assertEqual(t["bad_base64_from_device"], "0")
        self.assertEqual(t["instance"], "1")

        # CompleteTunnel: SUCCESS, the device's CANCEL, then its close frame.
        self.assertEqual(self.ctl.cmd("tunnel-complete 1 %s tun-1 test done" % THING),
                         "answer 0x40 SUCCESS")
        wait_until(lambda: (self.tunnel("tun-1") or {}).get("state") == "closed", 10,
                   "tun-1 closed")
        t = self.tunnel("tun-1")
        self.assertEqual(t["cancels"], "1")
        self.assertEqual(t["close_code"], "1000")
        self.assertEqual(t["close_reason"], "Normal Close Tunnel stopped by edge")
        rac.settimeout(5)
        self.assertEqual(rac.recv(1), b"", "the RAC connection was not closed")
        rac.close()
        # The tid is gone: a CompleteTunnel for it is refused by the device.
        self.assertEqual(self.ctl.cmd("tunnel-complete 1 %s tun-1" % THING),
                         "answer 0x80 BAD_REQUEST")

        # Owned by instance 2, but the device dials its AlwaysOn host and
        # port (instance 1): 404, counted, and the device cancels.
        self.start_tunnel("tun-2", instance=2)
        wait_until(lambda: (self.tunnel("tun-2") or {}).get("cancels") == "1", 10,
                   "CANCEL for tun-2")
        t = self.tunnel("tun-2")
        self.assertEqual(t["wrong_instance"], "1")
        self.assertEqual(t["state"], "closed")

        # The sim's own upgrade checks, from a raw client.
        self.start_tunnel("tun-3", extra=" 8192 30000 1")
        self.wait_open("tun-3")
        st, s, _ = http_upgrade(self.port1, "/Thingworx/WSTunnelServer/nope", {"appKey": KEY})
        s.close()
        self.assertEqual(st, 404)
        st, s, _ = http_upgrade(self.port2, "/Thingworx/WSTunnelServer/tun-3", {"appKey": KEY})
        s.close()
        self.assertEqual(st, 404)
        st, s, _ = http_upgrade(self.port1, "/Thingworx/WSTunnelServer/tun-3", {})
        s.close()
        self.assertEqual(st, 401)
        st, s, _ = http_upgrade(self.port1, "/Thingworx/WSTunnelServer/tun-3", {"appKey": KEY})
        s.close()
        self.assertEqual(st, 409)
        rows, tot = self.ctl.tunnels()
        self.assertEqual(rows["tun-3"]["wrong_instance"], "1")
        self.assertEqual(tot["wrong_instance"], "2")
        self.assertEqual(tot["unknown_tid"], "1")

        rc, kv, out = self.edge_summary()
        self.assertEqual(rc, 0, out)
        self.assertEqual(kv["glued_bytes"], 0, out)
        self.assertEqual(kv["opened"], 2, out)
        self.assertEqual(kv["upgrade_refused"], 1, out)
        self.assertEqual(kv["last_refused_status"], 404, out)
        self.assertEqual(kv["bytes_to_platform"], MIB, out)
        self.assertEqual(kv["bytes_from_platform"], MIB, out)
        self.assertGreaterEqual(kv["cancels_sent"], 2, out)
        self.assertLessEqual(kv["max_frame_in"], 10922, out)
        self.assertEqual(kv["binary_dropped"], 0, out)

    def test_device_strictness(self):
        # Data glued to the 101 is dropped by the device and counted.
        self.assertEqual(self.ctl.cmd("tunnel-misbehave glue"), "ok")
        rac_port = self.start_tunnel("tun-g", extra=" 4096")
        self.assertEqual(self.ctl.cmd("tunnel-misbehave noglue"), "ok")
        self.wait_open("tun-g")
        rac = socket.create_connection(("127.0.0.1", rac_port), timeout=10)
        rac.sendall(b"hello")
        self.assertEqual(recv_exact(rac, 5), b"hello")
        for kind in ("binary", "oversize", "ping"):
            self.assertEqual(self.ctl.cmd("tunnel-misbehave tun-g " + kind), "ok")
        rac.sendall(b"again")
        self.assertEqual(recv_exact(rac, 5), b"again")
        rac.settimeout(0.3)
        with self.assertRaises(socket.timeout):
            rac.recv(1)  # nothing else: "ABC" and the dropped messages never arrive
        # A frame above the device's Max-Frame-Size breaks the socket: CANCEL.
        self.assertEqual(self.ctl.cmd("tunnel-misbehave tun-g bigframe"), "ok")
        wait_until(lambda: (self.tunnel("tun-g") or {}).get("cancels") == "1", 10,
                   "CANCEL after an oversized frame")
        t = self.tunnel("tun-g")
        self.assertEqual(t["max_frame_size"], str(4096 * 4 // 3))
        rac.close()
        self.assertEqual(self.echo.received, 10)

        rc, kv, out = self.edge_summary()
        self.assertEqual(rc, 0, out)
        self.assertEqual(kv["glued_bytes"], 6, out)
        self.assertEqual(kv["binary_dropped"], 1, out)
        self.assertEqual(kv["oversize_dropped"], 1, out)
        self.assertEqual(kv["pings_ignored"], 1, out)
        self.assertEqual(kv["socket_errors"], 1, out)

    def test_client_socket(self):
        # A RAC attached as /Thingworx/WSTunnelClient/<tid>: messages pass unchanged.
        self.start_tunnel("tun-c")
        self.wait_open("tun-c")
        st, s, _ = http_upgrade(self.port1, "/Thingworx/WSTunnelClient/tun-c", {})
        s.close()
        self.assertEqual(st, 401)
        st, s, rest = http_upgrade(self.port1, "/Thingworx/WSTunnelClient/tun-c",
                                   {"Cookie": "JSESSIONID=abc"})
        self.assertEqual(st, 101)
        s.settimeout(10)
        payload = os.urandom(3000)
        ws_send_text(s, base64.b64encode(payload).decode())
        fin, op, data, rest = ws_recv(s, rest)
        self.assertEqual((fin, op), (0x80, 1))
        self.assertEqual(base64.b64decode(data), payload)
        t = self.tunnel("tun-c")
        self.assertEqual(t["cookie"], "JSESSIONID=abc")
        self.assertEqual(t["client_connected"], "1")
        s.close()
        # The client leaving ends the tunnel: the device socket gets 1000 and cancels.
        wait_until(lambda: (self.tunnel("tun-c") or {}).get("cancels") == "1", 10,
                   "CANCEL after the client left")
        rc, kv, out = self.edge_summary()
        self.assertEqual(rc, 0, out)
        self.assertEqual(kv["server_closes"], 1, out)
        self.assertEqual(kv["glued_bytes"], 0, out)

    def test_crash_drops_tunnel(self):
        # Killing the owner instance drops the tunnel's sockets with it.
        rac_port = self.start_tunnel("tun-x")
        self.wait_open("tun-x")
        rac = socket.create_connection(("127.0.0.1", rac_port), timeout=10)
        rac.sendall(b"ping")
        self.assertEqual(recv_exact(rac, 4), b"ping")
        self.assertEqual(self.ctl.cmd("crash 1"), "ok")
        rac.settimeout(5)
        self.assertEqual(rac.recv(1), b"", "the RAC connection outlived the instance")
        rac.close()
        t = self.tunnel("tun-x")
        self.assertEqual(t["state"], "closed")
        self.assertEqual(t["close_why"], "instance crashed")
        self.assertEqual(self.ctl.cmd("restore 1"), "ok")
        rc, kv, out = self.edge_summary()
        self.assertEqual(kv["closed"], 1, out)
        self.assertEqual(kv["active"], 0, out)
        self.assertEqual(kv["socket_errors"], 1, out)

    def test_idle_timeout(self):
        # No device -> platform data for idle_timeout: CANCEL (repeated per
        # round trip); the sim closes the device socket, and the tunnel ends.
        self.start_tunnel("tun-i", extra=" 8192 400")
        self.wait_open("tun-i")
        wait_until(lambda: (self.tunnel("tun-i") or {}).get("state") == "closed", 10,
                   "the idle tunnel closed")
        self.assertGreaterEqual(int(self.tunnel("tun-i")["cancels"]), 1)
        rc, kv, out = self.edge_summary()
        self.assertEqual(rc, 0, out)
        self.assertEqual(kv["idle_timeouts"], 1, out)
        self.assertEqual(kv["server_closes"], 1, out)
        self.assertEqual(kv["active"], 0, out)


if __name__ == "__main__":
    unittest.main()
