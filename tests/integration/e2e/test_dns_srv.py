"""DNS SRV discovery end to end: the real edgemux with the dns-srv plugin,
a knotd of the test's own (config, rundir and control socket in the test's
temp dir, 127.0.0.1:<free port>), platform-sim and edge-sim. The SRV records
are changed with knotc while edgemux runs: instances join and leave, a backup
priority tier gets pipes but no traffic, an NXDOMAIN empties the set only
after empty_confirm, and a DNS outage keeps every healthy pipe.

With several worker loops (server.workers) the one dns-srv plugin (worker 0)
hands every answer to every worker: pipe counts are per worker (pipes()),
an instance that joins has every worker's pipes and one that leaves is
drained by every worker."""

import os
import re
import shutil
import subprocess
import tempfile
import time
import unittest

from discovery_workers import by_every_worker, every_worker_piped
from harness import (SLACK, E2ETest, Edgemux, Platform, Proc, check_ledger, edge_sim, free_port, pipes,
                     wait_until)

KNOTD = shutil.which("knotd") or "/usr/sbin/knotd"
KNOTC = shutil.which("knotc") or "/usr/sbin/knotc"
ZONE = "example.test"
NAME = "_tw._tcp." + ZONE


class Knot:
    """A knotd serving ZONE from a zone file written here; edits go through
    knotc transactions, never the file."""

    def __init__(self, env, records, cleanup):
        self.env = env
        self.dir = env.path("knot")
        os.makedirs(os.path.join(self.dir, "db"))
        self.sock = os.path.join(self.dir, "knot.sock")
        if len(self.sock) > 100:  # sun_path holds 108 bytes: a long TMPDIR gives way
            short = tempfile.mkdtemp(prefix="emx-knot-", dir="/tmp")
            cleanup(shutil.rmtree, short, True)
            self.sock = os.path.join(short, "knot.sock")
        with open(os.path.join(self.dir, ZONE + ".zone"), "w") as f:
            f.write("$ORIGIN %s.\n$TTL 1\n@ 1 SOA ns admin 1 60 60 600 1\n@ 1 NS ns\n"
                    "ns 1 A 127.0.0.1\n" % ZONE)
            for r in records:
                f.write(r + "\n")
        self.start()

    def start(self):
        for _ in range(5):
            self.port = free_port()
            conf = os.path.join(self.dir, "knot.conf")
            with open(conf, "w") as f:
                f.write('server:\n    rundir: "%s"\n    listen: 127.0.0.1@%d\n'
                        'database:\n    storage: "%s/db"\n'
                        'control:\n    listen: "%s"\n'
                        'log:\n  - target: stderr\n    any: info\n'
                        'template:\n  - id: default\n    storage: "%s"\n    zonefile-sync: -1\n'
                        'zone:\n  - domain: %s\n    file: "%s.zone"\n'
                        % (self.dir, self.port, self.dir, self.sock, self.dir, ZONE, ZONE))
            self.proc = Proc([KNOTD, "-c", conf], self.env.path("knotd.log"))
            self.env.procs.append(self.proc)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.proc.alive():
                if self.knotc("status", check=False) == 0:
                    return
                time.sleep(0.05)
            self.proc.kill()
        raise AssertionError("knotd did not start:\n" + self.proc.output())

    def knotc(self, *args, check=True):
        r = subprocess.run([KNOTC, "-s", self.sock, "-t", "5"] + list(args), capture_output=True,
                           timeout=30)
        if check and r.returncode != 0:
            raise AssertionError("knotc %s: %s" % (" ".join(args), (r.stdout + r.stderr).decode()))
        return r.returncode

    def txn(self, *ops):
        """ops: ("set", owner, ttl, type, rdata...) or ("unset", owner, [type, rdata...])."""
        self.knotc("zone-begin", ZONE)
        try:
            for op in ops:
                verb = "zone-set" if op[0] == "set" else "zone-unset"
                self.knotc(verb, ZONE, *[str(x) for x in op[1:]])
        except AssertionError:
            self.knotc("zone-abort", ZONE, check=False)
            raise
        self.knotc("zone-commit", ZONE)

    def stop(self):
        self.proc.stop(5)


def srv(port, prio=0, weight=1, target="i"):
    return ("set", "_tw._tcp", 1, "SRV", prio, weight, port, target)


# How long DNS stays down in the last phase (a minute, as for every source).
DOWN_SECONDS = float(os.environ.get("EMX_DNS_DOWN_SECONDS", "60"))


@unittest.skipUnless(os.access(KNOTD, os.X_OK), "knotd is not installed (scripts/deps.sh)")
class DnsSrvDiscovery(E2ETest):

    def test_instances_follow_srv_records(self):
        plat = Platform(self.env, 3)
        p = plat.ports
        n = pipes()  # per instance, every worker
        knot = Knot(self.env, ["i 1 A 127.0.0.1",
                               "_tw._tcp 1 SRV 0 1 %d i" % p[0],
                               "_tw._tcp 1 SRV 0 1 %d i" % p[1]], self.addCleanup)
        emx = Edgemux(self.env, "emx-dns", [], discovery={
            "plugin": "dns-srv",
            "names": "[%s.]" % NAME,
            "resolvers": '["127.0.0.1:%d"]' % knot.port,
            "timeout": "300ms",
            "tries": 1,
            "retry_min": "200ms",
            "retry_max": "1s",
            "empty_confirm": "2s",
        })
        emx.wait_ready()
        wait_until(lambda: plat.pipes_connected() == [n, n, 0], 10,
                   what="pipes to the two instances in DNS")
        self.assertIn("instance i.example.test:%d added (127.0.0.1:%d" % (p[0], p[0]), emx.log())

        def traffic():
            before = plat.msgs_in()
            rc, out, ledger = edge_sim(self.env, emx.edge_port, "--edges", 2, "--rate", 25,
                                       "--duration", "1s", "--drain", "3s")
            self.assertEqual(rc, 0, out)
            check_ledger(self, ledger, out)
            return [a - b for a, b in zip(plat.msgs_in(), before)]

        got = traffic()
        self.assertGreater(got[0], 0, got)
        self.assertGreater(got[1], 0, got)
        self.assertEqual(got[2], 0, got)

        # A backup tier (priority 1): pipes, but no traffic while tier 0 is up.
        knot.txn(srv(p[2], prio=1, weight=0))
        wait_until(lambda: plat.pipes_connected() == [n, n, n], 4 * SLACK,
                   what="pipes to the backup instance within TTL + 1 s and a connect")
        self.assertTrue(every_worker_piped(plat, 2, emx.name), plat.stats())
        got = traffic()
        self.assertEqual(got[2], 0, "the backup tier took traffic: %r" % got)

        # An instance removed from DNS is drained and its pipes closed.
        knot.txn(("unset", "_tw._tcp", "SRV", 0, 1, p[0], "i"))
        wait_until(lambda: plat.pipes_connected() == [0, n, n], 5 * SLACK,
                   what="the removed instance's pipes closed")
        self.assertTrue(by_every_worker(emx.log(), "i.example.test:%d (127.0.0.1:%d) left discovery"
                                        % (p[0], p[0])), emx.log())
        self.assertRegex(emx.log(), r"instance i\.example\.test:%d .*left discovery" % p[0])
        got = traffic()
        self.assertEqual(got[0], 0, got)
        self.assertGreater(got[1], 0, got)

        # NXDOMAIN: an answer, applied only once it has lasted empty_confirm.
        knot.txn(("unset", "_tw._tcp"))
        wait_until(lambda: "discovery reports no instances" in emx.log(), 4,
                   what="the empty answer reported")
        self.assertEqual(plat.pipes_connected(), [0, n, n], "emptied before empty_confirm")
        wait_until(lambda: plat.pipes_connected() == [0, 0, 0], 6 * SLACK,
                   what="the empty set applied after empty_confirm")
        knot.txn(srv(p[0]), srv(p[1]))
        wait_until(lambda: plat.pipes_connected() == [n, n, 0], 6 * SLACK, what="instances back")
        emx.wait_ready()

        # DNS down: the source fails, the last good set is kept, pipes stay.
        knot.stop()
        wait_until(lambda: re.search(r"discovery source failed \(%s: SRV query: " % re.escape(NAME),
                                     emx.log()), 5, what="the DNS failure reported")
        # ... and stays down for a minute (EMX_DNS_DOWN_SECONDS): nothing changes.
        deadline = time.monotonic() + DOWN_SECONDS
        while time.monotonic() < deadline:
            self.assertEqual(plat.pipes_connected(), [n, n, 0])
            self.assertEqual(emx.http("/ready")[0], 200)
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        got = traffic()
        self.assertGreater(got[0] + got[1], 0, got)
        self.assertEqual(plat.pipes_connected(), [n, n, 0])
        self.assertEqual(emx.http("/ready")[0], 200)
        self.assertNotIn("left discovery", emx.log().split("discovery source failed")[-1])


if __name__ == "__main__":
    unittest.main()
