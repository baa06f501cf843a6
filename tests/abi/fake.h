/* Fake plugins built only for tests: each descriptor is followed by a
 * pointer to a counter every plugin function bumps, so a test can see
 * through the descriptor alone whether any plugin code ran. struct_size
 * covers only the real descriptor; the counter lies past it. */
#ifndef EMX_TEST_FAKE_H
#define EMX_TEST_FAKE_H

#include "edgemux/discovery.h"
#include "edgemux/transport.h"

struct fake_discovery {
    struct emx_discovery_plugin d;
    int *calls;
};

struct fake_transport {
    struct emx_transport_plugin d;
    int *calls;
};

/* The config struct of the good discovery fake. */
struct fake_discovery_config {
    const char *endpoint;
    uint64_t interval_ms;
    uint64_t max_size;
    int64_t retries;
    bool verbose;
    struct emx_strlist tags;
    const char *token;
};

#endif
