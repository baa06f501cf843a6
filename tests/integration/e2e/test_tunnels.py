"""Remote Access tunnels through HAProxy and two edgemux to three platform
instances (docs/protocol.md §9): platform-sim starts a tunnel through a
chosen instance; the device (tunneldevice.py, written from TUNNELS.md)
answers and opens its tunnel socket through the front door, and edgemux
relays it to the instance that sent the StartTunnel, whichever edgemux it
reaches. A Python socket on platform-sim's RAC port stands for the Remote
Access client; the device echoes what it receives."""

import json
import os
import re
import signal
import socket
import statistics
import threading
import time
import urllib.parse

from harness import (GET, SLACK, SUCCESS, E2ETest, Edgemux, HAProxy, Platform, RawEdge, ao_parse,
                     ao_request, wait_until)
from tunneldevice import CLIENT_PATH, TunnelDevice, TunnelSocket

KIB = 1024
MIB = 1024 * 1024


def metric(text, name, labels=""):
    m = re.search(r"^%s%s (\d+)$" % (re.escape(name), re.escape(labels)), text, re.M)
    return int(m.group(1)) if m else None


def recv_exact(sock, n, timeout=60):
    sock.settimeout(timeout)
    buf = bytearray()
    while len(buf) < n:
        d = sock.recv(min(1 << 16, n - len(buf)))
        if not d:
            break
        buf.extend(d)
    return bytes(buf)


class TunnelHelpers:
    """Devices, tunnels and views for the tunnel tests (self.plat, self.emx
    and self.stop set by setUp; self.hap when tunnels go through HAProxy)."""

    def device(self, thing, port=None):
        edge = RawEdge(port or self.hap.edge_port, app_key=self.env.app_key)
        self.addCleanup(edge.close)
        return TunnelDevice(edge, self.env.app_key, thing)

    def start_client(self, inst, thing, tid, dev):
        """A tunnel whose remote access client will attach as a
        WSTunnelClient socket (not the RAC port)."""
        return self.start(inst, thing, tid, dev)

    def start(self, inst, thing, tid, dev, port=None, chunksize=8192, source_address=None):
        """platform-sim sends StartTunnel via instance `inst`; the device
        answers and dials (through HAProxy unless `port`; from
        source_address when given). Returns (tunnel socket, RAC port, the
        tid the device saw)."""
        out = {}

        def ctl():
            out["reply"] = self.plat.cmd("tunnel %d %s %s 127.0.0.1 9 %d" % (inst, thing, tid, chunksize))

        t = threading.Thread(target=ctl)
        t.start()
        seen, cs = dev.take_start()
        ts = TunnelSocket(port or self.hap.edge_port, seen, self.env.app_key, chunksize=cs,
                          source_address=source_address)
        self.addCleanup(ts.drop)
        t.join(20)
        m = re.match(r"answer 0x40 SUCCESS port (\d+)", out.get("reply", ""))
        self.assertIsNotNone(m, out)
        return ts, int(m.group(1)), seen

    def echo(self, ts):
        th = threading.Thread(target=ts.echo_forever, args=(self.stop,), daemon=True)
        th.start()
        return th

    def rac_roundtrip(self, rac_port, data):
        """Send data through the RAC port and read it all back."""
        s = socket.create_connection(("127.0.0.1", rac_port), timeout=10)
        self.addCleanup(s.close)
        w = threading.Thread(target=s.sendall, args=(data,))
        w.start()
        back = recv_exact(s, len(data))
        w.join(10)
        return s, back

    def echoed_across(self, inst, thing, tid, size):
        """AlwaysOn straight to edgemux 1, the tunnel socket forced onto 2;
        `size` random bytes echoed through it. Returns (tunnel socket, RAC
        socket), both still open."""
        dev = self.device(thing, port=self.emx[0].edge_port)
        ts, rac, _ = self.start(inst, thing, tid, dev, port=self.emx[1].edge_port)
        self.assertEqual(ts.status, 101, ts.head)
        self.echo(ts)
        payload = os.urandom(size)
        s, back = self.rac_roundtrip(rac, payload)
        self.assertEqual(back, payload)
        return ts, s

    def sim_tunnels(self):
        rows, totals = {}, {}
        for line in self.plat.cmd("tunnels").splitlines():
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

    def metrics(self, emx):
        status, text = emx.http("/metrics")
        self.assertEqual(status, 200)
        return text


class Tunnels(TunnelHelpers, E2ETest):
    EDGE = {"max_tunnels": 100, "max_tunnels_per_device": 50, "tunnel_idle_timeout": "60s",
            "tunnel_drain_timeout": "3s"}

    def setUp(self):
        super().setUp()
        self.plat = Platform(self.env, instances=3)
        self.emx = [Edgemux(self.env, "emx-t%d" % i, self.plat.ports, overrides={"edge": dict(self.EDGE)})
                    for i in (1, 2)]
        for e in self.emx:
            e.wait_ready()
        self.hap = HAProxy(self.env, self.emx[0], self.emx[1])
        wait_until(lambda: all(n >= 4 for n in self.plat.pipes_connected()), 10,
                   what="every instance's pipes up")
        self.stop = threading.Event()
        self.addCleanup(self.stop.set)

    # ---- tests ----

    def test_tunnel_via_each_instance_echoes_1mib(self):
        dev = self.device("Dev1")
        payload = os.urandom(MIB)
        for inst in (1, 2, 3):
            tid = "t-inst-%d" % inst
            ts, rac, seen = self.start(inst, "Dev1", tid, dev)
            self.assertEqual(ts.status, 101, ts.head)
            self.assertTrue(seen.endswith("~" + tid), seen)  # the owner's token in front
            self.assertEqual(ts.glued, 0, "bytes arrived with the 101")
            self.echo(ts)
            s, back = self.rac_roundtrip(rac, payload)
            self.assertEqual(back, payload, "tunnel via instance %d did not echo byte-identical" % inst)
            self.assertEqual(ts.violations, [])
            self.assertEqual(ts.binary_in, 0)
            self.assertLessEqual(ts.max_frame_in, ts.max_frame)
            rows, totals = self.sim_tunnels()
            self.assertEqual(rows[tid]["instance"], str(inst), rows[tid])
            self.assertEqual(totals["wrong_instance"], "0", totals)
            self.assertEqual(totals["unknown_tid"], "0", totals)
            s.close()
        # the platform saw the socket's edgemux add X-Forwarded-For, and the
        # appKey copied (it refuses upgrades without it)
        rows, _ = self.sim_tunnels()
        for inst in (1, 2, 3):
            self.assertTrue(rows["t-inst-%d" % inst].get("xff"), rows["t-inst-%d" % inst])
        logs = self.emx[0].log() + self.emx[1].log()
        self.assertIn("relaying to owner", logs)
        self.assertNotIn(self.env.app_key, logs)

    def test_socket_on_the_edgemux_that_did_not_see_the_start(self):
        self.echoed_across(2, "Dev2", "t-cross", 256 * KIB)
        rows, totals = self.sim_tunnels()
        self.assertEqual(rows["t-cross"]["instance"], "2")
        self.assertEqual(totals["wrong_instance"], "0")
        _, body = self.emx[1].http("/tunnels")
        view = json.loads(body)
        self.assertEqual([(x["tid"], x["record_here"]) for x in view["sockets"]], [("t-cross", False)])
        _, body = self.emx[0].http("/tunnels")
        self.assertEqual([x["tid"] for x in json.loads(body)["tunnels"]], ["t-cross"])

    def test_second_device_socket_for_a_tunnel_refused(self):
        """One device socket per tunnel: more for the same tid get 404
        already_connected, whichever worker each lands on (with several
        workers, eight sockets land on others than the first's), and the
        first keeps working."""
        dev = self.device("Dev9", port=self.emx[0].edge_port)
        ts, rac, seen = self.start(3, "Dev9", "t-twice", dev, port=self.emx[0].edge_port)
        self.assertEqual(ts.status, 101, ts.head)
        self.echo(ts)
        for _ in range(8):
            again = TunnelSocket(self.emx[0].edge_port, seen, self.env.app_key)
            self.addCleanup(again.drop)
            self.assertEqual(again.status, 404, again.head)
        text = self.metrics(self.emx[0])
        self.assertEqual(metric(text, "emx_tunnel_sockets_refused_total", '{reason="already_connected"}'), 8)
        self.assertEqual(metric(text, "emx_tunnel_sockets_open", '{side="server"}'), 1)
        _, back = self.rac_roundtrip(rac, b"still one tunnel")
        self.assertEqual(back, b"still one tunnel")
        rows, totals = self.sim_tunnels()
        self.assertEqual(rows["t-twice"]["instance"], "3")
        self.assertEqual(totals["unknown_tid"], "0")

    def test_bytes_counted_while_the_tunnel_runs(self):
        """A long session (SSH, VNC) shows its bytes in /metrics and /tunnels
        while it runs, not only once it ends; the counters never go back."""
        size = 300 * KIB
        ts, s = self.echoed_across(1, "Dev8", "t-live", size)

        def counted(text):
            return {d: metric(text, "emx_tunnel_bytes_total", '{direction="%s"}' % d)
                    for d in ("to_owner", "to_peer")}

        # still open: the echo went to the owner, the RAC's bytes to the peer
        text = self.metrics(self.emx[1])
        self.assertEqual(metric(text, "emx_tunnel_sockets_open", '{side="server"}'), 1)
        live = counted(text)
        self.assertGreaterEqual(live["to_owner"], size, live)
        self.assertGreaterEqual(live["to_peer"], size, live)
        msgs = metric(text, "emx_tunnel_messages_total", '{direction="to_owner"}')
        self.assertGreater(msgs, 0)
        _, body = self.emx[1].http("/tunnels")
        row = [x for x in json.loads(body)["sockets"] if x["tid"] == "t-live"][0]
        self.assertEqual(row["state"], "open")
        self.assertGreaterEqual(row["bytes_to_owner"], size, row)
        self.assertGreaterEqual(row["bytes_to_peer"], size, row)
        self.assertGreater(row["messages_to_peer"], 0, row)
        # the edgemux that carries no tunnel counts none
        self.assertEqual(counted(self.metrics(self.emx[0])), {"to_owner": 0, "to_peer": 0})
        # ended: the counters keep what they showed (and the close's few bytes)
        s.close()
        ts.close()
        wait_until(lambda: metric(self.metrics(self.emx[1]), "emx_tunnel_sockets_open",
                                  '{side="server"}') == 0, 10, what="tunnel socket ended")
        after = counted(self.metrics(self.emx[1]))
        for d in live:
            self.assertGreaterEqual(after[d], live[d], (live, after))

    def test_client_side_reaches_the_owner_from_either_edgemux(self):
        """The remote access client knows the platform's tid only: the
        edgemux that forwarded the StartTunnel takes it to the owner from its
        record, the other asks the instances in turn (404: not theirs)."""
        dev = self.device("Dev7", port=self.emx[0].edge_port)
        for via, tid, inst in ((0, "t-rac-a", 3), (1, "t-rac-b", 2)):
            ts, _, _ = self.start(inst, "Dev7", tid, dev, port=self.emx[0].edge_port)
            self.echo(ts)
            rac = TunnelSocket(self.emx[via].edge_port, tid, None, path=CLIENT_PATH,
                               cookie="JSESSIONID=rac-%d" % via)
            self.addCleanup(rac.drop)
            self.assertEqual(rac.status, 101, (via, rac.head))
            data = os.urandom(100 * KIB)
            rac.send_data(data)
            got = b""
            while len(got) < len(data):
                kind, part = rac.recv_message(timeout=10)
                self.assertEqual(kind, "text")
                got += part
            self.assertEqual(got, data, "client side via edgemux %d" % (via + 1))
            rows, totals = self.sim_tunnels()
            self.assertEqual(rows[tid]["instance"], str(inst))
            self.assertEqual(rows[tid]["cookie"], "JSESSIONID=rac-%d" % via)
        _, body = self.emx[1].http("/tunnels")
        sockets = json.loads(body)["sockets"]
        self.assertEqual([(x["tid"], x["side"]) for x in sockets], [("t-rac-b", "client")])
        self.assertEqual(sockets[0]["owner"], "127.0.0.1:%d" % self.plat.ports[1])
        # a tid no instance has: every one asked, then 404
        rac = TunnelSocket(self.emx[1].edge_port, "t-nobody", None, path=CLIENT_PATH, cookie="c=1")
        self.assertEqual(rac.status, 404, rac.head)

    def test_unknown_tid_refused_without_a_back_end(self):
        for tid, want in (("no-such-tunnel", 404), ("x00000000~no-owner", 404), ("a%2Fb", 404)):
            ts = TunnelSocket(self.hap.edge_port, tid, self.env.app_key)
            self.assertEqual(ts.status, want, (tid, ts.head))
            ts.drop()
        _, totals = self.sim_tunnels()
        self.assertEqual(totals.get("unknown_tid", "0"), "0", "a back-end socket was opened")
        self.assertEqual(totals.get("wrong_instance", "0"), "0")
        refused = sum(metric(self.metrics(e), "emx_tunnel_sockets_refused_total",
                             '{reason="%s"}' % r) or 0
                      for e in self.emx for r in ("unknown_tid", "unknown_owner"))
        self.assertEqual(refused, 2)  # the escaped tid never reached the core

    def test_owner_crash_closes_the_device_socket_within_1s(self):
        dev = self.device("Dev3")
        ts, rac, _ = self.start(3, "Dev3", "t-crash", dev)
        self.assertEqual(ts.status, 101)
        self.echo(ts)
        s = socket.create_connection(("127.0.0.1", rac), timeout=10)
        self.addCleanup(s.close)
        s.sendall(os.urandom(64 * KIB))
        recv_exact(s, 64 * KIB)
        self.stop.set()  # the echo thread lets go of the socket
        time.sleep(0.6)
        before = [json.loads(self.plat.cmd("stats"))["instances"][i]["msgs_in"] for i in (0, 1)]
        t0 = time.monotonic()
        self.assertTrue(self.plat.cmd("crash 3").startswith("ok"))
        kind, (code, reason) = ts.recv_message(timeout=5)
        took = time.monotonic() - t0
        self.assertEqual(kind, "close")
        self.assertLess(took, 1.0 * SLACK, "device socket closed after %.2f s" % took)
        self.assertNotIn("Tunnel stopped by edge", reason)
        self.assertIn(code, (1001, 1011))
        # nothing of the tunnel went to the other instances
        rows, totals = self.sim_tunnels()
        self.assertEqual(totals["wrong_instance"], "0")
        after = [json.loads(self.plat.cmd("stats"))["instances"][i]["msgs_in"] for i in (0, 1)]
        self.assertLess(sum(after) - sum(before), 20, "tunnel bytes reached other instances?")

    def test_alwayson_reconnect_keeps_the_tunnel(self):
        dev = self.device("Dev4")
        ts, rac, _ = self.start(1, "Dev4", "t-reconnect", dev)
        self.echo(ts)
        s, back = self.rac_roundtrip(rac, b"before" * 1000)
        self.assertEqual(back, b"before" * 1000)
        dev.edge.close()
        self.device("Dev4")  # the device's new AlwaysOn connection
        s.sendall(b"after" * 2000)
        self.assertEqual(recv_exact(s, 10000), b"after" * 2000)

    def test_closes_propagate_both_ways(self):
        dev = self.device("Dev5")
        # the RAC closes: the device hears 1000, never "Tunnel stopped by edge"
        ts, rac, _ = self.start(1, "Dev5", "t-close-a", dev)
        s = socket.create_connection(("127.0.0.1", rac), timeout=10)
        s.close()
        kind, (code, reason) = ts.recv_message(timeout=5)
        self.assertEqual((kind, code), ("close", 1000), reason)
        self.assertNotIn("Tunnel stopped by edge", reason)
        # the device closes as the SDK does: the platform gets its code and reason
        ts2, rac2, seen2 = self.start(2, "Dev5", "t-close-b", dev)
        ts2.close()
        ts2.drop()
        dev.command_from_edge(seen2, "CANCEL")

        def closed():
            rows, _ = self.sim_tunnels()
            r = rows.get("t-close-b", {})
            return r if r.get("state") == "closed" else None
        row = wait_until(closed, 5, what="platform side closed")
        self.assertIn("1000", json.dumps(row))
        self.assertIn("Tunnel stopped by edge", json.dumps(row))
        # the CANCEL reaches the platform with its own tid (it may come
        # after the close: it travels on the AlwaysOn connection)
        wait_until(lambda: int(self.sim_tunnels()[1].get("cancels", "0")) >= 1, 5,
                   what="the device's CANCEL at the platform")

    def test_twenty_tunnels_over_five_devices_beside_alwayson(self):
        devs = [self.device("Many%d" % i) for i in range(5)]
        probe = RawEdge(self.hap.edge_port, app_key=self.env.app_key)
        self.addCleanup(probe.close)
        code, sid = probe.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)

        rid = [1000]

        def latencies(n):
            out = []
            for _ in range(n):
                rid[0] += 1
                t0 = time.monotonic()
                probe.send(ao_request(GET, rid[0], sid))
                msg = probe.recv(timeout=10)
                out.append(time.monotonic() - t0)
                self.assertEqual(ao_parse(msg)[0], SUCCESS)
            return out

        base = statistics.median(latencies(200))
        tunnels = []
        for i in range(20):
            d = devs[i % 5]
            ts, rac, _ = self.start(1 + i % 3, d.thing, "t-many-%d" % i, d)
            self.assertEqual(ts.status, 101)
            self.echo(ts)
            tunnels.append((ts, rac))
        results = [None] * 20
        payloads = [os.urandom(256 * KIB) for _ in range(20)]

        def run(i):
            _, back = self.rac_roundtrip(tunnels[i][1], payloads[i])
            results[i] = back == payloads[i]

        ths = [threading.Thread(target=run, args=(i,)) for i in range(20)]
        for th in ths:
            th.start()
        during = statistics.median(latencies(200))
        for th in ths:
            th.join(120)
        self.assertEqual(results, [True] * 20)
        for ts, _ in tunnels:
            self.assertEqual(ts.violations, [])
            self.assertEqual(ts.glued, 0)
        # AlwaysOn latency beside 20 busy tunnels: within 2x of the run
        # without (plus 5 ms: on a 2-core machine the Python device, RAC and
        # echo threads of this test compete with edgemux for the CPU)
        self.assertLess(during, 2 * base + 0.005 * SLACK,
                        "median GET %.2f ms beside tunnels, %.2f ms without" % (during * 1e3, base * 1e3))
        _, totals = self.sim_tunnels()
        self.assertEqual(totals["wrong_instance"], "0")

    def test_sigterm_lets_a_tunnel_finish_within_the_drain_bound(self):
        # straight to edgemux 2 so the test knows which one holds it
        dev = self.device("Dev6", port=self.emx[1].edge_port)
        ts, rac, _ = self.start(1, "Dev6", "t-drain", dev, port=self.emx[1].edge_port)
        self.echo(ts)
        s, back = self.rac_roundtrip(rac, b"x" * 5000)
        self.assertEqual(back, b"x" * 5000)
        t0 = time.monotonic()
        self.emx[1].proc.signal(signal.SIGTERM)
        # the tunnel still works while the drain waits for it
        time.sleep(0.5)
        s.sendall(b"y" * 3000)
        self.assertEqual(recv_exact(s, 3000), b"y" * 3000)
        # ... until edge.tunnel_drain_timeout (3 s): then it is closed 1001
        wait_until(lambda: not self.emx[1].proc.alive(), 15, what="edgemux exit after the drain")
        took = time.monotonic() - t0
        self.assertGreaterEqual(took, 2.5)
        self.assertLess(took, 3 + 6 * SLACK)
        self.assertIn("tunnel drain bound reached: closing 1 tunnel(s)", self.emx[1].log())


class TunnelsPerSource(TunnelHelpers, E2ETest):
    """edge.max_tunnels_per_source: one device address holds at most that
    many relayed tunnel sockets at once, counted over every worker; another
    address is not affected, and a place comes back when a tunnel ends."""

    LIMIT = 2

    def setUp(self):
        super().setUp()
        self.plat = Platform(self.env, instances=1)
        # HAProxy (option forwardfor) from 127.0.0.1 is trusted: behind it
        # the device's address is the one X-Forwarded-For names
        self.emx = Edgemux(self.env, "emx-src", self.plat.ports, overrides={"edge": {
            "max_tunnels": 100, "max_tunnels_per_source": self.LIMIT, "tunnel_idle_timeout": "60s",
            "trusted_proxies": "[127.0.0.1]"}})
        self.emx.wait_ready()
        self.stop = threading.Event()
        self.addCleanup(self.stop.set)

    def open_from(self, dev, tid, source, port=None):
        ts, rac, _ = self.start(1, dev.thing, tid, dev, port=port or self.emx.edge_port,
                                source_address=(source, 0))
        return ts, rac

    def test_behind_haproxy_each_device_address_counts(self):
        """Every socket reaches edgemux from HAProxy's address; the limit
        counts the address X-Forwarded-For names, so one busy address gets
        429 while another behind the same HAProxy does not."""
        hap = HAProxy(self.env, self.emx, self.emx)
        dev = self.device("NatDev", port=self.emx.edge_port)
        for i in range(self.LIMIT):
            ts, _ = self.open_from(dev, "t-nat-%d" % i, "127.0.0.2", port=hap.edge_port)
            self.assertEqual(ts.status, 101, ts.head)
            self.echo(ts)
        over, _ = self.open_from(dev, "t-nat-over", "127.0.0.2", port=hap.edge_port)
        self.assertEqual(over.status, 429, over.head)
        other, orac = self.open_from(dev, "t-nat-other", "127.0.0.3", port=hap.edge_port)
        self.assertEqual(other.status, 101, other.head)
        self.echo(other)
        _, back = self.rac_roundtrip(orac, b"behind the same proxy")
        self.assertEqual(back, b"behind the same proxy")
        self.assertEqual(metric(self.metrics(self.emx), "emx_tunnel_sockets_refused_total",
                                '{reason="source_limit"}'), 1)
        _, body = self.emx.http("/tunnels")
        sources = sorted(x["from"] for x in json.loads(body)["sockets"])
        self.assertEqual(sources, ["127.0.0.2"] * self.LIMIT + ["127.0.0.3"])

    def test_one_address_over_its_limit_gets_429(self):
        dev = self.device("SrcDev", port=self.emx.edge_port)
        held = []
        for i in range(self.LIMIT):
            ts, rac = self.open_from(dev, "t-src-%d" % i, "127.0.0.1")
            self.assertEqual(ts.status, 101, ts.head)
            self.echo(ts)
            held.append((ts, rac))
        over, _ = self.open_from(dev, "t-src-over", "127.0.0.1")
        self.assertEqual(over.status, 429, over.head)
        text = self.metrics(self.emx)
        self.assertEqual(metric(text, "emx_tunnel_sockets_refused_total", '{reason="source_limit"}'), 1)
        self.assertIn("refused 429: source_limit", self.emx.log())
        # another address has places of its own
        other, orac = self.open_from(dev, "t-src-other", "127.0.0.2")
        self.assertEqual(other.status, 101, other.head)
        self.echo(other)
        _, back = self.rac_roundtrip(orac, b"from another address")
        self.assertEqual(back, b"from another address")
        # the tunnels within the limit carry data
        for _, rac in held:
            _, back = self.rac_roundtrip(rac, b"x" * 1000)
            self.assertEqual(back, b"x" * 1000)
        # a tunnel that ends gives its place back
        held[0][0].close()
        wait_until(lambda: metric(self.metrics(self.emx), "emx_tunnel_sockets_open",
                                  '{side="server"}') == self.LIMIT, 10, what="one tunnel socket ended")
        again, _ = self.open_from(dev, "t-src-again", "127.0.0.1")
        self.assertEqual(again.status, 101, again.head)
        self.assertEqual(metric(self.metrics(self.emx), "emx_tunnel_sockets_refused_total",
                                '{reason="source_limit"}'), 1)
