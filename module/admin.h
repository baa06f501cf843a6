/* The admin listener (loopback by default): a small HTTP/1.1 endpoint for
 * HAProxy's checks and operators. GET /health: the process is alive. GET
 * /ready: 200 only while at least one platform pipe is connected, else 503.
 * Every other request goes to ops->handle (metrics, instances, edges,
 * maintenance, the status page). One request per connection; requests are
 * bounded in size and time, and parsed strictly.
 *
 * Requests other than GET and HEAD change things (close a device,
 * maintenance): they are refused 403 unless a token is set
 * (emx_admin_set_token, from admin.token_file), the Host header names the
 * admin address, an Origin header (when sent) names it too, and
 * "Authorization: Bearer <token>" carries the token. A web page the
 * operator's browser opens can neither set that header (cross-site form
 * posts) nor pass the Host check (DNS rebinding).
 *
 * The agent listener answers HAProxy's agent-check: one line per
 * connection ("ready 100%", "drain"), then close. */
#ifndef EMX_ADMIN_H
#define EMX_ADMIN_H

#include <stdbool.h>
#include <stddef.h>
#include <uv.h>

#include "log.h"
#include "textbuf.h"

struct emx_admin;
struct emx_agent;

#define EMX_ADMIN_TARGET_MAX 1024

/* One parsed request line. Borrowed for the call. */
struct emx_admin_request {
    char method[8];                    /* GET HEAD POST PUT DELETE */
    char path[EMX_ADMIN_TARGET_MAX];   /* percent-decoded, starts with '/' */
    char query[EMX_ADMIN_TARGET_MAX];  /* raw, after '?'; "" when none */
};

struct emx_admin_response {
    int status;               /* 200 unless the handler says otherwise */
    const char *content_type; /* static string; default text/plain */
    const char *headers;      /* static extra header lines, each ending "\r\n"; NULL: none */
    struct emx_textbuf body;  /* owned by the admin; the handler appends */
};

struct emx_admin_ops {
    void *ctx;
    /* true when at least one pipe is connected (and not draining) */
    bool (*ready)(void *ctx);
    /* Anything but /health and /ready; may be NULL (404). Leave status
     * 404 for an unknown path. */
    void (*handle)(void *ctx, const struct emx_admin_request *req,
                   struct emx_admin_response *resp);
    /* The agent's reply line, newline included. */
    void (*agent_line)(void *ctx, char *buf, size_t cap);
};

/* Listen on "host:port" ("[::1]:9900" for IPv6). Returns 0 or -errno. */
int emx_admin_start(uv_loop_t *loop, const char *address, const struct emx_admin_ops *ops,
                    const struct emx_log *log, struct emx_admin **out);
/* Close the listener and every admin connection; frees when closed. */
void emx_admin_stop(struct emx_admin *a);
/* The token actions need (copied; the old one is wiped); NULL or "": actions
 * off. Returns 0 or -ENOMEM (then the old token stays). */
int emx_admin_set_token(struct emx_admin *a, const char *token);
int emx_agent_start(uv_loop_t *loop, const char *address, const struct emx_admin_ops *ops,
                    const struct emx_log *log, struct emx_agent **out);
void emx_agent_stop(struct emx_agent *ag);
/* Parse "host:port" / "[v6]:port" into a socket address. */
int emx_parse_address(const char *text, struct sockaddr_storage *out);

/* Parse the head of a request (bytes up to the blank line). Returns 0, or
 * the HTTP status to answer (400, 414, 505). */
int emx_admin_parse_request(const char *buf, size_t len, struct emx_admin_request *out);
/* Find `key` in a query string and percent-decode its value into out.
 * Returns true when present (value may be empty); false when absent, or
 * too long or badly encoded. */
bool emx_admin_query_get(const char *query, const char *key, char *out, size_t cap);
/* The value of header `name` (case-insensitive) in a request head, blanks
 * around it trimmed. Returns how often the header occurs; the first one's
 * value is in *val, *vlen. */
unsigned emx_admin_header(const char *head, size_t len, const char *name, const char **val,
                          size_t *vlen);
/* Does a Host header value (or an Origin's host part) name the admin
 * listen address? Same port (none: 80), and the listen address itself; for
 * a loopback listen address also localhost, 127.0.0.1 and [::1]; for a
 * wildcard one (0.0.0.0, [::]) localhost or any IP literal, never a name. */
bool emx_admin_host_ok(const char *listen, const char *host, size_t len);
/* May this request change things? 0, or 403 with *why (a line of text
 * that never holds the token): no token set, Host or Origin not the admin
 * address, token missing or wrong (compared in constant time). */
int emx_admin_authorize(const char *head, size_t len, const char *listen, const char *token,
                        const char **why);

#endif
