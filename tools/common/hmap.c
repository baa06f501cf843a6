#include "hmap.h"

#include <stdlib.h>
#include <string.h>

static uint64_t hash(const void *key, size_t len)
{
    /* FNV-1a: simple and good enough for tool tables. */
    const uint8_t *p = key;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

void hmap_init(struct hmap *m)
{
    m->slots = NULL;
    m->nslots = m->count = 0;
}

void hmap_free(struct hmap *m)
{
    for (size_t i = 0; i < m->nslots; i++) {
        struct hmap_node *n = m->slots[i];
        while (n) {
            struct hmap_node *next = n->next;
            free(n);
            n = next;
        }
    }
    free(m->slots);
    hmap_init(m);
}

static struct hmap_node **find(const struct hmap *m, const void *key, size_t klen, uint64_t h)
{
    if (!m->nslots)
        return NULL;
    struct hmap_node **pp = &m->slots[h & (m->nslots - 1)];
    while (*pp) {
        if ((*pp)->hash == h && (*pp)->klen == klen && memcmp((*pp)->key, key, klen) == 0)
            return pp;
        pp = &(*pp)->next;
    }
    return pp;
}

void *hmap_get(const struct hmap *m, const void *key, size_t klen)
{
    struct hmap_node **pp = find(m, key, klen, hash(key, klen));
    return pp && *pp ? (*pp)->value : NULL;
}

static int rehash(struct hmap *m)
{
    size_t ns = m->nslots ? m->nslots * 2 : 64;
    struct hmap_node **s = calloc(ns, sizeof(*s));
    if (!s)
        return -1;
    for (size_t i = 0; i < m->nslots; i++) {
        struct hmap_node *n = m->slots[i];
        while (n) {
            struct hmap_node *next = n->next;
            n->next = s[n->hash & (ns - 1)];
            s[n->hash & (ns - 1)] = n;
            n = next;
        }
    }
    free(m->slots);
    m->slots = s;
    m->nslots = ns;
    return 0;
}

int hmap_put(struct hmap *m, const void *key, size_t klen, void *value, void **old)
{
    if (old)
        *old = NULL;
    if (m->count >= m->nslots && rehash(m) != 0)
        return -1;
    uint64_t h = hash(key, klen);
    struct hmap_node **pp = find(m, key, klen, h);
    if (*pp) {
        if (old)
            *old = (*pp)->value;
        (*pp)->value = value;
        return 0;
    }
    struct hmap_node *n = malloc(sizeof(*n) + klen + 1);
    if (!n)
        return -1;
    n->next = NULL;
    n->hash = h;
    n->value = value;
    n->klen = klen;
    memcpy(n->key, key, klen);
    n->key[klen] = '\0';
    *pp = n;
    m->count++;
    return 0;
}

void *hmap_del(struct hmap *m, const void *key, size_t klen)
{
    struct hmap_node **pp = find(m, key, klen, hash(key, klen));
    if (!pp || !*pp)
        return NULL;
    struct hmap_node *n = *pp;
    void *v = n->value;
    *pp = n->next;
    free(n);
    m->count--;
    return v;
}

void hmap_each(const struct hmap *m,
               void (*fn)(void *arg, const char *key, size_t klen, void *value), void *arg)
{
    for (size_t i = 0; i < m->nslots; i++)
        for (struct hmap_node *n = m->slots[i]; n; n = n->next)
            fn(arg, n->key, n->klen, n->value);
}
