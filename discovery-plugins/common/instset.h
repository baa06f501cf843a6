/* The instance set every discovery plugin reports: a sorted set of owned
 * instances, its comparison, the "N instances; added …" log line and the
 * array host->discovery_update takes.
 *
 * Linked into each plugin .so as a static library (hidden symbols), so it
 * may use only the public headers, never the core. What an instance's id,
 * tls or priority is stays each plugin's decision.
 */
#ifndef EMX_DISCOVERY_INSTSET_H
#define EMX_DISCOVERY_INSTSET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "edgemux/discovery.h"

/* Items own their strings. Kept in the core's own shape so reporting needs no
 * copy. Sorted by id with ids unique once built from a sorted source or
 * through emx_instset_normalize. */
struct emx_instset {
    struct emx_instance_info *items;
    size_t count, cap;
};

/* Ranks two instances of the same id: negative keeps `a`. */
typedef int (*emx_instset_prefer_fn)(const struct emx_instance_info *a,
                                     const struct emx_instance_info *b);

void emx_instset_free(struct emx_instset *s);

/* Appends a copy of one instance (metadata may be NULL). 0 or -ENOMEM, the
 * set unchanged on failure. */
int emx_instset_add(struct emx_instset *s, const char *id, const char *host, uint16_t port,
                    bool tls, uint32_t weight, uint32_t priority, const char *metadata);

/* Sorts by id and keeps one instance per id: the first by `prefer`, or any
 * when `prefer` is NULL. */
void emx_instset_normalize(struct emx_instset *s, emx_instset_prefer_fn prefer);

/* Same fields; strings compared NULL-safe. */
bool emx_instance_equal(const struct emx_instance_info *a, const struct emx_instance_info *b);
bool emx_instset_equal(const struct emx_instset *a, const struct emx_instset *b);

/* Logs at INFO "[<prefix>: ]N instance(s)<note>; added …; removed …; changed …"
 * for the move from `old` (NULL: nothing reported yet) to `new`, ids in
 * order, the line bounded and ended in "..." when cut. */
void emx_instset_log_changes(const struct emx_host *h, const char *prefix, const char *note,
                             const struct emx_instset *old, const struct emx_instset *new);

/* Hands the set to the core. */
void emx_instset_report(const struct emx_host *h, const struct emx_instset *s);

/* A bounded log line built piece by piece; a full line ends in "...". */
struct emx_logline {
    char buf[1024];
    size_t len;
    bool full;
};

__attribute__((format(printf, 2, 3))) void emx_logline_add(struct emx_logline *l, const char *fmt,
                                                           ...);

#endif
