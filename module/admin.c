#include "admin.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"

#define ADMIN_MAX_REQUEST 8192
#define ADMIN_TIMEOUT_MS 5000

struct emx_admin {
    uv_tcp_t tcp;
    struct emx_admin_ops ops;
    const struct emx_log *log;
    unsigned conns;
    bool stopping;
    bool listener_closed;
};

struct admin_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    struct emx_admin *admin;
    size_t len;
    bool answered;
    int closing;
    char buf[ADMIN_MAX_REQUEST];
};

int emx_parse_address(const char *text, struct sockaddr_storage *out)
{
    char host[256];
    const char *colon;
    if (!text || !*text)
        return -EINVAL;
    if (text[0] == '[') {
        const char *end = strchr(text, ']');
        if (!end || end[1] != ':' || (size_t)(end - text - 1) >= sizeof(host))
            return -EINVAL;
        memcpy(host, text + 1, (size_t)(end - text - 1));
        host[end - text - 1] = '\0';
        colon = end + 1;
    } else {
        colon = strrchr(text, ':');
        if (!colon || (size_t)(colon - text) >= sizeof(host) || colon == text)
            return -EINVAL;
        memcpy(host, text, (size_t)(colon - text));
        host[colon - text] = '\0';
    }
    char *endp;
    long port = strtol(colon + 1, &endp, 10);
    if (*endp || port < 0 || port > 65535 || endp == colon + 1)
        return -EINVAL;
    memset(out, 0, sizeof(*out));
    if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)out) == 0)
        return 0;
    if (uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)out) == 0)
        return 0;
    return -EINVAL;
}

static void conn_closed(uv_handle_t *h)
{
    struct admin_conn *c = h->data;
    if (++c->closing < 2)
        return; /* the socket and its timer both close */
    struct emx_admin *a = c->admin;
    a->conns--;
    emx_free(c);
    if (a->listener_closed && a->conns == 0)
        emx_free(a); /* the last one out frees the admin */
}

static void conn_close(struct admin_conn *c)
{
    if (uv_is_closing((uv_handle_t *)&c->tcp))
        return;
    uv_close((uv_handle_t *)&c->tcp, conn_closed);
    uv_close((uv_handle_t *)&c->timer, conn_closed);
}

static void write_done(uv_write_t *w, int status)
{
    (void)status;
    struct admin_conn *c = w->data;
    emx_free(w);
    conn_close(c);
}

static void respond(struct admin_conn *c, int status, const char *reason, const char *body)
{
    c->answered = true;
    size_t blen = strlen(body);
    uv_write_t *w = emx_malloc(sizeof(*w) + 256 + blen);
    if (!w) {
        conn_close(c);
        return;
    }
    char *out = (char *)(w + 1);
    int n = snprintf(out, 256 + blen,
                     "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                     "Cache-Control: no-store\r\nConnection: close\r\n\r\n%s",
                     status, reason, blen, body);
    uv_buf_t b = uv_buf_init(out, (unsigned)n);
    w->data = c;
    if (uv_write(w, (uv_stream_t *)&c->tcp, &b, 1, write_done) != 0) {
        emx_free(w);
        conn_close(c);
    }
}

/* Answer one request line; headers are read (bounded) and ignored. */
static void handle(struct admin_conn *c)
{
    char *eol = memchr(c->buf, '\n', c->len);
    if (!eol) {
        respond(c, 400, "Bad Request", "bad request\n");
        return;
    }
    *eol = '\0';
    char method[8], target[256], version[16];
    if (sscanf(c->buf, "%7s %255s %15s", method, target, version) != 3 ||
        strncmp(version, "HTTP/1.", 7) != 0) {
        respond(c, 400, "Bad Request", "bad request\n");
        return;
    }
    char *q = strchr(target, '?');
    if (q)
        *q = '\0';
    bool get = strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0;
    if (strcmp(target, "/health") == 0) {
        if (get)
            respond(c, 200, "OK", "ok\n");
        else
            respond(c, 405, "Method Not Allowed", "use GET\n");
    } else if (strcmp(target, "/ready") == 0) {
        if (!get)
            respond(c, 405, "Method Not Allowed", "use GET\n");
        else if (c->admin->ops.ready(c->admin->ops.ctx))
            respond(c, 200, "OK", "ready\n");
        else
            respond(c, 503, "Service Unavailable", "not ready: no platform pipe connected\n");
    } else {
        respond(c, 404, "Not Found", "not found\n");
    }
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    struct admin_conn *c = h->data;
    buf->base = c->buf + c->len;
    buf->len = sizeof(c->buf) - 1 - c->len;
}

static void read_cb(uv_stream_t *st, ssize_t n, const uv_buf_t *buf)
{
    (void)buf;
    struct admin_conn *c = st->data;
    if (n < 0) {
        conn_close(c);
        return;
    }
    if (c->answered)
        return;
    c->len += (size_t)n;
    c->buf[c->len] = '\0';
    if (strstr(c->buf, "\r\n\r\n") || strstr(c->buf, "\n\n")) {
        uv_read_stop(st);
        handle(c);
    } else if (c->len >= sizeof(c->buf) - 1) {
        uv_read_stop(st);
        respond(c, 431, "Request Header Fields Too Large", "request too large\n");
    }
}

static void timeout_cb(uv_timer_t *t)
{
    conn_close(t->data);
}

static void on_connection(uv_stream_t *server, int status)
{
    struct emx_admin *a = server->data;
    if (status < 0 || a->stopping)
        return;
    struct admin_conn *c = emx_calloc(1, sizeof(*c));
    if (!c)
        return;
    c->admin = a;
    uv_tcp_init(server->loop, &c->tcp);
    uv_timer_init(server->loop, &c->timer);
    c->tcp.data = c;
    c->timer.data = c;
    a->conns++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0 ||
        uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb) != 0) {
        conn_close(c);
        return;
    }
    uv_timer_start(&c->timer, timeout_cb, ADMIN_TIMEOUT_MS, 0);
}

static void admin_closed(uv_handle_t *h)
{
    struct emx_admin *a = h->data;
    a->listener_closed = true;
    if (a->conns == 0)
        emx_free(a);
}

int emx_admin_start(uv_loop_t *loop, const char *address, const struct emx_admin_ops *ops,
                    const struct emx_log *log, struct emx_admin **out)
{
    struct sockaddr_storage ss;
    int rc = emx_parse_address(address, &ss);
    if (rc)
        return rc;
    struct emx_admin *a = emx_calloc(1, sizeof(*a));
    if (!a)
        return -ENOMEM;
    a->ops = *ops;
    a->log = log;
    uv_tcp_init(loop, &a->tcp);
    a->tcp.data = a;
    rc = uv_tcp_bind(&a->tcp, (const struct sockaddr *)&ss, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&a->tcp, 64, on_connection);
    if (rc != 0) {
        uv_close((uv_handle_t *)&a->tcp, admin_closed);
        return rc;
    }
    emx_logf(log, EMX_LOG_INFO, "admin", "listening on %s", address);
    *out = a;
    return 0;
}

void emx_admin_stop(struct emx_admin *a)
{
    if (!a)
        return;
    a->stopping = true;
    /* Open admin connections end by their own timeout (≤ 5 s) or answer. */
    uv_close((uv_handle_t *)&a->tcp, admin_closed);
}
