#!/usr/bin/env python3
"""A stand-in for Consul's HTTP API, for the consul discovery plugin's tests.

Written from Consul's documentation (Health HTTP API, Blocking Queries), not
from Consul's code. It serves

  GET /v1/health/service/<name>[?passing][&tag=T][&dc=D][&index=N&wait=W]

with the documented answer shape ([{Node, Service, Checks}]) and blocking
semantics: with index >= 1 the request is held until the service's index
differs from N or W (plus up to W/16, as Consul adds) expires; every answer
carries X-Consul-Index. Consul caps wait at 10 minutes; so does this.

A test drives it through POST /_fixture/<action> with a JSON body:
  register    {"service", "node", "id", "address", "node_address", "port",
               "tags", "weight", "meta", "status"}  (index + 1, or "index")
  deregister  {"service", "id"}                     (index + 1)
  index       {"service", "index"}  set the index (even backwards), wake waiters
  fail        {"count", "status", "body"}  answer the next count queries so
  mode        {"instant": bool, "index_header": "ok"|"missing"|"garbage",
               "body": str|null, "hang_ms": int}
  token       {"token": str|null}  require X-Consul-Token (403 otherwise)
  stats       → {"queries", "blocking", "times", "token_in_query", "last_path"}
  reset_stats
  stop
It binds 127.0.0.1 (--port, default 0: a free one) and writes the port to
--port-file. It exits when
stopped, after --lifetime seconds, or when its parent process goes away.

With --tls-cert PEM and --tls-key PEM it speaks HTTPS instead (the control
endpoint too): the server certificate (followed by any intermediates) and its
key. The TLS handshake runs in the connection's own thread, so a client that
rejects the certificate (an alert, a reset) or stalls costs that thread only;
a failed handshake is logged as one line on stderr.
"""
import argparse
import json
import os
import random
import re
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

WAIT_MAX = 600.0
HANDSHAKE_TIMEOUT = 10.0


class State:
    def __init__(self):
        self.cond = threading.Condition()
        self.services = {}  # name -> {"index": int, "entries": {id: entry}}
        self.raft_index = 10
        self.fail_left = 0
        self.fail_status = 500
        self.fail_body = "rpc error: No cluster leader"
        self.instant = False
        self.index_header = "ok"
        self.body = None
        self.hang_ms = 0
        self.token = None
        self.reset_stats()

    def reset_stats(self):
        self.queries = 0
        self.blocking = 0
        self.times = []
        self.token_in_query = False
        self.last_path = ""

    def service(self, name):
        svc = self.services.get(name)
        if svc is None:
            svc = {"index": self.raft_index, "entries": {}}
            self.services[name] = svc
        return svc

    def bump(self, svc):
        self.raft_index += 1
        svc["index"] = self.raft_index
        self.cond.notify_all()


STATE = State()


def parse_wait(text):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", text or "")
    if not m:
        return None
    n = int(m.group(1))
    unit = m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]


def entry_json(e):
    checks = [{"Node": e["node"], "CheckID": "serfHealth", "Name": "Serf Health Status",
               "Status": "passing", "ServiceID": "", "ServiceName": ""},
              {"Node": e["node"], "CheckID": "service:" + e["id"], "Name": "Service check",
               "Status": e.get("status", "passing"), "ServiceID": e["id"],
               "ServiceName": e["service"]}]
    svc = {"ID": e["id"], "Service": e["service"], "Tags": e.get("tags", []),
           "Address": e.get("address", ""), "Port": e["port"],
           "Meta": e.get("meta", {}), "EnableTagOverride": False}
    if e.get("weight") is not None:
        svc["Weights"] = {"Passing": e["weight"], "Warning": 1}
    return {"Node": {"ID": "", "Node": e["node"], "Address": e.get("node_address", "127.0.0.1"),
                     "Datacenter": "dc1", "TaggedAddresses": None, "Meta": {}},
            "Service": svc, "Checks": checks}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            # Accepted without a handshake (see FixtureServer): do it here,
            # bounded, then block without a timeout as a held query may.
            self.request.settimeout(HANDSHAKE_TIMEOUT)
            self.request.do_handshake()
            self.request.settimeout(None)
        super().setup()

    def log_message(self, fmt, *args):  # keep the test's output quiet
        pass

    def send(self, status, body, headers=None):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urlsplit(self.path)
        if not url.path.startswith("/v1/health/service/"):
            self.send(404, "not found")
            return
        name = unquote(url.path[len("/v1/health/service/"):])
        q = parse_qs(url.query, keep_blank_values=True)
        st = STATE
        with st.cond:
            st.queries += 1
            st.times.append(time.monotonic())
            st.last_path = self.path
            if "token" in q:
                st.token_in_query = True
            if st.token is not None and self.headers.get("X-Consul-Token") != st.token:
                self.send(403, "ACL not found")
                return
            if st.fail_left > 0:
                st.fail_left -= 1
                self.send(st.fail_status, st.fail_body)
                return
            hang = st.hang_ms
        if hang:
            time.sleep(hang / 1000.0)
        with st.cond:
            svc = st.service(name)
            index = 0
            if "index" in q:
                try:
                    index = int(q["index"][0])
                except ValueError:
                    self.send(400, "invalid index")
                    return
            wait = parse_wait(q.get("wait", ["5m"])[0])
            if wait is None:
                self.send(400, "invalid wait")
                return
            wait = min(wait, WAIT_MAX)
            if index >= 1 and not st.instant:
                st.blocking += 1
                deadline = time.monotonic() + wait + random.uniform(0, wait / 16)
                while svc["index"] == index:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    st.cond.wait(left)
            tag = q.get("tag", [None])[0]
            passing = "passing" in q
            out = []
            for e in sorted(svc["entries"].values(), key=lambda e: (e["node"], e["id"])):
                if tag is not None and tag not in e.get("tags", []):
                    continue
                if passing and e.get("status", "passing") != "passing":
                    continue
                out.append(entry_json(e))
            headers = {"X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0"}
            if st.index_header == "ok":
                headers["X-Consul-Index"] = str(svc["index"])
            elif st.index_header == "garbage":
                headers["X-Consul-Index"] = "12abc"
            body = st.body if st.body is not None else json.dumps(out)
        self.send(200, body, headers)

    def do_POST(self):
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        try:
            req = json.loads(raw or b"{}")
        except ValueError:
            self.send(400, '{"error": "bad json"}')
            return
        action = url.path[len("/_fixture/"):] if url.path.startswith("/_fixture/") else ""
        st = STATE
        result = {"ok": True}
        with st.cond:
            if action == "register":
                svc = st.service(req["service"])
                svc["entries"][req["id"]] = dict(req)
                st.bump(svc)
                if "index" in req:  # a change that also moves the index backwards
                    svc["index"] = int(req["index"])
                result["index"] = svc["index"]
            elif action == "deregister":
                svc = st.service(req["service"])
                svc["entries"].pop(req["id"], None)
                st.bump(svc)
                result["index"] = svc["index"]
            elif action == "index":
                svc = st.service(req["service"])
                svc["index"] = int(req["index"])
                st.cond.notify_all()
            elif action == "fail":
                st.fail_left = int(req.get("count", 1))
                st.fail_status = int(req.get("status", 500))
                st.fail_body = req.get("body", st.fail_body)
            elif action == "mode":
                st.instant = bool(req.get("instant", st.instant))
                st.index_header = req.get("index_header", st.index_header)
                if "body" in req:
                    st.body = req["body"]
                st.hang_ms = int(req.get("hang_ms", st.hang_ms))
                st.cond.notify_all()
            elif action == "token":
                st.token = req.get("token")
            elif action == "stats":
                result = {"queries": st.queries, "blocking": st.blocking,
                          "times": st.times, "token_in_query": st.token_in_query,
                          "last_path": st.last_path}
            elif action == "reset_stats":
                st.reset_stats()
            elif action == "stop":
                threading.Thread(target=self.server.shutdown, daemon=True).start()
            else:
                self.send(404, '{"error": "unknown action"}')
                return
        self.send(200, json.dumps(result))


class FixtureServer(ThreadingHTTPServer):
    # A restart on the port of a stopped fixture may meet TIME_WAIT: retry.
    allow_reuse_address = True
    daemon_threads = True
    tls = None  # an ssl.SSLContext: HTTPS

    def server_activate(self):
        super().server_activate()
        if self.tls is not None:
            # Handshakes are left to the connection's thread (Handler.setup):
            # accept() must not block the serving loop on one client.
            self.socket = self.tls.wrap_socket(self.socket, server_side=True,
                                               do_handshake_on_connect=False)

    def handle_error(self, request, client_address):
        err = sys.exc_info()[1]
        if isinstance(err, (ssl.SSLError, ConnectionError, socket.timeout)):
            # A client that refused the certificate, or went away: one line.
            print("fixture: connection from %s:%d: %s" % (client_address[0], client_address[1],
                                                          err), file=sys.stderr, flush=True)
            return
        super().handle_error(request, client_address)


def watch_parent(parent, server):
    while os.getppid() == parent:
        time.sleep(0.5)
    server.shutdown()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--lifetime", type=float, default=300.0)
    ap.add_argument("--tls-cert", help="PEM server certificate (and chain): serve HTTPS")
    ap.add_argument("--tls-key", help="PEM private key of --tls-cert")
    ap.add_argument("--preload", help="JSON file: a list of register bodies in place before the "
                    "first query (a source that comes back with its whole set at once)")
    args = ap.parse_args()
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        FixtureServer.tls = ctx
    if args.preload:
        with open(args.preload) as f, STATE.cond:
            for req in json.load(f):
                svc = STATE.service(req["service"])
                svc["entries"][req["id"]] = dict(req)
                STATE.bump(svc)
    for attempt in range(50):
        try:
            server = FixtureServer(("127.0.0.1", args.port), Handler)
            break
        except OSError:
            if attempt == 49:
                raise
            time.sleep(0.1)
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(tmp, args.port_file)
    threading.Thread(target=watch_parent, args=(os.getppid(), server), daemon=True).start()
    timer = threading.Timer(args.lifetime, server.shutdown)
    timer.daemon = True
    timer.start()
    server.serve_forever(poll_interval=0.1)
    # Blocked queries are daemon threads: wake them so they end now.
    with STATE.cond:
        STATE.cond.notify_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
