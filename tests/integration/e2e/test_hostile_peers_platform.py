"""Hostile-peer suite, platform side (issue 12 items 5, 6, 8, 12, 13): a
hostile platform instance written from docs/protocol.md §6 (hostile.py)
takes edgemux's pipes in the backup tier beside a platform-sim instance that
serves the devices, answers the pipes' AUTH, then misbehaves: forges answers,
stops reading while flooding pings or requests, asks a hostile device for an
answer that never ends. Devices attack from the edge side too (70,000 bound
Things, heavy uploads). The canary device (hostile.py) sends a GET every
200 ms throughout; every attack is checked as in test_hostile_peers_device."""

import struct
import threading
import time
import unittest

from harness import (GET, POST, SUCCESS, Edgemux, Platform, RawEdge, ao_bind, ao_header,
                     ao_multipart_request, ao_str, pipes, wait_until)
from hostile import (HostilePlatform, HostileSuite, Reader, client_frame, cpu_seconds, edges, flood,
                     send_all, ws_frame)

INTERNAL_ERROR, SERVICE_UNAVAILABLE = 0xA0, 0xA3
FLOOD_S = 5.0


class HostilePlatforms(HostileSuite):
    def setup_topology(self, env, shared):
        plat = Platform(env, 1, extra=["--latency", "20"])
        hostile = HostilePlatform(env.app_key, rcvbuf=16384)
        shared["cleanups"].append(hostile.close)
        emx = Edgemux(env, "emx-hostile-plat", [], start=False, overrides={
            "log": {"level": "info"},
            "edge": {"max_things": 100000},
            "platform": {"ping_interval": "1s", "idle_read_timeout": "3s"}})
        emx.write_instances([plat.ports[0], hostile.port], priorities=[0, 1])
        emx.start()
        shared.update(emx=emx, plat=plat, hostile=hostile)

    def wait_topology(self, shared):
        wait_until(lambda: len(shared["hostile"].live_pipes()) >= pipes(), 10, what="pipes to the hostile platform")

    def setUp(self):
        super().setUp()
        self.plat = self.shared["plat"]
        self.hostile = self.shared["hostile"]
        self.hostile.reading.set()
        # the hostile instance holds two pipes per worker loop (pipes()) that
        # edgemux reads before each attack (an attack that left them unread
        # is failed by its own test; the platform then hangs up so the next
        # attack starts clean)
        if not self.hostile.pipes_answering(5.0):
            self.hostile.drop_pipes()
        wait_until(lambda: self.hostile.pipes_answering(1.0) and
                   self.emx.http("/instances")[1].count('"pipes_up":%d' % pipes()) == 2, 15,
                   what="both instances' pipes connected and read")

    def device(self):
        e = RawEdge(self.emx.edge_port, app_key=self.env.app_key)
        self.track(e)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        r = Reader(e.sock, e.buf)
        self.addCleanup(r.stop)
        port = e.sock.getsockname()[1]
        eid = [x["endpointId"] for x in edges(self.emx) if x.get("peer", "").endswith(":%d" % port)]
        self.assertEqual(len(eid), 1, edges(self.emx))
        return e.sock, sid, eid[0], r

    def canary_edge(self):
        ids = [x["endpointId"] for x in edges(self.emx)]
        self.assertEqual(len(ids), 1, "only the canary should be connected")
        return ids[0]

    def canary_last_rid(self):
        return max([e["rid"] for e in self.canary.events() if "rid" in e] or [1])

    # issue 12 item 5: answers for another instance's requests

    def test_forged_answers(self):
        def run(obs):
            eid = self.canary_edge()
            end = time.monotonic() + FLOOD_S
            sent = 0
            while time.monotonic() < end:
                base = self.canary_last_rid()
                frames = [ws_frame(ao_header(SUCCESS, rid, e, 0) + b"\x01" + ao_str("forged") + b"\xff")
                          for rid in range(base, base + 8) for e in (eid, eid + 1, 1)]
                sent += self.hostile.write_all(b"".join(frames), timeout=0.5) // len(frames[0])
            obs.update(forged_sent=sent, canary_endpoint=eid)
        row = self.attack("forged answers: the backup instance answers the canary's GETs (its endpointId, "
                          "its next requestIds) on its own pipes", run)
        c = row["counters"]
        # forgeries reached requests that were pending on the other instance
        self.assertGreater(c.get("emx_platform_answers_wrong_pipe_total", 0), 0, c)

    # issue 12 item 12: a platform that stops reading and floods

    def deaf_flood(self, name, data):
        def run(obs):
            pipes = self.hostile.live_pipes()
            self.hostile.reading.clear()
            cpu0 = cpu_seconds(self.emx.proc.pid)
            obs["flood_bytes"] = flood(pipes, data * (65536 // len(data)), FLOOD_S)
            obs["edgemux_cpu_during_flood_s"] = round(cpu_seconds(self.emx.proc.pid) - cpu0, 3)
            obs["pipes_closed_by_edgemux"] = sum(1 for p in pipes if p.closed)
            obs["stalled_closes_logged"] = self.emx.log().count("stalled: the platform stopped reading")
            self.hostile.reading.set()
            self.assertGreater(obs["flood_bytes"], 64 << 10, "the flood never got going")
            # Once the platform behaves, its instance must serve again within
            # a bounded time: edgemux reads the pipes again, or closes them
            # and connects new ones (idle_read_timeout is 3 s).
            t = time.monotonic()
            obs["pipes_read_again"] = self.hostile.pipes_answering(10.0)
            obs["pipes_read_again_after_s"] = round(time.monotonic() - t, 1)
            self.assertTrue(obs["pipes_read_again"], "the instance's pipes stay up but are never read again")
        return self.attack(name, run, cpu_budget=0.1 * FLOOD_S + 0.2)

    # A raw pipe reads its control frames at RAW_CTL_BUDGET (64) a timer
    # tick; after a flood the socket holds megabytes of pings, so a pipe that
    # keeps the budget used up for idle_read_timeout is closed and connected
    # anew (pipe_raw.c, pipe_timer_cb) instead of staying "up" unread.
    def test_deaf_platform_ping_flood(self):
        self.deaf_flood("a platform that stops reading and floods pings on both pipes (5 s)", b"\x89\x00")

    def test_deaf_platform_unknown_endpoint_flood(self):
        get = ao_header(GET, 0x777, 0x0ABCDEF, 42) + b"\x0A" + ao_str("Ghost") + b"\x01" + ao_str("p") + b"\x00\xff"
        self.deaf_flood("a platform that stops reading and floods requests for an unknown endpoint (5 s)",
                        ws_frame(get))

    # issue 12 item 8: a device's endless answer toward a platform that stops reading

    def test_endless_answer_to_deaf_platform(self):
        def run(obs):
            s, sid, eid, r = self.device()
            # a pipe of the worker holding the device (protocol.md §6.2)
            pipe = self.hostile.pipe_for(eid)
            req = ao_header(GET, 0x4242, eid, 0x5000) + b"\x0A" + ao_str("SteamSensor") + b"\x01" + \
                ao_str("p") + b"\x00\xff"
            pipe.send(req)
            self.assertTrue(r.wait(lambda r: r.requests, 5.0), "the platform request did not arrive")
            _, _, rid, reid, rsid, _ = struct.unpack(">BBIIIB", r.requests[0][:15])
            self.hostile.reading.clear()
            chunk = b"\x00" * (1 << 20)
            end, n = time.monotonic() + FLOOD_S, 0
            while time.monotonic() < end and n < 65534:
                n += 1
                if not send_all(s, client_frame(ao_header(SUCCESS, rid, reid, rsid, multipart=(n, 65535, 8192))
                                                + chunk), 5.0):
                    break
            obs["chunks_of_1MiB_sent"] = n
            obs["device_closed"] = r.close_code
            obs["pipes_closed_as_stalled"] = self.emx.log().count("stalled: the platform stopped reading")
            self.hostile.reading.set()
            time.sleep(1.0)
            with self.hostile.lock:
                got = [m for i, m in self.hostile.answers if struct.unpack(">I", m[2:6])[0] == 0x4242]
            obs["platform_received_chunks"] = len(got)
            obs["platform_received_codes"] = sorted({"0x%02x" % m[1] for m in got})
            self.assertNotIn("0xa4", obs["platform_received_codes"])  # never 0xA4 after part of an answer
        row = self.attack("a device answers a platform request with endless 1 MiB chunks while that "
                          "platform stops reading (5 s)", run)
        self.assertEqual(row["counters"].get("emx_edge_answers_abandoned_total", 0), 1, row["counters"])

    # issue 12 item 6: leaving with more Things than one UNBIND holds

    def test_unbind_70000_things_on_leave(self):
        def run(obs):
            s, sid, eid, r = self.device()
            names = ["Many-%06d" % i for i in range(70000)]
            # one at a time: a 720 KB BIND takes the device's share of bytes in flight
            s.sendall(client_frame(ao_bind(10, sid, names[:65535])))
            self.assertTrue(r.wait(lambda r: 10 in r.by_rid, 15.0))
            s.sendall(client_frame(ao_bind(11, sid, names[65535:])))
            self.assertTrue(r.wait(lambda r: 11 in r.by_rid, 15.0))
            obs["bind_answers"] = ["0x%02x" % r.by_rid[10][0], "0x%02x" % r.by_rid[11][0]]
            self.assertEqual((r.by_rid[10], r.by_rid[11]), ([SUCCESS], [SUCCESS]))

            def held():  # platform-sim's count (its `binds` listing of 70,000 names would stall it)
                return self.plat.stats()["things_bound"]
            obs["platform_held_before_leave"] = held()
            s.close()
            t = time.monotonic()
            wait_until(lambda: held() == 0, 15, interval=0.5, what="the platform to drop every bound Thing")
            obs["all_unbound_after_s"] = round(time.monotonic() - t, 2)
        row = self.attack("a device binds 70,000 Things (edge.max_things 100,000) and leaves", run)
        self.assertGreaterEqual(row["counters"].get("emx_unbinds_on_leave_total", 0), 2, row["counters"])

    # issue 12 item 13: one heavy device must not starve the others

    def test_heavy_devices(self):
        def heavy(i, out, end):
            s, sid, eid, r = self.device()
            rid = 100
            while time.monotonic() < end:
                batch = []
                for _ in range(32):
                    rid += 1
                    batch.append(rid)
                    wire = b"".join(client_frame(c) for c in
                                    ao_multipart_request(POST, rid, sid, 256 * 1024, name="Echo"))
                    if not send_all(s, wire, 10.0):
                        break
                r.wait(lambda r: all(x in r.by_rid for x in batch), 15.0)
            out[i] = r.code_names()

        def run(obs):
            out = {}
            end = time.monotonic() + FLOOD_S
            threads = [threading.Thread(target=heavy, args=(i, out, end)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            obs["heavy_answers"] = out
        # Four 256 KiB requests at once keep the fake platform's pipes over
        # their watermark most of the window; a canary GET that meets them
        # all full is answered 0xA0 by the routing rule (seen once in about
        # five runs of this test, before and after the tunnel work). Starving
        # it (the issue this guards) was most of its GETs: one is allowed.
        row = self.attack("4 heavy devices, each with 32 echo POSTs of 256 KiB in flight (5 s)", run,
                          canary_a0=1)
        # what the heavy devices were refused is their own share, not the pipes' room
        self.assertGreater(row["counters"].get('emx_answers_total{reason="bytes_in_flight"}', 0), 0,
                           row["counters"])


if __name__ == "__main__":
    unittest.main()
