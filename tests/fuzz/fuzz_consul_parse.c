/* Fuzz the consul discovery plugin's answer parser: any bytes give either a
 * set whose every field holds the documented invariants, or -EINVAL with a
 * one-line reason. The first byte picks the filter, so tag filtering and the
 * Meta keys are exercised too. Built with discovery-plugins/consul/
 * consul_parse.c and jansson (see tests/integration/consul/CMakeLists.txt). */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "consul_parse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct consul_filter f = {NULL, "edgemux-priority", "edgemux-tls", false};
    struct consul_set set;
    char err[256];

    if (size > 0) {
        if (data[0] & 1)
            f.tag = "edge";
        f.tls_default = (data[0] & 2) != 0;
    }
    int rc = consul_parse((const char *)data, size, &f, &set, err, sizeof(err));
    if (rc == -EINVAL && (!err[0] || strchr(err, '\n')))
        abort(); /* a failure without a reason, or one that spans lines */
    if (rc != 0)
        return 0;
    for (size_t i = 0; i < set.count; i++) {
        const struct consul_instance *in = &set.items[i];
        if (!in->id || !in->host || !in->host[0] || !in->metadata || in->port == 0 ||
            strlen(in->id) > CONSUL_ID_MAX || strlen(in->host) > CONSUL_HOST_MAX ||
            !strchr(in->id, '/') || (i > 0 && strcmp(set.items[i - 1].id, in->id) >= 0))
            abort(); /* unsorted or duplicate ids, or a field out of range */
    }
    if (!consul_set_equal(&set, &set))
        abort();
    consul_set_free(&set);

    uint64_t idx;
    (void)consul_parse_index((const char *)data, size < 32 ? size : 32, &idx);
    return 0;
}
