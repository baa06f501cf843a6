/* A small chained hash map keyed by byte strings, for the simulators' bind,
 * session and reassembly tables. Keys are copied; values are the caller's. */
#ifndef EMX_TOOLS_HMAP_H
#define EMX_TOOLS_HMAP_H

#include <stddef.h>
#include <stdint.h>

struct hmap_node {
    struct hmap_node *next;
    uint64_t hash;
    void *value;
    size_t klen;
    char key[]; /* NUL-terminated copy */
};

struct hmap {
    struct hmap_node **slots;
    size_t nslots, count;
};

void hmap_init(struct hmap *m);
/* Frees the nodes, not the values. */
void hmap_free(struct hmap *m);
void *hmap_get(const struct hmap *m, const void *key, size_t klen);
/* Insert or replace; returns the previous value (or NULL) in *old. -1 on
 * allocation failure. */
int hmap_put(struct hmap *m, const void *key, size_t klen, void *value, void **old);
/* Remove; returns the value or NULL. */
void *hmap_del(struct hmap *m, const void *key, size_t klen);
/* Visit every entry; fn may not modify the map. */
void hmap_each(const struct hmap *m,
               void (*fn)(void *arg, const char *key, size_t klen, void *value), void *arg);

#endif
