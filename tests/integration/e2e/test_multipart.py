"""Multipart requests (rule 6): a 1 MiB request arrives whole at one
instance; one whose pinned pipe dies midway gets exactly one 0xA0 and none
of its chunks reaches another instance."""

import unittest

from harness import (GET, INTERNAL_ERROR, PUT, SUCCESS, E2ETest, Edgemux, Platform,
                     ao_multipart_request, ao_request, check_ledger, edge_sim, pipes, wait_until)

MIB = 1024 * 1024


class Multipart(E2ETest):
    def cluster(self, overrides=None):
        self.plat = Platform(self.env, 3)
        ov = {"platform": {"request_timeout": "4s", "all_down_grace": "1s"},
              "edge": {"drain_spread": "100ms"}}
        for k, v in (overrides or {}).items():
            ov.setdefault(k, {}).update(v)
        self.emx = Edgemux(self.env, "emx-mp", self.plat.ports, overrides=ov)
        self.emx.wait_ready()
        n = pipes(int(ov["platform"].get("pipes_per_instance", 2)))
        wait_until(lambda: self.plat.pipes_connected() == [n, n, n], 10,
                   what="every pipe connected")

    def authed_edge(self):
        e = self.emx.edge(app_key=self.env.app_key)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        return e, sid

    def test_1mib_multipart_arrives_whole_at_one_instance(self):
        self.cluster()
        e, sid = self.authed_edge()
        chunks = ao_multipart_request(PUT, 2, sid, MIB)
        self.assertGreater(len(chunks), 128)
        before = self.plat.msgs_in()
        for c in chunks:
            e.send(c)
        got = e.answers(lambda g: 2 in g, timeout=15)
        self.assertEqual(got[2], [SUCCESS])  # platform-sim reassembled and echoed it
        after = self.plat.msgs_in()
        deltas = sorted(a - b for a, b in zip(after, before))
        self.assertEqual(deltas, [0, 0, len(chunks)], "chunks spread over instances")
        st = self.plat.stats()
        self.assertEqual(st["violations"], 0, st["violations_by_kind"])
        self.assertEqual(e.quiet_for(0.3), [])

    def test_edge_sim_1mib_multipart_ledger(self):
        self.cluster()
        before = self.plat.msgs_in()
        reqs_before = sum(self.plat.stats()["requests_by_code"].values())
        rc, out, ledger = edge_sim(self.env, self.emx.edge_port, "--edges", 2, "--rate", 1,
                                   "--duration", "2s", "--drain", "10s", "--multipart-share", "100%",
                                   "--multipart-size", "1MiB")
        self.assertEqual(rc, 0, out)
        codes = check_ledger(self, ledger, out)
        self.assertEqual(set(codes), {SUCCESS}, codes)
        multi = [x for x in ledger if x["multipart"]]
        self.assertGreater(len(multi), 0, out)
        # The edges' AUTH and BIND, and edgemux's UNBIND when they left.
        wait_until(lambda: self.plat.stats()["things_bound"] == 0, 5, what="edges unbound")
        single = sum(self.plat.stats()["requests_by_code"].values()) - reqs_before - len(multi)
        deltas = [a - b for a, b in zip(self.plat.msgs_in(), before)]
        # Every multipart request is the same number of chunks, all at one
        # instance: each instance's count is k * chunks + its share of the
        # single messages.
        per = (sum(deltas) - single) // len(multi)
        self.assertEqual(per * len(multi) + single, sum(deltas), (deltas, len(multi), single))
        self.assertGreater(per, 128)
        self.assertEqual(sum(d % per for d in deltas), single, (deltas, per))
        self.assertEqual(self.plat.stats()["violations"], 0)

    def test_pipe_dies_midway_one_a0_no_chunk_elsewhere(self):
        self.cluster()
        e, sid = self.authed_edge()
        chunks = ao_multipart_request(PUT, 2, sid, 64 * 1024)
        self.assertGreater(len(chunks), 4)
        before = self.plat.msgs_in()
        e.send(chunks[0])
        deltas = wait_until(lambda: [a - b for a, b in zip(self.plat.msgs_in(), before)]
                            if sum(self.plat.msgs_in()) > sum(before) else None, 5,
                            what="chunk 1 at an instance")
        self.assertEqual(sorted(deltas), [0, 0, 1])
        pinned = deltas.index(1) + 1
        e.send(chunks[1])  # chunk 2 follows on the pinned pipe
        wait_until(lambda: self.plat.msgs_in()[pinned - 1] - before[pinned - 1] == 2, 5,
                   what="chunk 2 at the pinned instance")
        self.assertEqual(self.plat.cmd("crash %d" % pinned), "ok")
        got = e.answers(lambda g: 2 in g, timeout=5)
        self.assertEqual(got[2], [INTERNAL_ERROR])
        others = [i for i in range(3) if i != pinned - 1]
        mid = self.plat.msgs_in()
        for c in chunks[2:]:  # the rest of the message: discarded
            e.send(c)
        e.send(ao_request(GET, 3, sid))  # the edge goes on
        e.answers(lambda g: 3 in g, timeout=5, into=got)
        self.assertEqual(got[3], [SUCCESS])
        e.answers_for(0.5, into=got)
        self.assertEqual(got[2], [INTERNAL_ERROR], "more than one answer to the broken multipart")
        after = self.plat.msgs_in()
        # Only the GET reached a surviving instance; no chunk did.
        self.assertEqual(sum(after[i] - mid[i] for i in others), 1, (mid, after))
        st = self.plat.stats()
        self.assertEqual(st["violations"], 0, st["violations_by_kind"])
        self.assertNotIn("0x02", st["requests_by_code"], "a PUT was reassembled somewhere")
        self.plat.cmd("restore %d" % pinned)

    def test_pinned_pipe_stalled_past_pin_wait_one_a0(self):
        # The pinned instance stops reading. A multipart request still
        # arriving cannot stall its pipe (the platform cannot answer it yet),
        # but a GET it leaves unanswered does (stall_after); the next chunk
        # then waits multipart_pin_wait, and gets one 0xA0.
        self.cluster({"platform": {"stall_after": "300ms", "multipart_pin_wait": "500ms",
                                   "pipes_per_instance": 1}})
        e, sid = self.authed_edge()
        chunks = ao_multipart_request(PUT, 2, sid, 40 * 1024)
        before = self.plat.msgs_in()
        e.send(chunks[0])
        deltas = wait_until(lambda: [a - b for a, b in zip(self.plat.msgs_in(), before)]
                            if sum(self.plat.msgs_in()) > sum(before) else None, 5,
                            what="chunk 1 at an instance")
        pinned = deltas.index(1) + 1
        self.assertEqual(self.plat.cmd("stop-reading %d" % pinned), "ok")
        got = e.answers_for(0.5)  # the upload alone does not stall the pipe
        self.assertEqual(got, {})
        for rid in (10, 11, 12):  # round robin: one of them to the pinned instance
            e.send(ao_request(GET, rid, sid))
        e.answers(lambda g: len([r for r in (10, 11, 12) if r in g]) >= 2, timeout=5, into=got)
        e.answers_for(0.4, into=got)  # past stall_after for the unanswered one
        for c in chunks[1:]:
            e.send(c)
        e.answers(lambda g: 2 in g, timeout=5, into=got)
        self.assertEqual(got[2], [INTERNAL_ERROR])
        self.assertEqual(self.plat.cmd("resume-reading %d" % pinned), "ok")
        e.send(ao_request(GET, 3, sid))
        e.answers(lambda g: 3 in g and all(r in g for r in (10, 11, 12)), timeout=8, into=got)
        e.answers_for(0.5, into=got)
        self.assertEqual(got[2], [INTERNAL_ERROR])
        self.assertEqual(got[3], [SUCCESS])
        for rid in (10, 11, 12):
            self.assertEqual(len(got[rid]), 1, "one answer per request")
        after = self.plat.msgs_in()
        self.assertEqual(sum(after) - sum(before), 5, "chunks after the first were forwarded")


if __name__ == "__main__":
    unittest.main()
