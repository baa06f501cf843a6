"""Remote Access tunnel owner records (docs/protocol.md §9): a fake
platform sends StartTunnel to a device through edgemux as TUNNELS.md §3.1
shows it; edgemux records tid -> owner before forwarding, shows it in
/tunnels and /metrics, ends it when the device answers other than SUCCESS,
and refuses the StartTunnel over the per-device limit with 0xA3 instead of
forwarding it."""

import json
import re
import struct
import time

from harness import (POST, SUCCESS, E2ETest, Edgemux, ao_header, ao_parse, ao_response, ao_str,
                     wait_until)
from hostile import HostilePlatform

INTERNAL_ERROR, SERVICE_UNAVAILABLE = 0xA0, 0xA3


def start_tunnel(rid, eid, sid, tid, thing="SteamSensor", port=7777):
    """StartTunnel as the test platform of TUNNELS.md §3.1 sends it."""
    fields = b""
    for name, bt in (("tid", 0), ("type", 0), ("chunksize", 22), ("idle_timeout", 22),
                     ("read_timeout", 22), ("connection", 0)):
        fields += b"\x01" + ao_str(name) + ao_str("") + bytes([bt]) + b"\x00\x00"
    conn = '{"host": "127.0.0.1", "port": %d}' % port
    row = (b"\x01" + struct.pack(">H", 6) + b"\x00" + ao_str(tid) + b"\x00" + ao_str("tcp") +
           b"\x16" + struct.pack(">i", 8192) + b"\x16" + struct.pack(">i", 30000) +
           b"\x16" + struct.pack(">i", 10) + b"\x00" + ao_str(conn))
    body = (b"\x0a" + ao_str(thing) + b"\x02" + ao_str("StartTunnel") + b"\x00\x05" + fields +
            b"\x00" + row + b"\x00")
    return ao_header(POST, rid, eid, sid) + body


def metric(text, name, labels=""):
    m = re.search(r"^%s%s (\d+)$" % (re.escape(name), re.escape(labels)), text, re.M)
    return int(m.group(1)) if m else None


class TunnelOwner(E2ETest):
    def setUp(self):
        super().setUp()
        self.plat = HostilePlatform(self.env.app_key)
        self.addCleanup(self.plat.close)
        # With server.workers > 1 each worker takes an even share of
        # edge.max_tunnels (configuration.md): 200 per worker loop, so the
        # process limit stays well above the per-device one on the worker
        # holding the devices, as with one loop.
        self.emx = Edgemux(self.env, "emx-tun", [self.plat.port], overrides={
            "edge": {"max_tunnels": 200, "max_tunnels_per_device": 50,
                     "tunnel_connect_timeout": "30s"}})
        self.emx.wait_ready()
        # Every pipe connected and read by edgemux (its AUTH answered), so a
        # request the test sends down any of them is taken.
        self.assertTrue(self.plat.pipes_answering(10), "the fake platform's pipes never came up")

    def device(self):
        """An authenticated raw device; returns (edge, endpointId, sessionId)."""
        before = set(self.plat.device_auths)
        e = self.emx.edge(app_key=self.env.app_key)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        with self.plat.lock:
            eid = (set(self.plat.device_auths) - before).pop()
        return e, eid, sid

    def answer_to(self, rid, timeout=5):
        """The code of the answer edgemux sent the platform for its request rid."""
        found = {}

        def got():
            with self.plat.lock:
                for _, m in self.plat.answers:
                    code, r, _, _, _ = ao_parse(m)
                    if r == rid:
                        found["code"] = code
                        return True
            return False
        wait_until(got, timeout, what="answer to platform request %#x" % rid)
        return found["code"]

    def tunnels(self):
        status, body = self.emx.http("/tunnels")
        self.assertEqual(status, 200, body)
        return json.loads(body)

    def test_start_recorded_shown_and_ended_by_a_failure_answer(self):
        e, eid, sid = self.device()
        # down a pipe of the identity the device's AUTH came on: the worker
        # holding it (protocol.md §6.2)
        pipe = self.plat.pipe_for(eid)
        # 1. A StartTunnel answered SUCCESS: recorded, shown, answer delivered.
        pipe.send(start_tunnel(0x100, eid, sid, "tun-1"))
        msg = e.recv(timeout=5)
        code, rid, reid, rsid, _ = ao_parse(msg)
        self.assertEqual(code, POST)
        self.assertIn(b"StartTunnel", msg)
        self.assertIn(b"tun-1", msg)
        # The record exists before the device has answered.
        view = self.tunnels()
        self.assertEqual(view["open"], 1, view)
        t = view["tunnels"][0]
        self.assertEqual((t["tid"], t["thing"], t["endpointId"], t["state"], t["target"], t["type"],
                          t["chunksize"], t["idle_timeout"]),
                         ("tun-1", "SteamSensor", eid, "starting", "127.0.0.1:7777", "tcp", 8192, 30000))
        self.assertTrue(t["owner"])
        self.assertGreaterEqual(t["age_ms"], 0)
        e.send(ao_response(SUCCESS, rid, reid, rsid))
        self.assertEqual(self.answer_to(0x100), SUCCESS)
        wait_until(lambda: self.tunnels()["tunnels"][0]["state"] == "started", 5, what="state started")

        # 2. A StartTunnel the device refuses (0xA0): the record ends.
        pipe.send(start_tunnel(0x101, eid, sid, "tun-bad", port=1))
        code, rid, reid, rsid, _ = ao_parse(e.recv(timeout=5))
        self.assertEqual(code, POST)
        self.assertEqual(self.tunnels()["open"], 2)
        e.send(ao_response(INTERNAL_ERROR, rid, reid, rsid, "cannot resolve"))
        self.assertEqual(self.answer_to(0x101), INTERNAL_ERROR)
        wait_until(lambda: [x["tid"] for x in self.tunnels()["tunnels"]] == ["tun-1"], 5,
                   what="tun-bad gone from /tunnels")

        status, text = self.emx.http("/metrics")
        self.assertEqual(status, 200)
        self.assertEqual(metric(text, "emx_tunnels_open"), 1)
        self.assertEqual(metric(text, "emx_tunnels_started_total"), 2)
        self.assertEqual(metric(text, "emx_tunnels_ended_total", '{reason="refused"}'), 1)
        self.assertEqual(metric(text, "emx_tunnels_refused_total", '{reason="device_limit"}'), 0)
        # Logs name tid, Thing and owner, never a key.
        log = self.emx.log()
        self.assertIn("tunnel tun-1 thing SteamSensor owner", log)
        self.assertNotIn(self.env.app_key, log)

        # 3. The device leaves: its unclaimed record goes with it.
        e.close()
        wait_until(lambda: self.tunnels()["open"] == 0, 5, what="record ended with the edge")
        self.assertEqual(self.plat.violations, [])

    def test_per_device_limit_refuses_the_51st(self):
        e, eid, sid = self.device()
        pipe = self.plat.pipe_for(eid)
        for i in range(50):
            pipe.send(start_tunnel(0x200 + i, eid, sid, "lim-%d" % i))
            code, rid, reid, rsid, _ = ao_parse(e.recv(timeout=5))
            self.assertEqual(code, POST)
            e.send(ao_response(SUCCESS, rid, reid, rsid))
        for i in range(50):
            self.assertEqual(self.answer_to(0x200 + i), SUCCESS)
        self.assertEqual(self.tunnels()["open"], 50)
        # The 51st is answered 0xA3 by edgemux and never reaches the device.
        pipe.send(start_tunnel(0x300, eid, sid, "lim-50"))
        self.assertEqual(self.answer_to(0x300), SERVICE_UNAVAILABLE)
        with self.assertRaises(Exception):
            e.recv(timeout=0.5)
        self.assertEqual(self.tunnels()["open"], 50)
        # Another device still gets its tunnel (the process limit, 200 per worker, is far off).
        e2, eid2, sid2 = self.device()
        pipe = self.plat.pipe_for(eid2)  # its worker may be another one
        pipe.send(start_tunnel(0x301, eid2, sid2, "other-1", thing="Pump"))
        code, rid, reid, rsid, _ = ao_parse(e2.recv(timeout=5))
        self.assertEqual(code, POST)
        e2.send(ao_response(SUCCESS, rid, reid, rsid))
        self.assertEqual(self.answer_to(0x301), SUCCESS)
        status, text = self.emx.http("/metrics")
        self.assertEqual(metric(text, "emx_tunnels_refused_total", '{reason="device_limit"}'), 1)
        self.assertEqual(metric(text, "emx_answers_total", '{reason="tunnel_refused"}'), 1)
        self.assertEqual(metric(text, "emx_tunnels_open"), 51)
        e.close()
        e2.close()
        time.sleep(0.1)
        self.assertEqual(self.plat.violations, [])
