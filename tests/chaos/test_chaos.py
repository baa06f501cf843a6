"""Chaos suite (DESIGN §7, issue 6 part 1): 500 edges send requests without
pause through HAProxy -> 2 edgemux -> 3 platform instances while the test, in
turn, kills and restarts platforms, cuts one off in a network namespace,
stops one with SIGSTOP, kills an edgemux, takes the discovery source away and
takes every platform down at once. After each phase the edge-sim ledgers
must show every request with exactly one outcome, connection_lost only where
an edgemux was killed under the edge, only the answers the outcomes table
allows, no crash, and each edgemux's RSS within 10% of its RSS after a
warm-up cycle.

Topology
  - 3 platform-sim processes, one instance each, so one can be SIGKILLed or
    SIGSTOPped. They share no session table, so they run with
    --any-session (they stand for one cluster that shares it). Platform 3
    runs in a network namespace the test creates (veth pair) when the test
    runs as root; otherwise on loopback and the namespace phase is skipped.
  - 2 edgemux with static discovery, behind HAProxy (haproxy-conf/demo.cfg).
  - Every phase runs one generation of edge-sim processes (the ledger is
    written when edge-sim exits): 300 edges through HAProxy, and 100 edges
    pinned to each edgemux's port, so the ledger tells which edgemux an edge
    was on where it matters (phase 4).

The phases are test methods run in order on one cluster (setUpClass). Each
one is bounded in seconds. Everything the suite creates (processes, by PID;
the namespace and veth pair; the temp dir) is removed at the end, also on
failure (class cleanup, atexit, SIGTERM); on failure the tail of every log
is printed first (EMX_CHAOS_KEEP=1 keeps the temp dir).
"""

import atexit
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration", "e2e"))

import harness  # noqa: E402
from harness import (EDGE_SIM, PLATFORM_SIM, Edgemux, Env, HAProxy, Proc, free_port,  # noqa: E402
                     wait_until)

SUCCESS, INTERNAL_ERROR, SERVICE_UNAVAILABLE, GATEWAY_TIMEOUT = 0x40, 0xA0, 0xA3, 0xA4
# Platform answers (platform-sim answers SUCCESS to AUTH, BIND and every
# request of a bound edge) and the answers edgemux itself may give when an
# instance fails: no eligible instance, pipe closed, request timeout.
ALLOWED = {SUCCESS, INTERNAL_ERROR, SERVICE_UNAVAILABLE, GATEWAY_TIMEOUT}

EDGES_HAPROXY = 300
EDGES_PINNED = 100  # per edgemux
RATE = 2  # requests per second per edge: about 1000 requests/s in all
REQUEST_TIMEOUT_S = 3
IDLE_READ_TIMEOUT_S = 4
RSS_SLACK = 0.10
# platform-sim delays every answer this long, so that each fault finds
# requests in flight (about 20 of them at 1000 requests/s).
LATENCY_MS = 20

OVERRIDES = {
    "log": {"level": "info"},
    "platform": {"request_timeout": "%ds" % REQUEST_TIMEOUT_S, "stall_after": "500ms",
                 # Longer than the all-down phase (about 5 s): edges ride
                 # through it with 0xA0 answers instead of a 1013 close,
                 # whose crossing with a request in flight no server can
                 # avoid (no data frame may follow a close frame).
                 "all_down_grace": "15s", "connect_timeout": "2s",
                 "reconnect_min": "100ms", "reconnect_max": "1s"},
    # The ws plugin's own pipe options (lws pings after 1 s of silence and
    # hangs up after 4 s): how a platform cut off by the network is found.
    "transport": {"ping_interval": "1s", "idle_read_timeout": "%ds" % IDLE_READ_TIMEOUT_S},
}


def log(msg):
    sys.stdout.write("[chaos %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stdout.flush()


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


def metrics(emx):
    """{(name, labels): value} of an edgemux's /metrics."""
    status, body = emx.http("/metrics")
    if status != 200:
        return {}
    out = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def metric(emx, name, **labels):
    """Sum of a metric over the samples whose labels include `labels`
    (instance_contains: a part of the instance label). Raises when no
    sample matches, so a renamed metric or label cannot pass as 0."""
    total, found = 0.0, False
    for (n, lab), v in metrics(emx).items():
        if n == name and all(('instance="' in lab and val in lab) if k == "instance_contains"
                             else '%s="%s"' % (k, val) in lab for k, val in labels.items()):
            total += v
            found = True
    if not found:
        raise AssertionError("%s: no sample of %s%r in /metrics" % (emx.name, name, labels))
    return total


def run(args, check=True):
    r = subprocess.run(args, capture_output=True, timeout=20)
    if check and r.returncode != 0:
        raise RuntimeError("%s: %s" % (" ".join(args), (r.stdout + r.stderr).decode(errors="replace")))
    return r.returncode


# ---------------------------------------------------------------- namespace

class NetNS:
    """A network namespace joined to the host by a veth pair; `cut()` sets
    the namespace's end down (iproute2), `mend()` up again.

    The far end, not the host end: with the host end down its route goes
    away and packets to the platform follow the host's default route
    instead (on a host whose default route leads to a proxy, connections
    were even answered, 404). With the far end down the host end loses its
    carrier but keeps its route, so packets go into a dead link and are
    lost, as in a real partition: pings go unanswered, connects time out."""

    def __init__(self):
        pid = os.getpid()
        self.name = "emxchaos%d" % pid
        self.host_if = "emxc%dh" % (pid % 10000000)
        self.ns_if = "emxc%dn" % (pid % 10000000)
        a, b = 100 + pid % 100, (pid // 100) % 250
        self.host_ip = "10.%d.%d.1" % (a, b)
        self.ns_ip = "10.%d.%d.2" % (a, b)
        self.created_ns = self.created_link = False

    def create(self):
        run(["ip", "netns", "add", self.name])
        self.created_ns = True
        run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if])
        self.created_link = True
        run(["ip", "link", "set", self.ns_if, "netns", self.name])
        run(["ip", "addr", "add", self.host_ip + "/30", "dev", self.host_if])
        run(["ip", "link", "set", self.host_if, "up"])
        run(["ip", "netns", "exec", self.name, "ip", "addr", "add", self.ns_ip + "/30", "dev", self.ns_if])
        run(["ip", "netns", "exec", self.name, "ip", "link", "set", self.ns_if, "up"])
        run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"])

    def cut(self):
        run(["ip", "netns", "exec", self.name, "ip", "link", "set", self.ns_if, "down"])

    def mend(self):
        run(["ip", "netns", "exec", self.name, "ip", "link", "set", self.ns_if, "up"])

    def cleanup(self):
        if self.created_link:
            run(["ip", "link", "del", self.host_if], check=False)
            self.created_link = False
        if self.created_ns:
            run(["ip", "netns", "del", self.name], check=False)
            self.created_ns = False


# ---------------------------------------------------------------- platforms

class ChaosPlatform:
    """One platform-sim process serving one instance on a fixed port (so it
    can be restarted where edgemux expects it), controlled over a UNIX
    socket (reachable from inside a namespace too)."""

    def __init__(self, env, name, bind="127.0.0.1", port=None, netns=None):
        self.env, self.name, self.bind, self.netns = env, name, bind, netns
        self.port = port or free_port()
        self.ctl = env.path("%s.ctl" % name)
        self.starts = 0
        self.proc = None
        self.start()

    def start(self):
        if os.path.exists(self.ctl):
            os.unlink(self.ctl)
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        args = prefix + [PLATFORM_SIM, "--listen", str(self.port), "--bind", self.bind,
                         "--control", self.ctl, "--app-key-file", self.env.app_key_file,
                         "--any-session", "--latency", str(LATENCY_MS), "--quiet"]
        self.starts += 1
        self.proc = Proc(args, self.env.path("%s-%d.log" % (self.name, self.starts)))
        self.env.procs.append(self.proc)

        def ready():
            if not self.proc.alive():
                raise AssertionError("%s exited:\n%s" % (self.name, self.proc.output()))
            return "platform-sim ready" in self.proc.output()

        wait_until(ready, 10, what="%s ready" % self.name)

    def alive(self):
        return self.proc.alive()

    def kill(self):
        self.proc.kill()

    def cmd(self, line, timeout=5.0):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(self.ctl)
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

    def pipes(self):
        try:
            return self.stats()["instances"][0]["pipes_connected"]
        except (OSError, ValueError):
            return -1


# ---------------------------------------------------------------- edge-sim

class EdgeSim:
    """One edge-sim process: a long --duration, stopped with SIGINT (it then
    stops issuing, waits up to --drain for answers and writes its ledger)."""

    def __init__(self, env, label, port, edges):
        self.label, self.edges = label, edges
        self.ledger_path = env.path("ledger-%s-%d.json" % (label, time.monotonic_ns()))
        args = [EDGE_SIM, "--url", "ws://127.0.0.1:%d/Thingworx/WS" % port,
                "--app-key-file", env.app_key_file, "--edges", str(edges), "--rate", str(RATE),
                "--duration", "600s", "--drain", "%ds" % (REQUEST_TIMEOUT_S + 4),
                "--max-connect-delay", "500ms", "--retry-interval", "500ms",
                "--ledger", self.ledger_path]
        self.proc = Proc(args, env.path("edge-sim-%s-%d.log" % (label, time.monotonic_ns())))
        env.procs.append(self.proc)
        self.rc = self.out = self.ledger = None

    def ready(self):
        """Edges READY in the last progress line."""
        lines = re.findall(r"ready (\d+)/(\d+)", self.proc.output())
        return int(lines[-1][0]) if lines else 0

    def interrupt(self):
        self.proc.signal(signal.SIGINT)

    def finish(self, timeout=REQUEST_TIMEOUT_S + 15):
        try:
            self.proc.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("edge-sim %s did not finish within %ds" % (self.label, timeout))
        self.rc = self.proc.p.returncode
        self.proc.log.close()
        self.out = self.proc.output()
        if os.path.exists(self.ledger_path):
            with open(self.ledger_path) as f:
                self.ledger = json.load(f)


class Tally:
    """What one edge-sim ledger says."""

    def __init__(self, ledger):
        self.requests = len(ledger)
        self.outcomes, self.codes, self.lost_edges = {}, {}, {}
        self.by_edge = {}
        self.duplicates = []
        seen = set()
        for e in ledger:
            key = (e["edge"], e["request_id"])
            if key in seen:
                self.duplicates.append(e)
            seen.add(key)
            self.outcomes[e["outcome"]] = self.outcomes.get(e["outcome"], 0) + 1
            if e["outcome"] == "answered":
                self.codes[e["code"]] = self.codes.get(e["code"], 0) + 1
            elif e["outcome"] == "connection_lost":
                self.lost_edges.setdefault(e["edge"], []).append(e["request_id"])
            self.by_edge.setdefault(e["edge"], []).append(e)

    def describe(self):
        codes = ", ".join("0x%02X %d" % (c, n) for c, n in sorted(self.codes.items()))
        return "requests %d, outcomes %s, answers {%s}, edges with connection_lost %d" % (
            self.requests, dict(sorted(self.outcomes.items())), codes, len(self.lost_edges))


# ---------------------------------------------------------------- the suite

_CLEANUPS = []


def _run_cleanups():
    while _CLEANUPS:
        fn = _CLEANUPS.pop()
        try:
            fn()
        except Exception as e:  # keep cleaning up
            sys.stderr.write("chaos cleanup: %r\n" % (e,))


atexit.register(_run_cleanups)


def _on_sigterm(signum, frame):
    _run_cleanups()
    sys.exit(128 + signum)


class Chaos(unittest.TestCase):
    env = None
    failed = False
    results = {}

    @classmethod
    def setUpClass(cls):
        signal.signal(signal.SIGTERM, _on_sigterm)
        cls.env = Env()
        _CLEANUPS.append(cls._teardown_all)
        cls.addClassCleanup(_run_cleanups)
        try:
            cls._set_up_cluster()
        except BaseException:
            cls.failed = True  # print the logs' tails in the cleanup
            raise

    @classmethod
    def _set_up_cluster(cls):
        cls.netns = None
        cls.netns_why = None
        if os.geteuid() != 0:
            cls.netns_why = "not root: ip netns needs root; the network-cut phase is skipped"
        else:
            ns = NetNS()
            cls.netns = ns  # cleaned up even if create() fails half way
            try:
                ns.create()
            except (RuntimeError, OSError) as e:
                ns.cleanup()
                cls.netns = None
                cls.netns_why = "cannot create a network namespace: %s" % e
        if cls.netns_why:
            log("SKIP namespace phase: " + cls.netns_why)
        t0 = time.monotonic()
        env = cls.env
        cls.plats = [ChaosPlatform(env, "platform-1"), ChaosPlatform(env, "platform-2")]
        if cls.netns:
            cls.plats.append(ChaosPlatform(env, "platform-3", bind=cls.netns.ns_ip, port=9001,
                                           netns=cls.netns.name))
        else:
            cls.plats.append(ChaosPlatform(env, "platform-3"))
        cls.emx = []
        for name in ("emx-1", "emx-2"):
            e = Edgemux(env, name, [p.port for p in cls.plats], overrides=OVERRIDES, start=False)
            cls.write_instances(e)
            e.start()
            cls.emx.append(e)
        for e in cls.emx:
            e.wait_ready()
        cls.wait_all_pipes()
        cls.haproxy = HAProxy(env, cls.emx[0], cls.emx[1])
        cls.baseline = {}
        cls.killed_emx = set()
        log("cluster up in %.1fs (platform ports %s%s)" % (
            time.monotonic() - t0, [p.port for p in cls.plats],
            ", platform-3 at %s in namespace %s" % (cls.netns.ns_ip, cls.netns.name) if cls.netns else ""))

    @classmethod
    def write_instances(cls, emx):
        lines = ["instances:"]
        for p in cls.plats:
            lines += ["  - address: %s" % p.bind, "    port: %d" % p.port]
        tmp = emx.instances_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.rename(tmp, emx.instances_file)

    @classmethod
    def wait_all_pipes(cls, timeout=15):
        """Every platform holds both pipes of every edgemux."""
        want = 2 * len(cls.emx)
        try:
            wait_until(lambda: all(p.pipes() == want for p in cls.plats), timeout, interval=0.2,
                       what="pipes")
        except AssertionError:
            raise AssertionError("not every platform has %d pipes after %ds: %r" % (
                want, timeout, [p.pipes() for p in cls.plats]))

    @classmethod
    def _teardown_all(cls):
        env = cls.env
        if env is None:
            return
        # A stopped process would ignore SIGTERM: continue them all first.
        for p in env.procs:
            if p.alive():
                try:
                    p.p.send_signal(signal.SIGCONT)
                except OSError:
                    pass
        if cls.failed:
            for p in env.procs:
                if "edge-sim" in p.args[0] and p.p.returncode == 0:
                    continue  # a clean generation: its numbers are in the output above
                out = p.output() if hasattr(p, "output") else ""
                print("\n--- %s (last 20 lines)\n%s" % (" ".join(p.args[:3]), "\n".join(out.splitlines()[-20:])))
        # The temp dir goes also on failure (the tails are printed above);
        # EMX_CHAOS_KEEP=1 keeps it for a closer look.
        keep = cls.failed and os.environ.get("EMX_CHAOS_KEEP") == "1"
        env.cleanup(keep=keep)
        if cls.netns:
            cls.netns.cleanup()
        if keep:
            print("chaos: logs kept in", env.dir)
        cls.env = None

    def setUp(self):
        self.t_start = time.monotonic()
        sys.stdout.write("\n")  # after unittest's "test_x ... " so each log line is whole

    def tearDown(self):
        result = getattr(self._outcome, "result", None)
        if result is not None and (result.failures or result.errors or
                                   getattr(result, "unexpectedSuccesses", None)):
            type(self).failed = True
        log("%s took %.1fs" % (self.id().split(".")[-1], time.monotonic() - self.t_start))

    # ------------------------------------------------------------ helpers

    def live_emx(self):
        return [e for i, e in enumerate(self.emx) if i not in self.killed_emx]

    def generation(self, label, haproxy=EDGES_HAPROXY, pinned=EDGES_PINNED, pinned_to=(0, 1)):
        gens = []
        if haproxy:
            gens.append(EdgeSim(self.env, "%s-haproxy" % label, self.haproxy.edge_port, haproxy))
        for i in pinned_to:
            gens.append(EdgeSim(self.env, "%s-emx%d" % (label, i + 1), self.emx[i].edge_port, pinned))
        self.track(gens)
        self.wait_gens_ready(gens)
        return gens

    def track(self, gens):
        """A phase that fails half way must not leave its edges running."""
        def kill_left():
            for g in gens:
                if g.proc.alive():
                    g.proc.kill()
        self.addCleanup(kill_left)

    def wait_gens_ready(self, gens, timeout=20):
        try:
            wait_until(lambda: all(g.ready() >= g.edges for g in gens), timeout, interval=0.2,
                       what="every edge READY")
        except AssertionError:
            raise AssertionError("edges not READY after %ds: %r" % (
                timeout, [(g.label, g.ready(), g.edges) for g in gens]))

    def finish(self, gens):
        for g in gens:
            g.interrupt()
        for g in gens:
            g.finish()
        return gens

    def check_gens(self, phase, gens, allowed=ALLOWED, may_lose=()):
        """The ledger checks common to every phase. may_lose: labels of the
        generations whose edges may have lost their connection (phase 4)."""
        tallies = {}
        for g in gens:
            self.assertIsNotNone(g.ledger, "%s wrote no ledger:\n%s" % (g.label, g.out))
            t = Tally(g.ledger)
            tallies[g.label] = t
            lat = re.search(r"latency: (p50 [\d.]+ ms, p99 [\d.]+ ms, max [\d.]+ ms)", g.out or "")
            log("  %-22s %s%s" % (g.label, t.describe(), "; latency " + lat.group(1) if lat else ""))
            self.assertGreater(t.requests, 0, g.out)
            self.assertEqual(t.duplicates, [], "requests listed twice by %s" % g.label)
            self.assertEqual(t.outcomes.get("no_answer", 0), 0,
                             "%s: requests without an outcome (no_answer)\n%s" % (g.label, g.out))
            self.assertIn("no_answer 0", g.out)
            if g.label not in may_lose:
                self.assertEqual(t.outcomes.get("connection_lost", 0), 0,
                                 "%s: connection_lost on edges whose edgemux was not killed: %r\n%s"
                                 % (g.label, sorted(t.lost_edges.items())[:10], g.out))
            bad = {("0x%02X" % c): n for c, n in t.codes.items() if c not in allowed}
            self.assertEqual(bad, {}, "%s: answers the outcomes table does not allow here\n%s"
                             % (g.label, g.out))
            m = re.search(r"unexpected answers (\d+), bad messages (\d+), wrong endpointId (\d+)", g.out)
            self.assertIsNotNone(m, g.out)
            self.assertEqual(m.groups(), ("0", "0", "0"), "%s: server misbehaviour seen by edges\n%s"
                             % (g.label, g.out))
            self.assertEqual(g.rc, 0, "%s exited %r\n%s" % (g.label, g.rc, g.out))
        self.results[phase] = {k: {"requests": t.requests, "outcomes": t.outcomes,
                                   "codes": {"0x%02X" % c: n for c, n in sorted(t.codes.items())},
                                   "edges_lost": len(t.lost_edges)} for k, t in tallies.items()}
        return tallies

    def check_recovered(self, tallies):
        """Every edge that got an error answer got a platform answer to a
        later request: the fault ended for it within the phase."""
        for label, t in tallies.items():
            stuck = []
            for edge, entries in t.by_edge.items():
                errs = [e["request_id"] for e in entries
                        if e["outcome"] == "answered" and e["code"] != SUCCESS]
                if errs and not any(e["request_id"] > max(errs) and e["outcome"] == "answered"
                                    and e["code"] == SUCCESS for e in entries):
                    stuck.append(edge)
            self.assertEqual(stuck, [], "%s: edges that saw no platform answer after their last error"
                             % label)

    def check_alive(self, phase):
        for i, e in enumerate(self.emx):
            if i in self.killed_emx:
                continue
            self.assertTrue(e.proc.alive(), "%s died (status %r) in %s:\n%s" % (
                e.name, e.proc.p.returncode, phase, "\n".join(e.log().splitlines()[-40:])))
        self.assertTrue(self.haproxy.proc.alive(), "haproxy died:\n" + self.haproxy.proc.output()[-3000:])
        for p in self.plats:
            self.assertTrue(p.alive(), "%s died (exit status %r):\n%s" % (p.name, p.proc.p.returncode, p.proc.output()[-3000:]))

    def check_platforms_clean(self):
        for p in self.plats:
            st = p.stats()
            self.assertEqual(st["violations"], 0, "%s saw contract violations: %r" % (
                p.name, st.get("violations_by_kind")))

    def check_rss(self, phase):
        rss = {}
        for i, e in enumerate(self.emx):
            if i in self.killed_emx or e.name not in self.baseline:
                continue
            now = rss_kib(e.proc.pid)
            base = self.baseline[e.name]
            rss[e.name] = (base, now)
            log("  %s RSS %d KiB (after warm-up %d KiB, %+.1f%%)" % (e.name, now, base, 100.0 * (now - base) / base))
        self.results.setdefault(phase, {})["rss_kib"] = rss
        for name, (base, now) in rss.items():
            self.assertLessEqual(now, base * (1 + RSS_SLACK),
                                 "%s RSS grew from %d KiB after warm-up to %d KiB after %s"
                                 % (name, base, now, phase))

    def after_phase(self, phase):
        self.check_alive(phase)
        self.wait_all_pipes()
        self.check_platforms_clean()
        self.check_rss(phase)

    def need_baseline(self):
        if not self.baseline:
            self.skipTest("the warm-up did not complete: no RSS baseline")
        self.heal()

    def heal(self):
        """A phase starts from a whole cluster even when the one before
        failed half way: anything dead is started again (and reported)."""
        healed = []
        for p in self.plats:
            if not p.alive():
                healed.append("%s (exit status %r)" % (p.name, p.proc.p.returncode))
                p.start()
        for i, e in enumerate(self.emx):
            if not e.proc.alive():
                healed.append("%s (exit status %r)" % (e.name, e.proc.p.returncode))
                self.baseline.pop(e.name, None)  # a new process: no warm-up baseline
                e.start()
                e.wait_ready()
        type(self).killed_emx = set()
        if healed:
            log("  started again before this phase: " + ", ".join(healed))
            self.wait_all_pipes()
            time.sleep(1.5)  # HAProxy's check (inter 1s, rise 1) sees them

    # ------------------------------------------------------------ phases

    def test_0_warm_up(self):
        """A warm-up cycle: the heaviest edge load either edgemux carries in
        the phases (its own edges plus its sibling's) on each, with no fault.
        RSS afterwards is the baseline."""
        gens = [EdgeSim(self.env, "warmup-emx%d" % (i + 1), e.edge_port, EDGES_HAPROXY + EDGES_PINNED * 2)
                for i, e in enumerate(self.emx)]
        self.track(gens)
        self.wait_gens_ready(gens)
        time.sleep(6)
        self.finish(gens)
        self.check_gens("warm-up", gens, allowed={SUCCESS})
        self.check_alive("warm-up")
        self.check_platforms_clean()
        time.sleep(0.5)
        for e in self.emx:
            type(self).baseline[e.name] = rss_kib(e.proc.pid)
            log("  %s RSS after warm-up %d KiB" % (e.name, self.baseline[e.name]))

    def test_1_platform_kill_restart(self):
        """SIGKILL a platform and start it again on its port, every 2.5 s, each
        in turn: in-flight requests get 0xA3, the rest go to the others."""
        self.need_baseline()
        gens = self.generation("kill")
        time.sleep(2)
        for p in self.plats:
            log("  SIGKILL %s (pid %d)" % (p.name, p.proc.pid))
            p.kill()
            time.sleep(1.5)
            p.start()
            time.sleep(1.0)
        time.sleep(3)
        self.finish(gens)
        t = self.check_gens("1 platform kill/restart", gens)
        self.check_recovered(t)
        self.assertGreater(sum(x.codes.get(SERVICE_UNAVAILABLE, 0) + x.codes.get(INTERNAL_ERROR, 0)
                               for x in t.values()), 0, "no request was in flight on a killed platform?")
        self.after_phase("phase 1")

    def test_2_network_cut(self):
        """Cut platform 3 off (its veth end down) for 7 s: edgemux finds
        it by the pipes' ping and idle read timeout; in-flight requests get
        0xA4 or 0xA3; then the link comes back and the pipes reconnect."""
        if not self.netns:
            self.skipTest(self.netns_why)
        self.need_baseline()
        gens = self.generation("cut")
        time.sleep(2)
        addr = self.netns.ns_ip
        for e in self.emx:
            self.assertEqual(metric(e, "emx_pipes", instance_contains=addr, state="up"), 2,
                             "%s: pipes to %s not up before the cut" % (e.name, addr))
        log("  link %s down (in %s)" % (self.netns.ns_if, self.netns.name))
        self.netns.cut()
        t_cut = time.monotonic()
        try:
            # Both edgemux give up the cut instance's pipes.
            def gone():
                return all(metric(e, "emx_pipes", instance_contains=addr, state="up") == 0
                           for e in self.emx)

            wait_until(gone, IDLE_READ_TIMEOUT_S + 5, interval=0.2, what="pipes to the cut platform closed")
            log("  pipes to %s closed after %.1fs" % (addr, time.monotonic() - t_cut))
            time.sleep(max(0.0, 7 - (time.monotonic() - t_cut)))
        finally:
            self.netns.mend()
            log("  link %s up" % self.netns.ns_if)
        time.sleep(4)
        self.finish(gens)
        self.check_recovered(self.check_gens("2 network cut", gens))
        self.after_phase("phase 2")

    def test_3_platform_sigstop(self):
        """SIGSTOP platform 2 for 2.5 s (under the idle read timeout): its pipes
        stall, edgemux stops sending to it after stall_after, its in-flight
        requests get 0xA4; SIGCONT and it is used again."""
        self.need_baseline()
        gens = self.generation("stop")
        time.sleep(2)
        p = self.plats[1]
        inst = "127.0.0.1:%d" % p.port
        log("  SIGSTOP %s" % p.name)
        p.proc.p.send_signal(signal.SIGSTOP)
        try:
            time.sleep(1.0)  # past stall_after (500 ms)
            routed = [metric(e, "emx_instance_requests_total", instance_contains=inst) for e in self.emx]
            writable = [metric(e, "emx_pipe_writable", instance_contains=inst) for e in self.emx]
            time.sleep(1.5)
            routed2 = [metric(e, "emx_instance_requests_total", instance_contains=inst) for e in self.emx]
        finally:
            p.proc.p.send_signal(signal.SIGCONT)
            log("  SIGCONT %s" % p.name)
        log("  requests routed to the stopped instance between 1 s and 2.5 s: %r; writable pipes %r"
            % ([b - a for a, b in zip(routed, routed2)], writable))
        time.sleep(4)
        self.finish(gens)
        t = self.check_gens("3 platform SIGSTOP", gens)
        self.results["3 platform SIGSTOP"]["routed_while_stalled"] = [b - a for a, b in zip(routed, routed2)]
        # Rule 2: a pipe with requests pending that received nothing for
        # stall_after takes no new request until it receives again.
        self.assertEqual(writable, [0, 0], "pipes of the stopped platform still writable")
        self.assertEqual(routed, routed2, "requests were routed to the stalled instance")
        self.assertGreater(sum(x.codes.get(SUCCESS, 0) for x in t.values()), 0)
        self.after_phase("phase 3")

    def test_4_edgemux_kill(self):
        """SIGKILL edgemux 1: HAProxy's check moves its edges, which reconnect
        to edgemux 2 with their backoff. connection_lost only for edges that
        were on edgemux 1: all of the ones pinned to it may; of the ones
        through HAProxy, no more than edgemux 1 held; none pinned to
        edgemux 2. Then edgemux 1 is started again (and warmed up)."""
        self.need_baseline()
        gens = self.generation("emxkill")
        time.sleep(2)
        victim = self.emx[0]
        held = metric(victim, "emx_edges_connected")
        log("  SIGKILL %s (pid %d) holding %d edges" % (victim.name, victim.proc.pid, held))
        victim.proc.kill()
        type(self).killed_emx = {0}
        time.sleep(8)
        self.finish(gens)
        by = {g.label: g for g in gens}
        t = self.check_gens("4 edgemux kill", gens, may_lose=("emxkill-haproxy", "emxkill-emx1"))
        lost_h = len(t["emxkill-haproxy"].lost_edges)
        lost_1 = len(t["emxkill-emx1"].lost_edges)
        log("  edges with connection_lost: %d through HAProxy, %d pinned to %s (held %d)"
            % (lost_h, lost_1, victim.name, held))
        self.assertLessEqual(lost_h + lost_1, held,
                             "more edges lost their connection than the killed edgemux held")
        # The HAProxy edges that were on edgemux 1 came back through edgemux 2.
        stranded = []
        for edge, rids in t["emxkill-haproxy"].lost_edges.items():
            last_lost = max(rids)
            if not any(e["request_id"] > last_lost and e["outcome"] == "answered" and e["code"] == SUCCESS
                       for e in t["emxkill-haproxy"].by_edge[edge]):
                stranded.append(edge)
        self.assertEqual(stranded, [], "HAProxy edges that never got an answer after losing edgemux 1")
        self.assertIsNotNone(by["emxkill-haproxy"].out)
        # Restart edgemux 1 (a new boot id) and warm it up alone.
        self.check_alive("phase 4")
        victim.start()
        victim.wait_ready()
        type(self).killed_emx = set()
        self.wait_all_pipes()
        w = [EdgeSim(self.env, "rewarm-emx1", victim.edge_port, EDGES_HAPROXY + EDGES_PINNED * 2)]
        self.track(w)
        self.wait_gens_ready(w)
        time.sleep(4)
        self.finish(w)
        self.check_gens("4b re-warm-up", w, allowed={SUCCESS})
        time.sleep(0.5)
        type(self).baseline[victim.name] = rss_kib(victim.proc.pid)
        log("  %s restarted; RSS after its warm-up %d KiB" % (victim.name, self.baseline[victim.name]))
        # HAProxy sees it again before the next phase.
        time.sleep(1.5)
        self.after_phase("phase 4")

    def test_5_discovery_source_gone(self):
        """Remove the static instances file, then write an invalid one, then
        restore it: the source fails, the last good set stays, nothing
        changes: every request answered by a platform."""
        self.need_baseline()
        before = [metric(e, "emx_discovery_failures_total") for e in self.emx]
        gens = self.generation("discovery")
        time.sleep(1)
        for e in self.emx:
            os.unlink(e.instances_file)
        log("  instances files removed")
        time.sleep(4)
        for e in self.emx:
            with open(e.instances_file, "w") as f:
                f.write("instances:\n  - address: [not yaml\n    port: banana\n")
        log("  instances files invalid")
        time.sleep(4)
        for e in self.emx:
            pipes = metric(e, "emx_pipes", state="up")
            self.assertEqual(pipes, 2 * len(self.plats), "%s lost pipes while its source failed" % e.name)
        for e in self.emx:
            self.write_instances(e)
        log("  instances files restored")
        time.sleep(2)
        self.finish(gens)
        after = [metric(e, "emx_discovery_failures_total") for e in self.emx]
        log("  discovery failures counted: %r -> %r" % (before, after))
        self.check_gens("5 discovery source gone", gens, allowed={SUCCESS})
        for b, a in zip(before, after):
            self.assertGreater(a, b, "the failing source was not counted")
        self.after_phase("phase 5")

    def test_6_all_platforms_down(self):
        """SIGKILL all three platforms, keep them down 4 s, start them again:
        in flight 0xA3, then 0xA0 while none is up, then platform answers."""
        self.need_baseline()
        gens = self.generation("alldown")
        time.sleep(2)
        for p in self.plats:
            p.kill()
        log("  every platform killed")
        wait_until(lambda: all(e.http("/ready")[0] == 503 for e in self.emx), 5,
                   what="/ready 503 with no platform")
        time.sleep(4)
        for p in self.plats:
            p.start()
        log("  every platform started again")
        for e in self.emx:
            e.wait_ready()
        time.sleep(4)
        self.finish(gens)
        t = self.check_gens("6 all platforms down", gens)
        self.check_recovered(t)
        self.assertGreater(sum(x.codes.get(INTERNAL_ERROR, 0) for x in t.values()), 0,
                           "no 0xA0 while every platform was down")
        self.after_phase("phase 6")

    def test_9_summary(self):
        """Prints the numbers of every phase (for docs/reliability.md) and
        checks that every edgemux still answers /health and exits cleanly."""
        for phase, r in self.results.items():
            log("%s: %s" % (phase, json.dumps(r, sort_keys=True)))
        for e in self.emx:
            self.assertEqual(e.http("/health")[0], 200, e.name)
        for e in self.emx:
            rc = e.proc.stop(15)
            self.assertEqual(rc, 0, "%s exited %r on SIGTERM:\n%s" % (e.name, rc, e.log()[-3000:]))


if __name__ == "__main__":
    unittest.main()
