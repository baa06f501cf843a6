/* emx-transport-ws: WebSocket edges (listen) and pipes (connect) over
 * libwebsockets 4.1 running on the host's libuv loop as a foreign loop.
 *
 * Ownership and lifetime:
 * - struct emx_conn is ours. It is attached to its lws wsi (as the wsi user
 *   pointer) until lws closes the wsi; then it is detached, put on a reap
 *   list and on_close is delivered from a uv_idle callback, so on_close never
 *   runs inside a send()/close()/connect() made by the core, and exactly once.
 * - Bytes given to send() are borrowed: written at once when nothing is
 *   queued and lws holds no partial frame, otherwise copied into the
 *   connection's queue (with LWS_PRE headroom, so lws_write needs no copy).
 * - Frames to a peer never exceed the Max-Frame-Size it announced: without
 *   permessage-deflate we fragment by hand; with it, lws emits compressed
 *   frames of at most 1 << tx_buf_size bytes, and tx_buf_size is set per
 *   connection to the largest power of two <= the announced size.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <linux/sockios.h>

#include <libwebsockets.h>
#include <uv.h>

#include <edgemux/host.h>
#include <edgemux/option.h>
#include <edgemux/plugin.h>
#include <edgemux/transport.h>

#include "edge.h"

#define WS_DEFAULT_FRAME 8192u
#define WS_MAX_FRAME     65535u /* above this a frame needs a 64-bit length */
#define WS_MIN_FRAME     64u
#define WS_REASON_MAX    123 /* close payload is at most 125 bytes with the code */

struct ws_config {
    bool deflate;
    bool pipe_deflate;
    int64_t deflate_window_bits;
    int64_t deflate_mem_level;
    uint64_t edge_idle_timeout;
    uint64_t idle_sweep_period;
    uint64_t tcp_keepalive_idle;
    uint64_t tcp_keepalive_interval;
    int64_t tcp_keepalive_count;
    uint64_t tcp_user_timeout;
    uint64_t rx_buffer_size;
    uint64_t default_max_frame_size;
    uint64_t ping_interval;
    uint64_t idle_read_timeout;
    uint64_t pipe_max_queued;
    uint64_t handshake_timeout;
    uint64_t close_timeout;
    int64_t max_http_header_pool;
    int64_t listen_backlog;
    int64_t fd_reserve;
    int64_t inflate_window_bits;
    uint64_t handshake_evict;
    uint64_t max_queued_control;
};

/* Defaults of the options the core's settings can stand in for. */
#define DEF_EDGE_IDLE_MS 120000
#define DEF_PING_MS      30000
#define DEF_IDLE_READ_MS 60000
#define DEF_HANDSHAKE_MS 10000

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
    OPT("max_http_header_pool", EMX_OPT_INT, "1024", max_http_header_pool,
        "edges accepted and not yet upgraded at once; when full, the oldest is dropped once "
        "it is handshake_evict old, else the rest wait in the listen backlog"),
    OPT("handshake_evict", EMX_OPT_DURATION, "100ms", handshake_evict,
        "a full handshake pool drops its oldest socket once it has had this long to upgrade "
        "(silent or held sockets cannot lock devices out)"),
    OPT("max_queued_control", EMX_OPT_SIZE, "64KiB", max_queued_control,
        "an edge with more bytes queued than this gets no pong for its pings"),
    OPT("listen_backlog", EMX_OPT_INT, "65535", listen_backlog,
        "listen backlog of edge listeners; the kernel caps it at net.core.somaxconn"),
    OPT("fd_reserve", EMX_OPT_INT, "256", fd_reserve,
        "open files kept for pipes and the rest of the process: edges are accepted up to "
        "the open-file limit minus this"),
    EMX_OPTION_END,
};

struct ws_qmsg {
    struct ws_qmsg *next;
    size_t len;    /* payload bytes */
    size_t off;    /* payload bytes already handed to lws */
    bool inflight; /* deflate: lws may still read this buffer */
    uint8_t buf[]; /* LWS_PRE headroom, then the payload */
};

enum ws_conn_state { CONN_CONNECTING, CONN_OPEN, CONN_GONE };

struct ws_instance;

struct emx_conn {
    uint8_t kind; /* WS_KIND_PIPE: first, see edge.h */
    struct ws_instance *inst;
    struct lws *wsi;
    const struct emx_conn_callbacks *cb;
    void *user;
    struct emx_conn *prev, *next; /* instance's list of attached connections */
    struct emx_conn *reap_next;
    enum ws_conn_state state;
    bool reported; /* the core knows this connection (accepted or connect returned) */
    bool closing;  /* close() was called: flush, then close with close_code */
    bool deflate;
    bool rx_in_msg; /* inside a fragmented message */
    bool rx_drop;   /* closing on this message (oversize or text) */
    bool was_queued;
    bool linked; /* on the instance's list */
    uint32_t max_frame;
    size_t max_msg;
    uint8_t *rx;
    size_t rx_len, rx_cap;
    struct ws_qmsg *qh, *qt;
    size_t qbytes;
    uint16_t close_code;
    char close_reason[WS_REASON_MAX + 1];
    /* Pipes without deflate run on an lws raw socket with our own RFC 6455
     * client framing: lws 4.1's client parser costs ~60 instructions per
     * received byte and it masks sent bytes one at a time. */
    bool raw;
    struct ws_pipe *pp; /* pipes only: edges, the many, do without it */
};

/* What only a pipe needs (~270 bytes an idle edge no longer carries). */
struct ws_pipe {
    char *hdrs; /* "Name: value\r\n"... */
    size_t hdrs_len;
    uint32_t sndbuf;
    bool raw_req_sent; /* upgrade request written */
    bool raw_hdr;      /* frame header complete, payload follows */
    bool raw_fin;
    uint8_t raw_op;
    uint8_t fh[14];
    uint8_t fh_len;
    uint8_t ctl_len;
    uint8_t ctl[125];
    uint64_t f_left;
    uint32_t rng;
    uint64_t last_rx, last_ping; /* uv_now() ms */
    char *req;                   /* upgrade request */
    size_t req_len;
    char accept[32];                /* expected Sec-WebSocket-Accept */
    struct emx_conn *pprev, *pnext; /* instance's list of raw pipes */
    /* Frames sent while the socket is idle gather here and go out in one
     * write per loop iteration (flush_pipes), however many edges sent. */
    uint8_t *batch; /* LWS_PRE headroom, then BATCH_CAP bytes */
    size_t batch_len;
    /* Connect by name: the lookup runs in libuv's thread pool (lws 4.1.6
     * would resolve synchronously on the loop), then lws dials the address. */
    struct ws_resolve *res; /* lookup this connect waits on, or NULL */
    struct emx_conn *rnext; /* next waiter of the same lookup */
    uint64_t res_deadline;  /* uv_now() ms: the lookup gives up */
    struct lws_vhost *vh;
    char *path, *hosthdr; /* "host:port", for Host, SNI and the name check */
    uint16_t port;
    int ssl_flags;
    /* Bounded work for a platform that stops reading (pipe_rx_update). */
    bool rx_paused;   /* lws reads nothing from it now */
    bool core_paused; /* pause_read() from the core */
    bool over_cap;    /* queue reached pipe_max_queued; cleared at half */
    bool ctl_paused;  /* over its control frame budget until the next tick */
    bool pong_owed;   /* raw: pong for the latest ping, sent when nothing waits */
    uint8_t pong_len;
    uint16_t ctl_count; /* raw: pings and pongs read this tick */
    uint64_t tx_ok;     /* uv_now() ms when writes last progressed or nothing waited */
    uint8_t pong[125];
};

/* One host name lookup. Connects to the same name share it; it outlives
 * connections that stop waiting (a running getaddrinfo cannot be stopped). */
struct ws_resolve {
    uv_getaddrinfo_t req;
    struct ws_instance *inst;
    struct ws_resolve *next;
    struct emx_conn *waiters; /* through pp->rnext */
    char host[];
};

struct ws_client_vhost {
    struct ws_client_vhost *next;
    struct lws_vhost *vh;
    char *ca, *cert, *key;
};

enum ws_inst_state { INST_CREATED, INST_RUNNING, INST_STOPPING, INST_STOPPED };

struct ws_instance {
    const struct emx_host *host;
    struct ws_config cfg;
    /* Options left at their defaults: the core's own settings (ABI 1.1 spec
     * fields) take their place; an option changed here wins. */
    bool core_idle, core_deflate, core_ping, core_idle_read, core_handshake;
    uint64_t pipe_tick; /* period of pipe_timer; 0: not running */
    uv_loop_t *loop;
    void *loops[1];
    struct lws_context *ctx;
    enum ws_inst_state state;
    bool lws_first_destroyed;
    unsigned teardown_ticks;
    int handles_open;
    uv_check_t check;
    uv_prepare_t flush_prep; /* writes gathered pipe frames before the loop polls */
    uv_idle_t reap;
    uv_timer_t sweep;
    uv_timer_t teardown;
    uv_timer_t pipe_timer;   /* pings and silence checks of raw pipes */
    /* Edge sockets adopted by lws and not yet destroyed, and those of them
     * not yet upgraded; wsi opaque data points at one of the tags. */
    struct emx_conn *pipes;
    size_t pmd_conns;       /* open connections with permessage-deflate */
    struct emx_conn *conns; /* attached connections */
    struct emx_conn *sweep_cursor;
    size_t conn_count;
    struct emx_conn *reap_head, *reap_tail;
    struct edge_hub *edges; /* edges: accept, upgrade, framing (edge.c) */
    struct ws_client_vhost *cvhosts;
    struct ws_resolve *resolves; /* lookups under way */
    char res_failed[64];         /* last name that did not resolve, and when it was logged */
    uint64_t res_failed_logged;
    unsigned vhost_seq;
    struct lws *pmd_wsi; /* wsi whose permessage-deflate was just constructed */
    struct lws_protocols pipe_protocols[2];
    struct lws_extension pipe_exts[2];
    lws_retry_bo_t pipe_retry;
    lws_retry_bo_t raw_retry; /* all zero: raw pipes keep their own time */
    uint8_t *scratch;         /* LWS_PRE + a frame: direct writes of borrowed bytes */
};

/* lws logs through one process-wide hook; it goes to the first host. */
static const struct emx_host *log_host;

#define LOG(inst_, lvl_, ...) (inst_)->host->log((inst_)->host, (lvl_), __VA_ARGS__)

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

static void *ws_zalloc(size_t n)
{
    return calloc(1, n);
}

static char *ws_strdup(const char *s)
{
    size_t n;
    char *d;

    if (!s)
        return NULL;
    n = strlen(s) + 1;
    d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

static unsigned secs_of(uint64_t ms)
{
    uint64_t s = (ms + 999) / 1000;

    return s > 65535 ? 65535 : (unsigned)s;
}

/* ---- connection list and reaping ---------------------------------------- */

static void conn_link(struct ws_instance *inst, struct emx_conn *c)
{
    c->linked = true;
    c->prev = NULL;
    c->next = inst->conns;
    if (inst->conns)
        inst->conns->prev = c;
    inst->conns = c;
    inst->conn_count++;
}

static void conn_unlink(struct ws_instance *inst, struct emx_conn *c)
{
    if (!c->linked)
        return;
    c->linked = false;
    if (inst->sweep_cursor == c)
        inst->sweep_cursor = c->next;
    if (c->prev)
        c->prev->next = c->next;
    else if (inst->conns == c)
        inst->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
    inst->conn_count--;
}

static void queue_free(struct emx_conn *c)
{
    while (c->qh) {
        struct ws_qmsg *m = c->qh;

        c->qh = m->next;
        free(m);
    }
    c->qt = NULL;
    c->qbytes = 0;
}

static void pipe_unlink(struct ws_instance *inst, struct emx_conn *c)
{
    if (!c->pp)
        return;
    if (c->pp->pprev)
        c->pp->pprev->pp->pnext = c->pp->pnext;
    else if (inst->pipes == c)
        inst->pipes = c->pp->pnext;
    if (c->pp->pnext)
        c->pp->pnext->pp->pprev = c->pp->pprev;
    c->pp->pprev = c->pp->pnext = NULL;
}

static void conn_free(struct emx_conn *c)
{
    queue_free(c);
    free(c->rx);
    if (c->pp) {
        free(c->pp->hdrs);
        free(c->pp->req);
        free(c->pp->batch);
        free(c->pp->path);
        free(c->pp->hosthdr);
        free(c->pp);
    }
    free(c);
}

static void reap_flush(struct ws_instance *inst)
{
    while (inst->reap_head) {
        struct emx_conn *c = inst->reap_head;

        inst->reap_head = c->reap_next;
        if (!inst->reap_head)
            inst->reap_tail = NULL;
        /* The reason may be a peer's text (close frame, refused upgrade):
         * no control characters reach the core's logs. */
        for (char *r = c->close_reason; *r; r++)
            if ((unsigned char)*r < 0x20 || *r == 0x7f)
                *r = '?';
        if (c->cb->on_close)
            c->cb->on_close(c->user, c->close_code ? c->close_code : 1006,
                            c->close_reason[0] ? c->close_reason : "");
        conn_free(c);
    }
}

static void reap_cb(uv_idle_t *h)
{
    struct ws_instance *inst = h->data;

    uv_idle_stop(h);
    reap_flush(inst);
}

static void reap_arm(struct ws_instance *inst)
{
    if (inst->reap_head && inst->state < INST_STOPPED && inst->handles_open)
        uv_idle_start(&inst->reap, reap_cb);
}

static void resolve_detach(struct emx_conn *c);

/* lws is done with the wsi: detach and hand on_close to the reap idle. */
static void conn_gone(struct emx_conn *c, uint16_t code, const char *reason)
{
    struct ws_instance *inst = c->inst;

    if (c->state == CONN_GONE)
        return;
    if (c->pp && c->pp->res)
        resolve_detach(c);
    if (c->wsi)
        lws_set_wsi_user(c->wsi, NULL);
    conn_unlink(inst, c);
    pipe_unlink(inst, c);
    if (c->pp)
        c->pp->batch_len = 0; /* the socket is gone with what was gathered */
    if (c->deflate && c->state == CONN_OPEN && inst->pmd_conns)
        inst->pmd_conns--;
    c->wsi = NULL;
    c->state = CONN_GONE;
    if (!c->close_code)
        c->close_code = code;
    if (reason && !c->close_reason[0])
        snprintf(c->close_reason, sizeof(c->close_reason), "%s", reason);
    queue_free(c);
    free(c->rx);
    c->rx = NULL;
    c->rx_len = c->rx_cap = 0;
    if (!c->reported) {
        /* connect() failed before returning: it frees it */
        c->reap_next = NULL;
        return;
    }
    c->reap_next = NULL;
    if (inst->reap_tail)
        inst->reap_tail->reap_next = c;
    else
        inst->reap_head = c;
    inst->reap_tail = c;
    reap_arm(inst);
}

/* ---- socket helpers ------------------------------------------------------- */

static void set_int_opt(int fd, int level, int name, int v)
{
    /* Best effort: a failure only weakens dead-peer detection. */
    (void)setsockopt(fd, level, name, &v, sizeof(v));
}

static void peer_string(int fd, char *out, size_t outlen)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    char ip[INET6_ADDRSTRLEN];

    out[0] = '\0';
    if (fd < 0 || getpeername(fd, (struct sockaddr *)&ss, &sl) != 0)
        return;
    if (ss.ss_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)&ss;

        if (inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof(ip)))
            snprintf(out, outlen, "%s:%u", ip, (unsigned)ntohs(s4->sin_port));
    } else if (ss.ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&ss;

        /* a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d */
        if (IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr)) {
            if (inet_ntop(AF_INET, &s6->sin6_addr.s6_addr[12], ip, sizeof(ip)))
                snprintf(out, outlen, "%s:%u", ip, (unsigned)ntohs(s6->sin6_port));
        } else if (inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof(ip))) {
            snprintf(out, outlen, "[%s]:%u", ip, (unsigned)ntohs(s6->sin6_port));
        }
    }
}

/* ---- closing -------------------------------------------------------------- */

/* lws re-arms its libuv timer only after servicing an event, so a timeout
 * set from outside lws service (a uv timer, a core call) would wait for the
 * next network event: wake lws through its event pipe. */
static void lws_kick(struct ws_instance *inst)
{
    if (inst->ctx && inst->state == INST_RUNNING)
        lws_cancel_service(inst->ctx);
}

/* Close from outside an lws callback: lws closes the wsi on its next
 * service, and on_close follows through the reap list. */
static void conn_kill(struct emx_conn *c, uint16_t code, const char *reason)
{
    if (c->state == CONN_GONE || !c->wsi)
        return;
    if (!c->close_code)
        c->close_code = code;
    if (reason && !c->close_reason[0])
        snprintf(c->close_reason, sizeof(c->close_reason), "%s", reason);
    lws_set_timeout(c->wsi, PENDING_TIMEOUT_KILLED_BY_PARENT, LWS_TO_KILL_ASYNC);
    lws_kick(c->inst);
}

/* Inside an lws callback for this wsi: set the close frame, caller returns -1. */
static int conn_close_now(struct emx_conn *c, uint16_t code, const char *reason)
{
    if (!c->close_code)
        c->close_code = code;
    if (reason && !c->close_reason[0]) {
        /* memmove: callers may pass c->close_reason itself */
        size_t n = strnlen(reason, sizeof(c->close_reason) - 1);
        memmove(c->close_reason, reason, n);
        c->close_reason[n] = '\0';
    }
    if (c->wsi)
        lws_close_reason(c->wsi, (enum lws_close_status)c->close_code,
                         (unsigned char *)c->close_reason, strlen(c->close_reason));
    return -1;
}

/* ---- sending -------------------------------------------------------------- */

static int queue_push(struct emx_conn *c, const uint8_t *data, size_t len, size_t off)
{
    struct ws_qmsg *m;

    if (len > SIZE_MAX - sizeof(*m) - LWS_PRE)
        return -EMSGSIZE;
    m = malloc(sizeof(*m) + LWS_PRE + (len < 8 ? 8 : len));
    if (!m)
        return -ENOMEM;
    m->next = NULL;
    m->len = len;
    m->off = off;
    m->inflight = false;
    memcpy(m->buf + LWS_PRE, data, len);
    if (c->qt)
        c->qt->next = m;
    else
        c->qh = m;
    c->qt = m;
    c->qbytes += len - off;
    c->was_queued = true;
    return 0;
}

static void queue_pop(struct emx_conn *c)
{
    struct ws_qmsg *m = c->qh;

    c->qh = m->next;
    if (!c->qh)
        c->qt = NULL;
    c->qbytes -= m->len - m->off;
    free(m);
}

/* Write the next fragment of `m`; the bytes before m's payload position are
 * headroom lws may overwrite (already sent, or the LWS_PRE reserve). */
static int write_fragment(struct emx_conn *c, uint8_t *payload, size_t len, size_t *off)
{
    size_t frag = len - *off;
    int flags;

    if (frag > c->max_frame)
        frag = c->max_frame;
    flags = lws_write_ws_flags(LWS_WRITE_BINARY, *off == 0, *off + frag == len);
    if (lws_write(c->wsi, payload + *off, frag, (enum lws_write_protocol)flags) < 0)
        return -EIO;
    *off += frag;
    return 0;
}

static int raw_flush(struct emx_conn *c);

/* Drain the queue while lws holds nothing back. Returns 0 or -EIO. */
static int queue_drain(struct emx_conn *c)
{
    if (c->raw && raw_flush(c))
        return -EIO;
    while (c->raw && c->qh && !lws_partial_buffered(c->wsi)) {
        struct ws_qmsg *m = c->qh;

        /* framed already; lws keeps whatever the socket does not take */
        if (lws_write(c->wsi, m->buf + LWS_PRE + m->off, m->len - m->off, LWS_WRITE_RAW) < 0)
            return -EIO;
        c->qbytes -= m->len - m->off;
        m->off = m->len;
        queue_pop(c);
    }
    while (!c->raw && c->qh) {
        struct ws_qmsg *m = c->qh;

        if (c->deflate) {
            if (m->inflight) {
                /* lws calls us back only once its deflate drain is over */
                queue_pop(c);
                continue;
            }
            if (!m->len) {
                /* lws asserts on deflating nothing: send an empty binary
                 * frame ourselves (a client masks it with a zero key) */
                static const uint8_t empty[] = {0x82, 0x80, 0, 0, 0, 0};
                uint8_t *f = m->buf + LWS_PRE;

                memcpy(f, empty, sizeof(empty));
                if (lws_write(c->wsi, f, 6, LWS_WRITE_RAW) < 0)
                    return -EIO;
                queue_pop(c);
                continue;
            }
            if (lws_write(c->wsi, m->buf + LWS_PRE, m->len, LWS_WRITE_BINARY) < 0)
                return -EIO;
            m->inflight = true;
            if (lws_send_pipe_choked(c->wsi))
                return 0;
            queue_pop(c);
            continue;
        }
        {
            size_t before = m->off;
            int rc;

            do {
                rc = write_fragment(c, m->buf + LWS_PRE, m->len, &m->off);
                if (rc)
                    return rc;
            } while (m->off < m->len && !lws_partial_buffered(c->wsi));
            c->qbytes -= m->off - before;
            if (m->off < m->len)
                return 0;
            c->qbytes += m->len - m->off; /* queue_pop subtracts the rest (0) */
            queue_pop(c);
            if (lws_partial_buffered(c->wsi))
                return 0;
        }
    }
    return 0;
}

/* ---- raw pipes: RFC 6455 client framing ---------------------------------- */

#define RAW_HDR_MAX 8 /* 2 + 16-bit length + mask key: frames stay <= 65535 */

static size_t raw_wire_len(const struct emx_conn *c, size_t len)
{
    size_t frames = len ? (len + c->max_frame - 1) / c->max_frame : 1;
    size_t last = len - (frames - 1) * c->max_frame;

    /* every frame but the last is max_frame (> 125) long */
    return len + (frames - 1) * RAW_HDR_MAX + (last > 125 ? 8 : 6);
}

static uint32_t raw_rand(struct emx_conn *c)
{
    /* xorshift32 seeded from lws's random source: mask keys only need to be
     * unpredictable to scripts in a browser, which pipes never carry */
    uint32_t x = c->pp->rng;

    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return c->pp->rng = x;
}

/* Copy `len` bytes masked with `key` (bytes in wire order), 8 at a time. */
static void raw_mask_copy(uint8_t *dst, const uint8_t *src, size_t len, const uint8_t key[4])
{
    uint64_t k8;
    uint8_t kb[8];
    size_t i = 0;

    memcpy(kb, key, 4);
    memcpy(kb + 4, key, 4);
    memcpy(&k8, kb, 8);
    for (; i + 8 <= len; i += 8) {
        uint64_t v;

        memcpy(&v, src + i, 8);
        v ^= k8;
        memcpy(dst + i, &v, 8);
    }
    for (; i < len; i++)
        dst[i] = src[i] ^ key[i & 3];
}

/* Frame a whole message (fragmented at max_frame) into dst, which holds
 * raw_wire_len() bytes. Returns the bytes written. */
static size_t raw_frame(struct emx_conn *c, uint8_t *dst, uint8_t op, const uint8_t *data,
                        size_t len)
{
    size_t off = 0, w = 0;

    do {
        size_t frag = len - off;
        uint32_t r = raw_rand(c);
        uint8_t key[4];

        if (frag > c->max_frame)
            frag = c->max_frame;
        dst[w++] = (uint8_t)((off + frag == len ? 0x80 : 0) | (off == 0 ? op : 0));
        if (frag > 125) {
            dst[w++] = 0x80 | 126;
            dst[w++] = (uint8_t)(frag >> 8);
            dst[w++] = (uint8_t)frag;
        } else {
            dst[w++] = (uint8_t)(0x80 | frag);
        }
        memcpy(key, &r, 4);
        memcpy(dst + w, key, 4);
        w += 4;
        if (frag)
            raw_mask_copy(dst + w, data + off, frag, key);
        w += frag;
        off += frag;
    } while (off < len);
    return w;
}

static int queue_drain(struct emx_conn *c);
static int send_close_frame(struct emx_conn *c);

#define BATCH_CAP       65536u /* gathered bytes per pipe before an early write */
#define BATCH_FRAME_MAX 16384u /* larger messages are written on their own */

#define PIPE_QUEUED_MIN 65536u
#define RAW_CTL_BUDGET  64 /* pings and pongs read from a raw pipe per pipe_timer tick */

static size_t pipe_cap(const struct ws_instance *inst)
{
    uint64_t cap = inst->cfg.pipe_max_queued;

    if (cap < PIPE_QUEUED_MIN)
        cap = PIPE_QUEUED_MIN;
    return cap > SIZE_MAX / 2 ? SIZE_MAX / 2 : (size_t)cap;
}

/* Read a pipe only while what it sends can be answered: paused while the
 * core asks, while its control frames are over budget, while its queue is
 * over pipe_max_queued (until half of it drained) and while lws holds a
 * partial write. lws 4.1.6 reads nothing from a raw socket with a partial
 * write, and the level-triggered POLLIN it leaves armed spins the loop. */
static void pipe_rx_update(struct emx_conn *c)
{
    struct ws_pipe *pp = c->pp;
    size_t cap = pipe_cap(c->inst);
    bool want;

    if (!pp || c->state != CONN_OPEN || !c->wsi)
        return;
    if (c->qbytes >= cap)
        pp->over_cap = true;
    else if (c->qbytes <= cap / 2)
        pp->over_cap = false;
    want = pp->core_paused || pp->ctl_paused || pp->over_cap || lws_partial_buffered(c->wsi);
    if (want == pp->rx_paused)
        return;
    pp->rx_paused = want;
    (void)lws_rx_flow_control(c->wsi, want ? 0 : 1);
    if (!want)
        lws_kick(c->inst); /* replays what lws buffered meanwhile */
}

/* Write what a pipe gathered: one system call for every frame the loop
 * iteration produced. lws keeps what the socket does not take. */
static int raw_flush(struct emx_conn *c)
{
    size_t n = c->pp->batch_len;

    if (!n || !c->wsi)
        return 0;
    c->pp->batch_len = 0;
    if (lws_write(c->wsi, c->pp->batch + LWS_PRE, n, LWS_WRITE_RAW) < 0)
        return -EIO;
    if (lws_partial_buffered(c->wsi)) {
        c->was_queued = true; /* on_writable once lws has written the rest */
        pipe_rx_update(c);
    }
    return 0;
}

static int raw_send(struct emx_conn *c, uint8_t op, const uint8_t *data, size_t len);

/* RFC 6455 5.5.3: only the latest ping needs its pong. It goes out when
 * nothing is queued, so a peer flooding pings and not reading costs one
 * pending pong, not a queue of them. */
static int raw_pong(struct emx_conn *c)
{
    if (!c->pp->pong_owed || c->state != CONN_OPEN || c->closing || !c->wsi || c->qh ||
        lws_partial_buffered(c->wsi))
        return 0;
    c->pp->pong_owed = false;
    return raw_send(c, 0xA, c->pp->pong, c->pp->pong_len);
}

static void flush_pipes(struct ws_instance *inst)
{
    struct emx_conn *c, *n;

    for (c = inst->pipes; c; c = n) {
        n = c->pp->pnext;
        if ((c->pp->pong_owed && raw_pong(c)) || (c->pp->batch_len && raw_flush(c)))
            conn_kill(c, 1006, "write failed");
    }
}

static void flush_prep_cb(uv_prepare_t *h)
{
    flush_pipes(h->data);
}

/* Send one message or control frame on a raw pipe. When nothing waits,
 * small frames are gathered for one write per loop iteration and larger
 * ones framed into the scratch buffer and written at once; otherwise the
 * frame goes to the queue. */
static int raw_send(struct emx_conn *c, uint8_t op, const uint8_t *data, size_t len)
{
    size_t wire = raw_wire_len(c, len);
    struct ws_qmsg *m;
    bool idle = !c->qh && !lws_partial_buffered(c->wsi);

    if (idle && wire <= BATCH_FRAME_MAX && c->inst->state == INST_RUNNING) {
        if (c->pp->batch_len + wire > BATCH_CAP && raw_flush(c))
            return -EIO;
        if (!c->pp->batch)
            c->pp->batch = malloc(LWS_PRE + BATCH_CAP);
        if (c->pp->batch && !lws_partial_buffered(c->wsi)) {
            c->pp->batch_len +=
                raw_frame(c, c->pp->batch + LWS_PRE + c->pp->batch_len, op, data, len);
            return 0;
        }
    }
    /* what was gathered goes first */
    if (raw_flush(c))
        return -EIO;
    idle = !c->qh && !lws_partial_buffered(c->wsi);
    if (idle && wire <= RAW_HDR_MAX + WS_MAX_FRAME) {
        uint8_t *f = c->inst->scratch + LWS_PRE;

        raw_frame(c, f, op, data, len);
        /* lws keeps what the socket does not take and reports it partial */
        return lws_write(c->wsi, f, wire, LWS_WRITE_RAW) < 0 ? -EIO : 0;
    }
    if (len > SIZE_MAX / 2)
        return -EMSGSIZE;
    m = malloc(sizeof(*m) + LWS_PRE + wire);
    if (!m)
        return -ENOMEM;
    m->next = NULL;
    m->len = raw_frame(c, m->buf + LWS_PRE, op, data, len);
    m->off = 0;
    m->inflight = false;
    if (c->qt)
        c->qt->next = m;
    else
        c->qh = m;
    c->qt = m;
    c->qbytes += m->len;
    c->was_queued = true;
    if (idle && queue_drain(c))
        return -EIO;
    if (c->qh)
        lws_callback_on_writable(c->wsi);
    return 0;
}

static int ws_send(struct emx_conn *c, const uint8_t *data, size_t len)
{
    size_t off = 0;
    int rc;

    if (ws_is_edge(c))
        return edge_send(c, data, len);
    if (!c || c->state != CONN_OPEN || c->closing || !c->wsi)
        return -EPIPE;
    if (!data && len)
        return -EINVAL;
    /* A platform that stops reading must not grow memory: past the cap
     * the core answers for itself (0xA0 to a device's request). */
    if (c->pp && c->qbytes >= pipe_cap(c->inst))
        return -ENOBUFS;
    if (c->raw) {
        rc = raw_send(c, 0x2, data, len);
        if (rc == -EIO)
            conn_kill(c, 1006, "write failed");
        else if (rc)
            conn_kill(c, 1011, "out of memory");
        else
            pipe_rx_update(c);
        return rc;
    }
    if (c->deflate || c->qh || lws_partial_buffered(c->wsi)) {
        bool idle = !c->qh && !lws_partial_buffered(c->wsi);

        rc = queue_push(c, data ? data : (const uint8_t *)"", len, 0);
        if (rc)
            return rc;
        if (idle && c->deflate) {
            if (queue_drain(c)) {
                conn_kill(c, 1006, "write failed");
                return -EIO;
            }
        }
        if (c->qh)
            lws_callback_on_writable(c->wsi);
        pipe_rx_update(c);
        return 0;
    }
    /* Nothing queued: write from the caller's bytes now (one copy into the
     * scratch frame; asking for a writeable callback per message halves
     * throughput on libuv). */
    do {
        size_t frag = len - off;
        int flags;

        if (frag > c->max_frame)
            frag = c->max_frame;
        if (frag)
            memcpy(c->inst->scratch + LWS_PRE, data + off, frag);
        flags = lws_write_ws_flags(LWS_WRITE_BINARY, off == 0, off + frag == len);
        if (lws_write(c->wsi, c->inst->scratch + LWS_PRE, frag, (enum lws_write_protocol)flags) <
            0) {
            conn_kill(c, 1006, "write failed");
            return -EIO;
        }
        off += frag;
    } while (off < len && !lws_partial_buffered(c->wsi));
    if (off < len) {
        rc = queue_push(c, data, len, off);
        if (rc) {
            /* half a message is on the wire: the stream cannot continue */
            conn_kill(c, 1011, "out of memory");
            return rc;
        }
        lws_callback_on_writable(c->wsi);
    }
    pipe_rx_update(c); /* a partial write: not read until it drains */
    return 0;
}

static size_t ws_buffered(struct emx_conn *c)
{
    size_t n;
    int q = 0;
    int fd;

    if (ws_is_edge(c))
        return edge_buffered(c);
    if (!c || c->state == CONN_GONE || !c->wsi)
        return 0;
    /* The core asks at the end of a loop iteration: what a pipe gathered
     * goes to the socket now, so a full gathering buffer (as large as the
     * default high watermark) never reads as a pipe that cannot keep up. */
    if (c->raw && c->pp->batch_len && raw_flush(c))
        conn_kill(c, 1006, "write failed");
    n = c->qbytes + (c->pp ? c->pp->batch_len : 0);
    fd = (int)lws_get_socket_fd(c->wsi);
    if (fd >= 0 && ioctl(fd, SIOCOUTQ, &q) == 0 && q > 0)
        n += (size_t)q;
    return n;
}

static int ws_pause_read(struct emx_conn *c, bool pause)
{
    if (ws_is_edge(c))
        return edge_pause_read(c, pause);
    if (!c || c->state == CONN_GONE || !c->wsi)
        return -ENOTCONN;
    if (c->pp) { /* pipes pause for reasons of their own too */
        c->pp->core_paused = pause;
        pipe_rx_update(c);
        return 0;
    }
    if (lws_rx_flow_control(c->wsi, pause ? 0 : 1) < 0)
        return -EIO;
    /* input lws buffered while paused is replayed from its idle handler */
    if (!pause)
        lws_kick(c->inst);
    return 0;
}

static void ws_close(struct emx_conn *c, uint16_t code, const char *reason)
{
    if (ws_is_edge(c)) {
        edge_close(c, code, reason);
        return;
    }    if (c && c->state == CONN_CONNECTING && c->pp && c->pp->res) {
        /* still looking its host up: no socket yet, on_close follows */
        conn_gone(c, code ? code : 1000, reason);
        return;
    }
    if (!c || c->state == CONN_GONE || c->closing || !c->wsi)
        return;
    c->closing = true;
    c->close_code = code ? code : 1000;
    snprintf(c->close_reason, sizeof(c->close_reason), "%s", reason ? reason : "");
    if (c->state == CONN_CONNECTING) {
        lws_set_timeout(c->wsi, PENDING_TIMEOUT_KILLED_BY_PARENT, LWS_TO_KILL_ASYNC);
        lws_kick(c->inst);
        return;
    }
    /* Flush what is queued, then send the close frame from the writeable
     * callback; the timeout bounds a peer that stopped reading. */
    lws_set_timeout(c->wsi, PENDING_TIMEOUT_CLOSE_SEND, (int)secs_of(c->inst->cfg.close_timeout));
    lws_callback_on_writable(c->wsi);
    lws_kick(c->inst);
}

/* ---- receiving ------------------------------------------------------------ */

static int rx_append(struct emx_conn *c, const uint8_t *in, size_t len)
{
    if (len > c->max_msg - c->rx_len)
        return -EMSGSIZE;
    if (c->rx_len + len > c->rx_cap) {
        size_t cap = c->rx_cap ? c->rx_cap : 4096;
        uint8_t *p;

        while (cap < c->rx_len + len)
            cap = cap > SIZE_MAX / 2 ? SIZE_MAX : cap * 2;
        if (cap > c->max_msg)
            cap = c->max_msg;
        p = realloc(c->rx, cap);
        if (!p)
            return -ENOMEM;
        c->rx = p;
        c->rx_cap = cap;
    }
    memcpy(c->rx + c->rx_len, in, len);
    c->rx_len += len;
    return 0;
}

static int handle_rx(struct emx_conn *c, struct lws *wsi, uint8_t *in, size_t len)
{
    bool final = lws_is_final_fragment(wsi) != 0;
    int rc;

    if (c->state != CONN_OPEN || c->rx_drop)
        return 0;
    if (!c->rx_in_msg && !lws_frame_is_binary(wsi)) {
        c->rx_drop = true;
        return conn_close_now(c, 1003, "text frames are not accepted");
    }
    if (!c->rx_in_msg && final) {
        /* the common case: one frame, one buffer, no copy */
        if (len > c->max_msg) {
            c->rx_drop = true;
            return conn_close_now(c, 1009, "message too big");
        }
        c->cb->on_message(c->user, in, len);
        return 0;
    }
    c->rx_in_msg = true;
    rc = rx_append(c, in, len);
    if (rc) {
        c->rx_drop = true;
        return conn_close_now(c, rc == -EMSGSIZE ? 1009 : 1011,
                              rc == -EMSGSIZE ? "message too big" : "out of memory");
    }
    if (!final)
        return 0;
    c->rx_in_msg = false;
    c->cb->on_message(c->user, c->rx, c->rx_len);
    c->rx_len = 0;
    /* keep small buffers, give big ones back (idle edges must stay cheap) */
    if (c->rx_cap > 16384) {
        free(c->rx);
        c->rx = NULL;
        c->rx_cap = 0;
    }
    return 0;
}

/* ---- raw pipes: upgrade and receive --------------------------------------- */

static const char ws_guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/* The upgrade request and the Sec-WebSocket-Accept it must be answered with. */
static int raw_build_request(struct emx_conn *c, const char *path, const char *hosthdr)
{
    struct lws_context *ctx = c->inst->ctx;
    uint8_t nonce[16], sha[20];
    char key[32], cat[32 + sizeof(ws_guid)];
    size_t n;
    int w;

    if (lws_get_random(ctx, nonce, sizeof(nonce)) != sizeof(nonce) ||
        lws_get_random(ctx, &c->pp->rng, sizeof(c->pp->rng)) != sizeof(c->pp->rng))
        return -EIO;
    if (!c->pp->rng)
        c->pp->rng = 0x9e3779b9u; /* xorshift must not start at 0 */
    if (lws_b64_encode_string((const char *)nonce, sizeof(nonce), key, sizeof(key)) <= 0)
        return -EIO;
    snprintf(cat, sizeof(cat), "%s%s", key, ws_guid);
    lws_SHA1((const unsigned char *)cat, strlen(cat), sha);
    if (lws_b64_encode_string((const char *)sha, sizeof(sha), c->pp->accept,
                              sizeof(c->pp->accept)) <= 0)
        return -EIO;
    n = strlen(path) + 2 * strlen(hosthdr) + c->pp->hdrs_len + 200;
    c->pp->req = malloc(n);
    if (!c->pp->req)
        return -ENOMEM;
    w = snprintf(c->pp->req, n,
                 "GET %s HTTP/1.1\r\nHost: %s\r\nOrigin: %s\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
                 "%.*s\r\n",
                 path, hosthdr, hosthdr, key, (int)c->pp->hdrs_len, c->pp->hdrs ? c->pp->hdrs : "");
    if (w < 0 || (size_t)w >= n || (size_t)w > WS_MAX_FRAME)
        return -EINVAL;
    c->pp->req_len = (size_t)w;
    return 0;
}

/* A client masks; a zero key leaves the payload as is. No close frame while
 * lws holds a partial write (it must not be interleaved). Returns -1. */
static int raw_close_now(struct emx_conn *c, uint16_t code, const char *reason)
{
    if (!c->close_code)
        c->close_code = code;
    if (reason && !c->close_reason[0])
        snprintf(c->close_reason, sizeof(c->close_reason), "%s", reason);
    if (!c->wsi || raw_flush(c) || lws_partial_buffered(c->wsi))
        return -1;
    if (c->close_code == 1005 || c->close_code == 1006) {
        static const uint8_t empty[] = {0x88, 0x80, 0, 0, 0, 0};
        uint8_t buf[LWS_PRE + sizeof(empty)];

        memcpy(buf + LWS_PRE, empty, sizeof(empty));
        (void)lws_write(c->wsi, buf + LWS_PRE, sizeof(empty), LWS_WRITE_RAW);
        return -1;
    }
    return send_close_frame(c);
}

static int raw_frame_end(struct emx_conn *c)
{
    switch (c->pp->raw_op) {
    case 0x9: /* ping: its pong goes out from flush_pipes (raw_pong) */
        memcpy(c->pp->pong, c->pp->ctl, c->pp->ctl_len);
        c->pp->pong_len = c->pp->ctl_len;
        c->pp->pong_owed = true;
        return 0;
    case 0xA:
        return 0;
    case 0x8: { /* the peer closes: keep its code, echo it, hang up */
        uint16_t code =
            c->pp->ctl_len >= 2 ? (uint16_t)((c->pp->ctl[0] << 8) | c->pp->ctl[1]) : 1005;

        if (!c->close_code) {
            c->close_code = code;
            if (c->pp->ctl_len > 2)
                snprintf(c->close_reason, sizeof(c->close_reason), "%.*s",
                         (int)(c->pp->ctl_len - 2), (const char *)c->pp->ctl + 2);
        }
        return raw_close_now(c, code, NULL);
    }
    default:
        if (!c->pp->raw_fin)
            return 0;
        c->rx_in_msg = false;
        c->cb->on_message(c->user, c->rx ? c->rx : c->pp->ctl, c->rx_len);
        c->rx_len = 0;
        if (c->rx_cap > 16384) {
            free(c->rx);
            c->rx = NULL;
            c->rx_cap = 0;
        }
        return 0;
    }
}

static size_t raw_hdr_need(const uint8_t *fh)
{
    uint8_t l7 = fh[1] & 0x7f;

    return 2 + (l7 == 126 ? 2 : l7 == 127 ? 8 : 0) + ((fh[1] & 0x80) ? 4 : 0);
}

static int raw_header(struct emx_conn *c)
{
    uint8_t b0 = c->pp->fh[0], b1 = c->pp->fh[1], op = b0 & 0x0f, l7 = b1 & 0x7f;
    bool fin = (b0 & 0x80) != 0;
    uint64_t plen = l7;
    int i;

    c->pp->fh_len = 0;
    /* no extension is negotiated and servers never mask */
    if ((b0 & 0x70) || (b1 & 0x80))
        return raw_close_now(c, 1002, "protocol error");
    if (l7 == 126) {
        plen = (uint64_t)c->pp->fh[2] << 8 | c->pp->fh[3];
    } else if (l7 == 127) {
        plen = 0;
        for (i = 0; i < 8; i++)
            plen = plen << 8 | c->pp->fh[2 + i];
        if (plen >> 63)
            return raw_close_now(c, 1002, "protocol error");
    }
    if (op >= 0x8) {
        if (!fin || plen > 125 || op > 0xA)
            return raw_close_now(c, 1002, "protocol error");
        c->pp->ctl_len = 0;
        /* a ping flood is read at a bounded rate (the rest of this read is
         * parsed, then lws reads no more until the next tick) */
        if (op != 0x8 && ++c->pp->ctl_count >= RAW_CTL_BUDGET && !c->pp->ctl_paused) {
            c->pp->ctl_paused = true;
            pipe_rx_update(c);
        }
    } else if (op == 0x1) {
        return raw_close_now(c, 1003, "text frames are not accepted");
    } else if ((op == 0x0) != c->rx_in_msg || op > 0x2) {
        return raw_close_now(c, 1002, "protocol error");
    } else if (plen > c->max_msg - c->rx_len) {
        return raw_close_now(c, 1009, "message too big");
    }
    c->pp->raw_op = op;
    c->pp->raw_fin = fin;
    if (op < 0x8)
        c->rx_in_msg = !fin || c->rx_in_msg;
    c->pp->f_left = plen;
    c->pp->raw_hdr = true;
    if (plen)
        return 0;
    c->pp->raw_hdr = false;
    return raw_frame_end(c);
}

/* Frames from the platform: headers byte by byte (at most 14), payloads in
 * bulk; a message that is one frame inside this read is passed without a copy. */
static int raw_rx(struct emx_conn *c, uint8_t *in, size_t len)
{
    int rc;

    while (len && c->state == CONN_OPEN) {
        size_t take;

        if (!c->pp->raw_hdr) {
            c->pp->fh[c->pp->fh_len++] = *in++;
            len--;
            if (c->pp->fh_len < 2 || c->pp->fh_len < raw_hdr_need(c->pp->fh))
                continue;
            rc = raw_header(c);
            if (rc)
                return rc;
            continue;
        }
        take = c->pp->f_left < len ? (size_t)c->pp->f_left : len;
        if (c->pp->raw_op >= 0x8) {
            memcpy(c->pp->ctl + c->pp->ctl_len, in, take);
            c->pp->ctl_len = (uint8_t)(c->pp->ctl_len + take);
        } else if (!c->rx_len && c->pp->raw_fin && c->pp->raw_op == 0x2 && take == c->pp->f_left) {
            c->pp->f_left = 0;
            c->pp->raw_hdr = false;
            c->rx_in_msg = false;
            c->cb->on_message(c->user, in, take);
            in += take;
            len -= take;
            continue;
        } else if ((rc = rx_append(c, in, take)) != 0) {
            return raw_close_now(c, rc == -EMSGSIZE ? 1009 : 1011,
                                 rc == -EMSGSIZE ? "message too big" : "out of memory");
        }
        in += take;
        len -= take;
        c->pp->f_left -= take;
        if (!c->pp->f_left) {
            c->pp->raw_hdr = false;
            rc = raw_frame_end(c);
            if (rc)
                return rc;
        }
    }
    return 0;
}

static void on_client_established(struct ws_instance *inst, struct emx_conn *c, struct lws *wsi);

/* The upgrade answer: gathered in c->rx up to the blank line, checked, then
 * the bytes after it are frames. */
static int raw_upgrade_rx(struct ws_instance *inst, struct emx_conn *c, struct lws *wsi,
                          uint8_t *in, size_t len)
{
    size_t start = c->rx_len > 3 ? c->rx_len - 3 : 0, i, hl = 0, rest;
    const char *line;
    bool ok = false;

    if (c->rx_len + len + 1 > 16384)
        return raw_close_now(c, 1006, "upgrade answer too long");
    if (rx_append(c, in, len) || rx_append(c, (const uint8_t *)"", 1))
        return raw_close_now(c, 1006, "out of memory");
    c->rx_len--; /* the NUL stays after the data */
    for (i = start; i + 4 <= c->rx_len; i++)
        if (!memcmp(c->rx + i, "\r\n\r\n", 4)) {
            hl = i + 4;
            break;
        }
    if (!hl)
        return 0;
    if (strncmp((char *)c->rx, "HTTP/1.1 101", 12) != 0) {
        char why[64];

        snprintf(why, sizeof(why), "upgrade refused: %.*s", (int)strcspn((char *)c->rx, "\r\n"),
                 (char *)c->rx);
        return raw_close_now(c, 1006, why);
    }
    for (line = (char *)c->rx; line && line < (char *)c->rx + hl;) {
        if (!strncasecmp(line, "sec-websocket-accept:", 21)) {
            const char *v = line + 21;
            size_t vl;

            v += strspn(v, " \t");
            vl = strcspn(v, " \t\r\n");
            ok = vl == strlen(c->pp->accept) && !memcmp(v, c->pp->accept, vl);
        }
        line = strstr(line, "\r\n");
        if (line)
            line += 2;
    }
    if (!ok)
        return raw_close_now(c, 1006, "bad Sec-WebSocket-Accept");
    rest = c->rx_len - hl;
    c->rx_len = 0;
    free(c->pp->req);
    c->pp->req = NULL;
    lws_set_timeout(wsi, NO_PENDING_TIMEOUT, 0);
    c->pp->last_rx = c->pp->last_ping = c->pp->tx_ok = uv_now(inst->loop);
    c->pp->pnext = inst->pipes;
    if (inst->pipes)
        inst->pipes->pp->pprev = c;
    inst->pipes = c;
    on_client_established(inst, c, wsi);
    /* frames that came with the answer (input after it is at the end of `in`) */
    free(c->rx);
    c->rx = NULL;
    c->rx_cap = 0;
    return rest ? raw_rx(c, in + len - rest, rest) : 0;
}

static int raw_on_rx(struct ws_instance *inst, struct emx_conn *c, struct lws *wsi, uint8_t *in,
                     size_t len)
{
    if (c->state == CONN_GONE)
        return 0;
    if (c->state == CONN_CONNECTING) {
        if (c->closing)
            return -1;
        return raw_upgrade_rx(inst, c, wsi, in, len);
    }
    c->pp->last_rx = uv_now(inst->loop);
    return raw_rx(c, in, len);
}

/* ---- writeable ------------------------------------------------------------ */

/* Returning -1 from a writeable callback after lws_close_reason() does not
 * send the close frame with Debian's lws 4.1.6 on libuv (its debug build
 * closes the wsi a second time at once), so write the frame ourselves. */
static int send_close_frame(struct emx_conn *c)
{
    uint8_t buf[LWS_PRE + 6 + 2 + WS_REASON_MAX];
    uint8_t *p = buf + LWS_PRE;
    size_t rl = strlen(c->close_reason), h = 0;

    if (rl > WS_REASON_MAX)
        rl = WS_REASON_MAX;
    p[h++] = 0x88; /* FIN + close */
    p[h++] = (uint8_t)(0x80 | (2 + rl));
    { /* a client masks; a zero key leaves the payload as is */
        memset(p + h, 0, 4);
        h += 4;
    }
    p[h++] = (uint8_t)(c->close_code >> 8);
    p[h++] = (uint8_t)c->close_code;
    memcpy(p + h, c->close_reason, rl);
    (void)lws_write(c->wsi, p, h + rl, LWS_WRITE_RAW);
    return -1;
}

static int handle_writeable(struct emx_conn *c)
{
    if (c->state != CONN_OPEN)
        return 0;
    if (queue_drain(c))
        return conn_close_now(c, 1006, "write failed");
    if (c->pp) {
        /* the socket took data: the peer reads */
        c->pp->tx_ok = uv_now(c->inst->loop);
        if (c->raw && raw_pong(c))
            return conn_close_now(c, 1006, "write failed");
        pipe_rx_update(c);
    }
    if (c->qh) {
        lws_callback_on_writable(c->wsi);
        return 0;
    }
    if (c->closing) {
        if (lws_partial_buffered(c->wsi)) {
            lws_callback_on_writable(c->wsi);
            return 0;
        }
        return send_close_frame(c);
    }
    if (c->was_queued) {
        c->was_queued = false;
        if (c->cb->on_writable)
            c->cb->on_writable(c->user);
    }
    return 0;
}

/* ---- permessage-deflate with bounded memory ------------------------------ */

static void pmd_set(struct lws_context *ctx, const struct lws_extension *ext, struct lws *wsi,
                    void *priv, const char *name, const char *value)
{
    struct lws_ext_option_arg oa = {.option_name = name, .start = value, .len = (int)strlen(value)};

    lws_extension_callback_pm_deflate(ctx, ext, wsi, LWS_EXT_CB_NAMED_OPTION_SET, priv, &oa, 0);
}

/* lws inflates with server_max_window_bits too, so shrinking it for memory
 * breaks clients that compress with a 15-bit window. Keep it at 15 for
 * inflate and lower it only around deflate calls (the deflate stream is
 * created on the first TX call and keeps its window). */
static int pmd_wrapper(struct lws_context *ctx, const struct lws_extension *ext, struct lws *wsi,
                       enum lws_extension_callback_reasons reason, void *user, void *in, size_t len)
{
    struct ws_instance *inst = lws_context_user(ctx);
    char bits[8];
    int rc;

    if (reason == LWS_EXT_CB_PAYLOAD_TX) {
        snprintf(bits, sizeof(bits), "%d", (int)inst->cfg.deflate_window_bits);
        pmd_set(ctx, ext, wsi, user, "server_max_window_bits", bits);
        pmd_set(ctx, ext, wsi, user, "client_max_window_bits", bits);
        rc = lws_extension_callback_pm_deflate(ctx, ext, wsi, reason, user, in, len);
        pmd_set(ctx, ext, wsi, user, "server_max_window_bits", "15");
        return rc;
    }
    rc = lws_extension_callback_pm_deflate(ctx, ext, wsi, reason, user, in, len);
    if (rc)
        return rc;
    switch (reason) {
    case LWS_EXT_CB_CONSTRUCT:
    case LWS_EXT_CB_CLIENT_CONSTRUCT: {
        void *priv = *(void **)user;

        snprintf(bits, sizeof(bits), "%d", (int)inst->cfg.deflate_mem_level);
        pmd_set(ctx, ext, wsi, priv, "mem_level", bits);
        inst->pmd_wsi = wsi;
        break;
    }
    case LWS_EXT_CB_OPTION_CONFIRM:
        pmd_set(ctx, ext, wsi, user, "server_max_window_bits", "15");
        break;
    default:
        break;
    }
    return 0;
}

/* Compressed frames are at most 1 << tx_buf_size: pick the largest power of
 * two that fits the peer's limit. Called before the first send. */
static void pmd_fit_frames(struct emx_conn *c)
{
    char v[8];
    int p = 6;

    while (p < 15 && (1u << (p + 1)) <= c->max_frame)
        p++;
    snprintf(v, sizeof(v), "%d", p);
    lws_set_extension_option(c->wsi, "permessage-deflate", "tx_buf_size", v);
}

/* ---- lws protocol callback ------------------------------------------------ */

static struct emx_conn *conn_new(struct ws_instance *inst)
{
    struct emx_conn *c = ws_zalloc(sizeof(*c));

    if (c)
        c->inst = inst;
    return c;
}

static void on_client_established(struct ws_instance *inst, struct emx_conn *c, struct lws *wsi)
{
    struct emx_conn_info info = {0};
    char peer[64];
    int fd = (int)lws_get_socket_fd(wsi);

    c->deflate = inst->pmd_wsi == wsi;
    inst->pmd_wsi = NULL;
    c->state = CONN_OPEN;
    c->max_frame = WS_MAX_FRAME; /* platforms take any frame; stay under 64-bit lengths */
    if (c->pp->sndbuf && fd >= 0)
        set_int_opt(fd, SOL_SOCKET, SO_SNDBUF, (int)c->pp->sndbuf);
    peer_string(fd, peer, sizeof(peer));
    info.peer = peer;
    info.deflate = c->deflate;
    info.tls = lws_is_ssl(wsi) != 0;
    if (c->deflate) {
        inst->pmd_conns++;
        pmd_fit_frames(c);
    }
    if (c->cb->on_open)
        c->cb->on_open(c->user, c, &info);
}

static int ws_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in,
                       size_t len)
{
    struct lws_context *ctx = wsi ? lws_get_context(wsi) : NULL;
    struct ws_instance *inst = ctx ? lws_context_user(ctx) : NULL;
    struct emx_conn *c;

    (void)user;
    if (!inst)
        return 0;
    switch (reason) {
    case LWS_CALLBACK_CLIENT_ESTABLISHED:
        c = lws_wsi_user(wsi);
        if (!c)
            return -1;
        c->wsi = wsi;
        if (c->closing)
            return conn_close_now(c, c->close_code, c->close_reason);
        on_client_established(inst, c, wsi);
        return 0;
    case LWS_CALLBACK_CLIENT_APPEND_HANDSHAKE_HEADER: {
        char **p = in;

        c = lws_wsi_user(wsi);
        if (!c || !c->pp || !p)
            return 0;
        c->wsi = wsi;
        if (c->pp->hdrs_len + 1 > len)
            return -1;
        memcpy(*p, c->pp->hdrs, c->pp->hdrs_len);
        *p += c->pp->hdrs_len;
        return 0;
    }
    case LWS_CALLBACK_RAW_ADOPT:
    case LWS_CALLBACK_RAW_CONNECTED:
        c = lws_wsi_user(wsi);
        if (!c || !c->raw || c->pp->raw_req_sent)
            return 0;
        c->wsi = wsi;
        if (c->closing)
            return -1;
        /* one timeout for the whole upgrade, cleared when it is answered */
        lws_set_timeout(wsi, PENDING_TIMEOUT_AWAITING_SERVER_RESPONSE,
                        (int)secs_of(inst->cfg.handshake_timeout));
        lws_callback_on_writable(wsi);
        return 0;
    case LWS_CALLBACK_RAW_RX:
        c = lws_wsi_user(wsi);
        if (!c || !c->raw)
            return 0;
        return raw_on_rx(inst, c, wsi, in, len);
    case LWS_CALLBACK_RAW_WRITEABLE:
        c = lws_wsi_user(wsi);
        if (!c || !c->raw)
            return 0;
        if (!c->pp->raw_req_sent && c->pp->req) {
            c->pp->raw_req_sent = true;
            memcpy(inst->scratch + LWS_PRE, c->pp->req, c->pp->req_len);
            return lws_write(wsi, inst->scratch + LWS_PRE, c->pp->req_len, LWS_WRITE_RAW) < 0 ? -1
                                                                                              : 0;
        }
        return handle_writeable(c);
    case LWS_CALLBACK_RECEIVE:
    case LWS_CALLBACK_CLIENT_RECEIVE:
        c = lws_wsi_user(wsi);
        if (!c)
            return 0;
        return handle_rx(c, wsi, in, len);
    case LWS_CALLBACK_SERVER_WRITEABLE:
    case LWS_CALLBACK_CLIENT_WRITEABLE:
        c = lws_wsi_user(wsi);
        if (!c)
            return 0;
        return handle_writeable(c);
    case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
        c = lws_wsi_user(wsi);
        if (c && !c->close_code) {
            const uint8_t *b = in;

            c->close_code = (b && len >= 2) ? (uint16_t)((b[0] << 8) | b[1]) : 1005;
            if (b && len > 2)
                snprintf(c->close_reason, sizeof(c->close_reason), "%.*s", (int)(len - 2),
                         (const char *)b + 2);
        }
        return 0;
    case LWS_CALLBACK_CLIENT_CONNECTION_ERROR:
        c = lws_wsi_user(wsi);
        if (c) {
            c->wsi = c->wsi ? c->wsi : wsi;
            conn_gone(c, 1006, in ? (const char *)in : "connect failed");
        }
        return 0;
    case LWS_CALLBACK_CLOSED:
    case LWS_CALLBACK_CLIENT_CLOSED:
    case LWS_CALLBACK_RAW_CLOSE:
    case LWS_CALLBACK_WSI_DESTROY:
        c = lws_wsi_user(wsi);
        if (c) {
            c->wsi = c->wsi ? c->wsi : wsi;
            conn_gone(c, inst->state >= INST_STOPPING ? 1001 : 1006,
                      inst->state >= INST_STOPPING ? "shutdown" : "connection lost");
        }
        return 0;
    default:
        return 0;
    }
}

/* ---- idle sweep ----------------------------------------------------------- */

/* ---- after each loop iteration: pipe writes, pmd stall fix ---------------- */

static void check_cb(uv_check_t *h)
{
    struct ws_instance *inst = h->data;

    /* what this iteration's callbacks sent to pipes, in one write each */
    flush_pipes(inst);

    /* A compressed message that inflates past the pmd rx buffer waits for
     * the next network event unless lws is woken while it has work left. */
    if (inst->pmd_conns && inst->ctx && inst->state == INST_RUNNING &&
        !lws_service_adjust_timeout(inst->ctx, 1, 0))
        lws_cancel_service(inst->ctx);
}

/* ---- raw pipes: pings and silence ----------------------------------------- */

static void resolve_expire(struct ws_instance *inst, uint64_t now);

static void pipe_timer_cb(uv_timer_t *t)
{
    struct ws_instance *inst = t->data;
    uint64_t now = uv_now(inst->loop);
    uint64_t ping = inst->cfg.ping_interval, hangup = inst->cfg.idle_read_timeout;
    struct emx_conn *c, *n;

    resolve_expire(inst, now);
    for (c = inst->pipes; c; c = n) {
        n = c->pp->pnext;
        if (c->state != CONN_OPEN || c->closing || !c->wsi)
            continue;
        c->pp->ctl_count = 0;
        c->pp->ctl_paused = false;
        pipe_rx_update(c);
        if (!c->qh && !lws_partial_buffered(c->wsi))
            c->pp->tx_ok = now;
        if (c->pp->rx_paused)
            c->pp->last_rx = now; /* silence while we do not read is ours */
        if (hangup && now - c->pp->tx_ok >= hangup) {
            conn_kill(c, 1006, "stalled: the platform stopped reading");
        } else if (hangup && now - c->pp->last_rx >= hangup) {
            conn_kill(c, 1006, "no data or pong from the peer");
        } else if (ping && now - c->pp->last_rx >= ping && now - c->pp->last_ping >= ping) {
            c->pp->last_ping = now;
            if (raw_send(c, 0x9, NULL, 0))
                conn_kill(c, 1006, "write failed");
        }
    }
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
        cfg->handshake_evict > cfg->handshake_timeout || cfg->max_queued_control < 256) {
        host->log(host, EMX_LOG_ERROR,
                  "ws: invalid option (deflate_window_bits 9..15, deflate_mem_level 1..9, "
                  "rx_buffer_size 128..1MiB, default_max_frame_size 64..65535, "
                  "max_http_header_pool 1..65535, listen_backlog 1..65535, "
                  "fd_reserve 16..1000000, inflate_window_bits 9..15, handshake_evict <= "
                  "handshake_timeout, max_queued_control >= 256)");
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
        };

        inst->edges = edge_hub_new(host->loop, host, &es);
        if (!inst->edges) {
            free(inst->scratch);
            free(inst);
            return -ENOMEM;
        }
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

static int ws_reload_tls(struct emx_listener *listener, const char *cert, const char *key)
{
    return edge_reload_tls(listener, cert, key);
}

static int ws_set_message_limit(struct emx_conn *c, size_t limit)
{
    return ws_is_edge(c) ? edge_set_message_limit(c, limit) : 0;
}

/* ---- connect -------------------------------------------------------------- */

static bool str_eq(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static struct lws_vhost *client_vhost(struct ws_instance *inst, const struct emx_connect_spec *s)
{
    struct lws_context_creation_info info;
    struct ws_client_vhost *v;
    const char *ca = s->tls ? s->tls_ca : NULL;
    const char *cert = s->tls ? s->tls_cert : NULL;
    const char *key = s->tls ? s->tls_key : NULL;
    char name[32];

    for (v = inst->cvhosts; v; v = v->next)
        if (str_eq(v->ca, ca) && str_eq(v->cert, cert) && str_eq(v->key, key))
            return v->vh;
    v = ws_zalloc(sizeof(*v));
    if (!v)
        return NULL;
    v->ca = ws_strdup(ca);
    v->cert = ws_strdup(cert);
    v->key = ws_strdup(key);
    if ((ca && !v->ca) || (cert && !v->cert) || (key && !v->key))
        goto fail;
    snprintf(name, sizeof(name), "pipe-%u", ++inst->vhost_seq);
    memset(&info, 0, sizeof(info));
    info.vhost_name = name;
    info.port = CONTEXT_PORT_NO_LISTEN;
    info.protocols = inst->pipe_protocols;
    info.extensions = inst->cfg.pipe_deflate ? inst->pipe_exts : NULL;
    info.retry_and_idle_policy = &inst->pipe_retry;
    info.timeout_secs = secs_of(inst->cfg.handshake_timeout);
    info.connect_timeout_secs = secs_of(inst->cfg.handshake_timeout);
    info.options = LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
    info.client_ssl_ca_filepath = v->ca;
    info.client_ssl_cert_filepath = v->cert;
    info.client_ssl_private_key_filepath = v->key;
    v->vh = lws_create_vhost(inst->ctx, &info);
    if (!v->vh)
        goto fail;
    v->next = inst->cvhosts;
    inst->cvhosts = v;
    return v->vh;
fail:
    free(v->ca);
    free(v->cert);
    free(v->key);
    free(v);
    return NULL;
}

static int build_headers(struct emx_conn *c, const struct emx_connect_spec *s)
{
    size_t total = 0, i;
    char *p;

    for (i = 0; i < s->header_count; i++) {
        const char *h = s->headers[i];

        if (!h || strpbrk(h, "\r\n") || !strchr(h, ':'))
            return -EINVAL;
        total += strlen(h) + 2;
    }
    if (!total)
        return 0;
    c->pp->hdrs = malloc(total + 1);
    if (!c->pp->hdrs)
        return -ENOMEM;
    p = c->pp->hdrs;
    for (i = 0; i < s->header_count; i++) {
        size_t n = strlen(s->headers[i]);

        memcpy(p, s->headers[i], n);
        p[n] = '\r';
        p[n + 1] = '\n';
        p += n + 2;
    }
    *p = '\0';
    c->pp->hdrs_len = total;
    return 0;
}

/* ABI 1.1: platform.ping_interval, idle_read_timeout and connect_timeout
 * from the core, for options left at their defaults. The pipe timer ticks
 * at least as often as the shortest of them. */
static void pipe_settings_from_core(struct ws_instance *inst, const struct emx_connect_spec *spec)
{
    if (inst->core_ping && spec->ping_interval_ms)
        inst->cfg.ping_interval = spec->ping_interval_ms;
    if (inst->core_idle_read && spec->idle_read_timeout_ms)
        inst->cfg.idle_read_timeout = spec->idle_read_timeout_ms;
    if (inst->core_handshake && spec->connect_timeout_ms)
        inst->cfg.handshake_timeout = spec->connect_timeout_ms;
    inst->pipe_retry.secs_since_valid_ping = (uint16_t)secs_of(inst->cfg.ping_interval);
    inst->pipe_retry.secs_since_valid_hangup = (uint16_t)secs_of(inst->cfg.idle_read_timeout);
    uint64_t tick = 1000;
    if (inst->cfg.ping_interval && inst->cfg.ping_interval < tick)
        tick = inst->cfg.ping_interval;
    if (inst->cfg.idle_read_timeout && inst->cfg.idle_read_timeout < tick)
        tick = inst->cfg.idle_read_timeout;
    if (inst->pipe_tick && tick < inst->pipe_tick &&
        uv_timer_start(&inst->pipe_timer, pipe_timer_cb, tick, tick) == 0)
        inst->pipe_tick = tick;
}

/* Hand a connect to lws by numeric address. The host name stays in ci.host:
 * lws 4.1 sends it as Host and takes SNI and the certificate's name check
 * from it (port cut off), never from ci.address. */
static struct lws *pipe_dial(struct emx_conn *c, const char *addr)
{
    struct ws_instance *inst = c->inst;
    struct lws_client_connect_info ci;

    memset(&ci, 0, sizeof(ci));
    ci.context = inst->ctx;
    ci.vhost = c->pp->vh;
    ci.address = addr;
    ci.port = c->pp->port;
    ci.path = c->pp->path;
    ci.host = c->pp->hosthdr;
    ci.origin = c->pp->hosthdr;
    ci.userdata = c;
    ci.local_protocol_name = "emx-pipe";
    ci.retry_and_idle_policy = &inst->pipe_retry;
    if (c->raw) {
        ci.method = "RAW";
        ci.retry_and_idle_policy = &inst->raw_retry;
    }
    ci.ssl_connection = c->pp->ssl_flags;
    return lws_client_connect_via_info(&ci);
}

static void resolve_detach(struct emx_conn *c)
{
    struct ws_resolve *r = c->pp->res;
    struct emx_conn **w;

    for (w = &r->waiters; *w; w = &(*w)->pp->rnext)
        if (*w == c) {
            *w = c->pp->rnext;
            break;
        }
    c->pp->res = NULL;
    c->pp->rnext = NULL;
}

/* First IPv4 address, else first IPv6 one, as a numeric string. */
static bool resolve_pick(const struct addrinfo *ai, char *out, size_t outlen)
{
    for (int fam = 0; fam < 2; fam++)
        for (const struct addrinfo *a = ai; a; a = a->ai_next) {
            const void *src;

            if (fam == 0 && a->ai_family == AF_INET)
                src = &((const struct sockaddr_in *)(const void *)a->ai_addr)->sin_addr;
            else if (fam == 1 && a->ai_family == AF_INET6)
                src = &((const struct sockaddr_in6 *)(const void *)a->ai_addr)->sin6_addr;
            else
                continue;
            if (inet_ntop(a->ai_family, src, out, (socklen_t)outlen))
                return true;
        }
    return false;
}

/* A failed lookup is logged once a minute per name, not on every retry. */
static void resolve_log(struct ws_instance *inst, const char *host, const char *err)
{
    uint64_t now = uv_now(inst->loop);

    if (!strncmp(inst->res_failed, host, sizeof(inst->res_failed) - 1) &&
        now - inst->res_failed_logged < 60000)
        return;
    snprintf(inst->res_failed, sizeof(inst->res_failed), "%s", host);
    inst->res_failed_logged = now;
    LOG(inst, EMX_LOG_WARN, "ws: cannot resolve %s: %s", host, err);
}

static void resolve_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *ai)
{
    struct ws_resolve *r = req->data;
    struct ws_instance *inst = r->inst;
    char addr[INET6_ADDRSTRLEN], why[WS_REASON_MAX + 1];
    struct ws_resolve **p;

    for (p = &inst->resolves; *p; p = &(*p)->next)
        if (*p == r) {
            *p = r->next;
            break;
        }
    addr[0] = '\0';
    if (status == 0 && !resolve_pick(ai, addr, sizeof(addr)))
        status = UV_EAI_NODATA;
    if (status && status != UV_ECANCELED) {
        resolve_log(inst, r->host, uv_strerror(status));
        snprintf(why, sizeof(why), "cannot resolve %s: %s", r->host, uv_strerror(status));
    }
    while (r->waiters) {
        struct emx_conn *c = r->waiters;
        struct lws *wsi;

        resolve_detach(c);
        if (inst->state != INST_RUNNING) {
            conn_gone(c, 1001, "shutdown");
            continue;
        }
        if (status) {
            conn_gone(c, 1006, why);
            continue;
        }
        wsi = pipe_dial(c, addr);
        if (c->state == CONN_GONE)
            continue; /* failed inside the call; on_close is on its way */
        if (!wsi)
            conn_gone(c, 1006, "connect failed");
        else
            c->wsi = wsi;
    }
    if (ai)
        uv_freeaddrinfo(ai);
    free(r);
}

/* Look the host up in libuv's thread pool; one lookup per name at a time,
 * so a resolver that does not answer holds at most one pool thread per
 * name. The connect gives up after handshake_timeout (pipe_timer_cb). */
static int resolve_start(struct emx_conn *c, const char *host)
{
    struct ws_instance *inst = c->inst;
    struct ws_resolve *r;
    uint64_t limit = inst->cfg.handshake_timeout ? inst->cfg.handshake_timeout : DEF_HANDSHAKE_MS;

    for (r = inst->resolves; r; r = r->next)
        if (!strcmp(r->host, host))
            break;
    if (!r) {
        struct addrinfo hints;
        size_t n = strlen(host) + 1;
        int rc;

        r = calloc(1, sizeof(*r) + n);
        if (!r)
            return -ENOMEM;
        memcpy(r->host, host, n);
        r->inst = inst;
        r->req.data = r;
        memset(&hints, 0, sizeof(hints));
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        rc = uv_getaddrinfo(inst->loop, &r->req, resolve_cb, host, NULL, &hints);
        if (rc) {
            free(r);
            return rc;
        }
        r->next = inst->resolves;
        inst->resolves = r;
    }
    c->pp->res = r;
    c->pp->rnext = r->waiters;
    r->waiters = c;
    c->pp->res_deadline = uv_now(inst->loop) + limit;
    return 0;
}

/* Connects still waiting for their lookup past their deadline. */
static void resolve_expire(struct ws_instance *inst, uint64_t now)
{
    for (struct ws_resolve *r = inst->resolves; r; r = r->next) {
        struct emx_conn *c = r->waiters, *n;

        for (; c; c = n) {
            n = c->pp->rnext;
            if (now >= c->pp->res_deadline) {
                char why[WS_REASON_MAX + 1];

                snprintf(why, sizeof(why), "cannot resolve %s: no answer within %us", r->host,
                         secs_of(inst->cfg.handshake_timeout));
                conn_gone(c, 1006, why);
            }
        }
    }
}

static bool is_numeric_host(const char *host)
{
    struct in6_addr a6;
    struct in_addr a4;

    return inet_pton(AF_INET, host, &a4) == 1 || inet_pton(AF_INET6, host, &a6) == 1;
}

static int ws_connect(void *instance, const struct emx_connect_spec *spec,
                      const struct emx_conn_callbacks *cb, void *user, struct emx_conn **out)
{
    struct ws_instance *inst = instance;
    struct lws_vhost *vh;
    struct emx_conn *c;
    struct lws *wsi;
    char hosthdr[300];
    int rc;

    if (!inst || !spec || !cb || !out || !spec->host || !spec->port || !cb->on_message ||
        !cb->on_close || (spec->header_count && !spec->headers))
        return -EINVAL;
    if (inst->state != INST_RUNNING)
        return -ESHUTDOWN;
    pipe_settings_from_core(inst, spec);
    vh = client_vhost(inst, spec);
    if (!vh) {
        LOG(inst, EMX_LOG_ERROR, "ws: cannot set up a client context (TLS files?) for %s:%u",
            spec->host, (unsigned)spec->port);
        return -EINVAL;
    }
    c = conn_new(inst);
    if (c)
        c->pp = ws_zalloc(sizeof(*c->pp));
    if (!c || !c->pp) {
        if (c)
            conn_free(c);
        return -ENOMEM;
    }
    rc = build_headers(c, spec);
    if (rc) {
        conn_free(c);
        return rc;
    }
    c->cb = cb;
    c->user = user;
    c->max_msg = spec->max_message_size ? spec->max_message_size : SIZE_MAX;
    c->pp->sndbuf = spec->sndbuf;
    c->state = CONN_CONNECTING;
    snprintf(hosthdr, sizeof(hosthdr), "%s:%u", spec->host, (unsigned)spec->port);
    /* Without deflate a plain pipe speaks WebSocket itself over a raw
     * socket. lws 4.1.6 drops a raw client with TLS without a callback, so
     * wss pipes stay on lws's WebSocket client. */
    c->raw = !inst->cfg.pipe_deflate && !spec->tls;
    if (c->raw) {
        rc = raw_build_request(c, spec->path ? spec->path : "/", hosthdr);
        if (rc) {
            conn_free(c);
            return rc;
        }
    }

    c->pp->vh = vh;
    c->pp->port = spec->port;
    c->pp->path = ws_strdup(spec->path ? spec->path : "/");
    c->pp->hosthdr = ws_strdup(hosthdr);
    if (!c->pp->path || !c->pp->hosthdr) {
        conn_free(c);
        return -ENOMEM;
    }
    if (spec->tls) {
        c->pp->ssl_flags = LCCSCF_USE_SSL;
        if (!spec->tls_verify)
            c->pp->ssl_flags |= LCCSCF_ALLOW_SELFSIGNED | LCCSCF_SKIP_SERVER_CERT_HOSTNAME_CHECK |
                                LCCSCF_ALLOW_EXPIRED | LCCSCF_ALLOW_INSECURE;
    }
    if (!is_numeric_host(spec->host)) {
        /* lws 4.1.6 (no LWS_WITH_SYS_ASYNC_DNS) would block the loop on the
         * resolver: look the name up first, dial the address after */
        rc = resolve_start(c, spec->host);
        if (rc) {
            conn_free(c);
            return rc;
        }
        conn_link(inst, c);
        c->reported = true;
        *out = c;
        return 0;
    }
    wsi = pipe_dial(c, spec->host);
    if (c->state == CONN_GONE) {
        /* failed inside the call: report through on_close like any failure */
        c->reported = true;
        c->reap_next = NULL;
        if (inst->reap_tail)
            inst->reap_tail->reap_next = c;
        else
            inst->reap_head = c;
        inst->reap_tail = c;
        reap_arm(inst);
        *out = c;
        return 0;
    }
    if (!wsi) {
        conn_free(c);
        return -ECONNREFUSED;
    }
    c->wsi = wsi;
    conn_link(inst, c);
    c->reported = true;
    *out = c;
    return 0;
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
};
