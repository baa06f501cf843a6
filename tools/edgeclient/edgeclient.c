/* libedgeclient (edgeclient.h). */
#include "edgeclient.h"

#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "ao.h"
#include "codec.h"
#include "ws.h"

#define MAX_INBOUND (64u * 1024 * 1024) /* largest reassembled message accepted */

enum timer_mode { T_NONE, T_CONNECT_DELAY, T_OPEN_TIMEOUT, T_PING, T_PONG_WAIT };

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
    uv_timer_stop(&c->timer);
    if (c->conn)
        ws_close(c->conn, 1000, "client stopped");
    else
        set_state(c, EDGE_STOPPED);
}

static void maybe_free(struct emx_edge_client *c)
{
    if (!c->timer_closed || c->conn)
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
