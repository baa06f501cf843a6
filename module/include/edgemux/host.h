/* edgemux plugin SDK: the host table the core hands to each plugin instance.
 *
 * Plugins link against nothing of the executable: everything they need from
 * the core comes through this table. It is versioned like the descriptors:
 * fields are only appended, and struct_size tells a plugin which ones exist.
 * The table and every string in it stay valid until the instance is destroyed.
 *
 * Threading: every function here must be called on the loop thread, except
 * post(), which may be called from any thread. With server.workers > 1
 * each worker thread has its own loop and its own host table: a plugin
 * instance uses only the table it was created with.
 */
#ifndef EDGEMUX_HOST_H
#define EDGEMUX_HOST_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "edgemux/option.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uv_loop_s; /* libuv's loop; plugins that use it include <uv.h> themselves */

enum emx_log_level {
    EMX_LOG_ERROR = 0,
    EMX_LOG_WARN = 1,
    EMX_LOG_INFO = 2,
    EMX_LOG_DEBUG = 3,
};

/* One platform instance as a discovery plugin reports it. */
struct emx_instance_info {
    const char *id;       /* stable identity; NULL: the core uses "host:port" */
    const char *host;     /* address or DNS name */
    uint16_t port;
    bool tls;             /* wss to this instance */
    uint32_t weight;      /* relative share within its priority tier; 0: only when no other */
    uint32_t priority;    /* lower is preferred */
    const char *metadata; /* free text shown by the admin API, or NULL */
};

struct emx_host {
    uint32_t struct_size; /* sizeof(struct emx_host) the core was built with */
    uint16_t abi_major;
    uint16_t abi_minor;
    const char *tag;         /* the instance's log tag, e.g. "discovery:consul.0" */
    struct uv_loop_s *loop;  /* the loop this instance runs on */
    void *core;              /* opaque; pass back unchanged */

    /* Log one line tagged with this instance. Never pass secrets. */
    void (*log)(const struct emx_host *host, enum emx_log_level level, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));
    bool (*log_enabled)(const struct emx_host *host, enum emx_log_level level);

    /* Run fn(arg) on the loop thread soon. The only call that is safe from
     * any thread. Returns 0, or -ENOMEM / -ESHUTDOWN (fn will not run; the
     * caller still owns arg). */
    int (*post)(const struct emx_host *host, void (*fn)(void *arg), void *arg);

    /* Monotonic milliseconds of the loop. */
    uint64_t (*now_ms)(const struct emx_host *host);

    /* Parse a size ("64KiB") or a duration ("250ms") written as in the config.
     * Return 0, or -EINVAL with *out untouched. */
    int (*parse_size)(const char *text, uint64_t *out);
    int (*parse_duration)(const char *text, uint64_t *out);

    /* Discovery plugins only: report the whole current set of instances.
     * The core copies the set and every string in it during the call.
     * An empty set from a working source is an answer (applied after the
     * core's empty_confirm). */
    void (*discovery_update)(const struct emx_host *host, const struct emx_instance_info *set,
                             size_t count);
    /* Discovery plugins only: the source failed (timeout, refused, HTTP error,
     * session loss). The core keeps the last good set, logs `reason` and
     * counts it. `reason` is borrowed for the call and must hold no secret. */
    void (*discovery_failed)(const struct emx_host *host, const char *reason);
    /* Appended for server.workers (check with EMX_HOST_HAS): this instance's
     * worker loop and how many the process runs. A transport is created
     * once per worker, each instance on its own loop and thread; with
     * workers > 1 its listeners must share their port (SO_REUSEPORT) and
     * it takes 1/workers of the process's open-file budget, because the
     * kernel hands each worker about that share of the connections. A
     * discovery instance runs once per process (worker 0). */
    uint32_t worker;  /* 0 .. workers-1 */
    uint32_t workers; /* 1 .. 16 */

    /* ABI 1.4, balancing edges over the workers (check with EMX_HOST_HAS;
     * NULL when the process runs one worker). The kernel's SO_REUSEPORT
     * hash spreads sockets at random, so a transport evens it out:
     *  - edge_count: report each socket a listener accepted or adopted (+1)
     *    and each of them that closed (-1);
     *  - edge_balance: right after accepting a socket, before reading from
     *    it, ask which worker should serve it (this one, or a less loaded
     *    one). `cap`: the most sockets one worker may hold (its share of
     *    the open-file budget; 0: none). A worker holding that many gets
     *    another worker with room, or itself when none has: it then stops
     *    accepting, so the process's budget is shared, not cut in N;
     *  - edge_hand_off: give a socket to that worker. 0: the core owns fd
     *    and passes it to that worker's transport (adopt), on its thread;
     *    -errno: the caller still owns fd (serve it here).
     * These three may be called from the instance's own loop thread only. */
    void (*edge_count)(const struct emx_host *host, int delta);
    uint32_t (*edge_balance)(const struct emx_host *host, unsigned cap);
    int (*edge_hand_off)(const struct emx_host *host, uint32_t worker, int fd);
};

#define EMX_HOST_HAS(host_, field_)                                                          \
    ((host_)->struct_size >= offsetof(struct emx_host, field_) + sizeof((host_)->field_))

#ifdef __cplusplus
}
#endif
#endif
