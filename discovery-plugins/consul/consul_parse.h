/* The consul discovery plugin's answer parser: the JSON of
 * GET /v1/health/service/<name>?passing and the X-Consul-Index header.
 *
 * Kept apart from the plugin so unit tests and fuzz targets can call it
 * without a loop, libcurl or a host table. Pure functions, no global state.
 */
#ifndef EMX_CONSUL_PARSE_H
#define EMX_CONSUL_PARSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Limits that keep answer text bounded before it reaches the core or a log. */
#define CONSUL_NAME_MAX     255 /* node name, service ID */
#define CONSUL_ID_MAX       (2 * CONSUL_NAME_MAX + 1)
#define CONSUL_HOST_MAX     255
#define CONSUL_METADATA_MAX 1024
#define CONSUL_ENTRIES_MAX  100000

struct consul_instance {
    char *id;   /* "node/serviceid" */
    char *host; /* Service.Address, else Node.Address */
    uint16_t port;
    bool tls;
    uint32_t weight;   /* Service.Weights.Passing; 1 when absent */
    uint32_t priority; /* Service.Meta[priority_meta]; 0 when absent */
    char *metadata;    /* "node=… service=…", never NULL after a parse */
};

/* Sorted by id, ids unique. */
struct consul_set {
    struct consul_instance *items;
    size_t count;
    size_t skipped; /* entries left out: tag missing, or a check not passing */
};

/* What selects and shapes the instances; every field may be NULL/false. */
struct consul_filter {
    const char *tag;           /* only entries whose Service.Tags hold it */
    const char *priority_meta; /* Service.Meta key giving the priority */
    const char *tls_meta;      /* Service.Meta key "true"/"false" overriding tls_default */
    bool tls_default;
};

/* Parse `len` bytes of a /v1/health/service answer. Returns 0 and fills
 * *out (free with consul_set_free); -EINVAL with one line in err naming what
 * was wrong (safe with a NULL or tiny buffer); -ENOMEM. On failure *out is
 * left empty. One malformed entry fails the whole answer. */
int consul_parse(const char *text, size_t len, const struct consul_filter *f,
                 struct consul_set *out, char *err, size_t errlen);

void consul_set_free(struct consul_set *set);

/* Same instances with the same fields (both sets sorted by id). */
bool consul_set_equal(const struct consul_set *a, const struct consul_set *b);

/* Parse an X-Consul-Index header value: decimal digits, optional blanks
 * around them, at most UINT64_MAX. Returns 0, or -EINVAL with *out untouched. */
int consul_parse_index(const char *text, size_t len, uint64_t *out);

#endif
