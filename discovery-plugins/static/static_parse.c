/* The static discovery plugin's instances file: reading and parsing.
 *
 * The file is small and read whole, so libyaml's document API is enough: it
 * gives every node its line, and the shape we accept is fixed (a map with one
 * sequence of flat maps), so the walk below never recurses.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml.h>

#include "static_parse.h"

struct parse_ctx {
    const char *name;
    yaml_document_t *doc;
    static_error_fn on_error;
    void *arg;
    int errors;
    bool nomem;
};

__attribute__((format(printf, 3, 4))) static void report(struct parse_ctx *c, size_t line,
                                                         const char *fmt, ...)
{
    char msg[512];
    int n = snprintf(msg, sizeof(msg), "%s:%zu: ", c->name, line);
    if (n < 0)
        n = 0;
    if ((size_t)n < sizeof(msg)) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg + n, sizeof(msg) - (size_t)n, fmt, ap);
        va_end(ap);
    }
    c->errors++;
    if (c->on_error)
        c->on_error(c->arg, msg);
}

static size_t node_line(const yaml_node_t *n)
{
    return n->start_mark.line + 1;
}

/* File text shown in an error: bounded, control characters replaced, so a
 * hostile file cannot forge log lines. */
static const char *shown(const yaml_node_t *n, char *buf, size_t size)
{
    if (n->type == YAML_MAPPING_NODE)
        return "a map";
    if (n->type == YAML_SEQUENCE_NODE)
        return "a sequence";
    const unsigned char *s = n->data.scalar.value;
    size_t len = n->data.scalar.length, o = 0;
    const size_t keep = 40;
    if (size < keep + 6)
        return "?";
    buf[o++] = '"';
    for (size_t i = 0; i < len && i < keep; i++)
        buf[o++] = (s[i] < 0x20 || s[i] == 0x7f) ? '?' : (char)s[i];
    if (len > keep) {
        memcpy(buf + o, "...", 3);
        o += 3;
    }
    buf[o++] = '"';
    buf[o] = '\0';
    return buf;
}

static bool is_scalar(const yaml_node_t *n)
{
    return n->type == YAML_SCALAR_NODE;
}

static bool scalar_is(const yaml_node_t *n, const char *s)
{
    size_t len = strlen(s);
    return is_scalar(n) && n->data.scalar.length == len &&
           memcmp(n->data.scalar.value, s, len) == 0;
}

static bool is_plain(const yaml_node_t *n)
{
    return is_scalar(n) && n->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
}

/* YAML's null: "~", "null" or nothing, written plain. */
static bool is_null(const yaml_node_t *n)
{
    if (!is_plain(n))
        return false;
    return n->data.scalar.length == 0 || scalar_is(n, "~") || scalar_is(n, "null") ||
           scalar_is(n, "Null") || scalar_is(n, "NULL");
}

static bool has_control(const unsigned char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (s[i] < 0x20 || s[i] == 0x7f)
            return true;
    return false;
}

/* Decimal digits only: no sign, base prefix or separators. */
static bool parse_uint(const yaml_node_t *n, uint64_t max, uint64_t *out)
{
    const unsigned char *s = n->data.scalar.value;
    size_t len = n->data.scalar.length;
    uint64_t v = 0;
    if (!is_plain(n) || len == 0 || len > 20)
        return false;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (max - d) / 10)
            return false;
        v = v * 10 + d;
    }
    *out = v;
    return true;
}

static bool parse_bool(const yaml_node_t *n, bool *out)
{
    if (!is_plain(n))
        return false;
    if (scalar_is(n, "true") || scalar_is(n, "True") || scalar_is(n, "TRUE")) {
        *out = true;
        return true;
    }
    if (scalar_is(n, "false") || scalar_is(n, "False") || scalar_is(n, "FALSE")) {
        *out = false;
        return true;
    }
    return false;
}

/* A string value of at most max bytes without control characters; *out is
 * left NULL for a YAML null. Returns false after reporting. */
static bool take_string(struct parse_ctx *c, const char *key, const yaml_node_t *v, size_t max,
                        char **out)
{
    char buf[64];
    if (is_null(v))
        return true;
    if (!is_scalar(v)) {
        report(c, node_line(v), "%s: expected a string, found %s", key, shown(v, buf, sizeof(buf)));
        return false;
    }
    size_t len = v->data.scalar.length;
    if (len == 0 || len > max) {
        report(c, node_line(v), "%s: expected 1..%zu characters, found %zu", key, max, len);
        return false;
    }
    if (has_control(v->data.scalar.value, len)) {
        report(c, node_line(v), "%s: control characters are not allowed", key);
        return false;
    }
    char *s = malloc(len + 1);
    if (!s) {
        c->nomem = true;
        return false;
    }
    memcpy(s, v->data.scalar.value, len);
    s[len] = '\0';
    *out = s;
    return true;
}

static bool host_char_ok(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           ch == '.' || ch == '-' || ch == '_' || ch == ':' || ch == '%';
}

/* Takes a host name, an IPv4 address or an IPv6 address (brackets allowed and
 * removed, zone "%eth0" allowed). Returns false after reporting. */
static bool take_host(struct parse_ctx *c, const yaml_node_t *v, char **out)
{
    char buf[64];
    char *s = NULL;
    if (is_null(v)) {
        report(c, node_line(v), "address: a host name or IP address is required");
        return false;
    }
    if (!take_string(c, "address", v, STATIC_HOST_MAX + 2, &s))
        return false;
    size_t len = strlen(s);
    if (len >= 2 && s[0] == '[' && s[len - 1] == ']') {
        memmove(s, s + 1, len - 2);
        len -= 2;
        s[len] = '\0';
    }
    bool ok = len > 0 && len <= STATIC_HOST_MAX;
    for (size_t i = 0; ok && i < len; i++)
        ok = host_char_ok(s[i]);
    if (ok && strchr(s, ':')) {
        struct in6_addr a6;
        char addr[INET6_ADDRSTRLEN + 1];
        size_t alen = strcspn(s, "%");
        ok = alen < sizeof(addr) && (alen == len || alen + 1 < len);
        if (ok) {
            memcpy(addr, s, alen);
            addr[alen] = '\0';
            ok = inet_pton(AF_INET6, addr, &a6) == 1;
        }
    } else if (ok) {
        ok = strchr(s, '%') == NULL;
    }
    if (!ok) {
        report(c, node_line(v), "address: expected a host name or IP address, found %s",
               shown(v, buf, sizeof(buf)));
        free(s);
        return false;
    }
    *out = s;
    return true;
}

enum item_key {
    K_ID,
    K_ADDRESS,
    K_PORT,
    K_TLS,
    K_WEIGHT,
    K_PRIORITY,
    K_METADATA,
    K_COUNT,
};

static const char *const item_keys[K_COUNT] = {"id",     "address",  "port",    "tls",
                                               "weight", "priority", "metadata"};

static void instance_clear(struct static_instance *in)
{
    free(in->id);
    free(in->host);
    free(in->metadata);
    memset(in, 0, sizeof(*in));
}

static int default_id(struct static_instance *in)
{
    bool v6 = strchr(in->host, ':') != NULL;
    size_t size = strlen(in->host) + 10;
    char *id = malloc(size);
    if (!id)
        return -ENOMEM;
    /* Brackets keep an IPv6 id unambiguous, as in a URL. */
    snprintf(id, size, v6 ? "[%s]:%u" : "%s:%u", in->host, (unsigned)in->port);
    in->id = id;
    return 0;
}

/* One entry of `instances`. Returns true when *in was filled. */
static bool parse_item(struct parse_ctx *c, size_t index, const yaml_node_t *item,
                       struct static_instance *in)
{
    char buf[64];
    int errors = c->errors;
    const yaml_node_t *seen[K_COUNT] = {NULL};
    uint64_t v;

    memset(in, 0, sizeof(*in));
    in->weight = 1;
    in->line = node_line(item);
    if (item->type != YAML_MAPPING_NODE) {
        report(c, node_line(item), "instances[%zu]: expected a map, found %s", index,
               shown(item, buf, sizeof(buf)));
        return false;
    }
    for (yaml_node_pair_t *p = item->data.mapping.pairs.start; p < item->data.mapping.pairs.top;
         p++) {
        const yaml_node_t *k = yaml_document_get_node(c->doc, p->key);
        const yaml_node_t *val = yaml_document_get_node(c->doc, p->value);
        int key = K_COUNT;
        if (!k || !val)
            continue;
        for (int i = 0; i < K_COUNT && is_scalar(k); i++)
            if (scalar_is(k, item_keys[i]))
                key = i;
        if (key == K_COUNT) {
            report(c, node_line(k),
                   "instances[%zu]: unknown key %s (known: id, address, port, "
                   "tls, weight, priority, metadata)",
                   index, shown(k, buf, sizeof(buf)));
            continue;
        }
        if (seen[key]) {
            report(c, node_line(k), "instances[%zu]: duplicate key '%s' (first at line %zu)", index,
                   item_keys[key], node_line(seen[key]));
            continue;
        }
        seen[key] = k;
        switch (key) {
        case K_ID:
            take_string(c, "id", val, STATIC_ID_MAX, &in->id);
            break;
        case K_ADDRESS:
            take_host(c, val, &in->host);
            break;
        case K_PORT:
            if (parse_uint(val, 65535, &v) && v > 0)
                in->port = (uint16_t)v;
            else
                report(c, node_line(val), "port: expected an integer 1..65535, found %s",
                       shown(val, buf, sizeof(buf)));
            break;
        case K_TLS:
            if (!parse_bool(val, &in->tls))
                report(c, node_line(val), "tls: expected true or false, found %s",
                       shown(val, buf, sizeof(buf)));
            break;
        case K_WEIGHT:
        case K_PRIORITY:
            if (parse_uint(val, UINT32_MAX, &v))
                *(key == K_WEIGHT ? &in->weight : &in->priority) = (uint32_t)v;
            else
                report(c, node_line(val), "%s: expected an integer 0..%u, found %s", item_keys[key],
                       (unsigned)UINT32_MAX, shown(val, buf, sizeof(buf)));
            break;
        case K_METADATA:
            take_string(c, "metadata", val, STATIC_METADATA_MAX, &in->metadata);
            break;
        }
    }
    if (!seen[K_ADDRESS])
        report(c, node_line(item), "instances[%zu]: missing key 'address'", index);
    if (!seen[K_PORT])
        report(c, node_line(item), "instances[%zu]: missing key 'port'", index);
    if (c->errors == errors && !c->nomem && !in->id && default_id(in) < 0)
        c->nomem = true;
    if (c->errors != errors || c->nomem) {
        instance_clear(in);
        return false;
    }
    return true;
}

static int cmp_instance(const void *a, const void *b)
{
    const struct static_instance *x = a, *y = b;
    int r = strcmp(x->id, y->id);
    if (r != 0)
        return r;
    return x->line < y->line ? -1 : x->line > y->line;
}

static void parse_instances(struct parse_ctx *c, const yaml_node_t *seq, struct static_set *set)
{
    char buf[64];
    if (seq->type != YAML_SEQUENCE_NODE) {
        report(c, node_line(seq),
               "instances: expected a sequence of maps (write [] for none), "
               "found %s",
               is_null(seq) ? "nothing" : shown(seq, buf, sizeof(buf)));
        return;
    }
    size_t n = (size_t)(seq->data.sequence.items.top - seq->data.sequence.items.start);
    if (n == 0)
        return;
    set->items = calloc(n, sizeof(*set->items));
    if (!set->items) {
        c->nomem = true;
        return;
    }
    for (size_t i = 0; i < n && !c->nomem; i++) {
        const yaml_node_t *item = yaml_document_get_node(c->doc, seq->data.sequence.items.start[i]);
        if (item && parse_item(c, i, item, &set->items[set->count]))
            set->count++;
    }
    if (c->errors || c->nomem)
        return;
    qsort(set->items, set->count, sizeof(*set->items), cmp_instance);
    for (size_t i = 1; i < set->count; i++) {
        const struct static_instance *a = &set->items[i - 1], *b = &set->items[i];
        if (strcmp(a->id, b->id) == 0)
            report(c, b->line, "instances: duplicate id '%s' (first at line %zu)", b->id, a->line);
    }
}

static void parse_root(struct parse_ctx *c, const yaml_node_t *root, struct static_set *set)
{
    char buf[64];
    const yaml_node_t *found = NULL;
    if (root->type != YAML_MAPPING_NODE) {
        report(c, node_line(root), "expected a map with the key 'instances', found %s",
               shown(root, buf, sizeof(buf)));
        return;
    }
    for (yaml_node_pair_t *p = root->data.mapping.pairs.start; p < root->data.mapping.pairs.top;
         p++) {
        const yaml_node_t *k = yaml_document_get_node(c->doc, p->key);
        const yaml_node_t *v = yaml_document_get_node(c->doc, p->value);
        if (!k || !v)
            continue;
        if (!scalar_is(k, "instances")) {
            report(c, node_line(k), "unknown key %s (known: instances)",
                   shown(k, buf, sizeof(buf)));
            continue;
        }
        if (found) {
            report(c, node_line(k), "duplicate key 'instances' (first at line %zu)",
                   node_line(found));
            continue;
        }
        found = k;
        parse_instances(c, v, set);
    }
    if (!found)
        report(c, node_line(root), "missing key 'instances'");
}

static void report_syntax(struct parse_ctx *c, const yaml_parser_t *p)
{
    if (p->error == YAML_MEMORY_ERROR) {
        c->nomem = true;
        return;
    }
    report(c, p->problem_mark.line + 1, "YAML syntax error: %s%s%s",
           p->problem ? p->problem : "unknown", p->context ? " " : "",
           p->context ? p->context : "");
}

int static_parse(const char *name, const char *text, size_t len, struct static_set *out,
                 static_error_fn on_error, void *arg)
{
    yaml_parser_t parser;
    yaml_document_t doc, next;
    struct static_set set = {NULL, 0};
    struct parse_ctx c = {.name = name, .doc = &doc, .on_error = on_error, .arg = arg};

    out->items = NULL;
    out->count = 0;
    if (!yaml_parser_initialize(&parser))
        return -ENOMEM;
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
    if (!yaml_parser_load(&parser, &doc)) {
        report_syntax(&c, &parser);
        goto out_parser;
    }
    const yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (!root) {
        report(&c, 1, "the file is empty: expected the key 'instances' (write [] for none)");
        goto out_doc;
    }
    parse_root(&c, root, &set);
    if (!yaml_parser_load(&parser, &next)) {
        report_syntax(&c, &parser);
        goto out_doc;
    }
    if (yaml_document_get_root_node(&next))
        report(&c, next.start_mark.line + 1, "only one YAML document is allowed");
    yaml_document_delete(&next);
out_doc:
    yaml_document_delete(&doc);
out_parser:
    yaml_parser_delete(&parser);
    if (c.nomem || c.errors) {
        static_set_free(&set);
        return c.nomem ? -ENOMEM : -EINVAL;
    }
    *out = set;
    return 0;
}

void static_set_free(struct static_set *set)
{
    for (size_t i = 0; i < set->count; i++)
        instance_clear(&set->items[i]);
    free(set->items);
    set->items = NULL;
    set->count = 0;
}

static bool str_equal(const char *a, const char *b)
{
    if (!a || !b)
        return a == b;
    return strcmp(a, b) == 0;
}

bool static_set_equal(const struct static_set *a, const struct static_set *b)
{
    if (a->count != b->count)
        return false;
    for (size_t i = 0; i < a->count; i++) {
        const struct static_instance *x = &a->items[i], *y = &b->items[i];
        if (!str_equal(x->id, y->id) || !str_equal(x->host, y->host) || x->port != y->port ||
            x->tls != y->tls || x->weight != y->weight || x->priority != y->priority ||
            !str_equal(x->metadata, y->metadata))
            return false;
    }
    return true;
}

int static_read_file(const char *path, size_t max_size, char **text, size_t *len)
{
    struct stat st;
    size_t cap, used = 0;
    char *buf = NULL;
    int rc;

    /* O_NONBLOCK: a FIFO put in place of the file must not hang the reader. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0)
        return -errno;
    if (fstat(fd, &st) < 0) {
        rc = -errno;
        goto out_fd;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = -EINVAL;
        goto out_fd;
    }
    if ((uint64_t)st.st_size > max_size) {
        rc = -EFBIG;
        goto out_fd;
    }
    /* One byte more than allowed, to see a file that grew past the limit. */
    cap = (size_t)st.st_size + 1;
    if (cap < 4096)
        cap = 4096;
    if (cap > max_size + 1)
        cap = max_size + 1;
    buf = malloc(cap + 1);
    if (!buf) {
        rc = -ENOMEM;
        goto out_fd;
    }
    for (;;) {
        if (used == cap) {
            if (cap > max_size) {
                rc = -EFBIG;
                goto out_buf;
            }
            size_t ncap = cap > max_size / 2 ? max_size + 1 : cap * 2;
            char *nbuf = realloc(buf, ncap + 1);
            if (!nbuf) {
                rc = -ENOMEM;
                goto out_buf;
            }
            buf = nbuf;
            cap = ncap;
        }
        ssize_t n = read(fd, buf + used, cap - used);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = -errno;
            goto out_buf;
        }
        if (n == 0)
            break;
        used += (size_t)n;
    }
    if (used > max_size) {
        rc = -EFBIG;
        goto out_buf;
    }
    buf[used] = '\0';
    close(fd);
    *text = buf;
    *len = used;
    return 0;
out_buf:
    free(buf);
out_fd:
    close(fd);
    return rc;
}
