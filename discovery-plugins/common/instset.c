#include "instset.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char *dup_opt(const char *s)
{
    if (!s)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

static void info_free(struct emx_instance_info *in)
{
    /* The strings were allocated here; the info type only lends them out. */
    free((char *)in->id);
    free((char *)in->host);
    free((char *)in->metadata);
}

void emx_instset_free(struct emx_instset *s)
{
    for (size_t i = 0; i < s->count; i++)
        info_free(&s->items[i]);
    free(s->items);
    *s = (struct emx_instset){NULL, 0, 0};
}

int emx_instset_add(struct emx_instset *s, const char *id, const char *host, uint16_t port,
                    bool tls, uint32_t weight, uint32_t priority, const char *metadata)
{
    if (s->count == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 8;
        struct emx_instance_info *items = realloc(s->items, cap * sizeof(*items));
        if (!items)
            return -ENOMEM;
        s->items = items;
        s->cap = cap;
    }
    struct emx_instance_info in = {
        .id = dup_opt(id),
        .host = dup_opt(host),
        .port = port,
        .tls = tls,
        .weight = weight,
        .priority = priority,
        .metadata = dup_opt(metadata),
    };
    if (!in.id || !in.host || (metadata && !in.metadata)) {
        info_free(&in);
        return -ENOMEM;
    }
    s->items[s->count++] = in;
    return 0;
}

/* qsort has no context argument: normalize is only ever called on the loop
 * thread, one set at a time. */
static emx_instset_prefer_fn sort_prefer;

static int cmp_info(const void *a, const void *b)
{
    const struct emx_instance_info *x = a, *y = b;
    int c = strcmp(x->id, y->id);
    if (c == 0 && sort_prefer)
        c = sort_prefer(x, y);
    return c;
}

void emx_instset_normalize(struct emx_instset *s, emx_instset_prefer_fn prefer)
{
    if (s->count < 2)
        return;
    sort_prefer = prefer;
    qsort(s->items, s->count, sizeof(s->items[0]), cmp_info);
    sort_prefer = NULL;
    size_t k = 0;
    for (size_t i = 0; i < s->count; i++) {
        if (k && strcmp(s->items[k - 1].id, s->items[i].id) == 0) {
            info_free(&s->items[i]);
            continue;
        }
        s->items[k++] = s->items[i];
    }
    s->count = k;
}

static bool str_equal(const char *a, const char *b)
{
    if (!a || !b)
        return a == b;
    return strcmp(a, b) == 0;
}

bool emx_instance_equal(const struct emx_instance_info *a, const struct emx_instance_info *b)
{
    return str_equal(a->id, b->id) && str_equal(a->host, b->host) && a->port == b->port &&
           a->tls == b->tls && a->weight == b->weight && a->priority == b->priority &&
           str_equal(a->metadata, b->metadata);
}

bool emx_instset_equal(const struct emx_instset *a, const struct emx_instset *b)
{
    if (a->count != b->count)
        return false;
    for (size_t i = 0; i < a->count; i++)
        if (!emx_instance_equal(&a->items[i], &b->items[i]))
            return false;
    return true;
}

void emx_logline_add(struct emx_logline *l, const char *fmt, ...)
{
    if (l->full)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(l->buf + l->len, sizeof(l->buf) - l->len, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(l->buf) - l->len) {
        l->full = true;
        memcpy(l->buf + sizeof(l->buf) - 4, "...", 4);
        l->len = sizeof(l->buf) - 1;
        return;
    }
    l->len += (size_t)n;
}

/* Ids added ('a'), removed ('r') or changed ('c'), walking both sorted sets. */
static void diff_list(struct emx_logline *l, const struct emx_instset *old,
                      const struct emx_instset *new, int which, const char *label)
{
    size_t i = 0, j = 0, n = 0;
    while (i < old->count || j < new->count) {
        int c = i == old->count   ? 1
                : j == new->count ? -1
                                  : strcmp(old->items[i].id, new->items[j].id);
        const char *id = NULL;
        if (c < 0) {
            if (which == 'r')
                id = old->items[i].id;
            i++;
        } else if (c > 0) {
            if (which == 'a')
                id = new->items[j].id;
            j++;
        } else {
            if (which == 'c' && !emx_instance_equal(&old->items[i], &new->items[j]))
                id = new->items[j].id;
            i++;
            j++;
        }
        if (id) {
            emx_logline_add(l, "%s%s%s", n ? ", " : "; ", n ? "" : label, id);
            n++;
        }
    }
}

void emx_instset_log_changes(const struct emx_host *h, const char *prefix, const char *note,
                             const struct emx_instset *old, const struct emx_instset *new)
{
    static const struct emx_instset none = {NULL, 0, 0};
    struct emx_logline l = {.len = 0, .full = false};
    if (!old)
        old = &none;
    emx_logline_add(&l, "%s%s%zu instance%s%s", prefix ? prefix : "", prefix ? ": " : "",
                    new->count, new->count == 1 ? "" : "s", note ? note : "");
    diff_list(&l, old, new, 'a', "added ");
    diff_list(&l, old, new, 'r', "removed ");
    diff_list(&l, old, new, 'c', "changed ");
    h->log(h, EMX_LOG_INFO, "%s", l.buf);
}

void emx_instset_report(const struct emx_host *h, const struct emx_instset *s)
{
    h->discovery_update(h, s->items, s->count);
}
