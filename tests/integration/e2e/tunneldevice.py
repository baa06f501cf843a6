"""A device's side of Remote Access tunnels, written from TUNNELS.md (the C
SDK 2.2.1's behaviour) and RFC 6455 with the standard library only: the
AlwaysOn part (AUTH, BIND, StartTunnel answered SUCCESS) on harness.RawEdge,
and the tunnel WebSocket the SDK opens: same host and port, path
/Thingworx/WSTunnelServer/<tid as received>, appKey and Max-Frame-Size
headers, zero-key masked text frames of base64, one message per chunk.

It checks what the SDK would not survive: bytes arriving in the read that
holds the 101 (the SDK drops them; counted in `glued`), frames above its
Max-Frame-Size or with a 64-bit length, binary messages, messages that do
not decode to at most chunksize bytes."""

import base64
import os
import socket
import struct
import threading
import time

from harness import BIND, POST, SUCCESS, ao_bind, ao_header, ao_parse, ao_response, ao_str

TUNNEL_PATH = "/Thingworx/WSTunnelServer/"
CLIENT_PATH = "/Thingworx/WSTunnelClient/"


def read_str(buf, at):
    """An AlwaysOn string at `at`: (bytes, next offset)."""
    n = buf[at]
    if n < 0x80:
        return buf[at + 1:at + 1 + n], at + 1 + n
    n = struct.unpack(">I", buf[at:at + 4])[0] & 0x7FFFFFFF
    return buf[at + 4:at + 4 + n], at + 4 + n


def tunnel_service(msg):
    """(service name, tid, chunksize) of a tunnel service request, or None.
    Reads the request prefix and the first row's values as TUNNELS.md §3.1
    lays them out (fields tid, type, chunksize, ... in that order)."""
    if len(msg) < 17 or msg[14] != 0:
        return None
    at = 15
    _, at = 1, at + 1  # entity type
    _, at = read_str(msg, at)  # entity name
    if msg[at] != 0x02:
        return None
    name, at = read_str(msg, at + 1)
    name = name.decode(errors="replace")
    if not name.startswith(("StartTunnel", "CompleteTunnel", "TunnelCommand")):
        return None
    # no headers (0), the params marker (5), the shape: one 01-led entry
    # per field (name, description, base type, aspect count), then 00;
    # then rows: 01, a value count, typed values
    if msg[at] != 0 or msg[at + 1] != 0x05:
        return None
    at += 2
    fields = []
    while msg[at] == 0x01:
        fname, at = read_str(msg, at + 1)
        _, at = read_str(msg, at)  # description
        btype = msg[at]
        at += 3  # base type, aspect count (none here)
        fields.append((fname.decode(), btype))
    at += 1  # end of shape
    if msg[at] != 0x01:
        return name, None, 8192
    at += 3  # row marker, value count
    values = {}
    for fname, btype in fields:
        vt = msg[at]
        at += 1
        if vt == 0:
            v, at = read_str(msg, at)
            values[fname] = v.decode(errors="replace")
        elif vt == 0x16:
            values[fname] = struct.unpack(">i", msg[at:at + 4])[0]
            at += 4
        else:
            return name, values.get("tid"), values.get("chunksize", 8192)
    return name, values.get("tid"), values.get("chunksize", 8192)


class TunnelSocket:
    """The tunnel WebSocket as the SDK opens and uses it."""

    def __init__(self, port, tid, app_key, chunksize=8192, host="127.0.0.1", timeout=10,
                 path=TUNNEL_PATH, cookie=None, source_address=None):
        """With path=CLIENT_PATH and a cookie: a remote access client's
        socket (WSTunnelClient) instead of the device's. source_address:
        (ip, 0) to dial from another loopback address."""
        self.chunksize = chunksize
        self.max_frame = chunksize * 4 // 3
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=source_address)
        key = base64.b64encode(os.urandom(16)).decode()
        req = ("GET %s%s HTTP/1.1\r\nUser-Agent: ThingWorx C SDK\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nHost: %s\r\nSec-WebSocket-Version: 13\r\n"
               "Sec-WebSocket-Key: %s\r\nMax-Frame-Size: %d\r\n"
               % (path, tid, host, key, self.max_frame))
        if app_key:
            req += "appKey: %s\r\n" % app_key
        if cookie:
            req += "Cookie: %s\r\n" % cookie
        req += "\r\n"
        self.sock.sendall(req.encode())
        # The SDK reads the response once and drops whatever came with it.
        first = self.sock.recv(65536)
        while b"\r\n\r\n" not in first:
            more = self.sock.recv(65536)
            if not more:
                break
            first += more
        head, _, rest = first.partition(b"\r\n\r\n")
        self.head = head.decode(errors="replace")
        self.glued = len(rest)
        self.status = int(self.head.split(" ", 2)[1]) if self.head.startswith("HTTP/1.1 ") else 0
        self.buf = b""
        self.frames_in = 0
        self.max_frame_in = 0
        self.binary_in = 0
        self.violations = []
        self.close_code = None
        self.close_reason = None
        self.lock = threading.Lock()
        if self.status == 101:
            lines = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip()
                     for l in self.head.split("\r\n")[1:] if ":" in l}
            if lines.get("upgrade", "").lower() != "websocket":
                self.violations.append("Upgrade header %r" % lines.get("upgrade"))
            if lines.get("connection", "").lower() != "upgrade":
                self.violations.append("Connection header %r" % lines.get("connection"))
            if "sec-websocket-extensions" in lines:
                self.violations.append("an extension on a tunnel")

    def send_frame(self, op, payload):
        n = len(payload)
        if n < 126:
            hdr = struct.pack(">BB", 0x80 | op, 0x80 | n)
        else:
            hdr = struct.pack(">BBH", 0x80 | op, 0x80 | 126, n)
        with self.lock:
            self.sock.sendall(hdr + b"\x00\x00\x00\x00" + payload)  # zero-key mask, as the SDK

    def send_data(self, raw):
        """Raw bytes as the SDK sends local reads: ≤ chunksize-16 per message."""
        step = self.chunksize - 16
        for i in range(0, len(raw), step):
            self.send_frame(0x1, base64.b64encode(raw[i:i + step]))

    def close(self, code=1000, reason="Normal Close Tunnel stopped by edge"):
        try:
            self.send_frame(0x8, struct.pack(">H", code) + reason.encode())
        except OSError:
            pass

    def drop(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _read(self, n, deadline):
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("tunnel read timed out")
            self.sock.settimeout(left)
            d = self.sock.recv(65536)
            if not d:
                raise EOFError("tunnel socket closed")
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_message(self, timeout=10):
        """('text', raw bytes decoded), ('close', (code, reason)); pings are
        read and not answered, binary messages dropped (as the SDK)."""
        deadline = time.monotonic() + timeout
        parts, op0 = [], None
        while True:
            b0, b1 = self._read(2, deadline)
            op, fin, n = b0 & 0x0F, b0 & 0x80, b1 & 0x7F
            if b1 & 0x80:
                self.violations.append("masked server frame")
            if n == 126:
                n = struct.unpack(">H", self._read(2, deadline))[0]
            elif n == 127:
                self.violations.append("64-bit frame length")
                n = struct.unpack(">Q", self._read(8, deadline))[0]
            payload = self._read(n, deadline)
            self.frames_in += 1
            if op < 8:
                self.max_frame_in = max(self.max_frame_in, n)
                if n > self.max_frame:
                    self.violations.append("frame of %d bytes above Max-Frame-Size %d" % (n, self.max_frame))
            if op == 0x8:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.close_code, self.close_reason = code, payload[2:].decode(errors="replace")
                return "close", (code, self.close_reason)
            if op in (0x9, 0xA):
                continue
            if op != 0:
                op0 = op
            parts.append(payload)
            if not fin:
                continue
            data = b"".join(parts)
            parts = []
            if op0 == 0x2:
                self.binary_in += 1
                continue
            raw = base64.b64decode(data, validate=True)
            if len(raw) > self.chunksize:
                self.violations.append("message decodes to %d bytes > chunksize" % len(raw))
            return "text", raw

    def echo_forever(self, stop):
        """Echo every decoded message back, as a device whose local target
        is an echo server would. Ends at close, EOF or `stop`."""
        while not stop.is_set():
            try:
                kind, data = self.recv_message(timeout=0.5)
            except socket.timeout:
                continue
            except (EOFError, OSError):
                return
            if kind == "close":
                return
            try:
                self.send_data(data)
            except OSError:
                return


class TunnelDevice:
    """An AlwaysOn device (RawEdge) that binds a Thing and answers every
    StartTunnel SUCCESS, remembering the tids it was given."""

    def __init__(self, edge, app_key, thing):
        self.edge = edge
        self.app_key = app_key
        self.thing = thing
        code, self.sid = edge.auth(app_key)
        if code != SUCCESS:
            raise AssertionError("AUTH answered %#x" % code)
        edge.send(ao_bind(2, self.sid, [thing]))
        code, _, _, _, _ = ao_parse(edge.recv(timeout=5))
        if code != SUCCESS:
            raise AssertionError("BIND answered %#x" % code)
        self.next_rid = 10

    def take_start(self, timeout=10):
        """Wait for a StartTunnel, answer it SUCCESS; returns (tid, chunksize)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.edge.recv(timeout=max(0.1, deadline - time.monotonic()))
            code, rid, eid, sid, _ = ao_parse(msg)
            svc = tunnel_service(msg)
            if code in (POST, 0x01, 0x02, 0x04):
                self.edge.send(ao_response(SUCCESS, rid, eid, sid))
            if svc and svc[0] == "StartTunnel":
                return svc[1], svc[2]

    def command_from_edge(self, tid, command="CANCEL"):
        """TunnelCommandFromEdge as the SDK sends it (TUNNELS.md §5)."""
        self.next_rid += 1
        fields = b""
        for name in ("tid", "command"):
            fields += b"\x01" + ao_str(name) + ao_str("") + b"\x00" + b"\x00\x00"
        row = b"\x01" + struct.pack(">H", 2) + b"\x00" + ao_str(tid) + b"\x00" + ao_str(command)
        body = (b"\x0a" + ao_str(self.thing) + b"\x02" + ao_str("TunnelCommandFromEdge") +
                b"\x00\x05" + fields + b"\x00" + row + b"\x00")
        self.edge.send(ao_header(POST, self.next_rid, 0, self.sid) + body)
        return self.next_rid
