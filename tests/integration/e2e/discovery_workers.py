"""What the discovery tests check of every worker loop of one edgemux.

There is one discovery plugin instance per process (on worker 0); every set
it finds is copied to every worker, and each worker opens its own
platform.pipes_per_instance pipes to every instance under its own identity
(docs/protocol.md 6.1: `name` with one worker, `name/k` with more) and logs
its own router lines with a `wK: ` prefix. So "the instance was added" means
every worker's pipes came up, and "the instance was drained" means every
worker drained it."""

import re

from harness import WORKERS


def identities(name):
    """The X-Edgemux-Server identity of each worker of edgemux `name`."""
    return [name] if WORKERS == 1 else ["%s/%d" % (name, k) for k in range(WORKERS)]


def pipes_by_identity(plat, index):
    """{X-Edgemux-Server: connected pipes} of platform instance `index`."""
    out = {}
    for p in plat.stats()["instances"][index]["pipes"]:
        if p["connected"]:
            out[p["server"]] = out.get(p["server"], 0) + 1
    return out


def every_worker_piped(plat, index, name, per_instance=2):
    """Every worker of edgemux `name` has its per_instance pipes connected to
    platform instance `index`, and nothing else is connected there."""
    return pipes_by_identity(plat, index) == {s: per_instance for s in identities(name)}


def by_every_worker(log, text):
    """text is on a log line of every worker (with one worker: in the log)."""
    if WORKERS == 1:
        return text in log
    seen = set()
    for line in log.splitlines():
        if text in line:
            m = re.search(r"\] w(\d+): ", line)
            if m:
                seen.add(int(m.group(1)))
    return seen >= set(range(WORKERS))


def worker0_lines(log):
    """The log lines of worker 0 (every line with one worker): the lines the
    process logs once, as against the ones each worker repeats."""
    if WORKERS == 1:
        return log
    return "\n".join(l for l in log.splitlines() if re.search(r"\] w0: ", l))
