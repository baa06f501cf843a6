"""Large instance sets (issue: a discovery source with thousands of
instances stalled the loop and ran the process out of files):
discovery.max_instances refuses a larger set and keeps the last good one,
a set whose pipes would eat the open-file budget is refused the same way,
and a large accepted set opens its pipes a few at a time while /health and
the devices keep being served.

With several worker loops (server.workers) every worker opens
pipes_per_instance pipes to every instance, and the open-file limit is the
process's: a set is weighed by the pipes of all workers (pipes() per
instance) against the same process-wide budget, so 1/N as many instances
fit. The tests keep the process's pipe counts of the single loop and take
1/N of the instances."""

import os
import resource
import time
import unittest

from harness import (GET, SUCCESS, WORKERS, E2ETest, Edgemux, Platform, ao_parse, ao_request,
                     closed_ports, pipes, wait_until)


def write_instances(path, ports):
    lines = ["instances:"]
    for p in ports:
        lines += ["  - address: 127.0.0.1", "    port: %d" % p]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.rename(tmp, path)


class LargeSets(E2ETest):
    def instances(self, emx):
        import json
        code, body = emx.http("/instances")
        self.assertEqual(code, 200)
        return json.loads(body)

    def request_ok(self, emx, rid):
        e = emx.edge(app_key=self.env.app_key)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        t0 = time.monotonic()
        e.send(ao_request(GET, rid, sid))
        self.assertEqual(ao_parse(e.recv())[0], SUCCESS)
        e.close()
        return time.monotonic() - t0

    def test_max_instances_refuses_and_keeps_last_good_set(self):
        plat = Platform(self.env, 1)
        emx = Edgemux(self.env, "emx-max", plat.ports, start=False)
        with open(emx.config_path) as f:
            text = f.read()
        with open(emx.config_path, "w") as f:
            f.write(text.replace("  reload_delay: 50ms\n", "  reload_delay: 50ms\n  max_instances: 5\n"))
        emx.start()
        emx.wait_ready()
        too_many = plat.ports + closed_ports(5, plat.ports)
        write_instances(emx.instances_file, too_many)
        wait_until(lambda: "more than discovery.max_instances (5)" in emx.log(), 10,
                   what="refusal logged")
        self.assertIn("set of 6 instances refused", emx.log())
        self.assertEqual(len(self.instances(emx)["instances"]), 1)  # the last good set
        self.request_ok(emx, 3)
        write_instances(emx.instances_file, too_many[:5])
        wait_until(lambda: len(self.instances(emx)["instances"]) == 5, 10, what="5 instances")

    def test_pipes_over_file_budget_refused(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 1024:
            self.skipTest("hard open-file limit %d below 1024" % hard)
        plat = Platform(self.env, 1)
        # edgemux inherits 1024 open files: (1024 - 256) / 2 = 384 pipes, 192
        # instances at 2 pipes each; with N workers 2 * N pipes each (the
        # budget is the process's, not a worker's).
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        try:
            emx = Edgemux(self.env, "emx-budget", plat.ports)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        emx.wait_ready()
        write_instances(emx.instances_file, plat.ports + closed_ports(299, plat.ports))
        wait_until(lambda: "exceed the open-file budget" in emx.log(), 10, what="budget refusal")
        self.assertIn("set of 300 instances refused: its %d pipes (%d per instance%s) exceed the "
                      "open-file budget of 384" % (300 * pipes(), pipes(),
                                                   ", all workers" if WORKERS > 1 else ""),
                      emx.log())
        self.assertEqual(len(self.instances(emx)["instances"]), 1)
        if WORKERS > 1:
            # 151 instances fit one loop (302 pipes) but not N of them: the
            # process would hold 151 * pipes() pipes.
            write_instances(emx.instances_file, plat.ports + closed_ports(150, plat.ports))
            wait_until(lambda: "set of 151 instances refused: its %d pipes" % (151 * pipes())
                       in emx.log(), 10, what="budget refusal of 151 instances")
            self.assertEqual(len(self.instances(emx)["instances"]), 1)
        # About 300 pipes of the process: accepted.
        n = 1 + 150 // WORKERS
        write_instances(emx.instances_file, plat.ports + closed_ports(n - 1, plat.ports))
        wait_until(lambda: len(self.instances(emx)["instances"]) == n, 10, what="%d instances" % n)
        self.request_ok(emx, 4)

    def test_large_set_keeps_the_loop_serving(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 2 * 6000 + 256:  # pipes get half
            self.skipTest("hard open-file limit %d too low for 6,000 pipes" % hard)
        plat = Platform(self.env, 20)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
        try:
            emx = Edgemux(self.env, "emx-large", plat.ports[:1],
                          overrides={"platform": {"pipes_per_instance": 2, "reconnect_max": "5s"}},
                          start=False)
            with open(emx.config_path) as f:
                text = f.read()
            with open(emx.config_path, "w") as f:
                f.write(text.replace("  reload_delay: 50ms\n",
                                     "  reload_delay: 50ms\n  max_instances: 3000\n"))
            emx.start()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        emx.wait_ready()
        # 20 live instances among 3,000: 6,000 pipes, most refused at once
        # and retried with backoff. With N workers 3,000 / N instances make
        # the same 6,000 pipes of the process (3,000 would need 6,000 * N
        # files of the limit's half: the set would be refused).
        count = 6000 // pipes()
        write_instances(emx.instances_file, plat.ports + closed_ports(count - 20, plat.ports))
        worst = 0.0
        t_end = time.monotonic() + 8
        while time.monotonic() < t_end:
            t0 = time.monotonic()
            code, _ = emx.http("/health")
            worst = max(worst, time.monotonic() - t0)
            self.assertEqual(code, 200)
            time.sleep(0.05)
        # Unbounded, the connects stall the loop past the 2 s the admin call
        # waits; the margin is for sanitizer builds and tests run in parallel.
        self.assertLess(worst, 1.0, "/health took %.3f s at worst" % worst)
        self.assertLess(self.request_ok(emx, 5), 1.5)
        wait_until(lambda: len(self.instances(emx)["instances"]) == count, 10,
                   what="%d instances" % count)
        # Every live instance gets its pipes (every worker's).
        wait_until(lambda: all(n >= pipes() for n in plat.pipes_connected()), 30, what="live pipes")
        self.assertEqual(emx.proc.stop(), 0)


if __name__ == "__main__":
    unittest.main()
