/* The admin listener (loopback by default): a small HTTP/1.1 endpoint for
 * HAProxy's checks and operators. GET /health: the process is alive. GET
 * /ready: 200 only while at least one platform pipe is connected, else 503.
 * One request per connection; requests are bounded in size and time. */
#ifndef EMX_ADMIN_H
#define EMX_ADMIN_H

#include <stdbool.h>
#include <uv.h>

#include "log.h"

struct emx_admin;

struct emx_admin_ops {
    void *ctx;
    /* true when at least one pipe is connected */
    bool (*ready)(void *ctx);
};

/* Listen on "host:port" ("[::1]:9900" for IPv6). Returns 0 or -errno. */
int emx_admin_start(uv_loop_t *loop, const char *address, const struct emx_admin_ops *ops,
                    const struct emx_log *log, struct emx_admin **out);
/* Close the listener and every admin connection; frees when closed. */
void emx_admin_stop(struct emx_admin *a);
/* Parse "host:port" / "[v6]:port" into a socket address. */
int emx_parse_address(const char *text, struct sockaddr_storage *out);

#endif
