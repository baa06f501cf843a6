"""A platform that accepts a pipe's AUTH and then closes it at once (seen:
326 reconnects and 657 log lines in 5 s). The pipe must back off as if it
could not connect, and the repeated failure is logged at warn once, the
repeats at debug."""

import base64
import hashlib
import socket
import struct
import threading
import time
import unittest

from harness import SUCCESS, WORKERS, E2ETest, Edgemux, ao_parse, ao_response

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class AuthThenClose:
    """Accepts WebSocket upgrades, answers the first message (the pipe's
    AUTH) with success, and closes the connection right after."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.authed = 0
        self.by_server = {}  # upgrades per X-Edgemux-Server (one per worker)
        self.stop = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            try:
                self.serve(c)
            except (OSError, ValueError, struct.error):
                pass
            finally:
                c.close()

    def read(self, c, n):
        b = b""
        while len(b) < n:
            chunk = c.recv(n - len(b))
            if not chunk:
                raise OSError("closed")
            b += chunk
        return b

    def serve(self, c):
        c.settimeout(2)
        req = b""
        while b"\r\n\r\n" not in req:
            chunk = c.recv(4096)
            if not chunk:
                return
            req += chunk
        key = [l.split(b":", 1)[1].strip() for l in req.split(b"\r\n")
               if l.lower().startswith(b"sec-websocket-key:")][0]
        server = [l.split(b":", 1)[1].strip().decode() for l in req.split(b"\r\n")
                  if l.lower().startswith(b"x-edgemux-server:")]
        server = server[0] if server else "?"
        self.by_server[server] = self.by_server.get(server, 0) + 1
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        b0, b1 = self.read(c, 2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self.read(c, 2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self.read(c, 8))[0]
        mask = self.read(c, 4) if b1 & 0x80 else b"\0\0\0\0"
        data = bytes(x ^ mask[i % 4] for i, x in enumerate(self.read(c, n)))
        _, rid, _, _, _ = ao_parse(data)
        msg = ao_response(SUCCESS, rid, 0, 1)
        c.sendall(bytes([0x82, len(msg)]) + msg)
        self.authed += 1
        time.sleep(0.02)  # long enough for edgemux to read the answer

    def close(self):
        self.stop = True
        self.thread.join(2)
        self.sock.close()


class PipeBackoff(E2ETest):
    def test_pipe_closed_after_auth_backs_off(self):
        plat = AuthThenClose()
        try:
            emx = Edgemux(self.env, "emx-backoff", [plat.port],
                          overrides={"platform": {"pipes_per_instance": 1,
                                                  "reconnect_min": "100ms",
                                                  "reconnect_max": "2s"}})
            time.sleep(6)
            accepted, authed = plat.accepted, plat.authed
            by_server = dict(plat.by_server)
        finally:
            plat.close()
        log = emx.log()
        self.assertGreaterEqual(authed, 3, "the platform should have seen AUTHs")
        self.assertEqual(sum(by_server.values()), accepted)
        # Each worker has its own pipe and backs it off on its own: the
        # bounds below hold per worker (identity name/k with several).
        names = ["emx-backoff"] if WORKERS == 1 else ["emx-backoff/%d" % k for k in range(WORKERS)]
        self.assertEqual(sorted(by_server), sorted(names), by_server)
        prefixes = [""] if WORKERS == 1 else ["w%d: " % k for k in range(WORKERS)]
        for name, prefix in zip(names, prefixes):
            # 100 ms doubling to 2 s (jittered down to half): at most ~10 in
            # 6 s; without backoff it is one every 50-100 ms (60+).
            self.assertLessEqual(by_server[name], 14, "%d reconnects of %s in 6 s" % (by_server[name], name))
            warn = [l for l in log.splitlines()
                    if " warn " in l and "] %sinstance" % prefix in l and "pipe 0 closed" in l]
            self.assertGreaterEqual(len(warn), 1, name)
            self.assertLessEqual(len(warn), 2, "\n".join(warn))
            self.assertIn("ms up", warn[0])


if __name__ == "__main__":
    unittest.main()
