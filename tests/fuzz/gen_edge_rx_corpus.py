#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_edge_rx: device streams toward the edge hop
(issue 11's 130-byte abort stream, a compression bomb, fragmented messages
with pings between, every kind of close code, 64-bit lengths, unmasked
frames, RFC 7692's examples) and a few upgrade heads. The layout of an input
is described at the top of fuzz_edge_rx.c. Run once from this directory; the
output is committed."""
import os
import struct
import sys
import zlib

OUT = "corpus/edge_rx"

DEFLATE, NO_TAKEOVER, BIG_PREAUTH, BIG_LIMIT = 1, 2, 4, 8
KEY = b"\x37\xfa\x21\x3d"  # RFC 6455 §5.7
ZERO = b"\x00\x00\x00\x00"  # the C SDK's mask key
TAIL = b"\x00\x00\xff\xff"


def head(flags=0, wbits=15, preauth=0, pieces=()):
    """The parameter bytes: flags, window bits, pre-AUTH limit, split pieces."""
    assert len(pieces) <= 15
    return bytes([flags, (wbits - 8) & 7, preauth, len(pieces)]) + b"".join(
        struct.pack(">H", n) for n in pieces
    )


def frame(b0, payload=b"", key=KEY, form=None, length=None):
    """One frame; `form` 16 or 64 forces a length form, `length` lies."""
    n = len(payload) if length is None else length
    b1 = 0x80 if key is not None else 0
    if form is None and n < 126:
        h = bytes([b0, b1 | n])
    elif form != 64 and n <= 0xFFFF:
        h = bytes([b0, b1 | 126]) + struct.pack(">H", n)
    else:
        h = bytes([b0, b1 | 127]) + struct.pack(">Q", n)
    if key is None:
        return h + payload
    return h + key + bytes(c ^ key[i & 3] for i, c in enumerate(payload))


class Client:
    """A device's compressor: raw deflate, sync flush, tail removed."""

    def __init__(self, wbits=15, takeover=True):
        self.wbits, self.takeover = wbits, takeover
        self.z = zlib.compressobj(9, zlib.DEFLATED, -wbits)

    def compress(self, data):
        if not self.takeover:
            self.z = zlib.compressobj(9, zlib.DEFLATED, -self.wbits)
        out = self.z.compress(data) + self.z.flush(zlib.Z_SYNC_FLUSH)
        return out[:-4] if out.endswith(TAIL) else out


def message(payload, key=KEY, compressed=False, per=None, rsv1_all=False):
    """A message as frames of at most `per` payload bytes."""
    per = per or max(len(payload), 1)
    parts = [payload[i : i + per] for i in range(0, len(payload), per)] or [b""]
    out = b""
    for i, part in enumerate(parts):
        b0 = 0x2 if i == 0 else 0x0
        if compressed and (i == 0 or rsv1_all):
            b0 |= 0x40
        if i == len(parts) - 1:
            b0 |= 0x80
        out += frame(b0, part, key)
    return out


# ---- AlwaysOn messages (docs/protocol.md) ----


def s(text):
    b = text.encode() if isinstance(text, str) else text
    if len(b) < 128:
        return bytes([len(b)]) + b
    return struct.pack(">I", len(b) | 0x80000000) + b


def ao(code, req, ep, sess, chunk=None):
    h = struct.pack(">BBIIIB", 1, code, req, ep, sess, 1 if chunk else 0)
    if chunk:
        h += struct.pack(">HHH", *chunk)
    return h


SESSION = 0x1234ABCD
AUTH = ao(0x14, 2, 0, 0xFFFFFFFF) + b"\x01" + s("appKey") + s("d1c4a7e2-3b5f-4c8d-9e0a-1f2b3c4d5e6f")
KEEP_ALIVE = ao(0x1F, 3, 0, SESSION)
GET = ao(0x01, 0x309, 0x2A, SESSION) + b"\x0a" + s("SteamSensor") + b"\x01" + s("Temperature")


def put_chunk(i, n=3):
    body = b"\x0a" + s("SteamSensor") + b"\x01" + s("Content") if i == 1 else b""
    return ao(0x02, 9, 0, SESSION, (i, n, 8192)) + body + bytes(4096)


def main():
    os.chdir(os.path.dirname(os.path.abspath(__file__)))
    os.makedirs(OUT, exist_ok=True)
    seeds = {}

    # Issue 11 item 1: three PUT multipart chunks of ~4 KB of zeros (141
    # bytes here; the chunks carried slightly shorter bodies),
    # permessage-deflate with context takeover, masked, RSV1 set.
    c = Client()
    abort = b"".join(message(c.compress(put_chunk(i)), compressed=True) for i in (1, 2, 3))
    print("abort stream: %d bytes" % len(abort), file=sys.stderr)
    seeds["abort130"] = head(DEFLATE | BIG_PREAUTH) + abort
    c = Client()
    stream = message(c.compress(AUTH), compressed=True) + b"".join(
        message(c.compress(put_chunk(i)), compressed=True) for i in (1, 2, 3)
    )
    seeds["abort130_after_auth"] = head(DEFLATE | BIG_PREAUTH | BIG_LIMIT) + stream
    seeds["abort130_split"] = head(DEFLATE | 0x30, pieces=(1, 2, 3, 5, 8, 13, 21, 34)) + stream
    seeds["abort130_paused"] = head(DEFLATE | BIG_LIMIT | 0x10, preauth=200) + stream

    # Issue 11 item 2: a burst of identical 2 KiB messages, takeover.
    c = Client(wbits=10)
    burst = bytes((i * 31 ^ i >> 3) & 0xFF for i in range(2048))
    stream = message(c.compress(AUTH), ZERO, True) + b"".join(
        message(c.compress(burst), ZERO, True, per=100 + 37 * i, rsv1_all=True) for i in range(20)
    )
    seeds["burst_w10"] = head(DEFLATE | BIG_PREAUTH, wbits=10) + stream
    c = Client(takeover=False)
    stream = message(c.compress(AUTH), KEY, True) + b"".join(
        message(c.compress(burst), KEY, True, per=500) for i in range(4)
    )
    seeds["burst_no_takeover"] = head(DEFLATE | NO_TAKEOVER | BIG_PREAUTH) + stream

    # A bomb: 64 KiB of compressed zeros (~64 MiB), in 4 KiB frames, after
    # AUTH with the large limit, and before AUTH.
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = b""
    while len(bomb) < 65536:
        bomb += z.compress(bytes(1 << 20))
    bomb = bomb[:65536]
    seeds["bomb_after_auth"] = (
        head(DEFLATE | BIG_PREAUTH | BIG_LIMIT)
        + message(AUTH)
        + message(bomb, compressed=True, per=4096, rsv1_all=True)
    )
    seeds["bomb_preauth"] = head(DEFLATE, pieces=(100, 4000)) + message(
        bomb[:8192], compressed=True, per=1024
    )
    # empty deflate blocks: compressed bytes without output
    seeds["empty_blocks"] = head(DEFLATE) + message(b"\x00\x00\x00\xff\xff" * 200, compressed=True)
    seeds["empty_blocks_after_auth"] = (
        head(DEFLATE | BIG_LIMIT)
        + message(AUTH)
        + message(b"\x00\x00\x00\xff\xff" * 2000, compressed=True, per=1000)
    )

    # Fragments with control frames between them.
    frag = (
        frame(0x02, GET[:5])
        + frame(0x89, b"ping")
        + frame(0x00, GET[5:9])
        + frame(0x8A, b"")
        + frame(0x00, b"")
        + frame(0x89, b"")
        + frame(0x80, GET[9:])
    )
    seeds["fragmented_pings"] = head(BIG_PREAUTH, pieces=(3, 1, 7)) + message(AUTH) + frag
    c = Client()
    auth = message(c.compress(AUTH), compressed=True)
    cz = c.compress(GET * 4)
    seeds["fragmented_pings_deflate"] = (
        head(DEFLATE | BIG_PREAUTH | 0x20)
        + auth
        + frame(0x42, cz[:3])
        + frame(0x89, b"p" * 125)
        + frame(0x40, cz[3:10])
        + frame(0x8A, b"pong")
        + frame(0xC0, cz[10:])
        + message(c.compress(b""), compressed=True)
        + message(b"", compressed=True)
        + message(c.compress(KEEP_ALIVE), compressed=True)
    )
    seeds["ping_flood"] = head(0x70) + message(AUTH) + frame(0x89, b"x" * 4) * 300

    # Close frames: codes a peer may and may not send, reasons.
    codes = [0, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010, 1011]
    codes += [1012, 1013, 1014, 1015, 1016, 2999, 3000, 4000, 4999, 5000, 65535]
    for code in codes:
        seeds["close_%d" % code] = head() + message(AUTH) + frame(0x88, struct.pack(">H", code))
    seeds["close_empty"] = head() + frame(0x88, b"")
    seeds["close_1byte"] = head() + frame(0x88, b"\x03")
    seeds["close_reason"] = head() + frame(0x88, struct.pack(">H", 1000) + "café €".encode())
    seeds["close_bad_utf8"] = head() + frame(0x88, struct.pack(">H", 1000) + b"\xed\xa0\x80")
    seeds["close_long"] = head() + frame(0x88, struct.pack(">H", 1000) + b"r" * 123)

    # Lengths.
    seeds["len64_small"] = head(BIG_PREAUTH) + frame(0x82, AUTH, form=64) + frame(0x82, GET, form=64)
    seeds["len16"] = head(BIG_PREAUTH | BIG_LIMIT) + message(AUTH) + frame(0x82, bytes(300))
    seeds["len64_top_bit"] = head() + frame(0x82, length=1 << 63)[:14]
    seeds["len64_2e62"] = head(DEFLATE) + frame(0xC2, length=1 << 62)[:14]
    seeds["len_over_limit"] = head() + frame(0x82, length=100000)[:14]
    seeds["len64_big_after_auth"] = (
        head(BIG_LIMIT) + message(AUTH) + frame(0x82, bytes(70000), form=64)
    )

    # Masking.
    seeds["unmasked"] = head() + frame(0x82, AUTH, key=None)
    seeds["unmasked_ping"] = head() + message(AUTH) + frame(0x89, b"", key=None)
    seeds["zero_mask"] = head(BIG_PREAUTH) + message(AUTH, ZERO) + message(GET, ZERO, per=7)

    # Protocol errors.
    seeds["text"] = head() + frame(0x81, b"hello")
    seeds["rsv1_no_deflate"] = head() + frame(0xC2, AUTH)
    seeds["rsv2"] = head(DEFLATE) + frame(0xA2, AUTH)
    seeds["rsv1_control"] = head(DEFLATE) + frame(0xC9, b"")
    seeds["rsv1_plain_continuation"] = head(DEFLATE) + frame(0x02, b"a") + frame(0xC0, b"b")
    seeds["reserved_opcode"] = head() + b"".join(frame(0x80 | op, b"x") for op in (3, 7, 0xB, 0xF))
    seeds["control_126"] = head() + frame(0x89, bytes(126))
    seeds["control_fragmented"] = head() + frame(0x09, b"x")
    seeds["continuation_first"] = head() + frame(0x80, b"x")
    seeds["data_inside_fragmented"] = head() + frame(0x02, b"a") + frame(0x82, b"b")
    seeds["not_auth_first"] = head(BIG_PREAUTH) + message(GET) + message(AUTH)
    seeds["preauth_too_big"] = head(preauth=0) + message(AUTH + bytes(200))

    # RFC 7692 §7.2.3: Hello, Hello again (takeover), stored, BFINAL, two blocks.
    hello = bytes.fromhex("f248cdc9c90700")
    seeds["rfc7692_hello"] = head(DEFLATE | BIG_PREAUTH) + message(AUTH) + b"".join(
        frame(0xC2, p)
        for p in (
            hello,
            bytes.fromhex("f200110000"),
            bytes.fromhex("000500faff48656c6c6f00"),
            bytes.fromhex("f348cdc9c9070000"),
            bytes.fromhex("f248050000 00ffffcac9c90700".replace(" ", "")),
            b"\x00",
            b"",
        )
    )
    seeds["rfc7692_fragmented"] = (
        head(DEFLATE) + message(AUTH) + frame(0x42, hello[:3]) + frame(0x80, hello[3:])
    )
    seeds["window9"] = head(DEFLATE | BIG_PREAUTH, wbits=9) + b"".join(
        message(Client(9).compress(AUTH + bytes(i * 100)), compressed=True) for i in range(3)
    )

    # Upgrade heads (fuzz_http reads everything after the 4 parameter bytes).
    base = (
        "GET /Thingworx/WS HTTP/1.1\r\nHost: edge.example\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n"
    )
    heads = {
        "head_plain": base + "appKey: k\r\nMax-Frame-Size: 8192\r\n\r\n",
        "head_pmd_sdk": base + "Sec-WebSocket-Extensions: permessage-deflate; "
        "client_max_window_bits\r\n\r\n",
        "head_pmd_params": base + "Sec-WebSocket-Extensions: x-webkit-deflate-frame, "
        'permessage-deflate; server_max_window_bits="12"; client_max_window_bits=8; '
        "server_no_context_takeover; client_no_context_takeover, permessage-deflate\r\n\r\n",
        "head_pmd_dup": base + "Sec-WebSocket-Extensions: permessage-deflate; "
        "server_no_context_takeover; server_no_context_takeover, permessage-deflate\r\n\r\n",
        "head_xff": base + "X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\n\r\n",
        "head_connect": "CONNECT edge.example:443 HTTP/1.1\r\nHost: edge.example\r\n\r\n",
        "head_http10": base.replace("HTTP/1.1", "HTTP/1.0") + "\r\n",
        "head_version8": base.replace("Version: 13", "Version: 8") + "\r\n",
    }
    for name, text in heads.items():
        seeds[name] = head() + text.encode()

    for name, data in sorted(seeds.items()):
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
    print("%d seeds in %s" % (len(seeds), OUT), file=sys.stderr)


if __name__ == "__main__":
    main()
