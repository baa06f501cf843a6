#include "admin.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "alloc.h"

#define ADMIN_MAX_REQUEST 8192
#define ADMIN_TIMEOUT_MS  5000

struct emx_admin {
    uv_tcp_t tcp;
    struct emx_admin_ops ops;
    const struct emx_log *log;
    unsigned conns;
    bool stopping;
    bool listener_closed;
    uv_tcp_t spare;     /* accepts and drops a connection when memory ran out */
    bool spare_busy;
    bool refuse_wanted; /* another one came while the spare was busy */
    char *token;        /* actions' bearer token; NULL: actions off */
    char listen[300];   /* the listen address, for the Host check */
};

struct admin_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    struct emx_admin *admin;
    size_t len;
    bool answered;
    int closing;
    const char *headers; /* extra header lines of the answer */
    char buf[ADMIN_MAX_REQUEST];
};

static void admin_free(struct emx_admin *a)
{
    emx_admin_set_token(a, NULL);
    emx_free(a);
}

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
    explicit_bzero(c->buf, sizeof(c->buf)); /* it may hold a token */
    emx_free(c);
    if (a->listener_closed && a->conns == 0)
        admin_free(a); /* the last one out frees the admin */
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

static void respond_n(struct admin_conn *c, int status, const char *reason, const char *type,
                      const char *body, size_t blen, bool head_only)
{
    c->answered = true;
    char hdr[1024];
    int n = snprintf(hdr, sizeof(hdr),
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
                     "%sConnection: close\r\n\r\n",
                     status, reason, type, blen, c->headers ? c->headers : "");
    if (n < 0 || (size_t)n >= sizeof(hdr)) {
        conn_close(c);
        return;
    }
    size_t send_len = head_only ? 0 : blen;
    uv_write_t *w = emx_malloc(sizeof(*w) + (size_t)n + send_len);
    if (!w) {
        conn_close(c);
        return;
    }
    char *out = (char *)(w + 1);
    memcpy(out, hdr, (size_t)n);
    if (send_len)
        memcpy(out + n, body, send_len);
    uv_buf_t b = uv_buf_init(out, (unsigned)((size_t)n + send_len));
    w->data = c;
    if (uv_write(w, (uv_stream_t *)&c->tcp, &b, 1, write_done) != 0) {
        emx_free(w);
        conn_close(c);
    }
}

static void respond(struct admin_conn *c, int status, const char *reason, const char *body)
{
    respond_n(c, status, reason, "text/plain; charset=utf-8", body, strlen(body), false);
}

static const char *status_reason(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 202:
        return "Accepted";
    case 400:
        return "Bad Request";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 409:
        return "Conflict";
    case 414:
        return "URI Too Long";
    case 431:
        return "Request Header Fields Too Large";
    case 500:
        return "Internal Server Error";
    case 503:
        return "Service Unavailable";
    case 505:
        return "HTTP Version Not Supported";
    default:
        return "Unknown";
    }
}

static int hexval(char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* Percent-decode [s, s+n) into out; '+' is a space in queries. A decoded
 * NUL or control byte is refused: values end up in names and log lines. */
static bool pct_decode(const char *s, size_t n, bool plus, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        int ch = (unsigned char)s[i];
        if (ch == '%') {
            if (n - i < 3)
                return false;
            int hi = hexval(s[i + 1]);
            int lo = hexval(s[i + 2]);
            if (hi < 0 || lo < 0)
                return false;
            ch = hi * 16 + lo;
            i += 2;
        } else if (ch == '+' && plus) {
            ch = ' ';
        }
        if (ch < 0x20 || ch == 0x7f || o + 1 >= cap)
            return false;
        out[o++] = (char)ch;
    }
    out[o] = '\0';
    return true;
}

int emx_admin_parse_request(const char *buf, size_t len, struct emx_admin_request *out)
{
    memset(out, 0, sizeof(*out));
    const char *eol = memchr(buf, '\n', len);
    if (!eol)
        return 400;
    size_t line = (size_t)(eol - buf);
    if (line && buf[line - 1] == '\r')
        line--;
    /* METHOD SP TARGET SP HTTP/1.x, each part checked */
    const char *sp1 = memchr(buf, ' ', line);
    if (!sp1 || sp1 == buf || (size_t)(sp1 - buf) >= sizeof(out->method))
        return 400;
    const char *t = sp1 + 1;
    const char *sp2 = memchr(t, ' ', line - (size_t)(t - buf));
    if (!sp2 || sp2 == t)
        return 400;
    const char *ver = sp2 + 1;
    size_t vlen = line - (size_t)(ver - buf);
    if (vlen != 8 || memcmp(ver, "HTTP/1.", 7) != 0 || (ver[7] != '0' && ver[7] != '1'))
        return vlen >= 5 && memcmp(ver, "HTTP/", 5) == 0 ? 505 : 400;
    for (const char *p = buf; p < sp1; p++)
        if (*p < 'A' || *p > 'Z')
            return 400;
    memcpy(out->method, buf, (size_t)(sp1 - buf));
    size_t tlen = (size_t)(sp2 - t);
    for (size_t i = 0; i < tlen; i++)
        if ((unsigned char)t[i] <= 0x20 || (unsigned char)t[i] >= 0x7f)
            return 400;
    if (t[0] != '/')
        return 400;
    const char *q = memchr(t, '?', tlen);
    size_t plen = q ? (size_t)(q - t) : tlen;
    if (plen >= sizeof(out->path) || (q && tlen - plen - 1 >= sizeof(out->query)))
        return 414;
    if (!pct_decode(t, plen, false, out->path, sizeof(out->path)))
        return 400;
    if (q) {
        memcpy(out->query, q + 1, tlen - plen - 1);
        out->query[tlen - plen - 1] = '\0';
    }
    return 0;
}

bool emx_admin_query_get(const char *query, const char *key, char *out, size_t cap)
{
    size_t klen = strlen(key);
    const char *p = query;
    while (p && *p) {
        const char *amp = strchr(p, '&');
        size_t n = amp ? (size_t)(amp - p) : strlen(p);
        const char *eq = memchr(p, '=', n);
        size_t kn = eq ? (size_t)(eq - p) : n;
        if (kn == klen && memcmp(p, key, klen) == 0) {
            if (!eq) {
                if (cap)
                    out[0] = '\0';
                return cap > 0;
            }
            return pct_decode(eq + 1, n - kn - 1, true, out, cap);
        }
        p = amp ? amp + 1 : NULL;
    }
    return false;
}

unsigned emx_admin_header(const char *head, size_t len, const char *name, const char **val,
                          size_t *vlen)
{
    unsigned found = 0;
    size_t nlen = strlen(name);
    const char *end = head + len;
    const char *p = memchr(head, '\n', len); /* past the request line */
    while (p && ++p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        size_t l = (size_t)((eol ? eol : end) - p);
        if (l && p[l - 1] == '\r')
            l--;
        if (l == 0)
            break; /* the blank line ends the head */
        if (l > nlen && p[nlen] == ':' && strncasecmp(p, name, nlen) == 0) {
            const char *v = p + nlen + 1, *ve = p + l;
            while (v < ve && (*v == ' ' || *v == '\t'))
                v++;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
                ve--;
            if (found++ == 0) {
                *val = v;
                *vlen = (size_t)(ve - v);
            }
        }
        p = eol;
    }
    return found;
}

/* "name:port", "[v6]:port", or without ":port" when port_optional. */
static bool split_host(const char *s, size_t n, bool port_optional, char *name, size_t ncap,
                       bool *bracketed, long *port)
{
    const char *ne, *rest;
    *bracketed = n > 0 && s[0] == '[';
    if (*bracketed) {
        const char *rb = memchr(s, ']', n);
        if (!rb)
            return false;
        s++;
        ne = rb;
        rest = rb + 1;
    } else {
        const char *colon = memchr(s, ':', n);
        ne = colon ? colon : s + n;
        rest = ne;
    }
    size_t nl = (size_t)(ne - s);
    if (nl == 0 || nl >= ncap)
        return false;
    memcpy(name, s, nl);
    name[nl] = '\0';
    const char *end = *bracketed ? s - 1 + n : s + n;
    if (rest == end) {
        *port = 80;
        return port_optional;
    }
    if (*rest != ':' || rest + 1 == end || end - rest > 6)
        return false;
    long v = 0;
    for (const char *q = rest + 1; q < end; q++) {
        if (*q < '0' || *q > '9')
            return false;
        v = v * 10 + (*q - '0');
    }
    *port = v;
    return v > 0 && v <= 65535;
}

/* 4 or 6 with the address in out[16], or 0 when `name` is no IP literal. */
static int ip_literal(const char *name, bool bracketed, unsigned char out[16])
{
    if (bracketed)
        return inet_pton(AF_INET6, name, out) == 1 ? 6 : 0;
    return inet_pton(AF_INET, name, out) == 1 ? 4 : 0;
}

bool emx_admin_host_ok(const char *listen, const char *host, size_t len)
{
    char lname[64], hname[256];
    bool lb, hb;
    long lport, hport;
    unsigned char la[16] = {0}, ha[16] = {0};
    if (!listen || !split_host(listen, strlen(listen), false, lname, sizeof(lname), &lb, &lport) ||
        !split_host(host, len, true, hname, sizeof(hname), &hb, &hport) || lport != hport)
        return false;
    int lf = ip_literal(lname, lb, la);
    int hf = ip_literal(hname, hb, ha);
    if (!lf)
        return false;
    static const unsigned char zero[16], v6_loop[16] = {[15] = 1}, v4_loop[4] = {127, 0, 0, 1};
    bool loopback = (lf == 4 && la[0] == 127) || (lf == 6 && memcmp(la, v6_loop, 16) == 0);
    bool wildcard = memcmp(la, zero, lf == 4 ? 4 : 16) == 0;
    bool localhost = !hb && strcasecmp(hname, "localhost") == 0;
    if (hf == lf && memcmp(ha, la, lf == 4 ? 4 : 16) == 0)
        return true;
    if (wildcard)
        return localhost || hf != 0;
    if (loopback)
        return localhost || (hf == 4 && memcmp(ha, v4_loop, 4) == 0) ||
               (hf == 6 && memcmp(ha, v6_loop, 16) == 0);
    return false;
}

static bool origin_ok(const char *listen, const char *v, size_t vlen)
{
    return vlen > 7 && strncasecmp(v, "http://", 7) == 0 &&
           emx_admin_host_ok(listen, v + 7, vlen - 7);
}

/* "Bearer <token>"; the comparison takes the same time whatever matches. */
static bool bearer_ok(const char *v, size_t vlen, const char *token)
{
    if (vlen < 7 || strncasecmp(v, "Bearer", 6) != 0 || (v[6] != ' ' && v[6] != '\t'))
        return false;
    const char *t = v + 6;
    size_t tl = vlen - 6;
    while (tl && (*t == ' ' || *t == '\t')) {
        t++;
        tl--;
    }
    size_t kl = strlen(token);
    volatile unsigned char diff = (unsigned char)(tl != kl);
    for (size_t i = 0; i < kl; i++)
        diff |= (unsigned char)((unsigned char)token[i] ^ (unsigned char)(i < tl ? t[i] : 0));
    return diff == 0;
}

int emx_admin_authorize(const char *head, size_t len, const char *listen, const char *token,
                        const char **why)
{
    const char *v;
    size_t vlen;
    if (!token || !token[0]) {
        *why = "admin actions are off (no admin.token_file)\n";
        return 403;
    }
    if (emx_admin_header(head, len, "Host", &v, &vlen) != 1 ||
        !emx_admin_host_ok(listen, v, vlen)) {
        *why = "the Host header does not name the admin address\n";
        return 403;
    }
    unsigned origins = emx_admin_header(head, len, "Origin", &v, &vlen);
    if (origins > 1 || (origins == 1 && !origin_ok(listen, v, vlen))) {
        *why = "the Origin header does not name the admin address\n";
        return 403;
    }
    if (emx_admin_header(head, len, "Authorization", &v, &vlen) != 1 ||
        !bearer_ok(v, vlen, token)) {
        *why = "missing or wrong token (Authorization: Bearer ...)\n";
        return 403;
    }
    return 0;
}

int emx_admin_set_token(struct emx_admin *a, const char *token)
{
    char *copy = NULL;
    if (token && token[0] && !(copy = emx_strdup(token)))
        return -ENOMEM;
    if (a->token) {
        explicit_bzero(a->token, strlen(a->token));
        emx_free(a->token);
    }
    a->token = copy;
    return 0;
}

static void handle(struct admin_conn *c)
{
    struct emx_admin_request req;
    int bad = emx_admin_parse_request(c->buf, c->len, &req);
    if (bad) {
        respond(c, bad, status_reason(bad), "bad request\n");
        return;
    }
    bool head = strcmp(req.method, "HEAD") == 0;
    bool get = strcmp(req.method, "GET") == 0 || head;
    if (!get) {
        const char *why = "forbidden\n";
        if (emx_admin_authorize(c->buf, c->len, c->admin->listen, c->admin->token, &why) != 0) {
            respond(c, 403, "Forbidden", why);
            return;
        }
    }
    if (strcmp(req.path, "/health") == 0) {
        if (get)
            respond_n(c, 200, "OK", "text/plain; charset=utf-8", "ok\n", 3, head);
        else
            respond(c, 405, "Method Not Allowed", "use GET\n");
        return;
    }
    if (strcmp(req.path, "/ready") == 0) {
        if (!get) {
            respond(c, 405, "Method Not Allowed", "use GET\n");
        } else if (c->admin->ops.ready(c->admin->ops.ctx)) {
            respond_n(c, 200, "OK", "text/plain; charset=utf-8", "ready\n", 6, head);
        } else {
            static const char msg[] = "not ready: no platform pipe connected, or draining\n";
            respond_n(c, 503, "Service Unavailable", "text/plain; charset=utf-8", msg,
                      sizeof(msg) - 1, head);
        }
        return;
    }
    struct emx_admin_response resp = {.status = 404, .content_type = NULL};
    emx_textbuf_init(&resp.body, 0);
    if (c->admin->ops.handle)
        c->admin->ops.handle(c->admin->ops.ctx, &req, &resp);
    if (resp.body.failed) {
        respond(c, 500, "Internal Server Error", "answer too large or out of memory\n");
    } else if (resp.status == 404 && resp.body.len == 0) {
        respond(c, 404, "Not Found", "not found\n");
    } else {
        c->headers = resp.headers;
        respond_n(c, resp.status, status_reason(resp.status),
                  resp.content_type ? resp.content_type : "text/plain; charset=utf-8",
                  resp.body.data ? resp.body.data : "", resp.body.len, head);
    }
    emx_textbuf_free(&resp.body);
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

static void refuse_one(struct emx_admin *a);

static void spare_closed(uv_handle_t *h)
{
    struct emx_admin *a = h->data;
    a->spare_busy = false;
    a->conns--;
    if (a->refuse_wanted && !a->listener_closed && !a->stopping) {
        a->refuse_wanted = false;
        refuse_one(a);
        return;
    }
    if (a->listener_closed && a->conns == 0)
        admin_free(a);
}

/* Out of memory for a connection: accept it into the spare handle and drop
 * it. libuv stops polling a listener until its pending connection has been
 * accepted, so leaving it would stop the admin port for good. */
static void refuse_one(struct emx_admin *a)
{
    if (a->spare_busy) {
        a->refuse_wanted = true;
        return;
    }
    if (uv_tcp_init(a->tcp.loop, &a->spare) != 0)
        return;
    a->spare.data = a;
    a->spare_busy = true;
    a->conns++;
    (void)uv_accept((uv_stream_t *)&a->tcp, (uv_stream_t *)&a->spare); /* EAGAIN: none pending */
    uv_close((uv_handle_t *)&a->spare, spare_closed);
}

static void on_connection(uv_stream_t *server, int status)
{
    struct emx_admin *a = server->data;
    if (status < 0 || a->stopping)
        return;
    struct admin_conn *c = emx_calloc(1, sizeof(*c));
    if (!c) {
        refuse_one(a);
        return;
    }
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
        admin_free(a);
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
    snprintf(a->listen, sizeof(a->listen), "%s", address);
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

/* ---- the HAProxy agent ---- */

struct emx_agent {
    uv_tcp_t tcp;
    struct emx_admin_ops ops;
    unsigned conns;
    bool listener_closed;
    uv_tcp_t spare; /* as the admin listener's: drops a connection when memory ran out */
    bool spare_busy;
    bool refuse_wanted;
};

struct agent_conn {
    uv_tcp_t tcp;
    uv_write_t w;
    struct emx_agent *ag;
    char line[64];
};

static void agent_free_if_done(struct emx_agent *ag)
{
    if (ag->listener_closed && ag->conns == 0)
        emx_free(ag);
}

static void agent_conn_closed(uv_handle_t *h)
{
    struct agent_conn *c = h->data;
    struct emx_agent *ag = c->ag;
    ag->conns--;
    emx_free(c);
    agent_free_if_done(ag);
}

static void agent_written(uv_write_t *w, int status)
{
    (void)status;
    struct agent_conn *c = w->data;
    uv_close((uv_handle_t *)&c->tcp, agent_conn_closed);
}

static void agent_refuse_one(struct emx_agent *ag);

static void agent_spare_closed(uv_handle_t *h)
{
    struct emx_agent *ag = h->data;
    ag->spare_busy = false;
    ag->conns--;
    if (ag->refuse_wanted && !ag->listener_closed) {
        ag->refuse_wanted = false;
        agent_refuse_one(ag);
        return;
    }
    agent_free_if_done(ag);
}

/* See refuse_one: keep libuv polling the agent port after an allocation failed. */
static void agent_refuse_one(struct emx_agent *ag)
{
    if (ag->spare_busy) {
        ag->refuse_wanted = true;
        return;
    }
    if (uv_tcp_init(ag->tcp.loop, &ag->spare) != 0)
        return;
    ag->spare.data = ag;
    ag->spare_busy = true;
    ag->conns++;
    (void)uv_accept((uv_stream_t *)&ag->tcp, (uv_stream_t *)&ag->spare);
    uv_close((uv_handle_t *)&ag->spare, agent_spare_closed);
}

/* One line and close: HAProxy reads the reply until the connection ends. */
static void agent_on_connection(uv_stream_t *server, int status)
{
    struct emx_agent *ag = server->data;
    if (status < 0 || ag->listener_closed)
        return;
    struct agent_conn *c = emx_calloc(1, sizeof(*c));
    if (!c) {
        agent_refuse_one(ag);
        return;
    }
    c->ag = ag;
    uv_tcp_init(server->loop, &c->tcp);
    c->tcp.data = c;
    ag->conns++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        uv_close((uv_handle_t *)&c->tcp, agent_conn_closed);
        return;
    }
    ag->ops.agent_line(ag->ops.ctx, c->line, sizeof(c->line));
    uv_buf_t b = uv_buf_init(c->line, (unsigned)strlen(c->line));
    c->w.data = c;
    if (uv_write(&c->w, (uv_stream_t *)&c->tcp, &b, 1, agent_written) != 0)
        uv_close((uv_handle_t *)&c->tcp, agent_conn_closed);
}

static void agent_closed(uv_handle_t *h)
{
    struct emx_agent *ag = h->data;
    ag->listener_closed = true;
    agent_free_if_done(ag);
}

int emx_agent_start(uv_loop_t *loop, const char *address, const struct emx_admin_ops *ops,
                    const struct emx_log *log, struct emx_agent **out)
{
    struct sockaddr_storage ss;
    int rc = emx_parse_address(address, &ss);
    if (rc)
        return rc;
    if (!ops->agent_line)
        return -EINVAL;
    struct emx_agent *ag = emx_calloc(1, sizeof(*ag));
    if (!ag)
        return -ENOMEM;
    ag->ops = *ops;
    uv_tcp_init(loop, &ag->tcp);
    ag->tcp.data = ag;
    rc = uv_tcp_bind(&ag->tcp, (const struct sockaddr *)&ss, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&ag->tcp, 64, agent_on_connection);
    if (rc != 0) {
        uv_close((uv_handle_t *)&ag->tcp, agent_closed);
        return rc;
    }
    emx_logf(log, EMX_LOG_INFO, "admin", "HAProxy agent listening on %s", address);
    *out = ag;
    return 0;
}

void emx_agent_stop(struct emx_agent *ag)
{
    if (!ag)
        return;
    /* Open agent connections finish their one write and close themselves. */
    uv_close((uv_handle_t *)&ag->tcp, agent_closed);
}
