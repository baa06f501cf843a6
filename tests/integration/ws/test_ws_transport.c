/* Integration test of emx-transport-ws: loads the plugin just built through
 * a minimal host table, runs it on a loop the test owns and drives it with a
 * raw WebSocket client (zero-mask frames, Max-Frame-Size: 4096) on a thread,
 * checking every frame header the plugin sends. Every wait is bounded. */
#include <dlfcn.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <uv.h>
#include <zlib.h>

#include <edgemux/host.h>
#include <edgemux/option.h>
#include <edgemux/plugin.h>
#include <edgemux/transport.h>

#define FRAME_LIMIT 4096u
#define BIG_LEN     (100u * 1024u)

static int failures;

#define CHECK(cond_)                                                                               \
    do {                                                                                           \
        if (!(cond_)) {                                                                            \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond_);              \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

static const struct emx_transport_plugin *tp;

/* ---- host table --------------------------------------------------------- */

static void host_log(const struct emx_host *h, enum emx_log_level lvl, const char *fmt, ...)
{
    va_list ap;

    if (lvl > EMX_LOG_WARN)
        return;
    fprintf(stderr, "[%s] ", h->tag);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

static bool host_log_enabled(const struct emx_host *h, enum emx_log_level lvl)
{
    (void)h;
    return lvl <= EMX_LOG_WARN;
}

static uint64_t host_now(const struct emx_host *h)
{
    return uv_now(h->loop);
}

static int parse_num(const char *t, uint64_t *out, const char *const *units, const uint64_t *mul)
{
    char *end;
    unsigned long long v = strtoull(t, &end, 10);
    size_t i;

    if (end == t)
        return -EINVAL;
    if (!*end) {
        *out = v;
        return 0;
    }
    for (i = 0; units[i]; i++)
        if (!strcmp(end, units[i])) {
            *out = v * mul[i];
            return 0;
        }
    return -EINVAL;
}

static int host_parse_size(const char *t, uint64_t *out)
{
    static const char *const u[] = {"k", "KiB", "m", "MiB", NULL};
    static const uint64_t m[] = {1024, 1024, 1048576, 1048576};

    return parse_num(t, out, u, m);
}

static int host_parse_duration(const char *t, uint64_t *out)
{
    static const char *const u[] = {"ms", "s", "m", "h", NULL};
    static const uint64_t m[] = {1, 1000, 60000, 3600000};

    return parse_num(t, out, u, m);
}

/* ---- option binding (what the core does from YAML) ---------------------- */

struct override {
    const char *name;
    const char *value;
};

static void *bind_config(const struct override *ov)
{
    const struct emx_option *o;
    uint8_t *cfg = calloc(1, tp->config_size);

    if (!cfg)
        return NULL;
    for (o = tp->options; o && o->name; o++) {
        const char *v = o->def;
        const struct override *p;
        void *f = cfg + o->offset;

        for (p = ov; p && p->name; p++)
            if (!strcmp(p->name, o->name))
                v = p->value;
        CHECK(o->help && o->help[0]);
        if (!v)
            continue;
        switch (o->type) {
        case EMX_OPT_BOOL:
            *(bool *)f = !strcmp(v, "true");
            break;
        case EMX_OPT_INT:
            *(int64_t *)f = strtoll(v, NULL, 10);
            break;
        case EMX_OPT_SIZE:
            CHECK(host_parse_size(v, (uint64_t *)f) == 0);
            break;
        case EMX_OPT_DURATION:
            CHECK(host_parse_duration(v, (uint64_t *)f) == 0);
            break;
        default:
            *(const char **)f = v;
            break;
        }
    }
    return cfg;
}

/* ---- the test's "core" --------------------------------------------------- */

struct tcase {
    uv_loop_t loop;
    struct emx_host host;
    void *inst;
    void *cfg;
    struct emx_listener *lst;
    uv_async_t done_async;
    uv_timer_t watchdog;
    pthread_t thread;
    int port;
    const char *path;
    void (*client)(struct tcase *t);
    /* seen by the core */
    int accepts, closes, opens, messages, writables;
    bool thread_started;
    char app_key[64];
    char xff[64];
    uint32_t max_frame;
    bool deflate;
    uint16_t last_close;
    /* pipe side */
    struct emx_conn *pipe;
    size_t pipe_rx_len;
    unsigned pipe_small_rx; /* burst messages echoed back in order */
    uint16_t pipe_close;
    bool pipe_opened;
    bool stopping;
    /* what the core does from inside on_accept */
    enum { ACCEPT_PLAIN, ACCEPT_SEND, ACCEPT_CLOSE, ACCEPT_PAUSE } accept_action;
    uv_timer_t resume;
    bool resume_init;
    int paused_messages; /* on_message while the core had the edge paused */
};

struct edge {
    struct tcase *t;
    struct emx_conn *conn;
    bool paused;
};

static void resume_cb(uv_timer_t *h)
{
    struct edge *e = h->data;

    e->paused = false;
    CHECK(tp->pause_read(e->conn, false) == 0);
}

static void *core_accept(void *luser, struct emx_conn *conn, const struct emx_conn_info *info)
{
    struct tcase *t = luser;
    struct edge *e = calloc(1, sizeof(*e));

    t->accepts++;
    snprintf(t->app_key, sizeof(t->app_key), "%s", info->app_key ? info->app_key : "");
    snprintf(t->xff, sizeof(t->xff), "%s", info->forwarded_for ? info->forwarded_for : "");
    t->max_frame = info->max_frame_size;
    t->deflate = info->deflate;
    CHECK(info->peer && strncmp(info->peer, "127.0.0.1:", 10) == 0);
    if (e) {
        e->t = t;
        e->conn = conn;
    }
    switch (t->accept_action) {
    case ACCEPT_SEND: /* a greeting from inside on_accept: after the 101 */
        CHECK(tp->send(conn, (const uint8_t *)"hello", 5) == 0);
        break;
    case ACCEPT_CLOSE: /* closed from inside on_accept: 101, then the close frame */
        tp->close(conn, 4000, "bye");
        break;
    case ACCEPT_PAUSE: /* nothing read until the resume, 200 ms later */
        CHECK(tp->pause_read(conn, true) == 0);
        if (e && !t->resume_init) {
            e->paused = true;
            uv_timer_init(&t->loop, &t->resume);
            t->resume.data = e;
            t->resume_init = true;
            uv_timer_start(&t->resume, resume_cb, 200, 0);
        }
        break;
    default:
        break;
    }
    return e;
}

static uint8_t *pattern(size_t n, uint32_t seed);

/* "burst" asks for BURST_COUNT messages sent from this one callback. 16 MiB
 * is more than any socket holds here (tcp_wmem caps a send buffer at
 * 4 MiB, the client's receive buffer is 64 KiB), so they queue and
 * on_writable must follow once the client has read them: a check of that
 * path that does not depend on timing. */
#define BURST_COUNT 128
#define BURST_LEN   (128u * 1024u)

static void core_message(void *user, uint8_t *data, size_t len)
{
    struct edge *e = user;

    e->t->messages++;
    if (e->paused)
        e->t->paused_messages++;
    if (len == 5 && memcmp(data, "burst", 5) == 0) {
        for (uint32_t i = 0; i < BURST_COUNT; i++) {
            uint8_t *p = pattern(BURST_LEN, 200u + i);

            CHECK(p && tp->send(e->conn, p, BURST_LEN) == 0);
            free(p);
        }
        return;
    }
    CHECK(tp->send(e->conn, data, len) == 0);
}

static void core_close(void *user, uint16_t code, const char *reason)
{
    struct edge *e = user;

    (void)reason;
    e->t->closes++;
    e->t->last_close = code;
    free(e);
}

static void core_writable(void *user)
{
    struct edge *e = user;

    e->t->writables++;
}

static const struct emx_conn_callbacks edge_cb = {
    .on_accept = core_accept,
    .on_message = core_message,
    .on_writable = core_writable,
    .on_close = core_close,
};

static void finish(struct tcase *t)
{
    if (t->stopping)
        return;
    t->stopping = true;
    /* the client thread may still signal: close the async after joining it */
    uv_unref((uv_handle_t *)&t->done_async);
    uv_close((uv_handle_t *)&t->watchdog, NULL);
    if (t->resume_init)
        uv_close((uv_handle_t *)&t->resume, NULL);
    tp->stop(t->inst);
}

static void done_cb(uv_async_t *a)
{
    finish(a->data);
}

static void watchdog_cb(uv_timer_t *w)
{
    fprintf(stderr, "watchdog: case did not finish in time\n");
    failures++;
    finish(w->data);
}

static void *client_thread(void *arg)
{
    struct tcase *t = arg;

    t->client(t);
    uv_async_send(&t->done_async);
    return NULL;
}

static int free_port(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0), port = -1;

    if (fd < 0)
        return -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &l) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

/* Set up a loop, the plugin and a listener. */
static int case_begin(struct tcase *t, const struct override *ov, struct emx_listen_spec *spec)
{
    char addr[32];

    memset(t, 0, sizeof(*t));
    if (uv_loop_init(&t->loop))
        return -1;
    t->host.struct_size = sizeof(t->host);
    t->host.abi_major = EMX_ABI_MAJOR;
    t->host.abi_minor = EMX_ABI_MINOR;
    t->host.tag = "transport:ws.0";
    t->host.loop = &t->loop;
    t->host.log = host_log;
    t->host.log_enabled = host_log_enabled;
    t->host.now_ms = host_now;
    t->host.parse_size = host_parse_size;
    t->host.parse_duration = host_parse_duration;
    t->cfg = bind_config(ov);
    if (!t->cfg || tp->create(&t->host, t->cfg, &t->inst) || tp->start(t->inst))
        return -1;
    t->port = free_port();
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", t->port);
    spec->address = addr;
    if (!spec->path)
        spec->path = "/Thingworx/WS";
    t->path = spec->path;
    if (tp->listen(t->inst, spec, &edge_cb, t, &t->lst))
        return -1;
    uv_async_init(&t->loop, &t->done_async, done_cb);
    t->done_async.data = t;
    uv_timer_init(&t->loop, &t->watchdog);
    t->watchdog.data = t;
    uv_timer_start(&t->watchdog, watchdog_cb, 20000, 0);
    return 0;
}

/* Run until the case finished, tear down, and check the loop closes. */
static void case_end(struct tcase *t)
{
    uv_run(&t->loop, UV_RUN_DEFAULT);
    if (t->thread_started)
        pthread_join(t->thread, NULL);
    uv_close((uv_handle_t *)&t->done_async, NULL);
    uv_run(&t->loop, UV_RUN_DEFAULT);
    tp->destroy(t->inst);
    CHECK(uv_loop_close(&t->loop) == 0);
    free(t->cfg);
}

static void run_action_case(const char *name, const struct override *ov,
                            struct emx_listen_spec spec, int action, void (*client)(struct tcase *),
                            void (*verify)(struct tcase *))
{
    struct tcase t;
    int before = failures;

    if (case_begin(&t, ov, &spec)) {
        fprintf(stderr, "%s: setup failed\n", name);
        failures++;
        return;
    }
    t.client = client;
    t.accept_action = action;
    t.thread_started = pthread_create(&t.thread, NULL, client_thread, &t) == 0;
    CHECK(t.thread_started);
    case_end(&t);
    if (verify)
        verify(&t);
    fprintf(stderr, "%s: %s\n", name, failures == before ? "ok" : "FAILED");
}

static void run_client_case(const char *name, const struct override *ov,
                            struct emx_listen_spec spec, void (*client)(struct tcase *),
                            void (*verify)(struct tcase *))
{
    run_action_case(name, ov, spec, ACCEPT_PLAIN, client, verify);
}

/* ---- raw client ----------------------------------------------------------- */

struct client {
    int fd;
    bool deflate;
    z_stream inf, def;
    bool inf_init, def_init;
    int frames, big_frames;
};

static int read_full(int fd, void *buf, size_t n)
{
    uint8_t *p = buf;

    while (n) {
        ssize_t r = recv(fd, p, n, 0);

        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t n)
{
    const uint8_t *p = buf;

    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);

        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int tcp_connect(int port)
{
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
                            .sin_port = htons((uint16_t)port)};
    struct timeval tv = {.tv_sec = 5};
    int fd = socket(AF_INET, SOCK_STREAM, 0), rcv = 65536;

    if (fd < 0)
        return -1;
    /* a small window makes the server's socket fill up when we stop reading */
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof(rcv));
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (connect(fd, (struct sockaddr *)&a, sizeof(a))) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Reads the HTTP response head into buf; returns its length or -1. */
static int read_head(int fd, char *buf, size_t cap)
{
    size_t n = 0;

    while (n + 1 < cap) {
        if (recv(fd, buf + n, 1, 0) != 1)
            return -1;
        n++;
        buf[n] = '\0';
        if (n >= 4 && !memcmp(buf + n - 4, "\r\n\r\n", 4))
            return (int)n;
    }
    return -1;
}

/* The upgrade; `extra` (frames) goes in the same write as the request head. */
static int ws_open_extra(struct client *c, int port, const char *path, bool offer_deflate,
                         const uint8_t *extra, size_t extra_len)
{
    char req[1024 + 256], head[2048];
    int n;

    memset(c, 0, sizeof(*c));
    c->fd = tcp_connect(port);
    if (c->fd < 0)
        return -1;
    n = snprintf(req, sizeof(req),
                 "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: ThingWorx C SDK\r\n"
                 "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                 "%sMax-Frame-Size: 4096\r\nappKey: test-app-key\r\n"
                 "X-Forwarded-For: 10.1.2.3\r\n\r\n",
                 path, offer_deflate ? "Sec-WebSocket-Extensions: permessage-deflate\r\n" : "");
    if (n < 0 || (size_t)n + extra_len > sizeof(req))
        return -1;
    if (extra_len)
        memcpy(req + n, extra, extra_len);
    if (write_full(c->fd, req, (size_t)n + extra_len) || read_head(c->fd, head, sizeof(head)) < 0)
        return -1;
    if (strncmp(head, "HTTP/1.1 101", 12))
        return -1;
    c->deflate = strcasestr(head, "permessage-deflate") != NULL;
    if (c->deflate) {
        inflateInit2(&c->inf, -15);
        deflateInit2(&c->def, 6, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY);
        c->inf_init = c->def_init = true;
    }
    return 0;
}

static int ws_open(struct client *c, int port, const char *path, bool offer_deflate)
{
    return ws_open_extra(c, port, path, offer_deflate, NULL, 0);
}

static void ws_client_close(struct client *c)
{
    if (c->fd >= 0)
        close(c->fd);
    if (c->inf_init)
        inflateEnd(&c->inf);
    if (c->def_init)
        deflateEnd(&c->def);
}

/* One client frame, masked with an all-zero key (as SDK clients do). */
static int send_frame(struct client *c, int fin, int rsv1, int opcode, const uint8_t *p, size_t n)
{
    uint8_t h[14];
    size_t hl = 0;

    h[hl++] = (uint8_t)((fin ? 0x80 : 0) | (rsv1 ? 0x40 : 0) | opcode);
    if (n < 126) {
        h[hl++] = (uint8_t)(0x80 | n);
    } else if (n < 65536) {
        h[hl++] = 0x80 | 126;
        h[hl++] = (uint8_t)(n >> 8);
        h[hl++] = (uint8_t)n;
    } else {
        int i;

        h[hl++] = 0x80 | 127;
        for (i = 7; i >= 0; i--)
            h[hl++] = (uint8_t)((uint64_t)n >> (8 * i));
    }
    memset(h + hl, 0, 4);
    hl += 4;
    if (write_full(c->fd, h, hl))
        return -1;
    return n ? write_full(c->fd, p, n) : 0;
}

/* Send one binary message, compressed when deflate was negotiated, split in
 * `frag`-byte frames (0: one frame). */
static int send_message(struct client *c, const uint8_t *p, size_t n, size_t frag)
{
    uint8_t *z = NULL;
    size_t off = 0;
    int rsv1 = 0, rc = 0;

    if (c->deflate && n) { /* an empty message goes uncompressed */
        size_t cap = n + n / 8 + 64;

        z = malloc(cap);
        if (!z)
            return -1;
        int zr;

        c->def.next_in = n ? (uint8_t *)p : z;
        c->def.avail_in = (uInt)n;
        c->def.next_out = z;
        c->def.avail_out = (uInt)cap;
        zr = deflate(&c->def, Z_SYNC_FLUSH);
        if ((zr != Z_OK && zr != Z_BUF_ERROR) || c->def.avail_in || cap - c->def.avail_out < 4) {
            free(z);
            return -1;
        }
        n = cap - c->def.avail_out - 4; /* strip 00 00 FF FF */
        p = z;
        rsv1 = 1;
    }
    if (!frag)
        frag = n ? n : 1;
    do {
        size_t len = n - off < frag ? n - off : frag;

        rc = send_frame(c, off + len == n, off == 0 ? rsv1 : 0, off == 0 ? 2 : 0, p + off, len);
        off += len;
    } while (!rc && off < n);
    free(z);
    return rc;
}

/* Read one frame; check the header against the edge's limits. */
static int read_frame(struct client *c, int *fin, int *rsv1, int *op, uint8_t **payload,
                      size_t *len)
{
    uint8_t h[2];
    size_t n;

    if (read_full(c->fd, h, 2))
        return -1;
    *fin = h[0] >> 7;
    *rsv1 = (h[0] >> 6) & 1;
    *op = h[0] & 0x0f;
    CHECK((h[1] & 0x80) == 0);   /* servers never mask */
    CHECK((h[1] & 0x7f) != 127); /* never a 64-bit length */
    n = h[1] & 0x7f;
    if (n == 127)
        return -1;
    if (n == 126) {
        uint8_t e[2];

        if (read_full(c->fd, e, 2))
            return -1;
        n = (size_t)e[0] << 8 | e[1];
    }
    c->frames++;
    if (n > FRAME_LIMIT)
        c->big_frames++;
    *payload = malloc(n ? n : 1);
    if (!*payload || (n && read_full(c->fd, *payload, n))) {
        free(*payload);
        return -1;
    }
    *len = n;
    return 0;
}

/* Read one data message (control frames in between are skipped, a close
 * frame ends it with *close_code set). Returns the payload or NULL. */
static uint8_t *read_message(struct client *c, size_t *out_len, uint16_t *close_code)
{
    uint8_t *msg = NULL, *fp;
    size_t mlen = 0, flen;
    int fin = 0, rsv1, op, compressed = -1;

    *close_code = 0;
    while (!fin) {
        if (read_frame(c, &fin, &rsv1, &op, &fp, &flen)) {
            free(msg);
            return NULL;
        }
        if (op == 8) {
            *close_code = flen >= 2 ? (uint16_t)(fp[0] << 8 | fp[1]) : 1005;
            free(fp);
            free(msg);
            return NULL;
        }
        if (op >= 8) {
            free(fp);
            fin = 0;
            continue;
        }
        if (compressed < 0)
            compressed = rsv1;
        msg = realloc(msg, mlen + flen + 4);
        memcpy(msg + mlen, fp, flen);
        mlen += flen;
        free(fp);
    }
    if (compressed == 1) {
        size_t cap = 4 * mlen + 4096, got;
        uint8_t *out = malloc(cap);
        int zr;

        CHECK(c->deflate);
        memcpy(msg + mlen, "\x00\x00\xff\xff", 4);
        c->inf.next_in = msg;
        c->inf.avail_in = (uInt)(mlen + 4);
        got = 0;
        do {
            if (cap - got < 4096) {
                cap *= 2;
                out = realloc(out, cap);
            }
            c->inf.next_out = out + got;
            c->inf.avail_out = (uInt)(cap - got);
            zr = inflate(&c->inf, Z_SYNC_FLUSH);
            got = cap - c->inf.avail_out;
        } while (zr == Z_OK && (c->inf.avail_in || c->inf.avail_out == 0));
        CHECK(zr == Z_OK || zr == Z_BUF_ERROR);
        free(msg);
        msg = out;
        mlen = got;
    } else {
        CHECK(compressed == 0);
    }
    *out_len = mlen;
    return msg;
}

static uint8_t *pattern(size_t n, uint32_t seed)
{
    uint8_t *p = malloc(n);
    size_t i;

    /* half noise, half text-like: compressible but not trivially */
    for (i = 0; p && i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (i / 512) % 2 ? (uint8_t)(seed >> 16) : (uint8_t)('a' + (i * 7 + i / 64) % 23);
    }
    return p;
}

static void echo_check(struct client *c, size_t n, size_t frag, uint32_t seed)
{
    uint8_t *p = pattern(n, seed), *r;
    size_t rl = 0;
    uint16_t cc;

    if (send_message(c, p, n, frag) != 0) {
        fprintf(stderr, "  send of %zu bytes failed: %s\n", n, strerror(errno));
        failures++;
    }
    r = read_message(c, &rl, &cc);
    if (!r)
        fprintf(stderr, "  no echo of %zu bytes (close %u, %s)\n", n, cc, strerror(errno));
    CHECK(r != NULL);
    CHECK(rl == n);
    CHECK(r && rl == n && memcmp(p, r, n) == 0);
    free(p);
    free(r);
}

/* ---- cases ---------------------------------------------------------------- */

#define PIPE_N   16
#define PIPE_LEN (512u * 1024u)

/* Send several big messages before reading any echo. Whether the server's
 * own queue is used depends on how much the kernel buffers (the receive
 * buffer autotunes to 32 MiB) and on when lws reads; the "burst" request
 * in client_echo is the check that does not depend on timing. */
static void pipelined(struct client *c)
{
    uint8_t *p[PIPE_N];
    int i;

    for (i = 0; i < PIPE_N; i++) {
        p[i] = pattern(PIPE_LEN, 100u + (uint32_t)i);
        CHECK(send_message(c, p[i], PIPE_LEN, 0) == 0);
    }
    for (i = 0; i < PIPE_N; i++) {
        size_t rl = 0;
        uint16_t cc;
        uint8_t *r = read_message(c, &rl, &cc);

        CHECK(r && rl == PIPE_LEN && memcmp(r, p[i], PIPE_LEN) == 0);
        free(r);
        free(p[i]);
    }
}

static void client_echo(struct tcase *t, bool deflate)
{
    struct client c;
    uint16_t cc = 0;
    size_t rl;

    CHECK(ws_open(&c, t->port, t->path, deflate) == 0);
    CHECK(c.deflate == deflate);
    echo_check(&c, 15, 0, 1);
    echo_check(&c, BIG_LEN, 0, 2);
    echo_check(&c, BIG_LEN, 16384, 3); /* fragmented by the client */
    echo_check(&c, 0, 0, 4);
    echo_check(&c, 3000, 0, 5);
    CHECK(c.frames > 20); /* 100 KiB came back in many frames */
    pipelined(&c);
    CHECK(send_message(&c, (const uint8_t *)"burst", 5, 0) == 0);
    for (uint32_t i = 0; i < BURST_COUNT; i++) {
        size_t bl = 0;
        uint16_t bc;
        uint8_t *want = pattern(BURST_LEN, 200u + i);
        uint8_t *r = read_message(&c, &bl, &bc);

        CHECK(r && want && bl == BURST_LEN && memcmp(r, want, BURST_LEN) == 0);
        free(r);
        free(want);
    }
    CHECK(c.big_frames == 0);
    /* a clean close: the server answers with a close frame */
    CHECK(send_frame(&c, 1, 0, 8, (const uint8_t *)"\x03\xe8", 2) == 0);
    CHECK(read_message(&c, &rl, &cc) == NULL);
    CHECK(cc == 1000);
    ws_client_close(&c);
}

static void client_echo_plain(struct tcase *t)
{
    client_echo(t, false);
}

static void client_echo_deflate(struct tcase *t)
{
    client_echo(t, true);
}

static void verify_echo(struct tcase *t, bool deflate)
{
    CHECK(t->accepts == 1);
    CHECK(t->closes == 1);
    CHECK(t->messages == 6 + PIPE_N);
    if (!deflate)
        CHECK(t->writables > 0);
    CHECK(strcmp(t->app_key, "test-app-key") == 0);
    CHECK(strcmp(t->xff, "10.1.2.3") == 0);
    CHECK(t->max_frame == 4096);
    CHECK(t->deflate == deflate);
}

static void verify_echo_plain(struct tcase *t)
{
    verify_echo(t, false);
}

static void verify_echo_deflate(struct tcase *t)
{
    verify_echo(t, true);
}

static void client_text(struct tcase *t)
{
    struct client c;
    uint16_t cc = 0;
    size_t rl;

    CHECK(ws_open(&c, t->port, t->path, false) == 0);
    CHECK(send_frame(&c, 1, 0, 1, (const uint8_t *)"06:44:02", 8) == 0);
    CHECK(read_message(&c, &rl, &cc) == NULL);
    CHECK(cc == 1003);
    ws_client_close(&c);
}

static void verify_closed(struct tcase *t, uint16_t code)
{
    CHECK(t->accepts >= 1);
    CHECK(t->closes == t->accepts);
    CHECK(t->last_close == code);
    if (t->last_close != code)
        fprintf(stderr, "  close code %u, want %u\n", t->last_close, code);
}

static void verify_text(struct tcase *t)
{
    verify_closed(t, 1003);
    CHECK(t->messages == 0);
}

static void client_oversize(struct tcase *t)
{
    struct client c;
    uint16_t cc = 0;
    size_t rl;
    uint8_t *p = pattern(3000, 9);

    /* one frame over the limit */
    CHECK(ws_open(&c, t->port, t->path, false) == 0);
    echo_check(&c, 1000, 0, 1);
    CHECK(send_message(&c, p, 3000, 0) == 0);
    CHECK(read_message(&c, &rl, &cc) == NULL);
    CHECK(cc == 1009);
    ws_client_close(&c);
    /* fragments that add up to more than the limit */
    CHECK(ws_open(&c, t->port, t->path, false) == 0);
    CHECK(send_message(&c, p, 3000, 700) == 0);
    CHECK(read_message(&c, &rl, &cc) == NULL);
    CHECK(cc == 1009);
    ws_client_close(&c);
    free(p);
}

static void verify_oversize(struct tcase *t)
{
    CHECK(t->accepts == 2);
    verify_closed(t, 1009);
    CHECK(t->messages == 1);
}

static void expect_status(int port, const char *req, const char *status)
{
    char head[2048];
    int fd = tcp_connect(port);

    CHECK(fd >= 0);
    if (fd < 0)
        return;
    CHECK(write_full(fd, req, strlen(req)) == 0);
    CHECK(read_head(fd, head, sizeof(head)) > 0);
    /* lws answers plain requests as HTTP/1.0: compare from the status code */
    CHECK(strncmp(head, "HTTP/1.", 7) == 0 && strncmp(head + 8, status + 8, 4) == 0);
    if (strncmp(head + 8, status + 8, 4))
        fprintf(stderr, "  request %.20s... got: %.40s\n", req, head);
    close(fd);
}

static void client_paths(struct tcase *t)
{
    expect_status(
        t->port,
        "GET /other HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        "HTTP/1.1 404");
    expect_status(t->port, "GET /other HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 404");
    /* the served path without an upgrade is a bad upgrade */
    expect_status(t->port, "GET /Thingworx/WS HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 400");
}

static void verify_paths(struct tcase *t)
{
    CHECK(t->accepts == 0);
}

static void client_idle(struct tcase *t)
{
    struct client c;
    uint8_t b;
    uint64_t start = uv_hrtime();

    CHECK(ws_open(&c, t->port, t->path, false) == 0);
    /* silent: the server closes us (1001, then EOF) after edge_idle_timeout (1s) */
    while (recv(c.fd, &b, 1, 0) > 0)
        ;
    CHECK(uv_hrtime() - start < 4000000000ull);
    CHECK(uv_hrtime() - start > 900000000ull);
    ws_client_close(&c);
}

static void verify_idle(struct tcase *t)
{
    verify_closed(t, 1001);
}

/* The core stops the transport while an edge is open: on_close must
 * still come, and the loop must close. */
static void client_stop_open(struct tcase *t)
{
    struct client c;
    uint8_t b;

    CHECK(ws_open(&c, t->port, t->path, false) == 0);
    uv_async_send(&t->done_async);
    CHECK(recv(c.fd, &b, 1, 0) <= 0 || b == 0x88);
    ws_client_close(&c);
}

static void verify_stop_open(struct tcase *t)
{
    verify_closed(t, 1001);
}

/* The core sends from inside on_accept: the device reads the 101 first,
 * then that message. */
static void client_accept_send(struct tcase *t)
{
    struct client c;
    uint16_t cc = 0;
    size_t rl = 0;
    uint8_t *r;

    CHECK(ws_open(&c, t->port, t->path, false) == 0);
    r = read_message(&c, &rl, &cc);
    CHECK(r && rl == 5 && memcmp(r, "hello", 5) == 0);
    free(r);
    echo_check(&c, 100, 0, 7);
    CHECK(send_frame(&c, 1, 0, 8, (const uint8_t *)"\x03\xe8", 2) == 0);
    CHECK(read_message(&c, &rl, &cc) == NULL);
    CHECK(cc == 1000);
    ws_client_close(&c);
}

static void verify_accept_send(struct tcase *t)
{
    verify_closed(t, 1000);
    CHECK(t->messages == 1);
}

/* The core closes from inside on_accept: 101, then a close frame 4000. */
static void client_accept_close(struct tcase *t)
{
    struct client c;
    uint16_t cc = 0;
    size_t rl = 0;

    CHECK(ws_open(&c, t->port, t->path, false) == 0);
    CHECK(read_message(&c, &rl, &cc) == NULL);
    CHECK(cc == 4000);
    CHECK(send_frame(&c, 1, 0, 8, (const uint8_t *)"\x0f\xa0", 2) == 0);
    ws_client_close(&c);
}

static void verify_accept_close(struct tcase *t)
{
    verify_closed(t, 4000);
    CHECK(t->messages == 0);
}

/* The core pauses from inside on_accept while a frame came with the
 * request head: it is not delivered before the resume. */
static void client_accept_pause(struct tcase *t)
{
    static const uint8_t frame[] = {0x82, 0x83, 0, 0, 0, 0, 'a', 'b', 'c'};
    struct client c;
    uint16_t cc = 0;
    size_t rl = 0;
    uint8_t *r;

    CHECK(ws_open_extra(&c, t->port, t->path, false, frame, sizeof(frame)) == 0);
    r = read_message(&c, &rl, &cc);
    CHECK(r && rl == 3 && memcmp(r, "abc", 3) == 0);
    free(r);
    CHECK(send_frame(&c, 1, 0, 8, (const uint8_t *)"\x03\xe8", 2) == 0);
    CHECK(read_message(&c, &rl, &cc) == NULL);
    CHECK(cc == 1000);
    ws_client_close(&c);
}

static void verify_accept_pause(struct tcase *t)
{
    verify_closed(t, 1000);
    CHECK(t->messages == 1);
    CHECK(t->paused_messages == 0);
}

/* ---- pipe side: the plugin connects to its own listener ------------------- */

/* A burst sent from one callback: raw pipes gather small frames for one
 * write per loop iteration (more than the 64 KiB gathering buffer here), so
 * order and boundaries must survive the gathering and its early writes. */
#define BURST_N 400

static size_t burst_len(unsigned i)
{
    return 4 + (i * 37u) % 400u;
}

static void pipe_open(void *user, struct emx_conn *conn, const struct emx_conn_info *info)
{
    struct tcase *t = user;
    uint8_t *p = pattern(BIG_LEN, 7);

    (void)info;
    t->pipe_opened = true;
    t->opens++;
    CHECK(conn == t->pipe);
    for (unsigned i = 0; i < BURST_N; i++) {
        uint8_t m[4 + 400];

        memcpy(m, &i, 4);
        memset(m + 4, (int)(i & 0xff), burst_len(i) - 4);
        CHECK(tp->send(conn, m, burst_len(i)) == 0);
    }
    CHECK(tp->send(conn, p, BIG_LEN) == 0);
    CHECK(tp->buffered(conn) < 16u * BIG_LEN);
    free(p);
}

static void pipe_message(void *user, uint8_t *data, size_t len)
{
    struct tcase *t = user;
    uint8_t *p;

    if (len != BIG_LEN) {
        unsigned i = t->pipe_small_rx;

        CHECK(len == burst_len(i) && memcmp(data, &i, 4) == 0);
        for (size_t k = 4; k < len && len == burst_len(i); k++)
            if (data[k] != (uint8_t)(i & 0xff)) {
                CHECK(!"burst payload changed");
                break;
            }
        t->pipe_small_rx++;
        return;
    }
    p = pattern(BIG_LEN, 7);
    t->pipe_rx_len = len;
    CHECK(t->pipe_small_rx == BURST_N);
    CHECK(len == BIG_LEN && memcmp(p, data, len) == 0);
    free(p);
    tp->close(t->pipe, 1000, "done");
    /* a second close and a send after close are harmless */
    tp->close(t->pipe, 1000, "again");
    CHECK(tp->send(t->pipe, data, 1) != 0);
}

static void pipe_close(void *user, uint16_t code, const char *reason)
{
    struct tcase *t = user;

    (void)reason;
    t->pipe_close = code;
    t->pipe = NULL;
    if (t->closes >= 1 || !t->pipe_opened)
        finish(t);
}

static void *pipe_edge_accept(void *luser, struct emx_conn *conn, const struct emx_conn_info *info)
{
    return core_accept(luser, conn, info);
}

static void pipe_edge_close(void *user, uint16_t code, const char *reason)
{
    struct edge *e = user;
    struct tcase *t = e->t;

    core_close(user, code, reason);
    if (!t->pipe)
        finish(t);
}

static const struct emx_conn_callbacks pipe_cb = {
    .on_open = pipe_open,
    .on_message = pipe_message,
    .on_close = pipe_close,
};

static const struct emx_conn_callbacks pipe_edge_cb = {
    .on_accept = pipe_edge_accept,
    .on_message = core_message,
    .on_close = pipe_edge_close,
};

/* A port held by another socket: lws_create_vhost fails, listen() says so. */
static void busy_port_refused(struct tcase *t, struct emx_listen_spec *spec)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct emx_listen_spec s2 = *spec;
    struct emx_listener *l = NULL;
    socklen_t al = sizeof(a);
    char addr[32];
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    CHECK(fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 && listen(fd, 1) == 0 &&
          getsockname(fd, (struct sockaddr *)&a, &al) == 0);
    snprintf(addr, sizeof(addr), "127.0.0.1:%u", (unsigned)ntohs(a.sin_port));
    s2.address = addr;
    CHECK(tp->listen(t->inst, &s2, &pipe_edge_cb, t, &l) < 0);
    CHECK(l == NULL);
    close(fd);
}

static void run_pipe_case(const char *name, const struct override *ov, const char *cert,
                          const char *key, const char *ca, const char *host, bool expect_open)
{
    struct emx_listen_spec spec = {.tls_cert = cert, .tls_key = key};
    const char *hdrs[] = {"appKey: pipe-key", "X-Edgemux-Server: test-server",
                          "X-Edgemux-Boot: 0123456789abcdef"};
    struct emx_connect_spec cs = {.host = host,
                                  .path = "/Thingworx/WS",
                                  .tls = cert != NULL,
                                  .tls_ca = ca,
                                  .tls_verify = true,
                                  .headers = hdrs,
                                  .header_count = 3,
                                  .max_message_size = 1 << 20,
                                  .sndbuf = 65536};
    struct tcase t;
    int before = failures;

    spec.max_message_size = 1 << 20;
    if (case_begin(&t, ov, &spec)) {
        fprintf(stderr, "%s: setup failed\n", name);
        failures++;
        return;
    }
    /* re-listen with the pipe-aware callbacks on a second port */
    tp->unlisten(t.lst);
    {
        char addr[32];

        t.port = free_port();
        snprintf(addr, sizeof(addr), "127.0.0.1:%d", t.port);
        spec.address = addr;
        CHECK(tp->listen(t.inst, &spec, &pipe_edge_cb, &t, &t.lst) == 0);
        if (!cert) {
            struct emx_listener *busy = NULL;

            /* the port is taken: listen() must fail, not pretend */
            CHECK(tp->listen(t.inst, &spec, &pipe_edge_cb, &t, &busy) < 0);
            CHECK(busy == NULL);
            busy_port_refused(&t, &spec);
        }
    }
    cs.port = (uint16_t)t.port;
    CHECK(tp->connect(t.inst, &cs, &pipe_cb, &t, &t.pipe) == 0);
    case_end(&t);
    if (expect_open) {
        CHECK(t.opens == 1);
        CHECK(t.accepts == 1);
        CHECK(strcmp(t.app_key, "pipe-key") == 0);
        CHECK(t.pipe_rx_len == BIG_LEN);
        CHECK(t.pipe_close == 1000);
        CHECK(t.closes == 1);
        CHECK(t.last_close == 1000);
        if (t.last_close != 1000)
            fprintf(stderr, "  edge close code %u\n", t.last_close);
    } else {
        CHECK(t.opens == 0);
        CHECK(t.accepts == 0);
        CHECK(t.pipe_close != 0 && t.pipe_close != 1000);
    }
    fprintf(stderr, "%s: %s\n", name, failures == before ? "ok" : "FAILED");
}

/* ---- TLS material made at test time ---------------------------------------- */

static int run_cmd(const char *cmd)
{
    int rc = system(cmd);

    if (rc != 0)
        fprintf(stderr, "command failed (%d): %s\n", rc, cmd);
    return rc;
}

static int make_certs(const char *dir)
{
    char cmd[2048];

    snprintf(cmd, sizeof(cmd),
             "cd %s && " EMX_OPENSSL_BIN " req -x509 -newkey rsa:2048 -nodes -days 2 "
             "-subj /CN=test-ca -keyout ca.key -out ca.pem 2>/dev/null && " EMX_OPENSSL_BIN
             " req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout srv.key -out srv.csr "
             "2>/dev/null && printf 'subjectAltName=DNS:localhost\\n' > ext.cnf && " EMX_OPENSSL_BIN
             " x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 "
             "-extfile ext.cnf -out srv.pem 2>/dev/null",
             dir);
    return run_cmd(cmd);
}

int main(void)
{
    void *dl = dlopen(EMX_WS_PLUGIN, RTLD_NOW | RTLD_LOCAL);
    const char *tmp = getenv("TMPDIR");
    char dir[256];
    char cert[320], key[320], ca[320], cmd[320];

    if (!dl) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 1;
    }
    tp = dlsym(dl, EMX_TRANSPORT_SYMBOL);
    if (!tp || tp->hdr.magic != EMX_PLUGIN_MAGIC || tp->hdr.kind != EMX_PLUGIN_TRANSPORT ||
        tp->hdr.abi_major != EMX_ABI_MAJOR || tp->hdr.struct_size != sizeof(*tp)) {
        fprintf(stderr, "bad descriptor\n");
        return 1;
    }

    {
        static const struct override no_deflate[] = {{"deflate", "false"}, {NULL, NULL}};
        static const struct override deflate[] = {{"deflate", "true"}, {NULL, NULL}};
        static const struct override idle[] = {
            {"edge_idle_timeout", "1s"}, {"idle_sweep_period", "200ms"}, {NULL, NULL}};
        struct emx_listen_spec spec = {.max_message_size = 1 << 20};
        struct emx_listen_spec small = {.max_message_size = 2000};

        run_client_case("echo", no_deflate, spec, client_echo_plain, verify_echo_plain);
        run_client_case("echo-deflate", deflate, spec, client_echo_deflate, verify_echo_deflate);
        run_client_case("text-1003", no_deflate, spec, client_text, verify_text);
        run_client_case("oversize-1009", no_deflate, small, client_oversize, verify_oversize);
        run_client_case("paths-404", no_deflate, spec, client_paths, verify_paths);
        run_client_case("idle-timeout", idle, spec, client_idle, verify_idle);
        run_client_case("stop-with-open-edge", no_deflate, spec, client_stop_open,
                        verify_stop_open);
        run_action_case("send-from-on_accept", no_deflate, spec, ACCEPT_SEND, client_accept_send,
                        verify_accept_send);
        run_action_case("close-from-on_accept", no_deflate, spec, ACCEPT_CLOSE, client_accept_close,
                        verify_accept_close);
        run_action_case("pause-from-on_accept", no_deflate, spec, ACCEPT_PAUSE, client_accept_pause,
                        verify_accept_pause);
        run_pipe_case("pipe", no_deflate, NULL, NULL, NULL, "127.0.0.1", true);
    }

    snprintf(dir, sizeof(dir), "%s/emx-ws-test-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(dir) || make_certs(dir)) {
        failures++;
    } else {
        snprintf(cert, sizeof(cert), "%s/srv.pem", dir);
        snprintf(key, sizeof(key), "%s/srv.key", dir);
        snprintf(ca, sizeof(ca), "%s/ca.pem", dir);
        run_pipe_case("wss", NULL, cert, key, ca, "localhost", true);
        run_pipe_case("wss-name-mismatch", NULL, cert, key, ca, "127.0.0.1", false);
        snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
        run_cmd(cmd);
    }

    dlclose(dl);
    if (failures)
        fprintf(stderr, "%d check(s) failed\n", failures);
    return failures ? 1 : 0;
}
