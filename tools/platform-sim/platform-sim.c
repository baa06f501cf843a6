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
#include "b64.h"
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
    V_TUNNEL_BINARY,     /* a binary message on a tunnel's device socket */
    V_TUNNEL_BAD_BASE64, /* a tunnel text message that is not base64 */
    V_WORKER_MISMATCH,   /* endpointId's top 4 bits are not the worker of "name/index" */
    V_COUNT
};
static const char *const violation_names[V_COUNT] = {
    "missing_pipe_headers", "bad_boot_id",       "bad_upgrade_app_key",
    "message_before_auth",  "bad_auth",          "text_frame",
    "bad_header",           "bad_body",          "bad_multipart",
    "endpoint_zero",        "unknown_session",   "unknown_code",
    "keepalive_forwarded",  "unexpected_answer", "wrong_endpoint",
    "tunnel_binary_message", "tunnel_bad_base64", "worker_mismatch"};

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
    int worker; /* "name/index" in X-Edgemux-Server: index; -1: no worker suffix */
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

struct tunnel;
enum ctl_req_kind { CR_PLAIN = 0, CR_START, CR_TUNNEL };

struct ctl_req {
    struct emx_list link; /* in pconn.ctl_reqs */
    struct ctl_client *client;
    uint32_t rid, ep;
    uint64_t deadline;
    uint8_t kind;       /* enum ctl_req_kind */
    struct tunnel *tun; /* CR_START: the tunnel it starts */
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

static int tunnel_upgrade(struct pconn *pc, struct ws_conn *ws, const struct ws_http *req,
                          bool client, const char *tid, size_t tl);
static void tunnel_command_from_edge(const struct emx_ao_tunnel_msg *m);
static void tunnel_instance_crash(struct instance *in);
static void tunnel_req_done(struct ctl_req *r, int code, const char *err);
static bool parse_u32(const char *s, uint32_t *out);

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
        if (r->kind != CR_PLAIN)
            tunnel_req_done(r, h->code, NULL);
        else
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
    if (pc->pipe && pc->worker >= 0 && (h.endpoint_id >> 28) != (uint32_t)pc->worker)
        violation(pc, V_WORKER_MISMATCH); /* counted; the request is served */
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
        if (h.code == EMX_AO_POST && rq.characteristic == EMX_AO_CHARACTERISTIC_SERVICES &&
            emx_ao_str_eq(rq.name, "TunnelCommandFromEdge")) {
            struct emx_ao_tunnel_msg tm;
            if (emx_ao_tunnel_parse(body, blen, &tm) != EMX_AO_OK ||
                tm.service != EMX_AO_TUNNEL_COMMAND_FROM) {
                violation(pc, V_BAD_BODY);
                send_simple(pc, EMX_AO_BAD_REQUEST, &h, h.session_id, "bad tunnel command");
                return;
            }
            send_simple(pc, EMX_AO_SUCCESS, &h, h.session_id, NULL);
            tunnel_command_from_edge(&tm);
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
    static const char tsrv[] = "/Thingworx/WSTunnelServer/", tcli[] = "/Thingworx/WSTunnelClient/";
    size_t sl = sizeof(tsrv) - 1;
    if (req->path.n >= sl &&
        (memcmp(req->path.p, tsrv, sl) == 0 || memcmp(req->path.p, tcli, sl) == 0))
        return tunnel_upgrade(pc, ws, req, req->path.p[sl - 7] == 'C', req->path.p + sl,
                              req->path.n - sl);
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
        /* docs/protocol.md: with server.workers > 1 the identity is
         * "name/index" and every endpointId on the pipe carries the index
         * in its top 4 bits */
        pc->worker = -1;
        const char *slash = strrchr(pc->server, '/');
        if (slash && slash[1] && strlen(slash + 1) <= 2 &&
            strspn(slash + 1, "0123456789") == strlen(slash + 1) && atoi(slash + 1) < 16)
            pc->worker = atoi(slash + 1);
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
    {
        struct ctl_req *r = emx_container_of(pos, struct ctl_req, link);
        if (r->kind != CR_PLAIN)
            tunnel_req_done(r, 0, "err connection closed");
        else
            ctl_req_done(r, "err connection closed");
    }
    /* A direct edge that goes away loses its binds, as on the platform. */
    if (pc->direct_key)
        key_drop(pc->direct_key);
    ao_reasm_free(&pc->reasm);
    free(pc->server);
    free(pc->boot);
    free(pc);
}

/* A connection that became a tunnel socket is no longer a pconn. */
static void pconn_release(struct pconn *pc)
{
    emx_list_unlink(&pc->link);
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
    tunnel_instance_crash(in);
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

/* ---- Remote Access tunnels (TUNNELS.md) ----
 *
 * `tunnel` creates an endpoint for a tid on one instance (the owner), opens
 * a local TCP listener that stands for the Remote Access client (RAC) and
 * sends StartTunnel down a pipe of that instance. The device's socket
 * /Thingworx/WSTunnelServer/<tid> is accepted on the owner only; a RAC
 * attaches by TCP to the listener (or as /Thingworx/WSTunnelClient/<tid>),
 * and the sim relays: RAC bytes -> base64 text messages to the device,
 * the device's text messages -> decoded bytes to the RAC. Records are kept
 * after a tunnel ends so `tunnels` can report them. */

#define TUN_HIGH_MARK     (256u * 1024)      /* pause the source above this queue */
#define TUN_PENDING_MAX   (4u * 1024 * 1024) /* device messages kept while no RAC is attached */
#define TUN_RELAY_DELAY   50                 /* ms between the 101 and the first data */
#define TUN_CANCEL_GRACE  500                /* ms a cancelled device socket may close itself */
#define TUN_MAX_CHUNKSIZE (1u << 20)

enum tun_state { TS_STARTING, TS_READY, TS_OPEN, TS_CLOSED, TS_REFUSED };
static const char *const tun_state_names[] = {"starting", "ready", "open", "closed", "refused"};

enum tun_timer { TT_NONE, TT_RELAY_START, TT_CANCEL_GRACE };

struct rac {
    uv_tcp_t tcp;
    struct tunnel *t; /* NULL once detached */
    uint8_t *buf;     /* one read: at most chunksize bytes */
    size_t cap;
    bool reading;
};

struct rac_write {
    uv_write_t req;
    struct rac *r;
    uint8_t data[];
};

struct tunnel {
    struct emx_list link; /* S.tunnels, oldest first */
    char *tid, *thing, *host;
    struct instance *owner;
    uint16_t port;
    uint32_t chunksize, idle_ms;
    int32_t num_connects;
    uint8_t state, answer, timer_mode;
    bool active; /* upgrades for its tid are accepted */
    bool relay_ready, listening, glue;
    uv_tcp_t listener;
    uint16_t rac_port;
    uv_timer_t timer;
    struct rac *rac;
    struct ws_conn *dev, *client;
    /* Device messages that came while nothing was attached: op(1) len(4) bytes. */
    uint8_t *pend;
    size_t pend_len, pend_cap;
    /* Statistics. */
    uint64_t to_dev_raw, to_dev_msgs, from_dev_raw, from_dev_msgs;
    uint64_t dev_wire_in, dev_wire_out; /* of device sockets already closed */
    uint32_t max_frame_to_dev;
    uint64_t upgrades, wrong_instance, bad_key, conflicts, cancels, disconnects;
    uint64_t rac_conns, rac_refused, client_conns, binary_from_dev, bad_base64_from_dev;
    uint16_t close_code;
    char close_reason[124];
    const char *close_why;
    bool xff_present;
    char *xff, *user_agent, *cookie;
    uint32_t max_frame_size;
};

static struct {
    struct emx_list list;
    struct hmap by_tid; /* tid -> newest tunnel with that tid */
    uint64_t count, unknown_tid, wrong_instance, bad_key, conflicts;
    uint64_t cancels, disconnects, commands_unknown_tid, commands_other;
    bool glue; /* test hook: tunnels created now glue a data frame to their 101 */
} T;

static const struct ws_handlers tun_dev_handlers, tun_client_handlers;
static void tun_flow(struct tunnel *t);
static void tun_dev_message(struct tunnel *t, int op, const uint8_t *data, size_t len);

static struct tunnel *tun_find(const char *tid, size_t n)
{
    return hmap_get(&T.by_tid, tid, n);
}

static void tun_deactivate(struct tunnel *t, enum tun_state st)
{
    t->active = false;
    if (t->state != TS_CLOSED && t->state != TS_REFUSED)
        t->state = (uint8_t)st;
    if (t->listening) {
        uv_close((uv_handle_t *)&t->listener, NULL);
        t->listening = false;
    }
    if (t->state == TS_CLOSED || t->state == TS_REFUSED) {
        free(t->pend);
        t->pend = NULL;
        t->pend_len = t->pend_cap = 0;
    }
}

/* ---- the RAC side (TCP) ---- */

static void rac_closed(uv_handle_t *h)
{
    struct rac *r = h->data;
    free(r->buf);
    free(r);
}

static void rac_detach(struct tunnel *t)
{
    struct rac *r = t->rac;
    if (!r)
        return;
    t->rac = NULL;
    r->t = NULL;
    if (!uv_is_closing((uv_handle_t *)&r->tcp))
        uv_close((uv_handle_t *)&r->tcp, rac_closed);
}

static void rac_shutdown_done(uv_shutdown_t *req, int status)
{
    (void)status;
    struct rac *r = req->data;
    free(req);
    if (!uv_is_closing((uv_handle_t *)&r->tcp))
        uv_close((uv_handle_t *)&r->tcp, rac_closed);
}

/* Detach the RAC and close it once what it was sent is written. */
static void rac_finish(struct tunnel *t)
{
    struct rac *r = t->rac;
    if (!r)
        return;
    t->rac = NULL;
    r->t = NULL;
    uv_read_stop((uv_stream_t *)&r->tcp);
    uv_shutdown_t *req = malloc(sizeof(*req));
    if (req) {
        req->data = r;
        if (uv_shutdown(req, (uv_stream_t *)&r->tcp, rac_shutdown_done) == 0)
            return;
        free(req);
    }
    if (!uv_is_closing((uv_handle_t *)&r->tcp))
        uv_close((uv_handle_t *)&r->tcp, rac_closed);
}

static void rac_written(uv_write_t *req, int status)
{
    struct rac_write *w = (struct rac_write *)req;
    struct rac *r = w->r;
    free(w);
    if (r->t) {
        if (status < 0) {
            struct tunnel *t = r->t;
            rac_detach(t);
            if (t->dev)
                ws_close(t->dev, 1000, "Normal Close");
            return;
        }
        tun_flow(r->t);
    }
}

static int rac_write(struct rac *r, const uint8_t *p, size_t n)
{
    struct rac_write *w = malloc(sizeof(*w) + n);
    if (!w)
        return -1;
    w->r = r;
    memcpy(w->data, p, n);
    uv_buf_t b = uv_buf_init((char *)w->data, (unsigned)n);
    if (uv_write(&w->req, (uv_stream_t *)&r->tcp, &b, 1, rac_written) != 0) {
        free(w);
        return -1;
    }
    return 0;
}

static void rac_alloc(uv_handle_t *h, size_t sz, uv_buf_t *buf)
{
    (void)sz;
    struct rac *r = h->data;
    *buf = uv_buf_init((char *)r->buf, (unsigned)r->cap);
}

static void tun_note_sent(struct tunnel *t, size_t msg_len)
{
    uint32_t mf = t->dev->tx_max_frame;
    size_t frame = mf && msg_len > mf ? mf : msg_len;
    if (frame > t->max_frame_to_dev)
        t->max_frame_to_dev = (uint32_t)frame;
}

static void rac_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    (void)buf;
    struct rac *r = s->data;
    struct tunnel *t = r->t;
    if (nread == 0 || !t)
        return;
    if (nread < 0) {
        /* The RAC went away: the tunnel ends as a platform would end it. */
        rac_detach(t);
        if (t->dev)
            ws_close(t->dev, 1000, "Normal Close");
        return;
    }
    if (!t->dev || t->dev->state != WS_OPEN)
        return;
    /* One base64 text message per read of at most chunksize bytes. */
    size_t el = b64_encoded_len((size_t)nread);
    char *enc = malloc(el);
    if (!enc) {
        rac_detach(t);
        ws_close(t->dev, 1011, "out of memory");
        return;
    }
    b64_encode(r->buf, (size_t)nread, enc);
    t->to_dev_raw += (uint64_t)nread;
    t->to_dev_msgs++;
    tun_note_sent(t, el);
    ws_send(t->dev, WS_OP_TEXT, enc, el);
    free(enc);
    if (t->rac == r)
        tun_flow(t);
}

static void rac_on_connection(uv_stream_t *server, int status)
{
    struct tunnel *t = server->data;
    if (status < 0)
        return;
    struct rac *r = calloc(1, sizeof(*r));
    if (!r)
        return;
    uv_tcp_init(S.loop, &r->tcp);
    r->tcp.data = r;
    if (uv_accept(server, (uv_stream_t *)&r->tcp) != 0) {
        uv_close((uv_handle_t *)&r->tcp, rac_closed);
        return;
    }
    r->cap = t->chunksize;
    r->buf = malloc(r->cap);
    if (!r->buf || t->rac || t->client || t->state == TS_CLOSED || t->state == TS_REFUSED) {
        t->rac_refused++;
        uv_close((uv_handle_t *)&r->tcp, rac_closed);
        return;
    }
    uv_tcp_nodelay(&r->tcp, 1);
    r->t = t;
    t->rac = r;
    t->rac_conns++;
    tun_flow(t);
}

/* Replay device messages kept while nothing was attached. */
static void tun_flush_pending(struct tunnel *t)
{
    if (!t->pend_len)
        return;
    uint8_t *p = t->pend;
    size_t n = t->pend_len;
    t->pend = NULL;
    t->pend_len = t->pend_cap = 0;
    for (size_t i = 0; i + 5 <= n;) {
        uint32_t l = emx_ao_get_u32(p + i + 1);
        tun_dev_message(t, p[i], p + i + 5, l);
        i += 5 + l;
    }
    free(p);
}

/* Who reads what: the RAC (or client socket) while the device socket takes
 * its bytes, the device while its consumer does. */
static void tun_flow(struct tunnel *t)
{
    bool dev_open = t->dev && t->dev->state == WS_OPEN;
    if (dev_open && (t->rac || t->client) && t->pend_len)
        tun_flush_pending(t);
    dev_open = t->dev && t->dev->state == WS_OPEN;
    bool dev_takes = dev_open && t->relay_ready && t->dev->queued < TUN_HIGH_MARK;
    if (t->rac) {
        bool want = dev_takes;
        if (want != t->rac->reading) {
            t->rac->reading = want;
            if (want)
                uv_read_start((uv_stream_t *)&t->rac->tcp, rac_alloc, rac_read);
            else
                uv_read_stop((uv_stream_t *)&t->rac->tcp);
        }
    }
    if (t->client && t->client->state == WS_OPEN)
        ws_pause_read(t->client, !dev_takes);
    if (dev_open) {
        bool read_dev;
        if (t->rac)
            read_dev = uv_stream_get_write_queue_size((uv_stream_t *)&t->rac->tcp) < TUN_HIGH_MARK;
        else if (t->client)
            read_dev = t->client->state == WS_OPEN && t->client->queued < TUN_HIGH_MARK;
        else
            read_dev = t->pend_len < TUN_PENDING_MAX;
        ws_pause_read(t->dev, !read_dev);
    }
}

/* ---- the device side ---- */

static void tun_dev_message(struct tunnel *t, int op, const uint8_t *data, size_t len)
{
    if (!t->rac && !(t->client && t->client->state == WS_OPEN)) {
        /* Nothing attached yet: keep it (bounded; tun_flow stops reading). */
        if (len > UINT32_MAX || t->state == TS_CLOSED || t->state == TS_REFUSED)
            return;
        size_t need = t->pend_len + 5 + len;
        if (need > t->pend_cap) {
            size_t cap = t->pend_cap ? t->pend_cap : 65536;
            while (cap < need)
                cap *= 2;
            uint8_t *p = realloc(t->pend, cap);
            if (!p)
                return;
            t->pend = p;
            t->pend_cap = cap;
        }
        t->pend[t->pend_len] = (uint8_t)op;
        emx_ao_put_u32(t->pend + t->pend_len + 1, (uint32_t)len);
        memcpy(t->pend + t->pend_len + 5, data, len);
        t->pend_len = need;
        return;
    }
    t->from_dev_msgs++;
    if (op != WS_OP_TEXT) {
        /* The SDK sends text only; a relay that re-typed a message is wrong. */
        t->binary_from_dev++;
        violation(NULL, V_TUNNEL_BINARY);
        if (t->client)
            ws_send(t->client, op, data, len);
        return;
    }
    if (t->client) {
        long n = b64_decoded_len((const char *)data, len);
        if (n < 0)
            t->bad_base64_from_dev++;
        else
            t->from_dev_raw += (uint64_t)n;
        ws_send(t->client, op, data, len);
        return;
    }
    uint8_t *out = malloc(b64_decoded_max(len) + 1);
    long n = out ? b64_decode((const char *)data, len, out) : -1;
    if (n < 0) {
        t->bad_base64_from_dev++;
        violation(NULL, V_TUNNEL_BAD_BASE64);
    } else if (n > 0) {
        t->from_dev_raw += (uint64_t)n;
        if (rac_write(t->rac, out, (size_t)n) != 0) {
            rac_detach(t);
            ws_close(t->dev, 1011, "RAC write failed");
        }
    }
    free(out);
}

static void tun_on_timer(uv_timer_t *tm)
{
    struct tunnel *t = tm->data;
    uint8_t mode = t->timer_mode;
    t->timer_mode = TT_NONE;
    if (mode == TT_RELAY_START) {
        /* The 101 must have left alone: the SDK drops what comes with it. */
        if (t->dev && t->dev->queued > 0) {
            t->timer_mode = TT_RELAY_START;
            uv_timer_start(&t->timer, tun_on_timer, TUN_RELAY_DELAY, 0);
            return;
        }
        t->relay_ready = true;
        tun_flow(t);
    } else if (mode == TT_CANCEL_GRACE) {
        if (t->dev)
            ws_close(t->dev, 1000, "Normal Close");
    }
}

static void tun_dev_open(struct ws_conn *ws)
{
    struct tunnel *t = ws->user;
    t->state = TS_OPEN;
    t->relay_ready = false;
    if (t->timer_mode != TT_CANCEL_GRACE) {
        t->timer_mode = TT_RELAY_START;
        uv_timer_start(&t->timer, tun_on_timer, TUN_RELAY_DELAY, 0);
    }
    tun_flow(t);
}

static void tun_dev_on_message(struct ws_conn *ws, int op, const uint8_t *data, size_t len)
{
    struct tunnel *t = ws->user;
    tun_dev_message(t, op, data, len);
    if (t->dev == ws)
        tun_flow(t);
}

static void tun_drain(struct ws_conn *ws)
{
    tun_flow(ws->user);
}

static void tun_dev_close(struct ws_conn *ws)
{
    struct tunnel *t = ws->user;
    t->dev = NULL;
    t->dev_wire_in += ws->stats.bytes_in;
    t->dev_wire_out += ws->stats.bytes_out;
    t->close_code = ws->close_code;
    snprintf(t->close_reason, sizeof(t->close_reason), "%s", ws->close_text);
    t->close_why = ws->reason;
    if (t->timer_mode != TT_NONE) {
        uv_timer_stop(&t->timer);
        t->timer_mode = TT_NONE;
    }
    /* Nothing is left to relay: the device never re-dials a tunnel. */
    rac_finish(t);
    if (t->client)
        ws_close(t->client, ws->close_code && ws->close_code != 1005 && ws->close_code != 1006
                                ? ws->close_code
                                : 1000,
                 ws->close_text[0] ? ws->close_text : "Normal Close");
    tun_deactivate(t, TS_CLOSED);
}

static void tun_client_open(struct ws_conn *ws)
{
    tun_flow(ws->user);
}

static void tun_client_on_message(struct ws_conn *ws, int op, const uint8_t *data, size_t len)
{
    struct tunnel *t = ws->user;
    if (!t->dev || t->dev->state != WS_OPEN)
        return;
    if (op == WS_OP_TEXT) {
        long n = b64_decoded_len((const char *)data, len);
        if (n > 0)
            t->to_dev_raw += (uint64_t)n;
    }
    t->to_dev_msgs++;
    tun_note_sent(t, len);
    ws_send(t->dev, op, data, len);
    tun_flow(t);
}

static void tun_client_close(struct ws_conn *ws)
{
    struct tunnel *t = ws->user;
    if (t->client != ws)
        return;
    t->client = NULL;
    if (t->dev)
        ws_close(t->dev, 1000, "Normal Close");
}

static const struct ws_handlers tun_dev_handlers = {
    .on_open = tun_dev_open,
    .on_message = tun_dev_on_message,
    .on_close = tun_dev_close,
    .on_drain = tun_drain,
};

static const struct ws_handlers tun_client_handlers = {
    .on_open = tun_client_open,
    .on_message = tun_client_on_message,
    .on_close = tun_client_close,
    .on_drain = tun_drain,
};

static void pconn_release(struct pconn *pc);

/* An upgrade on /Thingworx/WSTunnelServer/<tid> (device) or
 * /Thingworx/WSTunnelClient/<tid> (client). Returns the HTTP status. */
static int tunnel_upgrade(struct pconn *pc, struct ws_conn *ws, const struct ws_http *req,
                          bool client, const char *tid, size_t tl)
{
    struct tunnel *t = tl ? tun_find(tid, tl) : NULL;
    if (!t || !t->active) {
        T.unknown_tid++;
        return 404;
    }
    if (t->owner != pc->in) {
        /* Only the instance that sent the StartTunnel has the endpoint. */
        t->wrong_instance++;
        T.wrong_instance++;
        return 404;
    }
    const struct ws_str *key = ws_http_header(req, "appKey");
    const struct ws_str *cookie = ws_http_header(req, "Cookie");
    const struct ws_str *mfs = ws_http_header(req, "Max-Frame-Size");
    if (client ? (!cookie || cookie->n == 0)
               : (!key || key->n != strlen(S.app_key) || memcmp(key->p, S.app_key, key->n) != 0)) {
        t->bad_key++;
        T.bad_key++;
        return 401;
    }
    if (client ? (t->client || t->rac) : (t->dev != NULL)) {
        t->conflicts++;
        T.conflicts++;
        return 409;
    }
    uint32_t v = 0;
    if (mfs) {
        if (mfs->n == 0 || mfs->n > 10)
            return 400;
        uint64_t acc = 0;
        for (size_t i = 0; i < mfs->n; i++) {
            if (!isdigit((unsigned char)mfs->p[i]))
                return 400;
            acc = acc * 10 + (uint64_t)(mfs->p[i] - '0');
        }
        if (acc < 125 || acc > 0x7FFFFFFF)
            return 400;
        v = (uint32_t)acc;
    }
    ws->deflate = false;
    ws->rx_max_message = 4u * 1024 * 1024;
    if (client) {
        free(t->cookie);
        t->cookie = dup_str(*cookie);
        ws->tx_max_frame = v;
        ws->h = &tun_client_handlers;
        t->client = ws;
        t->client_conns++;
    } else {
        const struct ws_str *xff = ws_http_header(req, "X-Forwarded-For");
        const struct ws_str *ua = ws_http_header(req, "User-Agent");
        t->upgrades++;
        t->xff_present = xff != NULL;
        free(t->xff);
        t->xff = xff ? dup_str(*xff) : NULL;
        free(t->user_agent);
        t->user_agent = ua ? dup_str(*ua) : NULL;
        t->max_frame_size = v;
        /* Never a frame larger than the device reads (TUNNELS.md §4). */
        ws->tx_max_frame = v ? v : t->chunksize / 3 * 4;
        if (t->glue) {
            /* A text frame "QUJD" ("ABC"): a device must drop it. */
            static const uint8_t f[] = {0x81, 4, 'Q', 'U', 'J', 'D'};
            memcpy(ws->glue, f, sizeof(f));
            ws->glue_len = sizeof(f);
        }
        ws->h = &tun_dev_handlers;
        t->dev = ws;
    }
    ws->user = t;
    pconn_release(pc);
    return 101;
}

/* TunnelCommandFromEdge: answered SUCCESS on any instance (the tunnel table
 * is the cluster's), counted on the newest tunnel with that tid. */
static void tunnel_command_from_edge(const struct emx_ao_tunnel_msg *m)
{
    struct tunnel *t = m->tid.ptr ? tun_find((const char *)m->tid.ptr, m->tid.len) : NULL;
    bool cancel = m->command.ptr && emx_ao_str_eq(m->command, "CANCEL");
    bool disc = m->command.ptr && emx_ao_str_eq(m->command, "DISCONNECT");
    if (cancel)
        T.cancels++;
    else if (disc)
        T.disconnects++;
    else
        T.commands_other++;
    if (!t) {
        T.commands_unknown_tid++;
        return;
    }
    if (disc) {
        t->disconnects++;
        return;
    }
    if (!cancel)
        return;
    t->cancels++;
    /* The tunnel is over: close the RAC now; the device closes its socket
     * itself right after a CANCEL it sends for CompleteTunnel, else we do. */
    rac_finish(t);
    if (t->client)
        ws_close(t->client, 1000, "Normal Close");
    if (t->dev) {
        /* A device cancelling for idleness repeats its CANCEL every round
         * trip: the first one starts the clock. */
        if (t->timer_mode != TT_CANCEL_GRACE) {
            t->timer_mode = TT_CANCEL_GRACE;
            uv_timer_start(&t->timer, tun_on_timer, TUN_CANCEL_GRACE, 0);
        }
    } else {
        tun_deactivate(t, TS_CLOSED);
    }
}

/* Instance `in` crashed: its tunnel endpoints and sockets go with it. */
static void tunnel_instance_crash(struct instance *in)
{
    struct emx_list *pos;
    for (pos = T.list.next; pos != &T.list; pos = pos->next) {
        struct tunnel *t = emx_container_of(pos, struct tunnel, link);
        if (t->owner != in || (t->state == TS_CLOSED || t->state == TS_REFUSED))
            continue;
        if (t->rac)
            rac_detach(t);
        if (t->client)
            ws_abort(t->client, "instance crashed", true);
        if (t->dev)
            ws_abort(t->dev, "instance crashed", true);
        if (t->timer_mode != TT_NONE) {
            uv_timer_stop(&t->timer);
            t->timer_mode = TT_NONE;
        }
        if (!t->close_why)
            t->close_why = "instance crashed";
        tun_deactivate(t, TS_CLOSED);
    }
}

static struct tunnel *tunnel_new(struct instance *in, const char *tid, const char *thing,
                                 const char *host, uint16_t port, uint32_t chunksize,
                                 uint32_t idle_ms, int32_t num_connects, const char **err)
{
    struct tunnel *t = calloc(1, sizeof(*t));
    if (!t || !(t->tid = strdup(tid)) || !(t->thing = strdup(thing)) ||
        !(t->host = strdup(host))) {
        *err = "out of memory";
        goto fail;
    }
    t->owner = in;
    t->glue = T.glue;
    t->port = port;
    t->chunksize = chunksize;
    t->idle_ms = idle_ms;
    t->num_connects = num_connects;
    uv_tcp_init(S.loop, &t->listener);
    t->listener.data = t;
    struct sockaddr_in sa;
    uv_ip4_addr("127.0.0.1", 0, &sa);
    int rc = uv_tcp_bind(&t->listener, (struct sockaddr *)&sa, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&t->listener, 16, rac_on_connection);
    int l = sizeof(sa);
    if (rc == 0)
        rc = uv_tcp_getsockname(&t->listener, (struct sockaddr *)&sa, &l);
    if (rc != 0) {
        *err = uv_strerror(rc);
        /* The handle is closed; t (and the memory it lives in) is kept. */
        uv_close((uv_handle_t *)&t->listener, NULL);
        t->state = TS_REFUSED;
        emx_list_push_back(&T.list, &t->link);
        return NULL;
    }
    t->listening = true;
    t->rac_port = ntohs(sa.sin_port);
    uv_timer_init(S.loop, &t->timer);
    t->timer.data = t;
    if (hmap_put(&T.by_tid, tid, strlen(tid), t, NULL) != 0) {
        *err = "out of memory";
        uv_close((uv_handle_t *)&t->listener, NULL);
        uv_close((uv_handle_t *)&t->timer, NULL);
        t->listening = false;
        t->state = TS_REFUSED;
        emx_list_push_back(&T.list, &t->link);
        return NULL;
    }
    t->active = true;
    t->state = TS_STARTING;
    emx_list_push_back(&T.list, &t->link);
    T.count++;
    return t;
fail:
    if (t) {
        free(t->tid);
        free(t->thing);
        free(t->host);
    }
    free(t);
    return NULL;
}

/* The answer (or failure) of a tunnel control request a control client
 * sent. */
static void tunnel_req_done(struct ctl_req *r, int code, const char *err)
{
    struct tunnel *t = r->tun;
    if (r->kind != CR_START || !t) {
        if (err)
            ctl_req_done(r, "%s", err);
        else
            ctl_req_done(r, "answer 0x%02X %s", code, emx_ao_code_name((uint8_t)code));
        return;
    }
    if (!err && code == EMX_AO_SUCCESS) {
        t->answer = (uint8_t)code;
        if (t->state == TS_STARTING)
            t->state = TS_READY;
        ctl_req_done(r, "answer 0x%02X %s port %u", code, emx_ao_code_name((uint8_t)code),
                     t->rac_port);
        return;
    }
    if (!err)
        t->answer = (uint8_t)code;
    /* Refused (or unanswered before the device came): the endpoint goes. */
    if (!err || !t->dev) {
        if (t->dev)
            ws_close(t->dev, 1000, "Normal Close");
        rac_detach(t);
        tun_deactivate(t, TS_REFUSED);
    }
    if (err)
        ctl_req_done(r, "%s", err);
    else
        ctl_req_done(r, "answer 0x%02X %s", code, emx_ao_code_name((uint8_t)code));
}

/* Test hooks for device strictness: tunnel-misbehave glue|noglue (for the
 * tunnels created while it is on), or
 * tunnel-misbehave TID binary|oversize|bigframe|ping on an open tunnel. */
static void ctl_tunnel_misbehave(struct ctl_client *cc, int argc, char **argv)
{
    if (argc == 2 && (strcmp(argv[1], "glue") == 0 || strcmp(argv[1], "noglue") == 0)) {
        T.glue = argv[1][0] == 'g';
        ctl_reply(cc, "ok");
        return;
    }
    struct tunnel *t = argc == 3 ? tun_find(argv[1], strlen(argv[1])) : NULL;
    if (!t || !t->dev || t->dev->state != WS_OPEN) {
        ctl_reply(cc, "err no open tunnel %s", argc == 3 ? argv[1] : "");
        return;
    }
    struct ws_conn *ws = t->dev;
    const char *kind = argv[2];
    if (strcmp(kind, "binary") == 0) {
        ws_send(ws, WS_OP_BINARY, "ABC", 3);
    } else if (strcmp(kind, "ping") == 0) {
        ws_send_control(ws, WS_OP_PING, "srv", 3);
    } else if (strcmp(kind, "oversize") == 0 || strcmp(kind, "bigframe") == 0) {
        bool big = kind[0] == 'b';
        /* oversize: a message decoding to chunksize + 3 bytes, framed right;
         * bigframe: one frame of Max-Frame-Size + 1 bytes. */
        size_t raw = big ? 0 : (size_t)t->chunksize + 3;
        size_t n = big ? (size_t)(ws->tx_max_frame ? ws->tx_max_frame : 10922) + 1
                       : b64_encoded_len(raw);
        uint8_t *zero = calloc(1, raw + 1);
        char *text = malloc(n + 10);
        if (!zero || !text) {
            free(zero);
            free(text);
            ctl_reply(cc, "err out of memory");
            return;
        }
        if (big) {
            memset(text + 4, 'A', n);
            text[0] = (char)0x81;
            text[1] = 126;
            text[2] = (char)(n >> 8);
            text[3] = (char)n;
            ws_write_raw(ws, text, n + 4);
        } else {
            b64_encode(zero, raw, text);
            ws_send(ws, WS_OP_TEXT, text, n);
        }
        free(zero);
        free(text);
    } else {
        ctl_reply(cc, "err unknown kind %s", kind);
        return;
    }
    ctl_reply(cc, "ok");
}

/* ---- `tunnels` output: key=value pairs, values percent-encoded ---- */

static void kv(struct jbuf *j, const char *key, const char *v)
{
    jf(j, " %s=", key);
    if (!v)
        return;
    for (const unsigned char *p = (const unsigned char *)v; *p; p++) {
        if (isalnum(*p) || strchr("-._~:,/", *p))
            jput(j, (const char *)p, 1);
        else
            jf(j, "%%%02X", *p);
    }
}

static void tunnels_report(struct ctl_client *cc)
{
    struct jbuf j = {0};
    uint64_t active = 0, open = 0, to_raw = 0, from_raw = 0, binary = 0, bad64 = 0, n = 0;
    struct emx_list *pos;
    for (pos = T.list.next; pos != &T.list; pos = pos->next) {
        struct tunnel *t = emx_container_of(pos, struct tunnel, link);
        uint64_t win = t->dev_wire_in + (t->dev ? t->dev->stats.bytes_in : 0);
        uint64_t wout = t->dev_wire_out + (t->dev ? t->dev->stats.bytes_out : 0);
        char target[300];
        snprintf(target, sizeof(target), "%s:%u", t->host, t->port);
        jput(&j, "tunnel", 6);
        kv(&j, "tid", t->tid);
        jf(&j, " instance=%d", t->owner->id);
        kv(&j, "thing", t->thing);
        jf(&j, " state=%s answer=0x%02X rac_port=%u", tun_state_names[t->state], t->answer,
           t->rac_port);
        kv(&j, "target", target);
        jf(&j,
           " chunksize=%" PRIu32 " idle_timeout=%" PRIu32 " num_connects=%" PRId32
           " device_connected=%d rac_connected=%d client_connected=%d upgrades=%" PRIu64
           " rac_conns=%" PRIu64 " rac_refused=%" PRIu64 " client_conns=%" PRIu64,
           t->chunksize, t->idle_ms, t->num_connects, t->dev != NULL, t->rac != NULL,
           t->client != NULL, t->upgrades, t->rac_conns, t->rac_refused, t->client_conns);
        jf(&j,
           " to_device_raw=%" PRIu64 " to_device_wire=%" PRIu64 " to_device_msgs=%" PRIu64
           " from_device_raw=%" PRIu64 " from_device_wire=%" PRIu64 " from_device_msgs=%" PRIu64
           " max_frame_to_device=%" PRIu32 " binary_from_device=%" PRIu64
           " bad_base64_from_device=%" PRIu64,
           t->to_dev_raw, wout, t->to_dev_msgs, t->from_dev_raw, win, t->from_dev_msgs,
           t->max_frame_to_dev, t->binary_from_dev, t->bad_base64_from_dev);
        jf(&j,
           " wrong_instance=%" PRIu64 " bad_key=%" PRIu64 " conflicts=%" PRIu64
           " cancels=%" PRIu64 " disconnects=%" PRIu64 " close_code=%u",
           t->wrong_instance, t->bad_key, t->conflicts, t->cancels, t->disconnects,
           t->close_code);
        kv(&j, "close_reason", t->close_reason);
        kv(&j, "close_why", t->close_why);
        jf(&j, " xff_present=%d", t->xff_present);
        kv(&j, "xff", t->xff);
        jf(&j, " max_frame_size=%" PRIu32, t->max_frame_size);
        kv(&j, "user_agent", t->user_agent);
        kv(&j, "cookie", t->cookie);
        jput(&j, "\n", 1);
        n++;
        active += t->active;
        open += t->dev != NULL;
        to_raw += t->to_dev_raw;
        from_raw += t->from_dev_raw;
        binary += t->binary_from_dev;
        bad64 += t->bad_base64_from_dev;
    }
    jf(&j,
       "tunnels count=%" PRIu64 " active=%" PRIu64 " open=%" PRIu64 " wrong_instance=%" PRIu64
       " unknown_tid=%" PRIu64 " bad_key=%" PRIu64 " conflicts=%" PRIu64,
       n, active, open, T.wrong_instance, T.unknown_tid, T.bad_key, T.conflicts);
    jf(&j,
       " cancels=%" PRIu64 " disconnects=%" PRIu64 " other_commands=%" PRIu64
       " commands_unknown_tid=%" PRIu64 " to_device_raw=%" PRIu64 " from_device_raw=%" PRIu64
       " binary_from_device=%" PRIu64 " bad_base64_from_device=%" PRIu64 "\n",
       T.cancels, T.disconnects, T.commands_other, T.commands_unknown_tid, to_raw, from_raw,
       binary, bad64);
    if (j.oom)
        ctl_reply(cc, "tunnels err out of memory");
    else
        ctl_write(cc, j.p, j.len);
    free(j.p);
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

/* The connection that carries requests for `thing` from instance `in`:
 * its direct edge, or a pipe of that edge's edgemux on `in`. Replies an
 * error to cc and returns NULL when there is none. */
static struct pconn *pipe_for(struct ctl_client *cc, struct instance *in, const char *thing,
                              struct bkey **kp)
{
    struct binding *b = hmap_get(&S.things, thing, strlen(thing));
    if (!b) {
        ctl_reply(cc, "err not bound: %s", thing);
        return NULL;
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
    if (!target)
        ctl_reply(cc, "err no pipe on instance %d for %s", in->id, thing);
    *kp = k;
    return target;
}

/* Send a platform→edge request on `target`; the control client gets the
 * answer line. `params` is an InfoTable or NULL. */
static struct ctl_req *platform_send(struct ctl_client *cc, struct pconn *target, struct bkey *k,
                                     uint8_t code, const char *thing, uint8_t characteristic,
                                     const char *name, const uint8_t *params, size_t plen)
{
    size_t tl = strlen(thing), nl = strlen(name);
    size_t blen = 1 + emx_ao_str_size(tl) + 1 + emx_ao_str_size(nl) + 2 + plen;
    uint8_t *body = malloc(blen);
    struct ctl_req *r = calloc(1, sizeof(*r));
    if (!body || !r) {
        free(body);
        free(r);
        ctl_reply(cc, "err out of memory");
        return NULL;
    }
    size_t p = 0;
    body[p++] = 0x0A; /* THING */
    p += emx_ao_write_str(body + p, blen - p, thing, tl);
    body[p++] = characteristic;
    p += emx_ao_write_str(body + p, blen - p, name, nl);
    body[p++] = 0;
    if (params) {
        body[p++] = EMX_BT_INFOTABLE;
        memcpy(body + p, params, plen);
        p += plen;
    } else {
        body[p++] = EMX_BT_NOTHING;
    }
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
    return r;
}

static void ctl_platform_request(struct ctl_client *cc, uint8_t code, struct instance *in,
                                 const char *thing, const char *prop, const char *value)
{
    struct bkey *k;
    struct pconn *target = pipe_for(cc, in, thing, &k);
    if (!target)
        return;
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
    platform_send(cc, target, k, code, thing, 1 /* PROPERTIES */, prop, params, plen);
    free(params);
}

/* Send a tunnel control service (one-row InfoTable of `f`). */
static struct ctl_req *tunnel_service(struct ctl_client *cc, struct pconn *target, struct bkey *k,
                                      const char *thing, const char *service,
                                      const struct ao_field *f, size_t n)
{
    size_t cap = ao_infotable_row_size(f, n);
    uint8_t *it = malloc(cap);
    size_t len = it ? ao_infotable_row(it, cap, f, n) : 0;
    if (!len) {
        free(it);
        ctl_reply(cc, "err out of memory");
        return NULL;
    }
    struct ctl_req *r = platform_send(cc, target, k, EMX_AO_POST, thing,
                                      EMX_AO_CHARACTERISTIC_SERVICES, service, it, len);
    free(it);
    return r;
}

static bool tid_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 200)
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] <= 0x20 || (unsigned char)s[i] >= 0x7F)
            return false;
    return true;
}

/* JSON string contents we write without escaping. */
static bool json_plain(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (n > max)
        return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] == '"' || s[i] == '\\' || (unsigned char)s[i] < 0x20)
            return false;
    return true;
}

/* tunnel N THING TID HOST PORT [CHUNKSIZE] [IDLE_MS] [NUM_CONNECTS] */
static void ctl_tunnel(struct ctl_client *cc, struct instance *in, int argc, char **argv)
{
    uint32_t port, chunk = 8192, idle = 30000;
    long nc = 1;
    char *end = NULL;
    if (!tid_ok(argv[3])) {
        ctl_reply(cc, "err bad tid");
        return;
    }
    if (!json_plain(argv[4], 255) || !argv[4][0] || !parse_u32(argv[5], &port) || port == 0 ||
        port > 65535) {
        ctl_reply(cc, "err bad target");
        return;
    }
    if ((argc > 6 && (!parse_u32(argv[6], &chunk) || chunk <= 16 || chunk > TUN_MAX_CHUNKSIZE)) ||
        (argc > 7 && (!parse_u32(argv[7], &idle) || idle > INT32_MAX))) {
        ctl_reply(cc, "err bad chunksize or idle_timeout");
        return;
    }
    if (argc > 8) {
        errno = 0;
        nc = strtol(argv[8], &end, 10);
        if (errno || *end || end == argv[8] || nc < INT32_MIN || nc > INT32_MAX) {
            ctl_reply(cc, "err bad num_connects");
            return;
        }
    }
    struct tunnel *old = tun_find(argv[3], strlen(argv[3]));
    if (old && old->active) {
        ctl_reply(cc, "err tunnel %s exists", argv[3]);
        return;
    }
    struct bkey *k;
    struct pconn *target = pipe_for(cc, in, argv[2], &k);
    if (!target)
        return;
    const char *err = NULL;
    struct tunnel *t =
        tunnel_new(in, argv[3], argv[2], argv[4], (uint16_t)port, chunk, idle, (int32_t)nc, &err);
    if (!t) {
        ctl_reply(cc, "err %s", err ? err : "cannot create the tunnel");
        return;
    }
    char conn[400];
    snprintf(conn, sizeof(conn), "{\"host\": \"%s\", \"port\": %" PRIu32 ", \"num_connects\": %ld}",
             argv[4], port, nc);
    const struct ao_field f[] = {
        {"tid", EMX_BT_STRING, argv[3], 0},
        {"type", EMX_BT_STRING, "tcp", 0},
        {"chunksize", EMX_BT_INTEGER, NULL, (int32_t)chunk},
        {"idle_timeout", EMX_BT_INTEGER, NULL, (int32_t)idle},
        {"read_timeout", EMX_BT_INTEGER, NULL, 10},
        {"connection", EMX_BT_STRING, conn, 0},
    };
    struct ctl_req *r = tunnel_service(cc, target, k, argv[2], "StartTunnel", f, 6);
    if (!r) {
        tun_deactivate(t, TS_REFUSED);
        return;
    }
    r->kind = CR_START;
    r->tun = t;
}

/* tunnel-complete N THING TID [REASON...] */
static void ctl_tunnel_complete(struct ctl_client *cc, struct instance *in, int argc, char **argv)
{
    char reason[256] = "test done";
    if (argc > 4) {
        size_t n = 0;
        for (int i = 4; i < argc; i++) {
            int w = snprintf(reason + n, sizeof(reason) - n, "%s%s", i > 4 ? " " : "", argv[i]);
            if (w < 0 || (size_t)w >= sizeof(reason) - n) {
                ctl_reply(cc, "err reason too long");
                return;
            }
            n += (size_t)w;
        }
    }
    if (!tid_ok(argv[3]) || !json_plain(reason, 200)) {
        ctl_reply(cc, "err bad tid or reason");
        return;
    }
    struct bkey *k;
    struct pconn *target = pipe_for(cc, in, argv[2], &k);
    if (!target)
        return;
    char conn[300];
    snprintf(conn, sizeof(conn), "{\"reason\": \"%s\"}", reason);
    const struct ao_field f[] = {
        {"tid", EMX_BT_STRING, argv[3], 0},
        {"peer_name", EMX_BT_STRING, "platform-sim", 0},
        {"connection", EMX_BT_STRING, conn, 0},
    };
    struct ctl_req *r = tunnel_service(cc, target, k, argv[2], "CompleteTunnel", f, 3);
    if (r)
        r->kind = CR_TUNNEL;
}

/* tunnel-command N THING TID CONNECT|DISCONNECT */
static void ctl_tunnel_command(struct ctl_client *cc, struct instance *in, char **argv)
{
    if (!tid_ok(argv[3]) || !tid_ok(argv[4])) {
        ctl_reply(cc, "err bad tid or command");
        return;
    }
    struct bkey *k;
    struct pconn *target = pipe_for(cc, in, argv[2], &k);
    if (!target)
        return;
    const struct ao_field f[] = {
        {"tid", EMX_BT_STRING, argv[3], 0},
        {"command", EMX_BT_STRING, argv[4], 0},
    };
    struct ctl_req *r = tunnel_service(cc, target, k, argv[2], "TunnelCommandToEdge", f, 2);
    if (r)
        r->kind = CR_TUNNEL;
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
    char *argv[12] = {0};
    int argc = 0;
    char *save = NULL;
    for (char *t = strtok_r(line, " \t\r", &save); t && argc < 12;
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
    } else if (strcmp(cmd, "tunnels") == 0) {
        tunnels_report(cc);
    } else if (strcmp(cmd, "tunnel-misbehave") == 0) {
        ctl_tunnel_misbehave(cc, argc, argv);
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
    } else if (strcmp(cmd, "tunnel") == 0 && argc >= 6 && argc <= 9) {
        ctl_tunnel(cc, in, argc, argv);
    } else if (strcmp(cmd, "tunnel-complete") == 0 && argc >= 4) {
        ctl_tunnel_complete(cc, in, argc, argv);
    } else if (strcmp(cmd, "tunnel-command") == 0 && argc == 5) {
        ctl_tunnel_command(cc, in, argv);
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
                    if (r->kind != CR_PLAIN)
                        tunnel_req_done(r, 0, "err timeout");
                    else
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
               "  misbehave THING ping|text|badheader|len64|oversize (direct edges), shutdown,\n"
               "  tunnel N THING TID HOST PORT [CHUNKSIZE] [IDLE_MS] [NUM_CONNECTS],\n"
               "  tunnel-complete N THING TID [REASON], tunnel-command N THING TID COMMAND,\n"
               "  tunnels, tunnel-misbehave glue|noglue,\n"
               "  tunnel-misbehave TID binary|oversize|bigframe|ping (see tools/README.md)\n"
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
    emx_list_init(&T.list);
    hmap_init(&T.by_tid);
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
