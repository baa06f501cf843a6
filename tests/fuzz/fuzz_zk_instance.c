/* Fuzz the zookeeper discovery plugin's Curator record parser and set
 * builder: any bytes give either an instance whose fields hold the
 * documented invariants, or one error line that names the node. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "zk_instance.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_line(const char *msg)
{
    if (strncmp(msg, "node '", 6) != 0)
        abort(); /* an error that does not name the node */
    for (const char *p = msg; *p; p++)
        if ((unsigned char)*p < 0x20)
            abort(); /* record bytes forging a log line */
}

static void check_skip(void *arg, const char *msg)
{
    (void)arg;
    if (strncmp(msg, "id '", 4) != 0)
        check_line(msg);
}

static void check(const struct zk_instance *in, bool tls)
{
    if (!in->id || !in->host || in->port == 0 || in->tls != tls || !in->id[0] ||
        strlen(in->id) > ZK_ID_MAX || !in->host[0] || strlen(in->host) > ZK_HOST_MAX ||
        (in->metadata && strlen(in->metadata) > ZK_METADATA_MAX))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* The first byte picks TLS; the rest is the node's data. */
    bool tls = size > 0 && (data[0] & 1);
    const char *text = size > 0 ? (const char *)data + 1 : "";
    size_t len = size > 0 ? size - 1 : 0;
    struct zk_instance in;
    char err[512];

    int rc = zk_instance_parse("n", text, len, tls, &in, err, sizeof(err));
    if (rc == 0) {
        check(&in, tls);
        zk_instance_free(&in);
    } else if (rc == -EINVAL) {
        check_line(err);
    }

    /* The same record in two nodes, and a third gone: both kept (ids from
     * the node names), one kept and one a duplicate id, or a failure. */
    struct zk_child kids[] = {{"a", text, len, true}, {"b", text, len, true}, {"c", 0, 0, false}};
    struct zk_set set;
    size_t bad;
    rc = zk_build_set(kids, 3, tls, &set, &bad, check_skip, NULL, err, sizeof(err));
    if (rc == 0) {
        if (set.count + bad != 2 || (set.count == 2 && !strcmp(set.items[0].id, set.items[1].id)))
            abort();
        for (size_t i = 0; i < set.count; i++)
            check(&set.items[i], tls);
        if (!zk_set_equal(&set, &set))
            abort();
        zk_set_free(&set);
    } else if (rc == -EINVAL && (bad != 2 || set.count != 0)) {
        abort();
    }
    return 0;
}
