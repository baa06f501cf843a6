/* Configuration: YAML → a tree of emx_node (file:line on every key and
 * value) → option tables → struct emx_config and plugin config structs. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml.h>

#include "alloc.h"
#include "log.h"
#include "netaddr.h"

#ifndef EMX_DEFAULT_PLUGIN_DIR
#define EMX_DEFAULT_PLUGIN_DIR "/usr/lib/edgemux"
#endif

#define CONFIG_MAX_BYTES (1024u * 1024u)
#define YAML_MAX_DEPTH   64
#define SHOW_MAX         40 /* characters of a bad value quoted in a message */

/* ---- errors ---- */

static void errors_vadd(struct emx_errors *e, const char *file, int line, const char *key,
                        const char *fmt, va_list ap) __attribute__((format(printf, 5, 0)));

static void errors_vadd(struct emx_errors *e, const char *file, int line, const char *key,
                        const char *fmt, va_list ap)
{
    if (!e)
        return;
    if (e->count >= EMX_ERRORS_MAX) {
        e->dropped++;
        return;
    }
    char *body = NULL, *msg = NULL;
    va_list ap2;
    va_copy(ap2, ap);
    int bn = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    if (bn < 0 || !(body = emx_malloc((size_t)bn + 1)))
        goto fail;
    vsnprintf(body, (size_t)bn + 1, fmt, ap);

    char where[32] = "";
    if (line > 0)
        snprintf(where, sizeof(where), ":%d", line);
    const char *f = file ? file : "<config>";
    const char *k = key ? key : "";
    const char *ksep = key ? ": " : "";
    int n = snprintf(NULL, 0, "%s%s: %s%s%s", f, where, k, ksep, body);
    if (n < 0 || !(msg = emx_malloc((size_t)n + 1)))
        goto fail;
    snprintf(msg, (size_t)n + 1, "%s%s: %s%s%s", f, where, k, ksep, body);
    char **nm = emx_realloc(e->msgs, (e->count + 1) * sizeof(*nm));
    if (!nm)
        goto fail;
    e->msgs = nm;
    e->msgs[e->count++] = msg;
    emx_free(body);
    return;
fail:
    emx_free(body);
    emx_free(msg);
    e->dropped++;
}

void emx_errors_add(struct emx_errors *e, const char *file, int line, const char *key,
                    const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    errors_vadd(e, file, line, key, fmt, ap);
    va_end(ap);
}

void emx_errors_free(struct emx_errors *e)
{
    if (!e)
        return;
    for (size_t i = 0; i < e->count; i++)
        emx_free(e->msgs[i]);
    emx_free(e->msgs);
    e->msgs = NULL;
    e->count = 0;
    e->dropped = 0;
}

/* A value quoted in a message: at most SHOW_MAX characters, control bytes
 * replaced, so a hostile config cannot forge log lines. */
static const char *show(const char *v, char *buf, size_t cap)
{
    size_t i = 0;
    for (; v[i] && i < SHOW_MAX && i + 4 < cap; i++)
        buf[i] = (unsigned char)v[i] < 0x20 || v[i] == 0x7f ? '?' : v[i];
    if (v[i]) {
        memcpy(buf + i, "...", 3);
        i += 3;
    }
    buf[i] = '\0';
    return buf;
}

/* ---- the YAML tree ---- */

static void node_clear(struct emx_node *n)
{
    for (size_t i = 0; i < n->count; i++)
        node_clear(&n->children[i]);
    emx_free(n->children);
    emx_free(n->value);
    emx_free(n->key);
    emx_free(n->strs);
    emx_free(n->file_owned);
}

void emx_node_free(struct emx_node *n)
{
    if (!n)
        return;
    node_clear(n);
    emx_free(n);
}

struct emx_node *emx_node_get(const struct emx_node *map, const char *key)
{
    if (!map || map->kind != EMX_NODE_MAP)
        return NULL;
    for (size_t i = 0; i < map->count; i++)
        if (strcmp(map->children[i].key, key) == 0)
            return &map->children[i];
    return NULL;
}

static const char *kind_name(const struct emx_node *n)
{
    switch (n->kind) {
    case EMX_NODE_MAP:
        return "a map";
    case EMX_NODE_SEQ:
        return "a list";
    default:
        return "a single value";
    }
}

struct yparse {
    yaml_parser_t p;
    const char *file;
    const char *text;
    size_t len;
    struct emx_errors *errs;
    int nerr;
    bool oom;
    int depth;
    const char *path[YAML_MAX_DEPTH + 1]; /* key of each open map level; NULL in lists */
};

static void yerr(struct yparse *y, int line, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void yerr(struct yparse *y, int line, const char *key, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    errors_vadd(y->errs, y->file, line, key, fmt, ap);
    va_end(ap);
    y->nerr++;
}

static int yoom(struct yparse *y, int line)
{
    if (!y->oom)
        yerr(y, line, NULL, "out of memory");
    y->oom = true;
    return -ENOMEM;
}

/* "a.b.c" for the keys open at levels [0, depth) plus `last`. */
static const char *ypath(const struct yparse *y, int depth, const char *last, char *buf, size_t cap)
{
    size_t pos = 0;
    buf[0] = '\0';
    for (int i = 0; i <= depth; i++) {
        const char *k = i < depth ? y->path[i] : last;
        if (!k)
            continue;
        int n = snprintf(buf + pos, cap - pos, "%s%s", pos ? "." : "", k);
        if (n < 0 || (size_t)n >= cap - pos)
            break;
        pos += (size_t)n;
    }
    return buf;
}

static int line_of_offset(const struct yparse *y, size_t off)
{
    int line = 1;
    for (size_t i = 0; i < off && i < y->len; i++)
        line += y->text[i] == '\n';
    return line;
}

static int next_event(struct yparse *y, yaml_event_t *ev)
{
    if (yaml_parser_parse(&y->p, ev))
        return 0;
    if (y->p.error == YAML_MEMORY_ERROR)
        return yoom(y, 0);
    int line = y->p.error == YAML_READER_ERROR ? line_of_offset(y, y->p.problem_offset)
                                               : (int)y->p.problem_mark.line + 1;
    const char *problem = y->p.problem ? y->p.problem : "cannot parse";
    if (y->p.context)
        yerr(y, line, NULL, "YAML syntax error: %s (%s)", problem, y->p.context);
    else
        yerr(y, line, NULL, "YAML syntax error: %s", problem);
    return -EINVAL;
}

static bool is_null_text(const char *s)
{
    return !*s || strcmp(s, "~") == 0 || strcmp(s, "null") == 0 || strcmp(s, "Null") == 0 ||
           strcmp(s, "NULL") == 0;
}

/* Room for one more child; arrays grow by doubling. */
static int grow(struct emx_node *n)
{
    size_t c = n->count; /* capacity: 4, then doubled at each power of two */
    if (c && (c < 4 || (c & (c - 1))))
        return 0;
    size_t cap = c ? c * 2 : 4;
    struct emx_node *nc = emx_realloc(n->children, cap * sizeof(*nc));
    if (!nc)
        return -ENOMEM;
    n->children = nc;
    return 0;
}

static int build(struct yparse *y, yaml_event_t *ev, struct emx_node *n);

static int refuse_anchor(struct yparse *y, const yaml_event_t *ev, const yaml_char_t *anchor)
{
    if (!anchor)
        return 0;
    yerr(y, (int)ev->start_mark.line + 1, NULL,
         "YAML anchors (&) are not allowed: a config is data, not a graph");
    return -EINVAL;
}

static int build_seq(struct yparse *y, struct emx_node *n)
{
    y->path[y->depth++] = NULL;
    for (;;) {
        yaml_event_t ev;
        int rc = next_event(y, &ev);
        if (rc)
            return rc;
        if (ev.type == YAML_SEQUENCE_END_EVENT) {
            yaml_event_delete(&ev);
            break;
        }
        if (grow(n)) {
            yaml_event_delete(&ev);
            return yoom(y, n->line);
        }
        struct emx_node *c = &n->children[n->count++];
        memset(c, 0, sizeof(*c));
        if ((rc = build(y, &ev, c)))
            return rc;
    }
    y->depth--;
    return 0;
}

static int cmp_key(const void *a, const void *b)
{
    const struct emx_node *x = *(const struct emx_node *const *)a;
    const struct emx_node *y = *(const struct emx_node *const *)b;
    int c = strcmp(x->key, y->key);
    if (c)
        return c;
    return x < y ? -1 : x > y; /* same array: keeps file order among equals */
}

static void report_dup(struct yparse *y, const struct emx_node *first, const struct emx_node *again)
{
    char kb[256];
    yerr(y, again->key_line, ypath(y, y->depth - 1, again->key, kb, sizeof(kb)),
         "duplicate key (first set at line %d)", first->key_line);
}

/* Duplicate keys are reported but do not stop the parse: the operator sees
 * every one at once. Large maps are sorted so a hostile input stays fast. */
static int check_dups(struct yparse *y, struct emx_node *n)
{
    if (n->count <= 32) {
        for (size_t i = 1; i < n->count; i++)
            for (size_t j = 0; j < i; j++)
                if (strcmp(n->children[i].key, n->children[j].key) == 0) {
                    report_dup(y, &n->children[j], &n->children[i]);
                    break;
                }
        return 0;
    }
    struct emx_node **v = emx_malloc(n->count * sizeof(*v));
    if (!v)
        return yoom(y, n->line);
    for (size_t i = 0; i < n->count; i++)
        v[i] = &n->children[i];
    qsort(v, n->count, sizeof(*v), cmp_key);
    for (size_t i = 1, first = 0; i < n->count; i++) {
        if (strcmp(v[i]->key, v[first]->key) == 0)
            report_dup(y, v[first], v[i]);
        else
            first = i;
    }
    emx_free(v);
    return 0;
}

static int build_map(struct yparse *y, struct emx_node *n)
{
    int level = y->depth++;
    y->path[level] = NULL;
    for (;;) {
        yaml_event_t ev;
        int rc = next_event(y, &ev);
        if (rc)
            return rc;
        if (ev.type == YAML_MAPPING_END_EVENT) {
            yaml_event_delete(&ev);
            break;
        }
        int kline = (int)ev.start_mark.line + 1;
        if (ev.type != YAML_SCALAR_EVENT) {
            char kb[256];
            yerr(y, kline, ypath(y, level, NULL, kb, sizeof(kb)), "keys must be plain strings");
            yaml_event_delete(&ev);
            return -EINVAL;
        }
        if ((rc = refuse_anchor(y, &ev, ev.data.scalar.anchor))) {
            yaml_event_delete(&ev);
            return rc;
        }
        const char *kt = (const char *)ev.data.scalar.value;
        size_t klen = ev.data.scalar.length;
        if (klen == 0 || memchr(kt, '\0', klen)) {
            char kb[256];
            yerr(y, kline, ypath(y, level, NULL, kb, sizeof(kb)),
                 klen ? "a key contains a NUL character" : "empty key");
            yaml_event_delete(&ev);
            return -EINVAL;
        }
        if (grow(n)) {
            yaml_event_delete(&ev);
            return yoom(y, kline);
        }
        struct emx_node *c = &n->children[n->count];
        memset(c, 0, sizeof(*c));
        c->key = emx_strndup(kt, klen);
        yaml_event_delete(&ev);
        if (!c->key)
            return yoom(y, kline);
        n->count++;
        c->key_line = kline;
        y->path[level] = c->key;

        if ((rc = next_event(y, &ev)))
            return rc;
        if ((rc = build(y, &ev, c)))
            return rc;
    }
    y->path[level] = NULL;
    int rc = check_dups(y, n);
    y->depth--;
    return rc;
}

/* Builds n from the event that starts it; consumes ev. */
static int build(struct yparse *y, yaml_event_t *ev, struct emx_node *n)
{
    int rc = 0;
    n->file = y->file;
    n->line = (int)ev->start_mark.line + 1;
    switch (ev->type) {
    case YAML_SCALAR_EVENT: {
        n->kind = EMX_NODE_SCALAR;
        if ((rc = refuse_anchor(y, ev, ev->data.scalar.anchor)))
            break;
        const char *v = (const char *)ev->data.scalar.value;
        size_t len = ev->data.scalar.length;
        if (memchr(v, '\0', len)) {
            char kb[256];
            yerr(y, n->line, ypath(y, y->depth, NULL, kb, sizeof(kb)),
                 "value contains a NUL character");
            rc = -EINVAL;
            break;
        }
        if (!(n->value = emx_strndup(v, len))) {
            rc = yoom(y, n->line);
            break;
        }
        n->is_null = ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE && is_null_text(n->value);
        break;
    }
    case YAML_SEQUENCE_START_EVENT:
    case YAML_MAPPING_START_EVENT: {
        bool map = ev->type == YAML_MAPPING_START_EVENT;
        n->kind = map ? EMX_NODE_MAP : EMX_NODE_SEQ;
        if ((rc = refuse_anchor(
                 y, ev, map ? ev->data.mapping_start.anchor : ev->data.sequence_start.anchor)))
            break;
        if (y->depth >= YAML_MAX_DEPTH) {
            yerr(y, n->line, NULL, "nested more than %d levels deep", YAML_MAX_DEPTH);
            rc = -EINVAL;
            break;
        }
        yaml_event_delete(ev);
        return map ? build_map(y, n) : build_seq(y, n);
    }
    case YAML_ALIAS_EVENT:
        yerr(y, n->line, NULL, "YAML aliases (*) are not allowed: a config is data, not a graph");
        rc = -EINVAL;
        break;
    default:
        yerr(y, n->line, NULL, "YAML syntax error: unexpected event");
        rc = -EINVAL;
        break;
    }
    yaml_event_delete(ev);
    return rc;
}

static int parse_doc(struct yparse *y, struct emx_node *root)
{
    yaml_event_t ev;
    int rc;
    if ((rc = next_event(y, &ev)))
        return rc;
    yaml_event_delete(&ev); /* STREAM-START */
    if ((rc = next_event(y, &ev)))
        return rc;
    if (ev.type == YAML_STREAM_END_EVENT) {
        yaml_event_delete(&ev);
        yerr(y, 1, NULL, "empty configuration: expected a map of sections");
        return -EINVAL;
    }
    yaml_event_delete(&ev); /* DOCUMENT-START */
    if ((rc = next_event(y, &ev)))
        return rc;
    if ((rc = build(y, &ev, root)))
        return rc;
    if ((rc = next_event(y, &ev)))
        return rc;
    yaml_event_delete(&ev); /* DOCUMENT-END */
    if ((rc = next_event(y, &ev)))
        return rc;
    int line = (int)ev.start_mark.line + 1;
    bool more = ev.type != YAML_STREAM_END_EVENT;
    yaml_event_delete(&ev);
    if (more) {
        yerr(y, line, NULL, "only one YAML document is allowed");
        return -EINVAL;
    }
    if (root->kind == EMX_NODE_SCALAR && root->is_null) {
        yerr(y, 1, NULL, "empty configuration: expected a map of sections");
        return -EINVAL;
    }
    if (root->kind != EMX_NODE_MAP) {
        yerr(y, root->line, NULL, "the top level must be a map of sections, not %s",
             kind_name(root));
        return -EINVAL;
    }
    return 0;
}

int emx_yaml_parse(const char *file, const char *text, size_t len, struct emx_node **out,
                   struct emx_errors *errs)
{
    *out = NULL;
    struct yparse *y = emx_calloc(1, sizeof(*y));
    struct emx_node *root = emx_calloc(1, sizeof(*root));
    char *fcopy = emx_strdup(file ? file : "<config>");
    if (!y || !root || !fcopy) {
        emx_errors_add(errs, file, 0, NULL, "out of memory");
        emx_free(y);
        emx_free(root);
        emx_free(fcopy);
        return -ENOMEM;
    }
    root->file_owned = fcopy;
    root->file = fcopy;
    y->file = fcopy;
    y->text = text;
    y->len = len;
    y->errs = errs;
    if (!yaml_parser_initialize(&y->p)) {
        emx_errors_add(errs, file, 0, NULL, "out of memory");
        emx_node_free(root);
        emx_free(y);
        return -ENOMEM;
    }
    yaml_parser_set_input_string(&y->p, (const unsigned char *)text, len);
    int rc = parse_doc(y, root);
    yaml_parser_delete(&y->p);
    if (!rc && y->nerr)
        rc = -EINVAL;
    if (y->oom)
        rc = -ENOMEM;
    emx_free(y);
    if (rc) {
        emx_node_free(root);
        return rc;
    }
    *out = root;
    return 0;
}

/* ---- values ---- */

/* Decimal digits at *p (at least one) → *out; -EINVAL on overflow. */
static int parse_digits(const char **p, uint64_t *out)
{
    const char *s = *p;
    uint64_t v = 0;
    if (!isdigit((unsigned char)*s))
        return -EINVAL;
    for (; isdigit((unsigned char)*s); s++) {
        unsigned d = (unsigned)(*s - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -EINVAL;
        v = v * 10 + d;
    }
    *p = s;
    *out = v;
    return 0;
}

int emx_parse_size(const char *text, uint64_t *out)
{
    static const struct {
        const char *unit;
        unsigned shift;
    } units[] = {
        {"", 0},    {"b", 0},    {"k", 10}, {"kb", 10}, {"kib", 10}, {"m", 20},
        {"mb", 20}, {"mib", 20}, {"g", 30}, {"gb", 30}, {"gib", 30},
    };
    const char *p = text;
    uint64_t v;
    if (!text || parse_digits(&p, &v))
        return -EINVAL;
    if (*p == ' ' && p[1])
        p++; /* "64 KiB" */
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        if (strcasecmp(p, units[i].unit) != 0)
            continue;
        if (v > (UINT64_MAX >> units[i].shift))
            return -EINVAL;
        *out = v << units[i].shift;
        return 0;
    }
    return -EINVAL;
}

/* bare_ms: a bare integer is milliseconds (keys ending in "-ms"). */
static int parse_duration(const char *text, bool bare_ms, uint64_t *out)
{
    static const struct {
        const char *unit;
        uint64_t ms;
    } units[] = {
        {"ms", 1},         {"millis", 1},      {"millisecond", 1}, {"milliseconds", 1},
        {"s", 1000},       {"second", 1000},   {"seconds", 1000},  {"m", 60000},
        {"min", 60000},    {"minute", 60000},  {"minutes", 60000}, {"h", 3600000},
        {"hour", 3600000}, {"hours", 3600000},
    };
    const char *p = text;
    uint64_t whole, frac = 0, scale = 1;
    if (!text || parse_digits(&p, &whole))
        return -EINVAL;
    bool decimal = *p == '.';
    if (decimal) {
        p++;
        if (!isdigit((unsigned char)*p))
            return -EINVAL;
        for (; isdigit((unsigned char)*p); p++) {
            if (scale >= 1000000000u) { /* digits past 1e-9 must be zeros */
                if (*p != '0')
                    return -EINVAL;
                continue;
            }
            frac = frac * 10 + (uint64_t)(*p - '0');
            scale *= 10;
        }
    }
    if (*p == '\0') {
        if (whole == 0 && frac == 0) {
            *out = 0;
            return 0;
        }
        if (bare_ms && !decimal) {
            *out = whole;
            return 0;
        }
        return -EINVAL; /* ambiguous: seconds or milliseconds? */
    }
    if (*p == ' ' && p[1])
        p++;
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        if (strcasecmp(p, units[i].unit) != 0)
            continue;
        uint64_t fms = frac * units[i].ms; /* < 1e9 * 3.6e6: no overflow */
        if (fms % scale)
            return -EINVAL; /* finer than a millisecond */
        fms /= scale;
        if (whole > (UINT64_MAX - fms) / units[i].ms)
            return -EINVAL;
        *out = whole * units[i].ms + fms;
        return 0;
    }
    return -EINVAL;
}

int emx_parse_duration(const char *text, uint64_t *out)
{
    return parse_duration(text, false, out);
}

int emx_parse_bool(const char *text, bool *out)
{
    static const char *const yes[] = {"true", "yes", "on"};
    static const char *const no[] = {"false", "no", "off"};
    if (!text)
        return -EINVAL;
    for (size_t i = 0; i < 3; i++) {
        if (strcasecmp(text, yes[i]) == 0) {
            *out = true;
            return 0;
        }
        if (strcasecmp(text, no[i]) == 0) {
            *out = false;
            return 0;
        }
    }
    return -EINVAL;
}

static int parse_int(const char *text, int64_t *out)
{
    const char *p = text;
    bool neg = *p == '-';
    uint64_t v;
    p += neg;
    if (parse_digits(&p, &v) || *p)
        return -EINVAL;
    if (neg) {
        if (v > (uint64_t)INT64_MAX + 1)
            return -EINVAL;
        *out = v == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)v;
    } else {
        if (v > (uint64_t)INT64_MAX)
            return -EINVAL;
        *out = (int64_t)v;
    }
    return 0;
}

/* ---- binding ---- */

struct binder {
    struct emx_errors *errs;
    int nerr;
    bool oom;
};

static void berr(struct binder *b, const char *file, int line, const char *key, const char *fmt,
                 ...) __attribute__((format(printf, 5, 6)));

static void berr(struct binder *b, const char *file, int line, const char *key, const char *fmt,
                 ...)
{
    va_list ap;
    va_start(ap, fmt);
    errors_vadd(b->errs, file, line, key, fmt, ap);
    va_end(ap);
    b->nerr++;
}

static void mark_used(struct emx_node *n)
{
    n->used = true;
    for (size_t i = 0; i < n->count; i++)
        mark_used(&n->children[i]);
}

static const char *type_name(enum emx_opt_type t)
{
    switch (t) {
    case EMX_OPT_BOOL:
        return "a boolean (true/false)";
    case EMX_OPT_INT:
        return "an integer";
    case EMX_OPT_SIZE:
        return "a size (64KiB, 1MiB)";
    case EMX_OPT_DURATION:
        return "a duration (250ms, 30s)";
    case EMX_OPT_STRING_LIST:
        return "a list of strings";
    default:
        return "a string";
    }
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static void *field(void *out, const struct emx_option *o)
{
    return (char *)out + o->offset;
}

/* What is wrong with a value: "<what> '<value>'<advice>". */
struct bad {
    const char *what;
    const char *advice;
};

/* Parses `text` (a value from the tree, or the table's default) into the
 * option's field. Returns 0, or -EINVAL with *bad set for the message. */
static int store_text(const struct emx_option *o, const char *text, const char *matched_key,
                      void *out, struct bad *bad)
{
    void *dst = field(out, o);
    switch (o->type) {
    case EMX_OPT_STRING:
    case EMX_OPT_SECRET:
        *(const char **)dst = text;
        return 0;
    case EMX_OPT_BOOL:
        *bad = (struct bad){"invalid boolean", " (use true or false)"};
        return emx_parse_bool(text, (bool *)dst);
    case EMX_OPT_INT: {
        int64_t v;
        *bad = (struct bad){"invalid integer", ""};
        if (parse_int(text, &v))
            return -EINVAL;
        *(int64_t *)dst = v;
        return 0;
    }
    case EMX_OPT_SIZE: {
        uint64_t v;
        *bad = (struct bad){"invalid size", " (use 64KiB, 1MiB)"};
        if (emx_parse_size(text, &v))
            return -EINVAL;
        *(uint64_t *)dst = v;
        return 0;
    }
    case EMX_OPT_DURATION: {
        uint64_t v;
        /* the Connection Server's idle-timeout is in milliseconds too */
        bool bare_ms = matched_key && (ends_with(matched_key, "-ms") ||
                                       strcmp(matched_key, "cx-server.tunneling.idle-timeout") == 0);
        if (parse_duration(text, bare_ms, &v)) {
            const char *p = text;
            uint64_t ignored;
            bool bare = parse_digits(&p, &ignored) == 0 && *p == '\0';
            bad->what = "invalid duration";
            bad->advice = bare ? " (a bare number is ambiguous: add a unit, e.g. 30s or 250ms)"
                               : " (use 250ms, 30s, 5m, 1h)";
            return -EINVAL;
        }
        *(uint64_t *)dst = v;
        return 0;
    }
    case EMX_OPT_STRING_LIST: {
        struct emx_strlist *l = dst;
        l->count = 0;
        l->items = NULL;
        if (text && *text) {
            l->count = 1;
            l->items = &o->def; /* defaults only: one item, the static text */
        }
        return 0;
    }
    }
    *bad = (struct bad){"option of unknown type for", ""};
    return -EINVAL;
}

static void clear_field(const struct emx_option *o, void *out)
{
    void *dst = field(out, o);
    switch (o->type) {
    case EMX_OPT_STRING:
    case EMX_OPT_SECRET:
        *(const char **)dst = NULL;
        break;
    case EMX_OPT_BOOL:
        *(bool *)dst = false;
        break;
    case EMX_OPT_INT:
        *(int64_t *)dst = 0;
        break;
    case EMX_OPT_SIZE:
    case EMX_OPT_DURATION:
        *(uint64_t *)dst = 0;
        break;
    case EMX_OPT_STRING_LIST:
        memset(dst, 0, sizeof(struct emx_strlist));
        break;
    }
}

static void bind_list(struct binder *b, const struct emx_option *o, struct emx_node *n,
                      const char *key, void *out)
{
    struct emx_strlist *l = field(out, o);
    if (n->kind == EMX_NODE_MAP) {
        berr(b, n->file, n->line, key, "expected %s, got a map", type_name(o->type));
        return;
    }
    size_t count = n->kind == EMX_NODE_SEQ ? n->count : 1;
    for (size_t i = 0; n->kind == EMX_NODE_SEQ && i < count; i++) {
        const struct emx_node *it = &n->children[i];
        if (it->kind != EMX_NODE_SCALAR || it->is_null) {
            berr(b, it->file, it->line, key, "list items must be strings, got %s",
                 it->is_null ? "an empty item" : kind_name(it));
            return;
        }
    }
    if (count == 0) {
        l->count = 0;
        l->items = NULL;
        return;
    }
    if (!n->strs) { /* bound once, shared by every later binding of this node */
        if (!(n->strs = emx_calloc(count, sizeof(*n->strs)))) {
            if (!b->oom)
                berr(b, n->file, n->line, key, "out of memory");
            b->oom = true;
            return;
        }
        for (size_t i = 0; i < count; i++)
            n->strs[i] = n->kind == EMX_NODE_SEQ ? n->children[i].value : n->value;
    }
    l->count = count;
    l->items = n->strs;
}

static void bind_node(struct binder *b, const struct emx_option *o, struct emx_node *n,
                      const char *key, const char *matched, void *out)
{
    if (o->type == EMX_OPT_STRING_LIST) {
        bind_list(b, o, n, key, out);
        return;
    }
    if (n->kind != EMX_NODE_SCALAR) {
        berr(b, n->file, n->line, key, "expected %s, got %s", type_name(o->type), kind_name(n));
        return;
    }
    struct bad bad = {NULL, NULL};
    if (store_text(o, n->value, matched, out, &bad)) {
        char sb[64];
        /* Never quote a secret; its type cannot fail to parse, but be sure. */
        const char *v = o->type == EMX_OPT_SECRET ? "(secret)" : show(n->value, sb, sizeof(sb));
        berr(b, n->file, n->line, key, "%s '%s'%s", bad.what, v, bad.advice);
    }
}

static bool in_list(const char *const *list, const char *s)
{
    for (; list && *list; list++)
        if (strcmp(*list, s) == 0)
            return true;
    return false;
}

static void key_name(char *buf, size_t cap, const char *section, const char *key)
{
    if (section && *section && !strchr(key, '.'))
        snprintf(buf, cap, "%s.%s", section, key);
    else
        snprintf(buf, cap, "%s", key);
}

struct hit {
    struct emx_node *node;
    const char *key; /* as written */
};

/* Where option o is set: by name or alias in `map`, by a dotted alias at the
 * top of `root`. Returns how many places (each filled into hits). */
static int find_option(const struct emx_option *o, const struct emx_node *map,
                       const struct emx_node *root, struct hit hits[3])
{
    int n = 0;
    struct emx_node *x;
    if ((x = emx_node_get(map, o->name)))
        hits[n++] = (struct hit){x, o->name};
    if (o->alias && (x = emx_node_get(map, o->alias)))
        hits[n++] = (struct hit){x, o->alias};
    if (o->alias && root != map && strchr(o->alias, '.') && (x = emx_node_get(root, o->alias)))
        hits[n++] = (struct hit){x, o->alias};
    return n;
}

static void bind_table(struct binder *b, const struct emx_option *table, const struct emx_node *map,
                       struct emx_node *root, bool defaults, const char *section,
                       const char *const *skip, void *out)
{
    const struct emx_node *at = map ? map : root;
    const char *file = at ? at->file : NULL;
    int line = at ? (at->key_line ? at->key_line : at->line) : 0;
    for (const struct emx_option *o = table; o && o->name; o++) {
        if (in_list(skip, o->name))
            continue;
        char kb[256];
        struct hit hits[3];
        int n = find_option(o, map, root, hits);
        for (int i = 0; i < n; i++)
            mark_used(hits[i].node);
        if (n > 1) {
            if (hits[1].node->key_line < hits[0].node->key_line) { /* tell in file order */
                struct hit t = hits[0];
                hits[0] = hits[1];
                hits[1] = t;
            }
            key_name(kb, sizeof(kb), section, o->name);
            berr(b, hits[1].node->file, hits[1].node->key_line, kb,
                 "set twice: as '%s' (line %d) and as '%s' (line %d); keep one", hits[0].key,
                 hits[0].node->key_line, hits[1].key, hits[1].node->key_line);
        }
        if (n > 0 && !hits[0].node->is_null) {
            key_name(kb, sizeof(kb), section, hits[0].key);
            bind_node(b, o, hits[0].node, kb, hits[0].key, out);
            continue;
        }
        if (!defaults)
            continue;
        key_name(kb, sizeof(kb), section, o->name);
        struct bad bad = {NULL, NULL};
        if (o->def) {
            char sb[64];
            if (store_text(o, o->def, NULL, out, &bad))
                berr(b, file, line, kb, "bad default in the option table: %s '%s'%s", bad.what,
                     show(o->def, sb, sizeof(sb)), bad.advice);
        } else if (o->required) {
            berr(b, file, line, kb, "required key is missing");
        } else {
            clear_field(o, out);
        }
    }
}

int emx_options_bind_section(const struct emx_option *table, const struct emx_node *map,
                             struct emx_node *root, const char *section, const char *const *skip,
                             void *out, struct emx_errors *errs)
{
    struct binder b = {errs, 0, false};
    if (map && map->kind != EMX_NODE_MAP) {
        if (!map->is_null)
            berr(&b, map->file, map->line, section, "expected a map of settings, got %s",
                 kind_name(map));
        map = NULL;
    }
    bind_table(&b, table, map, root, true, section, skip, out);
    return b.nerr;
}

int emx_options_bind(const struct emx_option *table, const struct emx_node *map,
                     const char *section, const char *const *skip, void *out,
                     struct emx_errors *errs)
{
    return emx_options_bind_section(table, map, NULL, section, skip, out, errs);
}

int emx_options_bind_aliases(const struct emx_option *table, struct emx_node *root, void *out,
                             struct emx_errors *errs)
{
    struct binder b = {errs, 0, false};
    for (const struct emx_option *o = table; o && o->name; o++) {
        struct emx_node *n;
        if (!o->alias || !strchr(o->alias, '.') || !(n = emx_node_get(root, o->alias)))
            continue;
        mark_used(n);
        if (!n->is_null)
            bind_node(&b, o, n, o->alias, o->alias, out);
    }
    return b.nerr;
}

/* ---- the core's settings ---- */

#define CX_WS "cx-server.transport.websockets."
#define OPT(sec, name, alias, type, def, req, help)                                                \
    {                                                                                              \
#name, alias, EMX_OPT_##type, def, req, offsetof(struct emx_config, sec.name), help        \
    }

const struct emx_option emx_core_options_server[] = {
    OPT(server, name, "cx-server.thing.name", STRING, NULL, true,
        "unique name of this edgemux, sent to platforms as X-Edgemux-Server"),
    OPT(server, workers, NULL, INT, "1", false,
        "event-loop threads, each with its own edge listener and pipes (1..16)"),
    OPT(server, user, NULL, STRING, NULL, false,
        "user to switch to after opening listeners (none: stay as started)"),
    EMX_OPTION_END,
};

static const struct emx_option plugins_options[] = {
    OPT(plugins, dir, NULL, STRING, EMX_DEFAULT_PLUGIN_DIR, false,
        "directory that holds emx-<kind>-<name>.so"),
    EMX_OPTION_END,
};

static const struct emx_option log_options[] = {
    OPT(log, level, NULL, STRING, "info", false, "error, warn, info or debug"),
    OPT(log, format, NULL, STRING, "text", false, "text, or json (one object per line)"),
    EMX_OPTION_END,
};

const struct emx_option emx_core_options_edge[] = {
    OPT(edge, address, NULL, STRING, "0.0.0.0", false, "address the edge listener binds"),
    OPT(edge, port, "cx-server.protocol.port", INT, "8080", false, "port of the edge listener"),
    OPT(edge, path, NULL, STRING, "/Thingworx/WS", false, "WebSocket path devices connect to"),
    OPT(edge, tls_cert, NULL, STRING, NULL, false,
        "PEM certificate served to devices (none: plain ws, TLS ends at HAProxy)"),
    OPT(edge, tls_key, NULL, STRING, NULL, false, "PEM private key of tls_cert"),
    OPT(edge, tls_ca, NULL, STRING, NULL, false, "PEM CA bundle for client certificates"),
    OPT(edge, tls_client_cert, NULL, BOOL, "false", false,
        "ask devices for a client certificate (SDK devices use app keys)"),
    OPT(edge, max_message_size, NULL, SIZE, "2MiB", false,
        "largest AlwaysOn message (all chunks) accepted from a device"),
    OPT(edge, max_preauth_message, NULL, SIZE, "4KiB", false,
        "largest WebSocket message (after inflation) a device may send before its AUTH "
        "succeeds; more closes it 1009 (an SDK AUTH is ~60 bytes)"),
    OPT(edge, auth_timeout, NULL, DURATION, "15s", false,
        "a device must authenticate this soon after connecting"),
    OPT(edge, idle_timeout, NULL, DURATION, "120s", false,
        "drop a device that sent nothing (not even a ping) this long"),
    OPT(edge, request_timeout, NULL, DURATION, "30s", false,
        "a device must answer a platform request within this time (else 0xA4)"),
    OPT(edge, max_pending, NULL, INT, "500", false,
        "requests of one device in flight before 0xA3 (the SDK's queue size)"),
    OPT(edge, max_queued, NULL, SIZE, "1MiB", false,
        "bytes queued to one slow device before it is closed"),
    OPT(edge, max_connections, NULL, INT, "0", false, "devices at once; 0: unlimited"),
    OPT(edge, deflate, NULL, BOOL, "true", false,
        "accept permessage-deflate (bounded windows; costs memory per device)"),
    OPT(edge, trusted_proxies, NULL, STRING_LIST, NULL, false,
        "IPs or CIDR blocks (HAProxy) whose X-Forwarded-For names the device"),
    OPT(edge, max_connections_per_source, NULL, INT, "0", false,
        "devices at once from one real address; 0: unlimited"),
    OPT(edge, max_msgs_per_sec, NULL, INT, "0", false,
        "requests per second from one device (burst: one second's worth); 0: unlimited"),
    OPT(edge, max_things, NULL, INT, "10000", false,
        "Things one device may bind, BINDs in flight included (over: BIND answered 0x83); "
        "0: unlimited"),
    OPT(edge, drain_spread, NULL, DURATION, "5s", false,
        "on SIGTERM, devices are closed (1001) spread over this time"),
    OPT(edge, max_bytes_in_flight, NULL, SIZE, "256KiB", false,
        "request bytes of one device forwarded and not yet answered; at it, new requests "
        "are answered 0xA3 (one request is always let through); 0: unlimited"),
    OPT(edge, max_answer_backlog, NULL, SIZE, "512KiB", false,
        "bytes sent to one device that it has not read; over it, its new requests are "
        "answered 0xA3 until it reads (below max_queued); 0: unlimited"),
    OPT(edge, max_memory, NULL, SIZE, "1GiB", false,
        "request bytes in flight plus unread answer bytes of all devices; over it, new "
        "requests are answered 0xA0 \"server busy\"; 0: unlimited"),
    OPT(edge, max_tunnels, "cx-server.tunneling.max-concurrent-tunnels", INT, "50", false,
        "Remote Access tunnels at once (StartTunnels recorded); over it a StartTunnel is "
        "answered 0xA3 and not forwarded; 0: unlimited"),
    OPT(edge, max_tunnels_per_device, NULL, INT, "50", false,
        "tunnels at once through one device connection (over: 0xA3); 0: unlimited"),
    OPT(edge, max_tunnels_per_source, NULL, INT, "0", false,
        "tunnel sockets relayed at once from one device address (over: 429); 0: unlimited"),
    OPT(edge, tunnel_connect_timeout, NULL, DURATION, "30s", false,
        "a tunnel record no tunnel socket claimed is dropped after this (the SDK dials within "
        "ms of StartTunnel and gives up after 10 s)"),
    OPT(edge, tunnels, NULL, BOOL, "true", false,
        "relay Remote Access tunnel sockets (/Thingworx/WSTunnelServer/, WSTunnelClient/) to "
        "the instance that owns each tunnel; false: those paths are answered 404"),
    OPT(edge, tunnel_idle_timeout, "cx-server.tunneling.idle-timeout", DURATION, "30s", false,
        "a relayed tunnel with no message either way for this long is closed 1001 on both "
        "sides; 0: never"),
    OPT(edge, tunnel_headers_to_copy, "cx-server.tunneling.headers-to-copy", STRING_LIST, NULL,
        false,
        "request headers of a tunnel socket passed on to the owner instance (appKey and "
        "Cookie are the ones edgemux keeps); unset: appKey and Cookie"),
    OPT(edge, tunnel_drain_timeout, NULL, DURATION, "30s", false,
        "on SIGTERM, open tunnels may finish for this long, then they are closed 1001"),
    EMX_OPTION_END,
};

const struct emx_option emx_core_options_platform[] = {
    OPT(platform, path, NULL, STRING, "/Thingworx/WS", false,
        "WebSocket path of the platform's AlwaysOn endpoint"),
    OPT(platform, app_key, CX_WS "app-key", SECRET, NULL, false,
        "app key each pipe authenticates with (never logged)"),
    OPT(platform, app_key_file, NULL, STRING, NULL, false,
        "file holding the app key (instead of app_key)"),
    OPT(platform, pipes_per_instance, CX_WS "connections.pipe-count", INT, "5", false,
        "WebSockets to each platform instance, per worker (1..64)"),
    OPT(platform, high_watermark, CX_WS "connections.highWaterMark", SIZE, "64KiB", false,
        "a pipe with this many bytes queued stops taking requests"),
    OPT(platform, low_watermark, CX_WS "connections.lowWaterMark", SIZE, "32KiB", false,
        "... until its queue falls to this"),
    OPT(platform, ping_interval, CX_WS "connections.pingRate", DURATION, "30s", false,
        "how often each pipe pings its platform"),
    OPT(platform, idle_read_timeout, CX_WS "connections.idleReadTimeout", DURATION, "60s", false,
        "close a pipe that received nothing (not even a pong) this long"),
    OPT(platform, connect_timeout, CX_WS "connections.timeout-ms", DURATION, "10s", false,
        "limit on a pipe's TCP connect, TLS and WebSocket upgrade (its AUTH: request_timeout)"),
    OPT(platform, request_timeout, CX_WS "request.default_timeout-ms", DURATION, "8s", false,
        "a platform must answer within this (else 0xA4; under the SDK's 10 s)"),
    OPT(platform, stall_after, NULL, DURATION, "2s", false,
        "a pipe with requests pending that received nothing this long is not writable"),
    OPT(platform, multipart_pin_wait, NULL, DURATION, "2s", false,
        "how long a multipart message waits for its pinned pipe (0: CX behaviour)"),
    OPT(platform, all_down_grace, NULL, DURATION, "3s", false,
        "with no connected pipe this long, devices are closed (0: at once)"),
    OPT(platform, close_spread, NULL, DURATION, "0", false,
        "spread those closes over this time, so devices do not reconnect at once"),
    OPT(platform, sndbuf, NULL, SIZE, "256KiB", false,
        "SO_SNDBUF of each pipe: small, so a platform that stops reading shows soon"),
    OPT(platform, reconnect_min, NULL, DURATION, "250ms", false,
        "first retry delay of a failed pipe (doubles, with jitter)"),
    OPT(platform, reconnect_max, NULL, DURATION, "30s", false, "longest retry delay of a pipe"),
    OPT(platform, max_connecting, NULL, INT, "32", false,
        "pipes connecting at once (TCP, TLS, upgrade); the others wait their turn"),
    OPT(platform, tls_ca, NULL, STRING, NULL, false,
        "PEM CA bundle for wss platforms (none: the system's)"),
    OPT(platform, tls_cert, NULL, STRING, NULL, false, "PEM client certificate for pipes"),
    OPT(platform, tls_key, NULL, STRING, NULL, false, "PEM private key of tls_cert"),
    OPT(platform, tls_verify, NULL, BOOL, "true", false,
        "verify platform certificates (CA, host name or IP SAN)"),
    EMX_OPTION_END,
};

static const struct emx_option discovery_options[] = {
    OPT(discovery, plugin, NULL, STRING, "static", false,
        "discovery plugin: static, dns-srv, consul, zookeeper"),
    OPT(discovery, empty_confirm, NULL, DURATION, "10s", false,
        "an empty instance set is applied only after it lasts this long"),
    OPT(discovery, max_instances, NULL, INT, "1000", false,
        "a discovered set larger than this is refused (the last good set stays)"),
    EMX_OPTION_END,
};

static const struct emx_option transport_options[] = {
    OPT(transport, plugin, NULL, STRING, "ws", false, "transport plugin"),
    EMX_OPTION_END,
};

static const struct emx_option admin_options[] = {
    OPT(admin, listen, NULL, STRING, "127.0.0.1:9900", false,
        "address:port of the admin HTTP API (/health, /ready, /metrics)"),
    OPT(admin, agent_listen, NULL, STRING, "", false,
        "address:port answering HAProxy's agent-check (empty: off)"),
    OPT(admin, token_file, NULL, STRING, NULL, false,
        "file holding the bearer token the POST actions need (none: actions off)"),
    EMX_OPTION_END,
};

#undef OPT

static const struct section {
    const char *name;
    const struct emx_option *table;
    bool plugin_keys; /* holds a plugin's options too: unknown keys wait */
} sections[] = {
    {"server", emx_core_options_server, false},
    {"plugins", plugins_options, false},
    {"log", log_options, false},
    {"edge", emx_core_options_edge, false},
    {"platform", emx_core_options_platform, false},
    {"discovery", discovery_options, true},
    {"transport", transport_options, true},
    {"admin", admin_options, false},
};
#define NSECTIONS (sizeof(sections) / sizeof(sections[0]))

static const char *const plugin_core_keys[] = {"plugin", "empty_confirm", "max_instances", NULL};

struct binding {
    const struct emx_node *map; /* NULL: the section is absent */
    const struct emx_option *table;
};

struct emx_config_priv {
    size_t count;
    struct binding *b;
};

static int remember(struct emx_config *cfg, const struct emx_node *map,
                    const struct emx_option *table)
{
    struct emx_config_priv *p = cfg->priv;
    struct binding *nb = emx_realloc(p->b, (p->count + 1) * sizeof(*nb));
    if (!nb)
        return -ENOMEM;
    p->b = nb;
    p->b[p->count++] = (struct binding){map, table};
    return 0;
}

/* ---- did you mean ---- */

/* Distance of two keys, ignoring case and '-' vs '_' (optimal string
 * alignment: a swap of neighbours is one edit). Long keys are not compared. */
static int key_distance(const char *a, const char *b)
{
    enum { MAXK = 96 };
    size_t n = strlen(a), m = strlen(b);
    if (n > MAXK || m > MAXK || (n > m ? n - m : m - n) > 2)
        return INT_MAX;
    char x[MAXK + 1], y[MAXK + 1];
    for (size_t i = 0; i < n; i++)
        x[i] = a[i] == '-' ? '_' : (char)tolower((unsigned char)a[i]);
    for (size_t j = 0; j < m; j++)
        y[j] = b[j] == '-' ? '_' : (char)tolower((unsigned char)b[j]);
    int d[3][MAXK + 1]; /* rows i-2, i-1, i */
    for (size_t j = 0; j <= m; j++)
        d[0][j] = (int)j;
    for (size_t i = 1; i <= n; i++) {
        int *cur = d[i % 3], *prev = d[(i - 1) % 3], *pp = d[(i + 1) % 3];
        cur[0] = (int)i;
        for (size_t j = 1; j <= m; j++) {
            int cost = x[i - 1] != y[j - 1];
            int v = prev[j - 1] + cost;
            if (prev[j] + 1 < v)
                v = prev[j] + 1;
            if (cur[j - 1] + 1 < v)
                v = cur[j - 1] + 1;
            if (i > 1 && j > 1 && x[i - 1] == y[j - 2] && x[i - 2] == y[j - 1] && pp[j - 2] + 1 < v)
                v = pp[j - 2] + 1;
            cur[j] = v;
        }
    }
    return d[n % 3][m];
}

struct suggest {
    const char *key;
    const char *best;
    int dist;
};

static void suggest_try(struct suggest *s, const char *cand)
{
    if (!cand)
        return;
    int d = key_distance(s->key, cand);
    if (d <= 2 && d < (int)strlen(cand) && d < s->dist) {
        s->best = cand;
        s->dist = d;
    }
}

static void report_unknown(struct binder *b, const struct emx_node *n, const char *section,
                           const struct suggest *s)
{
    char kb[256];
    key_name(kb, sizeof(kb), section, n->key);
    if (s->best)
        berr(b, n->file, n->key_line, kb, "unknown key (did you mean '%s'?)", s->best);
    else
        berr(b, n->file, n->key_line, kb, "unknown key");
}

/* Unused keys of one section map; candidates are the options of every
 * table bound to it. Reported keys are marked used so they are told once. */
static void unused_in(struct binder *b, const struct emx_config *cfg, struct emx_node *map,
                      const char *section)
{
    const struct emx_config_priv *p = cfg->priv;
    for (size_t i = 0; i < map->count; i++) {
        struct emx_node *c = &map->children[i];
        if (c->used) {
            if (c->kind == EMX_NODE_MAP) /* a nested map bound by nobody's option */
                unused_in(b, cfg, c, NULL);
            continue;
        }
        struct suggest s = {c->key, NULL, INT_MAX};
        for (size_t k = 0; k < p->count; k++) {
            if (p->b[k].map != map)
                continue;
            for (const struct emx_option *o = p->b[k].table; o->name; o++) {
                suggest_try(&s, o->name);
                suggest_try(&s, o->alias);
            }
        }
        report_unknown(b, c, section, &s);
        c->used = true;
    }
}

/* Unused top-level keys; with all = false only those that cannot be a
 * plugin's flat alias (no dot). */
static void unused_top(struct binder *b, const struct emx_config *cfg, bool all)
{
    const struct emx_config_priv *p = cfg->priv;
    struct emx_node *root = cfg->root;
    for (size_t i = 0; i < root->count; i++) {
        struct emx_node *c = &root->children[i];
        if (c->used || (!all && strchr(c->key, '.')))
            continue;
        struct suggest s = {c->key, NULL, INT_MAX};
        for (size_t k = 0; k < NSECTIONS; k++)
            suggest_try(&s, sections[k].name);
        for (size_t k = 0; k < p->count; k++)
            for (const struct emx_option *o = p->b[k].table; o->name; o++)
                if (o->alias && strchr(o->alias, '.'))
                    suggest_try(&s, o->alias);
        report_unknown(b, c, NULL, &s);
        c->used = true;
    }
}

/* ---- checks after binding ---- */

/* The node that set option `name` of `sec`, for a message's file:line and
 * key; falls back to the section, then the top of the file (*set false). */
static const struct emx_node *locate(const struct emx_config *cfg, const struct section *sec,
                                     const char *name, char *kb, size_t cap, bool *set)
{
    *set = false;
    const struct emx_node *map = emx_node_get(cfg->root, sec->name);
    for (const struct emx_option *o = sec->table; o->name; o++) {
        if (strcmp(o->name, name) != 0)
            continue;
        struct hit hits[3];
        if (find_option(o, map && map->kind == EMX_NODE_MAP ? map : NULL, cfg->root, hits)) {
            key_name(kb, cap, sec->name, hits[0].key);
            *set = true;
            return hits[0].node;
        }
        break;
    }
    key_name(kb, cap, sec->name, name);
    return map ? map : cfg->root;
}

static void check(struct binder *b, const struct emx_config *cfg, int si, const char *name,
                  const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static void check(struct binder *b, const struct emx_config *cfg, int si, const char *name,
                  const char *fmt, ...)
{
    char kb[256];
    bool set;
    const struct emx_node *n = locate(cfg, &sections[si], name, kb, sizeof(kb), &set);
    va_list ap;
    va_start(ap, fmt);
    errors_vadd(b->errs, n->file, n->key_line ? n->key_line : n->line, kb, fmt, ap);
    va_end(ap);
    b->nerr++;
}

enum { S_SERVER, S_PLUGINS, S_LOG, S_EDGE, S_PLATFORM, S_DISCOVERY, S_TRANSPORT, S_ADMIN };

static void check_range(struct binder *b, const struct emx_config *cfg, int si, const char *name,
                        int64_t v, int64_t lo, int64_t hi)
{
    if (v < lo || v > hi)
        check(b, cfg, si, name, "must be between %lld and %lld (got %lld)", (long long)lo,
              (long long)hi, (long long)v);
}

static void check_positive(struct binder *b, const struct emx_config *cfg, int si, const char *name,
                           uint64_t v)
{
    if (v == 0)
        check(b, cfg, si, name, "must be more than 0");
}

static void check_size(struct binder *b, const struct emx_config *cfg, int si, const char *name,
                       uint64_t v, uint64_t lo, uint64_t hi)
{
    if (v < lo || v > hi)
        check(b, cfg, si, name, "must be between %llu and %llu bytes (got %llu)",
              (unsigned long long)lo, (unsigned long long)hi, (unsigned long long)v);
}

static void check_path(struct binder *b, const struct emx_config *cfg, int si, const char *name,
                       const char *v)
{
    char sb[64];
    if (v && v[0] != '/')
        check(b, cfg, si, name, "must start with '/' (got '%s')", show(v, sb, sizeof(sb)));
}

static void check_pair(struct binder *b, const struct emx_config *cfg, int si, const char *cert,
                       const char *key)
{
    if (cert && !key)
        check(b, cfg, si, "tls_cert", "needs tls_key too");
    if (key && !cert)
        check(b, cfg, si, "tls_key", "needs tls_cert too");
}

static void check_config(struct binder *b, const struct emx_config *cfg)
{
    char sb[64];
    enum emx_log_level level;
    enum emx_log_format format;
    if (cfg->log.level && emx_log_level_parse(cfg->log.level, &level))
        check(b, cfg, S_LOG, "level", "invalid level '%s' (use error, warn, info, debug)",
              show(cfg->log.level, sb, sizeof(sb)));
    if (cfg->log.format && emx_log_format_parse(cfg->log.format, &format))
        check(b, cfg, S_LOG, "format", "invalid format '%s' (use text or json)",
              show(cfg->log.format, sb, sizeof(sb)));

    if (cfg->server.name && !cfg->server.name[0])
        check(b, cfg, S_SERVER, "name", "must not be empty");
    check_range(b, cfg, S_SERVER, "workers", cfg->server.workers, 1, 16);

    check_range(b, cfg, S_EDGE, "port", cfg->edge.port, 1, 65535);
    check_path(b, cfg, S_EDGE, "path", cfg->edge.path);
    if (cfg->edge.max_pending < 1)
        check(b, cfg, S_EDGE, "max_pending", "must be at least 1 (got %lld)",
              (long long)cfg->edge.max_pending);
    else if (cfg->edge.max_pending > 1000000) /* the router counts in 32 bits */
        check(b, cfg, S_EDGE, "max_pending", "must be at most 1000000 (got %lld)",
              (long long)cfg->edge.max_pending);
    /* 0 would not mean "close at once" but "never": a slow device could
     * hold any amount. */
    check_positive(b, cfg, S_EDGE, "max_queued", cfg->edge.max_queued);
    if (cfg->edge.max_connections < 0)
        check(b, cfg, S_EDGE, "max_connections", "must be 0 (unlimited) or more (got %lld)",
              (long long)cfg->edge.max_connections);
    check_pair(b, cfg, S_EDGE, cfg->edge.tls_cert, cfg->edge.tls_key);
    if (cfg->edge.max_connections_per_source < 0)
        check(b, cfg, S_EDGE, "max_connections_per_source",
              "must be 0 (unlimited) or more (got %lld)",
              (long long)cfg->edge.max_connections_per_source);
    check_range(b, cfg, S_EDGE, "max_msgs_per_sec", cfg->edge.max_msgs_per_sec, 0, 1000000);
    check_range(b, cfg, S_EDGE, "max_things", cfg->edge.max_things, 0, 1000000);
    check_range(b, cfg, S_EDGE, "max_tunnels", cfg->edge.max_tunnels, 0, 1000000);
    check_range(b, cfg, S_EDGE, "max_tunnels_per_device", cfg->edge.max_tunnels_per_device, 0,
                1000000);
    check_range(b, cfg, S_EDGE, "max_tunnels_per_source", cfg->edge.max_tunnels_per_source, 0,
                1000000);
    if (cfg->edge.tunnel_connect_timeout < 1000)
        check(b, cfg, S_EDGE, "tunnel_connect_timeout", "must be at least 1s (got %llu ms)",
              (unsigned long long)cfg->edge.tunnel_connect_timeout);
    if (cfg->edge.tunnel_idle_timeout && cfg->edge.tunnel_idle_timeout < 1000)
        check(b, cfg, S_EDGE, "tunnel_idle_timeout", "must be 0 or at least 1s (got %llu ms)",
              (unsigned long long)cfg->edge.tunnel_idle_timeout);
    for (size_t i = 0; i < cfg->edge.tunnel_headers_to_copy.count; i++) {
        const char *h = cfg->edge.tunnel_headers_to_copy.items[i];
        if (!h || (strcasecmp(h, "appKey") && strcasecmp(h, "Cookie")))
            check(b, cfg, S_EDGE, "tunnel_headers_to_copy",
                  "'%s' cannot be copied (edgemux keeps appKey and Cookie of a tunnel socket)",
                  h ? h : "");
    }
    /* The shares: 0 is off; a tiny cap would refuse nearly everything. */
    if (cfg->edge.max_bytes_in_flight && cfg->edge.max_bytes_in_flight < 1024)
        check(b, cfg, S_EDGE, "max_bytes_in_flight",
              "must be 0 (unlimited) or at least 1024 bytes (got %llu)",
              (unsigned long long)cfg->edge.max_bytes_in_flight);
    if (cfg->edge.max_answer_backlog && cfg->edge.max_answer_backlog < 1024)
        check(b, cfg, S_EDGE, "max_answer_backlog",
              "must be 0 (unlimited) or at least 1024 bytes (got %llu)",
              (unsigned long long)cfg->edge.max_answer_backlog);
    else if (cfg->edge.max_answer_backlog >= cfg->edge.max_queued) {
        /* Else a device is closed as a slow consumer before it is refused.
         * Only a value the operator wrote is wrong: the default follows a
         * lowered max_queued (half of it; see the server's router config). */
        char kb[64];
        bool set;
        locate(cfg, &sections[S_EDGE], "max_answer_backlog", kb, sizeof(kb), &set);
        if (set)
            check(b, cfg, S_EDGE, "max_answer_backlog",
                  "must be below max_queued (%llu >= %llu bytes)",
                  (unsigned long long)cfg->edge.max_answer_backlog,
                  (unsigned long long)cfg->edge.max_queued);
    }
    if (cfg->edge.max_memory && cfg->edge.max_memory < (1ull << 20))
        check(b, cfg, S_EDGE, "max_memory", "must be 0 (unlimited) or at least 1MiB (got %llu)",
              (unsigned long long)cfg->edge.max_memory);
    /* An AUTH with its app key must fit; more than 1 GiB per message is a
     * memory hazard, not a setting. */
    check_size(b, cfg, S_EDGE, "max_message_size", cfg->edge.max_message_size, 1024, 1ull << 30);
    check_size(b, cfg, S_EDGE, "max_preauth_message", cfg->edge.max_preauth_message, 256,
               cfg->edge.max_message_size);
    /* Zero here would fail every device or request at once, or (idle_timeout,
     * handed to the transport) silently mean its default. */
    check_positive(b, cfg, S_EDGE, "auth_timeout", cfg->edge.auth_timeout);
    check_positive(b, cfg, S_EDGE, "idle_timeout", cfg->edge.idle_timeout);
    check_positive(b, cfg, S_EDGE, "request_timeout", cfg->edge.request_timeout);
    for (size_t i = 0; i < cfg->edge.trusted_proxies.count; i++) {
        struct emx_cidr c;
        if (emx_cidr_parse(cfg->edge.trusted_proxies.items[i], &c) != 0)
            check(b, cfg, S_EDGE, "trusted_proxies",
                  "'%s' is not an IP address or CIDR block (host bits must be zero)",
                  show(cfg->edge.trusted_proxies.items[i], sb, sizeof(sb)));
    }

    check_path(b, cfg, S_PLATFORM, "path", cfg->platform.path);
    check_range(b, cfg, S_PLATFORM, "pipes_per_instance", cfg->platform.pipes_per_instance, 1, 64);
    if (cfg->platform.low_watermark >= cfg->platform.high_watermark) {
        /* Blame the one the operator wrote: low if set, else high. */
        char kb[64];
        bool low_set;
        locate(cfg, &sections[S_PLATFORM], "low_watermark", kb, sizeof(kb), &low_set);
        if (low_set)
            check(b, cfg, S_PLATFORM, "low_watermark",
                  "must be below high_watermark (%llu >= %llu bytes)",
                  (unsigned long long)cfg->platform.low_watermark,
                  (unsigned long long)cfg->platform.high_watermark);
        else
            check(b, cfg, S_PLATFORM, "high_watermark",
                  "must be above low_watermark (%llu <= %llu bytes)",
                  (unsigned long long)cfg->platform.high_watermark,
                  (unsigned long long)cfg->platform.low_watermark);
    }
    if (cfg->platform.app_key &&
        cfg->platform.app_key_file) /* names only: the key itself is never shown */
        check(b, cfg, S_PLATFORM, "app_key_file", "set together with app_key; keep one");
    if (cfg->platform.reconnect_min > cfg->platform.reconnect_max)
        check(b, cfg, S_PLATFORM, "reconnect_min", "must not exceed reconnect_max");
    /* 0 would answer every request 0xA4, close every pipe, reconnect in a
     * hot loop, or (handed to the transport) silently mean its default. */
    check_positive(b, cfg, S_PLATFORM, "request_timeout", cfg->platform.request_timeout);
    check_positive(b, cfg, S_PLATFORM, "connect_timeout", cfg->platform.connect_timeout);
    check_positive(b, cfg, S_PLATFORM, "ping_interval", cfg->platform.ping_interval);
    check_positive(b, cfg, S_PLATFORM, "idle_read_timeout", cfg->platform.idle_read_timeout);
    check_positive(b, cfg, S_PLATFORM, "stall_after", cfg->platform.stall_after);
    check_positive(b, cfg, S_PLATFORM, "reconnect_min", cfg->platform.reconnect_min);
    check_positive(b, cfg, S_PLATFORM, "reconnect_max", cfg->platform.reconnect_max);
    check_range(b, cfg, S_PLATFORM, "max_connecting", cfg->platform.max_connecting, 1, 10000);
    /* 0 is the kernel's default; the transport takes 32 bits. */
    check_size(b, cfg, S_PLATFORM, "sndbuf", cfg->platform.sndbuf, 0, 1ull << 30);
    check_range(b, cfg, S_DISCOVERY, "max_instances", cfg->discovery.max_instances, 1, 100000);
    /* A quiet pipe is pinged before it is given up, or it dies every
     * idle_read_timeout. */
    if (cfg->platform.ping_interval && cfg->platform.idle_read_timeout &&
        cfg->platform.ping_interval >= cfg->platform.idle_read_timeout)
        check(b, cfg, S_PLATFORM, "ping_interval",
              "must be below idle_read_timeout (%llu >= %llu ms)",
              (unsigned long long)cfg->platform.ping_interval,
              (unsigned long long)cfg->platform.idle_read_timeout);
    check_pair(b, cfg, S_PLATFORM, cfg->platform.tls_cert, cfg->platform.tls_key);
    /* The file itself is read by setup (and on every reload). */
    if (cfg->admin.token_file && !cfg->admin.token_file[0])
        check(b, cfg, S_ADMIN, "token_file",
              "must not be empty (leave the key out to turn admin actions off)");
}

/* ---- load, bind plugins, check ---- */

void emx_config_free(struct emx_config *cfg)
{
    if (!cfg)
        return;
    emx_node_free(cfg->root);
    emx_free(cfg->file);
    if (cfg->priv)
        emx_free(cfg->priv->b);
    emx_free(cfg->priv);
    emx_free(cfg);
}

int emx_config_load_string(const char *file, const char *text, size_t len, struct emx_config **out,
                           struct emx_errors *errs)
{
    *out = NULL;
    if (!file)
        file = "<config>";
    if (len > CONFIG_MAX_BYTES) {
        emx_errors_add(errs, file, 0, NULL, "too large (%zu bytes; the limit is 1 MiB)", len);
        return -EFBIG;
    }
    struct binder b = {errs, 0, false};
    struct emx_config *cfg = emx_calloc(1, sizeof(*cfg));
    if (!cfg || !(cfg->file = emx_strdup(file)) ||
        !(cfg->priv = emx_calloc(1, sizeof(*cfg->priv)))) {
        emx_errors_add(errs, file, 0, NULL, "out of memory");
        emx_config_free(cfg);
        return -ENOMEM;
    }
    int rc = emx_yaml_parse(file, text, len, &cfg->root, errs);
    if (rc) {
        emx_config_free(cfg);
        return rc;
    }
    for (size_t i = 0; i < NSECTIONS; i++) {
        struct emx_node *sec = emx_node_get(cfg->root, sections[i].name);
        if (sec)
            sec->used = true;
        if (sec && sec->kind != EMX_NODE_MAP) {
            if (!sec->is_null)
                berr(&b, sec->file, sec->key_line, sections[i].name,
                     "expected a map of settings, got %s", kind_name(sec));
            sec = NULL;
        }
        if (remember(cfg, sec, sections[i].table)) {
            b.oom = true;
            break;
        }
        bind_table(&b, sections[i].table, sec, cfg->root, true, sections[i].name, NULL, cfg);
        if (i == S_DISCOVERY)
            cfg->discovery.node = sec;
        else if (i == S_TRANSPORT)
            cfg->transport.node = sec;
    }
    if (!b.oom) {
        check_config(&b, cfg);
        for (size_t i = 0; i < NSECTIONS; i++) {
            struct emx_node *sec = emx_node_get(cfg->root, sections[i].name);
            if (!sections[i].plugin_keys && sec && sec->kind == EMX_NODE_MAP)
                unused_in(&b, cfg, sec, sections[i].name);
        }
        unused_top(&b, cfg, false);
    }
    if (b.oom || b.nerr) {
        if (b.oom && !b.nerr)
            emx_errors_add(errs, file, 0, NULL, "out of memory");
        emx_config_free(cfg);
        return b.oom ? -ENOMEM : -EINVAL;
    }
    *out = cfg;
    return 0;
}

int emx_config_load(const char *path, struct emx_config **out, struct emx_errors *errs)
{
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        emx_errors_add(errs, path, 0, NULL, "cannot open: %s", strerror(e));
        return -e;
    }
    /* Read one byte past the limit to tell "too large" from "exactly 1 MiB". */
    size_t cap = 64 * 1024, len = 0;
    char *buf = emx_malloc(cap);
    int rc = 0;
    while (buf) {
        if (len == cap) {
            if (cap > CONFIG_MAX_BYTES) {
                emx_errors_add(errs, path, 0, NULL, "too large (over 1 MiB)");
                rc = -EFBIG;
                break;
            }
            char *nb = emx_realloc(buf, cap * 2);
            if (!nb) {
                emx_errors_add(errs, path, 0, NULL, "out of memory");
                rc = -ENOMEM;
                break;
            }
            buf = nb;
            cap *= 2;
        }
        ssize_t n = read(fd, buf + len, cap - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = -errno;
            emx_errors_add(errs, path, 0, NULL, "cannot read: %s", strerror(errno));
            break;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    if (!rc && !buf) {
        emx_errors_add(errs, path, 0, NULL, "out of memory");
        rc = -ENOMEM;
    }
    if (!rc)
        rc = emx_config_load_string(path, buf, len, out, errs);
    emx_free(buf);
    return rc;
}

int emx_config_bind_plugin(struct emx_config *cfg, const char *section,
                           const struct emx_option *table, void *out, struct emx_errors *errs)
{
    if (!table)
        return 0;
    struct emx_node *sec = emx_node_get(cfg->root, section);
    if (sec && sec->kind != EMX_NODE_MAP)
        sec = NULL; /* reported by the load */
    if (remember(cfg, sec, table)) {
        emx_errors_add(errs, cfg->file, 0, section, "out of memory");
        return -ENOMEM;
    }
    struct binder b = {errs, 0, false};
    bind_table(&b, table, sec, cfg->root, true, section, plugin_core_keys, out);
    if (b.oom)
        return -ENOMEM;
    return b.nerr ? -EINVAL : 0;
}

int emx_config_check_unused(struct emx_config *cfg, struct emx_errors *errs)
{
    struct binder b = {errs, 0, false};
    for (size_t i = 0; i < NSECTIONS; i++) {
        struct emx_node *sec = emx_node_get(cfg->root, sections[i].name);
        if (sec && sec->kind == EMX_NODE_MAP)
            unused_in(&b, cfg, sec, sections[i].name);
    }
    unused_top(&b, cfg, true);
    return b.nerr ? -EINVAL : 0;
}
