"""A device written from the RFCs, for the edge conformance suites
(test_edge_*.py). Python 3 standard library only; none of the project's
client code.

- RFC 6455: the opening handshake (§4.1, §4.2.2 Sec-WebSocket-Accept),
  framing and masking (§5.2, §5.3), fragmentation (§5.4), control frames
  (§5.5), the close handshake and its codes (§5.5.1, §7.4).
- RFC 7692: permessage-deflate negotiation (§5, §7.1) and the data path
  (§7.2): raw DEFLATE, Z_SYNC_FLUSH with the trailing 00 00 ff ff removed
  by the sender and appended by the receiver, context takeover unless
  *_no_context_takeover was agreed, window sizes as agreed.

Every frame the server sends is checked against the same rules (server
frames unmasked, no RSV2/RSV3, RSV1 only on the first frame of a
compressed message, control frames short and unfragmented) and against
docs/protocol.md §4 (no frame over the device's Max-Frame-Size, no 64-bit
length). A break raises ServerViolation.

The AlwaysOn helpers come from harness.py (the test harness, not the
project's client)."""

import base64
import hashlib
import os
import re
import select
import socket
import struct
import time
import zlib

from harness import (GET, POST, SUCCESS, E2ETest, Edgemux, Platform, ao_auth, ao_header,
                     ao_infotable_blob, ao_parse, ao_request, ao_str, ao_chunk_ids)

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DEFAULT_PATH = "/Thingworx/WS"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CONTROL_OPS = (OP_CLOSE, OP_PING, OP_PONG)
DATA_OPS = (OP_CONT, OP_TEXT, OP_BINARY)

ZERO_KEY = b"\x00\x00\x00\x00"
RANDOM = object()  # mask= default: a fresh random key per frame
TAIL = b"\x00\x00\xff\xff"


class ServerViolation(AssertionError):
    """The server broke RFC 6455 / RFC 7692 / docs/protocol.md §4."""


class Closed(Exception):
    """A close frame arrived (code None when it carried no payload), or the
    TCP connection ended without one (code 1006, frame False)."""

    def __init__(self, code, reason=b"", frame=True):
        super().__init__("closed %s %r%s" % (code, reason[:60], "" if frame else " (no close frame)"))
        self.code = code
        self.reason = reason
        self.frame = frame


# ---------------------------------------------------------------- RFC 6455

def accept_for(key):
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    k = key.encode() if isinstance(key, str) else key
    return base64.b64encode(hashlib.sha1(k + WS_GUID).digest()).decode()


def apply_mask(key, data):
    """RFC 6455 §5.3: octet i XOR key[i mod 4] (its own inverse)."""
    if not data or key == ZERO_KEY:
        return bytes(data)
    n = len(data)
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")


def frame(opcode, payload=b"", fin=True, rsv1=False, rsv2=False, rsv3=False, mask=RANDOM,
          length=None, length_form=None):
    """One frame as a client sends it (RFC 6455 §5.2). mask: RANDOM (a new
    key), 4 bytes (that key), or None (unmasked: a violation). length: the
    declared payload length when it must differ from len(payload);
    length_form 7, 16 or 64 forces an encoding."""
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | (0x20 if rsv2 else 0) | \
         (0x10 if rsv3 else 0) | (opcode & 0x0F)
    n = len(payload) if length is None else length
    form = length_form or (7 if n < 126 else 16 if n < 65536 else 64)
    m = 0 if mask is None else 0x80
    if form == 7:
        hdr = struct.pack(">BB", b0, m | n)
    elif form == 16:
        hdr = struct.pack(">BBH", b0, m | 126, n)
    else:
        hdr = struct.pack(">BBQ", b0, m | 127, n)
    if mask is None:
        return hdr + bytes(payload)
    key = os.urandom(4) if mask is RANDOM else mask
    return hdr + key + apply_mask(key, payload)


def close_payload(code=None, reason=b""):
    if code is None:
        return b""
    return struct.pack(">H", code) + (reason.encode() if isinstance(reason, str) else reason)


def valid_close_code(code):
    """Codes an endpoint may send in a close frame (RFC 6455 §7.4.1, §7.4.2):
    1000-1003, 1007-1011 (and 1012-1014 registered by IANA since),
    3000-4999."""
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or \
        3000 <= code <= 4999


# ---------------------------------------------------------------- RFC 7692

class Compressor:
    """The sending side of permessage-deflate (RFC 7692 §7.2.1): raw DEFLATE
    (no zlib header), each message ended with Z_SYNC_FLUSH and its trailing
    00 00 ff ff removed. With context takeover the LZ77 window carries over
    from message to message; with no_context_takeover it is reset for each.
    zlib cannot compress with a raw window of 2^8; callers check `usable`."""

    def __init__(self, wbits=15, no_context_takeover=False, level=6, mem_level=8):
        self.wbits = wbits
        self.level = level
        self.mem_level = mem_level
        self.no_context_takeover = no_context_takeover
        self.usable = wbits >= 9
        self.c = self._new() if self.usable else None

    def _new(self):
        return zlib.compressobj(self.level, zlib.DEFLATED, -self.wbits, self.mem_level)

    def compress(self, msg, flush=zlib.Z_SYNC_FLUSH):
        if self.no_context_takeover:
            self.c = self._new()
        out = self.c.compress(msg) + self.c.flush(flush)
        if flush == zlib.Z_SYNC_FLUSH:
            if not out.endswith(TAIL):
                raise AssertionError("Z_SYNC_FLUSH output does not end with 00 00 ff ff")
            out = out[:-4]
        return out

    def compress_final(self, msg):
        """RFC 7692 §7.2.3.4: a message whose last block has BFINAL set
        (Z_FINISH). The next message needs a new stream, so this resets."""
        c = self._new()
        out = c.compress(msg) + c.flush(zlib.Z_FINISH)
        self.c = self._new()
        return out


class Decompressor:
    """The receiving side (RFC 7692 §7.2.2): append 00 00 ff ff and inflate.
    wbits is the window the peer agreed to use: zlib refuses distances
    beyond it ("invalid distance too far back"), which checks that the
    server keeps its stated server_max_window_bits."""

    def __init__(self, wbits=15, no_context_takeover=False):
        self.wbits = wbits
        self.no_context_takeover = no_context_takeover
        self.d = zlib.decompressobj(-wbits)

    def decompress(self, payload):
        if self.no_context_takeover:
            self.d = zlib.decompressobj(-self.wbits)
        try:
            out = self.d.decompress(payload + TAIL)
        except zlib.error as e:
            raise ServerViolation("compressed message does not inflate (window 2^%d%s): %s"
                                  % (self.wbits, ", fresh inflater" if self.no_context_takeover else "", e))
        if self.d.unconsumed_tail:
            raise ServerViolation("inflate left input unconsumed")
        if self.d.eof:  # BFINAL: a new stream for the next message
            self.d = zlib.decompressobj(-self.wbits)
        return out


_LBASE = [3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
          131, 163, 195, 227, 258]
_LEXT = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0]
_DBASE = [1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
          2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577]
_DEXT = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13]


def _huffman(lengths):
    """Canonical Huffman code (RFC 1951 §3.2.2): {(length, code): symbol}."""
    bl_count = [0] * 16
    for n in lengths:
        if n:
            bl_count[n] += 1
    code, next_code = 0, [0] * 16
    for bits in range(1, 16):
        code = (code + bl_count[bits - 1]) << 1
        next_code[bits] = code
    table = {}
    for sym, n in enumerate(lengths):
        if n:
            table[(n, next_code[n])] = sym
            next_code[n] += 1
    return table


def deflate_max_distance(data):
    """Walks raw DEFLATE data (RFC 1951) made of whole blocks and returns
    the largest back-reference distance it uses, so a test can check that
    a server keeps within the window it stated (zlib's inflater does not
    check distances inside one call). Slow (pure Python): small inputs."""
    pos, bitbuf, bitcnt = 0, 0, 0
    n = len(data)

    def bits(k):
        nonlocal pos, bitbuf, bitcnt
        while bitcnt < k:
            if pos >= n:
                raise ValueError("DEFLATE data ends inside a block")
            bitbuf |= data[pos] << bitcnt
            pos += 1
            bitcnt += 8
        v = bitbuf & ((1 << k) - 1)
        bitbuf >>= k
        bitcnt -= k
        return v

    def decode(table):
        code = length = 0
        while length < 16:
            code = (code << 1) | bits(1)
            length += 1
            sym = table.get((length, code))
            if sym is not None:
                return sym
        raise ValueError("bad Huffman code")

    fixed_lit = _huffman([8] * 144 + [9] * 112 + [7] * 24 + [8] * 8)
    fixed_dist = _huffman([5] * 30)
    maxd = 0
    while pos < n or bitcnt >= 8:
        final = bits(1)
        btype = bits(2)
        if btype == 0:
            bitbuf, bitcnt = 0, 0  # to the byte boundary
            if pos + 4 > n:
                raise ValueError("stored block header cut")
            ln, nln = struct.unpack("<HH", data[pos:pos + 4])
            if ln != nln ^ 0xFFFF:
                raise ValueError("bad stored block length")
            pos += 4 + ln
            if pos > n:
                raise ValueError("stored block cut")
        elif btype in (1, 2):
            if btype == 1:
                lit, dist = fixed_lit, fixed_dist
            else:
                hlit, hdist, hclen = bits(5) + 257, bits(5) + 1, bits(4) + 4
                order = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15]
                cl = [0] * 19
                for i in range(hclen):
                    cl[order[i]] = bits(3)
                cltab = _huffman(cl)
                lens = []
                while len(lens) < hlit + hdist:
                    sym = decode(cltab)
                    if sym < 16:
                        lens.append(sym)
                    elif sym == 16:
                        lens += [lens[-1]] * (3 + bits(2))
                    elif sym == 17:
                        lens += [0] * (3 + bits(3))
                    else:
                        lens += [0] * (11 + bits(7))
                lit, dist = _huffman(lens[:hlit]), _huffman(lens[hlit:])
            while True:
                sym = decode(lit)
                if sym < 256:
                    continue
                if sym == 256:
                    break
                bits(_LEXT[sym - 257])
                dsym = decode(dist)
                d = _DBASE[dsym] + bits(_DEXT[dsym])
                maxd = max(maxd, d)
        else:
            raise ValueError("reserved block type")
        if final:
            break
    return maxd


def parse_extensions(values):
    """Sec-WebSocket-Extensions header values (RFC 6455 §9.1) as a list of
    (name, [(param, value or None)]). Quoted values are unquoted."""
    out = []
    for v in values:
        for ext in split_outside_quotes(v, ","):
            ext = ext.strip()
            if not ext:
                continue
            parts = split_outside_quotes(ext, ";")
            name = parts[0].strip()
            params = []
            for p in parts[1:]:
                p = p.strip()
                if not p:
                    continue
                if "=" in p:
                    k, val = p.split("=", 1)
                    val = val.strip()
                    if len(val) >= 2 and val[0] == '"' and val[-1] == '"':
                        val = val[1:-1]
                    params.append((k.strip().lower(), val))
                else:
                    params.append((p.lower(), None))
            out.append((name.lower(), params))
    return out


def split_outside_quotes(s, sep):
    parts, cur, q = [], [], False
    for ch in s:
        if ch == '"':
            q = not q
        if ch == sep and not q:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _window_bits(v):
    return v is not None and re.fullmatch(r"[1-9][0-9]?", v) is not None and 8 <= int(v) <= 15


def valid_pmd_offer(params):
    """RFC 7692 §7: known parameters, none repeated, values as §7.1.2
    says (server_max_window_bits needs one, client_max_window_bits may
    have one, the no_context_takeover ones have none)."""
    seen = set()
    for k, v in params:
        if k in seen:
            return False
        seen.add(k)
        if k in ("server_no_context_takeover", "client_no_context_takeover"):
            if v is not None:
                return False
        elif k == "server_max_window_bits":
            if not _window_bits(v):
                return False
        elif k == "client_max_window_bits":
            if v is not None and not _window_bits(v):
                return False
        else:
            return False
    return True


def check_pmd_response(offer_params, resp_params):
    """RFC 7692 §7.1: the server's accepted permessage-deflate parameters
    against the offer it accepts. Returns the agreed settings as a dict;
    raises ServerViolation on an invalid response."""
    if not valid_pmd_offer(offer_params):
        raise ServerViolation("accepted an invalid permessage-deflate offer %r" % (offer_params,))
    seen = set()
    agreed = {"server_no_context_takeover": False, "client_no_context_takeover": False,
              "server_max_window_bits": None, "client_max_window_bits": None}
    offered = dict(offer_params)
    for k, v in resp_params:
        if k in seen:
            raise ServerViolation("response repeats %s" % k)
        seen.add(k)
        if k in ("server_no_context_takeover", "client_no_context_takeover"):
            if v is not None:
                raise ServerViolation("%s with a value" % k)
            agreed[k] = True
        elif k in ("server_max_window_bits", "client_max_window_bits"):
            if not _window_bits(v):
                raise ServerViolation("%s=%r is not 8..15" % (k, v))
            agreed[k] = int(v)
        else:
            raise ServerViolation("unknown parameter %s in the response" % k)
    # §7.1.1.1: an offered server_no_context_takeover, once accepted, is in the response
    if "server_no_context_takeover" in offered and not agreed["server_no_context_takeover"]:
        raise ServerViolation("server_no_context_takeover offered but not in the response")
    # §7.1.2.1: a response value is the same or smaller than the offered one
    if "server_max_window_bits" in offered and offered["server_max_window_bits"] is not None:
        want = int(offered["server_max_window_bits"])
        if agreed["server_max_window_bits"] is None or agreed["server_max_window_bits"] > want:
            raise ServerViolation("server_max_window_bits=%s offered, response %r"
                                  % (want, agreed["server_max_window_bits"]))
    # §7.1.2.2: client_max_window_bits only when the client offered it, and
    # not larger than the offered value
    if agreed["client_max_window_bits"] is not None:
        if "client_max_window_bits" not in offered:
            raise ServerViolation("client_max_window_bits in the response but not in the offer")
        ov = offered["client_max_window_bits"]
        if ov is not None and agreed["client_max_window_bits"] > int(ov):
            raise ServerViolation("client_max_window_bits larger than offered")
    return agreed


# ---------------------------------------------------------------- HTTP

class HTTPAnswer:
    def __init__(self, raw, closed):
        self.raw = raw
        self.closed = closed  # the server closed the connection (EOF or reset)
        self.status = None
        self.version = None
        self.headers = []
        self.rest = b""
        if b"\r\n\r\n" in raw:
            head, self.rest = raw.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            m = re.match(r"(HTTP/\d\.\d) (\d{3})", lines[0])
            if m:
                self.version = m.group(1)
                self.status = int(m.group(2))
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    self.headers.append((k.strip().lower(), v.strip()))

    def header(self, name):
        vals = self.all(name)
        return vals[0] if vals else None

    def all(self, name):
        return [v for k, v in self.headers if k == name.lower()]

    def __repr__(self):
        return "HTTPAnswer(status=%r, closed=%r, raw=%r)" % (self.status, self.closed, self.raw[:300])


def upgrade_request(host, port, path=DEFAULT_PATH, key=None, method="GET", version="HTTP/1.1",
                    extensions=None, headers=None, app_key=None, omit=()):
    """An upgrade request as bytes; omit names headers to leave out, headers
    adds or replaces (a list of (name, value))."""
    key = key or base64.b64encode(os.urandom(16)).decode()
    hs = [("Host", "%s:%d" % (host, port)), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
          ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", "13")]
    if extensions is not None:
        for e in ([extensions] if isinstance(extensions, str) else extensions):
            hs.append(("Sec-WebSocket-Extensions", e))
    if app_key:
        hs.append(("appKey", app_key))
    replace = dict((k.lower(), v) for k, v in (headers or []))
    out = []
    for k, v in hs:
        if k.lower() in [o.lower() for o in omit]:
            continue
        if k.lower() in replace:
            v = replace.pop(k.lower())
        out.append((k, v))
    for k, v in headers or []:
        if k.lower() in replace:
            out.append((k, v))
            replace.pop(k.lower())
    line = "%s %s %s" % (method, path, version) if version else "%s %s" % (method, path)
    text = line + "\r\n" + "".join("%s: %s\r\n" % kv for kv in out) + "\r\n"
    return text.encode("latin-1"), key


def http_exchange(port, request, host="127.0.0.1", timeout=3.0, source=None, until_close=True,
                  pieces=None, piece_delay=0.0):
    """Send request bytes (optionally in pieces: a list of cut offsets) and
    read what comes back until the server closes, the answer head is
    complete and until_close is False, or timeout. Returns (HTTPAnswer,
    seconds until the head was complete or the connection closed)."""
    s = socket.create_connection((host, port), timeout=timeout,
                                 source_address=(source, 0) if source else None)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.monotonic()
    raw, closed, t_done = b"", False, None
    try:
        cuts = [0] + list(pieces or []) + [len(request)]
        for a, b in zip(cuts, cuts[1:]):
            if b > a:
                s.sendall(request[a:b])
                if piece_delay:
                    time.sleep(piece_delay)
        deadline = t0 + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, ConnectionAbortedError):
                closed = True
                t_done = time.monotonic() - t0
                break
            except (socket.timeout, TimeoutError):
                break
            if not chunk:
                closed = True
                t_done = time.monotonic() - t0
                break
            raw += chunk
            if b"\r\n\r\n" in raw and t_done is None:
                t_done = time.monotonic() - t0
                if not until_close:
                    break
    except (BrokenPipeError, ConnectionResetError):
        closed = True
        t_done = time.monotonic() - t0
    finally:
        s.close()
    return HTTPAnswer(raw, closed), t_done


# ---------------------------------------------------------------- the device

class Device:
    """One device on a plain TCP socket. deflate: None (no offer), True
    (the SDK's offer, `permessage-deflate`), or the offer text(s) to send
    as Sec-WebSocket-Extensions. After the upgrade `pmd` is the agreed
    settings (None without the extension)."""

    def __init__(self, port, host="127.0.0.1", path=DEFAULT_PATH, deflate=None, app_key=None,
                 headers=None, timeout=5.0, source=None, mask=RANDOM, max_frame_size=None,
                 rsv1_on_continuation=False, connect_timeout=5.0, expect_upgrade=True,
                 accepted_offer=None, check_window=False):
        self.port = port
        self.host = host
        self.mask = mask
        self.timeout = timeout
        self.max_frame_size = max_frame_size or 8192
        self.rsv1_on_continuation = rsv1_on_continuation
        self.buf = b""
        self.pongs = []
        self.pings = []
        self.close_code = None
        self.close_reason = None
        self.close_frame_seen = False
        self.close_sent = False
        self.eof = False
        self.answers_out_of_order = {}
        self.queued = []  # data messages read by poll() for later readers
        self.wire_sizes = []  # (compressed, payload bytes on the wire) of each message received
        self.check_window = check_window  # walk each compressed message for its largest distance (slow)
        self.next_rid = 1
        self.session = 0
        self.frames_seen = 0
        self.sock = socket.create_connection((host, port), timeout=connect_timeout,
                                             source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        offer = None
        if deflate is True:
            offer = "permessage-deflate"
        elif deflate:
            offer = deflate
        hs = list(headers or [])
        if max_frame_size:
            hs.append(("Max-Frame-Size", str(max_frame_size)))
        req, self.key = upgrade_request(host, port, path, extensions=offer, headers=hs,
                                        app_key=app_key)
        self.offer = parse_extensions([offer] if isinstance(offer, str) else (offer or []))
        self.accepted_offer = accepted_offer  # index among the permessage-deflate offers
        self.sock.sendall(req)
        self.sock.settimeout(timeout)
        while b"\r\n\r\n" not in self.buf:
            try:
                chunk = self.sock.recv(4096)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.sock.close()
                raise ConnectionError("connection closed during the upgrade (%r)" % self.buf[:200])
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.response = HTTPAnswer(head + b"\r\n\r\n", False)
        if not expect_upgrade:
            return
        self._check_upgrade()

    def _check_upgrade(self):
        r = self.response
        if r.status != 101:
            raise AssertionError("upgrade answered %r:\n%s" % (r.status, r.raw.decode("latin-1")))
        if (r.header("upgrade") or "").lower() != "websocket":
            raise ServerViolation("101 without Upgrade: websocket")
        if "upgrade" not in [t.strip().lower() for t in (r.header("connection") or "").split(",")]:
            raise ServerViolation("101 without Connection: Upgrade")
        if r.header("sec-websocket-accept") != accept_for(self.key):
            raise ServerViolation("Sec-WebSocket-Accept %r, wanted %r"
                                  % (r.header("sec-websocket-accept"), accept_for(self.key)))
        exts = parse_extensions(r.all("sec-websocket-extensions"))
        self.pmd = None
        if len(exts) > 1:
            raise ServerViolation("more than one extension accepted: %r" % exts)
        if exts:
            name, params = exts[0]
            if name != "permessage-deflate":
                raise ServerViolation("extension %r not offered" % name)
            offers = [p for n, p in self.offer if n == "permessage-deflate"]
            if not offers:
                raise ServerViolation("permessage-deflate accepted but not offered")
            if self.accepted_offer is not None:
                offers = [offers[self.accepted_offer]]
            # The response answers one of the offers; find one it is valid for.
            err = None
            for op in offers:
                try:
                    self.pmd = check_pmd_response(op, params)
                    self.pmd_offer = op
                    break
                except ServerViolation as e:
                    err = e
            if self.pmd is None:
                raise err
            self.pmd_params = params
        self._reset_codecs()
        self.frag = None  # (opcode, compressed, parts) of a message being received

    def _reset_codecs(self):
        p = self.pmd
        if p is None:
            self.comp = self.decomp = None
            return
        self.comp = Compressor(p["client_max_window_bits"] or 15, p["client_no_context_takeover"])
        self.decomp = Decompressor(p["server_max_window_bits"] or 15, p["server_no_context_takeover"])

    # ------------------------------------------------------------ sending

    def frame(self, opcode, payload=b"", **kw):
        kw.setdefault("mask", self.mask)
        return frame(opcode, payload, **kw)

    def send_raw(self, data, cuts=None, delay=0.0):
        """Write bytes, optionally as separate writes cut at the given
        offsets with a pause between them. While writing, whatever the
        server sends is read into the buffer, so a server that answers or
        closes early never deadlocks the device. Returns False when the
        server stopped the writing (a complete close frame seen, reset,
        broken pipe), True when everything was written."""
        cuts = sorted(set(c for c in (cuts or []) if 0 < c < len(data)))
        pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        for i, piece in enumerate(pieces):
            if not self._write(piece):
                return False
            if delay and i + 1 < len(pieces):
                time.sleep(delay)
        return True

    def _write(self, data, timeout=None):
        view = memoryview(data)
        deadline = time.monotonic() + (timeout or max(self.timeout, 10.0))
        self.sock.setblocking(False)
        try:
            while len(view):
                if self._close_frame_buffered():
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("server did not read %d bytes within the timeout" % len(view))
                p = select.poll()  # not select(): descriptors may be over 1024
                p.register(self.sock, select.POLLIN | select.POLLOUT)
                ev = 0
                for _, e in p.poll(min(left, 1.0) * 1000):
                    ev |= e
                r = ev & (select.POLLIN | select.POLLHUP | select.POLLERR)
                w = ev & (select.POLLOUT | select.POLLERR)
                if r and not self.eof:
                    try:
                        chunk = self.sock.recv(1 << 20)
                    except (ConnectionResetError, BlockingIOError, InterruptedError) as e:
                        if isinstance(e, ConnectionResetError):
                            self.eof = True
                            return False
                        chunk = None
                    if chunk == b"":
                        self.eof = True
                        return False
                    if chunk:
                        self.buf += chunk
                if w:
                    try:
                        n = self.sock.send(view)
                        view = view[n:]
                    except (BlockingIOError, InterruptedError):
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        return False
            return True
        finally:
            self.sock.setblocking(True)
            self.sock.settimeout(self.timeout)

    def _close_frame_buffered(self):
        """True when the buffer holds a complete close frame from the
        server (frames before it are left for the readers)."""
        b, off = self.buf, 0
        while True:
            if len(b) - off < 2:
                return False
            op, n = b[off] & 0x0F, b[off + 1] & 0x7F
            h = 2
            if n == 126:
                if len(b) - off < 4:
                    return False
                n = struct.unpack(">H", b[off + 2:off + 4])[0]
                h = 4
            elif n == 127:
                if len(b) - off < 10:
                    return False
                n = struct.unpack(">Q", b[off + 2:off + 10])[0]
                h = 10
            if b[off + 1] & 0x80:
                h += 4
            if len(b) - off < h + n:
                return False
            if op == OP_CLOSE:
                return True
            off += h + n

    def send_frame(self, opcode, payload=b"", **kw):
        return self.send_raw(self.frame(opcode, payload, **kw))

    def message_frames(self, msg, compress=None, frag=None, opcode=OP_BINARY, rsv1_on_continuation=None,
                       mask=None):
        """The frames (as bytes) of one message: compressed first when
        compress (default: when permessage-deflate was agreed), then cut
        into fragments: frag is None (one frame), an int (fragment size) or
        a list of cut offsets into the (compressed) payload."""
        if compress is None:
            compress = self.comp is not None and self.comp.usable
        payload = self.comp.compress(msg) if compress else msg
        if frag is None:
            cuts = []
        elif isinstance(frag, int):
            cuts = list(range(frag, len(payload), frag))
        else:
            cuts = sorted(set(c for c in frag if 0 < c < len(payload)))
        parts = [payload[a:b] for a, b in zip([0] + cuts, cuts + [len(payload)])]
        if rsv1_on_continuation is None:
            rsv1_on_continuation = self.rsv1_on_continuation
        out = []
        for i, part in enumerate(parts):
            first, last = i == 0, i == len(parts) - 1
            rsv1 = compress and (first or rsv1_on_continuation)
            out.append(self.frame(opcode if first else OP_CONT, part, fin=last, rsv1=rsv1,
                                  mask=self.mask if mask is None else mask))
        return out

    def send(self, msg, compress=None, frag=None, cuts=None, delay=0.0, rsv1_on_continuation=None):
        """Send one AlwaysOn message (compressed when agreed). cuts: TCP
        write boundaries inside the frames' bytes."""
        data = b"".join(self.message_frames(msg, compress, frag, rsv1_on_continuation=rsv1_on_continuation))
        return self.send_raw(data, cuts=cuts, delay=delay)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    # ------------------------------------------------------------ receiving

    def _fill(self, n, deadline):
        while len(self.buf) < n:
            if self.eof:
                raise Closed(1006, b"", frame=False)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no data from the server within the timeout")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except (socket.timeout, TimeoutError):
                raise TimeoutError("no data from the server within the timeout")
            except (ConnectionResetError, ConnectionAbortedError):
                chunk = b""
            if not chunk:
                self.eof = True
                raise Closed(1006, b"", frame=False)
            self.buf += chunk

    def recv_frame(self, timeout=None):
        """(fin, rsv1, opcode, payload) of one server frame, checked."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._fill(2, deadline)
        b0, b1 = self.buf[0], self.buf[1]
        n = b1 & 0x7F
        h = 2
        if n == 126:
            self._fill(4, deadline)
            n = struct.unpack(">H", self.buf[2:4])[0]
            h = 4
        elif n == 127:
            self._fill(10, deadline)
            n = struct.unpack(">Q", self.buf[2:10])[0]
            h = 10
            raise ServerViolation("server used a 64-bit length (%d bytes): docs/protocol.md §4" % n)
        if b1 & 0x80:
            raise ServerViolation("server frame masked (RFC 6455 §5.1)")
        self._fill(h + n, deadline)
        payload = self.buf[h:h + n]
        self.buf = self.buf[h + n:]
        self.frames_seen += 1
        fin, rsv1, opcode = bool(b0 & 0x80), bool(b0 & 0x40), b0 & 0x0F
        if b0 & 0x30:
            raise ServerViolation("server frame with RSV2/RSV3 (%02x)" % b0)
        if opcode not in DATA_OPS + CONTROL_OPS:
            raise ServerViolation("server frame with reserved opcode %x" % opcode)
        if opcode in CONTROL_OPS:
            if n > 125 or not fin:
                raise ServerViolation("server control frame of %d bytes, fin %s" % (n, fin))
            if rsv1:
                raise ServerViolation("server control frame with RSV1 (RFC 7692 §6.1)")
        elif n > self.max_frame_size:
            raise ServerViolation("server frame of %d bytes over Max-Frame-Size %d (docs/protocol.md §4)"
                                  % (n, self.max_frame_size))
        if rsv1 and (self.pmd is None or opcode == OP_CONT):
            raise ServerViolation("server frame with RSV1 %s (RFC 7692 §6.1)"
                                  % ("on a continuation frame" if self.pmd else "without permessage-deflate"))
        return fin, rsv1, opcode, payload

    def recv_message(self, timeout=None, queued=True):
        """One whole data message (inflated when compressed): (opcode,
        bytes). Pings are answered; pongs are kept in self.pongs. A close
        frame raises Closed (after the device answers it)."""
        if queued and self.queued:
            return self.queued.pop(0)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            fin, rsv1, op, payload = self.recv_frame(max(0.0, deadline - time.monotonic()))
            if op == OP_PING:
                self.pings.append(payload)
                if not self.close_sent:
                    self.send_raw(self.frame(OP_PONG, payload))
                continue
            if op == OP_PONG:
                self.pongs.append(payload)
                continue
            if op == OP_CLOSE:
                self._on_close(payload)
            if op == OP_CONT:
                if self.frag is None:
                    raise ServerViolation("server continuation frame without a start")
                self.frag[2].append(payload)
            else:
                if self.frag is not None:
                    raise ServerViolation("server started a message inside a fragmented one")
                self.frag = (op, rsv1, [payload])
            if not fin:
                continue
            op0, compressed, parts = self.frag
            self.frag = None
            data = b"".join(parts)
            self.wire_sizes.append((compressed, len(data)))
            if compressed and self.check_window:
                win = 1 << (self.pmd["server_max_window_bits"] or 15)
                try:
                    dist = deflate_max_distance(data + TAIL)
                except ValueError as e:
                    raise ServerViolation("compressed message is not valid DEFLATE: %s" % e)
                if dist > win:
                    raise ServerViolation("compressed message uses a distance of %d, over the agreed window %d"
                                          % (dist, win))
            if compressed:
                data = self.decomp.decompress(data)
            return op0, data

    def _on_close(self, payload):
        self.close_frame_seen = True
        if len(payload) == 1:
            raise ServerViolation("server close frame with a 1-byte payload")
        code = struct.unpack(">H", payload[:2])[0] if payload else None
        reason = payload[2:]
        if code is not None and not valid_close_code(code):
            raise ServerViolation("server close code %d is not valid to send" % code)
        try:
            reason.decode("utf-8")
        except UnicodeDecodeError:
            raise ServerViolation("server close reason not UTF-8")
        self.close_code, self.close_reason = code, reason
        if not self.close_sent:  # RFC 6455 §5.5.1: answer with a close frame
            self.close_sent = True
            try:
                self.sock.sendall(self.frame(OP_CLOSE, payload[:2]))
            except OSError:
                pass
        raise Closed(code, reason)

    def poll(self, pred, timeout):
        """Read (pongs, pings, data messages kept for later) until pred()
        is true; False when timeout passes first."""
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                msg = self.recv_message(min(left, 0.2), queued=False)
                self.queued.append(msg)
            except TimeoutError:
                pass
        return True

    def recv(self, timeout=None):
        """One binary message's bytes."""
        op, data = self.recv_message(timeout)
        if op != OP_BINARY:
            raise ServerViolation("server sent a %s message" % ("text" if op == OP_TEXT else op))
        return data

    def expect_close(self, timeout=5.0):
        """Read until the server's close frame; returns its code (None for
        an empty close payload). Raises AssertionError when the connection
        ends without a close frame or nothing comes in time. Data messages
        before it are kept in self.before_close."""
        self.before_close = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.before_close.append(self.recv_message(max(0.0, deadline - time.monotonic())))
        except Closed as c:
            if not c.frame:
                raise AssertionError("the connection ended without a close frame (1006)")
            return c.code
        except TimeoutError:
            raise AssertionError("no close frame within %.1fs" % timeout)

    def closed_after(self, timeout=3.0):
        """After a close handshake: True when the server ends the TCP
        connection within timeout."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.recv_frame(max(0.0, deadline - time.monotonic()))
        except Closed:
            return True
        except TimeoutError:
            return False

    # ------------------------------------------------------------ AlwaysOn

    def rid(self):
        r = self.next_rid
        self.next_rid += 1
        return r

    def auth(self, key, compress=None, timeout=5.0):
        """AUTH; returns (code, sessionId) and keeps the session."""
        rid = self.rid()
        self.send(ao_auth(rid, key), compress=compress)
        code, arid, _, sid, _ = ao_parse(self.recv(timeout))
        if arid != rid:
            raise AssertionError("AUTH answer for requestId %d, sent %d" % (arid, rid))
        if code == SUCCESS:
            self.session = sid
        return code, sid

    def answer(self, rid, timeout=5.0):
        """The whole answer (chunks joined by requestId, chunk order
        checked) to requestId rid: (code, [chunks]). Answers to other
        requests that arrive first are kept for later calls."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.answers_out_of_order.get(rid)
            if got and got[1]:
                del self.answers_out_of_order[rid]
                return got[0], got[2]
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            code, arid, _, _, _ = ao_parse(msg)
            cid, count = ao_chunk_ids(msg)
            entry = self.answers_out_of_order.setdefault(arid, [code, False, []])
            if cid != len(entry[2]) + 1:
                raise AssertionError("answer %d: chunk %d after %d chunks" % (arid, cid, len(entry[2])))
            entry[2].append(msg)
            if cid == count:
                entry[1] = True

    def get(self, timeout=5.0, compress=None):
        rid = self.rid()
        self.send(ao_request(GET, rid, self.session), compress=compress)
        return self.answer(rid, timeout)[0]


# ---------------------------------------------------------------- AlwaysOn payloads

def ao_post(rid, session, data, code=POST, thing="SteamSensor", name="Echo"):
    """A request whose params are a BLOB InfoTable holding data
    (platform-sim echoes the params in its answer)."""
    return (ao_header(code, rid, 0, session) + b"\x0A" + ao_str(thing) + b"\x01" + ao_str(name) +
            b"\x00" + b"\x05" + ao_infotable_blob("data", data))


def echoed_blob(chunks):
    """The BLOB bytes of an echo answer (its chunks in order): the answer
    body is reasonMarker 0, content 0x05 and the InfoTable the request
    carried. Returns the InfoTable bytes (everything after 0x05)."""
    body = b""
    for i, c in enumerate(chunks):
        cid, count = ao_chunk_ids(c)
        if c[14] == 1:
            # multipart: header(15) + multipart(6) + entityType(1) + entityName(str)
            off = 21 + 1
            n = c[off]
            off += 1 + n if n < 128 else 4 + (struct.unpack(">I", c[off:off + 4])[0] & 0x7FFFFFFF)
            body += c[off:]
        else:
            body += c[15:]
    if body[:2] != b"\x00\x05":
        raise AssertionError("answer body does not start 00 05: %r" % body[:20])
    return body[2:]


def bomb_stream(prefix, inflated, wbits=15):
    """A raw DEFLATE stream (tail stripped) that inflates to prefix followed
    by zeros up to `inflated` bytes in all (rounded up to whole MiB), built
    from one Z_FULL_FLUSH segment per MiB: each segment is the same bytes,
    so a 1 GiB bomb costs one MiB of compression."""
    c = zlib.compressobj(9, zlib.DEFLATED, -wbits)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    mib = bytes(1 << 20)
    seg = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    seg2 = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    if seg != seg2:
        raise AssertionError("bomb segments differ")
    n = max(1, (inflated - len(prefix) + (1 << 20) - 1) >> 20)
    check = zlib.decompressobj(-wbits)
    if check.decompress(head + seg + TAIL) != prefix + mib:
        raise AssertionError("bomb segment does not inflate to one MiB of zeros")
    stream = head + seg * n
    return stream[:-4] if stream.endswith(TAIL) else stream


# ---------------------------------------------------------------- processes

def sanitized_binary(path=None):
    """True when edgemux is built with AddressSanitizer or ThreadSanitizer
    (scripts/test.sh's sanitizer tiers): its CPU and memory figures are then
    inflated by the sanitizer (shadow memory, quarantine, instrumentation)."""
    from harness import EMX_BIN
    import shutil
    p = path or (EMX_BIN if os.path.isabs(EMX_BIN) else shutil.which(EMX_BIN))
    try:
        with open(p, "rb") as f:
            data = f.read()
            return b"AddressSanitizer" in data or b"ThreadSanitizer" in data
    except (OSError, TypeError):
        return False


def proc_cpu_seconds(pid):
    """utime + stime of a process (all threads) from /proc/PID/stat."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # fields 14, 15 of stat(5)


def proc_status_kib(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError("%s not in /proc/%d/status" % (key, pid))


# ---------------------------------------------------------------- test base

class EdgeSuite(E2ETest):
    """One platform-sim and one edgemux shared by every test of a class
    (started again when a test left edgemux dead), plus a canary device
    with permessage-deflate that must keep getting answers after each
    hostile case. Subclasses set EDGE, TRANSPORT, PLATFORM (config
    overrides). EMX_RFC_LOG=debug sets edgemux's log level."""

    EDGE = {}
    TRANSPORT = {"handshake_timeout": "2s"}
    # The platform hop's back-pressure (a pipe over high_watermark, or one
    # whose plugin queue is over pipe_max_queued, takes no new request:
    # 0xA0) is not what these suites test; large watermarks, with the
    # plugin's cap above them, keep bursts of large messages from it.
    PLATFORM = {"high_watermark": "16MiB", "low_watermark": "8MiB"}
    PIPE_TRANSPORT = {"pipe_max_queued": "64MiB"}
    INSTANCES = 1

    @classmethod
    def setUpClass(cls):
        cls.shared = None

    @classmethod
    def tearDownClass(cls):
        if cls.shared is not None:
            env, _, _ = cls.shared
            env.cleanup(keep=getattr(cls, "keep_logs", False))
            if getattr(cls, "keep_logs", False):
                print("logs kept in", env.dir)
            cls.shared = None

    def setUp(self):
        from harness import Env
        cls = type(self)
        if cls.shared is not None and not cls.shared[2].proc.alive():
            env, _, emx = cls.shared
            print("\n--- edgemux died before %s; its log ends:\n%s" %
                  (self.id(), "\n".join(emx.log().splitlines()[-30:])))
            cls.keep_logs = True
            env.cleanup(keep=True)
            print("logs kept in", env.dir)
            cls.shared = None
        if cls.shared is None:
            env = Env()
            plat = Platform(env, self.INSTANCES)
            overrides = {"edge": dict(self.EDGE), "transport": dict(self.PIPE_TRANSPORT, **self.TRANSPORT),
                         "platform": dict(self.PLATFORM),
                         "log": {"level": os.environ.get("EMX_RFC_LOG", "info")}}
            emx = Edgemux(env, "emx-rfc", plat.ports, overrides=overrides)
            emx.wait_ready()
            cls.shared = (env, plat, emx)
        self.env, self.plat, self.emx = cls.shared
        self.port = self.emx.edge_port
        self.canary = None
        self.devices = []
        self.failures_at_start = self._failures()

    def _failures(self):
        result = getattr(getattr(self, "_outcome", None), "result", None)
        if result is None:
            return 0
        return len(result.failures) + len(result.errors) + len(getattr(result, "unexpectedSuccesses", []))

    def tearDown(self):
        failed = self._failures() > self.failures_at_start
        if failed:
            type(self).keep_logs = True
            print("\n--- edgemux log (last 25 lines) after %s\n%s" %
                  (self.id(), "\n".join(self.emx.log().splitlines()[-25:])))
        if self.canary is not None:
            self.canary.close()
        for d in self.devices:
            d.close()

    # devices

    def device(self, **kw):
        kw.setdefault("app_key", self.env.app_key)
        d = Device(self.port, **kw)
        self.devices.append(d)
        return d

    def authed(self, deflate=True, **kw):
        d = self.device(deflate=deflate, **kw)
        code, _ = d.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS, "AUTH answered 0x%02x" % code)
        return d

    def start_canary(self):
        self.canary = self.authed(deflate=True)
        self.assertEqual(self.canary.get(), SUCCESS)

    def check_canary(self, what=""):
        """edgemux is alive and the canary (a connection opened before the
        hostile case) still gets its answers."""
        self.assertTrue(self.emx.proc.alive(), "edgemux died %s:\n%s" %
                        (what, "\n".join(self.emx.log().splitlines()[-30:])))
        if self.canary is None:
            self.start_canary()
            return
        try:
            code = self.canary.get(timeout=5.0)
        except (Closed, TimeoutError, ConnectionError, OSError) as e:
            raise AssertionError("the canary device failed %s: %r" % (what, e))
        self.assertEqual(code, SUCCESS, "canary answer %s" % what)

    def cpu(self):
        return proc_cpu_seconds(self.emx.proc.pid)

    def rss_kib(self):
        return proc_status_kib(self.emx.proc.pid, "VmRSS")

    def hwm_kib(self):
        return proc_status_kib(self.emx.proc.pid, "VmHWM")
