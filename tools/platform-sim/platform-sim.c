/* platform-sim: a ThingWorx platform cluster stand-in that speaks and
 * enforces edgemux's platform-hop contract (DESIGN §3), and serves plain
 * edges directly for the benchmark baseline.
 *
 * One process serves several instances (ports) sharing one session and bind
 * table, like an HA cluster. A line-based control channel lets tests crash
 * and restore instances, stall reading, send platform→edge requests and read
 * statistics. Answers are written straight from the receive path.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "ao.h"
#include "codec.h"
#include "hmap.h"
#include "list.h"
#include "ws.h"

#define MAX_INSTANCES  64
#define CTL_TIMEOUT_MS 15000

enum violation {
    V_MISSING_HEADERS, /* pipe upgrade without appKey / X-Edgemux-Server / X-Edgemux-Boot */
    V_BAD_BOOT,        /* X-Edgemux-Boot not 1..16 hex digits */
    V_BAD_UPGRADE_KEY, /* appKey header wrong */
    V_BEFORE_AUTH,     /* message before the connection's AUTH succeeded */
    V_BAD_AUTH,        /* AUTH with a wrong or missing key */
    V_TEXT_FRAME,
    V_BAD_HEADER,      /* unparseable AlwaysOn header */
    V_BAD_BODY,        /* unparseable body */
    V_BAD_MULTIPART,   /* chunk out of order, inconsistent or too large */
    V_ENDPOINT_ZERO,   /* an edge message on a pipe with endpointId 0 */
    V_UNKNOWN_SESSION, /* request with a sessionId the cluster never issued */
    V_UNKNOWN_CODE,
    V_KEEPALIVE_FORWARDED,
    V_UNEXPECTED_ANSWER, /* answer to no platform request of this pipe */
    V_WRONG_ENDPOINT,    /* answer with another endpointId than asked */
    V_COUNT
};
static const char *const violation_names[V_COUNT] = {
    "missing_pipe_headers", "bad_boot_id",       "bad_upgrade_app_key",
    "message_before_auth",  "bad_auth",          "text_frame",
    "bad_header",           "bad_body",          "bad_multipart",
    "endpoint_zero",        "unknown_session",   "unknown_code",
    "keepalive_forwarded",  "unexpected_answer", "wrong_endpoint"};

struct counters {
    uint64_t msgs_in, msgs_out, bytes_in, bytes_out;
};

struct instance {
    int id; /* 1-based */
    uint16_t port;
    uv_tcp_t listener;
    bool listening, reading_stopped;
    struct emx_list conns;
    struct counters ctr; /* of connections already closed */
    uint64_t violations, accepted;
};

struct bkey;

struct pconn {
    struct ws_conn *ws;
    struct instance *in;
    struct emx_list link;
    uint64_t id;
    bool pipe, authed;
    char *server, *boot;
    struct bkey *direct_key; /* direct edges: their bind key */
    uint32_t next_rid;       /* platform→edge requestIds */
    uint64_t msgs_in, msgs_out, violations;
    struct ao_reasm reasm;
    struct emx_list delayed;  /* answers waiting for --latency */
    struct emx_list ctl_reqs; /* platform→edge requests sent on this conn */
};

struct bkey {
    char *id; /* server \x1f boot \x1f endpointId, or "direct" \x1f connid */
    char *server, *boot;
    uint32_t ep, session;
    struct pconn *direct;
    struct emx_list things;
    size_t nthings;
};

struct binding {
    char *thing;
    struct bkey *key;
    struct emx_list link;
};

struct ctl_client {
    struct emx_list link; /* in S.ctl_clients */
    uv_stream_t *s;
    union {
        uv_tcp_t tcp;
        uv_pipe_t pipe;
    } h;
    char line[4096];
    size_t len;
    bool closing, closed;
    unsigned refs; /* outstanding platform→edge requests */
};

struct ctl_req {
    struct emx_list link; /* in pconn.ctl_reqs */
    struct ctl_client *client;
    uint32_t rid, ep;
    uint64_t deadline;
};

struct delayed {
    uv_timer_t t;
    struct emx_list link;
    struct pconn *pc;
    struct emx_ao_header h;
    uint8_t entity_type;
    char *entity;
    uint8_t *body;
    size_t len;
};

static struct sim {
    uv_loop_t *loop;
    char *app_key;
    const char *path, *bind_addr;
    uint32_t latency_ms, response_size, chunk_size;
    size_t max_message;
    bool deflate, no_direct, quiet, any_session;
    struct instance inst[MAX_INSTANCES];
    int ninst;
    uint32_t session_base, sessions;
    struct hmap keys, things;
    uint64_t conn_ids;
    uint64_t violations[V_COUNT];
    uint64_t requests_by_code[256], answers_by_code[256], edge_answers_by_code[256];
    uint64_t ctl_sent, ctl_answered, ctl_timeouts, auth_refused;
    uv_stream_t *ctl_server;
    union {
        uv_tcp_t tcp;
        uv_pipe_t pipe;
    } ctl_h;
    struct emx_list ctl_clients;
    uv_timer_t sweep;
    uv_signal_t sigint, sigterm;
} S;

static void violation(struct pconn *pc, enum violation v)
{
    S.violations[v]++;
    if (pc) {
        pc->violations++;
        pc->in->violations++;
    }
    if (!S.quiet)
        fprintf(stderr, "platform-sim: instance %d conn %" PRIu64 ": contract violation: %s\n",
                pc ? pc->in->id : 0, pc ? pc->id : 0, violation_names[v]);
}

/* ---- sessions and binds (cluster-wide) ---- */

static uint32_t issue_session(void)
{
    uint32_t s = S.session_base + S.sessions++;
    if (s == EMX_AO_AUTH_SESSION || s == 0)
        s = S.session_base + S.sessions++;
    return s;
}

static bool session_valid(uint32_t s)
{
    if (S.any_session) /* a cluster spread over processes that share no table */
        return s != EMX_AO_AUTH_SESSION && s != 0;
    return s != EMX_AO_AUTH_SESSION && (uint32_t)(s - S.session_base) < S.sessions;
}

static struct bkey *key_get(struct pconn *pc, uint32_t ep, bool create)
{
    if (!pc->pipe)
        return pc->direct_key;
    char id[512];
    int n = snprintf(id, sizeof(id), "%s\x1f%s\x1f%" PRIu32, pc->server, pc->boot, ep);
    if (n < 0 || (size_t)n >= sizeof(id))
        return NULL;
    struct bkey *k = hmap_get(&S.keys, id, (size_t)n);
    if (k || !create)
        return k;
    k = calloc(1, sizeof(*k));
    if (!k)
        return NULL;
    k->id = strdup(id);
    k->server = strdup(pc->server);
    k->boot = strdup(pc->boot);
    k->ep = ep;
    emx_list_init(&k->things);
    if (!k->id || !k->server || !k->boot || hmap_put(&S.keys, id, (size_t)n, k, NULL) != 0) {
        free(k->id);
        free(k->server);
        free(k->boot);
        free(k);
        return NULL;
    }
    return k;
}

static void unbind_one(struct binding *b)
{
    hmap_del(&S.things, b->thing, strlen(b->thing));
    emx_list_unlink(&b->link);
    b->key->nthings--;
    free(b->thing);
    free(b);
}

static int bind_thing(struct bkey *k, struct emx_ao_str name)
{
    struct binding *b = hmap_get(&S.things, name.ptr, name.len);
    if (b) {
        if (b->key == k)
            return 0;
        /* The newest BIND wins: the device moved to another key. */
        emx_list_unlink(&b->link);
        b->key->nthings--;
    } else {
        b = calloc(1, sizeof(*b));
        if (!b || !(b->thing = malloc(name.len + 1))) {
            free(b);
            return -1;
        }
        memcpy(b->thing, name.ptr, name.len);
        b->thing[name.len] = '\0';
        if (hmap_put(&S.things, b->thing, name.len, b, NULL) != 0) {
            free(b->thing);
            free(b);
            return -1;
        }
    }
    b->key = k;
    emx_list_push_back(&k->things, &b->link);
    k->nthings++;
    return 0;
}

/* UNBIND removes a Thing only if this key holds it: a late UNBIND through
 * one edgemux never undoes the device's new BIND through a sibling. */
static void unbind_thing(struct bkey *k, struct emx_ao_str name)
{
    struct binding *b = hmap_get(&S.things, name.ptr, name.len);
    if (b && b->key == k)
        unbind_one(b);
}

static void key_drop(struct bkey *k)
{
    struct emx_list *pos, *tmp;
    emx_list_for_each_safe(pos, tmp, &k->things)
        unbind_one(emx_container_of(pos, struct binding, link));
    hmap_del(&S.keys, k->id, strlen(k->id));
    free(k->id);
    free(k->server);
    free(k->boot);
    free(k);
}

/* ---- sending ---- */

static int send_cb(void *arg, const uint8_t *msg, size_t len)
{
    struct pconn *pc = arg;
    pc->msgs_out++;
    return ws_send(pc->ws, WS_OP_BINARY, msg, len);
}

static void send_simple(struct pconn *pc, uint8_t code, const struct emx_ao_header *h,
                        uint32_t session, const char *reason)
{
    uint8_t b[256];
    size_t n =
        emx_ao_build_response(b, sizeof(b), code, h->request_id, h->endpoint_id, session, reason);
    S.answers_by_code[code]++;
    if (n)
        send_cb(pc, b, n);
}

static void delayed_closed(uv_handle_t *h)
{
    struct delayed *d = h->data;
    free(d->entity);
    free(d->body);
    free(d);
}

static void delayed_fire(uv_timer_t *t)
{
    struct delayed *d = t->data;
    emx_list_unlink(&d->link);
    ao_emit(&d->h, d->entity_type, d->entity, d->body, d->len, S.chunk_size, send_cb, d->pc);
    uv_close((uv_handle_t *)&d->t, delayed_closed);
}

/* A request named "Bytes_N" (N decimal, at most 64 MiB) asks for an
 * answer of N bytes whatever --response-size says: tests mix large and
 * small answers on one platform. 0 when the name is not of that form. */
static size_t requested_size(const struct emx_ao_request *rq)
{
    static const char prefix[] = "Bytes_";
    size_t plen = sizeof(prefix) - 1, n = 0;
    if (rq->name.len <= plen || rq->name.len > plen + 8 || memcmp(rq->name.ptr, prefix, plen) != 0)
        return 0;
    for (size_t i = plen; i < rq->name.len; i++) {
        uint8_t c = rq->name.ptr[i];
        if (c < '0' || c > '9')
            return 0;
        n = n * 10 + (size_t)(c - '0');
    }
    return n <= 64u << 20 ? n : 0;
}

/* Answer a request with SUCCESS: the request's params echoed, or
 * --response-size bytes (or those a "Bytes_N" name asks for); multipart
 * when larger than the chunk size. */
static void answer_echo(struct pconn *pc, const struct emx_ao_header *h,
                        const struct emx_ao_request *rq)
{
    size_t it_len = 0;
    uint8_t *it = NULL;
    size_t asked = requested_size(rq);
    if (asked || S.response_size || !rq->has_params) {
        size_t sz = asked ? asked : S.response_size ? S.response_size : 4;
        size_t cap = ao_infotable_blob_size("result", sz);
        uint8_t *fill = malloc(sz);
        it = fill ? malloc(cap) : NULL;
        if (it) {
            memset(fill, 'r', sz);
            it_len = ao_infotable_blob(it, cap, "result", fill, sz);
        }
        free(fill);
        if (!it)
            return;
    } else {
        it_len = rq->params_len;
    }
    size_t blen = 2 + it_len;
    uint8_t *body = malloc(blen);
    char *entity = malloc(rq->entity_name.len + 1);
    if (!body || !entity) {
        free(body);
        free(entity);
        free(it);
        return;
    }
    body[0] = 0;
    body[1] = EMX_BT_INFOTABLE;
    memcpy(body + 2, it ? it : rq->params, it_len);
    free(it);
    memcpy(entity, rq->entity_name.ptr, rq->entity_name.len);
    entity[rq->entity_name.len] = '\0';
    struct emx_ao_header ah = {.version = EMX_AO_VERSION,
                               .code = EMX_AO_SUCCESS,
                               .request_id = h->request_id,
                               .endpoint_id = h->endpoint_id,
                               .session_id = h->session_id};
    S.answers_by_code[EMX_AO_SUCCESS]++;
    if (S.latency_ms == 0) {
        ao_emit(&ah, rq->entity_type, entity, body, blen, S.chunk_size, send_cb, pc);
        free(body);
        free(entity);
        return;
    }
    struct delayed *d = calloc(1, sizeof(*d));
    if (!d) {
        free(body);
        free(entity);
        return;
    }
    d->pc = pc;
    d->h = ah;
    d->entity_type = rq->entity_type;
    d->entity = entity;
    d->body = body;
    d->len = blen;
    uv_timer_init(S.loop, &d->t);
    d->t.data = d;
    emx_list_push_back(&pc->delayed, &d->link);
    uv_timer_start(&d->t, delayed_fire, S.latency_ms, 0);
}

/* ---- control channel output ---- */

struct cwrite {
    uv_write_t req;
    char data[];
};

static void ctl_written(uv_write_t *req, int status)
{
    (void)status;
    free(req);
}

static void ctl_reply(struct ctl_client *cc, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void ctl_write(struct ctl_client *cc, const char *s, size_t n)
{
    if (!cc || cc->closing)
        return;
    struct cwrite *w = malloc(sizeof(*w) + n);
    if (!w)
        return;
    memcpy(w->data, s, n);
    uv_buf_t b = uv_buf_init(w->data, (unsigned)n);
    if (uv_write(&w->req, cc->s, &b, 1, ctl_written) != 0)
        free(w);
}

static void ctl_reply(struct ctl_client *cc, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof(buf) - 2)
        n = sizeof(buf) - 2;
    buf[n++] = '\n';
    ctl_write(cc, buf, (size_t)n);
}

static void ctl_client_unref(struct ctl_client *cc);

static void ctl_req_done(struct ctl_req *r, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void ctl_req_done(struct ctl_req *r, const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    emx_list_unlink(&r->link);
    if (n > 0)
        ctl_reply(r->client, "%s", buf);
    ctl_client_unref(r->client);
    free(r);
}

/* ---- receive ---- */

static void handle_answer(struct pconn *pc, const struct emx_ao_header *h)
{
    struct emx_list *pos, *tmp;
    emx_list_for_each_safe(pos, tmp, &pc->ctl_reqs)
    {
        struct ctl_req *r = emx_container_of(pos, struct ctl_req, link);
        if (r->rid != h->request_id)
            continue;
        if (h->endpoint_id != r->ep)
            violation(pc, V_WRONG_ENDPOINT);
        S.ctl_answered++;
        S.edge_answers_by_code[h->code]++;
        ctl_req_done(r, "answer 0x%02X %s", h->code, emx_ao_code_name(h->code));
        return;
    }
    violation(pc, V_UNEXPECTED_ANSWER);
}

static void handle_auth(struct pconn *pc, const struct emx_ao_header *h, const uint8_t *body,
                        size_t len, bool conn_auth)
{
    struct emx_ao_str v;
    int rc = emx_ao_auth_find_claim(body, len, "appKey", &v);
    bool ok = rc == EMX_AO_OK && v.len == strlen(S.app_key) && memcmp(v.ptr, S.app_key, v.len) == 0;
    if (!ok) {
        /* Only a pipe's own AUTH is edgemux's duty; an edge with a wrong key
         * is the edge's business. */
        if (conn_auth && pc->pipe)
            violation(pc, V_BAD_AUTH);
        else
            S.auth_refused++;
        send_simple(pc, EMX_AO_UNAUTHORIZED, h, h->session_id, NULL);
        if (conn_auth)
            ws_close(pc->ws, 1008, "AUTH refused");
        return;
    }
    uint32_t sid = issue_session();
    if (conn_auth) {
        pc->authed = true;
        if (!pc->pipe) {
            pc->direct_key->session = sid;
        }
    } else {
        struct bkey *k = key_get(pc, h->endpoint_id, true);
        if (k)
            k->session = sid;
    }
    send_simple(pc, EMX_AO_SUCCESS, h, sid, NULL);
}

static void handle_whole(struct pconn *pc, const uint8_t *m, size_t len);

static void on_ws_message(struct ws_conn *ws, int op, const uint8_t *data, size_t len)
{
    struct pconn *pc = ws->user;
    pc->msgs_in++;
    if (op != WS_OP_BINARY) {
        violation(pc, V_TEXT_FRAME);
        ws_close(ws, 1003, "text frame");
        return;
    }
    handle_whole(pc, data, len);
}

static void handle_whole(struct pconn *pc, const uint8_t *m, size_t len)
{
    struct emx_ao_header h;
    size_t off;
    if (emx_ao_header_parse(m, len, &h, &off) != EMX_AO_OK) {
        violation(pc, V_BAD_HEADER);
        ws_close(pc->ws, 1007, "bad AlwaysOn header");
        return;
    }
    if (h.multipart) {
        if (!pc->authed) {
            violation(pc, V_BEFORE_AUTH);
            send_simple(pc, EMX_AO_UNAUTHORIZED, &h, h.session_id, NULL);
            ws_close(pc->ws, 1008, "AUTH first");
            return;
        }
        uint8_t *whole;
        size_t wl;
        int rc = ao_reasm_feed(&pc->reasm, &h, m, len, off, &whole, &wl);
        if (rc == AO_REASM_MORE)
            return;
        if (rc != AO_REASM_DONE) {
            violation(pc, V_BAD_MULTIPART);
            send_simple(pc, rc == AO_REASM_ETOOBIG ? EMX_AO_ENTITY_TOO_LARGE : EMX_AO_BAD_REQUEST,
                        &h, h.session_id, NULL);
            return;
        }
        handle_whole(pc, whole, wl);
        free(whole);
        return;
    }
    const uint8_t *body = m + off;
    size_t blen = len - off;
    if (!pc->authed) {
        if (h.code != EMX_AO_AUTH) {
            violation(pc, V_BEFORE_AUTH);
            send_simple(pc, EMX_AO_UNAUTHORIZED, &h, h.session_id, NULL);
            ws_close(pc->ws, 1008, "AUTH first");
            return;
        }
        handle_auth(pc, &h, body, blen, true);
        return;
    }
    if (emx_ao_is_response(h.code)) {
        handle_answer(pc, &h);
        return;
    }
    S.requests_by_code[h.code]++;
    if (pc->pipe && h.endpoint_id == 0) {
        violation(pc, V_ENDPOINT_ZERO);
        send_simple(pc, EMX_AO_BAD_REQUEST, &h, h.session_id, "endpointId 0 on a pipe");
        return;
    }
    if (h.code == EMX_AO_AUTH) {
        if (!pc->pipe) {
            violation(pc, V_BAD_AUTH); /* a second AUTH on a direct edge */
            send_simple(pc, EMX_AO_BAD_REQUEST, &h, h.session_id, "already authenticated");
            return;
        }
        handle_auth(pc, &h, body, blen, false);
        return;
    }
    if (!session_valid(h.session_id)) {
        violation(pc, V_UNKNOWN_SESSION);
        send_simple(pc, EMX_AO_UNAUTHORIZED, &h, h.session_id, "unknown session");
        return;
    }
    switch (h.code) {
    case EMX_AO_KEEP_ALIVE:
        if (pc->pipe)
            violation(pc, V_KEEPALIVE_FORWARDED);
        send_simple(pc, EMX_AO_SUCCESS, &h, h.session_id, NULL);
        return;
    case EMX_AO_BIND:
    case EMX_AO_UNBIND: {
        struct emx_ao_bind b;
        if (emx_ao_bind_parse(body, blen, &b) != EMX_AO_OK) {
            violation(pc, V_BAD_BODY);
            send_simple(pc, EMX_AO_BAD_REQUEST, &h, h.session_id, "bad BIND body");
            return;
        }
        struct bkey *k = key_get(pc, h.endpoint_id, true);
        if (!k) {
            send_simple(pc, EMX_AO_INTERNAL_ERROR, &h, h.session_id, NULL);
            return;
        }
        if (!k->session)
            k->session = h.session_id;
        size_t cur = 0;
        struct emx_ao_str name;
        while (emx_ao_bind_next_name(&b, &cur, &name) == EMX_AO_OK) {
            if (h.code == EMX_AO_BIND)
                bind_thing(k, name);
            else
                unbind_thing(k, name);
        }
        send_simple(pc, EMX_AO_SUCCESS, &h, h.session_id, NULL);
        return;
    }
    case EMX_AO_GET:
    case EMX_AO_PUT:
    case EMX_AO_POST:
    case EMX_AO_DELETE: {
        struct emx_ao_request rq;
        if (emx_ao_request_parse(body, blen, &rq) != EMX_AO_OK) {
            violation(pc, V_BAD_BODY);
            send_simple(pc, EMX_AO_BAD_REQUEST, &h, h.session_id, "bad request body");
            return;
        }
        answer_echo(pc, &h, &rq);
        return;
    }
    default:
        violation(pc, V_UNKNOWN_CODE);
        send_simple(pc, EMX_AO_BAD_REQUEST, &h, h.session_id, "Message Type not supported");
        return;
    }
}

static bool hex_id(struct ws_str s)
{
    if (s.n == 0 || s.n > 16)
        return false;
    for (size_t i = 0; i < s.n; i++)
        if (!isxdigit((unsigned char)s.p[i]))
            return false;
    return true;
}

static char *dup_str(struct ws_str s)
{
    char *p = malloc(s.n + 1);
    if (p) {
        memcpy(p, s.p, s.n);
        p[s.n] = '\0';
    }
    return p;
}

static int on_ws_upgrade(struct ws_conn *ws, const struct ws_http *req)
{
    struct pconn *pc = ws->user;
    const struct ws_str *srv = ws_http_header(req, "X-Edgemux-Server");
    const struct ws_str *boot = ws_http_header(req, "X-Edgemux-Boot");
    const struct ws_str *key = ws_http_header(req, "appKey");
    const struct ws_str *mfs = ws_http_header(req, "Max-Frame-Size");
    size_t pl = strlen(S.path);
    /* The path may carry a query string. */
    if (req->path.n < pl || memcmp(req->path.p, S.path, pl) != 0 ||
        (req->path.n > pl && req->path.p[pl] != '?'))
        return 404;
    if (!S.deflate)
        ws->deflate = false;
    if (mfs) {
        /* Frame what we send to this peer to its announced size. */
        unsigned long v = 0;
        for (size_t i = 0; i < mfs->n && v < 0x7FFFFFFF; i++) {
            if (!isdigit((unsigned char)mfs->p[i]))
                return 400;
            v = v * 10 + (unsigned long)(mfs->p[i] - '0');
        }
        if (v < 125 || v > 0x7FFFFFFF)
            return 400;
        ws->tx_max_frame = (uint32_t)v;
    }
    if (srv || boot) {
        pc->pipe = true;
        if (!srv || !boot || !key || srv->n == 0) {
            violation(pc, V_MISSING_HEADERS);
            return 400;
        }
        if (!hex_id(*boot)) {
            violation(pc, V_BAD_BOOT);
            return 400;
        }
        if (key->n != strlen(S.app_key) || memcmp(key->p, S.app_key, key->n) != 0) {
            violation(pc, V_BAD_UPGRADE_KEY);
            return 401;
        }
        pc->server = dup_str(*srv);
        pc->boot = dup_str(*boot);
        if (!pc->server || !pc->boot)
            return 503;
        return 101;
    }
    if (S.no_direct) {
        violation(pc, V_MISSING_HEADERS);
        return 400;
    }
    /* A direct edge: its binds are keyed by this connection. */
    struct bkey *k = calloc(1, sizeof(*k));
    char id[64];
    int n = snprintf(id, sizeof(id), "direct\x1f%" PRIu64, pc->id);
    if (!k || !(k->id = strdup(id)) || !(k->server = strdup("direct")) ||
        !(k->boot = strdup(id + 7)) || hmap_put(&S.keys, id, (size_t)n, k, NULL) != 0) {
        if (k) {
            free(k->id);
            free(k->server);
            free(k->boot);
        }
        free(k);
        return 503;
    }
    emx_list_init(&k->things);
    k->direct = pc;
    pc->direct_key = k;
    return 101;
}

static void on_ws_ping(struct ws_conn *ws, const uint8_t *data, size_t len)
{
    ws_send_control(ws, WS_OP_PONG, data, len);
}

static void on_ws_close(struct ws_conn *ws)
{
    struct pconn *pc = ws->user;
    struct instance *in = pc->in;
    in->ctr.msgs_in += pc->msgs_in;
    in->ctr.msgs_out += pc->msgs_out;
    in->ctr.bytes_in += ws->stats.bytes_in;
    in->ctr.bytes_out += ws->stats.bytes_out;
    emx_list_unlink(&pc->link);
    struct emx_list *pos, *tmp;
    emx_list_for_each_safe(pos, tmp, &pc->delayed)
    {
        struct delayed *d = emx_container_of(pos, struct delayed, link);
        emx_list_unlink(&d->link);
        uv_close((uv_handle_t *)&d->t, delayed_closed);
    }
    emx_list_for_each_safe(pos, tmp, &pc->ctl_reqs)
        ctl_req_done(emx_container_of(pos, struct ctl_req, link), "err connection closed");
    /* A direct edge that goes away loses its binds, as on the platform. */
    if (pc->direct_key)
        key_drop(pc->direct_key);
    ao_reasm_free(&pc->reasm);
    free(pc->server);
    free(pc->boot);
    free(pc);
}

static const struct ws_handlers server_handlers = {
    .on_message = on_ws_message,
    .on_ping = on_ws_ping,
    .on_upgrade = on_ws_upgrade,
    .on_close = on_ws_close,
};

static void on_connection(uv_stream_t *server, int status)
{
    struct instance *in = server->data;
    if (status < 0)
        return;
    struct pconn *pc = calloc(1, sizeof(*pc));
    if (!pc)
        return;
    pc->in = in;
    pc->id = ++S.conn_ids;
    pc->next_rid = 1;
    emx_list_init(&pc->link);
    emx_list_init(&pc->delayed);
    emx_list_init(&pc->ctl_reqs);
    ao_reasm_init(&pc->reasm, S.max_message);
    pc->ws = ws_server_accept(server, &server_handlers, pc);
    if (!pc->ws) {
        free(pc);
        return;
    }
    pc->ws->rx_max_message = S.max_message;
    in->accepted++;
    emx_list_push_back(&in->conns, &pc->link);
    if (in->reading_stopped)
        ws_pause_read(pc->ws, true);
}

/* ---- instances ---- */

static int instance_listen(struct instance *in)
{
    struct sockaddr_storage sa;
    if (uv_ip4_addr(S.bind_addr, in->port, (struct sockaddr_in *)&sa) != 0 &&
        uv_ip6_addr(S.bind_addr, in->port, (struct sockaddr_in6 *)&sa) != 0)
        return UV_EINVAL;
    uv_tcp_init(S.loop, &in->listener);
    in->listener.data = in;
    int rc = uv_tcp_bind(&in->listener, (struct sockaddr *)&sa, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&in->listener, 1024, on_connection);
    if (rc == 0) {
        int l = sizeof(sa);
        uv_tcp_getsockname(&in->listener, (struct sockaddr *)&sa, &l);
        in->port = ntohs(((struct sockaddr_in *)&sa)->sin_port);
        in->listening = true;
    } else {
        uv_close((uv_handle_t *)&in->listener, NULL);
    }
    return rc;
}

static void instance_crash(struct instance *in)
{
    if (in->listening) {
        uv_close((uv_handle_t *)&in->listener, NULL);
        in->listening = false;
    }
    struct emx_list *pos, *tmp;
    emx_list_for_each_safe(pos, tmp, &in->conns)
    {
        struct pconn *pc = emx_container_of(pos, struct pconn, link);
        ws_abort(pc->ws, "instance crashed", true);
    }
}

static void instance_reading(struct instance *in, bool stop)
{
    in->reading_stopped = stop;
    struct emx_list *pos, *tmp;
    emx_list_for_each_safe(pos, tmp, &in->conns)
        ws_pause_read(emx_container_of(pos, struct pconn, link)->ws, stop);
}

/* ---- JSON ---- */

struct jbuf {
    char *p;
    size_t len, cap;
    bool oom;
};

static void jput(struct jbuf *j, const char *s, size_t n)
{
    if (j->oom)
        return;
    if (j->cap - j->len < n + 1) {
        size_t cap = j->cap ? j->cap : 4096;
        while (cap - j->len < n + 1)
            cap *= 2;
        char *p = realloc(j->p, cap);
        if (!p) {
            j->oom = true;
            return;
        }
        j->p = p;
        j->cap = cap;
    }
    memcpy(j->p + j->len, s, n);
    j->len += n;
    j->p[j->len] = '\0';
}

static void jf(struct jbuf *j, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void jf(struct jbuf *j, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n > 0)
        jput(j, buf, (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
}

static void jstr(struct jbuf *j, const char *s, size_t n)
{
    jput(j, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\') {
            char e[2] = {'\\', (char)ch};
            jput(j, e, 2);
        } else if (ch < 0x20 || ch >= 0x7F) {
            jf(j, "\\u%04x", ch);
        } else {
            jput(j, (const char *)&ch, 1);
        }
    }
    jput(j, "\"", 1);
}

static void jcodes(struct jbuf *j, const char *name, const uint64_t *by)
{
    jf(j, "\"%s\":{", name);
    bool first = true;
    for (int c = 0; c < 256; c++) {
        if (!by[c])
            continue;
        jf(j, "%s\"0x%02X\":%" PRIu64, first ? "" : ",", c, by[c]);
        first = false;
    }
    jput(j, "}", 1);
}

static void jkey_fields(struct jbuf *j, const struct bkey *k)
{
    jput(j, "\"server\":", 9);
    jstr(j, k->server, strlen(k->server));
    jput(j, ",\"boot\":", 8);
    jstr(j, k->boot, strlen(k->boot));
    jf(j, ",\"endpoint\":%" PRIu32, k->ep);
}

struct each_ctx {
    struct jbuf *j;
    bool first;
};

static void each_key(void *arg, const char *kk, size_t kl, void *v)
{
    (void)kk, (void)kl;
    struct each_ctx *e = arg;
    const struct bkey *k = v;
    jput(e->j, e->first ? "{" : ",{", e->first ? 1 : 2);
    e->first = false;
    jkey_fields(e->j, k);
    jf(e->j, ",\"binds\":%zu,\"things\":[", k->nthings);
    struct emx_list *pos;
    bool first = true;
    for (pos = k->things.next; pos != &k->things; pos = pos->next) {
        const struct binding *b = emx_container_of(pos, struct binding, link);
        if (!first)
            jput(e->j, ",", 1);
        first = false;
        jstr(e->j, b->thing, strlen(b->thing));
    }
    jput(e->j, "]}", 2);
}

static void each_thing(void *arg, const char *kk, size_t kl, void *v)
{
    (void)kk, (void)kl;
    struct each_ctx *e = arg;
    const struct binding *b = v;
    if (!e->first)
        jput(e->j, ",", 1);
    e->first = false;
    jstr(e->j, b->thing, strlen(b->thing));
    jput(e->j, ":{", 2);
    jkey_fields(e->j, b->key);
    jput(e->j, "}", 1);
}

static void json_binds(struct jbuf *j)
{
    struct each_ctx e = {j, true};
    jput(j, "{\"things\":{", 11);
    hmap_each(&S.things, each_thing, &e);
    jput(j, "},\"keys\":[", 10);
    e.first = true;
    hmap_each(&S.keys, each_key, &e);
    jput(j, "]}", 2);
}

static void json_stats(struct jbuf *j)
{
    uint64_t total_v = 0;
    for (int v = 0; v < V_COUNT; v++)
        total_v += S.violations[v];
    jf(j, "{\"violations\":%" PRIu64 ",\"violations_by_kind\":{", total_v);
    bool first = true;
    for (int v = 0; v < V_COUNT; v++) {
        if (!S.violations[v])
            continue;
        jf(j, "%s\"%s\":%" PRIu64, first ? "" : ",", violation_names[v], S.violations[v]);
        first = false;
    }
    jf(j, "},\"sessions\":%" PRIu32 ",\"auth_refused\":%" PRIu64 ",\"things_bound\":%zu,",
       S.sessions, S.auth_refused, S.things.count);
    jcodes(j, "requests_by_code", S.requests_by_code);
    jput(j, ",", 1);
    jcodes(j, "answers_by_code", S.answers_by_code);
    jput(j, ",", 1);
    jcodes(j, "edge_answers_by_code", S.edge_answers_by_code);
    jf(j,
       ",\"platform_requests\":{\"sent\":%" PRIu64 ",\"answered\":%" PRIu64 ",\"timeouts\":%" PRIu64
       "},\"instances\":[",
       S.ctl_sent, S.ctl_answered, S.ctl_timeouts);
    for (int i = 0; i < S.ninst; i++) {
        struct instance *in = &S.inst[i];
        struct counters t = in->ctr;
        unsigned pipes = 0, edges = 0;
        struct emx_list *pos;
        for (pos = in->conns.next; pos != &in->conns; pos = pos->next) {
            struct pconn *pc = emx_container_of(pos, struct pconn, link);
            t.msgs_in += pc->msgs_in;
            t.msgs_out += pc->msgs_out;
            t.bytes_in += pc->ws->stats.bytes_in;
            t.bytes_out += pc->ws->stats.bytes_out;
            if (pc->authed && pc->pipe)
                pipes++;
            else if (pc->authed)
                edges++;
        }
        jf(j,
           "%s{\"id\":%d,\"port\":%u,\"up\":%s,\"reading\":%s,\"pipes_connected\":%u,"
           "\"direct_edges\":%u,\"accepted\":%" PRIu64 ",\"violations\":%" PRIu64
           ",\"msgs_in\":%" PRIu64 ",\"msgs_out\":%" PRIu64 ",\"bytes_in\":%" PRIu64
           ",\"bytes_out\":%" PRIu64 ",\"pipes\":[",
           i ? "," : "", in->id, in->port, in->listening ? "true" : "false",
           in->reading_stopped ? "false" : "true", pipes, edges, in->accepted, in->violations,
           t.msgs_in, t.msgs_out, t.bytes_in, t.bytes_out);
        bool f = true;
        for (pos = in->conns.next; pos != &in->conns; pos = pos->next) {
            struct pconn *pc = emx_container_of(pos, struct pconn, link);
            if (!pc->pipe)
                continue;
            jf(j, "%s{\"id\":%" PRIu64 ",\"server\":", f ? "" : ",", pc->id);
            f = false;
            jstr(j, pc->server ? pc->server : "", pc->server ? strlen(pc->server) : 0);
            jput(j, ",\"boot\":", 8);
            jstr(j, pc->boot ? pc->boot : "", pc->boot ? strlen(pc->boot) : 0);
            jf(j,
               ",\"connected\":%s,\"msgs_in\":%" PRIu64 ",\"msgs_out\":%" PRIu64
               ",\"bytes_in\":%" PRIu64 ",\"bytes_out\":%" PRIu64 ",\"queued\":%zu"
               ",\"violations\":%" PRIu64 "}",
               pc->authed ? "true" : "false", pc->msgs_in, pc->msgs_out, pc->ws->stats.bytes_in,
               pc->ws->stats.bytes_out, pc->ws->queued, pc->violations);
        }
        jput(j, "]}", 2);
    }
    jput(j, "],\"binds_per_key\":[", 19);
    struct each_ctx e = {j, true};
    hmap_each(&S.keys, each_key, &e);
    jput(j, "]}", 2);
}

/* ---- control channel ---- */

static struct instance *inst_arg(const char *s)
{
    char *end;
    long v = s ? strtol(s, &end, 10) : 0;
    if (!s || *end || v < 1 || v > S.ninst)
        return NULL;
    return &S.inst[v - 1];
}

static void ctl_platform_request(struct ctl_client *cc, uint8_t code, struct instance *in,
                                 const char *thing, const char *prop, const char *value)
{
    struct binding *b = hmap_get(&S.things, thing, strlen(thing));
    if (!b) {
        ctl_reply(cc, "err not bound: %s", thing);
        return;
    }
    struct bkey *k = b->key;
    struct pconn *target = NULL;
    if (k->direct) {
        target = k->direct;
    } else {
        struct emx_list *pos;
        for (pos = in->conns.next; pos != &in->conns; pos = pos->next) {
            struct pconn *pc = emx_container_of(pos, struct pconn, link);
            if (pc->pipe && pc->authed && pc->ws->state == WS_OPEN &&
                strcmp(pc->server, k->server) == 0 && strcmp(pc->boot, k->boot) == 0) {
                target = pc;
                break;
            }
        }
    }
    if (!target) {
        ctl_reply(cc, "err no pipe on instance %d for %s", in->id, thing);
        return;
    }
    uint8_t *params = NULL;
    size_t plen = 0;
    if (value) {
        size_t vl = strlen(value), cap = ao_infotable_blob_size(prop, vl);
        params = malloc(cap);
        if (!params) {
            ctl_reply(cc, "err out of memory");
            return;
        }
        plen = ao_infotable_blob(params, cap, prop, (const uint8_t *)value, vl);
    }
    size_t tl = strlen(thing), nl = strlen(prop);
    size_t blen = 1 + emx_ao_str_size(tl) + 1 + emx_ao_str_size(nl) + 2 + plen;
    uint8_t *body = malloc(blen);
    struct ctl_req *r = calloc(1, sizeof(*r));
    if (!body || !r) {
        free(body);
        free(r);
        free(params);
        ctl_reply(cc, "err out of memory");
        return;
    }
    size_t p = 0;
    body[p++] = 0x0A; /* THING */
    p += emx_ao_write_str(body + p, blen - p, thing, tl);
    body[p++] = 1; /* PROPERTIES */
    p += emx_ao_write_str(body + p, blen - p, prop, nl);
    body[p++] = 0;
    if (params) {
        body[p++] = EMX_BT_INFOTABLE;
        memcpy(body + p, params, plen);
        p += plen;
    } else {
        body[p++] = EMX_BT_NOTHING;
    }
    free(params);
    r->client = cc;
    cc->refs++;
    r->rid = target->next_rid++;
    r->ep = k->ep;
    r->deadline = uv_now(S.loop) + CTL_TIMEOUT_MS;
    emx_list_push_back(&target->ctl_reqs, &r->link);
    struct emx_ao_header h = {.version = EMX_AO_VERSION,
                              .code = code,
                              .request_id = r->rid,
                              .endpoint_id = k->ep,
                              .session_id = k->session};
    S.ctl_sent++;
    ao_emit(&h, 0x0A, thing, body, p, S.chunk_size, send_cb, target);
    free(body);
}

/* Test hook: send something a conformant server never sends to the
 * connection that holds `thing`, to check an edge client's strictness. */
static void ctl_misbehave(struct ctl_client *cc, const char *thing, const char *kind)
{
    struct binding *b = hmap_get(&S.things, thing, strlen(thing));
    struct pconn *pc = b ? b->key->direct : NULL;
    if (!pc || pc->ws->state != WS_OPEN) {
        ctl_reply(cc, "err no direct edge holds %s", thing);
        return;
    }
    struct ws_conn *ws = pc->ws;
    if (strcmp(kind, "ping") == 0) {
        ws_send_control(ws, WS_OP_PING, "srv", 3);
    } else if (strcmp(kind, "text") == 0) {
        uint8_t f[] = {0x81, 2, 'h', 'i'};
        ws_write_raw(ws, f, sizeof(f));
    } else if (strcmp(kind, "badheader") == 0) {
        uint8_t f[] = {0x82, 5, 1, 0x40, 0, 0, 0};
        ws_write_raw(ws, f, sizeof(f));
    } else if (strcmp(kind, "len64") == 0) {
        uint8_t f[10 + 200] = {0x82, 127, 0, 0, 0, 0, 0, 0, 0, 200};
        ws_write_raw(ws, f, sizeof(f));
    } else if (strcmp(kind, "oversize") == 0) {
        size_t n = (ws->tx_max_frame ? ws->tx_max_frame : 8192) + 1;
        uint8_t *f = calloc(1, n + 10);
        if (!f) {
            ctl_reply(cc, "err out of memory");
            return;
        }
        f[0] = 0x82;
        size_t h = 2;
        if (n <= 0xFFFF) {
            f[1] = 126;
            f[2] = (uint8_t)(n >> 8);
            f[3] = (uint8_t)n;
            h = 4;
        } else {
            f[1] = 127;
            for (int i = 0; i < 8; i++)
                f[2 + i] = (uint8_t)((uint64_t)n >> (56 - 8 * i));
            h = 10;
        }
        ws_write_raw(ws, f, h + n);
        free(f);
    } else {
        ctl_reply(cc, "err unknown kind %s", kind);
        return;
    }
    ctl_reply(cc, "ok");
}

static void shutdown_all(void);
static void ctl_closed(uv_handle_t *h);

static void ctl_command(struct ctl_client *cc, char *line)
{
    char *argv[6] = {0};
    int argc = 0;
    char *save = NULL;
    for (char *t = strtok_r(line, " \t\r", &save); t && argc < 6;
         t = strtok_r(NULL, " \t\r", &save))
        argv[argc++] = t;
    if (argc == 0)
        return;
    const char *cmd = argv[0];
    struct instance *in = argc > 1 ? inst_arg(argv[1]) : NULL;
    if (strcmp(cmd, "stats") == 0 || strcmp(cmd, "binds") == 0) {
        struct jbuf j = {0};
        if (cmd[0] == 's')
            json_stats(&j);
        else
            json_binds(&j);
        jput(&j, "\n", 1);
        if (j.oom)
            ctl_reply(cc, "err out of memory");
        else
            ctl_write(cc, j.p, j.len);
        free(j.p);
    } else if (strcmp(cmd, "ports") == 0) {
        char buf[MAX_INSTANCES * 7 + 8];
        size_t n = 0;
        for (int i = 0; i < S.ninst; i++)
            n += (size_t)snprintf(buf + n, sizeof(buf) - n, "%s%u", i ? "," : "", S.inst[i].port);
        ctl_reply(cc, "ports %s", buf);
    } else if (strcmp(cmd, "misbehave") == 0 && argc == 3) {
        ctl_misbehave(cc, argv[1], argv[2]);
    } else if (strcmp(cmd, "shutdown") == 0) {
        ctl_reply(cc, "ok");
        shutdown_all();
    } else if (!in) {
        ctl_reply(cc, "err unknown command or bad instance");
    } else if (strcmp(cmd, "crash") == 0) {
        instance_crash(in);
        ctl_reply(cc, "ok");
    } else if (strcmp(cmd, "restore") == 0) {
        int rc = in->listening ? 0 : instance_listen(in);
        if (rc == 0)
            ctl_reply(cc, "ok");
        else
            ctl_reply(cc, "err %s", uv_strerror(rc));
    } else if (strcmp(cmd, "stop-reading") == 0 || strcmp(cmd, "resume-reading") == 0) {
        instance_reading(in, cmd[0] == 's');
        ctl_reply(cc, "ok");
    } else if (strcmp(cmd, "get") == 0 && argc == 4) {
        ctl_platform_request(cc, EMX_AO_GET, in, argv[2], argv[3], NULL);
    } else if (strcmp(cmd, "put") == 0 && argc == 5) {
        ctl_platform_request(cc, EMX_AO_PUT, in, argv[2], argv[3], argv[4]);
    } else {
        ctl_reply(cc, "err unknown command");
    }
}

static void ctl_closed(uv_handle_t *h)
{
    struct ctl_client *cc = h->data;
    cc->closed = true;
    emx_list_unlink(&cc->link);
    if (cc->refs == 0)
        free(cc);
}

static void ctl_client_unref(struct ctl_client *cc)
{
    if (--cc->refs == 0 && cc->closed)
        free(cc);
}

static void ctl_alloc(uv_handle_t *h, size_t sz, uv_buf_t *buf)
{
    (void)sz;
    struct ctl_client *cc = h->data;
    *buf = uv_buf_init(cc->line + cc->len, (unsigned)(sizeof(cc->line) - 1 - cc->len));
}

static void ctl_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    (void)buf;
    struct ctl_client *cc = s->data;
    if (nread < 0 || (nread == 0 && cc->len == sizeof(cc->line) - 1)) {
        cc->closing = true;
        uv_close((uv_handle_t *)s, ctl_closed);
        return;
    }
    cc->len += (size_t)nread;
    char *nl;
    while (!cc->closing && (nl = memchr(cc->line, '\n', cc->len))) {
        *nl = '\0';
        size_t used = (size_t)(nl - cc->line) + 1;
        char cmd[sizeof(cc->line)];
        memcpy(cmd, cc->line, used);
        memmove(cc->line, nl + 1, cc->len - used);
        cc->len -= used;
        ctl_command(cc, cmd);
    }
    if (cc->len == sizeof(cc->line) - 1) {
        ctl_reply(cc, "err line too long");
        cc->len = 0;
    }
}

static void ctl_on_connection(uv_stream_t *server, int status)
{
    if (status < 0)
        return;
    struct ctl_client *cc = calloc(1, sizeof(*cc));
    if (!cc)
        return;
    if (server->type == UV_TCP)
        uv_tcp_init(S.loop, &cc->h.tcp);
    else
        uv_pipe_init(S.loop, &cc->h.pipe, 0);
    cc->s = (uv_stream_t *)&cc->h;
    cc->s->data = cc;
    emx_list_push_back(&S.ctl_clients, &cc->link);
    if (uv_accept(server, cc->s) != 0) {
        cc->closing = true;
        uv_close((uv_handle_t *)cc->s, ctl_closed);
        return;
    }
    uv_read_start(cc->s, ctl_alloc, ctl_read);
}

static int ctl_listen(const char *spec, char *desc, size_t dlen)
{
    int rc;
    if (strchr(spec, '/')) {
        uv_pipe_init(S.loop, &S.ctl_h.pipe, 0);
        S.ctl_server = (uv_stream_t *)&S.ctl_h.pipe;
        remove(spec);
        rc = uv_pipe_bind(&S.ctl_h.pipe, spec);
        snprintf(desc, dlen, "%s", spec);
    } else {
        char *end;
        long port = strtol(spec, &end, 10);
        if (*end || port < 0 || port > 65535)
            return UV_EINVAL;
        struct sockaddr_in sa;
        uv_ip4_addr("127.0.0.1", (int)port, &sa);
        uv_tcp_init(S.loop, &S.ctl_h.tcp);
        S.ctl_server = (uv_stream_t *)&S.ctl_h.tcp;
        rc = uv_tcp_bind(&S.ctl_h.tcp, (struct sockaddr *)&sa, 0);
        int l = sizeof(sa);
        if (rc == 0)
            rc = uv_tcp_getsockname(&S.ctl_h.tcp, (struct sockaddr *)&sa, &l);
        snprintf(desc, dlen, "%u", ntohs(sa.sin_port));
    }
    if (rc == 0)
        rc = uv_listen(S.ctl_server, 16, ctl_on_connection);
    return rc;
}

/* Platform→edge requests the edge never answered. */
static void on_sweep(uv_timer_t *t)
{
    (void)t;
    uint64_t now = uv_now(S.loop);
    for (int i = 0; i < S.ninst; i++) {
        struct emx_list *pos;
        for (pos = S.inst[i].conns.next; pos != &S.inst[i].conns; pos = pos->next) {
            struct pconn *pc = emx_container_of(pos, struct pconn, link);
            struct emx_list *rp, *rt;
            emx_list_for_each_safe(rp, rt, &pc->ctl_reqs)
            {
                struct ctl_req *r = emx_container_of(rp, struct ctl_req, link);
                if (r->deadline <= now) {
                    S.ctl_timeouts++;
                    ctl_req_done(r, "err timeout");
                }
            }
        }
    }
}

static void close_walk(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void shutdown_all(void)
{
    for (int i = 0; i < S.ninst; i++)
        instance_crash(&S.inst[i]);
    struct emx_list *pos, *tmp;
    emx_list_for_each_safe(pos, tmp, &S.ctl_clients)
    {
        struct ctl_client *cc = emx_container_of(pos, struct ctl_client, link);
        if (!cc->closing) {
            cc->closing = true;
            uv_close((uv_handle_t *)cc->s, ctl_closed);
        }
    }
    uv_stop(S.loop);
}

static void on_signal(uv_signal_t *s, int sig)
{
    (void)s, (void)sig;
    shutdown_all();
}

/* ---- main ---- */

static void usage(FILE *f)
{
    fprintf(f, "usage: platform-sim [options]\n"
               "  --instances N        instances served by this process (default 1)\n"
               "  --port P             first port; instance i listens on P+i-1 (0: ephemeral)\n"
               "  --listen P1,P2,...   explicit ports, one per instance\n"
               "  --bind ADDR          listen address (default 0.0.0.0)\n"
               "  --app-key KEY | --app-key-file FILE   the key pipes and edges must present\n"
               "  --path PATH          WebSocket path (default /Thingworx/WS)\n"
               "  --latency MS         delay every request's answer\n"
               "  --response-size B    answers carry B bytes (default: echo the params);\n"
               "                       a request named Bytes_N gets N bytes either way\n"
               "  --chunk-size B       multipart chunk size of answers (default 8192)\n"
               "  --max-message B      largest message accepted (default 64 MiB)\n"
               "  --deflate            accept permessage-deflate\n"
               "  --no-direct          refuse edges without the X-Edgemux headers\n"
               "  --any-session        accept any sessionId but 0 and 0xFFFFFFFF (several\n"
               "                       processes standing for one cluster)\n"
               "  --control PORT|PATH  control channel on 127.0.0.1:PORT or a UNIX socket\n"
               "  --quiet              no log lines for contract violations\n"
               "Control commands: crash N, restore N, stop-reading N, resume-reading N,\n"
               "  get N THING PROP, put N THING PROP VALUE, stats, binds, ports,\n"
               "  misbehave THING ping|text|badheader|len64|oversize (direct edges), shutdown\n"
               "Prints 'platform-sim ready control=C ports=P1,...' once listening.\n");
}

static int read_key_file(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    char buf[1024];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    while (n && isspace((unsigned char)buf[n - 1]))
        buf[--n] = '\0';
    if (n == 0)
        return -1;
    free(S.app_key);
    S.app_key = strdup(buf);
    return S.app_key ? 0 : -1;
}

static bool parse_u32(const char *s, uint32_t *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || *end || end == s || v > UINT32_MAX)
        return false;
    *out = (uint32_t)v;
    return true;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {{"instances", required_argument, NULL, 'n'},
                                         {"port", required_argument, NULL, 'p'},
                                         {"listen", required_argument, NULL, 'l'},
                                         {"bind", required_argument, NULL, 'b'},
                                         {"app-key", required_argument, NULL, 'k'},
                                         {"app-key-file", required_argument, NULL, 'K'},
                                         {"path", required_argument, NULL, 'P'},
                                         {"latency", required_argument, NULL, 'L'},
                                         {"response-size", required_argument, NULL, 'r'},
                                         {"chunk-size", required_argument, NULL, 'c'},
                                         {"max-message", required_argument, NULL, 'm'},
                                         {"deflate", no_argument, NULL, 'd'},
                                         {"no-direct", no_argument, NULL, 'D'},
                                         {"any-session", no_argument, NULL, 'A'},
                                         {"control", required_argument, NULL, 'C'},
                                         {"quiet", no_argument, NULL, 'q'},
                                         {"help", no_argument, NULL, 'h'},
                                         {0, 0, 0, 0}};
    uint32_t ninst = 1, port = 9001, u;
    const char *listen_list = NULL, *control = NULL;
    S.path = "/Thingworx/WS";
    S.bind_addr = "0.0.0.0";
    S.chunk_size = 8192;
    S.max_message = 64u * 1024 * 1024;
    int o;
    while ((o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        bool ok = true;
        switch (o) {
        case 'n':
            ok = parse_u32(optarg, &ninst) && ninst >= 1 && ninst <= MAX_INSTANCES;
            break;
        case 'p':
            ok = parse_u32(optarg, &port) && port <= 65535;
            break;
        case 'l':
            listen_list = optarg;
            break;
        case 'b':
            S.bind_addr = optarg;
            break;
        case 'k':
            free(S.app_key);
            S.app_key = strdup(optarg);
            break;
        case 'K':
            ok = read_key_file(optarg) == 0;
            break;
        case 'P':
            S.path = optarg;
            ok = optarg[0] == '/';
            break;
        case 'L':
            ok = parse_u32(optarg, &S.latency_ms);
            break;
        case 'r':
            ok = parse_u32(optarg, &S.response_size) && S.response_size <= 0x7FFFFFFF;
            break;
        case 'c':
            ok = parse_u32(optarg, &S.chunk_size) && S.chunk_size >= 64 && S.chunk_size <= 0xFFFF;
            break;
        case 'm':
            ok = parse_u32(optarg, &u) && u >= 1024;
            S.max_message = u;
            break;
        case 'd':
            S.deflate = true;
            break;
        case 'D':
            S.no_direct = true;
            break;
        case 'A':
            S.any_session = true;
            break;
        case 'C':
            control = optarg;
            break;
        case 'q':
            S.quiet = true;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
        if (!ok) {
            fprintf(stderr, "platform-sim: bad value: %s\n", optarg ? optarg : "");
            return 2;
        }
    }
    if (!S.app_key) {
        fprintf(stderr, "platform-sim: --app-key or --app-key-file is required\n");
        return 2;
    }
    /* A peer that went away must cost a write error (EPIPE), not the
     * process: libuv writes to sockets with write(2). */
    signal(SIGPIPE, SIG_IGN);
    S.loop = uv_default_loop();
    emx_list_init(&S.ctl_clients);
    hmap_init(&S.keys);
    hmap_init(&S.things);
    if (uv_random(NULL, NULL, &S.session_base, sizeof(S.session_base), 0, NULL) != 0)
        S.session_base = (uint32_t)uv_hrtime();
    S.session_base &= 0x7FFFFFFF; /* far from 0xFFFFFFFF */
    if (listen_list) {
        char *copy = strdup(listen_list), *save = NULL;
        ninst = 0;
        for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
            if (ninst == MAX_INSTANCES || !parse_u32(t, &u) || u > 65535) {
                fprintf(stderr, "platform-sim: bad --listen list\n");
                free(copy);
                return 2;
            }
            S.inst[ninst++].port = (uint16_t)u;
        }
        free(copy);
        if (ninst == 0)
            return 2;
    } else {
        for (uint32_t i = 0; i < ninst; i++)
            S.inst[i].port = port ? (uint16_t)(port + i) : 0;
    }
    S.ninst = (int)ninst;
    for (int i = 0; i < S.ninst; i++) {
        S.inst[i].id = i + 1;
        emx_list_init(&S.inst[i].conns);
        int rc = instance_listen(&S.inst[i]);
        if (rc != 0) {
            fprintf(stderr, "platform-sim: instance %d: listen on %s:%u: %s\n", i + 1, S.bind_addr,
                    S.inst[i].port, uv_strerror(rc));
            return 1;
        }
    }
    char cdesc[256] = "none";
    if (control) {
        int rc = ctl_listen(control, cdesc, sizeof(cdesc));
        if (rc != 0) {
            fprintf(stderr, "platform-sim: control %s: %s\n", control, uv_strerror(rc));
            return 1;
        }
    }
    uv_timer_init(S.loop, &S.sweep);
    uv_timer_start(&S.sweep, on_sweep, 500, 500);
    uv_signal_init(S.loop, &S.sigint);
    uv_signal_start(&S.sigint, on_signal, SIGINT);
    uv_signal_init(S.loop, &S.sigterm);
    uv_signal_start(&S.sigterm, on_signal, SIGTERM);
    printf("platform-sim ready control=%s ports=", cdesc);
    for (int i = 0; i < S.ninst; i++)
        printf("%s%u", i ? "," : "", S.inst[i].port);
    printf("\n");
    fflush(stdout);
    uv_run(S.loop, UV_RUN_DEFAULT);
    /* Close what is left and let the close callbacks run. */
    uv_walk(S.loop, close_walk, NULL);
    uv_run(S.loop, UV_RUN_DEFAULT);
    uv_loop_close(S.loop);
    ws_thread_cleanup();
    free(S.app_key);
    return 0;
}
