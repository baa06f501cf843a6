/* The static discovery plugin's instances file: reading and parsing.
 *
 * Kept apart from the plugin so unit tests and fuzz targets can call it
 * without a loop or a host table. Nothing here touches libuv or the host;
 * every function is safe to call from a worker thread.
 */
#ifndef EMX_STATIC_PARSE_H
#define EMX_STATIC_PARSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Limits that keep file text bounded before it reaches a log line. */
#define STATIC_ID_MAX       255
#define STATIC_HOST_MAX     255
#define STATIC_METADATA_MAX 1024

struct static_instance {
    char *id;   /* never NULL after a successful parse: default "host:port" */
    char *host; /* IPv6 without brackets */
    uint16_t port;
    bool tls;
    uint32_t weight;
    uint32_t priority;
    char *metadata; /* NULL when absent */
    size_t line;    /* 1-based line of the entry in the file */
};

/* Sorted by id, ids unique. */
struct static_set {
    struct static_instance *items;
    size_t count;
};

/* Receives one error line, "name:line: what"; `msg` is borrowed for the call. */
typedef void (*static_error_fn)(void *arg, const char *msg);

/* Parse `len` bytes of YAML. `name` (the file's path) prefixes every error.
 * Returns 0 and fills *out (free with static_set_free); -EINVAL after
 * reporting every error found through on_error (at least one); -ENOMEM.
 * On failure *out is left empty. */
int static_parse(const char *name, const char *text, size_t len, struct static_set *out,
                 static_error_fn on_error, void *arg);

void static_set_free(struct static_set *set);

/* Same instances with the same fields (both sets are sorted by id). */
bool static_set_equal(const struct static_set *a, const struct static_set *b);

/* Read a whole regular file of at most max_size bytes into a NUL-terminated
 * buffer that the caller frees. Returns 0, -EFBIG when larger, -EINVAL when
 * not a regular file, or the negative errno of open/read. */
int static_read_file(const char *path, size_t max_size, char **text, size_t *len);

#endif
