/* Curator ServiceInstance records (JSON, parsed with jansson) and whole sets
 * built from them. Every field is checked: the data of a znode is written by
 * whoever can write to ZooKeeper, and it ends up in logs and in the router. */
#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "zk_instance.h"

/* Text from a znode shown in an error: bounded, control characters replaced,
 * so a hostile record cannot forge log lines. */
static const char *shown(const char *s, size_t len, char *buf, size_t size)
{
    const size_t keep = 64;
    size_t o = 0;
    if (size < keep + 4)
        return "?";
    for (size_t i = 0; i < len && i < keep; i++) {
        unsigned char c = (unsigned char)s[i];
        buf[o++] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
    }
    if (len > keep) {
        memcpy(buf + o, "...", 3);
        o += 3;
    }
    buf[o] = '\0';
    return buf;
}

__attribute__((format(printf, 4, 5))) static int fail(char *err, size_t errlen, const char *node,
                                                      const char *fmt, ...)
{
    char nb[80];
    if (!err || errlen == 0)
        return -EINVAL;
    int n = snprintf(err, errlen, "node '%s': ", shown(node, strlen(node), nb, sizeof(nb)));
    if (n >= 0 && (size_t)n < errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
        va_end(ap);
    }
    return -EINVAL;
}

static char *dup_n(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

static bool printable(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c == 0x7f)
            return false;
    }
    return true;
}

/* A host name, IPv4 or IPv6 address (with an optional zone): no spaces,
 * slashes or anything else a URL would have to escape. */
static bool host_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '-' || c == ':' || c == '_' || c == '%';
}

static const char *type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a real number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    default:
        return "null";
    }
}

/* An integer member within [min, max]; absent or null gives `absent`. */
static int get_uint(const json_t *obj, const char *key, uint64_t min, uint64_t max, uint64_t *out,
                    bool *absent)
{
    const json_t *v = json_object_get(obj, key);
    *absent = !v || json_is_null(v);
    if (*absent)
        return 0;
    if (!json_is_integer(v))
        return -EINVAL;
    json_int_t i = json_integer_value(v);
    if (i < 0 || (uint64_t)i < min || (uint64_t)i > max)
        return -ERANGE;
    *out = (uint64_t)i;
    return 0;
}

static int parse_port(const json_t *root, const char *node, bool tls, uint16_t *port, char *err,
                      size_t errlen)
{
    const char *key = tls ? "sslPort" : "port";
    uint64_t v = 0;
    bool absent;
    int rc = get_uint(root, key, 1, 65535, &v, &absent);
    if (rc == -EINVAL)
        return fail(err, errlen, node, "%s: expected an integer 1..65535, found %s", key,
                    type_name(json_object_get(root, key)));
    if (rc == -ERANGE)
        return fail(err, errlen, node, "%s: expected an integer 1..65535, found %lld", key,
                    (long long)json_integer_value(json_object_get(root, key)));
    if (absent)
        return fail(err, errlen, node, "no %s (%s)", key,
                    tls ? "the service is TLS; does the platform listen on HTTPS?"
                        : "plain ws; does the platform listen on HTTP?");
    *port = (uint16_t)v;
    return 0;
}

static int parse_host(const json_t *root, const char *node, char **host, char *err, size_t errlen)
{
    const json_t *v = json_object_get(root, "address");
    if (!v || json_is_null(v))
        return fail(err, errlen, node, "no address");
    if (!json_is_string(v))
        return fail(err, errlen, node, "address: expected a string, found %s", type_name(v));
    const char *s = json_string_value(v);
    size_t len = json_string_length(v);
    char sb[80];
    if (len >= 2 && s[0] == '[' && s[len - 1] == ']') {
        s++;
        len -= 2;
    }
    if (len == 0)
        return fail(err, errlen, node, "address is empty");
    if (len > ZK_HOST_MAX)
        return fail(err, errlen, node, "address longer than %d characters", ZK_HOST_MAX);
    for (size_t i = 0; i < len; i++)
        if (!host_char(s[i]))
            return fail(err, errlen, node, "address '%s' is not a host name or IP address",
                        shown(s, len, sb, sizeof(sb)));
    *host = dup_n(s, len);
    return *host ? 0 : -ENOMEM;
}

static int parse_id(const json_t *root, const char *node, char **id, char *err, size_t errlen)
{
    const json_t *v = json_object_get(root, "id");
    const char *s = node;
    size_t len = strlen(node);
    const char *what = "the node name";
    if (v && !json_is_null(v)) {
        if (!json_is_string(v))
            return fail(err, errlen, node, "id: expected a string, found %s", type_name(v));
        s = json_string_value(v);
        len = json_string_length(v);
        what = "id";
    }
    if (len == 0)
        return fail(err, errlen, node, "%s is empty", what);
    if (len > ZK_ID_MAX)
        return fail(err, errlen, node, "%s longer than %d characters", what, ZK_ID_MAX);
    if (!printable(s, len) || memchr(s, '\0', len))
        return fail(err, errlen, node, "%s contains control characters", what);
    *id = dup_n(s, len);
    return *id ? 0 : -ENOMEM;
}

/* The payload is the platform's own business: shown to operators as compact
 * JSON (ASCII only, bounded). An object payload may carry edgemux's optional
 * "weight" and "priority". */
static int parse_payload(const json_t *root, const char *node, struct zk_instance *in, char *err,
                         size_t errlen)
{
    const json_t *p = json_object_get(root, "payload");
    if (!p || json_is_null(p))
        return 0;
    if (json_is_object(p)) {
        static const char *const keys[] = {"weight", "priority"};
        uint32_t *fields[] = {&in->weight, &in->priority};
        for (size_t i = 0; i < 2; i++) {
            uint64_t v = 0;
            bool absent;
            int rc = get_uint(p, keys[i], 0, UINT32_MAX, &v, &absent);
            if (rc < 0)
                return fail(err, errlen, node, "payload.%s: expected an integer 0..4294967295",
                            keys[i]);
            if (!absent)
                *fields[i] = (uint32_t)v;
        }
    }
    char *text = json_dumps(p, JSON_COMPACT | JSON_ENSURE_ASCII | JSON_ENCODE_ANY);
    if (!text)
        return -ENOMEM;
    size_t len = strlen(text);
    if (len > ZK_METADATA_MAX) {
        memcpy(text + ZK_METADATA_MAX - 3, "...", 4);
        len = ZK_METADATA_MAX;
    }
    in->metadata = dup_n(text, len);
    free(text);
    return in->metadata ? 0 : -ENOMEM;
}

int zk_instance_parse(const char *node, const char *data, size_t len, bool tls,
                      struct zk_instance *out, char *err, size_t errlen)
{
    struct zk_instance in = {.tls = tls, .weight = 1, .priority = 0};
    json_error_t je;
    json_t *root = NULL;
    int rc;

    memset(out, 0, sizeof(*out));
    if (!node)
        node = "";
    if (!data || len == 0)
        return fail(err, errlen, node, "no data (not a service instance record)");
    if (len > ZK_DATA_MAX)
        return fail(err, errlen, node, "data larger than %u bytes", ZK_DATA_MAX);
    root = json_loadb(data, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
    if (!root) {
        char sb[200];
        return fail(err, errlen, node, "not valid JSON: %s at offset %d",
                    shown(je.text, strlen(je.text), sb, sizeof(sb)), je.position);
    }
    if (!json_is_object(root)) {
        rc = fail(err, errlen, node, "expected a JSON object, found %s", type_name(root));
        goto out;
    }
    if ((rc = parse_host(root, node, &in.host, err, errlen)) < 0)
        goto out;
    if ((rc = parse_port(root, node, tls, &in.port, err, errlen)) < 0)
        goto out;
    if ((rc = parse_id(root, node, &in.id, err, errlen)) < 0)
        goto out;
    if ((rc = parse_payload(root, node, &in, err, errlen)) < 0)
        goto out;
    *out = in;
    json_decref(root);
    return 0;
out:
    json_decref(root);
    zk_instance_free(&in);
    return rc;
}

void zk_instance_free(struct zk_instance *in)
{
    if (!in)
        return;
    free(in->id);
    free(in->host);
    free(in->metadata);
    memset(in, 0, sizeof(*in));
}

/* By id; ties (one id in two nodes) by address and port, so which record
 * wins does not depend on the order ZooKeeper lists the children in. */
static int cmp_id(const void *a, const void *b)
{
    const struct zk_instance *x = a, *y = b;
    int c = strcmp(x->id, y->id);
    if (c == 0)
        c = strcmp(x->host, y->host);
    if (c == 0)
        c = (int)x->port - (int)y->port;
    return c;
}

int zk_build_set(const struct zk_child *children, size_t n, bool tls, struct zk_set *out,
                 size_t *bad, zk_skip_fn on_skip, void *arg, char *err, size_t errlen)
{
    struct zk_set set = {NULL, 0};
    size_t records = 0, skipped = 0;
    char msg[512];

    *out = (struct zk_set){NULL, 0};
    *bad = 0;
    if (err && errlen)
        err[0] = '\0';
    if (n) {
        set.items = calloc(n, sizeof(*set.items));
        if (!set.items)
            return -ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        const struct zk_child *c = &children[i];
        if (!c->present)
            continue;
        records++;
        struct zk_instance in;
        int rc = zk_instance_parse(c->name, c->data, c->len, tls, &in, msg, sizeof(msg));
        if (rc == -ENOMEM) {
            zk_set_free(&set);
            return rc;
        }
        if (rc == 0) {
            set.items[set.count++] = in;
            continue;
        }
        skipped++;
        if (on_skip)
            on_skip(arg, msg);
        if (skipped == 1 && err && errlen)
            snprintf(err, errlen, "%s", msg);
    }
    if (set.count > 1)
        qsort(set.items, set.count, sizeof(*set.items), cmp_id);
    /* Two records claiming one id: keep the first in that order. */
    size_t w = 0;
    for (size_t r = 0; r < set.count; r++) {
        if (w > 0 && strcmp(set.items[w - 1].id, set.items[r].id) == 0) {
            char ib[80];
            snprintf(msg, sizeof(msg), "id '%s' appears in more than one node; one is skipped",
                     shown(set.items[r].id, strlen(set.items[r].id), ib, sizeof(ib)));
            skipped++;
            if (on_skip)
                on_skip(arg, msg);
            zk_instance_free(&set.items[r]);
            continue;
        }
        if (w != r)
            set.items[w] = set.items[r];
        w++;
    }
    set.count = w;
    *bad = skipped;
    if (records > 0 && set.count == 0) {
        zk_set_free(&set);
        return -EINVAL;
    }
    if (set.count == 0) {
        free(set.items);
        set.items = NULL;
    }
    *out = set;
    return 0;
}

void zk_set_free(struct zk_set *set)
{
    for (size_t i = 0; i < set->count; i++)
        zk_instance_free(&set->items[i]);
    free(set->items);
    set->items = NULL;
    set->count = 0;
}

static bool str_eq(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

bool zk_instance_equal(const struct zk_instance *a, const struct zk_instance *b)
{
    return str_eq(a->id, b->id) && str_eq(a->host, b->host) && a->port == b->port &&
           a->tls == b->tls && a->weight == b->weight && a->priority == b->priority &&
           str_eq(a->metadata, b->metadata);
}

bool zk_set_equal(const struct zk_set *a, const struct zk_set *b)
{
    if (a->count != b->count)
        return false;
    for (size_t i = 0; i < a->count; i++)
        if (!zk_instance_equal(&a->items[i], &b->items[i]))
            return false;
    return true;
}
