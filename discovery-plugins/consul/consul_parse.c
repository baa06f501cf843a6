/* The consul discovery plugin's answer parser.
 *
 * The answer of /v1/health/service/<name> is an array of
 * {Node: {Node, Address, …}, Service: {ID, Service, Tags, Address, Port,
 * Weights: {Passing, Warning}, Meta}, Checks: [{Status, …}]}. Every field
 * we use is type-checked; unknown fields are ignored, as Consul adds fields
 * between versions.
 */
#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "consul_parse.h"

struct ctx {
    char *err;
    size_t errlen;
};

__attribute__((format(printf, 2, 3))) static int fail(struct ctx *c, const char *fmt, ...)
{
    if (c->err && c->errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->err, c->errlen, fmt, ap);
        va_end(ap);
        /* jansson quotes answer text in its errors: keep the line one line. */
        for (char *p = c->err; *p; p++)
            if ((unsigned char)*p < 0x20 || *p == 0x7f)
                *p = '?';
    }
    return -EINVAL;
}

/* Answer text shown in an error: bounded, control characters replaced, so a
 * hostile answer cannot forge log lines. */
static const char *shown(const char *s, char *buf, size_t size)
{
    const size_t keep = 40;
    size_t o = 0, len = strlen(s);
    if (size < keep + 6)
        return "?";
    buf[o++] = '"';
    for (size_t i = 0; i < len && i < keep; i++) {
        unsigned char ch = (unsigned char)s[i];
        buf[o++] = (ch < 0x20 || ch == 0x7f) ? '?' : (char)ch;
    }
    if (len > keep) {
        memcpy(buf + o, "...", 3);
        o += 3;
    }
    buf[o++] = '"';
    buf[o] = '\0';
    return buf;
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
    case JSON_NULL:
        return "null";
    }
    return "?";
}

static bool has_control(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return true;
    return false;
}

/* An optional member: absent and null both give NULL. */
static const json_t *member(const json_t *obj, const char *key)
{
    const json_t *v = json_object_get(obj, key);
    return v && !json_is_null(v) ? v : NULL;
}

/* A string member of at most max bytes without control characters.
 * *out is NULL when the member is absent or null and !required. */
static int get_string(struct ctx *c, size_t i, const json_t *obj, const char *where,
                      const char *key, bool required, size_t max, const char **out)
{
    const json_t *v = member(obj, key);
    char buf[64];
    *out = NULL;
    if (!v) {
        if (required)
            return fail(c, "entry %zu: %s.%s missing", i, where, key);
        return 0;
    }
    if (!json_is_string(v))
        return fail(c, "entry %zu: %s.%s: expected a string, found %s", i, where, key,
                    type_name(v));
    const char *s = json_string_value(v);
    if (strlen(s) > max)
        return fail(c, "entry %zu: %s.%s: longer than %zu bytes", i, where, key, max);
    if (has_control(s))
        return fail(c, "entry %zu: %s.%s: control character in %s", i, where, key,
                    shown(s, buf, sizeof(buf)));
    if (required && !s[0])
        return fail(c, "entry %zu: %s.%s is empty", i, where, key);
    *out = s;
    return 0;
}

/* Decimal digits only, no sign: Meta values are strings. */
static bool parse_u32(const char *s, uint32_t *out)
{
    uint64_t v = 0;
    if (!s[0] || strlen(s) > 10)
        return false;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return false;
        v = v * 10 + (uint64_t)(*s - '0');
    }
    if (v > UINT32_MAX)
        return false;
    *out = (uint32_t)v;
    return true;
}

static char *dup_str(const char *s)
{
    size_t len = strlen(s);
    char *d = malloc(len + 1);
    if (d)
        memcpy(d, s, len + 1);
    return d;
}

/* Tags: null/absent, or an array of strings. Sets *found when tag is in it. */
static int check_tags(struct ctx *c, size_t i, const json_t *svc, const char *tag, bool *found)
{
    const json_t *tags = member(svc, "Tags");
    size_t k;
    const json_t *t;
    *found = false;
    if (!tags)
        return 0;
    if (!json_is_array(tags))
        return fail(c, "entry %zu: Service.Tags: expected an array, found %s", i, type_name(tags));
    json_array_foreach(tags, k, t)
    {
        if (!json_is_string(t))
            return fail(c, "entry %zu: Service.Tags[%zu]: expected a string, found %s", i, k,
                        type_name(t));
        if (tag && strcmp(json_string_value(t), tag) == 0)
            *found = true;
    }
    return 0;
}

/* Checks: null/absent, or an array of objects with a string Status. We ask
 * for ?passing, so anything else means a server or proxy that ignored it. */
static int check_checks(struct ctx *c, size_t i, const json_t *entry, bool *passing)
{
    const json_t *checks = member(entry, "Checks");
    size_t k;
    const json_t *ch;
    *passing = true;
    if (!checks)
        return 0;
    if (!json_is_array(checks))
        return fail(c, "entry %zu: Checks: expected an array, found %s", i, type_name(checks));
    json_array_foreach(checks, k, ch)
    {
        if (!json_is_object(ch))
            return fail(c, "entry %zu: Checks[%zu]: expected an object, found %s", i, k,
                        type_name(ch));
        const json_t *st = json_object_get(ch, "Status");
        if (!json_is_string(st))
            return fail(c, "entry %zu: Checks[%zu].Status: expected a string", i, k);
        if (strcmp(json_string_value(st), "passing") != 0)
            *passing = false;
    }
    return 0;
}

static int get_weight(struct ctx *c, size_t i, const json_t *svc, uint32_t *out)
{
    const json_t *w = member(svc, "Weights");
    *out = 1;
    if (!w)
        return 0;
    if (!json_is_object(w))
        return fail(c, "entry %zu: Service.Weights: expected an object, found %s", i, type_name(w));
    const json_t *p = member(w, "Passing");
    if (!p)
        return 0;
    if (!json_is_integer(p))
        return fail(c, "entry %zu: Service.Weights.Passing: expected an integer, found %s", i,
                    type_name(p));
    json_int_t v = json_integer_value(p);
    if (v < 0 || (unsigned long long)v > UINT32_MAX)
        return fail(c, "entry %zu: Service.Weights.Passing: %lld out of 0..4294967295", i,
                    (long long)v);
    *out = (uint32_t)v;
    return 0;
}

/* Meta: null/absent, or an object of strings (Consul's map[string]string). */
static int get_meta(struct ctx *c, size_t i, const json_t *svc, const struct consul_filter *f,
                    uint32_t *priority, bool *tls)
{
    const json_t *meta = member(svc, "Meta");
    char buf[64];
    *priority = 0;
    *tls = f->tls_default;
    if (!meta)
        return 0;
    if (!json_is_object(meta))
        return fail(c, "entry %zu: Service.Meta: expected an object, found %s", i, type_name(meta));
    const char *s;
    int rc;
    if (f->priority_meta && f->priority_meta[0]) {
        if ((rc = get_string(c, i, meta, "Service.Meta", f->priority_meta, false, 64, &s)) < 0)
            return rc;
        if (s && !parse_u32(s, priority))
            return fail(c,
                        "entry %zu: Service.Meta.%s: expected an integer 0..4294967295, found %s",
                        i, f->priority_meta, shown(s, buf, sizeof(buf)));
    }
    if (f->tls_meta && f->tls_meta[0]) {
        if ((rc = get_string(c, i, meta, "Service.Meta", f->tls_meta, false, 64, &s)) < 0)
            return rc;
        if (s && strcmp(s, "true") == 0)
            *tls = true;
        else if (s && strcmp(s, "false") == 0)
            *tls = false;
        else if (s)
            return fail(c, "entry %zu: Service.Meta.%s: expected \"true\" or \"false\", found %s",
                        i, f->tls_meta, shown(s, buf, sizeof(buf)));
    }
    return 0;
}

/* One entry: 0 and *in filled, 1 when filtered out, or a negative errno. */
static int parse_entry(struct ctx *c, size_t i, const json_t *entry, const struct consul_filter *f,
                       struct consul_instance *in)
{
    const char *node_name, *node_addr, *svc_id, *svc_name, *svc_addr;
    int rc;

    if (!json_is_object(entry))
        return fail(c, "entry %zu: expected an object, found %s", i, type_name(entry));
    const json_t *node = member(entry, "Node");
    const json_t *svc = member(entry, "Service");
    if (!node || !json_is_object(node))
        return fail(c, "entry %zu: Node: expected an object, found %s", i,
                    node ? type_name(node) : "nothing");
    if (!svc || !json_is_object(svc))
        return fail(c, "entry %zu: Service: expected an object, found %s", i,
                    svc ? type_name(svc) : "nothing");
    if ((rc = get_string(c, i, node, "Node", "Node", true, CONSUL_NAME_MAX, &node_name)) < 0 ||
        (rc = get_string(c, i, node, "Node", "Address", false, CONSUL_HOST_MAX, &node_addr)) < 0 ||
        (rc = get_string(c, i, svc, "Service", "ID", true, CONSUL_NAME_MAX, &svc_id)) < 0 ||
        (rc = get_string(c, i, svc, "Service", "Service", false, CONSUL_NAME_MAX, &svc_name)) < 0 ||
        (rc = get_string(c, i, svc, "Service", "Address", false, CONSUL_HOST_MAX, &svc_addr)) < 0)
        return rc;

    const json_t *port = member(svc, "Port");
    if (!port)
        return fail(c, "entry %zu: Service.Port missing", i);
    if (!json_is_integer(port))
        return fail(c, "entry %zu: Service.Port: expected an integer, found %s", i,
                    type_name(port));
    json_int_t pv = json_integer_value(port);
    if (pv < 1 || pv > 65535)
        return fail(c, "entry %zu (%s/%s): Service.Port: %lld out of 1..65535", i, node_name,
                    svc_id, (long long)pv);

    bool tagged, passing;
    if ((rc = check_tags(c, i, svc, f->tag, &tagged)) < 0 ||
        (rc = check_checks(c, i, entry, &passing)) < 0)
        return rc;

    uint32_t weight, priority;
    bool tls;
    if ((rc = get_weight(c, i, svc, &weight)) < 0 ||
        (rc = get_meta(c, i, svc, f, &priority, &tls)) < 0)
        return rc;

    /* Filter after validating, so bad data is reported whatever the tag. */
    if ((f->tag && !tagged) || !passing)
        return 1;

    const char *host = svc_addr && svc_addr[0] ? svc_addr : node_addr;
    if (!host || !host[0])
        return fail(c, "entry %zu (%s/%s): no Service.Address and no Node.Address", i, node_name,
                    svc_id);

    char id[CONSUL_ID_MAX + 1], meta[CONSUL_METADATA_MAX];
    snprintf(id, sizeof(id), "%s/%s", node_name, svc_id);
    snprintf(meta, sizeof(meta), "node=%s service=%s", node_name, svc_name ? svc_name : "");
    in->id = dup_str(id);
    in->host = dup_str(host);
    in->metadata = dup_str(meta);
    if (!in->id || !in->host || !in->metadata)
        return -ENOMEM;
    in->port = (uint16_t)pv;
    in->tls = tls;
    in->weight = weight;
    in->priority = priority;
    return 0;
}

static int by_id(const void *a, const void *b)
{
    return strcmp(((const struct consul_instance *)a)->id, ((const struct consul_instance *)b)->id);
}

int consul_parse(const char *text, size_t len, const struct consul_filter *f,
                 struct consul_set *out, char *err, size_t errlen)
{
    static const struct consul_filter none = {NULL, NULL, NULL, false};
    struct ctx c = {err, errlen};
    struct consul_set set = {NULL, 0, 0};
    json_error_t je;
    int rc = 0;

    *out = set;
    if (err && errlen)
        err[0] = '\0';
    if (!f)
        f = &none;
    /* Duplicate keys would make "which Port?" ambiguous. */
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return fail(&c, "bad JSON at line %d column %d: %s", je.line, je.column, je.text);
    if (!json_is_array(root)) {
        rc = fail(&c, "expected a JSON array, found %s", type_name(root));
        goto done;
    }
    size_t n = json_array_size(root);
    if (n > CONSUL_ENTRIES_MAX) {
        rc = fail(&c, "%zu entries, more than %d", n, CONSUL_ENTRIES_MAX);
        goto done;
    }
    if (n && !(set.items = calloc(n, sizeof(*set.items)))) {
        rc = -ENOMEM;
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        rc = parse_entry(&c, i, json_array_get(root, i), f, &set.items[set.count]);
        if (rc < 0) {
            set.count++; /* free what the entry allocated */
            goto done;
        }
        if (rc == 1) {
            set.skipped++;
            rc = 0;
            continue;
        }
        set.count++;
    }
    if (set.count > 1)
        qsort(set.items, set.count, sizeof(*set.items), by_id);
    for (size_t i = 1; i < set.count; i++) {
        if (strcmp(set.items[i - 1].id, set.items[i].id) == 0) {
            char buf[64];
            rc = fail(&c, "duplicate instance id %s", shown(set.items[i].id, buf, sizeof(buf)));
            goto done;
        }
    }
    *out = set;
    set = (struct consul_set){NULL, 0, 0};
done:
    if (rc == -ENOMEM)
        fail(&c, "out of memory");
    consul_set_free(&set);
    json_decref(root);
    return rc;
}

void consul_set_free(struct consul_set *set)
{
    for (size_t i = 0; i < set->count; i++) {
        free(set->items[i].id);
        free(set->items[i].host);
        free(set->items[i].metadata);
    }
    free(set->items);
    *set = (struct consul_set){NULL, 0, 0};
}

static bool str_equal(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

bool consul_set_equal(const struct consul_set *a, const struct consul_set *b)
{
    if (a->count != b->count)
        return false;
    for (size_t i = 0; i < a->count; i++) {
        const struct consul_instance *x = &a->items[i], *y = &b->items[i];
        if (!str_equal(x->id, y->id) || !str_equal(x->host, y->host) || x->port != y->port ||
            x->tls != y->tls || x->weight != y->weight || x->priority != y->priority ||
            !str_equal(x->metadata, y->metadata))
            return false;
    }
    return true;
}

int consul_parse_index(const char *text, size_t len, uint64_t *out)
{
    size_t i = 0, end = len;
    uint64_t v = 0;
    while (i < end && (text[i] == ' ' || text[i] == '\t'))
        i++;
    while (end > i && (text[end - 1] == ' ' || text[end - 1] == '\t' || text[end - 1] == '\r' ||
                       text[end - 1] == '\n'))
        end--;
    if (i == end)
        return -EINVAL;
    for (; i < end; i++) {
        if (text[i] < '0' || text[i] > '9')
            return -EINVAL;
        unsigned d = (unsigned)(text[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -EINVAL;
        v = v * 10 + d;
    }
    *out = v;
    return 0;
}
