"""The status page (GET / on the admin port) as an operator's browser shows
it: fetched and rendered by Debian's headless chromium while a cluster of
edgemux and platform-sim runs. The DOM must show every instance and the
numbers /instances and /metrics give at the same moment, an instance crash
must show as down, and a Thing name holding markup must come out as text.
Also the admin actions' protection: no token file, a wrong token or a
wrong Host (DNS rebinding) or Origin (a page elsewhere) are refused 403.

Chromium is in scripts/deps.sh; without the binary the browser tests are
skipped, saying so."""

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import unittest
from html.parser import HTMLParser

from harness import (GET, SUCCESS, WORKERS, E2ETest, Edgemux, Platform, ao_bind, ao_parse,
                     ao_request, pipes, wait_until)

from test_operations import metric, parse_metrics

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "chromium is not installed (Debian package chromium, see scripts/deps.sh)"

MARKUP_THING = "<img src=x onerror=alert(1)>"
MARKUP_THING2 = "\"><script>document.title='owned'</script>"


class Dom(HTMLParser):
    """The parts of the rendered page the tests read: every element's tag
    and attributes in order, the text of each element with an id or class
    of interest, and the instance and edge rows."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.tags = []          # (tag, attrs) of every start tag
        self.ids = {}           # id -> text inside
        self.rows = []          # {"attrs":..., "cells": {class: text}}
        self._stack = []        # open elements: [tag, attrs, text parts]
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag in ("meta", "link", "br", "img", "input"):
            return
        self._stack.append([tag, a, []])

    def handle_endtag(self, tag):
        while self._stack:
            t, a, parts = self._stack.pop()
            text = "".join(parts)
            for el in self._stack:
                el[2].append(text)
            if "id" in a:
                self.ids[a["id"]] = text
            if t == "td" and self._stack and self._stack[-1][0] == "tr":
                cls = a.get("class", "")
                self._stack[-1][1].setdefault("_cells", []).append((cls, text))
            if t == "tr" and a.get("class") in ("instance", "edge", "event", "answer", "worker"):
                self.rows.append(a)
            if t == tag:
                break

    def handle_data(self, data):
        if self._stack:
            self._stack[-1][2].append(data)

    def elements(self, tag):
        return [a for t, a in self.tags if t == tag]

    def rows_of(self, cls):
        return [r for r in self.rows if r.get("class") == cls]

    @staticmethod
    def cell(row, cls):
        for c, text in row.get("_cells", []):
            if cls in c.split():
                return text
        raise AssertionError("no cell %r in %r" % (cls, row))


class Browser:
    """Headless chromium with a profile of its own, killed by its PID when
    it overruns."""

    def __init__(self, env):
        self.env = env
        self.profile = tempfile.mkdtemp(prefix="chromium-", dir=env.dir)

    def run(self, url, *args, timeout=90):
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--disable-dev-shm-usage", "--user-data-dir=" + self.profile] \
            + list(args) + [url]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise AssertionError("chromium did not finish within %ds: %s" % (timeout, " ".join(args)))
        if p.returncode != 0:
            raise AssertionError("chromium exited %d:\n%s" % (p.returncode, err.decode(errors="replace")[-3000:]))
        return out.decode(errors="replace")

    def dom(self, url, *args):
        text = self.run(url, "--dump-dom", *args)
        with open(self.env.path("dom-%d.html" % time.monotonic_ns()), "w") as f:
            f.write(text)
        return text

    def screenshot(self, url, path):
        self.run(url, "--screenshot=" + path, "--window-size=1280,1800", "--hide-scrollbars")
        with open(path, "rb") as f:
            return f.read()


class StatusPage(E2ETest):
    def cluster(self, instances=3, **kw):
        self.plat = Platform(self.env, instances)
        self.emx = Edgemux(self.env, "emx-status", self.plat.ports, admin_token=True, **kw)
        self.emx.wait_ready()
        wait_until(lambda: all(n == pipes() for n in self.plat.pipes_connected()), 10,
                   what="every pipe connected")
        self.url = "http://127.0.0.1:%d/" % self.emx.admin_port

    def authed_edge(self):
        e = self.emx.edge(app_key=self.env.app_key)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        return e, sid

    def state(self):
        """/instances and /metrics, read twice: equal both times, so the
        page read in between saw the same numbers."""
        status, body = self.emx.http("/instances")
        self.assertEqual(status, 200)
        status, m = self.emx.http("/metrics")
        self.assertEqual(status, 200)
        status, edges = self.emx.http("/edges")
        self.assertEqual(status, 200)
        return json.loads(body)["instances"], parse_metrics(m), json.loads(edges)

    def stable_dom(self, browser, *args):
        """A rendering of the page with /instances and /metrics unchanged
        before and after it (the cluster is idle: they should be)."""
        for _ in range(5):
            before = self.state()
            text = browser.dom(self.url, *args)
            after = self.state()
            if before[0] == after[0] and self.comparable(before[1]) == self.comparable(after[1]):
                return text, Dom(text), after
            time.sleep(0.5)
        raise AssertionError("the cluster never stood still for a page load")

    @staticmethod
    def comparable(m):
        # uptime moves by itself; everything else should not
        return {k: v for k, v in m.items() if k[0] not in ("emx_uptime_seconds",
                                                           "emx_discovery_last_good_age_seconds")}

    def check_numbers(self, dom, instances, m, edges):
        rows = {r["data-instance"]: r for r in dom.rows_of("instance")}
        self.assertEqual(sorted(rows), sorted(i["id"] for i in instances),
                         "the page shows every instance /instances lists, and only those")
        self.assertEqual(int(dom.ids["instance-count"]), len(instances))
        for inst in instances:
            row = rows[inst["id"]]
            self.assertEqual(int(Dom.cell(row, "pipes-up")), inst["pipes_up"], inst["id"])
            self.assertEqual(int(Dom.cell(row, "writable")),
                             sum(p["writable"] for p in inst["pipes"]), inst["id"])
            self.assertEqual(int(Dom.cell(row, "queued")),
                             sum(p["queued"] for p in inst["pipes"]), inst["id"])
            self.assertEqual(int(Dom.cell(row, "pending")), inst["pending"], inst["id"])
            self.assertEqual(int(Dom.cell(row, "requests")), inst["requests"], inst["id"])
            self.assertEqual(int(Dom.cell(row, "requests")),
                             metric(m, "emx_instance_requests_total", instance=inst["id"]))
        self.assertEqual(int(dom.ids["edges-connected"]), metric(m, "emx_edges_connected"))
        self.assertEqual(int(dom.ids["edges-connected"]), edges["count"])
        self.assertEqual(int(dom.ids["edges-authenticated"]),
                         sum(e["state"] == "authed" for e in edges["edges"]))
        self.assertEqual(int(dom.ids["edges-pending"]), sum(e["pending"] for e in edges["edges"]))
        self.assertEqual(int(dom.ids["edges-accepted"]), metric(m, "emx_edges_accepted_total"))
        self.assertEqual(int(dom.ids["edges-closed"]), metric(m, "emx_edges_closed_total"))
        self.assertEqual(int(dom.ids["pipes-connected"]), metric(m, "emx_pipes_connected"))
        self.assertEqual(int(dom.ids["reloads-ok"]), metric(m, "emx_reloads_total", result="ok"))
        self.assertEqual(int(dom.ids["discovery-updates"]),
                         metric(m, "emx_discovery_updates_total", plugin="static"))
        self.assertEqual(int(dom.ids["workers"]), WORKERS)
        # the devices listed are every worker's: the newest 25 of /edges
        shown = sorted(r["data-endpoint"] for r in dom.rows_of("edge"))
        self.assertEqual(len(shown), min(edges["count"], 25))
        if edges["count"] <= 25:
            self.assertEqual(shown, sorted(e["endpointIdHex"] for e in edges["edges"]))
        # with several workers, each one's share, adding up to the totals
        workers = dom.rows_of("worker")
        self.assertEqual(len(workers), WORKERS if WORKERS > 1 else 0)
        if workers:
            self.assertEqual(sum(int(Dom.cell(r, "edges")) for r in workers),
                             metric(m, "emx_edges_connected"))
            self.assertEqual(sum(int(Dom.cell(r, "pipes")) for r in workers),
                             metric(m, "emx_pipes_connected"))
            for r in workers:
                self.assertEqual(int(Dom.cell(r, "edges")),
                                 metric(m, "emx_worker_edges_connected", worker=r["data-worker"]))
                self.assertEqual(int(Dom.cell(r, "pipes")),
                                 metric(m, "emx_worker_pipes_connected", worker=r["data-worker"]))
        for row in dom.rows_of("answer"):
            self.assertEqual(int(Dom.cell(row, "count")),
                             metric(m, "emx_answers_total", reason=row["data-reason"]),
                             row["data-reason"])
        self.assertEqual(len(dom.rows_of("answer")),
                         sum(1 for k in m if k[0] == "emx_answers_total"))

    @unittest.skipUnless(CHROMIUM, NO_CHROMIUM)
    def test_page_in_chromium_matches_instances_and_metrics(self):
        self.cluster()
        devices = []
        for names in ([MARKUP_THING], [MARKUP_THING2, "Plain.Thing"], []):
            e, sid = self.authed_edge()
            if names:
                e.send(ao_bind(2, sid, names))
                self.assertEqual(ao_parse(e.recv())[0], SUCCESS)
            for rid in range(3, 8):
                e.send(ao_request(GET, rid, sid))
                self.assertEqual(ao_parse(e.recv())[0], SUCCESS)
            devices.append(e)
        e.send(ao_request(0x30, 9, sid))  # edgemux answers it itself: 0x80
        e.recv()
        unauthed = self.emx.edge(app_key=self.env.app_key)  # connected, not authenticated
        browser = Browser(self.env)
        text, dom, (instances, m, edges) = self.stable_dom(browser)
        self.assertEqual(len(instances), 3)
        self.assertEqual(metric(m, "emx_edges_connected"), 4)
        self.check_numbers(dom, instances, m, edges)
        self.assertEqual(int(dom.ids["edges-authenticated"]), 3)
        self.assertEqual(int(Dom.cell([r for r in dom.rows_of("answer")
                                       if r["data-reason"] == "bad_request"][0], "count")), 1)
        for row in dom.rows_of("instance"):
            self.assertEqual(row["data-state"], "up")
        # the Thing names are text in the DOM, not elements
        things = [t for r in dom.rows_of("edge") for c, t in r.get("_cells", []) if c == "things"]
        self.assertIn(MARKUP_THING, things)
        self.assertTrue(any(MARKUP_THING2 in t for t in things), things)
        self.assertEqual(dom.elements("img"), [], "a Thing name became an <img> element")
        scripts = dom.elements("script")
        self.assertEqual(scripts, [{"src": "/status.js"}], "only the page's own script")
        self.assertIn("&lt;img src=x onerror=alert(1)&gt;", text)
        # had the second name's script run, it would have renamed the page
        self.assertEqual(re.search(r"<title>([^<]*)</title>", text).group(1), "edgemux emx-status")
        self.assertEqual(dom.ids["server-name"], "emx-status")
        self.assertIn("started", text)  # the events table
        self.assertNotIn(self.env.app_key, text)
        self.assertNotIn(self.emx.admin_token, text)
        # with JavaScript: the page refreshes itself (virtual time runs the timers)
        live = Dom(browser.dom(self.url, "--virtual-time-budget=12000"))
        refreshed = [a.get("data-refreshed") for t, a in live.tags if t == "html"][0]
        self.assertTrue(refreshed and int(refreshed) >= 1, "the script did not refresh the page")
        self.assertTrue(live.ids["live"].startswith("live:"), live.ids["live"])
        self.assertEqual(sorted(r["data-instance"] for r in live.rows_of("instance")),
                         sorted(i["id"] for i in instances))
        self.assertEqual(live.elements("img"), [])
        # without JavaScript the document as served is the page: a readable
        # snapshot (headless chromium dumps nothing with scripts off, so the
        # served HTML is parsed here as such a browser would show it)
        status, served = self.emx.http("/")
        self.assertEqual(status, 200)
        still = Dom(served)
        self.assertIsNone([a for t, a in still.tags if t == "html"][0].get("data-refreshed"))
        self.assertTrue(still.ids["live"].startswith("a snapshot"), still.ids["live"])
        self.check_numbers(still, *self.state())
        self.assertEqual(still.elements("img"), [])
        # and a screenshot an operator would see
        png = browser.screenshot(self.url, self.env.path("status.png"))
        self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
        self.assertGreater(len(png), 10000)
        for d in devices + [unauthed]:
            d.close()

    @unittest.skipUnless(CHROMIUM, NO_CHROMIUM)
    def test_instance_crash_shows_down(self):
        self.cluster()
        e, sid = self.authed_edge()
        browser = Browser(self.env)
        _, dom, _ = self.stable_dom(browser)
        self.assertEqual([r["data-state"] for r in dom.rows_of("instance")], ["up"] * 3)
        self.assertEqual(self.plat.cmd("crash 2"), "ok")

        def crashed():
            inst = json.loads(self.emx.http("/instances")[1])["instances"]
            return [i["id"] for i in inst if i["pipes_up"] == 0]

        down = wait_until(crashed, 10, what="an instance without pipes")
        self.assertEqual(len(down), 1)
        _, dom, (instances, m, edges) = self.stable_dom(browser)
        states = {r["data-instance"]: r["data-state"] for r in dom.rows_of("instance")}
        self.assertEqual(states[down[0]], "down")
        self.assertEqual(sorted(s for i, s in states.items() if i != down[0]), ["up", "up"])
        self.check_numbers(dom, instances, m, edges)
        row = [r for r in dom.rows_of("instance") if r["data-instance"] == down[0]][0]
        self.assertNotEqual(Dom.cell(row, "last-error").strip(), "", "the pipes' last error")
        events = [Dom.cell(r, "text") for r in dom.rows_of("event")]
        self.assertTrue(any(down[0] in t and "down" in t for t in events), events)
        # all of them down: the all-down event
        for n in (1, 3):
            self.assertEqual(self.plat.cmd("crash %d" % n), "ok")
        wait_until(lambda: self.emx.http("/ready")[0] == 503, 10, what="not ready")
        _, dom, _ = self.stable_dom(browser)
        self.assertEqual([r["data-state"] for r in dom.rows_of("instance")], ["down"] * 3)
        self.assertEqual(dom.ids["ready"], "not ready")
        self.assertTrue(any(r["data-kind"] == "all-down" and "no platform pipe" in Dom.cell(r, "text")
                            for r in dom.rows_of("event")))
        e.close()


def raw_request(port, method, path, headers):
    """One request with exactly these headers (Host included), over a
    plain socket client: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for k, v in headers:
        conn.putheader(k, v)
    conn.endheaders()
    r = conn.getresponse()
    body = r.read().decode()
    conn.close()
    return r.status, body


class AdminActions(E2ETest):
    def maintenance(self, emx):
        inst = json.loads(emx.http("/instances")[1])["instances"]
        return {i["id"]: i["maintenance"] for i in inst}

    def test_no_token_file_actions_off(self):
        plat = Platform(self.env, 1)
        emx = Edgemux(self.env, "emx-notoken", plat.ports)
        emx.wait_ready()
        iid = list(self.maintenance(emx))[0]
        status, body = emx.http("/instances/%s/maintenance" % iid, "POST",
                                headers={"Authorization": "Bearer whatever-0123456789"})
        self.assertEqual((status, body), (403, "admin actions are off (no admin.token_file)\n"))
        self.assertEqual(emx.http("/instances/%s/maintenance" % iid, "DELETE")[0], 403)
        self.assertEqual(emx.http("/edges/1/close", "POST")[0], 403)
        self.assertFalse(self.maintenance(emx)[iid])
        self.assertEqual(emx.http("/instances")[0], 200)  # GETs stay open
        self.assertEqual(emx.http("/")[0], 200)
        self.assertIn("admin actions off", emx.log())

    def test_token_host_and_origin(self):
        plat = Platform(self.env, 1)
        emx = Edgemux(self.env, "emx-token", plat.ports, admin_token=True)
        emx.wait_ready()
        iid = list(self.maintenance(emx))[0]
        port = emx.admin_port
        path = "/instances/%s/maintenance" % iid
        host = ("Host", "127.0.0.1:%d" % port)
        good = ("Authorization", "Bearer " + emx.admin_token)
        cases = [
            ("no token", [host]),
            ("wrong token", [host, ("Authorization", "Bearer " + emx.admin_token[:-1] + "x")]),
            ("token prefix", [host, ("Authorization", "Bearer " + emx.admin_token[:-1])]),
            ("other scheme", [host, ("Authorization", "Basic " + emx.admin_token)]),
            ("DNS rebinding: a name for the address", [("Host", "rebind.example:%d" % port), good]),
            ("another port", [("Host", "127.0.0.1:%d" % (port + 1)), good]),
            ("no Host", [good]),
            ("a page elsewhere", [host, ("Origin", "http://evil.example"), good]),
            ("a sandboxed page", [host, ("Origin", "null"), good]),
        ]
        for what, headers in cases:
            status, body = raw_request(port, "POST", path, headers)
            self.assertEqual(status, 403, what)
            self.assertNotIn(emx.admin_token, body)
        self.assertFalse(self.maintenance(emx)[iid], "a refused request changed something")
        # right token and Host: done (localhost names the loopback address too)
        self.assertEqual(raw_request(port, "POST", path, [host, good])[0], 200)
        self.assertTrue(self.maintenance(emx)[iid])
        status, _ = raw_request(port, "DELETE", path,
                                [("Host", "localhost:%d" % port), good,
                                 ("Origin", "http://localhost:%d" % port)])
        self.assertEqual(status, 200)
        self.assertFalse(self.maintenance(emx)[iid])
        # closing a device
        e = emx.edge(app_key=self.env.app_key)
        self.assertEqual(e.auth(self.env.app_key)[0], SUCCESS)
        dev = json.loads(emx.http("/edges")[1])["edges"][0]
        close = "/edges/%s/close?code=1001" % dev["endpointIdHex"]
        self.assertEqual(raw_request(port, "POST", close, [("Host", "evil:%d" % port), good])[0], 403)
        self.assertEqual(raw_request(port, "POST", close, [host, good])[0], 202)
        self.assertEqual(e.expect_close(), 1001)
        e.close()
        # the token is never shown or logged
        for p in ("/metrics", "/instances", "/edges", "/"):
            self.assertNotIn(emx.admin_token, emx.http(p)[1], p)
        self.assertNotIn(emx.admin_token, emx.log())
        # a reload reads the token file again
        new = "adm-rotated-" + emx.admin_token[4:]
        token_file = self.env.path("emx-token-admin-token")
        with open(token_file, "w") as f:
            f.write(new + "\n")
        emx.proc.signal(signal.SIGHUP)
        wait_until(lambda: "reload done" in emx.log(), 10, what="reload done")
        self.assertEqual(raw_request(port, "POST", path, [host, good])[0], 403)
        self.assertEqual(raw_request(port, "POST", path, [host, ("Authorization", "Bearer " + new)])[0],
                         200)
        self.assertNotIn(new, emx.log())

    def test_bad_token_file_refused(self):
        plat = Platform(self.env, 1)
        short = self.env.path("short-token")
        with open(short, "w") as f:
            f.write("abc\n")
        os.chmod(short, 0o600)
        emx = Edgemux(self.env, "emx-badtoken", plat.ports, start=False,
                      overrides={"admin": {"token_file": short}})
        r = subprocess.run([os.environ.get("EMX_BIN", "edgemux"), "-t", "-c", emx.config_path],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertRegex(r.stderr + r.stdout,
                         r"emx-badtoken\.yaml:\d+: admin\.token_file: the token in .* at least 16")
        self.assertNotIn("abc\n", r.stderr)
        os.chmod(short, 0o644)
        r = subprocess.run([os.environ.get("EMX_BIN", "edgemux"), "-t", "-c", emx.config_path],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 1)
        self.assertIn("readable by everyone", r.stderr + r.stdout)


if __name__ == "__main__":
    unittest.main()
