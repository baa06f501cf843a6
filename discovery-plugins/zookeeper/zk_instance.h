/* The zookeeper discovery plugin's instance records: parsing and sets.
 *
 * A ThingWorx platform registers itself with Apache Curator's service
 * discovery: one znode per platform under <basePath>/<service>, holding a
 * Curator ServiceInstance as JSON:
 *
 *   {"name":"thingworx-https","id":"9a1c...","address":"10.0.0.11",
 *    "port":8080,"sslPort":8443,"payload":null,
 *    "registrationTimeUTC":1700000000000,"serviceType":"DYNAMIC",
 *    "uriSpec":null}
 *
 * Kept apart from the plugin so unit tests and fuzz targets can call it
 * without ZooKeeper, a loop or a host table. Nothing here touches libuv,
 * libzookeeper or the host; every function is safe on any thread.
 */
#ifndef EMX_ZK_INSTANCE_H
#define EMX_ZK_INSTANCE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Limits that keep node data bounded before it reaches memory or a log. */
#define ZK_ID_MAX       255
#define ZK_HOST_MAX     255
#define ZK_METADATA_MAX 1024
#define ZK_DATA_MAX     (64u * 1024) /* a Curator record is a few hundred bytes */

struct zk_instance {
    char *id;   /* the record's "id", else the znode's name */
    char *host; /* "address"; IPv6 without brackets */
    uint16_t port;
    bool tls;
    uint32_t weight;   /* 1 unless the payload says otherwise */
    uint32_t priority; /* 0 unless the payload says otherwise */
    char *metadata;    /* the payload as compact JSON, or NULL */
};

/* Sorted by id, ids unique. */
struct zk_set {
    struct zk_instance *items;
    size_t count;
};

/* Parse one znode's data. `node` is the znode's name (the default id and the
 * subject of errors). With `tls` the port is "sslPort", else "port".
 * Returns 0 and fills *out (free with zk_instance_free); -EINVAL with a
 * one-line reason in err (naming the node, control characters replaced);
 * -ENOMEM. On failure *out is left empty. */
int zk_instance_parse(const char *node, const char *data, size_t len, bool tls,
                      struct zk_instance *out, char *err, size_t errlen);

void zk_instance_free(struct zk_instance *in);

/* One child as read from ZooKeeper: its name and data; `present` false when
 * the child vanished between the listing and the read (it is skipped). */
struct zk_child {
    const char *name;
    const char *data;
    size_t len;
    bool present;
};

/* Receives one line about a skipped child; `msg` is borrowed for the call. */
typedef void (*zk_skip_fn)(void *arg, const char *msg);

/* Build a whole set from the children of the service node. A child whose
 * record is bad, or whose id repeats an earlier one, is skipped and reported
 * through on_skip. Returns 0 with *out filled (possibly empty: no children, or
 * all vanished); -EINVAL when there were records and every one was bad (the
 * source is then failing, not empty), with the first reason in err; -ENOMEM.
 * *bad receives the number of children skipped. */
int zk_build_set(const struct zk_child *children, size_t n, bool tls, struct zk_set *out,
                 size_t *bad, zk_skip_fn on_skip, void *arg, char *err, size_t errlen);

void zk_set_free(struct zk_set *set);

/* Same instances with the same fields (both sets sorted by id). */
bool zk_set_equal(const struct zk_set *a, const struct zk_set *b);
bool zk_instance_equal(const struct zk_instance *a, const struct zk_instance *b);

#endif
