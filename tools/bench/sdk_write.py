#!/usr/bin/env python3
"""Round trips of a device that writes like the ThingWorx C SDK.

The C SDK writes every WebSocket frame with two send() calls, the frame
header and then the payload, on a socket without TCP_NODELAY. Nagle's
algorithm holds the payload until the header is acknowledged, so a server
(or proxy) that delays its ACK adds its delayed-ACK time (40 ms on Linux)
to every frame. This client measures that: it upgrades, AUTHs with the app
key, then sends GET requests one at a time (platform-sim answers them) and
times each request until its whole answer is read.

  --write split   header send, then payload send, Nagle on (the SDK)
  --write whole   the whole frame in one send, Nagle on
  --write nodelay the whole frame in one send, TCP_NODELAY
  --tls           wss: each send() is one TLS record (SSL_write), as in the SDK

Frames are masked with the all-zero key, as the SDK does. Python 3 standard
library only. Prints one line (or --json): requests, median, p90, p99, max
in ms, and how many round trips took 20 ms or more.

  sdk_write.py --port 23002 --app-key KEY --write split --requests 400
"""

import argparse
import base64
import json
import os
import socket
import ssl
import struct
import sys
import time

AUTH, GET, PUT = 0x14, 0x01, 0x02


def ao_str(s):
    b = s.encode()
    return bytes([len(b)]) + b if len(b) < 128 else struct.pack(">I", len(b) | 0x80000000) + b


def ao_header(code, rid, session):
    return struct.pack(">BBIIIB", 1, code, rid, 0, session, 0)


def ao_auth(rid, key):
    return ao_header(AUTH, rid, 0xFFFFFFFF) + b"\x01" + ao_str("appKey") + ao_str(key)


def ao_get(rid, session, pad):
    # A GET of a property; pad adds bytes to the property name (0: ~45-byte message)
    name = "Temperature" + "x" * pad
    return ao_header(GET, rid, session) + b"\x0A" + ao_str("SteamSensor") + b"\x01" + ao_str(name) + b"\x00\xFF"


def ao_multipart_put(rid, session, size, chunk=8192):
    # A PUT whose params are a BLOB InfoTable of size bytes, in chunks of at
    # most chunk bytes as the SDK splits them (each repeats the header and
    # the entity), each chunk one message
    def infotable(data):
        shape = b"\x01" + ao_str("data") + ao_str("") + bytes([21]) + b"\x00\x00" + b"\x00"
        return shape + b"\x01" + struct.pack(">H", 1) + bytes([21]) + struct.pack(">I", len(data)) + data + b"\x00"
    prefix = b"\x0A" + ao_str("SteamSensor")
    rest = b"\x01" + ao_str("Upload") + b"\x00" + b"\x05" + infotable(b"m" * size)
    per = chunk - 15 - 6 - len(prefix)
    count = max(1, (len(rest) + per - 1) // per)
    return [struct.pack(">BBIIIBHHH", 1, PUT, rid, 0, session, 1, i + 1, count, chunk) + prefix +
            rest[i * per:(i + 1) * per] for i in range(count)]


def frame_header(n):
    # FIN + binary, masked, all-zero mask key (payload bytes unchanged)
    if n < 126:
        h = struct.pack(">BB", 0x82, 0x80 | n)
    elif n < 65536:
        h = struct.pack(">BBH", 0x82, 0x80 | 126, n)
    else:
        h = struct.pack(">BBQ", 0x82, 0x80 | 127, n)
    return h + b"\x00\x00\x00\x00"


class Conn:
    def __init__(self, args):
        self.s = socket.create_connection((args.host, args.port), timeout=10,
                                          source_address=(args.source, 0) if args.source else None)
        self.write = args.write
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if args.write == "nodelay" else 0)
        if args.tls:
            # wss: every send() is one TLS record, as with the SDK's SSL_write
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self.s = ctx.wrap_socket(self.s, server_hostname=args.host)
        self.buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        req = ("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
               "Max-Frame-Size: 8192\r\n\r\n") % (args.path, args.host, args.port, key)
        self.s.sendall(req.encode())
        while b"\r\n\r\n" not in self.buf:
            d = self.s.recv(4096)
            if not d:
                raise SystemExit("closed during the upgrade")
            self.buf += d
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise SystemExit("upgrade refused: %r" % head[:200])

    def send(self, msg):
        h = frame_header(len(msg))
        if self.write == "split":
            self.s.sendall(h)
            self.s.sendall(msg)
        else:
            self.s.sendall(h + msg)

    def _need(self, n):
        while len(self.buf) < n:
            d = self.s.recv(65536)
            if not d:
                raise SystemExit("connection closed")
            self.buf += d

    def recv_message(self):
        msg = b""
        while True:
            self._need(2)
            b0, b1 = self.buf[0], self.buf[1]
            n, off = b1 & 0x7F, 2
            if n == 126:
                self._need(4)
                n, off = struct.unpack(">H", self.buf[2:4])[0], 4
            elif n == 127:
                self._need(10)
                n, off = struct.unpack(">Q", self.buf[2:10])[0], 10
            self._need(off + n)
            payload, self.buf = self.buf[off:off + n], self.buf[off + n:]
            op = b0 & 0x0F
            if op == 0x8:
                raise SystemExit("closed by the server: %r" % payload[:60])
            if op in (0x9, 0xA):
                continue
            msg += payload
            if b0 & 0x80:
                return msg


def pct(v, p):
    s = sorted(v)
    return s[min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/Thingworx/WS")
    ap.add_argument("--source", help="source address to bind")
    ap.add_argument("--app-key", required=True)
    ap.add_argument("--tls", action="store_true", help="wss (certificate not verified)")
    ap.add_argument("--write", choices=("split", "whole", "nodelay"), default="split")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=20, help="requests not measured at first")
    ap.add_argument("--pad", type=int, default=0, help="extra bytes in each GET")
    ap.add_argument("--multipart", type=int, default=0, metavar="BYTES",
                    help="send multipart PUTs of BYTES params (8 KiB chunks, one frame each) instead of GETs")
    ap.add_argument("--think", type=float, default=0.0, help="ms between answer and next request")
    ap.add_argument("--label", default="")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    c = Conn(args)
    rid = 1
    c.send(ao_auth(rid, args.app_key))
    a = c.recv_message()
    _, code, arid, _, sess, _ = struct.unpack(">BBIIIB", a[:15])
    if code != 0x40:
        raise SystemExit("AUTH answered 0x%02X" % code)
    rtt, codes = [], {}
    for i in range(args.warmup + args.requests):
        rid += 1
        t0 = time.perf_counter()
        if args.multipart:
            for m in ao_multipart_put(rid, sess, args.multipart):
                c.send(m)
        else:
            c.send(ao_get(rid, sess, args.pad))
        while True:
            a = c.recv_message()
            if struct.unpack(">I", a[2:6])[0] == rid:
                break
        t1 = time.perf_counter()
        codes[a[1]] = codes.get(a[1], 0) + 1
        if i >= args.warmup:
            rtt.append((t1 - t0) * 1000.0)
        if args.think:
            time.sleep(args.think / 1000.0)
    r = {"label": args.label, "write": args.write, "multipart": args.multipart, "requests": len(rtt),
         "p50_ms": round(pct(rtt, 50), 3), "p90_ms": round(pct(rtt, 90), 3),
         "p99_ms": round(pct(rtt, 99), 3), "max_ms": round(max(rtt), 3),
         "over_20ms": sum(1 for x in rtt if x >= 20.0),
         "codes": {"0x%02X" % k: v for k, v in codes.items()}}
    if args.json:
        print(json.dumps(r))
    else:
        print("%-14s %-7s n=%d p50 %.3f p90 %.3f p99 %.3f max %.3f ms, >=20ms: %d, codes %s" % (
            args.label, args.write, r["requests"], r["p50_ms"], r["p90_ms"], r["p99_ms"], r["max_ms"],
            r["over_20ms"], r["codes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
