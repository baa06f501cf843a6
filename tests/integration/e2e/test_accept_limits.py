"""The ws transport accepts edges itself: it stops accepting at the
open-file limit minus transport.fd_reserve and while max_http_header_pool
edges are between accept and upgrade. Connections beyond either cap wait in
the listen backlog (no EMFILE, nothing dropped) and are served once room
frees up.

With server.workers N each worker's transport has its own handshake pool
of max_http_header_pool and holds an even share of the open-file budget,
and each worker has its own SO_REUSEPORT listener and backlog
(docs/operations.md, "Workers"). The kernel hands a connection to a
listener by a hash of its address and port pair, the same for the same
pair while the listeners stay; a worker that holds clearly more sockets
than another hands new ones over, and a worker at its share hands each new
one to a worker with room. The tests learn which source ports reach which
worker (through upgrades the admin API shows with their worker), then
fill the workers in turn so their counts stay level and the kernel's pick
stands, and wait on every worker's own caps; the file budget is the
process's: room on one worker serves sockets waiting at the others."""

import json
import random
import re
import select
import socket
import struct
import time
import unittest

from harness import (CLOSED_HI, CLOSED_LO, SLACK, SUCCESS, WORKERS, E2ETest, Edgemux, Platform, RawEdge,
                     wait_until, worker_of)

UPGRADE = ("GET /Thingworx/WS HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           "Sec-WebSocket-Version: 13\r\n\r\n").encode()



def connect_from(src_port, port):
    """A TCP connection to the edge port from 127.0.0.1:src_port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", src_port))
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
    except OSError:
        s.close()
        raise
    return s


def send_upgrade(port, src_port):
    s = connect_from(src_port, port)
    s.sendall(UPGRADE)
    return s


def answered(sock, timeout):
    """True when the upgrade was answered 101 within timeout seconds."""
    r, _, _ = select.select([sock], [], [], timeout)
    if not r:
        return False
    sock.settimeout(5)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return head.startswith(b"HTTP/1.1 101")


def reset_close(sock):
    """Close with a reset: no TIME_WAIT on either side, so the same
    address pair can connect again at once."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class UpgradedEdge(RawEdge):
    """A RawEdge over a socket this test connected and upgraded itself."""

    def __init__(self, sock):  # pylint: disable=super-init-not-called
        self.sock = sock
        self.buf = b""
        self.frames = []
        self.close_code = None


def edges_by_port(emx):
    """{source port: worker} of every upgraded edge the admin API lists."""
    status, body = emx.http("/edges")
    assert status == 200, (status, body)
    return {int(e["peer"].rsplit(":", 1)[1]): worker_of(e["endpointId"])
            for e in json.loads(body)["edges"]}


def worker_sockets(emx):
    """[device sockets each worker's transport holds] (emx_worker_sockets)."""
    status, body = emx.http("/metrics")
    assert status == 200, status
    got = {int(m.group(1)): int(float(m.group(2))) for m in
           re.finditer(r'^emx_worker_sockets\{worker="(\d+)"\} (\S+)$', body, re.M)}
    return [got.get(k) for k in range(WORKERS)]


def level(emx, n):
    """With several workers: wait until every worker holds n sockets, so
    that none gets far enough ahead to hand the next one over."""
    if WORKERS > 1:
        wait_until(lambda: worker_sockets(emx) == [n] * WORKERS, 5 * SLACK,
                   what="%d sockets on every worker" % n)


def learn_ports(test, emx, per_worker, batch=2):
    """{worker: [source ports]}, at least per_worker ports for every worker:
    ports whose connections the kernel hands to that worker's listener.
    Two at a time: no worker gets far enough ahead to hand one over."""
    found = {k: [] for k in range(WORKERS)}
    tried = set()
    rng = random.Random()
    for _ in range(2000):
        if all(len(v) >= per_worker for v in found.values()):
            return found
        socks = {}
        while len(socks) < batch:
            # below the ephemeral range, among the ports no test's server
            # takes (a source port held here would make its bind fail)
            p = rng.randrange(CLOSED_LO, CLOSED_HI)
            if p in tried:
                continue
            tried.add(p)
            try:
                socks[p] = send_upgrade(emx.edge_port, p)
            except OSError:
                continue
        for s in socks.values():
            test.assertTrue(answered(s, 5), "an upgrade while learning ports was not answered")
        by_port = edges_by_port(emx)
        for p, s in socks.items():
            found[by_port[p]].append(p)
            reset_close(s)
        wait_until(lambda: not edges_by_port(emx), 5 * SLACK, what="the learning edges gone")
    test.fail("source ports did not reach every worker: %r" % {k: len(v) for k, v in found.items()})


class AcceptLimits(E2ETest):
    def test_file_limit_leaves_the_rest_in_the_backlog(self):
        plat = Platform(self.env, 1)
        # 400 files, 300 kept: at most 100 edge sockets, each worker its
        # share of them
        emx = Edgemux(self.env, "emx-fd", plat.ports, wrapper=["prlimit", "--nofile=400:400"],
                      overrides={"transport": {"fd_reserve": 300}})
        emx.wait_ready()
        cap = 100 // WORKERS
        late = -(-10 // WORKERS)  # 10 past the cap in all, spread over the workers
        ports = learn_ports(self, emx, cap + late)
        # every worker filled to its share, in turn (level counts: no hand-off)
        edges = {k: [] for k in range(WORKERS)}
        for i in range(cap):
            for k in range(WORKERS):
                s = send_upgrade(emx.edge_port, ports[k][i])
                self.assertTrue(answered(s, 5), "an edge within worker %d's share was not upgraded" % k)
                edges[k].append(UpgradedEdge(s))
        by_port = edges_by_port(emx)
        self.assertEqual(len(by_port), cap * WORKERS)
        for k in range(WORKERS):  # the kernel kept handing each port to its worker
            self.assertEqual([by_port[p] for p in ports[k][:cap]], [k] * cap)
        waiting = {k: [send_upgrade(emx.edge_port, p) for p in ports[k][cap:cap + late]]
                   for k in range(WORKERS)}
        for k in range(WORKERS):
            for s in waiting[k]:
                self.assertFalse(answered(s, 0.3), "an edge past worker %d's cap was upgraded" % k)
        # room on worker 0 only: the budget is the process's, so the
        # sockets waiting at every worker are served (the full workers
        # hand theirs to worker 0)
        freed = late * WORKERS
        for e in edges[0][:freed]:
            e.close()
        for k in range(WORKERS):
            for s in waiting[k]:
                self.assertTrue(answered(s, 5), "a waiting edge was not served once room freed up")
        by_port = edges_by_port(emx)
        self.assertEqual(len(by_port), cap * WORKERS)
        self.assertEqual({by_port[p] for k in range(WORKERS) for p in ports[k][cap:cap + late]}, {0})
        # the ones held all along still work
        code, _ = edges[WORKERS - 1][cap // 2].auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        self.assertTrue(emx.proc.alive())
        self.assertNotIn("accept failed", emx.log())
        self.assertNotIn("Too many open files", emx.log())
        for k in range(WORKERS):
            for s in waiting[k]:
                s.close()
            for e in edges[k][freed if k == 0 else 0:]:
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
        ports = learn_ports(self, emx, 5)
        # every worker's pool full of silent sockets, then one edge more
        # for each worker
        silent = []
        for i in range(4):  # in turn, each round accepted everywhere: level counts
            silent += [connect_from(ports[k][i], emx.edge_port) for k in range(WORKERS)]
            level(emx, i + 1)
        time.sleep(0.3)  # let edgemux accept them: the cap is now full
        t0 = time.monotonic()
        late = [send_upgrade(emx.edge_port, ports[k][4]) for k in range(WORKERS)]
        r, _, _ = select.select(late, [], [], 1.0)
        self.assertEqual(r, [], "accepted past max_http_header_pool")
        # the silent sockets hit the handshake timeout; then the late edges are served
        for s in late:
            self.assertTrue(answered(s, 5), "the waiting edge was never served")
        self.assertGreater(time.monotonic() - t0, 1.5)
        for s in silent:
            s.settimeout(2)
            try:
                self.assertEqual(s.recv(1), b"", "a silent socket was not dropped")
            except ConnectionResetError:
                pass
            s.close()
        for s in late:
            s.close()
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
        ports = learn_ports(self, emx, 9)
        # twice the pool of silent sockets at every worker
        silent = {k: [] for k in range(WORKERS)}
        for i in range(8):  # in turn, the first pool's worth accepted everywhere: level counts
            for k in range(WORKERS):
                silent[k].append(connect_from(ports[k][i], emx.edge_port))
            if i < 4:
                level(emx, i + 1)
        time.sleep(0.3)
        for k in range(WORKERS):  # a device behind them, at every worker
            t0 = time.monotonic()
            s = send_upgrade(emx.edge_port, ports[k][8])
            self.assertTrue(answered(s, 5), "worker %d's device was not upgraded" % k)
            e = UpgradedEdge(s)
            code, _ = e.auth(self.env.app_key)
            self.assertEqual(code, SUCCESS)
            self.assertLess(time.monotonic() - t0, 1.0 * SLACK)
            self.assertEqual(edges_by_port(emx).get(ports[k][8]), k)
            e.close()
        for k in range(WORKERS):
            dropped = 0
            for s in silent[k][:4]:
                s.settimeout(2)
                try:
                    dropped += s.recv(1) == b""
                except ConnectionResetError:
                    dropped += 1
            self.assertEqual(dropped, 4, "worker %d's oldest silent sockets were not dropped" % k)
        for k in range(WORKERS):
            for s in silent[k]:
                s.close()


if __name__ == "__main__":
    unittest.main()
