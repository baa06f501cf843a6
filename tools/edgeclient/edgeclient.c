/* libedgeclient (edgeclient.h). */
#include "edgeclient.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "ao.h"
#include "b64.h"
#include "codec.h"
#include "ws.h"

#define MAX_INBOUND (64u * 1024 * 1024) /* largest reassembled message accepted */

enum timer_mode { T_NONE, T_CONNECT_DELAY, T_OPEN_TIMEOUT, T_PING, T_PONG_WAIT };

struct etunnel;

struct emx_edge_client {
    uv_loop_t *loop;
    uv_timer_t timer; /* the only timer: connect delay, open timeout, ping, pong wait */
    struct ws_conn *conn;
    struct edge_client_config cfg; /* strings below are our copies */
    char *url_host, *url_path, *host_header;
    struct sockaddr_storage dest, source;
    bool has_source;
    uint8_t state, tmode;
    bool stopped, freeing, timer_closed, ledger_closed, awaiting_pong;
    uint32_t next_request_id; /* counts from 1 across connections, like the SDK */
    uint32_t auth_request_id;
    uint32_t session_id;
    uint32_t conn_gen;
    size_t pending;
    char **things;
    size_t nthings, things_cap;
    struct ao_reasm reasm; /* multipart messages from the server */
    struct edge_ledger ledger;
    struct edge_client_stats stats; /* of connections already closed, plus events */
    struct edge_client_stats snap;  /* what _stats() returns */
    struct etunnel *tunnels;        /* live ones and ended ones still closing */
    size_t ntunnels;                /* live ones */
    uint64_t tun_serial;
    struct edge_tunnel_stats tun_done, tun_snap; /* ended tunnels; what _tunnel_stats() returns */
};

static const struct ws_handlers handlers;

const char *emx_edge_outcome_name(enum edge_outcome o)
{
    switch (o) {
    case EDGE_PENDING:
        return "pending";
    case EDGE_ANSWERED:
        return "answered";
    case EDGE_NO_ANSWER:
        return "no_answer";
    case EDGE_CONNECTION_LOST:
        return "connection_lost";
    default:
        return "?";
    }
}

static void set_state(struct emx_edge_client *c, enum edge_state s)
{
    if (c->state == s)
        return;
    c->state = (uint8_t)s;
    if (c->cfg.on_state)
        c->cfg.on_state(c, s, c->cfg.user);
}

static void on_timer(uv_timer_t *t);

static void arm(struct emx_edge_client *c, enum timer_mode m, uint64_t ms)
{
    c->tmode = (uint8_t)m;
    uv_timer_start(&c->timer, on_timer, ms ? ms : 1, 0);
}

/* ---- ledger ---- */

static struct edge_ledger_entry *entry_of(struct emx_edge_client *c, uint32_t rid)
{
    if (rid == 0 || rid > c->ledger.count)
        return NULL;
    return &c->ledger.entries[rid - 1];
}

static void finish(struct emx_edge_client *c, struct edge_ledger_entry *e, enum edge_outcome o,
                   uint8_t code)
{
    c->ledger.by_outcome[EDGE_PENDING]--;
    c->ledger.by_outcome[o]++;
    e->outcome = (uint8_t)o;
    if (o == EDGE_ANSWERED) {
        e->code = code;
        c->ledger.by_code[code]++;
        uint64_t us = (uv_hrtime() - e->sent_ns) / 1000;
        e->latency_us = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
    }
    c->pending--;
    if (e->cb)
        e->cb(c, e, e->arg);
}

static struct edge_ledger_entry *record(struct emx_edge_client *c, uint8_t type)
{
    struct edge_ledger *l = &c->ledger;
    if (l->count == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        struct edge_ledger_entry *e = realloc(l->entries, cap * sizeof(*e));
        if (!e)
            return NULL;
        l->entries = e;
        l->cap = cap;
    }
    struct edge_ledger_entry *e = &l->entries[l->count++];
    memset(e, 0, sizeof(*e));
    e->request_id = c->next_request_id++;
    e->type = type;
    e->outcome = EDGE_PENDING;
    e->sent_ns = uv_hrtime();
    e->conn_gen = c->conn_gen;
    l->by_outcome[EDGE_PENDING]++;
    c->pending++;
    return e;
}

/* Every request still in flight on this connection ends as `o`. */
static void settle_pending(struct emx_edge_client *c, enum edge_outcome o)
{
    if (!c->pending)
        return;
    for (size_t i = c->ledger.count; i-- > 0 && c->pending;) {
        struct edge_ledger_entry *e = &c->ledger.entries[i];
        if (e->outcome == EDGE_PENDING)
            finish(c, e, o, 0);
    }
}

void emx_edge_client_close_ledger(struct emx_edge_client *c)
{
    c->ledger_closed = true;
    settle_pending(c, EDGE_NO_ANSWER);
}

/* ---- sending ---- */

static int send_msg(void *arg, const uint8_t *msg, size_t len)
{
    struct emx_edge_client *c = arg;
    return c->conn ? ws_send(c->conn, WS_OP_BINARY, msg, len) : -1;
}

static void send_auth(struct emx_edge_client *c)
{
    size_t kl = strlen(c->cfg.app_key);
    size_t cap = EMX_AO_HEADER_SIZE + 1 + 7 + emx_ao_str_size(kl);
    uint8_t *buf = malloc(cap);
    struct edge_ledger_entry *e = buf ? record(c, EMX_AO_AUTH) : NULL;
    if (!e) {
        free(buf);
        ws_abort(c->conn, "out of memory", false);
        return;
    }
    c->auth_request_id = e->request_id;
    size_t n = emx_ao_build_auth(buf, cap, e->request_id, 0, c->cfg.app_key, kl);
    set_state(c, EDGE_AUTHING);
    send_msg(c, buf, n);
    free(buf);
}

static int send_bind(struct emx_edge_client *c, uint8_t code, const char *const *names, size_t n)
{
    if (n == 0 || c->state != EDGE_READY)
        return 0;
    if (n > 0xFFFF)
        return -1;
    struct emx_ao_str *v = calloc(n, sizeof(*v));
    size_t cap = EMX_AO_HEADER_SIZE + 3;
    for (size_t i = 0; v && i < n; i++) {
        v[i].ptr = (const uint8_t *)names[i];
        v[i].len = (uint32_t)strlen(names[i]);
        cap += emx_ao_str_size(v[i].len);
    }
    uint8_t *buf = v ? malloc(cap) : NULL;
    struct edge_ledger_entry *e = buf ? record(c, code) : NULL;
    int rc = -1;
    if (e) {
        size_t len = emx_ao_build_bind(buf, cap, code, e->request_id, 0, c->session_id, v, n);
        rc = len ? send_msg(c, buf, len) : -1;
    }
    free(buf);
    free(v);
    return rc;
}

uint32_t emx_edge_client_request(struct emx_edge_client *c, uint8_t type, const char *thing,
                                 uint8_t characteristic, const char *name, const uint8_t *params,
                                 size_t len, edge_request_cb cb, void *arg)
{
    if (c->state != EDGE_READY || !c->conn || emx_ao_is_response(type)) {
        c->stats.refused_offline++;
        return 0;
    }
    size_t tl = strlen(thing), nl = strlen(name);
    size_t blen = 1 + emx_ao_str_size(tl) + 1 + emx_ao_str_size(nl) + 1 + 1 + (params ? len : 0);
    uint8_t *body = malloc(blen);
    if (!body)
        return 0;
    size_t p = 0;
    body[p++] = EDGE_ENTITY_THING;
    p += emx_ao_write_str(body + p, blen - p, thing, tl);
    body[p++] = characteristic;
    p += emx_ao_write_str(body + p, blen - p, name, nl);
    body[p++] = 0; /* no headers */
    if (params) {
        body[p++] = EMX_BT_INFOTABLE;
        memcpy(body + p, params, len);
        p += len;
    } else {
        body[p++] = EMX_BT_NOTHING;
    }
    struct edge_ledger_entry *e = record(c, type);
    if (!e) {
        free(body);
        return 0;
    }
    e->cb = cb;
    e->arg = arg;
    e->multipart = EMX_AO_HEADER_SIZE + p > c->cfg.chunk_size;
    uint32_t rid = e->request_id;
    struct emx_ao_header h = {.version = EMX_AO_VERSION,
                              .code = type,
                              .request_id = rid,
                              .endpoint_id = 0,
                              .session_id = c->session_id};
    ao_emit(&h, EDGE_ENTITY_THING, thing, body, p, c->cfg.chunk_size, send_msg, c);
    free(body);
    return rid;
}

static int add_things(struct emx_edge_client *c, const char *const *names, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        bool dup = false;
        for (size_t j = 0; j < c->nthings && !dup; j++)
            dup = strcmp(c->things[j], names[i]) == 0;
        if (dup)
            continue;
        if (c->nthings == c->things_cap) {
            size_t cap = c->things_cap ? c->things_cap * 2 : 4;
            char **t = realloc(c->things, cap * sizeof(*t));
            if (!t)
                return -1;
            c->things = t;
            c->things_cap = cap;
        }
        if (!(c->things[c->nthings] = strdup(names[i])))
            return -1;
        c->nthings++;
    }
    return 0;
}

int emx_edge_client_bind(struct emx_edge_client *c, const char *const *names, size_t n)
{
    if (add_things(c, names, n) != 0)
        return -1;
    return send_bind(c, EMX_AO_BIND, names, n);
}

int emx_edge_client_unbind(struct emx_edge_client *c, const char *const *names, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < c->nthings; j++) {
            if (strcmp(c->things[j], names[i]) == 0) {
                free(c->things[j]);
                c->things[j] = c->things[--c->nthings];
                break;
            }
        }
    }
    return send_bind(c, EMX_AO_UNBIND, names, n);
}

/* ---- receiving ---- */

/* ---- Remote Access tunnels (TUNNELS.md §2-§6), as the C SDK 2.2.1 ----
 *
 * A tunnel owns a second WebSocket to the AlwaysOn host and port
 * (/Thingworx/WSTunnelServer/<tid>), a TCP connection to its local target
 * and one timer (upgrade timeout, idle timeout, the next "tick"). It lives
 * apart from the AlwaysOn connection: a reconnect leaves it alone; control
 * requests go over whatever AlwaysOn connection is up. */

#define TUN_PREFIX           "/Thingworx/WSTunnelServer/"
#define TUN_UPGRADE_MS       10000
#define TUN_TICK_MS          5   /* the SDK's tunnel worker tick */
#define TUN_REPORT_MS        100 /* DISCONNECT repeats (the SDK: every round trip) */
#define TUN_HIGH_MARK        (256u * 1024)
#define TUN_MAX_MESSAGE      32768 /* MAX_WS_TUNNEL_MESSAGE_SIZE */
#define TUN_MAX_CHUNKSIZE    (1u << 20)
#define TUN_STOPPED_BY_EDGE  "Normal Close Tunnel stopped by edge"

enum tun_timer { TM_NONE, TM_UPGRADE, TM_IDLE, TM_REDIAL, TM_REPEAT_CANCEL, TM_REPEAT_DISC };

struct ttcp {
    uv_tcp_t tcp;
    uv_connect_t req;
    struct etunnel *t; /* NULL once detached */
    uint8_t *buf;
    size_t cap;
    bool connected, reading, eof;
};

struct twrite {
    uv_write_t req;
    struct ttcp *x;
    uint8_t data[];
};

struct etunnel {
    struct etunnel *next;
    struct emx_edge_client *c;
    uint64_t serial;
    char *tid, *thing;
    uint32_t chunksize, idle_ms;
    int32_t connects_left;
    struct sockaddr_storage target;
    struct ws_conn *ws;
    struct ttcp *x;
    uv_timer_t timer;
    uint8_t state, tmode;
    bool ended, timer_closed;
    bool idle_cancelling, report_disconnect;
    uint64_t last_data_ms;
    struct edge_tunnel_stats st;
};

static const struct ws_handlers tun_handlers;
static void tun_end(struct etunnel *t, bool cancel, const char *close_reason);
static void tun_maybe_free(struct etunnel *t);
static void tun_dial(struct etunnel *t);
static void tun_on_timer(uv_timer_t *tm);
static void maybe_free(struct emx_edge_client *c);

void emx_edge_tunnel_stats_add(struct edge_tunnel_stats *sum, const struct edge_tunnel_stats *a)
{
    sum->requests += a->requests;
    sum->refused += a->refused;
    sum->opened += a->opened;
    sum->upgrade_refused += a->upgrade_refused;
    sum->upgrade_failed += a->upgrade_failed;
    sum->closed += a->closed;
    sum->active += a->active;
    sum->cancels_sent += a->cancels_sent;
    sum->disconnects_sent += a->disconnects_sent;
    sum->control_failed += a->control_failed;
    sum->completes += a->completes;
    sum->commands += a->commands;
    sum->bytes_to_platform += a->bytes_to_platform;
    sum->bytes_from_platform += a->bytes_from_platform;
    sum->msgs_to_platform += a->msgs_to_platform;
    sum->msgs_from_platform += a->msgs_from_platform;
    sum->glued_bytes += a->glued_bytes;
    sum->binary_dropped += a->binary_dropped;
    sum->oversize_dropped += a->oversize_dropped;
    sum->bad_base64 += a->bad_base64;
    sum->no_target += a->no_target;
    sum->target_connects += a->target_connects;
    sum->target_failures += a->target_failures;
    sum->target_write_errors += a->target_write_errors;
    sum->server_closes += a->server_closes;
    sum->socket_errors += a->socket_errors;
    sum->idle_timeouts += a->idle_timeouts;
    sum->pings_ignored += a->pings_ignored;
    sum->foreign_stop_reason += a->foreign_stop_reason;
    if (a->last_refused_status)
        sum->last_refused_status = a->last_refused_status;
    if (a->max_frame_in > sum->max_frame_in)
        sum->max_frame_in = a->max_frame_in;
}

/* A tunnel's counters with what its live socket holds. */
static void tun_stats_now(const struct etunnel *t, struct edge_tunnel_stats *out)
{
    *out = t->st;
    if (t->ws) {
        out->glued_bytes += t->ws->glued_bytes;
        if (t->ws->stats.max_frame_in > out->max_frame_in)
            out->max_frame_in = t->ws->stats.max_frame_in;
    }
}

static struct etunnel *tun_by_tid(struct emx_edge_client *c, struct emx_ao_str tid)
{
    for (struct etunnel *t = c->tunnels; t; t = t->next)
        if (!t->ended && emx_ao_str_eq(tid, t->tid))
            return t;
    return NULL;
}

static struct etunnel *tun_by_serial(struct emx_edge_client *c, uint64_t serial)
{
    for (struct etunnel *t = c->tunnels; t; t = t->next)
        if (t->serial == serial && !t->ended)
            return t;
    return NULL;
}

static void tun_arm(struct etunnel *t, enum tun_timer m, uint64_t ms)
{
    if (t->timer_closed || uv_is_closing((uv_handle_t *)&t->timer))
        return;
    t->tmode = (uint8_t)m;
    uv_timer_start(&t->timer, tun_on_timer, ms ? ms : 1, 0);
}

/* The idle timer counts device → platform data only (TUNNELS.md §4). */
static void tun_arm_idle(struct etunnel *t)
{
    if (t->idle_ms == 0 || t->state != EDGE_TUN_OPEN || t->idle_cancelling)
        return;
    uint64_t now = uv_now(t->c->loop), due = t->last_data_ms + t->idle_ms;
    tun_arm(t, TM_IDLE, due > now ? due - now : 1);
}

/* ---- control requests on the AlwaysOn connection ---- */

static void tun_control_done(struct emx_edge_client *c, const struct edge_ledger_entry *e,
                             void *arg);

/* TunnelCommandFromEdge(tid, command): blocking in the SDK; here the answer
 * calls tun_control_done. Returns false when it could not be sent. */
static bool tun_send_command(struct etunnel *t, const char *command)
{
    const struct ao_field f[] = {{"tid", EMX_BT_STRING, t->tid, 0},
                                 {"command", EMX_BT_STRING, command, 0}};
    size_t cap = ao_infotable_row_size(f, 2);
    uint8_t *it = malloc(cap);
    size_t len = it ? ao_infotable_row(it, cap, f, 2) : 0;
    uint32_t rid = 0;
    if (len && !t->c->ledger_closed && !t->c->stopped)
        rid = emx_edge_client_request(t->c, EMX_AO_POST, t->thing, EDGE_CHAR_SERVICES,
                                      "TunnelCommandFromEdge", it, len, tun_control_done,
                                      (void *)(uintptr_t)(t->serial << 1 | (command[0] == 'C')));
    free(it);
    if (!rid) {
        t->st.control_failed++;
        return false;
    }
    if (command[0] == 'C')
        t->st.cancels_sent++;
    else
        t->st.disconnects_sent++;
    return true;
}

static void tun_control_done(struct emx_edge_client *c, const struct edge_ledger_entry *e,
                             void *arg)
{
    (void)e;
    uintptr_t v = (uintptr_t)arg;
    struct etunnel *t = tun_by_serial(c, (uint64_t)(v >> 1));
    if (!t)
        return;
    bool cancel = v & 1;
    if (cancel && t->state == EDGE_TUN_ENDING) {
        /* CompleteTunnel: the CANCEL is answered, now the close frame. */
        tun_end(t, false, TUN_STOPPED_BY_EDGE);
    } else if (cancel && t->idle_cancelling) {
        tun_arm(t, TM_REPEAT_CANCEL, TUN_TICK_MS); /* until the platform completes it */
    } else if (!cancel && t->report_disconnect) {
        tun_arm(t, TM_REPEAT_DISC, TUN_REPORT_MS);
    }
}

/* ---- the local target ---- */

static void ttcp_closed(uv_handle_t *h)
{
    struct ttcp *x = h->data;
    free(x->buf);
    free(x);
}

/* Detach the target connection and close it; its callbacks still to come
 * find no tunnel. */
static void tun_target_close(struct etunnel *t)
{
    struct ttcp *x = t->x;
    if (!x)
        return;
    t->x = NULL;
    x->t = NULL;
    x->connected = false;
    if (!uv_is_closing((uv_handle_t *)&x->tcp))
        uv_close((uv_handle_t *)&x->tcp, ttcp_closed);
}

static void ttcp_alloc(uv_handle_t *h, size_t sz, uv_buf_t *buf)
{
    (void)sz;
    struct ttcp *x = h->data;
    *buf = uv_buf_init((char *)x->buf, (unsigned)x->cap);
}

static void tun_flow(struct etunnel *t);

/* One base64 text message per read of at most chunksize - 16 bytes, one
 * final frame, masked with a zero key (TUNNELS.md §4). */
static void ttcp_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    (void)buf;
    struct ttcp *x = s->data;
    struct etunnel *t = x->t;
    if (nread == 0 || !t)
        return;
    if (nread < 0) {
        /* The SDK does not notice its target closing: no data, that is all. */
        x->eof = true;
        x->reading = false;
        uv_read_stop(s);
        return;
    }
    if (!t->ws || t->ws->state != WS_OPEN)
        return;
    size_t el = b64_encoded_len((size_t)nread);
    char *enc = malloc(el);
    if (!enc)
        return;
    b64_encode(x->buf, (size_t)nread, enc);
    t->st.bytes_to_platform += (uint64_t)nread;
    t->st.msgs_to_platform++;
    t->last_data_ms = uv_now(t->c->loop);
    ws_send(t->ws, WS_OP_TEXT, enc, el);
    free(enc);
    if (!t->ended)
        tun_flow(t);
}

static void tun_flow(struct etunnel *t)
{
    bool ws_open = t->ws && t->ws->state == WS_OPEN;
    struct ttcp *x = t->x;
    if (x && x->connected && !uv_is_closing((uv_handle_t *)&x->tcp)) {
        bool want = ws_open && !x->eof && !t->idle_cancelling && t->ws->queued < TUN_HIGH_MARK;
        if (want != x->reading) {
            x->reading = want;
            if (want)
                uv_read_start((uv_stream_t *)&x->tcp, ttcp_alloc, ttcp_read);
            else
                uv_read_stop((uv_stream_t *)&x->tcp);
        }
    }
    if (ws_open) {
        bool full = x && x->connected &&
                    uv_stream_get_write_queue_size((uv_stream_t *)&x->tcp) >= TUN_HIGH_MARK;
        ws_pause_read(t->ws, full);
    }
}

/* The target refused or broke: the SDK reports DISCONNECT until the
 * platform reacts. */
static void tun_report_disconnect(struct etunnel *t)
{
    tun_target_close(t);
    if (t->report_disconnect)
        return;
    t->report_disconnect = true;
    if (!tun_send_command(t, "DISCONNECT"))
        tun_arm(t, TM_REPEAT_DISC, TUN_REPORT_MS);
}

static void ttcp_written(uv_write_t *req, int status)
{
    struct twrite *w = (struct twrite *)req;
    struct ttcp *x = w->x;
    free(w);
    struct etunnel *t = x->t;
    if (!t || t->ended)
        return;
    if (status < 0) {
        t->st.target_write_errors++;
        tun_report_disconnect(t);
        return;
    }
    tun_flow(t);
}

static void ttcp_connected(uv_connect_t *req, int status)
{
    struct ttcp *x = req->data;
    struct etunnel *t = x->t;
    if (!t || status == UV_ECANCELED)
        return;
    if (status < 0) {
        t->st.target_failures++;
        tun_report_disconnect(t);
        return;
    }
    x->connected = true;
    t->st.target_connects++;
    uv_tcp_nodelay(&x->tcp, 1);
    if (t->tmode == TM_NONE)
        tun_arm_idle(t);
    tun_flow(t);
}

/* Dial the local target; uses one of num_connects. */
static void tun_dial(struct etunnel *t)
{
    tun_target_close(t);
    if (t->connects_left > 0)
        t->connects_left--;
    struct ttcp *x = calloc(1, sizeof(*x));
    if (x) {
        x->cap = t->chunksize - 16;
        x->buf = malloc(x->cap);
    }
    if (!x || !x->buf) {
        if (x)
            free(x);
        t->st.target_failures++;
        tun_report_disconnect(t);
        return;
    }
    uv_tcp_init(t->c->loop, &x->tcp);
    x->tcp.data = x;
    x->req.data = x;
    x->t = t;
    t->x = x;
    t->report_disconnect = false;
    if (uv_tcp_connect(&x->req, &x->tcp, (struct sockaddr *)&t->target, ttcp_connected) != 0) {
        t->st.target_failures++;
        tun_report_disconnect(t);
    }
}

/* ---- the tunnel socket ---- */

static void tun_ws_open(struct ws_conn *ws)
{
    struct etunnel *t = ws->user;
    t->st.opened++;
    t->state = EDGE_TUN_OPEN;
    t->last_data_ms = uv_now(t->c->loop);
    tun_arm_idle(t);
    /* The SDK dials its target in the same tick, unasked. */
    if (t->connects_left != 0)
        tun_dial(t);
    else
        tun_report_disconnect(t);
}

static void tun_ws_message(struct ws_conn *ws, int op, const uint8_t *data, size_t len)
{
    struct etunnel *t = ws->user;
    if (op != WS_OP_TEXT) {
        t->st.binary_dropped++; /* no handler for them on tunnel sockets */
        return;
    }
    t->st.msgs_from_platform++;
    if (len > b64_encoded_len(t->chunksize)) {
        t->st.oversize_dropped++; /* "Error decoding data" */
        return;
    }
    uint8_t *out = malloc(b64_decoded_max(len) + 1);
    long n = out ? b64_decode((const char *)data, len, out) : -1;
    if (n < 0) {
        t->st.bad_base64++;
    } else if ((size_t)n > t->chunksize) {
        t->st.oversize_dropped++;
    } else if (!t->x || !t->x->connected) {
        t->st.no_target++;
    } else if (n > 0) {
        struct twrite *w = malloc(sizeof(*w) + (size_t)n);
        if (w) {
            w->x = t->x;
            memcpy(w->data, out, (size_t)n);
            uv_buf_t b = uv_buf_init((char *)w->data, (unsigned)n);
            if (uv_write(&w->req, (uv_stream_t *)&t->x->tcp, &b, 1, ttcp_written) != 0) {
                free(w);
                t->st.target_write_errors++;
                tun_report_disconnect(t);
            } else {
                t->st.bytes_from_platform += (uint64_t)n;
            }
        }
    }
    free(out);
    if (!t->ended)
        tun_flow(t);
}

static void tun_ws_ping(struct ws_conn *ws, const uint8_t *data, size_t len)
{
    (void)data, (void)len;
    struct etunnel *t = ws->user;
    t->st.pings_ignored++; /* read and not answered */
}

static void tun_ws_drain(struct ws_conn *ws)
{
    struct etunnel *t = ws->user;
    if (!t->ended)
        tun_flow(t);
}

static void tun_ws_close(struct ws_conn *ws)
{
    struct etunnel *t = ws->user;
    t->st.glued_bytes += ws->glued_bytes;
    if (ws->stats.max_frame_in > t->st.max_frame_in)
        t->st.max_frame_in = ws->stats.max_frame_in;
    t->ws = NULL;
    if (!t->ended) {
        bool cancel = true;
        if (t->state == EDGE_TUN_UPGRADING) {
            if (ws->http_status) {
                t->st.upgrade_refused++;
                t->st.last_refused_status = ws->http_status;
            } else {
                t->st.upgrade_failed++;
            }
        } else if (ws->close_code) {
            t->st.server_closes++;
            /* The SDK takes such a close for its own and does nothing. */
            if (strstr(ws->close_text, "Tunnel stopped by edge")) {
                t->st.foreign_stop_reason++;
                cancel = false;
            }
        } else {
            t->st.socket_errors++;
        }
        tun_end(t, cancel, NULL);
    }
    tun_maybe_free(t);
}

static const struct ws_handlers tun_handlers = {
    .on_open = tun_ws_open,
    .on_message = tun_ws_message,
    .on_ping = tun_ws_ping,
    .on_close = tun_ws_close,
    .on_drain = tun_ws_drain,
};

/* ---- lifecycle ---- */

static void tun_on_timer(uv_timer_t *tm)
{
    struct etunnel *t = tm->data;
    uint8_t mode = t->tmode;
    t->tmode = TM_NONE;
    if (t->ended)
        return;
    switch (mode) {
    case TM_UPGRADE:
        if (t->ws && t->state == EDGE_TUN_UPGRADING)
            ws_abort(t->ws, "tunnel upgrade timeout", false);
        break;
    case TM_IDLE: {
        uint64_t now = uv_now(t->c->loop);
        if (t->state != EDGE_TUN_OPEN)
            break;
        if (now - t->last_data_ms < t->idle_ms) {
            tun_arm_idle(t);
            break;
        }
        /* Idle: CANCEL, repeated until the platform completes the tunnel. */
        t->st.idle_timeouts++;
        t->idle_cancelling = true;
        tun_flow(t);
        if (!tun_send_command(t, "CANCEL"))
            tun_arm(t, TM_REPEAT_CANCEL, TUN_REPORT_MS);
        break;
    }
    case TM_REPEAT_CANCEL:
        if (t->idle_cancelling && !tun_send_command(t, "CANCEL"))
            tun_arm(t, TM_REPEAT_CANCEL, TUN_REPORT_MS);
        break;
    case TM_REPEAT_DISC:
        if (t->report_disconnect && !tun_send_command(t, "DISCONNECT"))
            tun_arm(t, TM_REPEAT_DISC, TUN_REPORT_MS);
        break;
    case TM_REDIAL:
        /* The tick after a DISCONNECT: re-dial if allowed, else give up. */
        if (t->connects_left != 0)
            tun_dial(t);
        else
            tun_end(t, true, TUN_STOPPED_BY_EDGE);
        break;
    default:
        break;
    }
    /* Whatever ran, the idle clock keeps going. */
    if (!t->ended && t->tmode == TM_NONE)
        tun_arm_idle(t);
}

static void tun_timer_closed(uv_handle_t *h)
{
    struct etunnel *t = h->data;
    t->timer_closed = true;
    tun_maybe_free(t);
}

static void tun_maybe_free(struct etunnel *t)
{
    if (!t->ended || !t->timer_closed || t->ws)
        return;
    struct emx_edge_client *c = t->c;
    for (struct etunnel **pp = &c->tunnels; *pp; pp = &(*pp)->next) {
        if (*pp == t) {
            *pp = t->next;
            break;
        }
    }
    free(t->tid);
    free(t->thing);
    free(t);
    if (c->freeing)
        maybe_free(c);
}

/* End a tunnel: CANCEL first if asked, then the close frame (or drop the
 * socket if it is not open), then the target. */
static void tun_end(struct etunnel *t, bool cancel, const char *close_reason)
{
    if (t->ended)
        return;
    if (cancel)
        tun_send_command(t, "CANCEL");
    t->ended = true;
    t->state = EDGE_TUN_CLOSED;
    t->st.closed++;
    t->st.glued_bytes += t->ws ? t->ws->glued_bytes : 0;
    if (t->ws) {
        /* Counted here; the close callback must not add them again. */
        t->ws->glued_bytes = 0;
        if (close_reason && t->ws->state == WS_OPEN)
            ws_close(t->ws, 1000, close_reason);
        else
            ws_abort(t->ws, "tunnel ended", false);
    }
    tun_target_close(t);
    struct edge_tunnel_stats now;
    tun_stats_now(t, &now);
    /* The client keeps the sum of ended tunnels. */
    emx_edge_tunnel_stats_add(&t->c->tun_done, &now);
    t->c->tun_done.active = 0;
    t->c->ntunnels--;
    uv_timer_stop(&t->timer);
    uv_close((uv_handle_t *)&t->timer, tun_timer_closed);
}

static size_t tunnel_answer(struct emx_edge_client *c, const struct emx_ao_header *h, uint8_t code)
{
    uint8_t b[32];
    size_t n = emx_ao_build_response(b, sizeof(b), code, h->request_id, h->endpoint_id,
                                     h->session_id, NULL);
    if (n)
        send_msg(c, b, n);
    c->stats.platform_answers++;
    return n;
}

/* "num_connects" at the top of the connection JSON; default 1. */
static int32_t json_num_connects(struct emx_ao_str j)
{
    static const char key[] = "\"num_connects\"";
    size_t kl = sizeof(key) - 1;
    for (size_t i = 0; j.len >= kl && i <= j.len - kl; i++) {
        if (memcmp(j.ptr + i, key, kl) != 0)
            continue;
        size_t p = i + kl;
        while (p < j.len && (j.ptr[p] == ' ' || j.ptr[p] == '\t'))
            p++;
        if (p >= j.len || j.ptr[p] != ':')
            return 1;
        p++;
        while (p < j.len && (j.ptr[p] == ' ' || j.ptr[p] == '\t'))
            p++;
        bool neg = p < j.len && j.ptr[p] == '-';
        p += neg;
        int64_t v = 0;
        size_t d = 0;
        while (p < j.len && j.ptr[p] >= '0' && j.ptr[p] <= '9' && d < 10) {
            v = v * 10 + (j.ptr[p++] - '0');
            d++;
        }
        if (!d)
            return 1;
        if (neg)
            return -1;
        return v > INT32_MAX ? INT32_MAX : (int32_t)v;
    }
    return 1;
}

static bool thing_bound(const struct emx_edge_client *c, struct emx_ao_str name)
{
    for (size_t i = 0; i < c->nthings; i++)
        if (emx_ao_str_eq(name, c->things[i]))
            return true;
    return false;
}

static char *str_dup(struct emx_ao_str s)
{
    char *p = malloc((size_t)s.len + 1);
    if (p) {
        memcpy(p, s.ptr, s.len);
        p[s.len] = '\0';
    }
    return p;
}

/* StartTunnel: answer at once, then open the tunnel socket. */
static void tunnel_start(struct emx_edge_client *c, const struct emx_ao_header *h,
                         const struct emx_ao_tunnel_msg *m)
{
    struct edge_tunnel_stats *cs = &c->tun_done;
    cs->requests++;
    bool ok = m->tid.ptr && m->tid.len > 0 && m->tid.len < 256 && m->type.ptr &&
              m->connection.ptr && c->ntunnels < c->cfg.max_tunnels && !tun_by_tid(c, m->tid);
    for (uint32_t i = 0; ok && i < m->tid.len; i++)
        ok = m->tid.ptr[i] > 0x20 && m->tid.ptr[i] < 0x7F; /* it goes into the request line */
    if (ok) {
        char type[16] = "";
        size_t tl = m->type.len < sizeof(type) - 1 ? m->type.len : sizeof(type) - 1;
        for (size_t i = 0; i < tl; i++)
            type[i] = (char)tolower(m->type.ptr[i]);
        /* Unknown types are tcp; file is not built here; udp/serial refused. */
        ok = strcmp(type, "file") != 0 && strcmp(type, "udp") != 0 && strcmp(type, "serial") != 0;
    }
    int32_t chunk = m->has_chunksize ? m->chunksize : 8192;
    int32_t idle = m->has_idle_timeout ? m->idle_timeout : 30000;
    ok = ok && chunk > 16 && (uint32_t)chunk <= TUN_MAX_CHUNKSIZE;
    struct emx_ao_str host;
    uint16_t port = 0;
    struct sockaddr_storage target;
    memset(&target, 0, sizeof(target));
    if (ok)
        ok = emx_ao_tunnel_target(m->connection, &host, &port) == EMX_AO_OK && host.len > 0 &&
             host.len < 256;
    if (ok) {
        /* Resolved when the tunnel is created, as the SDK does. */
        char hn[256];
        memcpy(hn, host.ptr, host.len);
        hn[host.len] = '\0';
        if (uv_ip4_addr(hn, port, (struct sockaddr_in *)&target) != 0 &&
            uv_ip6_addr(hn, port, (struct sockaddr_in6 *)&target) != 0) {
            struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
            ok = getaddrinfo(hn, NULL, &hints, &res) == 0 && res &&
                 res->ai_addrlen <= sizeof(target);
            if (ok) {
                memcpy(&target, res->ai_addr, res->ai_addrlen);
                if (target.ss_family == AF_INET6)
                    ((struct sockaddr_in6 *)&target)->sin6_port = htons(port);
                else
                    ((struct sockaddr_in *)&target)->sin_port = htons(port);
            }
            if (res)
                freeaddrinfo(res);
        }
    }
    struct etunnel *t = ok ? calloc(1, sizeof(*t)) : NULL;
    if (t && (!(t->tid = str_dup(m->tid)) || !(t->thing = str_dup(m->thing)))) {
        free(t->tid);
        free(t);
        t = NULL;
    }
    if (!t) {
        cs->refused++;
        tunnel_answer(c, h, EMX_AO_INTERNAL_ERROR);
        return;
    }
    t->c = c;
    t->serial = ++c->tun_serial;
    t->chunksize = (uint32_t)chunk;
    t->idle_ms = idle > 0 ? (uint32_t)idle : 0;
    t->connects_left = json_num_connects(m->connection);
    t->target = target;
    t->state = EDGE_TUN_UPGRADING;
    uv_timer_init(c->loop, &t->timer);
    t->timer.data = t;
    t->next = c->tunnels;
    c->tunnels = t;
    c->ntunnels++;
    tunnel_answer(c, h, EMX_AO_SUCCESS);
    /* Same host and port as the AlwaysOn connection; Host without port. */
    size_t pl = sizeof(TUN_PREFIX) + strlen(t->tid);
    char *path = malloc(pl);
    if (path)
        snprintf(path, pl, "%s%s", TUN_PREFIX, t->tid);
    struct ws_client_opts o = {.host = c->url_host,
                               .path = path,
                               .app_key = c->cfg.app_key,
                               .max_frame_size = (uint32_t)((uint64_t)t->chunksize * 4 / 3),
                               .sdk_tunnel = true};
    t->ws = path ? ws_client_connect(c->loop, (struct sockaddr *)&c->dest,
                                     c->has_source ? (struct sockaddr *)&c->source : NULL, &o,
                                     &tun_handlers, t)
                 : NULL;
    free(path);
    if (!t->ws) {
        t->st.upgrade_failed++;
        tun_end(t, true, NULL);
        return;
    }
    t->ws->rx_max_message = o.max_frame_size + 4 > TUN_MAX_MESSAGE ? o.max_frame_size + 4
                                                                    : TUN_MAX_MESSAGE;
    tun_arm(t, TM_UPGRADE, TUN_UPGRADE_MS);
}

/* The tunnel control services. Returns false for requests that are not
 * one (or not for a bound Thing): they take the ordinary path. */
static bool tunnel_service(struct emx_edge_client *c, const struct emx_ao_header *h,
                           const uint8_t *body, size_t len, const struct emx_ao_request *rq)
{
    if (c->cfg.tunnels_off || rq->characteristic != EDGE_CHAR_SERVICES ||
        !thing_bound(c, rq->entity_name))
        return false;
    struct emx_ao_tunnel_msg m;
    int rc = emx_ao_tunnel_parse(body, len, &m);
    if (rc == EMX_AO_OK && (m.service == EMX_AO_TUNNEL_NONE ||
                            m.service == EMX_AO_TUNNEL_COMMAND_FROM))
        return false;
    if (rc != EMX_AO_OK) {
        c->stats.bad_messages++;
        tunnel_answer(c, h, EMX_AO_BAD_REQUEST);
        return true;
    }
    if (m.service == EMX_AO_TUNNEL_START) {
        tunnel_start(c, h, &m);
        return true;
    }
    struct etunnel *t = m.tid.ptr ? tun_by_tid(c, m.tid) : NULL;
    if (m.service == EMX_AO_TUNNEL_COMPLETE) {
        c->tun_done.completes++;
        if (!t || !m.peer_name.ptr || t->state == EDGE_TUN_ENDING) {
            tunnel_answer(c, h, EMX_AO_BAD_REQUEST);
            return true;
        }
        tunnel_answer(c, h, EMX_AO_SUCCESS);
        /* Next: CANCEL, then (once answered) the close frame. */
        t->idle_cancelling = false;
        t->report_disconnect = false;
        t->state = EDGE_TUN_ENDING;
        tun_target_close(t);
        if (!tun_send_command(t, "CANCEL"))
            tun_end(t, false, TUN_STOPPED_BY_EDGE);
        return true;
    }
    /* TunnelCommandToEdge */
    c->tun_done.commands++;
    bool connect = m.command.ptr && emx_ao_str_eq(m.command, "CONNECT");
    bool disconnect = m.command.ptr && emx_ao_str_eq(m.command, "DISCONNECT");
    if (!t || t->state != EDGE_TUN_OPEN || (!connect && !disconnect)) {
        tunnel_answer(c, h, EMX_AO_BAD_REQUEST);
        return true;
    }
    t->report_disconnect = false;
    if (connect) {
        if (t->connects_left == 0) {
            /* num_connects used up: refuse and close the tunnel. */
            tunnel_answer(c, h, EMX_AO_BAD_REQUEST);
            tun_end(t, true, TUN_STOPPED_BY_EDGE);
            return true;
        }
        tunnel_answer(c, h, EMX_AO_SUCCESS);
        tun_dial(t);
        return true;
    }
    tunnel_answer(c, h, EMX_AO_SUCCESS);
    tun_target_close(t);
    tun_arm(t, TM_REDIAL, TUN_TICK_MS);
    return true;
}

/* Close every tunnel socket with 1000, no CANCEL (the API shutting down). */
static void tunnels_close_all(struct emx_edge_client *c)
{
    struct etunnel *t = c->tunnels;
    while (t) {
        struct etunnel *next = t->next;
        if (!t->ended)
            tun_end(t, false, TUN_STOPPED_BY_EDGE);
        t = next;
    }
}

const struct edge_tunnel_stats *emx_edge_client_tunnel_stats(struct emx_edge_client *c)
{
    c->tun_snap = c->tun_done;
    c->tun_snap.active = c->ntunnels;
    for (struct etunnel *t = c->tunnels; t; t = t->next) {
        if (t->ended)
            continue;
        struct edge_tunnel_stats now;
        tun_stats_now(t, &now);
        emx_edge_tunnel_stats_add(&c->tun_snap, &now);
    }
    c->tun_snap.active = c->ntunnels;
    return &c->tun_snap;
}

size_t emx_edge_client_tunnels(struct emx_edge_client *c, struct edge_tunnel_info *out, size_t max)
{
    size_t n = 0;
    for (struct etunnel *t = c->tunnels; t; t = t->next) {
        if (t->ended)
            continue;
        if (n < max) {
            struct edge_tunnel_info *i = &out[n];
            memset(i, 0, sizeof(*i));
            snprintf(i->tid, sizeof(i->tid), "%s", t->tid);
            snprintf(i->thing, sizeof(i->thing), "%s", t->thing);
            i->state = (enum edge_tunnel_state)t->state;
            i->target_connected = t->x && t->x->connected;
            i->chunksize = t->chunksize;
            i->idle_timeout_ms = t->idle_ms;
            i->connects_left = t->connects_left;
            tun_stats_now(t, &i->stats);
            i->stats.active = 1;
        }
        n++;
    }
    return n;
}


static void answer_request(struct emx_edge_client *c, const struct emx_ao_header *h,
                           const uint8_t *body, size_t len)
{
    struct emx_ao_request rq;
    struct emx_ao_header ah = {.version = EMX_AO_VERSION,
                               .request_id = h->request_id,
                               .endpoint_id = h->endpoint_id,
                               .session_id = h->session_id};
    c->stats.platform_requests++;
    if (h->code == EMX_AO_KEEP_ALIVE) {
        uint8_t b[32];
        size_t n = emx_ao_build_response(b, sizeof(b), EMX_AO_SUCCESS, h->request_id,
                                         h->endpoint_id, h->session_id, NULL);
        send_msg(c, b, n);
        c->stats.platform_answers++;
        return;
    }
    if (emx_ao_request_parse(body, len, &rq) != EMX_AO_OK) {
        c->stats.bad_messages++;
        uint8_t b[64];
        size_t n = emx_ao_build_response(b, sizeof(b), EMX_AO_BAD_REQUEST, h->request_id,
                                         h->endpoint_id, h->session_id, "bad request body");
        send_msg(c, b, n);
        c->stats.platform_answers++;
        return;
    }
    if (tunnel_service(c, h, body, len, &rq))
        return;
    char ename[256];
    size_t el = rq.entity_name.len < sizeof(ename) - 1 ? rq.entity_name.len : sizeof(ename) - 1;
    memcpy(ename, rq.entity_name.ptr, el);
    ename[el] = '\0';
    if (c->cfg.answer_mode == EDGE_ANSWER_NOT_FOUND) {
        uint8_t b[32];
        size_t n = emx_ao_build_response(b, sizeof(b), EMX_AO_NOT_FOUND, h->request_id,
                                         h->endpoint_id, h->session_id, NULL);
        send_msg(c, b, n);
        c->stats.platform_answers++;
        return;
    }
    /* SUCCESS: reasonMarker 0 · 0x05 · InfoTable. */
    size_t it_len;
    uint8_t *it = NULL;
    if (c->cfg.answer_size || !rq.has_params) {
        size_t sz = c->cfg.answer_size ? c->cfg.answer_size : 8;
        size_t cap = ao_infotable_blob_size("value", sz);
        uint8_t *fill = calloc(1, sz);
        it = fill ? malloc(cap) : NULL;
        if (it) {
            memset(fill, 'v', sz);
            it_len = ao_infotable_blob(it, cap, "value", fill, sz);
        }
        free(fill);
        if (!it)
            return;
    } else {
        it_len = rq.params_len;
    }
    size_t blen = 2 + it_len;
    uint8_t *rb = malloc(blen);
    if (rb) {
        rb[0] = 0;
        rb[1] = EMX_BT_INFOTABLE;
        memcpy(rb + 2, it ? it : rq.params, it_len);
        ah.code = EMX_AO_SUCCESS;
        ao_emit(&ah, rq.entity_type, ename, rb, blen, c->cfg.chunk_size, send_msg, c);
        c->stats.platform_answers++;
    }
    free(rb);
    free(it);
}

static void send_binds_after_auth(struct emx_edge_client *c)
{
    if (c->nthings)
        send_bind(c, EMX_AO_BIND, (const char *const *)c->things, c->nthings);
}

static void handle_message(struct emx_edge_client *c, const uint8_t *m, size_t len)
{
    struct emx_ao_header h;
    size_t off;
    if (emx_ao_header_parse(m, len, &h, &off) != EMX_AO_OK) {
        c->stats.bad_messages++;
        ws_abort(c->conn, "bad AlwaysOn header", false);
        return;
    }
    if (h.multipart) {
        uint8_t *whole;
        size_t wl;
        int rc = ao_reasm_feed(&c->reasm, &h, m, len, off, &whole, &wl);
        if (rc == AO_REASM_MORE)
            return;
        if (rc != AO_REASM_DONE) {
            c->stats.bad_messages++;
            ws_abort(c->conn, "bad multipart sequence", false);
            return;
        }
        handle_message(c, whole, wl);
        free(whole);
        return;
    }
    const uint8_t *body = m + off;
    size_t blen = len - off;
    if (!emx_ao_is_response(h.code)) {
        if (c->state != EDGE_READY) {
            c->stats.bad_messages++;
            return;
        }
        answer_request(c, &h, body, blen);
        return;
    }
    struct edge_ledger_entry *e = entry_of(c, h.request_id);
    if (!e || e->outcome != EDGE_PENDING || e->conn_gen != c->conn_gen) {
        c->stats.unexpected_answers++;
        return;
    }
    if (h.endpoint_id != 0)
        c->stats.wrong_endpoint++;
    struct emx_ao_response rs;
    if (emx_ao_response_parse(body, blen, &rs) != EMX_AO_OK)
        c->stats.bad_messages++;
    bool is_auth = h.request_id == c->auth_request_id && c->state == EDGE_AUTHING;
    if (is_auth && h.code == EMX_AO_SUCCESS)
        c->session_id = h.session_id;
    finish(c, e, EDGE_ANSWERED, h.code);
    if (!is_auth || !c->conn)
        return;
    if (h.code != EMX_AO_SUCCESS) {
        c->stats.auth_failed++;
        ws_abort(c->conn, "AUTH refused", false);
        return;
    }
    c->stats.auth_ok++;
    set_state(c, EDGE_READY);
    send_binds_after_auth(c);
    if (c->cfg.ping_interval_ms != UINT32_MAX)
        arm(c, T_PING, c->cfg.ping_interval_ms);
    else
        uv_timer_stop(&c->timer);
}

static void on_open(struct ws_conn *wc)
{
    struct emx_edge_client *c = wc->user;
    c->stats.connects++;
    c->stats.deflate_active = wc->deflate;
    send_auth(c);
}

static void on_message(struct ws_conn *wc, int op, const uint8_t *data, size_t len)
{
    struct emx_edge_client *c = wc->user;
    if (op != WS_OP_BINARY) {
        c->stats.bad_messages++;
        ws_abort(wc, "text message", false);
        return;
    }
    handle_message(c, data, len);
}

static void on_ping(struct ws_conn *wc, const uint8_t *data, size_t len)
{
    struct emx_edge_client *c = wc->user;
    if (c->cfg.answer_pings) {
        c->stats.pings_answered++;
        ws_send_control(wc, WS_OP_PONG, data, len);
    } else {
        c->stats.pings_ignored++; /* what the SDK does */
    }
}

static void on_pong(struct ws_conn *wc, const uint8_t *data, size_t len)
{
    (void)data, (void)len;
    struct emx_edge_client *c = wc->user;
    c->stats.pongs_received++;
    c->awaiting_pong = false;
}

static void maybe_free(struct emx_edge_client *c);

static void on_close(struct ws_conn *wc)
{
    struct emx_edge_client *c = wc->user;
    c->stats.disconnects++;
    c->stats.last_reason = wc->reason;
    c->stats.last_http_status = wc->http_status;
    c->stats.last_close_code = wc->close_code;
    c->stats.frames_in += wc->stats.frames_in;
    c->stats.bytes_in += wc->stats.bytes_in;
    c->stats.bytes_out += wc->stats.bytes_out;
    if (wc->stats.max_frame_in > c->stats.max_frame_in)
        c->stats.max_frame_in = wc->stats.max_frame_in;
    c->conn = NULL;
    settle_pending(c, EDGE_CONNECTION_LOST);
    ao_reasm_free(&c->reasm);
    ao_reasm_init(&c->reasm, MAX_INBOUND);
    c->awaiting_pong = false;
    if (c->freeing) {
        maybe_free(c);
        return;
    }
    if (c->stopped) {
        set_state(c, EDGE_STOPPED);
        return;
    }
    set_state(c, EDGE_DOWN);
    if (!c->cfg.no_reconnect)
        arm(c, T_CONNECT_DELAY, c->cfg.connect_retry_interval_ms);
}

static const struct ws_handlers handlers = {
    .on_open = on_open,
    .on_message = on_message,
    .on_ping = on_ping,
    .on_pong = on_pong,
    .on_close = on_close,
};

static void connect_now(struct emx_edge_client *c)
{
    struct ws_client_opts o = {.host = c->host_header,
                               .path = c->url_path,
                               .app_key = c->cfg.app_key,
                               .max_frame_size = c->cfg.max_frame_size,
                               .deflate = c->cfg.deflate,
                               .extra_headers = c->cfg.extra_headers};
    c->conn_gen++;
    c->conn =
        ws_client_connect(c->loop, (struct sockaddr *)&c->dest,
                          c->has_source ? (struct sockaddr *)&c->source : NULL, &o, &handlers, c);
    if (!c->conn) {
        c->stats.last_reason = "connect failed";
        set_state(c, EDGE_DOWN);
        if (!c->cfg.no_reconnect)
            arm(c, T_CONNECT_DELAY, c->cfg.connect_retry_interval_ms);
        return;
    }
    set_state(c, EDGE_CONNECTING);
    arm(c, T_OPEN_TIMEOUT, c->cfg.connect_timeout_ms);
}

static void on_timer(uv_timer_t *t)
{
    struct emx_edge_client *c = t->data;
    switch (c->tmode) {
    case T_CONNECT_DELAY:
        if (!c->stopped && !c->conn)
            connect_now(c);
        break;
    case T_OPEN_TIMEOUT:
        if (c->conn && c->state != EDGE_READY)
            ws_abort(c->conn, "connect/upgrade/AUTH timeout", false);
        break;
    case T_PING: {
        if (!c->conn || c->state != EDGE_READY)
            break;
        /* The SDK's ping payload is the wall-clock time, e.g. "06:44:02". */
        char buf[16];
        time_t now = time(NULL);
        struct tm tm;
        localtime_r(&now, &tm);
        size_t n = strftime(buf, sizeof(buf), "%H:%M:%S", &tm);
        ws_send_control(c->conn, WS_OP_PING, buf, n);
        c->stats.pings_sent++;
        c->awaiting_pong = true;
        uint32_t wait = c->cfg.pong_timeout_ms < c->cfg.ping_interval_ms ? c->cfg.pong_timeout_ms
                                                                         : c->cfg.ping_interval_ms;
        arm(c, T_PONG_WAIT, wait);
        break;
    }
    case T_PONG_WAIT:
        if (!c->conn)
            break;
        if (c->awaiting_pong) {
            ws_abort(c->conn, "no pong", false);
            break;
        }
        arm(c, T_PING,
            c->cfg.ping_interval_ms > c->cfg.pong_timeout_ms
                ? c->cfg.ping_interval_ms - c->cfg.pong_timeout_ms
                : 1);
        break;
    default:
        break;
    }
}

/* ---- lifecycle ---- */

static int parse_url(struct emx_edge_client *c, const char *url)
{
    const char *p;
    uint16_t port;
    if (strncmp(url, "ws://", 5) == 0) {
        p = url + 5;
        port = 80;
    } else {
        return -1; /* wss:// is not built in yet */
    }
    const char *slash = strchr(p, '/');
    size_t hl = slash ? (size_t)(slash - p) : strlen(p);
    if (hl == 0 || hl > 255)
        return -1;
    char hostport[256];
    memcpy(hostport, p, hl);
    hostport[hl] = '\0';
    c->host_header = strdup(hostport);
    c->url_path = strdup(slash ? slash : "/");
    char *host = hostport;
    char *colon = strrchr(hostport, ':');
    if (hostport[0] == '[') {
        char *rb = strchr(hostport, ']');
        if (!rb)
            return -1;
        *rb = '\0';
        host = hostport + 1;
        colon = rb[1] == ':' ? rb + 1 : NULL;
    }
    if (colon) {
        *colon = '\0';
        char *end;
        long v = strtol(colon + 1, &end, 10);
        if (*end || v <= 0 || v > 65535)
            return -1;
        port = (uint16_t)v;
    }
    c->url_host = strdup(host);
    if (!c->host_header || !c->url_path || !c->url_host)
        return -1;
    if (uv_ip4_addr(host, port, (struct sockaddr_in *)&c->dest) == 0 ||
        uv_ip6_addr(host, port, (struct sockaddr_in6 *)&c->dest) == 0)
        return 0;
    /* A name: resolve once, here (tools only; the bench uses addresses). */
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
    if (getaddrinfo(host, NULL, &hints, &res) != 0 || !res)
        return -1;
    memcpy(&c->dest, res->ai_addr, res->ai_addrlen);
    ((struct sockaddr_in *)&c->dest)->sin_port = htons(port);
    freeaddrinfo(res);
    return 0;
}

struct emx_edge_client *emx_edge_client_new(uv_loop_t *loop, const struct edge_client_config *cfg)
{
    if (!cfg->url || !cfg->app_key)
        return NULL;
    struct emx_edge_client *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->loop = loop;
    c->cfg = *cfg;
    c->cfg.app_key = strdup(cfg->app_key);
    c->cfg.url = NULL;
    c->cfg.source_ip = NULL;
    c->cfg.extra_headers = cfg->extra_headers ? strdup(cfg->extra_headers) : NULL;
    if (!c->cfg.max_frame_size)
        c->cfg.max_frame_size = 8192;
    if (!c->cfg.ping_interval_ms)
        c->cfg.ping_interval_ms = 55000;
    if (!c->cfg.pong_timeout_ms)
        c->cfg.pong_timeout_ms = 10000;
    if (!c->cfg.chunk_size)
        c->cfg.chunk_size = 8192;
    if (!c->cfg.max_tunnels)
        c->cfg.max_tunnels = 64;
    if (!c->cfg.max_connect_delay_ms)
        c->cfg.max_connect_delay_ms = 10000;
    if (!c->cfg.connect_retry_interval_ms)
        c->cfg.connect_retry_interval_ms = 5000;
    if (!c->cfg.connect_timeout_ms)
        c->cfg.connect_timeout_ms = 15000;
    c->next_request_id = 1;
    c->session_id = EMX_AO_AUTH_SESSION;
    ao_reasm_init(&c->reasm, MAX_INBOUND);
    bool ok = c->cfg.app_key && (!cfg->extra_headers || c->cfg.extra_headers) &&
              c->cfg.chunk_size <= 0xFFFF && parse_url(c, cfg->url) == 0;
    if (ok && cfg->source_ip) {
        c->has_source = true;
        ok = uv_ip4_addr(cfg->source_ip, 0, (struct sockaddr_in *)&c->source) == 0 ||
             uv_ip6_addr(cfg->source_ip, 0, (struct sockaddr_in6 *)&c->source) == 0;
    }
    if (!ok || uv_timer_init(loop, &c->timer) != 0) {
        free((char *)c->cfg.app_key);
        free((char *)c->cfg.extra_headers);
        free(c->url_host);
        free(c->url_path);
        free(c->host_header);
        free(c);
        return NULL;
    }
    c->timer.data = c;
    return c;
}

int emx_edge_client_start(struct emx_edge_client *c)
{
    if (c->stopped || c->conn || c->state != EDGE_DOWN)
        return -1;
    /* The SDK waits a random time before its first connect so a fleet
     * restarting together does not arrive at once. */
    uint32_t r;
    if (uv_random(NULL, NULL, &r, sizeof(r), 0, NULL) != 0)
        r = (uint32_t)uv_hrtime();
    arm(c, T_CONNECT_DELAY, r % (c->cfg.max_connect_delay_ms + 1u));
    return 0;
}

void emx_edge_client_drop(struct emx_edge_client *c)
{
    if (c->conn)
        ws_abort(c->conn, "dropped by the test", true);
}

void emx_edge_client_stop(struct emx_edge_client *c)
{
    if (c->stopped)
        return;
    emx_edge_client_close_ledger(c);
    c->stopped = true;
    tunnels_close_all(c);
    uv_timer_stop(&c->timer);
    if (c->conn)
        ws_close(c->conn, 1000, "client stopped");
    else
        set_state(c, EDGE_STOPPED);
}

static void maybe_free(struct emx_edge_client *c)
{
    if (!c->timer_closed || c->conn || c->tunnels)
        return;
    for (size_t i = 0; i < c->nthings; i++)
        free(c->things[i]);
    free(c->things);
    ao_reasm_free(&c->reasm);
    free(c->ledger.entries);
    free((char *)c->cfg.app_key);
    free((char *)c->cfg.extra_headers);
    free(c->url_host);
    free(c->url_path);
    free(c->host_header);
    free(c);
}

static void on_timer_closed(uv_handle_t *h)
{
    struct emx_edge_client *c = h->data;
    c->timer_closed = true;
    maybe_free(c);
}

void emx_edge_client_free(struct emx_edge_client *c)
{
    if (!c || c->freeing)
        return;
    c->cfg.on_state = NULL;
    emx_edge_client_stop(c);
    c->freeing = true;
    if (c->conn)
        ws_abort(c->conn, NULL, false);
    uv_close((uv_handle_t *)&c->timer, on_timer_closed);
}

const struct edge_ledger *emx_edge_client_ledger(const struct emx_edge_client *c)
{
    return &c->ledger;
}

const struct edge_client_stats *emx_edge_client_stats(struct emx_edge_client *c)
{
    c->snap = c->stats;
    if (c->conn) {
        c->snap.frames_in += c->conn->stats.frames_in;
        c->snap.bytes_in += c->conn->stats.bytes_in;
        c->snap.bytes_out += c->conn->stats.bytes_out;
        if (c->conn->stats.max_frame_in > c->snap.max_frame_in)
            c->snap.max_frame_in = c->conn->stats.max_frame_in;
    }
    return &c->snap;
}

enum edge_state emx_edge_client_state(const struct emx_edge_client *c)
{
    return (enum edge_state)c->state;
}

uint32_t emx_edge_client_session(const struct emx_edge_client *c)
{
    return c->session_id;
}

size_t emx_edge_client_pending(const struct emx_edge_client *c)
{
    return c->pending;
}

int emx_edge_ledger_write_json(const struct edge_ledger *l, const char *client_name, FILE *f,
                               bool first)
{
    for (size_t i = 0; i < l->count; i++) {
        const struct edge_ledger_entry *e = &l->entries[i];
        int n;
        if (e->outcome == EDGE_ANSWERED)
            n = fprintf(f,
                        "%s\n{\"edge\":\"%s\",\"request_id\":%u,\"type\":\"%s\",\"multipart\":%s,"
                        "\"outcome\":\"answered\",\"code\":%u,\"code_name\":\"%s\","
                        "\"latency_us\":%u}",
                        first && i == 0 ? "" : ",", client_name, e->request_id,
                        emx_ao_code_name(e->type), e->multipart ? "true" : "false", e->code,
                        emx_ao_code_name(e->code), e->latency_us);
        else
            n = fprintf(f,
                        "%s\n{\"edge\":\"%s\",\"request_id\":%u,\"type\":\"%s\",\"multipart\":%s,"
                        "\"outcome\":\"%s\"}",
                        first && i == 0 ? "" : ",", client_name, e->request_id,
                        emx_ao_code_name(e->type), e->multipart ? "true" : "false",
                        emx_edge_outcome_name((enum edge_outcome)e->outcome));
        if (n < 0)
            return -1;
    }
    return 0;
}
