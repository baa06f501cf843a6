#!/usr/bin/env python3
"""Remote Access tunnel benchmark (docs/benchmarks.md, "Remote Access
tunnels"). Python 3 standard library only.

Starts platform-sim (--instances, default 1), one edgemux (static discovery
of the sim's ports) and HAProxy with haproxy-conf/bench-tunnel.cfg, which
has two front ends:

  direct   devices -> HAProxy -> platform-sim          (the baseline)
  edgemux  devices -> HAProxy -> edgemux -> platform-sim

The devices are edge-sim processes (libedgeclient: the C SDK 2.2.1's tunnel
socket, Max-Frame-Size, one base64 text message per target read of at most
chunksize-16 bytes; the SDK's 5 ms worker tick is NOT emulated, so a
tunnel runs as fast as the simulators and relays allow, not at a real
device's ~1.2 MB/s each way). The Remote Access client is
this program on platform-sim's RAC port of each tunnel (raw TCP; platform-sim
base64-encodes each read of at most chunksize bytes into one text message).

For each path, in alternating rounds (a fresh edge-sim per path and round):
  down   one tunnel, RAC -> platform -> device -> a discard target here:
         MB/s platform -> device (timed until the target has every byte)
  up     one tunnel, a source target here -> device -> platform -> RAC:
         MB/s device -> platform
  echo   one tunnel to edge-sim's echo target: MB/s each way at once
  many   --many tunnels (over --many-devices devices) echoing at once:
         aggregate MB/s each way
and the CPU seconds of HAProxy, edgemux, platform-sim and edge-sim per GB
of tunnel payload (raw bytes, both directions summed; on the wire the
payload is base64, 4/3 of it), from /proc/PID/stat around each transfer;
and the share of a core the relays and the rest used, beside how busy each
pinned CPU was in all (/proc/stat: other processes on the machine too).

Memory per idle tunnel (before the rounds, on fresh processes): RSS (VmRSS)
and Pss_Anon (smaps_rollup) of edgemux and HAProxy with --idle tunnels open and
idle over --idle-devices devices, minus the same with the devices bound and
no tunnel, divided by the number of tunnels; two cycles (open, close, open
again), so growth across cycles shows. The direct path is measured first
(HAProxy's figure, on a fresh HAProxy), then the edgemux path.

Pinning (as scripts/bench.sh): the relays (HAProxy, edgemux) on
--server-cpu, everything else (platform-sim, edge-sim, this program) on
--load-cpu; --server-cpu -1 pins nothing.

Writes only in a temporary directory (removed unless --keep) and, with
--json FILE, that file. Prints a table.

  tools/bench/tunnel_bench.py --build build/bench-tun --rounds 3
"""

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
CHUNK = 8192  # StartTunnel chunksize (the SDK's default)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout, what, interval=0.02):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise RuntimeError("timed out after %.1fs waiting for %s (last: %r)" % (timeout, what, last))


def cpu_s(pid):
    """utime + stime of a process in seconds (0 if gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def cpu_busy():
    """{cpu: (busy, total) jiffies} from /proc/stat: what every process on
    the machine used, ours and others'."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + (v[4] if len(v) > 4 else 0)
                out[int(line[3:line.index(" ")])] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def mem_kib(pid):
    """(VmRSS, Pss_Anon) in KiB. Pss_Anon (the process's anonymous memory:
    heap, stacks) does not move when other processes map or drop the same
    shared libraries, as the whole Pss does."""
    rss = pss = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss_Anon:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------- processes

class Proc:
    def __init__(self, args, log_path, env=None, cpu=None):
        if cpu is not None:
            args = ["taskset", "-c", str(cpu)] + list(args)  # taskset execs: same PID
        self.args = args
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self):
        return self.p.pid

    def alive(self):
        return self.p.poll() is None

    def output(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.alive():
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.log.close()
        return self.p.returncode


class Stack:
    """platform-sim, edgemux and HAProxy; edge-sim devices come and go."""

    def __init__(self, a, tmp):
        self.a = a
        self.tmp = tmp
        self.procs = []
        self.key = "tunbench-" + base64.b16encode(os.urandom(10)).decode().lower()
        self.key_file = self.path("appkey")
        with open(self.key_file, "w") as f:
            f.write(self.key + "\n")
        os.chmod(self.key_file, 0o600)
        self.ctl = None
        self.tid_seq = 0

    def path(self, name):
        return os.path.join(self.tmp, name)

    def start(self):
        a = self.a
        self.psim = Proc([a.psim, "--instances", str(a.instances), "--port", "0", "--control", "0",
                          "--app-key-file", self.key_file, "--bind", "127.0.0.1", "--quiet"],
                         self.path("platform-sim.log"), cpu=a.load_cpu)
        self.procs.append(self.psim)

        def ready():
            if not self.psim.alive():
                raise RuntimeError("platform-sim exited:\n" + self.psim.output())
            return re.search(r"platform-sim ready control=(\d+) ports=([\d,]+)", self.psim.output())

        m = wait_until(ready, 10, "platform-sim ready")
        self.control = int(m.group(1))
        self.ports = [int(p) for p in m.group(2).split(",")]
        self.start_edgemux()
        self.start_haproxy()

    def start_edgemux(self):
        a = self.a
        self.emx_port, self.emx_admin = free_port(), free_port()
        inst = self.path("instances.yaml")
        with open(inst, "w") as f:
            f.write("instances:\n")
            for p in self.ports:
                f.write("  - address: 127.0.0.1\n    port: %d\n" % p)
        cfg = {
            "server": {"name": "tunbench"},
            "log": {"level": a.emx_log},
            "plugins": {"dir": a.plugins},
            "edge": {"address": "127.0.0.1", "port": self.emx_port, "deflate": "false",
                     "max_tunnels": max(1000, a.idle + a.many + 10), "max_tunnels_per_device": 0,
                     "tunnel_idle_timeout": "10m"},
            "platform": {"app_key_file": self.key_file, "pipes_per_instance": 2},
            "discovery": {"plugin": "static", "file": inst, "reload_delay": "50ms"},
            "transport": {"plugin": "ws"},
            "admin": {"listen": "127.0.0.1:%d" % self.emx_admin},
        }
        path = self.path("edgemux.yaml")
        with open(path, "w") as f:
            for section, values in cfg.items():
                f.write("%s:\n" % section)
                for k, v in values.items():
                    f.write("  %s: %s\n" % (k, v))
        self.emx = Proc([a.emx, "-c", path], self.path("edgemux.log"), cpu=a.server_cpu)
        self.procs.append(self.emx)

        def up():
            if not self.emx.alive():
                raise RuntimeError("edgemux exited:\n" + self.emx.output())
            return self.admin("/ready")[0] == 200

        wait_until(up, 15, "edgemux /ready")

    def admin(self, path):
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d%s" % (self.emx_admin, path), timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""
        except (urllib.error.URLError, OSError):
            return 0, ""

    def metric(self, name, labels=""):
        _, text = self.admin("/metrics")
        m = re.search(r"^%s%s (\d+)$" % (re.escape(name), re.escape(labels)), text, re.M)
        return int(m.group(1)) if m else None

    def start_haproxy(self):
        a = self.a
        self.front = {"direct": free_port(), "edgemux": free_port()}
        env = dict(os.environ, PSIM_PORT=str(self.ports[0]), PSIM_FRONT_PORT=str(self.front["direct"]),
                   EDGE_PORT=str(self.front["edgemux"]), EMX1_PORT=str(self.emx_port))
        self.hap = Proc([a.haproxy, "-db", "-f", a.haproxy_cfg], self.path("haproxy.log"), env=env,
                        cpu=a.server_cpu)
        self.procs.append(self.hap)

        def listening():
            for p in self.front.values():
                try:
                    socket.create_connection(("127.0.0.1", p), timeout=0.5).close()
                except OSError:
                    if not self.hap.alive():
                        raise RuntimeError("haproxy exited:\n" + self.hap.output())
                    return False
            return True

        wait_until(listening, 10, "haproxy listening")

    # ---- platform-sim control ----

    def cmd(self, line, timeout=30):
        if self.ctl is None:
            self.ctl = socket.create_connection(("127.0.0.1", self.control), timeout=timeout)
            self.ctl_buf = b""
        self.ctl.settimeout(timeout)
        self.ctl.sendall(line.encode() + b"\n")
        while b"\n" not in self.ctl_buf:
            d = self.ctl.recv(1 << 20)
            if not d:
                raise RuntimeError("platform-sim control closed")
            self.ctl_buf += d
        out, self.ctl_buf = self.ctl_buf.split(b"\n", 1)
        return out.decode()

    def cmd_lines(self, line, last_prefix, timeout=30):
        """A command answered by several lines, the last starting with last_prefix."""
        self.cmd_raw_send(line)
        lines = []
        end = time.monotonic() + timeout
        while True:
            while b"\n" not in self.ctl_buf:
                if time.monotonic() > end:
                    raise RuntimeError("no answer to " + line)
                d = self.ctl.recv(1 << 20)
                if not d:
                    raise RuntimeError("platform-sim control closed")
                self.ctl_buf += d
            out, self.ctl_buf = self.ctl_buf.split(b"\n", 1)
            s = out.decode()
            lines.append(s)
            if s.startswith(last_prefix):
                return lines

    def cmd_raw_send(self, line):
        if self.ctl is None:
            self.cmd("ports")
        self.ctl.sendall(line.encode() + b"\n")

    def tunnels(self):
        rows, totals = {}, {}
        for line in self.cmd_lines("tunnels", "tunnels "):
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

    def things_bound(self):
        return json.loads(self.cmd("stats"))["things_bound"]

    def stats(self):
        return json.loads(self.cmd("stats"))

    def start_tunnel(self, thing, port):
        """StartTunnel via instance 1; returns (tid, RAC port)."""
        self.tid_seq += 1
        tid = "tb-%d" % self.tid_seq
        for _ in range(100):
            r = self.cmd("tunnel 1 %s %s 127.0.0.1 %d %d %d 1" % (thing, tid, port, CHUNK, 600000))
            m = re.match(r"answer 0x40 SUCCESS port (\d+)", r)
            if m:
                return tid, int(m.group(1))
            if "not bound" in r or "no pipe" in r:
                time.sleep(0.05)
                continue
            raise RuntimeError("tunnel %s: %s" % (tid, r))
        raise RuntimeError("tunnel %s: %s" % (tid, r))

    def wait_connected(self, tids, timeout=20):
        """Until every tid's device socket is up and its target dialled."""
        want = set(tids)

        def ok():
            rows, _ = self.tunnels()
            bad = [t for t in want if rows.get(t, {}).get("device_connected") != "1"]
            for t in want:
                st = rows.get(t, {}).get("state")
                if st in ("closed", "refused"):
                    raise RuntimeError("tunnel %s %s: %r" % (t, st, rows[t]))
            return not bad

        wait_until(ok, timeout, "tunnel sockets up", interval=0.05)

    def stop(self):
        if self.ctl:
            self.ctl.close()
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception:
                pass


class Devices:
    """One edge-sim process: `n` devices through a front end, echo target."""

    def __init__(self, st, path, n, max_tunnels=64, tag=""):
        self.st = st
        a = st.a
        self.n = n
        url = "ws://127.0.0.1:%d/Thingworx/WS" % st.front[path]
        self.proc = Proc([a.edge_sim, "--url", url, "--app-key-file", st.key_file, "--edges", str(n),
                          "--rate", "0", "--duration", "1h", "--drain", "1s", "--tunnel-echo-port", "0",
                          "--max-tunnels", str(max_tunnels), "--max-connect-delay", "100ms", "--quiet"],
                         st.path("edge-sim-%s%s.log" % (path, tag)), cpu=a.load_cpu)
        m = wait_until(lambda: re.search(r"edge-sim tunnel-echo port=(\d+)", self.proc.output()) or
                       (not self.proc.alive() and RuntimeError("edge-sim exited:\n" + self.proc.output())),
                       10, "edge-sim echo port")
        if isinstance(m, Exception):
            raise m
        self.echo_port = int(m.group(1))
        wait_until(lambda: st.things_bound() >= n, 20, "%d devices bound" % n)

    def thing(self, i):
        return "sim-edge-%d-thing-0" % i

    def stop(self):
        self.proc.stop(signal.SIGINT, timeout=20)
        out = self.proc.output()
        wait_until(lambda: self.st.things_bound() == 0, 20, "devices unbound")
        return out


# ---------------------------------------------------------------- targets

class Target:
    """A TCP server on 127.0.0.1 standing for a tunnel's local target.
    mode 'discard': counts what it reads; 'source': once `go` is set,
    writes `data` to each connection."""

    def __init__(self, mode, data=None):
        self.mode = mode
        self.data = data
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.count = 0
        self.conns = 0
        self.done_at = None
        self.want = None
        self.go = threading.Event()
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(64)
        self.port = self.srv.getsockname()[1]
        self.socks = []
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            with self.lock:
                self.conns += 1
                self.socks.append(c)
                self.cond.notify_all()
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    def serve(self, c):
        try:
            if self.mode == "discard":
                buf = bytearray(1 << 20)
                while True:
                    n = c.recv_into(buf)
                    if n <= 0:
                        return
                    with self.lock:
                        self.count += n
                        if self.want is not None and self.count >= self.want and self.done_at is None:
                            self.done_at = time.monotonic()
                            self.cond.notify_all()
            else:
                self.go.wait()
                c.sendall(self.data)
                while c.recv(65536):
                    pass
        except OSError:
            pass

    def arm(self, want):
        with self.lock:
            self.count = 0
            self.done_at = None
            self.want = want

    def wait_done(self, timeout):
        with self.lock:
            self.cond.wait_for(lambda: self.done_at is not None, timeout)
            return self.done_at

    def close(self):
        self.srv.close()
        for c in self.socks:
            try:
                c.close()
            except OSError:
                pass


def recv_n(sock, n, timeout, check=None):
    """Read n bytes; returns (bytes read, time of the last)."""
    sock.settimeout(timeout)
    buf = bytearray(1 << 20)
    got = 0
    view = memoryview(check) if check is not None else None
    ok = True
    while got < n:
        k = sock.recv_into(buf, min(len(buf), n - got))
        if k <= 0:
            break
        if view is not None and ok and buf[:k] != view[got:got + k]:
            ok = False
        got += k
    return got, time.monotonic(), ok


# ---------------------------------------------------------------- the bench

class Bench:
    def __init__(self, st, a):
        self.st = st
        self.a = a
        self.data = os.urandom(a.size * MIB)
        self.many_data = self.data[:a.many_size * MIB]
        self.results = {"rounds": []}

    def pids(self):
        return {"haproxy": self.st.hap.pid, "edgemux": self.st.emx.pid, "platform-sim": self.st.psim.pid,
                "edge-sim": self.dev.proc.pid, "driver": os.getpid()}

    def cpu_snap(self):
        snap = {k: cpu_s(p) for k, p in self.pids().items()}
        snap["_machine"] = cpu_busy()
        return snap

    def cpu_per_gb(self, c0, c1, nbytes):
        gb = nbytes / 1e9
        return {k: round((c1[k] - c0[k]) / gb, 2) for k in c0 if not k.startswith("_")}

    def shares(self, c0, c1, wall):
        """Share of one core used by the relays and by the rest; and how
        busy each pinned CPU was in all (every process on the machine)."""
        d = {k: c1[k] - c0[k] for k in c0 if not k.startswith("_")}
        out = {"relays": round((d["haproxy"] + d["edgemux"]) / wall, 2),
               "sims_and_driver": round((d["platform-sim"] + d["edge-sim"] + d["driver"]) / wall, 2)}
        m0, m1 = c0["_machine"], c1["_machine"]
        for name, cpu in (("server_cpu_busy", self.a.server_cpu), ("load_cpu_busy", self.a.load_cpu)):
            if cpu is not None and cpu in m0 and cpu in m1 and m1[cpu][1] > m0[cpu][1]:
                out[name] = round((m1[cpu][0] - m0[cpu][0]) / (m1[cpu][1] - m0[cpu][1]), 2)
        return out

    def rac(self, port):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def settle(self, tids):
        self.st.wait_connected(tids)
        time.sleep(0.15)  # platform-sim and edgemux hold device-bound data 50 ms after the 101

    def one_down(self):
        n = len(self.data)
        tgt = Target("discard")
        try:
            tid, rp = self.st.start_tunnel(self.dev.thing(0), tgt.port)
            self.settle([tid])
            s = self.rac(rp)
            tgt.arm(n)
            time.sleep(0.05)
            c0 = self.cpu_snap()
            t0 = time.monotonic()
            s.sendall(self.data)
            done = tgt.wait_done(self.a.timeout)
            c1 = self.cpu_snap()
            s.close()
            if done is None:
                raise RuntimeError("down: target got %d of %d bytes" % (tgt.count, n))
            return {"mbps": n / (done - t0) / 1e6, "s": done - t0, "cpu_s_per_gb": self.cpu_per_gb(c0, c1, n),
                    "core_share": self.shares(c0, c1, done - t0)}
        finally:
            tgt.close()

    def one_up(self):
        n = len(self.data)
        tgt = Target("source", self.data)
        try:
            tid, rp = self.st.start_tunnel(self.dev.thing(0), tgt.port)
            self.settle([tid])
            s = self.rac(rp)
            time.sleep(0.05)
            c0 = self.cpu_snap()
            t0 = time.monotonic()
            tgt.go.set()
            got, t1, ok = recv_n(s, n, self.a.timeout, self.data)
            c1 = self.cpu_snap()
            s.close()
            if got != n or not ok:
                raise RuntimeError("up: RAC got %d of %d bytes (intact %s)" % (got, n, ok))
            return {"mbps": n / (t1 - t0) / 1e6, "s": t1 - t0, "cpu_s_per_gb": self.cpu_per_gb(c0, c1, n),
                    "core_share": self.shares(c0, c1, t1 - t0)}
        finally:
            tgt.close()

    def echo(self, ntun, data):
        """ntun tunnels over the devices, each echoing data; returns
        aggregate MB/s each way."""
        tids, racs = [], []
        for i in range(ntun):
            tid, rp = self.st.start_tunnel(self.dev.thing(i % self.dev.n), self.dev.echo_port)
            tids.append(tid)
            racs.append(rp)
        self.st.wait_connected(tids)
        time.sleep(0.15)
        socks = [self.rac(p) for p in racs]
        time.sleep(0.05)
        n = len(data)
        res = [None] * ntun
        start = threading.Event()

        def run(i):
            s = socks[i]
            w = threading.Thread(target=lambda: (start.wait(), s.sendall(data)), daemon=True)
            w.start()
            start.wait()
            res[i] = recv_n(s, n, self.a.timeout, data)

        ths = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(ntun)]
        for t in ths:
            t.start()
        c0 = self.cpu_snap()
        t0 = time.monotonic()
        start.set()
        for t in ths:
            t.join(self.a.timeout + 5)
        c1 = self.cpu_snap()
        for s in socks:
            s.close()
        for i, r in enumerate(res):
            if r is None or r[0] != n or not r[2]:
                raise RuntimeError("echo tunnel %s: %r of %d bytes" % (tids[i], r and r[:3:2], n))
        t_end = max(r[1] for r in res)
        per = sorted(n / (r[1] - t0) / 1e6 for r in res)
        return {"mbps_each_way": ntun * n / (t_end - t0) / 1e6, "s": t_end - t0,
                "per_tunnel_mbps_min_median_max": [round(per[0], 1), round(median(per), 1), round(per[-1], 1)],
                "cpu_s_per_gb": self.cpu_per_gb(c0, c1, 2 * ntun * n),
                "core_share": self.shares(c0, c1, t_end - t0)}

    def round(self, r, path):
        a = self.a
        self.dev = Devices(self.st, path, max(1, a.many_devices), tag="-r%d" % r)
        out = {"round": r, "path": path}
        try:
            out["down"] = self.one_down()
            out["up"] = self.one_up()
            out["echo"] = self.echo(1, self.data)
            if a.many:
                out["many"] = self.echo(a.many, self.many_data)
        finally:
            summary = self.dev.stop()
        m = re.search(r"tunnel data: (.*)", summary)
        if m:
            kv = dict(x.split("=", 1) for x in m.group(1).split())
            bad = {k: kv[k] for k in ("glued_bytes", "binary_dropped", "oversize_dropped", "bad_base64")
                   if kv.get(k, "0") != "0"}
            out["device_faults"] = bad
            out["max_frame_in"] = int(kv.get("max_frame_in", 0))
        self.results["rounds"].append(out)
        line = "round %d %-7s down %7.1f  up %7.1f  echo %7.1f MB/s each way" % (
            r, path, out["down"]["mbps"], out["up"]["mbps"], out["echo"]["mbps_each_way"])
        if "many" in out:
            line += "  %d tunnels %7.1f MB/s each way" % (a.many, out["many"]["mbps_each_way"])
        if out.get("device_faults"):
            line += "  DEVICE FAULTS %r" % out["device_faults"]
        print(line, flush=True)

    # ---- memory per idle tunnel ----

    def memory(self, path):
        a = self.a
        st = self.st
        per_dev = (a.idle + a.idle_devices - 1) // a.idle_devices
        dev = Devices(st, path, a.idle_devices, max_tunnels=max(64, per_dev), tag="-mem")
        self.dev = dev
        who = {"haproxy": st.hap.pid}
        if path == "edgemux":
            who["edgemux"] = st.emx.pid
        out = {"path": path, "tunnels": a.idle, "devices": a.idle_devices, "cycles": []}
        try:
            time.sleep(1.0)
            base = {k: mem_kib(p) for k, p in who.items()}
            out["base_kib"] = base
            for cyc in (1, 2):
                tids = []
                for i in range(a.idle):
                    tid, _ = st.start_tunnel(dev.thing(i % a.idle_devices), dev.echo_port)
                    tids.append(tid)
                st.wait_connected(tids, timeout=60)
                time.sleep(1.5)
                at = {k: mem_kib(p) for k, p in who.items()}
                opened = st.metric("emx_tunnel_sockets_open", '{side="server"}') if path == "edgemux" else None
                # close: the RAC side is never attached; completing each
                # tunnel makes the device CANCEL and close its socket
                self.close_tunnels(tids)
                time.sleep(1.5)
                after = {k: mem_kib(p) for k, p in who.items()}
                c = {"at_kib": at, "after_close_kib": after}
                if opened is not None:
                    c["emx_tunnel_sockets_open"] = opened
                    c["emx_tunnels_open_after_close"] = st.metric("emx_tunnels_open")
                c["bytes_per_tunnel"] = {k: {"rss": round((at[k][0] - base[k][0]) * 1024 / a.idle),
                                             "pss_anon": round((at[k][1] - base[k][1]) * 1024 / a.idle)}
                                         for k in who}
                out["cycles"].append(c)
        finally:
            dev.stop()
        self.results.setdefault("memory", []).append(out)
        for i, c in enumerate(out["cycles"], 1):
            print("memory %-7s cycle %d: %s" % (path, i, "  ".join(
                "%s %+d B RSS / %+d B Pss_Anon per tunnel (%d -> %d KiB, %d KiB after close)" % (
                    k, v["rss"], v["pss_anon"], base[k][0], c["at_kib"][k][0], c["after_close_kib"][k][0])
                for k, v in c["bytes_per_tunnel"].items())), flush=True)

    def close_tunnels(self, tids):
        rows, _ = self.st.tunnels()
        for tid in tids:
            thing = rows.get(tid, {}).get("thing")
            if thing:
                self.st.cmd("tunnel-complete 1 %s %s bench-done" % (thing, tid))

        def closed():
            rows, _ = self.st.tunnels()
            return all(rows.get(t, {}).get("state") == "closed" for t in tids)

        wait_until(closed, 30, "idle tunnels closed", interval=0.2)


def table(res, a):
    paths = ("direct", "edgemux")
    rows = []

    def vals(path, test, key):
        return [r[test][key] for r in res["rounds"] if r["path"] == path and test in r]

    def cpu(path, test, who):
        return [r[test]["cpu_s_per_gb"][who] for r in res["rounds"] if r["path"] == path and test in r]

    tests = [("down", "mbps", "1 tunnel platform -> device (%d MiB)" % a.size),
             ("up", "mbps", "1 tunnel device -> platform (%d MiB)" % a.size),
             ("echo", "mbps_each_way", "1 tunnel echo, each way (%d MiB)" % a.size)]
    if a.many:
        tests.append(("many", "mbps_each_way", "%d tunnels echo, aggregate each way (%d x %d MiB)" % (
            a.many, a.many, a.many_size)))
    summary = {}
    print()
    print("MB/s (10^6 B of tunnel payload per second), medians of %d rounds:" % a.rounds)
    print("%-52s %9s %9s %7s" % ("test", "direct", "edgemux", "ratio"))
    for test, key, label in tests:
        d, e = median(vals("direct", test, key)), median(vals("edgemux", test, key))
        summary[test] = {"direct_mbps": round(d, 1), "edgemux_mbps": round(e, 1), "ratio": round(e / d, 3),
                         "direct_rounds": [round(x, 1) for x in vals("direct", test, key)],
                         "edgemux_rounds": [round(x, 1) for x in vals("edgemux", test, key)]}
        print("%-52s %9.1f %9.1f %7.3f" % (label, d, e, e / d))
    print()
    print("CPU seconds per GB of tunnel payload (both directions summed), medians:")
    who = ("haproxy", "edgemux", "platform-sim", "edge-sim", "driver")
    print("%-8s %-8s " % ("test", "path") + " ".join("%12s" % w for w in who))
    for test, _, _ in tests:
        for path in paths:
            m = {w: round(median(cpu(path, test, w)), 2) for w in who}
            summary[test]["cpu_s_per_gb_" + path] = m
            print("%-8s %-8s " % (test, path) + " ".join("%12.2f" % m[w] for w in who))
    print()
    print("Share of a core in use during the transfer (medians): relays = HAProxy + edgemux, "
          "sims = platform-sim + edge-sim + this driver")
    for test, _, _ in tests:
        for path in paths:
            sh = [r[test]["core_share"] for r in res["rounds"] if r["path"] == path and test in r]
            rel, sim = median([x["relays"] for x in sh]), median([x["sims_and_driver"] for x in sh])
            sb = median([x.get("server_cpu_busy", float("nan")) for x in sh])
            lb = median([x.get("load_cpu_busy", float("nan")) for x in sh])
            summary[test]["core_share_" + path] = {"relays": rel, "sims_and_driver": sim,
                                                   "server_cpu_busy": sb, "load_cpu_busy": lb}
            busy = ("   (all processes: server cpu %.2f busy, load cpu %.2f busy)" % (sb, lb)
                    if a.server_cpu is not None else "")
            print("%-8s %-8s relays %.2f  sims %.2f%s" % (test, path, rel, sim, busy))
    res["summary"] = summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--build", help="a build tree: binaries and plugins taken from it")
    ap.add_argument("--emx", help="the edgemux binary")
    ap.add_argument("--plugins", help="edgemux's plugin directory")
    ap.add_argument("--psim", help="the platform-sim binary")
    ap.add_argument("--edge-sim", help="the edge-sim binary")
    ap.add_argument("--haproxy", default=shutil.which("haproxy") or "/usr/sbin/haproxy", help="the haproxy binary")
    ap.add_argument("--haproxy-cfg", default=os.path.join(ROOT, "haproxy-conf", "bench-tunnel.cfg"),
                    help="front ends direct (PSIM_FRONT_PORT -> PSIM_PORT) and edges (EDGE_PORT -> EMX1_PORT)")
    ap.add_argument("--instances", type=int, default=1, help="platform-sim instances (default 1; the "
                    "direct front end reaches the first, which owns every tunnel)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of both paths, alternating (default 3)")
    ap.add_argument("--size", type=int, default=64, help="MiB per single-tunnel transfer (default 64)")
    ap.add_argument("--many", type=int, default=20, help="tunnels at once (default 20; 0: skip)")
    ap.add_argument("--many-devices", type=int, default=5, help="devices per round (default 5)")
    ap.add_argument("--many-size", type=int, default=8, help="MiB per tunnel in the many test (default 8)")
    ap.add_argument("--idle", type=int, default=200, help="idle tunnels for memory (default 200; 0: skip)")
    ap.add_argument("--idle-devices", type=int, default=10, help="devices for the idle tunnels (default 10)")
    ap.add_argument("--server-cpu", type=int, default=0, help="CPU for HAProxy and edgemux (-1: no pinning)")
    ap.add_argument("--load-cpu", type=int, default=1, help="CPU for platform-sim, edge-sim and this program")
    ap.add_argument("--timeout", type=float, default=120, help="seconds per transfer")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--emx-log", default="warn", help="edgemux log level (default warn)")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (logs, configs)")
    a = ap.parse_args()
    if a.build:
        b = os.path.abspath(a.build)
        a.emx = a.emx or os.path.join(b, "module", "edgemux")
        a.plugins = a.plugins or os.path.join(b, "plugins")
        a.psim = a.psim or os.path.join(b, "tools", "platform-sim", "platform-sim")
        a.edge_sim = a.edge_sim or os.path.join(b, "tools", "edge-sim", "edge-sim")
    for k in ("emx", "plugins", "psim", "edge_sim"):
        if not getattr(a, k) or not os.path.exists(getattr(a, k)):
            ap.error("--%s missing or not found (or give --build)" % k.replace("_", "-"))
    if a.server_cpu < 0:
        a.server_cpu = a.load_cpu = None
    else:
        os.sched_setaffinity(0, {a.load_cpu})
    if a.size < a.many_size:
        ap.error("--size must be at least --many-size")

    tmp = tempfile.mkdtemp(prefix="tunnel-bench-")
    st = Stack(a, tmp)
    ok = False
    try:
        st.start()
        print("tunnel bench: %d round(s); %d MiB per single-tunnel transfer; %d tunnels x %d MiB over %d "
              "devices; %d idle tunnels over %d devices; chunksize %d; platform-sim %d instance(s); "
              "relays on cpu %s, the rest on cpu %s" % (
                  a.rounds, a.size, a.many, a.many_size, a.many_devices, a.idle, a.idle_devices, CHUNK,
                  a.instances, a.server_cpu, a.load_cpu), flush=True)
        bench = Bench(st, a)
        res = bench.results
        res["conditions"] = {k: getattr(a, k) for k in ("rounds", "size", "many", "many_devices", "many_size",
                                                        "idle", "idle_devices", "server_cpu", "load_cpu",
                                                        "instances")}
        res["conditions"]["chunksize"] = CHUNK
        if a.idle:
            # direct first: HAProxy's figure is then taken on a fresh
            # process (in the edgemux path it reuses what it freed)
            for path in ("direct", "edgemux"):
                bench.memory(path)
        for r in range(1, a.rounds + 1):
            for path in (("direct", "edgemux") if r % 2 else ("edgemux", "direct")):
                bench.round(r, path)
        if a.rounds:
            table(res, a)
        for m in res.get("memory", []):
            for i, c in enumerate(m["cycles"], 1):
                for k, v in c["bytes_per_tunnel"].items():
                    if (m["path"], k) in (("direct", "haproxy"), ("edgemux", "edgemux")):
                        print("memory per idle tunnel, %s path, %s, cycle %d: %d B RSS, %d B Pss_Anon "
                              "(%d tunnels)" % (m["path"], k, i, v["rss"], v["pss_anon"], m["tunnels"]))
        _, totals = st.tunnels()
        res["platform_sim_totals"] = totals
        res["platform_sim_violations"] = st.stats().get("violations_by_kind")
        res["edgemux_log_warnings"] = [l for l in st.emx.output().splitlines() if "error" in l.lower()][:20]
        print("platform-sim: %s tunnels, wrong_instance %s, unknown_tid %s, bad_base64_from_device %s; "
              "violations %s" % (totals.get("count"), totals.get("wrong_instance"), totals.get("unknown_tid"),
                                 totals.get("bad_base64_from_device"), res["platform_sim_violations"]))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        ok = True
    finally:
        st.stop()
        if a.keep or not ok:
            print("logs in", tmp, file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
