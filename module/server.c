/* The running server (DESIGN §2): one libuv loop owning the plugins, the
 * router, pipe reconnection, timers, signals and the admin listener. */
#include "server.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>
#include <uv.h>

#include "admin.h"
#include "alloc.h"
#include "config.h"
#include "log.h"
#include "notify.h"
#include "router.h"

#define TICK_MS 50           /* router timers: request timeouts are seconds */
#define QUEUED_REFRESH_MS 100 /* the kernel drains SIOCOUTQ without telling us */
#define SHUTDOWN_GRACE_MS 5000

struct post_item {
    struct post_item *next;
    void (*fn)(void *);
    void *arg;
};

struct pipe_ctx {
    struct emx_server *s;
    struct emx_pipe *p; /* NULL once its instance was removed */
    struct emx_conn *conn;
    uv_timer_t retry;
    unsigned attempts;
    bool dirty;
    bool timer_closed;
    struct emx_list dirty_link;
};

struct emx_server {
    uv_loop_t loop;
    struct emx_setup *setup;
    struct emx_config *cfg;
    struct emx_log log;
    struct emx_router *router;
    uint64_t rng;
    char boot_hex[17];

    const struct emx_transport_plugin *tp;
    void *tinst;
    struct emx_host thost;
    struct emx_listener *listener;

    const struct emx_discovery_plugin *dp;
    void *dinst;
    struct emx_host dhost;
    bool discovery_started;

    uv_async_t async;
    pthread_mutex_t post_mu;
    struct post_item *post_head, **post_tail;
    bool post_closed;

    uv_timer_t tick;
    uv_timer_t queued_timer;
    uv_timer_t shutdown_timer;
    uv_check_t check;
    uv_signal_t sigterm, sigint, sighup;
    struct emx_admin *admin;
    struct emx_list dirty;

    char *hdr_appkey, *hdr_server, *hdr_boot;
    const char *pipe_headers[3];
    bool stopping;
    int exit_code;
};

static uint64_t now_ms(struct emx_server *s)
{
    return uv_now(&s->loop);
}

static uint64_t rng_next(struct emx_server *s)
{
    /* xorshift64*: jitter only, not security */
    uint64_t x = s->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    s->rng = x;
    return x * 2685821657736338717ull;
}

/* ------------------------------------------------------------------ */
/* the host tables */

static struct emx_server *host_server(const struct emx_host *h)
{
    return h->core;
}

static void host_log(const struct emx_host *h, enum emx_log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    emx_vlogf(&host_server(h)->log, level, h->tag, fmt, ap);
    va_end(ap);
}

static bool host_log_enabled(const struct emx_host *h, enum emx_log_level level)
{
    return emx_log_enabled(&host_server(h)->log, level);
}

static int host_post(const struct emx_host *h, void (*fn)(void *), void *arg)
{
    struct emx_server *s = host_server(h);
    struct post_item *it = malloc(sizeof(*it)); /* any thread: plain malloc */
    if (!it)
        return -ENOMEM;
    it->next = NULL;
    it->fn = fn;
    it->arg = arg;
    pthread_mutex_lock(&s->post_mu);
    if (s->post_closed) {
        pthread_mutex_unlock(&s->post_mu);
        free(it);
        return -ESHUTDOWN;
    }
    *s->post_tail = it;
    s->post_tail = &it->next;
    pthread_mutex_unlock(&s->post_mu);
    uv_async_send(&s->async);
    return 0;
}

static void on_async(uv_async_t *a)
{
    struct emx_server *s = a->data;
    pthread_mutex_lock(&s->post_mu);
    struct post_item *list = s->post_head;
    s->post_head = NULL;
    s->post_tail = &s->post_head;
    pthread_mutex_unlock(&s->post_mu);
    while (list) {
        struct post_item *it = list;
        list = it->next;
        it->fn(it->arg);
        free(it);
    }
}

static uint64_t host_now(const struct emx_host *h)
{
    return now_ms(host_server(h));
}

static void host_discovery_update(const struct emx_host *h, const struct emx_instance_info *set,
                                  size_t count)
{
    struct emx_server *s = host_server(h);
    if (!s->stopping)
        emx_router_discovery_update(s->router, set, count, now_ms(s));
}

static void host_discovery_failed(const struct emx_host *h, const char *reason)
{
    struct emx_server *s = host_server(h);
    emx_router_discovery_failed(s->router, reason, now_ms(s));
}

static void host_init(struct emx_server *s, struct emx_host *h, const char *tag)
{
    memset(h, 0, sizeof(*h));
    h->struct_size = sizeof(*h);
    h->abi_major = EMX_ABI_MAJOR;
    h->abi_minor = EMX_ABI_MINOR;
    h->tag = tag;
    h->loop = &s->loop;
    h->core = s;
    h->log = host_log;
    h->log_enabled = host_log_enabled;
    h->post = host_post;
    h->now_ms = host_now;
    h->parse_size = emx_parse_size;
    h->parse_duration = emx_parse_duration;
    h->discovery_update = host_discovery_update;
    h->discovery_failed = host_discovery_failed;
}

/* ------------------------------------------------------------------ */
/* edges */

static void *edge_on_accept(void *listener_user, struct emx_conn *conn,
                            const struct emx_conn_info *info)
{
    struct emx_server *s = listener_user;
    if (s->stopping)
        return NULL;
    if (s->cfg->edge.max_connections > 0 &&
        emx_router_edge_count(s->router) >= (size_t)s->cfg->edge.max_connections) {
        emx_logf(&s->log, EMX_LOG_WARN, "edge", "refusing %s: edge.max_connections reached",
                 info->peer ? info->peer : "?");
        return NULL;
    }
    struct emx_edge *e = emx_router_edge_open(s->router, conn, now_ms(s));
    if (e)
        emx_logf(&s->log, EMX_LOG_DEBUG, "edge", "edge %08" PRIx32 " connected from %s%s%s",
                 e->id, info->peer ? info->peer : "?", info->deflate ? " (deflate)" : "",
                 info->tls ? " (tls)" : "");
    return e;
}

static struct emx_server *edge_server(struct emx_edge *e)
{
    return emx_router_io_ctx(e->router);
}

static void edge_on_message(void *user, uint8_t *data, size_t len)
{
    struct emx_edge *e = user;
    struct emx_server *s = edge_server(e);
    emx_router_edge_message(s->router, e, data, len, now_ms(s));
}

static void edge_on_writable(void *user)
{
    (void)user; /* edges: the transport drains its own queue */
}

static void edge_on_close(void *user, uint16_t code, const char *reason)
{
    struct emx_edge *e = user;
    struct emx_server *s = edge_server(e);
    emx_logf(&s->log, EMX_LOG_DEBUG, "edge", "edge %08" PRIx32 " closed (%u %s)", e->id, code,
             reason ? reason : "");
    emx_router_edge_closed(s->router, e, now_ms(s));
}

static const struct emx_conn_callbacks edge_callbacks = {
    .on_accept = edge_on_accept,
    .on_message = edge_on_message,
    .on_writable = edge_on_writable,
    .on_close = edge_on_close,
};

/* ------------------------------------------------------------------ */
/* pipes */

static void pipe_connect(struct pipe_ctx *pc);

static void on_retry(uv_timer_t *t)
{
    pipe_connect(t->data);
}

static void pipe_schedule_retry(struct pipe_ctx *pc)
{
    struct emx_server *s = pc->s;
    if (s->stopping || !pc->p)
        return;
    /* Exponential backoff with jitter: [d/2, d], d doubling to reconnect_max. */
    uint64_t d = s->cfg->platform.reconnect_min ? s->cfg->platform.reconnect_min : 100;
    for (unsigned i = 0; i < pc->attempts && d < s->cfg->platform.reconnect_max; i++)
        d *= 2;
    if (d > s->cfg->platform.reconnect_max)
        d = s->cfg->platform.reconnect_max;
    uint64_t delay = d / 2 + (d > 1 ? rng_next(s) % (d / 2 + 1) : 0);
    pc->attempts++;
    uv_timer_start(&pc->retry, on_retry, delay, 0);
}

static void pipe_free_if_done(struct pipe_ctx *pc)
{
    if (!pc->p && !pc->conn && pc->timer_closed) {
        emx_list_unlink(&pc->dirty_link);
        emx_free(pc);
    }
}

static void pipe_on_open(void *user, struct emx_conn *conn, const struct emx_conn_info *info)
{
    (void)info;
    struct pipe_ctx *pc = user;
    pc->conn = conn;
    if (!pc->p) {
        pc->s->tp->close(conn, 1001, "instance removed");
        return;
    }
    emx_router_pipe_opened(pc->s->router, pc->p, now_ms(pc->s));
}

static void pipe_on_message(void *user, uint8_t *data, size_t len)
{
    struct pipe_ctx *pc = user;
    if (!pc->p)
        return;
    emx_router_pipe_message(pc->s->router, pc->p, data, len, now_ms(pc->s));
    /* A pipe whose AUTH succeeded is healthy: its next failure starts the
     * backoff over. */
    if (pc->p && pc->p->state == EMX_PIPE_UP)
        pc->attempts = 0;
}

static void pipe_mark_dirty(struct pipe_ctx *pc)
{
    if (!pc->dirty) {
        pc->dirty = true;
        emx_list_push_back(&pc->s->dirty, &pc->dirty_link);
    }
}

static void pipe_on_writable(void *user)
{
    struct pipe_ctx *pc = user;
    if (pc->p && pc->conn)
        pipe_mark_dirty(pc);
}

static void pipe_on_close(void *user, uint16_t code, const char *reason)
{
    struct pipe_ctx *pc = user;
    struct emx_server *s = pc->s;
    pc->conn = NULL;
    if (pc->dirty) {
        pc->dirty = false;
        emx_list_unlink(&pc->dirty_link);
    }
    if (!pc->p) {
        pipe_free_if_done(pc);
        return;
    }
    struct emx_pipe *p = pc->p;
    emx_logf(&s->log, p->state == EMX_PIPE_UP ? EMX_LOG_WARN : EMX_LOG_DEBUG, "pipe",
             "instance %s pipe %u closed (%u %s)", p->inst->id, p->index, code,
             reason ? reason : "");
    emx_router_pipe_closed(s->router, p, now_ms(s));
    /* The router may have removed the instance meanwhile (drained). */
    if (pc->p)
        pipe_schedule_retry(pc);
}

static const struct emx_conn_callbacks pipe_callbacks = {
    .on_open = pipe_on_open,
    .on_message = pipe_on_message,
    .on_writable = pipe_on_writable,
    .on_close = pipe_on_close,
};

static void pipe_connect(struct pipe_ctx *pc)
{
    struct emx_server *s = pc->s;
    if (s->stopping || !pc->p || pc->conn)
        return;
    const struct emx_instance *inst = pc->p->inst;
    const struct emx_config *cfg = s->cfg;
    struct emx_connect_spec spec = {
        .host = inst->host,
        .port = inst->port,
        .path = cfg->platform.path,
        .tls = inst->tls,
        .tls_ca = cfg->platform.tls_ca,
        .tls_cert = cfg->platform.tls_cert,
        .tls_key = cfg->platform.tls_key,
        .tls_verify = cfg->platform.tls_verify,
        .headers = s->pipe_headers,
        .header_count = 3,
        .max_message_size = cfg->edge.max_message_size,
        .sndbuf = (uint32_t)cfg->platform.sndbuf,
    };
    struct emx_conn *conn = NULL;
    int rc = s->tp->connect(s->tinst, &spec, &pipe_callbacks, pc, &conn);
    if (rc != 0) {
        emx_logf(&s->log, EMX_LOG_WARN, "pipe", "instance %s pipe %u: connect failed (%s)",
                 inst->id, pc->p->index, strerror(-rc));
        pipe_schedule_retry(pc);
        return;
    }
    /* on_open or on_close follows; conn is known from on_open */
}

static void retry_closed(uv_handle_t *h)
{
    struct pipe_ctx *pc = h->data;
    pc->timer_closed = true;
    pipe_free_if_done(pc);
}

/* ------------------------------------------------------------------ */
/* router io */

static int io_edge_send(void *ctx, struct emx_edge *e, const uint8_t *buf, size_t len)
{
    struct emx_server *s = ctx;
    int rc = s->tp->send(e->conn, buf, len);
    if (rc != 0)
        return rc;
    if (s->cfg->edge.max_queued && s->tp->buffered(e->conn) > s->cfg->edge.max_queued)
        return -ENOBUFS;
    return 0;
}

static void io_edge_close(void *ctx, struct emx_edge *e, uint16_t code, const char *reason)
{
    struct emx_server *s = ctx;
    emx_logf(&s->log, EMX_LOG_INFO, "edge", "closing edge %08" PRIx32 ": %u %s", e->id, code,
             reason);
    s->tp->close(e->conn, code, reason);
}

static void io_edge_pause(void *ctx, struct emx_edge *e, bool pause)
{
    struct emx_server *s = ctx;
    s->tp->pause_read(e->conn, pause);
}

static int io_pipe_send(void *ctx, struct emx_pipe *p, const uint8_t *buf, size_t len)
{
    struct emx_server *s = ctx;
    struct pipe_ctx *pc = p->conn;
    if (!pc || !pc->conn)
        return -ENOTCONN;
    int rc = s->tp->send(pc->conn, buf, len);
    if (rc == 0)
        pipe_mark_dirty(pc);
    return rc;
}

static void io_pipe_close(void *ctx, struct emx_pipe *p, const char *reason)
{
    struct emx_server *s = ctx;
    struct pipe_ctx *pc = p->conn;
    if (pc && pc->conn)
        s->tp->close(pc->conn, 1000, reason);
}

static void io_instance_added(void *ctx, struct emx_instance *inst)
{
    struct emx_server *s = ctx;
    for (unsigned i = 0; i < inst->npipes; i++) {
        struct pipe_ctx *pc = emx_calloc(1, sizeof(*pc));
        if (!pc) {
            emx_logf(&s->log, EMX_LOG_ERROR, "pipe", "out of memory for instance %s", inst->id);
            continue;
        }
        pc->s = s;
        pc->p = &inst->pipes[i];
        emx_list_init(&pc->dirty_link);
        uv_timer_init(&s->loop, &pc->retry);
        pc->retry.data = pc;
        inst->pipes[i].conn = pc;
        /* Spread the first connects a little so N pipes do not land at once. */
        uv_timer_start(&pc->retry, on_retry, i * 10, 0);
    }
}

static void io_instance_removed(void *ctx, struct emx_instance *inst)
{
    struct emx_server *s = ctx;
    for (unsigned i = 0; i < inst->npipes; i++) {
        struct pipe_ctx *pc = inst->pipes[i].conn;
        if (!pc)
            continue;
        pc->p = NULL;
        inst->pipes[i].conn = NULL;
        if (pc->dirty) {
            pc->dirty = false;
            emx_list_unlink(&pc->dirty_link);
        }
        if (pc->conn)
            s->tp->close(pc->conn, 1001, "instance removed");
        uv_close((uv_handle_t *)&pc->retry, retry_closed);
    }
}

/* After each loop iteration: tell the router what the pipes really hold. */
static void on_check(uv_check_t *c)
{
    struct emx_server *s = c->data;
    uint64_t now = now_ms(s);
    while (!emx_list_empty(&s->dirty)) {
        struct pipe_ctx *pc = emx_container_of(s->dirty.next, struct pipe_ctx, dirty_link);
        emx_list_unlink(&pc->dirty_link);
        pc->dirty = false;
        if (pc->p && pc->conn)
            emx_router_pipe_queued(s->router, pc->p, s->tp->buffered(pc->conn), now);
    }
}

static void on_queued_timer(uv_timer_t *t)
{
    struct emx_server *s = t->data;
    for (struct emx_instance *inst = emx_router_instance_next(s->router, NULL); inst;
         inst = emx_router_instance_next(s->router, inst))
        for (unsigned i = 0; i < inst->npipes; i++) {
            struct pipe_ctx *pc = inst->pipes[i].conn;
            if (pc && pc->conn && inst->pipes[i].wm.queued > 0)
                pipe_mark_dirty(pc);
        }
}

static void on_tick(uv_timer_t *t)
{
    struct emx_server *s = t->data;
    emx_router_tick(s->router, now_ms(s));
}

static bool admin_ready(void *ctx)
{
    struct emx_server *s = ctx;
    return !s->stopping && emx_router_pipes_up(s->router) > 0;
}

/* ------------------------------------------------------------------ */
/* start and stop */

static void close_walk(uv_handle_t *h, void *arg)
{
    (void)arg;
    (void)h;
}

static void finish_shutdown(struct emx_server *s)
{
    emx_notify_watchdog_stop();
    uv_timer_stop(&s->shutdown_timer);
    uv_close((uv_handle_t *)&s->shutdown_timer, NULL);
    uv_close((uv_handle_t *)&s->tick, NULL);
    uv_close((uv_handle_t *)&s->queued_timer, NULL);
    uv_close((uv_handle_t *)&s->check, NULL);
    uv_close((uv_handle_t *)&s->sigterm, NULL);
    uv_close((uv_handle_t *)&s->sigint, NULL);
    uv_close((uv_handle_t *)&s->sighup, NULL);
    pthread_mutex_lock(&s->post_mu);
    s->post_closed = true;
    pthread_mutex_unlock(&s->post_mu);
    uv_close((uv_handle_t *)&s->async, NULL);
    emx_admin_stop(s->admin);
    s->admin = NULL;
    /* Pipes: drop every instance's connections. */
    for (struct emx_instance *inst = emx_router_instance_next(s->router, NULL); inst;
         inst = emx_router_instance_next(s->router, inst))
        io_instance_removed(s, inst);
    if (s->discovery_started)
        s->dp->stop(s->dinst);
    s->discovery_started = false;
    s->tp->stop(s->tinst);
}

static void on_shutdown_timer(uv_timer_t *t)
{
    struct emx_server *s = t->data;
    if (emx_router_edge_count(s->router) > 0)
        emx_logf(&s->log, EMX_LOG_WARN, "server", "%zu edge(s) still open at shutdown",
                 emx_router_edge_count(s->router));
    finish_shutdown(s);
}

static void begin_shutdown(struct emx_server *s, const char *why)
{
    if (s->stopping)
        return;
    s->stopping = true;
    emx_notify_stopping();
    emx_logf(&s->log, EMX_LOG_INFO, "server", "%s: closing edges and stopping", why);
    if (s->listener) {
        s->tp->unlisten(s->listener);
        s->listener = NULL;
    }
    size_t n = 0;
    for (struct emx_edge *e = emx_router_edge_next(s->router, NULL); e;
         e = emx_router_edge_next(s->router, e)) {
        if (e->state != EMX_EDGE_CLOSING) {
            e->state = EMX_EDGE_CLOSING;
            s->tp->close(e->conn, 1001, "server shutting down");
        }
        n++;
    }
    /* Give the transport a moment to finish the close handshakes. */
    uv_timer_start(&s->shutdown_timer, on_shutdown_timer, n ? 1000 : 0, 0);
}

static void on_signal(uv_signal_t *sig, int signum)
{
    struct emx_server *s = sig->data;
    if (signum == SIGHUP) {
        emx_logf(&s->log, EMX_LOG_WARN, "server",
                 "SIGHUP: configuration reload is not available in this version; ignored");
        return;
    }
    begin_shutdown(s, signum == SIGTERM ? "SIGTERM" : "SIGINT");
}

static int make_header(char **out, const char *name, const char *value)
{
    size_t n = strlen(name) + strlen(value) + 3;
    *out = emx_malloc(n);
    if (!*out)
        return -ENOMEM;
    snprintf(*out, n, "%s: %s", name, value);
    return 0;
}

static struct emx_router_config router_config(const struct emx_setup *st)
{
    const struct emx_config *c = st->cfg;
    struct emx_router_config rc = {
        .worker = 0,
        .pipes_per_instance = (unsigned)c->platform.pipes_per_instance,
        .high_watermark = c->platform.high_watermark,
        .low_watermark = c->platform.low_watermark,
        .stall_after = c->platform.stall_after,
        .request_timeout = c->platform.request_timeout,
        .edge_request_timeout = c->edge.request_timeout,
        .auth_timeout = c->edge.auth_timeout,
        .multipart_pin_wait = c->platform.multipart_pin_wait,
        .all_down_grace = c->platform.all_down_grace,
        .close_spread = c->platform.close_spread,
        .empty_confirm = c->discovery.empty_confirm,
        .max_message_size = c->edge.max_message_size,
        .max_pending = (uint32_t)c->edge.max_pending,
        .app_key = st->app_key,
    };
    return rc;
}

int emx_server_run(struct emx_setup *setup)
{
    struct emx_server *s = emx_calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    int rc = 0;
    s->setup = setup;
    s->cfg = setup->cfg;
    s->tp = setup->transport->u.transport;
    s->dp = setup->discovery->u.discovery;
    emx_log_init(&s->log);
    emx_log_level_parse(s->cfg->log.level, &s->log.level);
    emx_log_format_parse(s->cfg->log.format, &s->log.format);
    emx_list_init(&s->dirty);
    pthread_mutex_init(&s->post_mu, NULL);
    s->post_tail = &s->post_head;
    signal(SIGPIPE, SIG_IGN);

    uint64_t boot = 0;
    if (getrandom(&boot, sizeof(boot), 0) != (ssize_t)sizeof(boot))
        boot = (uint64_t)getpid() * 0x9E3779B97F4A7C15ull ^ (uint64_t)time(NULL);
    s->rng = boot | 1;
    snprintf(s->boot_hex, sizeof(s->boot_hex), "%016" PRIx64, boot);
    if (make_header(&s->hdr_appkey, "appKey", setup->app_key) ||
        make_header(&s->hdr_server, "X-Edgemux-Server", s->cfg->server.name) ||
        make_header(&s->hdr_boot, "X-Edgemux-Boot", s->boot_hex)) {
        rc = -ENOMEM;
        goto out_free;
    }
    s->pipe_headers[0] = s->hdr_appkey;
    s->pipe_headers[1] = s->hdr_server;
    s->pipe_headers[2] = s->hdr_boot;

    rc = uv_loop_init(&s->loop);
    if (rc)
        goto out_free;
    uv_async_init(&s->loop, &s->async, on_async);
    s->async.data = s;
    uv_timer_init(&s->loop, &s->tick);
    s->tick.data = s;
    uv_timer_init(&s->loop, &s->queued_timer);
    s->queued_timer.data = s;
    uv_timer_init(&s->loop, &s->shutdown_timer);
    s->shutdown_timer.data = s;
    uv_check_init(&s->loop, &s->check);
    s->check.data = s;
    uv_signal_init(&s->loop, &s->sigterm);
    uv_signal_init(&s->loop, &s->sigint);
    uv_signal_init(&s->loop, &s->sighup);
    s->sigterm.data = s->sigint.data = s->sighup.data = s;

    struct emx_router_config rcfg = router_config(setup);
    struct emx_router_io io = {
        .ctx = s,
        .log = &s->log,
        .edge_send = io_edge_send,
        .edge_close = io_edge_close,
        .edge_pause = io_edge_pause,
        .pipe_send = io_pipe_send,
        .pipe_close = io_pipe_close,
        .instance_added = io_instance_added,
        .instance_removed = io_instance_removed,
    };
    s->router = emx_router_new(&rcfg, &io, uv_now(&s->loop));
    if (!s->router) {
        rc = -ENOMEM;
        goto out_loop;
    }

    static const char ttag_fmt[] = "transport:%s.0";
    static const char dtag_fmt[] = "discovery:%s.0";
    char ttag[96], dtag[96];
    snprintf(ttag, sizeof(ttag), ttag_fmt, setup->transport->hdr->name);
    snprintf(dtag, sizeof(dtag), dtag_fmt, setup->discovery->hdr->name);
    host_init(s, &s->thost, ttag);
    host_init(s, &s->dhost, dtag);

    rc = s->tp->create(&s->thost, setup->transport_config, &s->tinst);
    if (rc == 0)
        rc = s->tp->start(s->tinst);
    if (rc != 0) {
        emx_logf(&s->log, EMX_LOG_ERROR, "server", "transport %s failed to start (%s)",
                 setup->transport->hdr->name, strerror(-rc));
        goto out_router;
    }
    char listen_addr[300];
    if (strchr(s->cfg->edge.address, ':'))
        snprintf(listen_addr, sizeof(listen_addr), "[%s]:%" PRId64, s->cfg->edge.address,
                 s->cfg->edge.port);
    else
        snprintf(listen_addr, sizeof(listen_addr), "%s:%" PRId64, s->cfg->edge.address,
                 s->cfg->edge.port);
    struct emx_listen_spec ls = {
        .address = listen_addr,
        .path = s->cfg->edge.path,
        .tls_cert = s->cfg->edge.tls_cert,
        .tls_key = s->cfg->edge.tls_key,
        .tls_ca = s->cfg->edge.tls_ca,
        .tls_require_client_cert = s->cfg->edge.tls_client_cert,
        .max_message_size = s->cfg->edge.max_message_size,
    };
    rc = s->tp->listen(s->tinst, &ls, &edge_callbacks, s, &s->listener);
    if (rc != 0) {
        emx_logf(&s->log, EMX_LOG_ERROR, "server", "cannot listen on %s (%s)", listen_addr,
                 strerror(-rc));
        goto out_transport;
    }
    /* Settings this version reads but does not act on yet: say so. */
    if (s->cfg->server.workers != 1)
        emx_logf(&s->log, EMX_LOG_WARN, "server",
                 "server.workers %" PRId64 ": this version runs one worker loop", s->cfg->server.workers);
    if (s->cfg->server.user)
        emx_logf(&s->log, EMX_LOG_WARN, "server",
                 "server.user is not applied by this version; running as started");
    if (s->cfg->admin.agent_listen && s->cfg->admin.agent_listen[0])
        emx_logf(&s->log, EMX_LOG_WARN, "server",
                 "admin.agent_listen: the HAProxy agent port is not in this version");
    emx_logf(&s->log, EMX_LOG_INFO, "server", "%s: edges on %s%s, boot %s",
             s->cfg->server.name, listen_addr, s->cfg->edge.path, s->boot_hex);

    struct emx_admin_ops aops = {.ctx = s, .ready = admin_ready};
    rc = emx_admin_start(&s->loop, s->cfg->admin.listen, &aops, &s->log, &s->admin);
    if (rc != 0) {
        emx_logf(&s->log, EMX_LOG_ERROR, "server", "cannot listen on admin %s (%s)",
                 s->cfg->admin.listen, uv_strerror(rc));
        rc = -EADDRINUSE;
        goto out_listener;
    }

    rc = s->dp->create(&s->dhost, setup->discovery_config, &s->dinst);
    if (rc == 0) {
        rc = s->dp->start(s->dinst);
        if (rc != 0)
            s->dp->destroy(s->dinst);
    }
    if (rc != 0) {
        s->dinst = NULL;
        emx_logf(&s->log, EMX_LOG_ERROR, "server", "discovery %s failed to start (%s)",
                 setup->discovery->hdr->name, strerror(-rc));
        goto out_admin;
    }
    s->discovery_started = true;

    uv_timer_start(&s->tick, on_tick, TICK_MS, TICK_MS);
    uv_timer_start(&s->queued_timer, on_queued_timer, QUEUED_REFRESH_MS, QUEUED_REFRESH_MS);
    uv_check_start(&s->check, on_check);
    uv_signal_start(&s->sigterm, on_signal, SIGTERM);
    uv_signal_start(&s->sigint, on_signal, SIGINT);
    uv_signal_start(&s->sighup, on_signal, SIGHUP);

    /* systemd (no-ops otherwise): ready once listening with discovery
     * started; the watchdog is fed from this loop, so a stuck loop is seen. */
    rc = emx_notify_watchdog_start(&s->loop);
    if (rc != 0)
        emx_logf(&s->log, EMX_LOG_WARN, "server", "systemd watchdog timer: %s", uv_strerror(rc));
    char status[400];
    snprintf(status, sizeof(status), "%s: edges on %s%s", s->cfg->server.name, listen_addr,
             s->cfg->edge.path);
    emx_notify_ready(status);

    uv_run(&s->loop, UV_RUN_DEFAULT);
    rc = 0;
    goto out_destroy;

out_admin:
    emx_admin_stop(s->admin);
out_listener:
    s->tp->unlisten(s->listener);
out_transport:
    s->tp->stop(s->tinst);
    uv_close((uv_handle_t *)&s->tick, NULL);
    uv_close((uv_handle_t *)&s->queued_timer, NULL);
    uv_close((uv_handle_t *)&s->shutdown_timer, NULL);
    uv_close((uv_handle_t *)&s->check, NULL);
    uv_close((uv_handle_t *)&s->sigterm, NULL);
    uv_close((uv_handle_t *)&s->sigint, NULL);
    uv_close((uv_handle_t *)&s->sighup, NULL);
    uv_close((uv_handle_t *)&s->async, NULL);
    uv_run(&s->loop, UV_RUN_DEFAULT);
out_destroy:
    if (s->dinst)
        s->dp->destroy(s->dinst);
    s->tp->destroy(s->tinst);
    goto out_router;
out_router:
    emx_router_free(s->router);
out_loop:
    uv_walk(&s->loop, close_walk, NULL);
    if (uv_loop_close(&s->loop) != 0)
        emx_logf(&s->log, EMX_LOG_WARN, "server", "event loop closed with handles open");
out_free:
    emx_free(s->hdr_appkey ? (explicit_bzero(s->hdr_appkey, strlen(s->hdr_appkey)), s->hdr_appkey)
                           : NULL);
    emx_free(s->hdr_server);
    emx_free(s->hdr_boot);
    pthread_mutex_destroy(&s->post_mu);
    if (rc == 0)
        emx_logf(&s->log, EMX_LOG_INFO, "server", "stopped");
    emx_free(s);
    return rc;
}
