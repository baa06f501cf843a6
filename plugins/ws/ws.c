/* emx-transport-ws: the plugin. Options, the instance's life (create,
 * start, stop on a foreign libuv loop with libwebsockets for the pipes,
 * destroy), and the transport calls, which go to edge.c for edges and to
 * the pipe files for pipes. */
#include "ws_int.h"

#define OPT(name_, type_, def_, field_, help_)                                                     \
    {                                                                                              \
        (name_), NULL, (type_), (def_), false, offsetof(struct ws_config, field_), (help_)         \
    }

static const struct emx_option ws_options[] = {
    OPT("deflate", EMX_OPT_BOOL, "true", deflate,
        "accept permessage-deflate from edges (bounded memory: see deflate_window_bits)"),
    OPT("pipe_deflate", EMX_OPT_BOOL, "false", pipe_deflate,
        "offer permessage-deflate on pipes to platform instances"),
    OPT("deflate_window_bits", EMX_OPT_INT, "10", deflate_window_bits,
        "zlib window (9..15) edgemux compresses with; inflating always uses 15"),
    OPT("deflate_mem_level", EMX_OPT_INT, "4", deflate_mem_level,
        "zlib memLevel (1..9) of each connection's compressor"),
    OPT("inflate_window_bits", EMX_OPT_INT, "15", inflate_window_bits,
        "window (9..15) asked of edges that offer client_max_window_bits: edgemux inflates "
        "with it (2^bits bytes per busy deflate edge)"),
    OPT("edge_idle_timeout", EMX_OPT_DURATION, "120s", edge_idle_timeout,
        "drop an edge that sent nothing (data or ping) for this long; 0 disables"),
    OPT("idle_sweep_period", EMX_OPT_DURATION, "10s", idle_sweep_period,
        "every edge's socket is checked for idleness once per this period"),
    OPT("tcp_keepalive_idle", EMX_OPT_DURATION, "30s", tcp_keepalive_idle,
        "TCP keepalive idle time on accepted sockets; 0 disables keepalive"),
    OPT("tcp_keepalive_interval", EMX_OPT_DURATION, "10s", tcp_keepalive_interval,
        "interval between TCP keepalive probes"),
    OPT("tcp_keepalive_count", EMX_OPT_INT, "3", tcp_keepalive_count,
        "unanswered keepalive probes before the kernel drops the socket"),
    OPT("tcp_user_timeout", EMX_OPT_DURATION, "30s", tcp_user_timeout,
        "TCP_USER_TIMEOUT: drop a socket whose sent data stays unacknowledged this long"),
    /* 1 KiB: lws allocates it per connection and keeps it while idle (~1 KiB
     * of the 4 KiB per idle edge); larger frames arrive in pieces, which the
     * receive path gathers (tx_packet_size stays 64 KiB, see init_tables). */
    OPT("rx_buffer_size", EMX_OPT_SIZE, "1KiB", rx_buffer_size,
        "libwebsockets receive buffer of TLS pipes"),
    OPT("default_max_frame_size", EMX_OPT_SIZE, "8192", default_max_frame_size,
        "largest frame sent to an edge that announced no Max-Frame-Size"),
    OPT("ping_interval", EMX_OPT_DURATION, "30s", ping_interval,
        "pipes: send a ping after this long without traffic"),
    OPT("idle_read_timeout", EMX_OPT_DURATION, "60s", idle_read_timeout,
        "pipes: close a pipe that received nothing (not even a pong) for this long"),
    OPT("pipe_max_queued", EMX_OPT_SIZE, "1MiB", pipe_max_queued,
        "pipes: bytes held beyond the socket buffer before send() refuses (ENOBUFS) and the "
        "pipe stops being read (at least 64KiB; keep it above platform.high_watermark)"),
    OPT("handshake_timeout", EMX_OPT_DURATION, "10s", handshake_timeout,
        "time allowed for a TCP/TLS/HTTP upgrade handshake"),
    OPT("close_timeout", EMX_OPT_DURATION, "5s", close_timeout,
        "time allowed to flush queued data and the close frame before dropping"),
    OPT("max_http_header_pool", EMX_OPT_INT, "4096", max_http_header_pool,
        "edges accepted and not yet upgraded at once; when full, the oldest is dropped once "
        "it is handshake_evict old, else the rest wait in the listen backlog"),
    OPT("handshake_evict", EMX_OPT_DURATION, "2s", handshake_evict,
        "a full handshake pool drops its oldest socket once it has had this long to upgrade "
        "(silent or held sockets cannot lock devices out)"),
    OPT("max_queued_control", EMX_OPT_SIZE, "64KiB", max_queued_control,
        "an edge with more bytes queued than this gets no pong for its pings"),
    OPT("tunnel_max_message", EMX_OPT_SIZE, "256KiB", tunnel_max_message,
        "tunnels: largest message relayed either way (over it the side that sent it is "
        "closed 1009)"),
    OPT("tunnel_max_queued", EMX_OPT_SIZE, "256KiB", tunnel_max_queued,
        "tunnels: a side with this many bytes queued stops the other side's reading until "
        "half has drained"),
    OPT("tunnel_connect_timeout", EMX_OPT_DURATION, "5s", tunnel_connect_timeout,
        "tunnels: the owner instance's connect, TLS and upgrade; later the peer gets 504"),
    OPT("tunnel_data_delay", EMX_OPT_DURATION, "50ms", tunnel_data_delay,
        "tunnels: data toward the peer waits this long after its 101 has left (the C SDK "
        "drops bytes that arrive with the response)"),
    OPT("listen_backlog", EMX_OPT_INT, "65535", listen_backlog,
        "listen backlog of edge listeners; the kernel caps it at net.core.somaxconn"),
    OPT("fd_reserve", EMX_OPT_INT, "256", fd_reserve,
        "open files kept for pipes and the rest of the process: edges are accepted up to "
        "the open-file limit minus this"),
    EMX_OPTION_END,
};
/* lws logs through one process-wide hook; it goes to the first host. */
static const struct emx_host *log_host;

static void lws_log_emit(int level, const char *line)
{
    const struct emx_host *h = log_host;
    size_t n = strlen(line);

    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        n--;
    if (!h)
        return;
    h->log(h, level == LLL_ERR ? EMX_LOG_ERROR : EMX_LOG_WARN, "lws: %.*s", (int)n, line);
}

/* ---- the transport calls: edges are edge.c's, pipes pipe_lws.c's ------------ */

static int ws_send(struct emx_conn *c, const uint8_t *data, size_t len)
{
    return ws_is_edge(c) ? edge_send(c, data, len) : pipe_send(c, data, len);
}

static size_t ws_buffered(struct emx_conn *c)
{
    return ws_is_edge(c) ? edge_buffered(c) : pipe_buffered(c);
}

static int ws_pause_read(struct emx_conn *c, bool pause)
{
    return ws_is_edge(c) ? edge_pause_read(c, pause) : pipe_pause_read(c, pause);
}

static void ws_close(struct emx_conn *c, uint16_t code, const char *reason)
{
    if (ws_is_edge(c))
        edge_close(c, code, reason);
    else
        pipe_close(c, code, reason);
}

/* ---- lifecycle ------------------------------------------------------------ */

static void handle_closed(uv_handle_t *h)
{
    struct ws_instance *inst = h->data;

    inst->handles_open--;
}

static void close_handle(struct ws_instance *inst, uv_handle_t *h)
{
    if (!uv_is_closing(h))
        uv_close(h, handle_closed);
    (void)inst;
}

static int ws_create(const struct emx_host *host, const void *config, void **out)
{
    struct ws_instance *inst;
    const struct ws_config *cfg = config;

    if (!host || !config || !out || !host->loop)
        return -EINVAL;
    if (cfg->deflate_window_bits < 9 || cfg->deflate_window_bits > 15 ||
        cfg->deflate_mem_level < 1 || cfg->deflate_mem_level > 9 || cfg->rx_buffer_size < 128 ||
        cfg->rx_buffer_size > (1u << 20) || cfg->default_max_frame_size < WS_MIN_FRAME ||
        cfg->default_max_frame_size > WS_MAX_FRAME || cfg->max_http_header_pool < 1 ||
        cfg->max_http_header_pool > 65535 || cfg->listen_backlog < 1 ||
        cfg->listen_backlog > 65535 || cfg->fd_reserve < 16 || cfg->fd_reserve > 1000000 ||
        cfg->inflate_window_bits < 9 || cfg->inflate_window_bits > 15 ||
        cfg->handshake_evict > cfg->handshake_timeout || cfg->max_queued_control < 256 ||
        cfg->tunnel_max_message < 1024 || cfg->tunnel_max_message > (64u << 20) ||
        cfg->tunnel_max_queued < 4096 || cfg->tunnel_connect_timeout < 100 ||
        cfg->tunnel_data_delay > 10000) {
        host->log(host, EMX_LOG_ERROR,
                  "ws: invalid option (deflate_window_bits 9..15, deflate_mem_level 1..9, "
                  "rx_buffer_size 128..1MiB, default_max_frame_size 64..65535, "
                  "max_http_header_pool 1..65535, listen_backlog 1..65535, "
                  "fd_reserve 16..1000000, inflate_window_bits 9..15, handshake_evict <= "
                  "handshake_timeout, max_queued_control >= 256, tunnel_max_message 1KiB..64MiB, "
                  "tunnel_max_queued >= 4KiB, tunnel_connect_timeout >= 100ms, "
                  "tunnel_data_delay <= 10s)");
        return -EINVAL;
    }
    inst = ws_zalloc(sizeof(*inst));
    if (!inst)
        return -ENOMEM;
    inst->scratch = malloc(LWS_PRE + RAW_HDR_MAX + WS_MAX_FRAME);
    if (!inst->scratch) {
        free(inst);
        return -ENOMEM;
    }
    inst->host = host;
    inst->cfg = *cfg;
    if (host->abi_minor >= 1) { /* older cores pass no settings of their own */
        inst->core_idle = cfg->edge_idle_timeout == DEF_EDGE_IDLE_MS;
        inst->core_deflate = cfg->deflate;
        inst->core_ping = cfg->ping_interval == DEF_PING_MS;
        inst->core_idle_read = cfg->idle_read_timeout == DEF_IDLE_READ_MS;
        inst->core_handshake = cfg->handshake_timeout == DEF_HANDSHAKE_MS;
    }
    inst->loop = host->loop;
    inst->loops[0] = host->loop;
    {
        struct edge_settings es = {
            .deflate = cfg->deflate,
            .deflate_window_bits = (uint8_t)cfg->deflate_window_bits,
            .inflate_window_bits = (uint8_t)cfg->inflate_window_bits,
            .deflate_mem_level = (uint8_t)cfg->deflate_mem_level,
            .idle_timeout_ms = cfg->edge_idle_timeout,
            .idle_sweep_period_ms = cfg->idle_sweep_period,
            .keepalive_idle_ms = cfg->tcp_keepalive_idle,
            .keepalive_interval_ms = cfg->tcp_keepalive_interval,
            .keepalive_count = (int)cfg->tcp_keepalive_count,
            .user_timeout_ms = cfg->tcp_user_timeout,
            .default_max_frame = (uint32_t)cfg->default_max_frame_size,
            .handshake_timeout_ms = cfg->handshake_timeout,
            .close_timeout_ms = cfg->close_timeout,
            .handshake_pool = (unsigned)cfg->max_http_header_pool,
            .handshake_evict_ms = cfg->handshake_evict,
            .listen_backlog = (int)cfg->listen_backlog,
            .fd_reserve = (unsigned)cfg->fd_reserve,
            .max_queued_control = (size_t)cfg->max_queued_control,
            .tunnel_max_message = (size_t)cfg->tunnel_max_message,
            .tunnel_max_queued = (size_t)cfg->tunnel_max_queued,
            .tunnel_connect_timeout_ms = cfg->tunnel_connect_timeout,
            .tunnel_data_delay_ms = cfg->tunnel_data_delay,
        };

        inst->edges = edge_hub_new(host->loop, host, &es);
        if (!inst->edges) {
            free(inst->scratch);
            free(inst);
            return -ENOMEM;
        }
        /* tunnel callbacks exist in the listener callbacks from ABI 1.3 */
        edge_hub_enable_tunnels(inst->edges, host->abi_minor >= 3);
    }
    *out = inst;
    return 0;
}

static void init_tables(struct ws_instance *inst)
{
    const struct ws_config *cfg = &inst->cfg;
    struct lws_protocols *p;

    p = &inst->pipe_protocols[0];
    p->name = "emx-pipe";
    p->callback = ws_callback;
    p->rx_buffer_size = (size_t)cfg->rx_buffer_size;
    /* lws sends at most this per socket write and buffers the rest */
    p->tx_packet_size = WS_MAX_FRAME + 16;

    inst->pipe_exts[0].name = "permessage-deflate";
    inst->pipe_exts[0].callback = pmd_wrapper;
    inst->pipe_exts[0].client_offer = "permessage-deflate; client_max_window_bits";

    /* Pipes are answered by platforms: lws pings and hangs up on silence. */
    inst->pipe_retry.secs_since_valid_ping = (uint16_t)secs_of(cfg->ping_interval);
    inst->pipe_retry.secs_since_valid_hangup = (uint16_t)secs_of(cfg->idle_read_timeout);
}

static int ws_start(void *instance)
{
    struct ws_instance *inst = instance;
    struct lws_context_creation_info info;
    int rc;

    if (!inst || inst->state != INST_CREATED)
        return -EINVAL;
    init_tables(inst);
    if (!log_host) {
        log_host = inst->host;
        /* lws 4.1 formats every log line in one static buffer: with several
         * worker threads, each with its own lws context, lines would race
         * on it (ThreadSanitizer reports it). Pipes log what matters
         * themselves (a failed certificate check names its reason). */
        if (EMX_HOST_HAS(inst->host, workers) && inst->host->workers > 1)
            lws_set_log_level(0, NULL);
        else
            lws_set_log_level(LLL_ERR | LLL_WARN, lws_log_emit);
    }
    memset(&info, 0, sizeof(info));
    info.options = LWS_SERVER_OPTION_LIBUV | LWS_SERVER_OPTION_EXPLICIT_VHOSTS |
                   LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
    info.port = CONTEXT_PORT_NO_LISTEN;
    info.foreign_loops = inst->loops;
    info.user = inst;
    info.max_http_header_pool = (unsigned short)inst->cfg.max_http_header_pool;
    info.timeout_secs = secs_of(inst->cfg.handshake_timeout);
    /* lws reads every socket into this one per-loop buffer (4 KiB by
     * default): a pipe carrying many edges' answers is read in 64 KiB
     * gulps instead of ~7 answers per system call */
    info.pt_serv_buf_size = 65536;
    inst->ctx = lws_create_context(&info);
    if (!inst->ctx) {
        LOG(inst, EMX_LOG_ERROR, "ws: cannot create the libwebsockets context");
        return -ENOMEM;
    }

    inst->check.data = inst->reap.data = inst->teardown.data = inst;
    uv_check_init(inst->loop, &inst->check);
    uv_idle_init(inst->loop, &inst->reap);
    uv_timer_init(inst->loop, &inst->teardown);
    inst->pipe_timer.data = inst;
    uv_timer_init(inst->loop, &inst->pipe_timer);
    inst->flush_prep.data = inst;
    uv_prepare_init(inst->loop, &inst->flush_prep);
    inst->handles_open = 5;
    uv_check_start(&inst->check, check_cb);
    uv_prepare_start(&inst->flush_prep, flush_prep_cb);
    /* neither must keep the loop alive on its own */
    uv_unref((uv_handle_t *)&inst->check);
    uv_unref((uv_handle_t *)&inst->flush_prep);
    rc = edge_hub_start(inst->edges);
    if (rc) {
        LOG(inst, EMX_LOG_ERROR, "ws: cannot start the edge side");
        return rc;
    }
    {
        /* always ticking: it also ends host lookups that take too long */
        uint64_t tick = 1000;

        if (inst->cfg.ping_interval && inst->cfg.ping_interval < tick)
            tick = inst->cfg.ping_interval;
        if (inst->cfg.idle_read_timeout && inst->cfg.idle_read_timeout < tick)
            tick = inst->cfg.idle_read_timeout;
        if (uv_timer_start(&inst->pipe_timer, pipe_timer_cb, tick, tick) == 0) {
            uv_unref((uv_handle_t *)&inst->pipe_timer);
            inst->pipe_tick = tick;
        }
    }
    inst->state = INST_RUNNING;
    return 0;
}

static bool has_lws_handles(struct ws_instance *inst);

static void teardown_finish(struct ws_instance *inst)
{
    /* Any connection lws did not report closed is gone now. */
    while (inst->conns) {
        struct emx_conn *c = inst->conns;

        c->wsi = NULL; /* freed by lws: conn_gone must not touch it */
        conn_gone(c, 1001, "shutdown");
    }
    inst->state = INST_STOPPED;
    reap_flush(inst);
    close_handle(inst, (uv_handle_t *)&inst->check);
    close_handle(inst, (uv_handle_t *)&inst->reap);
    close_handle(inst, (uv_handle_t *)&inst->teardown);
    close_handle(inst, (uv_handle_t *)&inst->pipe_timer);
    close_handle(inst, (uv_handle_t *)&inst->flush_prep);
}

static void teardown_cb(uv_timer_t *t)
{
    struct ws_instance *inst = t->data;

    if (!inst->lws_first_destroyed) {
        /* From a uv callback, never from inside an lws protocol callback. */
        inst->lws_first_destroyed = true;
        lws_context_destroy(inst->ctx);
        return;
    }
    if (has_lws_handles(inst)) {
        if (++inst->teardown_ticks == 500)
            LOG(inst, EMX_LOG_WARN, "ws: libwebsockets handles still closing after 5s");
        return;
    }
    uv_timer_stop(t);
    /* The second call frees the context once lws's handles have closed. */
    lws_context_destroy(inst->ctx);
    inst->ctx = NULL;
    teardown_finish(inst);
}

struct walk_arg {
    struct ws_instance *inst;
    int n;
};

static void walk_cb(uv_handle_t *h, void *arg)
{
    struct walk_arg *w = arg;
    struct ws_instance *inst = w->inst;

    if (h == (uv_handle_t *)&inst->check || h == (uv_handle_t *)&inst->reap ||
        h == (uv_handle_t *)&inst->teardown || h == (uv_handle_t *)&inst->pipe_timer ||
        h == (uv_handle_t *)&inst->flush_prep)
        return;
    /* lws's static handles carry the context; its socket watchers are polls */
    if (h->data == (void *)inst->ctx)
        w->n++;
}

static bool has_lws_handles(struct ws_instance *inst)
{
    struct walk_arg w = {inst, 0};

    uv_walk(inst->loop, walk_cb, &w);
    return w.n > 0;
}

static void ws_stop(void *instance)
{
    struct ws_instance *inst = instance;

    if (!inst || inst->state != INST_RUNNING)
        return;
    inst->state = INST_STOPPING;
    edge_hub_stop(inst->edges);
    flush_pipes(inst);
    uv_prepare_stop(&inst->flush_prep);
    uv_timer_stop(&inst->pipe_timer);
    uv_check_stop(&inst->check);
    /* lookups still queued end now; a running one cannot be stopped and
     * keeps the loop until the resolver's own timeout */
    for (struct ws_resolve *r = inst->resolves; r; r = r->next)
        (void)uv_cancel((uv_req_t *)&r->req);
    /* first destroy at once from a timer callback, then poll every 10ms */
    uv_timer_start(&inst->teardown, teardown_cb, 0, 10);
}

static void ws_destroy(void *instance)
{
    struct ws_instance *inst = instance;

    if (!inst)
        return;
    if (inst->state == INST_RUNNING)
        ws_stop(inst);
    /* Finish the teardown if the loop was not run after stop(). */
    while (inst->state == INST_STOPPING)
        uv_run(inst->loop, UV_RUN_ONCE);
    while (inst->handles_open > 0)
        uv_run(inst->loop, UV_RUN_NOWAIT);
    /* a lookup's callback uses the instance */
    while (inst->resolves)
        uv_run(inst->loop, UV_RUN_ONCE);
    /* edges' poll handles report on_close from their close callbacks */
    while (!edge_hub_closed(inst->edges))
        uv_run(inst->loop, UV_RUN_NOWAIT);
    edge_hub_free(inst->edges);
    while (inst->cvhosts) {
        struct ws_client_vhost *v = inst->cvhosts;

        inst->cvhosts = v->next;
        free(v->ca);
        free(v->cert);
        free(v->key);
        free(v);
    }
    if (log_host == inst->host) {
        lws_set_log_level(LLL_ERR | LLL_WARN, NULL);
        log_host = NULL;
    }
    free(inst->scratch);
    free(inst);
}

/* ---- listen: edges are edge.c's ------------------------------------------- */

static int ws_listen(void *instance, const struct emx_listen_spec *spec,
                     const struct emx_conn_callbacks *cb, void *user, struct emx_listener **out)
{
    struct ws_instance *inst = instance;
    struct edge_settings *es;

    if (!inst || !spec)
        return -EINVAL;
    if (inst->state != INST_RUNNING)
        return -ESHUTDOWN;
    /* the core's settings stand in for options left at their defaults */
    es = edge_hub_settings(inst->edges);
    if (inst->core_idle && spec->idle_timeout_ms)
        es->idle_timeout_ms = spec->idle_timeout_ms;
    if (inst->core_deflate && spec->deflate != 0)
        es->deflate = spec->deflate > 0;
    return edge_listen(inst->edges, spec, cb, user, out);
}

static void ws_unlisten(struct emx_listener *listener)
{
    edge_unlisten(listener);
}

static int ws_adopt(struct emx_listener *listener, int fd)
{
    return edge_adopt(listener, fd);
}

static int ws_tunnel_counts(struct emx_conn *c, struct emx_tunnel_result *sofar)
{
    return ws_is_edge(c) ? edge_tunnel_counts(c, sofar) : -ENOENT;
}

static int ws_reload_tls(struct emx_listener *listener, const char *cert, const char *key)
{
    return edge_reload_tls(listener, cert, key);
}

static int ws_set_message_limit(struct emx_conn *c, size_t limit)
{
    return ws_is_edge(c) ? edge_set_message_limit(c, limit) : 0;
}

EMX_PLUGIN_EXPORT const struct emx_transport_plugin emx_transport_plugin = {
    .hdr = EMX_PLUGIN_HEADER(EMX_PLUGIN_TRANSPORT, struct emx_transport_plugin, "ws", "0.1.0"),
    .options = ws_options,
    .config_size = sizeof(struct ws_config),
    .create = ws_create,
    .start = ws_start,
    .stop = ws_stop,
    .destroy = ws_destroy,
    .listen = ws_listen,
    .unlisten = ws_unlisten,
    .connect = ws_connect,
    .send = ws_send,
    .buffered = ws_buffered,
    .pause_read = ws_pause_read,
    .close = ws_close,
    .reload_tls = ws_reload_tls,
    .set_message_limit = ws_set_message_limit,
    .adopt = ws_adopt,
    .tunnel_counts = ws_tunnel_counts,
};
