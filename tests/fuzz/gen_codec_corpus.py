#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_codec: the captured vectors of
docs/protocol.md, multipart chunks, nested InfoTables and edgemux's own
answers. Run once from this directory; the output is committed."""
import os
import struct
import sys


def s(text):
    b = text.encode() if isinstance(text, str) else text
    if len(b) < 128:
        return bytes([len(b)]) + b
    return struct.pack(">I", len(b) | 0x80000000) + b


def hdr(code, req, ep, sess, chunk=None):
    h = struct.pack(">BBIIIB", 1, code, req, ep, sess, 1 if chunk else 0)
    if chunk:
        h += struct.pack(">HHH", *chunk)
    return h


def field(name, bt, desc="", aspects=b"", n_aspects=0):
    return b"\x01" + s(name) + s(desc) + bytes([bt]) + struct.pack(">H", n_aspects) + aspects


def row(*values):
    return b"\x01" + struct.pack(">H", len(values)) + b"".join(values)


def table(fields, rows):
    return b"".join(fields) + b"\x00" + b"".join(rows) + b"\x00"


def nested(levels):
    if levels == 1:
        return table([field("leaf", 0)], [row(b"\x00" + s("deep"))])
    return table([field("inner", 5)], [row(b"\x05" + nested(levels - 1))])


KEY = "d1c4a7e2-3b5f-4c8d-9e0a-1f2b3c4d5e6f"
SESSION = 0x1234ABCD
PRESSURE = table([field("Pressure", 1)], [row(b"\x01" + struct.pack(">d", 42.5))])
FAULT = table([field("message", 0, "why it fired")], [row(b"\x00" + s("Pressure over limit"))])

EVERY_TYPE = table(
    [field("f%d" % t, t) for t in (0, 1, 2, 3, 4, 6, 22, 21, 18, 100, 255)],
    [
        row(
            b"\x00" + s("text"),
            b"\x01" + struct.pack(">d", 3.25),
            b"\x02\x01",
            b"\x03" + struct.pack(">q", 1700000000000),
            b"\x04" + struct.pack(">q", 60000),
            b"\x06" + struct.pack(">ddd", 42.36, -71.06, 12.0),
            b"\x16" + struct.pack(">i", -2),
            b"\x15" + struct.pack(">I", 3) + b"abc",
            b"\x12\x02\x00",
            b"\x64" + s("SteamSensor"),
            b"\xff",
        )
    ],
)

SEEDS = {
    "auth": hdr(0x14, 2, 0, 0xFFFFFFFF) + b"\x01" + s("appKey") + s(KEY),
    "bind": hdr(0x0A, 3, 0, SESSION) + b"\x00" + struct.pack(">H", 1) + s("SteamSensor"),
    "bind_gateway": hdr(0x0A, 4, 0, SESSION)
    + b"\x01"
    + s("gw-7")
    + s("EdgeGateway")
    + struct.pack(">H", 2)
    + s("A")
    + s("B"),
    "unbind": hdr(0x0B, 0x80000001, 0x2A, SESSION) + b"\x00" + struct.pack(">H", 1) + s("SteamSensor"),
    "get": hdr(0x01, 0x309, 0x2A, SESSION)
    + b"\x0a"
    + s("SteamSensor")
    + b"\x01"
    + s("Temperature")
    + b"\x00\xff",
    "not_found": hdr(0x84, 0x309, 0x2A, SESSION) + b"\x00\xff",
    "success_pressure": hdr(0x40, 0x30A, 0x2B, SESSION) + b"\x00\x05" + PRESSURE,
    "post_event": hdr(0x03, 4, 0, SESSION)
    + b"\x0a"
    + s("SteamSensor")
    + b"\x03"
    + s("SteamSensorFault")
    + b"\x00\x05"
    + FAULT,
    "request_headers": hdr(0x02, 5, 0, SESSION)
    + b"\x0a"
    + s("SteamSensor")
    + b"\x02"
    + s("SetReadings")
    + b"\x01"
    + s("Content-Type")
    + s("binary")
    + b"\x05"
    + EVERY_TYPE,
    "multipart_chunk1": hdr(0x02, 9, 0, SESSION, (1, 3, 8192))
    + b"\x0a"
    + s("SteamSensor")
    + b"\x02"
    + s("SetBlob")
    + b"\x00\x05"
    + bytes(24),
    "multipart_chunk2": hdr(0x02, 9, 0, SESSION, (2, 3, 8192)) + b"\x0a" + s("SteamSensor") + bytes(40),
    "nested_infotable": hdr(0x40, 6, 0x2B, SESSION) + b"\x00\x05" + nested(4),
    "nested_at_limit": hdr(0x40, 7, 0x2B, SESSION) + b"\x00\x05" + nested(16),
    "every_type": hdr(0x40, 8, 0x2B, SESSION) + b"\x00\x05" + EVERY_TYPE,
    "keep_alive": hdr(0x1F, 10, 0, SESSION) + b"\x00\xff",
    "keep_alive_answer": hdr(0x40, 10, 0, SESSION) + b"\x00\xff",
    "bad_request": hdr(0x80, 11, 0, SESSION) + b"\x01" + s("Message Type not supported") + b"\xff",
    "timeout_long_reason": hdr(0xA4, 12, 0, SESSION) + b"\x01" + s("t" * 130) + b"\xff",
    "header_only": hdr(0x01, 13, 0, 0),
}

# Remote Access tunnel control services, as TUNNELS.md §3.1 and §5 show them.
TUNNEL_SESSION = 0x4761C29E


def start_tunnel(tid="tun-1", conn='{"host": "127.0.0.1", "port": 7777}'):
    fields = [field("tid", 0), field("type", 0), field("chunksize", 22), field("idle_timeout", 22),
              field("read_timeout", 22), field("connection", 0)]
    values = row(b"\x00" + s(tid), b"\x00" + s("tcp"), b"\x16" + struct.pack(">i", 8192),
                 b"\x16" + struct.pack(">i", 30000), b"\x16" + struct.pack(">i", 10),
                 b"\x00" + s(conn))
    return (hdr(0x03, 1000, 0, TUNNEL_SESSION) + b"\x0a" + s("SteamSensor") + b"\x02"
            + s("StartTunnel") + b"\x00\x05" + table(fields, [values]))


def tunnel_service(name, pairs, req=6):
    fields = [field(k, 0) for k, _ in pairs]
    values = row(*[b"\x00" + s(v) for _, v in pairs])
    return (hdr(0x03, req, 0, TUNNEL_SESSION) + b"\x0a" + s("SteamSensor") + b"\x02" + s(name)
            + b"\x00\x05" + table(fields, [values]))


TUNNEL_SEEDS = {
    "tunnel_start": start_tunnel(),
    "tunnel_start_answer": hdr(0x40, 1000, 0, TUNNEL_SESSION) + b"\x00\xff",
    "tunnel_from_edge_cancel": tunnel_service("TunnelCommandFromEdge",
                                              [("tid", "tun-1"), ("command", "CANCEL")]),
    "tunnel_to_edge_connect": tunnel_service("TunnelCommandToEdge",
                                             [("tid", "tun-1"), ("command", "CONNECT")], 1001),
    "tunnel_complete": tunnel_service("CompleteTunnel", [("tid", "tun-1"), ("peer_name", "platform-1"),
                                                         ("connection", '{"reason": "test done"}')], 1002),
    "tunnel_start_nested_json": start_tunnel(
        conn='{"message": {"a": [1, "}"]}, "port": 22, "host": "10.0.0.\\"5"}'),
}
SEEDS.update(TUNNEL_SEEDS)


def main():
    out = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), "corpus", "codec")
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    assert len(SEEDS["auth"]) == 60 and len(SEEDS["bind"]) == 30
    assert len(SEEDS["not_found"]) == 17
    assert len(SEEDS["tunnel_start"]) == 198 and len(SEEDS["tunnel_from_edge_cancel"]) == 95
    assert SEEDS["tunnel_start_answer"].hex() == "0140000003e8000000004761c29e0000ff"


if __name__ == "__main__":
    main()
