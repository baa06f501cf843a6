"""ZooKeeper discovery end to end: a real ZooKeeper server (Debian's
zookeeper package), platform-sim instances registered as ThingWorx does
(Curator records in ephemeral znodes under /services/thingworx-http), and
the real edgemux with the zookeeper plugin. An instance registered at the
source carries traffic within a second; a removed one is drained; the source
stopped for a while (EMX_ZK_DOWN_SECONDS, default 60) changes nothing.

With several worker loops (server.workers) the one ZooKeeper session
(worker 0) hands every set to every worker: within the second every worker
has its pipes to an added instance, and a removed one is drained by every
worker. SLACK stretches the second in sanitizer builds only."""

import json
import os
import socket
import subprocess
import time
import unittest

from discovery_workers import by_every_worker, every_worker_piped
from harness import (GET, SLACK, SUCCESS, E2ETest, Edgemux, Platform, Proc, ao_request, free_port,
                     pipes, wait_until)

ZK_JAR = os.environ.get("EMX_ZOOKEEPER_JAR", "/usr/share/java/zookeeper.jar")
DOWN_SECONDS = float(os.environ.get("EMX_ZK_DOWN_SECONDS", "60"))
SERVICE = "/services/thingworx-http"
JAVA = ["java", "-Xms32m", "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"]


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class ZooKeeper:
    """A standalone server on a free loopback port, data in the test's dir."""

    def __init__(self, env):
        self.env = env
        self.port = free_port()
        self.dir = env.path("zookeeper")
        os.makedirs(self.dir, exist_ok=True)
        self.cfg = os.path.join(self.dir, "zoo.cfg")
        with open(self.cfg, "w") as f:
            f.write("tickTime=500\ndataDir=%s/data\nclientPort=%d\nclientPortAddress=127.0.0.1\n"
                    "admin.enableServer=false\nmaxSessionTimeout=60000\n" % (self.dir, self.port))
        self.start()

    def start(self):
        self.proc = Proc(JAVA + ["-Dzookeeper.admin.enableServer=false", "-cp", ZK_JAR,
                                 "org.apache.zookeeper.server.quorum.QuorumPeerMain", self.cfg],
                         self.env.path("zookeeper-%d.log" % len(self.env.procs)))
        self.env.procs.append(self.proc)
        wait_until(lambda: port_open(self.port) or not self.proc.alive(), 30, what="zookeeper up")
        if not self.proc.alive():
            raise AssertionError("zookeeper exited:\n" + self.proc.output())

    def stop(self):
        self.proc.stop()

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port


class Registrar:
    """ZooKeeper's own CLI holding one session: its ephemeral znodes live as
    long as it runs, like a platform's registration."""

    def __init__(self, env, zk):
        self.log_path = env.path("registrar.log")
        self.log = open(self.log_path, "wb")
        self.args = JAVA + ["-cp", ZK_JAR, "org.apache.zookeeper.ZooKeeperMain", "-server", zk.address]
        self.p = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=self.log,
                                  stderr=subprocess.STDOUT)
        env.procs.append(self)
        wait_until(lambda: "SyncConnected" in self.output(), 20, what="registrar session")

    def output(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def run(self, line, expect):
        self.p.stdin.write((line + "\n").encode())
        self.p.stdin.flush()
        wait_until(lambda: expect in self.output(), 10, what="registrar: %s" % line)

    def mkdirs(self):
        for path in ("/services", SERVICE):
            self.p.stdin.write(('create %s ""\n' % path).encode())
        self.p.stdin.flush()
        self.run("ls /services", "[thingworx-http]")

    def register(self, node, port):
        rec = {"name": "thingworx-http", "id": node, "address": "127.0.0.1", "port": port,
               "sslPort": None, "payload": None, "registrationTimeUTC": int(time.time() * 1000),
               "serviceType": "DYNAMIC", "uriSpec": None}
        self.run("create -e %s/%s %s" % (SERVICE, node, json.dumps(rec, separators=(",", ":"))),
                 "Created %s/%s" % (SERVICE, node))

    def remove(self, node, remaining):
        self.p.stdin.write(("delete %s/%s\n" % (SERVICE, node)).encode())
        self.run("ls %s" % SERVICE, "[%s]" % ", ".join(sorted(remaining)))

    def stop(self, timeout=5):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(timeout)
        self.p.stdin.close()
        self.log.close()

    kill = stop


@unittest.skipUnless(os.path.exists(ZK_JAR), "zookeeper package not installed")
class ZooKeeperDiscovery(E2ETest):
    def setup(self, registered):
        self.plat = Platform(self.env, 3)
        self.zk = ZooKeeper(self.env)
        self.reg = Registrar(self.env, self.zk)
        self.reg.mkdirs()
        for i in registered:
            self.reg.register("p%d" % i, self.plat.ports[i])
        self.emx = Edgemux(self.env, "emx-zk", [],
                           discovery={"plugin": "zookeeper", "connection_string": self.zk.address,
                                      "base_path": "/services", "service": "thingworx-http",
                                      "session_timeout": "4s"},
                           overrides={"platform": {"request_timeout": "4s", "all_down_grace": "1s"},
                                      "edge": {"drain_spread": "100ms"}})
        self.emx.wait_ready()
        want = [pipes() if i in registered else 0 for i in range(3)]
        wait_until(lambda: self.plat.pipes_connected() == want, 10, what="pipes %r" % want)
        self.e = self.emx.edge(app_key=self.env.app_key)
        self.addCleanup(self.e.close)
        code, self.sid = self.e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        self.rid = 1

    def burst(self, n, timeout=5):
        """n GETs at once, all answered SUCCESS; returns msgs_in deltas."""
        before = self.plat.msgs_in()
        rids = []
        for _ in range(n):
            self.rid += 1
            rids.append(self.rid)
            self.e.send(ao_request(GET, self.rid, self.sid))
        got = self.e.answers(lambda g: all(r in g for r in rids), timeout=timeout)
        for r in rids:
            self.assertEqual(got[r], [SUCCESS], (r, got))
        return [a - b for a, b in zip(self.plat.msgs_in(), before)]

    def test_added_instance_gets_traffic_within_a_second(self):
        self.setup([0, 1])
        self.assertEqual(self.burst(30)[2], 0)
        t0 = time.monotonic()
        self.reg.register("p2", self.plat.ports[2])
        # every worker's pipes (each worker its own identity), not only
        # those of the worker holding the edge
        wait_until(lambda: every_worker_piped(self.plat, 2, self.emx.name), 1.0 * SLACK,
                   what="every worker's pipes to the new instance")
        d = self.burst(30)
        took = time.monotonic() - t0
        self.assertGreaterEqual(d[2], 5, "the new instance gets no traffic: %r" % d)
        self.assertLess(took, 2.0 * SLACK)
        self.assertIn("added p2", self.emx.log())

    def test_removed_instance_drained(self):
        self.setup([0, 1, 2])
        port = self.plat.ports[1]
        self.reg.remove("p1", ["p0", "p2"])
        wait_until(lambda: by_every_worker(self.emx.log(), "127.0.0.1:%d) left discovery: draining" % port),
                   5, what="instance p1 draining (every worker)")
        d = self.burst(30)
        self.assertEqual(d[1], 0, "new requests reached the removed instance: %r" % d)
        wait_until(lambda: self.plat.pipes_connected()[1] == 0, 5, what="drained pipes closed")
        self.assertTrue(by_every_worker(self.emx.log(), "127.0.0.1:%d) drained and removed" % port),
                        self.emx.log())
        self.assertEqual(self.plat.pipes_connected(), [pipes(), 0, pipes()])
        self.assertEqual(self.plat.stats()["violations"], 0)

    def test_source_down_changes_nothing(self):
        self.setup([0, 1])
        self.zk.stop()
        wait_until(lambda: "connection to ZooKeeper lost" in self.emx.log(), 10,
                   what="the failure reported")
        deadline = time.monotonic() + DOWN_SECONDS
        while time.monotonic() < deadline:
            d = self.burst(10)
            self.assertEqual(sum(d), 10)
            self.assertEqual(self.plat.pipes_connected(), [pipes(), pipes(), 0])
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        self.assertNotIn("left discovery", self.emx.log())
        d = self.burst(30)
        self.assertGreater(d[0], 0)
        self.assertGreater(d[1], 0)


if __name__ == "__main__":
    unittest.main()
