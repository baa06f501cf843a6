"""End-to-end harness: starts the real edgemux binary, platform-sim, HAProxy
and edge-sim on loopback with free ports, and gives tests a raw WebSocket edge
for the cases no well-behaved client can produce. Python 3 standard library
only. Every wait is bounded; every process started is stopped by its PID.

Binaries come from the environment ctest sets (see CMakeLists.txt):
EMX_BIN, EMX_PLUGIN_DIR, EMX_PLATFORM_SIM, EMX_EDGE_SIM, EMX_SOURCE_DIR.
"""

import base64
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import time
import unittest
import urllib.request

EMX_BIN = os.environ.get("EMX_BIN", "edgemux")
PLUGIN_DIR = os.environ.get("EMX_PLUGIN_DIR", "")
PLATFORM_SIM = os.environ.get("EMX_PLATFORM_SIM", "platform-sim")
EDGE_SIM = os.environ.get("EMX_EDGE_SIM", "edge-sim")
SOURCE_DIR = os.environ.get("EMX_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", "..", ".."))
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def _sanitized():
    p = EMX_BIN if os.path.isabs(EMX_BIN) else shutil.which(EMX_BIN)
    try:
        with open(p, "rb") as f:
            data = f.read()
            return b"AddressSanitizer" in data or b"ThreadSanitizer" in data
    except (OSError, TypeError):
        return False


# A sanitizer build (scripts/test.sh's second tier) inflates CPU, latency and
# memory figures (instrumentation, shadow memory, the free quarantine):
# bounds on those are multiplied by SLACK there, never in the plain build.
SANITIZED = _sanitized()
SLACK = 4 if SANITIZED else 1

# Worker loops per edgemux (EMX_E2E_WORKERS runs every edgemux of a test with
# that many; scripts/test.sh's ThreadSanitizer tier uses 4). Each worker opens
# its own pipes_per_instance pipes to every instance, so a platform counts
# WORKERS times the pipes of a single-loop edgemux.
WORKERS = int(os.environ.get("EMX_E2E_WORKERS") or 1)


# The top 4 bits of an endpointId name the worker that holds the edge
# (docs/protocol.md §3); a pipe's identity is `<name>/<worker>` (§6.1).
WORKER_SHIFT = 28


def worker_of(endpoint_id):
    """The worker an endpointId belongs to."""
    return (endpoint_id >> WORKER_SHIFT) & 0xF


def worker_of_identity(identity):
    """The worker an X-Edgemux-Server identity (str or bytes) names:
    `<name>/<k>` with several workers, the bare name (worker 0) with one."""
    if isinstance(identity, bytes):
        identity = identity.decode(errors="replace")
    name, sep, k = identity.rpartition("/")
    return int(k) if sep and name and k.isdigit() else 0


def pipes(per_instance=2):
    """Pipes one edgemux of this run opens to each instance with
    platform.pipes_per_instance = per_instance (the harness default: 2)."""
    return per_instance * WORKERS

# AlwaysOn codes
GET, PUT, POST, DELETE, BIND, UNBIND, AUTH, KEEP_ALIVE = 0x01, 0x02, 0x03, 0x04, 0x0A, 0x0B, 0x14, 0x1F
SUCCESS, BAD_REQUEST, UNAUTHORIZED, NOT_FOUND = 0x40, 0x80, 0x81, 0x84
ENTITY_TOO_LARGE, INTERNAL_ERROR, SERVICE_UNAVAILABLE, GATEWAY_TIMEOUT = 0x8D, 0xA0, 0xA3, 0xA4


def _ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


_PORTS_GIVEN = set()  # never hand out one port twice in a test process

# Ports no test server listens on: instances that must refuse connects at
# once (closed_ports), and source ports a test binds for its clients.
# free_port never hands one out, so no test's server (an edgemux, HAProxy, a
# fixture) is ever among them.
CLOSED_LO, CLOSED_HI = 20000, 24000


def closed_ports(n, avoid=()):
    """n ports on loopback nobody listens on, from the reserved range."""
    out = [p for p in range(CLOSED_LO + 1, CLOSED_HI) if p not in avoid][:n]
    if len(out) < n:
        raise ValueError("only %d closed ports reserved" % len(out))
    return out


def free_port():
    """A free TCP port on 127.0.0.1, below the kernel's ephemeral range when
    there is room: a port from that range can be taken as the local port of
    any outgoing connection (edge-sim's devices, pipes, a parallel test)
    between this check and the server's bind, which then fails with
    EADDRINUSE. A port is given once per process: two picks not yet bound
    (an edgemux's edge and admin ports) could otherwise be the same. Never
    one of closed_ports()'s: a test's instance list of ports nobody listens
    on must not reach another test's server."""
    lo, _ = _ephemeral_range()
    if lo - 1 - 10000 >= 1000:
        rnd = random.SystemRandom()
        for _ in range(64):
            port = rnd.randint(10000, lo - 1)
            if port in _PORTS_GIVEN or CLOSED_LO <= port < CLOSED_HI:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _PORTS_GIVEN.add(port)
            return port
    for _ in range(64):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port
    raise OSError("no free port")


def wait_until(pred, timeout, interval=0.05, what="condition"):
    """Poll pred() until it returns a true value or timeout seconds pass."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError("timed out after %.1fs waiting for %s (last: %r)" % (timeout, what, last))


# ---------------------------------------------------------------- AlwaysOn

def ao_str(s):
    b = s.encode() if isinstance(s, str) else s
    if len(b) < 128:
        return bytes([len(b)]) + b
    return struct.pack(">I", len(b) | 0x80000000) + b


def ao_header(code, request_id, endpoint_id=0, session_id=0, multipart=None):
    h = struct.pack(">BBIIIB", 1, code, request_id, endpoint_id, session_id, 1 if multipart else 0)
    if multipart:
        h += struct.pack(">HHH", *multipart)
    return h


def ao_auth(request_id, key):
    return ao_header(AUTH, request_id, 0, 0xFFFFFFFF) + b"\x01" + ao_str("appKey") + ao_str(key)


def ao_bind(request_id, session_id, names, code=BIND):
    body = b"\x00" + struct.pack(">H", len(names)) + b"".join(ao_str(n) for n in names)
    return ao_header(code, request_id, 0, session_id) + body


def ao_request(code, request_id, session_id, thing="SteamSensor", name="Temperature"):
    return ao_header(code, request_id, 0, session_id) + b"\x0A" + ao_str(thing) + b"\x01" + ao_str(name) + b"\x00\xFF"


def ao_parse(msg):
    """(code, requestId, endpointId, sessionId, multipart) of a message."""
    if len(msg) < 15:
        raise ValueError("short AlwaysOn message: %d bytes" % len(msg))
    _, code, rid, eid, sid, mp = struct.unpack(">BBIIIB", msg[:15])
    return code, rid, eid, sid, mp


def ao_chunk_ids(msg):
    """(chunkId, chunkCount) of a multipart message, (1, 1) of a whole one."""
    if len(msg) >= 21 and msg[14] == 1:
        return struct.unpack(">HH", msg[15:19])
    return 1, 1


def ao_infotable_blob(field, data):
    """An InfoTable with one BLOB field and one row holding data (as
    platform-sim and edge-sim build them)."""
    shape = b"\x01" + ao_str(field) + ao_str("") + bytes([21]) + b"\x00\x00" + b"\x00"
    rows = b"\x01" + struct.pack(">H", 1) + bytes([21]) + struct.pack(">I", len(data)) + data + b"\x00"
    return shape + rows


def ao_response(code, request_id, endpoint_id, session_id, reason=None):
    """An answer without content (reason optional), as an edge sends one."""
    body = (b"\x01" + ao_str(reason) if reason is not None else b"\x00") + b"\xFF"
    return ao_header(code, request_id, endpoint_id, session_id) + body


def ao_multipart_request(code, request_id, session_id, payload_size, thing="SteamSensor",
                         name="Upload", chunk_size=8192, fill=b"m"):
    """The chunks of one request whose params are a BLOB InfoTable of
    payload_size bytes, split like the SDK: every chunk no larger than
    chunk_size, each repeating the header and entityType . entityName."""
    prefix = b"\x0A" + ao_str(thing)
    rest = b"\x01" + ao_str(name) + b"\x00" + b"\x05" + ao_infotable_blob("data", fill * payload_size)
    per = chunk_size - 15 - 6 - len(prefix)
    count = max(1, (len(rest) + per - 1) // per)
    chunks = []
    for i in range(count):
        h = ao_header(code, request_id, 0, session_id, multipart=(i + 1, count, chunk_size))
        chunks.append(h + prefix + rest[i * per:(i + 1) * per])
    return chunks


# ---------------------------------------------------------------- raw edge

class Closed(Exception):
    def __init__(self, code, reason=""):
        super().__init__("closed %s %s" % (code, reason))
        self.code = code
        self.reason = reason


class RawEdge:
    """A WebSocket client on a plain socket, framing by hand: zero-key masks
    like the SDK, and full control for bad-input tests. recv_frame returns
    every frame as received so tests can check sizes."""

    def __init__(self, port, host="127.0.0.1", path="/Thingworx/WS", app_key=None,
                 max_frame_size=None, extra_headers=(), tls_ctx=None, server_hostname=None,
                 timeout=5.0, expect_status=101, source_address=None):
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=source_address)
        if tls_ctx is not None:
            self.sock = tls_ctx.wrap_socket(self.sock, server_hostname=server_hostname or host)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = ["GET %s HTTP/1.1" % path, "Host: %s:%d" % (host, port), "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Key: " + key, "Sec-WebSocket-Version: 13",
                 "User-Agent: ThingWorx C SDK"]
        if app_key:
            lines.append("appKey: " + app_key)
        if max_frame_size:
            lines.append("Max-Frame-Size: %d" % max_frame_size)
        lines.extend(extra_headers)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed during upgrade")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.status = int(head.split(b" ", 2)[1])
        self.response_head = head.decode(errors="replace")
        if expect_status is not None and self.status != expect_status:
            raise AssertionError("upgrade answered %d, wanted %d:\n%s" % (self.status, expect_status, self.response_head))
        self.frames = []  # (opcode, fin, length) of every frame received
        self.close_code = None

    def send_frame(self, opcode, payload, fin=True, rsv=0, mask=True):
        b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
        n = len(payload)
        m = 0x80 if mask else 0
        if n < 126:
            hdr = struct.pack(">BB", b0, m | n)
        elif n < 65536:
            hdr = struct.pack(">BBH", b0, m | 126, n)
        else:
            hdr = struct.pack(">BBQ", b0, m | 127, n)
        if mask:
            hdr += b"\x00\x00\x00\x00"  # the SDK's all-zero key: payload unchanged
        self.sock.sendall(hdr + payload)

    def send(self, msg):
        self.send_frame(0x2, msg)

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed(self.close_code or 1006, "connection dropped")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_frame(self):
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self._read(8))[0]
        if b1 & 0x80:
            self._read(4)
        payload = self._read(n)
        opcode = b0 & 0x0F
        self.frames.append((opcode, bool(b0 & 0x80), n, (b0 >> 4) & 7, b1 & 0x7F))
        return opcode, bool(b0 & 0x80), payload

    def recv(self, timeout=5.0):
        """One whole binary message; answers nothing (like the SDK, it never
        pongs). Raises Closed on a close frame."""
        self.sock.settimeout(timeout)
        parts = []
        while True:
            opcode, fin, payload = self.recv_frame()
            if opcode == 0x8:
                self.close_code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                raise Closed(self.close_code, payload[2:].decode(errors="replace"))
            if opcode in (0x9, 0xA):
                continue
            parts.append(payload)
            if fin:
                return b"".join(parts)

    def expect_close(self, timeout=5.0):
        """Read until the server closes; returns its close code."""
        try:
            while True:
                self.recv(timeout)
        except Closed as c:
            return c.code
        except (socket.timeout, TimeoutError):
            raise AssertionError("no close within %.1fs" % timeout)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    # AlwaysOn conveniences
    def auth(self, key, request_id=1):
        self.send(ao_auth(request_id, key))
        ans = self.recv()
        code, rid, eid, sid, _ = ao_parse(ans)
        return code, sid

    def answers(self, until, timeout=5.0, into=None):
        """Read messages into a dict {requestId: [codes of answers]} (whole
        answers: a multipart answer counts once, at its last chunk) until
        until(dict) is true; returns the dict. Requests from the platform
        are collected in self.platform_requests."""
        got = {} if into is None else into
        deadline = time.monotonic() + timeout
        while not until(got):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("answers: timed out after %.1fs (got %r)" % (timeout, got))
            # Poll in short steps so until() may turn true without a message
            # (it may look at other processes); a message once started is
            # read whole.
            if not self.readable(min(left, 0.1)):
                continue
            msg = self.recv(timeout=5.0)
            code, rid, _, _, _ = ao_parse(msg)
            if code < 0x40:
                if not hasattr(self, "platform_requests"):
                    self.platform_requests = []
                self.platform_requests.append(msg)
                continue
            cid, ccount = ao_chunk_ids(msg)
            if cid == ccount:
                got.setdefault(rid, []).append(code)
        return got

    def answers_for(self, seconds, into=None):
        """Like answers(), reading for `seconds` whatever arrives."""
        got = {} if into is None else into
        end = time.monotonic() + seconds
        try:
            self.answers(lambda g: time.monotonic() >= end, timeout=seconds + 5, into=got)
        except AssertionError:
            pass
        return got

    def readable(self, timeout):
        """True when a message (or part of one) is ready to be read."""
        if self.buf or (hasattr(self.sock, "pending") and self.sock.pending()):
            return True
        r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        return bool(r)

    def quiet_for(self, seconds):
        """Returns every message received within `seconds` (expects none
        in most uses)."""
        out = []
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return out
            if self.readable(left):
                out.append(self.recv(timeout=5.0))


# ---------------------------------------------------------------- processes

class Proc:
    def __init__(self, args, log_path, env=None, cwd=None):
        self.args = args
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd)

    @property
    def pid(self):
        return self.p.pid

    def alive(self):
        return self.p.poll() is None

    def signal(self, sig):
        if self.alive():
            self.p.send_signal(sig)

    def stop(self, timeout=10.0):
        """SIGTERM, wait, SIGKILL: returns the exit status."""
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.log.close()
        return self.p.returncode

    def kill(self):
        if self.alive():
            self.p.kill()
            self.p.wait(5)
        self.log.close()

    def output(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")


class Platform:
    """One platform-sim process serving `instances` instances (one cluster
    table shared by all of them)."""

    def __init__(self, env, instances=3, extra=()):
        self.env = env
        args = [PLATFORM_SIM, "--instances", str(instances), "--port", "0", "--control", "0",
                "--app-key-file", env.app_key_file, "--bind", "127.0.0.1", "--quiet"] + list(extra)
        self.proc = Proc(args, env.path("platform-sim-%d.log" % len(env.procs)))
        env.procs.append(self.proc)

        def ready():
            m = re.search(r"platform-sim ready control=(\d+) ports=([\d,]+)", self.proc.output())
            if not self.proc.alive():
                raise AssertionError("platform-sim exited:\n" + self.proc.output())
            return m

        m = wait_until(ready, 10, what="platform-sim ready")
        self.control = int(m.group(1))
        self.ports = [int(p) for p in m.group(2).split(",")]

    def cmd(self, line, timeout=20.0):
        with socket.create_connection(("127.0.0.1", self.control), timeout=timeout) as s:
            s.sendall(line.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        return data.decode().strip()

    def stats(self):
        return json.loads(self.cmd("stats"))

    def binds(self):
        return json.loads(self.cmd("binds"))

    def msgs_in(self):
        """Messages received per instance (index 0 = instance 1)."""
        return [i["msgs_in"] for i in self.stats()["instances"]]

    def pipes_connected(self):
        return [i["pipes_connected"] for i in self.stats()["instances"]]

    def kill(self):
        """SIGKILL the platform-sim process (every instance it serves)."""
        self.proc.kill()

    def msgs_in_by_server(self):
        """Messages received on pipes, per X-Edgemux-Server name (open
        pipes only)."""
        out = {}
        for inst in self.stats()["instances"]:
            for p in inst["pipes"]:
                out[p["server"]] = out.get(p["server"], 0) + p["msgs_in"]
        return out


class Edgemux:
    """One edgemux process with static discovery over `instances` [(port, ...)]."""

    def __init__(self, env, name, instance_ports, overrides=None, discovery=None, start=True,
                 edge_port=None, extra_yaml="", wrapper=None, start_timeout=10, admin_token=False):
        """admin_token: write a token file (admin.token_file) so the admin
        POST actions are on; http() sends the token with them."""
        self.env = env
        self.wrapper = list(wrapper or [])  # e.g. a valgrind command line
        self.start_timeout = start_timeout
        self.name = name
        self.edge_port = edge_port or free_port()
        self.admin_port = free_port()
        self.instances_file = env.path("%s-instances.yaml" % name)
        self.write_instances(instance_ports)
        cfg = {
            "server": {"name": name},
            "log": {"level": "debug"},
            "plugins": {"dir": PLUGIN_DIR},
            "edge": {"address": "127.0.0.1", "port": self.edge_port},
            "platform": {"app_key_file": env.app_key_file, "pipes_per_instance": 2,
                         "reconnect_min": "100ms", "reconnect_max": "1s"},
            "discovery": discovery or {"plugin": "static", "file": self.instances_file,
                                       "reload_delay": "50ms"},
            "transport": {"plugin": "ws"},
            "admin": {"listen": "127.0.0.1:%d" % self.admin_port},
        }
        self.admin_token = None
        if admin_token:
            self.admin_token = "adm-" + base64.b16encode(os.urandom(16)).decode().lower()
            token_file = env.path("%s-admin-token" % name)
            with open(token_file, "w") as f:
                f.write(self.admin_token + "\n")
            os.chmod(token_file, 0o600)
            cfg["admin"]["token_file"] = token_file
        # EMX_E2E_WORKERS: run every edgemux of a test with that many
        # worker loops (the ThreadSanitizer tier); a test's own setting wins.
        if WORKERS > 1:
            cfg["server"]["workers"] = WORKERS
        for section, values in (overrides or {}).items():
            cfg.setdefault(section, {}).update(values)
        self.workers = int(cfg["server"].get("workers", 1))
        self.config_path = env.path("%s.yaml" % name)
        with open(self.config_path, "w") as f:
            for section, values in cfg.items():
                f.write("%s:\n" % section)
                for k, v in values.items():
                    f.write("  %s: %s\n" % (k, v))
            f.write(extra_yaml)
        self.proc = None
        if start:
            self.start()

    def write_instances(self, ports, weights=None, priorities=None, rename=True, tls=None,
                        address="127.0.0.1"):
        """Rewrite the static file; by rename (as config managers do) unless told.
        tls: a bool for every instance, or a list of bools; address: the
        address written for every instance (a host name for TLS name checks)."""
        lines = ["instances:"]
        for i, port in enumerate(ports):
            lines.append("  - address: %s" % address)
            lines.append("    port: %d" % port)
            if weights:
                lines.append("    weight: %d" % weights[i])
            if priorities:
                lines.append("    priority: %d" % priorities[i])
            if tls is not None:
                on = tls[i] if isinstance(tls, (list, tuple)) else tls
                lines.append("    tls: %s" % ("true" if on else "false"))
        if not ports:
            lines = ["instances: []"]
        text = "\n".join(lines) + "\n"
        if rename:
            tmp = self.instances_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.rename(tmp, self.instances_file)
        else:
            with open(self.instances_file, "w") as f:
                f.write(text)

    def start(self):
        self.proc = Proc(self.wrapper + [EMX_BIN, "-c", self.config_path],
                         self.env.path("%s.log" % self.name))
        self.env.procs.append(self.proc)
        wait_until(lambda: self.http("/health")[0] == 200 or not self.proc.alive(), self.start_timeout,
                   what="edgemux %s /health" % self.name)
        if not self.proc.alive():
            raise AssertionError("edgemux exited:\n" + self.proc.output())

    def http(self, path, method="GET", headers=None, token=True):
        """(status, body) of one admin request. An action (not GET or HEAD)
        carries this edgemux's admin token unless token is False."""
        hdrs = dict(headers or {})
        if token and self.admin_token and method not in ("GET", "HEAD"):
            hdrs.setdefault("Authorization", "Bearer " + self.admin_token)
        try:
            req = urllib.request.Request("http://127.0.0.1:%d%s" % (self.admin_port, path), method=method,
                                         headers=hdrs)
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except (urllib.error.URLError, ConnectionError, socket.timeout):
            return 0, ""

    def wait_ready(self, timeout=10):
        wait_until(lambda: self.http("/ready")[0] == 200, timeout, what="%s /ready" % self.name)
        if self.workers > 1:
            # /ready answers for the process (any worker with a connected
            # pipe); a test's device may land on any worker, so each one
            # must have a pipe, as the single loop has when it is ready
            wait_until(self.every_worker_has_a_pipe, timeout,
                       what="%s: a connected pipe on each of %d workers" % (self.name, self.workers))

    def every_worker_has_a_pipe(self):
        status, body = self.http("/metrics")
        if status != 200:
            return False
        up = {int(m.group(1)): float(m.group(2)) for m in
              re.finditer(r'^emx_worker_pipes_connected\{worker="(\d+)"\} (\S+)$', body, re.M)}
        return len(up) == self.workers and all(v > 0 for v in up.values())

    def log(self):
        return self.proc.output()

    def edge(self, **kw):
        return RawEdge(self.edge_port, **kw)


class HAProxy:
    def __init__(self, env, emx1, emx2, maxconn=2000):
        """maxconn (haproxy -n) overrides demo.cfg's 20000, which needs
        twice that many open files; None keeps the file's value."""
        self.env = env
        self.edge_port = free_port()
        penv = dict(os.environ, EDGE_PORT=str(self.edge_port),
                    EMX1_PORT=str(emx1.edge_port), EMX1_ADMIN=str(emx1.admin_port),
                    EMX2_PORT=str(emx2.edge_port), EMX2_ADMIN=str(emx2.admin_port))
        cfg = os.path.join(SOURCE_DIR, "haproxy-conf", "demo.cfg")
        args = [HAPROXY, "-f", cfg, "-db"] + (["-n", str(maxconn)] if maxconn else [])
        self.proc = Proc(args, env.path("haproxy.log"), env=penv)
        env.procs.append(self.proc)

        def listening():
            try:
                socket.create_connection(("127.0.0.1", self.edge_port), timeout=0.5).close()
                return True
            except OSError:
                if not self.proc.alive():
                    raise AssertionError("haproxy exited:\n" + self.proc.output())
                return False

        wait_until(listening, 10, what="haproxy listening")


def edge_sim(env, port, *args, ledger=True, timeout=120):
    """Run edge-sim to completion; returns (exit status, output, ledger)."""
    lpath = env.path("ledger-%d.json" % time.monotonic_ns()) if ledger else None
    cmd = [EDGE_SIM, "--url", "ws://127.0.0.1:%d/Thingworx/WS" % port, "--app-key-file",
           env.app_key_file, "--quiet", "--max-connect-delay", "100ms"] + [str(a) for a in args]
    if lpath:
        cmd += ["--ledger", lpath]
    r = subprocess.run(cmd, capture_output=True, timeout=timeout)
    out = (r.stdout + r.stderr).decode(errors="replace")
    data = None
    if lpath and os.path.exists(lpath):
        with open(lpath) as f:
            data = json.load(f)
    return r.returncode, out, data


def start_edge_sim(env, port, *args):
    """Run edge-sim in the background; returns (Proc, ledger path)."""
    lpath = env.path("ledger-%d.json" % time.monotonic_ns())
    cmd = [EDGE_SIM, "--url", "ws://127.0.0.1:%d/Thingworx/WS" % port, "--app-key-file",
           env.app_key_file, "--quiet", "--max-connect-delay", "100ms", "--ledger", lpath] + [str(a) for a in args]
    p = Proc(cmd, env.path("edge-sim-%d.log" % time.monotonic_ns()))
    env.procs.append(p)
    return p, lpath


def check_ledger(test, ledger, out=""):
    """Every request in an edge-sim ledger got exactly one outcome, and that
    outcome is an answer (no no_answer, no connection_lost); edge-sim's
    summary reports no answer it could not match. Returns the ledger's
    answers by code."""
    test.assertIsNotNone(ledger, "edge-sim wrote no ledger:\n" + out)
    test.assertTrue(ledger, "empty ledger:\n" + out)
    seen, codes = set(), {}
    for e in ledger:
        key = (e["edge"], e["request_id"])
        test.assertNotIn(key, seen, "request listed twice in the ledger: %r" % (e,))
        seen.add(key)
        test.assertEqual(e["outcome"], "answered", "request without exactly one answer: %r\n%s" % (e, out))
        codes[e["code"]] = codes.get(e["code"], 0) + 1
    if out:
        m = re.search(r"unexpected answers (\d+)", out)
        if m:
            test.assertEqual(int(m.group(1)), 0, "an answer matched no request:\n" + out)
        test.assertIn("no_answer 0", out)
    return codes


class PKI:
    """A CA made at test time with the openssl CLI, and certificates it
    issues. issue() returns (cert, key, pem with both) paths."""

    def __init__(self, env, name="ca"):
        self.env = env
        self.key = env.path("%s.key" % name)
        self.cert = env.path("%s.crt" % name)
        self._run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key,
                   "-out", self.cert, "-days", "2", "-subj", "/CN=edgemux e2e test CA",
                   "-addext", "basicConstraints=critical,CA:TRUE",
                   "-addext", "keyUsage=critical,keyCertSign,cRLSign"])

    def _run(self, args):
        r = subprocess.run(args, capture_output=True, timeout=60)
        if r.returncode != 0:
            raise AssertionError("%s failed:\n%s" % (" ".join(args[:3]), (r.stdout + r.stderr).decode(errors="replace")))

    def issue(self, name, dns=(), ips=()):
        key, csr, crt = (self.env.path("%s.%s" % (name, x)) for x in ("key", "csr", "crt"))
        ext = self.env.path("%s.ext" % name)
        sans = ["DNS:%s" % d for d in dns] + ["IP:%s" % i for i in ips]
        with open(ext, "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n")
            if sans:
                f.write("subjectAltName=%s\n" % ",".join(sans))
        cn = (list(dns) + list(ips) + [name])[0]
        self._run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                   "-out", csr, "-subj", "/CN=%s" % cn])
        self._run(["openssl", "x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
                   "-CAcreateserial", "-out", crt, "-days", "2", "-extfile", ext])
        pem = self.env.path("%s.pem" % name)
        with open(pem, "w") as out:
            for part in (crt, key):
                with open(part) as f:
                    out.write(f.read())
        return crt, key, pem

    def client_context(self):
        """An ssl context trusting only this CA (host name checked)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.cert)
        return ctx


class HAProxyTCP:
    """HAProxy in mode tcp with a generated config: each route is
    (listen port, target port, pem or None). With a pem, HAProxy ends TLS
    with that certificate and forwards plain TCP (a TLS terminator in front
    of platform-sim, which has no TLS)."""

    def __init__(self, env, routes, name=None):
        self.env = env
        self.routes = list(routes)
        self.name = name or "haproxy-tcp-%d" % len(env.procs)
        lines = ["global", "    maxconn 2000", "defaults", "    mode tcp", "    timeout connect 5s",
                 "    timeout client 60s", "    timeout server 60s", ""]
        for i, (listen, target, pem) in enumerate(self.routes):
            lines.append("frontend f%d" % i)
            lines.append("    bind 127.0.0.1:%d%s" % (listen, " ssl crt %s" % pem if pem else ""))
            lines.append("    default_backend b%d" % i)
            lines.append("backend b%d" % i)
            lines.append("    server s%d 127.0.0.1:%d" % (i, target))
            lines.append("")
        self.config_path = env.path("%s.cfg" % self.name)
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines))
        self.proc = Proc([HAPROXY, "-f", self.config_path, "-db"], env.path("%s.log" % self.name))
        env.procs.append(self.proc)

        def listening():
            for listen, _, _ in self.routes:
                try:
                    socket.create_connection(("127.0.0.1", listen), timeout=0.5).close()
                except OSError:
                    if not self.proc.alive():
                        raise AssertionError("haproxy exited:\n" + self.proc.output())
                    return False
            return True

        wait_until(listening, 10, what="haproxy (tcp) listening")


class Env:
    """A temp directory, an app key, and every process a test started."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="emx-e2e-")
        self.app_key = "e2e-" + base64.b16encode(os.urandom(12)).decode().lower()
        self.app_key_file = self.path("appkey")
        with open(self.app_key_file, "w") as f:
            f.write(self.app_key + "\n")
        os.chmod(self.app_key_file, 0o600)
        self.procs = []

    def path(self, name):
        return os.path.join(self.dir, name)

    def cleanup(self, keep=False):
        for p in reversed(self.procs):
            try:
                p.stop(5)
            except Exception:
                p.kill()
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


class E2ETest(unittest.TestCase):
    """Each test gets an Env; on failure the logs are kept and their place printed."""

    def setUp(self):
        self.env = Env()

    def tearDown(self):
        failed = any(err for _, err in (self._outcome.errors if hasattr(self._outcome, "errors") else []) if err)
        result = getattr(self._outcome, "result", None)
        if result is not None and (result.failures or result.errors):
            failed = True
        if failed:
            for p in self.env.procs:
                out = p.output() if hasattr(p, "output") else ""
                print("\n--- %s (last 40 lines)\n%s" % (" ".join(p.args[:3]), "\n".join(out.splitlines()[-40:])))
        # A sanitizer report in any process's output fails the test, even
        # when the process went on (TSan reports races and continues).
        reports = []
        for p in self.env.procs:
            try:
                p.stop(10)
            except Exception:
                p.kill()
            out = p.output() if hasattr(p, "output") else ""
            if "WARNING: ThreadSanitizer" in out or "ERROR: AddressSanitizer" in out:
                reports.append("%s:\n%s" % (" ".join(p.args[:3]), out[out.find("=================="):][:6000]))
        self.env.cleanup(keep=failed or bool(reports))
        if failed or reports:
            print("logs kept in", self.env.dir)
        if reports:
            raise AssertionError("sanitizer report(s):\n" + "\n".join(reports))
