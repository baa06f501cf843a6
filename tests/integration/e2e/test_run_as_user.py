"""server.user: edgemux opens its sockets as root, then runs as that user,
and still serves (discovery reads its file after the switch)."""

import os
import pwd
import unittest

from harness import GET, SUCCESS, E2ETest, Edgemux, Platform, ao_parse, ao_request


@unittest.skipUnless(os.geteuid() == 0, "needs root to switch users")
class RunAsUser(E2ETest):
    def test_runs_as_nobody_after_binding(self):
        nobody = pwd.getpwnam("nobody")
        os.chmod(self.env.dir, 0o755)  # the instances file is read after the switch
        plat = Platform(self.env, 1)
        emx = Edgemux(self.env, "emx-user", plat.ports, start=False,
                      overrides={"server": {"user": "nobody"}})
        os.chmod(emx.instances_file, 0o644)
        emx.start()
        emx.wait_ready()
        with open("/proc/%d/status" % emx.proc.pid) as f:
            uids = [l.split()[1:] for l in f if l.startswith(("Uid:", "Gid:"))]
        self.assertEqual(uids[0], [str(nobody.pw_uid)] * 4)
        self.assertEqual(uids[1], [str(nobody.pw_gid)] * 4)
        self.assertIn("running as nobody", emx.log())
        e = emx.edge(app_key=self.env.app_key)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        e.send(ao_request(GET, 2, sid))
        self.assertEqual(ao_parse(e.recv())[0], SUCCESS)
        e.close()
        self.assertEqual(emx.proc.stop(), 0)

    def test_unknown_user_refused_at_start(self):
        plat = Platform(self.env, 1)
        emx = Edgemux(self.env, "emx-nouser", plat.ports, start=False,
                      overrides={"server": {"user": "no-such-user-here"}})
        from harness import Proc, EMX_BIN
        p = Proc([EMX_BIN, "-c", emx.config_path], self.env.path("nouser.log"))
        self.env.procs.append(p)
        self.assertNotEqual(p.p.wait(20), 0)
        self.assertIn("no-such-user-here", p.output())


if __name__ == "__main__":
    unittest.main()
