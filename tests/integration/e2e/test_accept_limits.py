"""The ws transport accepts edges itself: it stops accepting at the
open-file limit minus transport.fd_reserve and while max_http_header_pool
edges are between accept and upgrade. Connections beyond either cap wait in
the listen backlog (no EMFILE, nothing dropped) and are served once room
frees up."""

import select
import socket
import time
import unittest

from harness import SUCCESS, E2ETest, Edgemux, Platform, wait_until

UPGRADE = ("GET /Thingworx/WS HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           "Sec-WebSocket-Version: 13\r\n\r\n").encode()


def send_upgrade(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(UPGRADE)
    return s


def answered(sock, timeout):
    """True when the upgrade was answered 101 within timeout seconds."""
    r, _, _ = select.select([sock], [], [], timeout)
    if not r:
        return False
    head = sock.recv(4096)
    return head.startswith(b"HTTP/1.1 101")


class AcceptLimits(E2ETest):
    def test_file_limit_leaves_the_rest_in_the_backlog(self):
        plat = Platform(self.env, 1)
        # 400 files, 300 kept: at most 100 edge sockets
        emx = Edgemux(self.env, "emx-fd", plat.ports, wrapper=["prlimit", "--nofile=400:400"],
                      overrides={"transport": {"fd_reserve": 300}})
        emx.wait_ready()
        edges = [emx.edge() for _ in range(100)]
        waiting = [send_upgrade(emx.edge_port) for _ in range(10)]
        for s in waiting:
            self.assertFalse(answered(s, 0.3), "an edge past the cap was upgraded")
        for e in edges[:10]:
            e.close()
        for s in waiting:
            self.assertTrue(answered(s, 5), "a waiting edge was not served once room freed up")
        # the ones held all along still work
        code, _ = edges[50].auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        self.assertTrue(emx.proc.alive())
        self.assertNotIn("accept failed", emx.log())
        self.assertNotIn("Too many open files", emx.log())
        for s in waiting:
            s.close()
        for e in edges[10:]:
            e.close()

    def test_handshake_cap_holds_new_edges_until_a_slot_frees(self):
        # With eviction as slow as the handshake timeout, a full pool keeps
        # new sockets in the backlog until a slot frees.
        plat = Platform(self.env, 1)
        emx = Edgemux(self.env, "emx-hs", plat.ports,
                      overrides={"transport": {"max_http_header_pool": 4,
                                               "handshake_timeout": "2s",
                                               "handshake_evict": "2s"}})
        emx.wait_ready()
        silent = [socket.create_connection(("127.0.0.1", emx.edge_port)) for _ in range(4)]
        time.sleep(0.3)  # let edgemux accept them: the cap is now full
        t0 = time.monotonic()
        late = send_upgrade(emx.edge_port)
        self.assertFalse(answered(late, 1.0), "accepted past max_http_header_pool")
        # the silent sockets hit the handshake timeout; then the late edge is served
        self.assertTrue(answered(late, 5), "the waiting edge was never served")
        self.assertGreater(time.monotonic() - t0, 1.5)
        for s in silent:
            s.settimeout(2)
            try:
                self.assertEqual(s.recv(1), b"", "a silent socket was not dropped")
            except ConnectionResetError:
                pass
            s.close()
        late.close()
        # a normal edge gets through at once now
        e = emx.edge(app_key=self.env.app_key)
        code, _ = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        e.close()

    def test_full_handshake_pool_drops_its_oldest_silent_socket(self):
        # Fast eviction: silent sockets cannot hold a full pool; a device
        # behind them upgrades at once and the oldest are dropped.
        plat = Platform(self.env, 1)
        emx = Edgemux(self.env, "emx-ev", plat.ports,
                      overrides={"transport": {"max_http_header_pool": 4,
                                               "handshake_evict": "100ms",
                                               "handshake_timeout": "10s"}})
        emx.wait_ready()
        silent = [socket.create_connection(("127.0.0.1", emx.edge_port)) for _ in range(8)]
        time.sleep(0.3)
        t0 = time.monotonic()
        e = emx.edge(app_key=self.env.app_key)
        code, _ = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        self.assertLess(time.monotonic() - t0, 1.0)
        dropped = 0
        for s in silent[:4]:
            s.settimeout(2)
            try:
                dropped += s.recv(1) == b""
            except ConnectionResetError:
                dropped += 1
        self.assertEqual(dropped, 4, "the oldest silent sockets were not dropped")
        for s in silent:
            s.close()
        e.close()


if __name__ == "__main__":
    unittest.main()
