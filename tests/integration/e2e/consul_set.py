"""Instance sets for consul_fixture.py, shared by the Consul tests: one
register body per instance, and --preload arguments that put a whole set in
place before the fixture listens (a source that comes back on its port
answers with its whole set from the first query, never with the part a test
had registered when edgemux's query arrived)."""

import json

SERVICE = "thingworx"


def entry(port, ident):
    """The register body of instance `ident` on 127.0.0.1:port."""
    return dict(service=SERVICE, node="node-%s" % ident, id=ident, address="127.0.0.1", port=port)


def preload_args(env, instances):
    """--preload arguments for (port, ident) pairs; [] for none."""
    if not instances:
        return []
    path = env.path("consul-preload-%d.json" % len(env.procs))
    with open(path, "w") as f:
        json.dump([entry(port, ident) for port, ident in instances], f)
    return ["--preload", path]
