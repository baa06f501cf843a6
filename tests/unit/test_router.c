/* Router unit tests, written from DESIGN §3 (the platform-hop contract and the
 * outcomes table) and §4 (routing rules). The router runs against a fake
 * emx_router_io that records every call; messages are built with the codec's
 * builders and what the router sent is read back with emx_ao_header_parse.
 * Time is a variable the tests advance; timers run through emx_router_tick. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "codec.h"
#include "router.h"
#include "siphash.h"

#define SESSION      0x1234ABCDu /* the session the platform issued to edges */
#define PIPE_SESSION 0x0BADC0DEu /* the session answering a pipe AUTH */
#define ANY          (-1)
#define THING        0x0A /* entityType of a Thing */
#define PROPERTIES   0x01 /* characteristic */
#define MAX_INST     6
#define HIGH(f)      ((f)->cfg.high_watermark)
#define LOW(f)       ((f)->cfg.low_watermark)

/* ---- the fake io: a log of every call ---- */

enum ev_kind {
    EV_EDGE_SEND,
    EV_EDGE_CLOSE,
    EV_EDGE_PAUSE,
    EV_PIPE_SEND,
    EV_PIPE_CLOSE,
    EV_INST_ADDED,
    EV_INST_REMOVED,
};

struct ev {
    enum ev_kind kind;
    const void *edge; /* identity only: the edge may be freed since */
    uint32_t edge_id;
    struct emx_pipe *pipe; /* identity only after its instance was removed */
    const void *inst;
    char inst_id[16];
    uint16_t close_code;
    bool pause;
    uint8_t *buf;
    size_t len;
    int parse_rc;
    struct emx_ao_header h;
    size_t body_off;
};

struct fx {
    struct emx_router_config cfg;
    struct emx_router_io io;
    struct emx_router *r;
    uint64_t now;
    struct ev *ev;
    size_t nev, cap;
    const struct emx_edge *enobufs; /* edge_send to it fails with -ENOBUFS */
    uint32_t next_rid;
    uintptr_t next_conn;
    struct emx_instance *inst[MAX_INST];
    size_t ninst;
    size_t unread[16]; /* io_edge_buffered: by the low bits of the edge's id */
    size_t buffered_calls;
};

static struct ev *rec(struct fx *f, enum ev_kind kind)
{
    if (f->nev == f->cap) {
        f->cap = f->cap ? f->cap * 2 : 64;
        f->ev = realloc(f->ev, f->cap * sizeof(*f->ev));
        assert_non_null(f->ev);
    }
    struct ev *v = &f->ev[f->nev++];
    memset(v, 0, sizeof(*v));
    v->kind = kind;
    v->parse_rc = EMX_AO_ETRUNC;
    return v;
}

static void rec_bytes(struct ev *v, const uint8_t *buf, size_t len)
{
    v->buf = malloc(len ? len : 1);
    assert_non_null(v->buf);
    if (len)
        memcpy(v->buf, buf, len);
    v->len = len;
    v->parse_rc = emx_ao_header_parse(v->buf, len, &v->h, &v->body_off);
}

static void rec_edge(struct ev *v, const struct emx_edge *e)
{
    v->edge = e;
    v->edge_id = e->id;
}

static void rec_inst(struct ev *v, const struct emx_instance *inst)
{
    v->inst = inst;
    snprintf(v->inst_id, sizeof(v->inst_id), "%s", inst->id);
}

static int io_edge_send(void *ctx, struct emx_edge *e, const uint8_t *buf, size_t len)
{
    struct fx *f = ctx;
    struct ev *v = rec(f, EV_EDGE_SEND);
    rec_edge(v, e);
    rec_bytes(v, buf, len);
    return e == f->enobufs ? -ENOBUFS : 0;
}

/* Set in tests of the shares; NULL (as for a transport without it) otherwise. */
static size_t io_edge_buffered(void *ctx, struct emx_edge *e)
{
    struct fx *f = ctx;
    f->buffered_calls++;
    return f->unread[e->id & 15];
}

static void io_edge_close(void *ctx, struct emx_edge *e, uint16_t code, const char *reason)
{
    (void)reason;
    struct ev *v = rec(ctx, EV_EDGE_CLOSE);
    rec_edge(v, e);
    v->close_code = code;
}

static void io_edge_pause(void *ctx, struct emx_edge *e, bool pause)
{
    struct ev *v = rec(ctx, EV_EDGE_PAUSE);
    rec_edge(v, e);
    v->pause = pause;
}

static int io_pipe_send(void *ctx, struct emx_pipe *p, const uint8_t *buf, size_t len)
{
    struct ev *v = rec(ctx, EV_PIPE_SEND);
    v->pipe = p;
    rec_inst(v, p->inst);
    rec_bytes(v, buf, len);
    return 0;
}

static void io_pipe_close(void *ctx, struct emx_pipe *p, const char *reason)
{
    (void)reason;
    struct ev *v = rec(ctx, EV_PIPE_CLOSE);
    v->pipe = p;
    rec_inst(v, p->inst);
}

static void io_instance_added(void *ctx, struct emx_instance *inst)
{
    rec_inst(rec(ctx, EV_INST_ADDED), inst);
}

static void io_instance_removed(void *ctx, struct emx_instance *inst)
{
    rec_inst(rec(ctx, EV_INST_REMOVED), inst);
}

static void fx_clear(struct fx *f)
{
    for (size_t i = 0; i < f->nev; i++)
        free(f->ev[i].buf);
    f->nev = 0;
}

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    f->cfg = (struct emx_router_config){
        .worker = 3,
        .pipes_per_instance = 2,
        .high_watermark = 64 * 1024,
        .low_watermark = 32 * 1024,
        .stall_after = 2000,
        .request_timeout = 8000,
        .edge_request_timeout = 8000,
        .auth_timeout = 15000,
        .multipart_pin_wait = 2000,
        .all_down_grace = 3000,
        .close_spread = 0,
        .empty_confirm = 10000,
        .max_message_size = 1024 * 1024,
        .max_pending = 500,
        .app_key = "pipe-key",
    };
    f->io = (struct emx_router_io){
        .ctx = f,
        .log = NULL,
        .edge_send = io_edge_send,
        .edge_close = io_edge_close,
        .edge_pause = io_edge_pause,
        .pipe_send = io_pipe_send,
        .pipe_close = io_pipe_close,
        .instance_added = io_instance_added,
        .instance_removed = io_instance_removed,
    };
    f->now = 1000000; /* time 0 must not be special */
    f->next_rid = 1;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fx *f = *state;
    if (f->r)
        emx_router_free(f->r);
    fx_clear(f);
    free(f->ev);
    free(f);
    return 0;
}

/* ---- reading the log ---- */

static bool hmatch(const struct ev *v, int code, int64_t rid, int64_t eid)
{
    return v->parse_rc == EMX_AO_OK && (code == ANY || v->h.code == code) &&
           (rid == ANY || v->h.request_id == (uint32_t)rid) &&
           (eid == ANY || v->h.endpoint_id == (uint32_t)eid);
}

static const struct ev *find_pipe_send(struct fx *f, size_t from, int code, int64_t rid,
                                       int64_t eid)
{
    for (size_t i = from; i < f->nev; i++)
        if (f->ev[i].kind == EV_PIPE_SEND && hmatch(&f->ev[i], code, rid, eid))
            return &f->ev[i];
    return NULL;
}

static size_t count_pipe_sends(struct fx *f, size_t from, int code, int64_t rid, int64_t eid)
{
    size_t n = 0;
    for (size_t i = from; i < f->nev; i++)
        if (f->ev[i].kind == EV_PIPE_SEND && hmatch(&f->ev[i], code, rid, eid))
            n++;
    return n;
}

static const struct ev *find_edge_send(struct fx *f, size_t from, uint32_t edge_id, int code,
                                       int64_t rid)
{
    for (size_t i = from; i < f->nev; i++)
        if (f->ev[i].kind == EV_EDGE_SEND && f->ev[i].edge_id == edge_id &&
            hmatch(&f->ev[i], code, rid, ANY))
            return &f->ev[i];
    return NULL;
}

static size_t count_edge_sends(struct fx *f, size_t from, uint32_t edge_id, int code, int64_t rid)
{
    size_t n = 0;
    for (size_t i = from; i < f->nev; i++)
        if (f->ev[i].kind == EV_EDGE_SEND && f->ev[i].edge_id == edge_id &&
            hmatch(&f->ev[i], code, rid, ANY))
            n++;
    return n;
}

static size_t count_kind(struct fx *f, size_t from, enum ev_kind kind)
{
    size_t n = 0;
    for (size_t i = from; i < f->nev; i++)
        if (f->ev[i].kind == kind)
            n++;
    return n;
}

/* Index of the first close of an edge since `from`, or -1. */
static long find_edge_close(struct fx *f, size_t from, uint32_t edge_id)
{
    for (size_t i = from; i < f->nev; i++)
        if (f->ev[i].kind == EV_EDGE_CLOSE && f->ev[i].edge_id == edge_id)
            return (long)i;
    return -1;
}

static size_t count_edge_closes(struct fx *f, size_t from, uint32_t edge_id)
{
    size_t n = 0;
    for (size_t i = from; i < f->nev; i++)
        if (f->ev[i].kind == EV_EDGE_CLOSE && f->ev[i].edge_id == edge_id)
            n++;
    return n;
}

static bool edge_paused(struct fx *f, size_t from, uint32_t edge_id, bool pause)
{
    for (size_t i = from; i < f->nev; i++)
        if (f->ev[i].kind == EV_EDGE_PAUSE && f->ev[i].edge_id == edge_id &&
            f->ev[i].pause == pause)
            return true;
    return false;
}

static size_t count_removed(struct fx *f, size_t from, const char *id)
{
    size_t n = 0;
    for (size_t i = from; i < f->nev; i++)
        if (f->ev[i].kind == EV_INST_REMOVED && strcmp(f->ev[i].inst_id, id) == 0)
            n++;
    return n;
}

static int inst_index(struct fx *f, const struct emx_instance *inst)
{
    for (size_t i = 0; i < f->ninst; i++)
        if (f->inst[i] == inst)
            return (int)i;
    fail_msg("message sent to an unknown instance");
    return -1;
}

/* ---- messages ---- */

static size_t header_only(uint8_t *buf, uint8_t code, uint32_t rid, uint32_t eid, uint32_t session)
{
    struct emx_ao_header h = {.version = EMX_AO_VERSION,
                              .code = code,
                              .request_id = rid,
                              .endpoint_id = eid,
                              .session_id = session};
    size_t n = emx_ao_header_write(buf, EMX_AO_HEADER_SIZE, &h);
    assert_int_equal(n, EMX_AO_HEADER_SIZE);
    return n;
}

static size_t build_get(uint8_t *buf, size_t cap, uint32_t rid, uint32_t eid)
{
    size_t n = emx_ao_build_request(buf, cap, EMX_AO_GET, rid, eid, SESSION, THING, "SteamSensor",
                                    PROPERTIES, "Temperature", NULL, 0);
    assert_true(n > 0);
    return n;
}

/* One chunk of a multipart POST: header with the multipart header, then
 * entityType · entityName · `payload` bytes. */
static size_t build_chunk(uint8_t *buf, size_t cap, uint32_t rid, uint16_t id, uint16_t count,
                          uint16_t size_field, size_t payload)
{
    struct emx_ao_header h = {.version = EMX_AO_VERSION,
                              .code = EMX_AO_POST,
                              .request_id = rid,
                              .endpoint_id = 0,
                              .session_id = SESSION,
                              .multipart = true,
                              .chunk_id = id,
                              .chunk_count = count,
                              .chunk_size = size_field};
    size_t n = emx_ao_header_write(buf, cap, &h);
    assert_int_equal(n, EMX_AO_HEADER_SIZE + EMX_AO_MULTIPART_SIZE);
    buf[n++] = THING;
    size_t s = emx_ao_write_str(buf + n, cap - n, "SteamSensor", 11);
    assert_true(s > 0);
    n += s;
    assert_true(cap - n >= payload);
    memset(buf + n, 'a' + id, payload);
    return n + payload;
}

static void edge_msg(struct fx *f, struct emx_edge *e, const uint8_t *buf, size_t len)
{
    uint8_t *copy = malloc(len ? len : 1);
    assert_non_null(copy);
    if (len)
        memcpy(copy, buf, len);
    emx_router_edge_message(f->r, e, copy, len, f->now);
    free(copy);
}

static void pipe_msg(struct fx *f, struct emx_pipe *p, const uint8_t *buf, size_t len)
{
    uint8_t *copy = malloc(len ? len : 1);
    assert_non_null(copy);
    if (len)
        memcpy(copy, buf, len);
    emx_router_pipe_message(f->r, p, copy, len, f->now);
    free(copy);
}

static void edge_get(struct fx *f, struct emx_edge *e, uint32_t rid)
{
    uint8_t buf[128];
    edge_msg(f, e, buf, build_get(buf, sizeof(buf), rid, 0));
}

static void edge_chunk(struct fx *f, struct emx_edge *e, uint32_t rid, uint16_t id, uint16_t count,
                       size_t payload)
{
    static uint8_t buf[16384];
    edge_msg(f, e, buf, build_chunk(buf, sizeof(buf), rid, id, count, (uint16_t)payload, payload));
}

static void edge_bind(struct fx *f, struct emx_edge *e, uint8_t code, uint32_t rid,
                      const char *const *names, size_t count)
{
    struct emx_ao_str s[8];
    assert_true(count <= 8);
    for (size_t i = 0; i < count; i++)
        s[i] = (struct emx_ao_str){(const uint8_t *)names[i], (uint32_t)strlen(names[i])};
    uint8_t buf[256];
    size_t n = emx_ao_build_bind(buf, sizeof(buf), code, rid, 0, SESSION, s, count);
    assert_true(n > 0);
    edge_msg(f, e, buf, n);
}

/* The edge answers a request it received (echoing requestId and endpointId). */
static void edge_answer(struct fx *f, struct emx_edge *e, uint8_t code,
                        const struct emx_ao_header *req)
{
    uint8_t buf[64];
    size_t n = emx_ao_build_response(buf, sizeof(buf), code, req->request_id, req->endpoint_id,
                                     req->session_id, NULL);
    edge_msg(f, e, buf, n);
}

static void pipe_answer(struct fx *f, struct emx_pipe *p, uint8_t code, uint32_t rid, uint32_t eid)
{
    uint8_t buf[64];
    size_t n = emx_ao_build_response(buf, sizeof(buf), code, rid, eid, SESSION, NULL);
    pipe_msg(f, p, buf, n);
}

static void platform_get(struct fx *f, struct emx_pipe *p, uint32_t rid, uint32_t eid)
{
    uint8_t buf[128];
    pipe_msg(f, p, buf, build_get(buf, sizeof(buf), rid, eid));
}

/* The one platform request the edge received since `from`. */
static struct emx_ao_header delivered(struct fx *f, size_t from, const struct emx_edge *e)
{
    assert_int_equal(count_edge_sends(f, from, e->id, ANY, ANY), 1);
    const struct ev *v = find_edge_send(f, from, e->id, EMX_AO_GET, ANY);
    assert_non_null(v);
    return v->h;
}

/* ---- pipes, instances, edges ---- */

static struct emx_instance_info info(const char *id, uint32_t weight, uint32_t priority)
{
    return (struct emx_instance_info){.id = id,
                                      .host = "127.0.0.1",
                                      .port = (uint16_t)(9000 + id[strlen(id) - 1]),
                                      .tls = false,
                                      .weight = weight,
                                      .priority = priority,
                                      .metadata = NULL};
}

static const char *const IDS[MAX_INST] = {"p1", "p2", "p3", "p4", "p5", "p6"};

/* Open a pipe and answer its AUTH with SUCCESS: the pipe is UP. */
static void pipe_up(struct fx *f, struct emx_pipe *p)
{
    size_t m = f->nev;
    emx_router_pipe_opened(f->r, p, f->now);
    const struct ev *a = NULL;
    for (size_t i = m; i < f->nev; i++)
        if (f->ev[i].kind == EV_PIPE_SEND && f->ev[i].pipe == p &&
            hmatch(&f->ev[i], EMX_AO_AUTH, ANY, ANY))
            a = &f->ev[i];
    assert_non_null(a);
    uint32_t rid = a->h.request_id, eid = a->h.endpoint_id;
    uint8_t buf[64];
    size_t n =
        emx_ao_build_response(buf, sizeof(buf), EMX_AO_SUCCESS, rid, eid, PIPE_SESSION, NULL);
    pipe_msg(f, p, buf, n);
    assert_int_equal(p->state, EMX_PIPE_UP);
}

static void instance_up(struct fx *f, struct emx_instance *inst)
{
    for (unsigned i = 0; i < inst->npipes; i++)
        pipe_up(f, &inst->pipes[i]);
}

static void instance_down(struct fx *f, struct emx_instance *inst)
{
    for (unsigned i = 0; i < inst->npipes; i++)
        emx_router_pipe_closed(f->r, &inst->pipes[i], f->now);
}

static void instance_queued(struct fx *f, struct emx_instance *inst, uint64_t queued)
{
    for (unsigned i = 0; i < inst->npipes; i++)
        emx_router_pipe_queued(f->r, &inst->pipes[i], queued, f->now);
}

/* A router with the instances of `set` (in that discovery order), every pipe UP. */
static void start(struct fx *f, const struct emx_instance_info *set, size_t n)
{
    f->r = emx_router_new(&f->cfg, &f->io, f->now);
    assert_non_null(f->r);
    if (n)
        emx_router_discovery_update(f->r, set, n, f->now);
    f->ninst = n;
    for (size_t i = 0; i < n; i++) {
        f->inst[i] = emx_router_instance_find(f->r, set[i].id);
        assert_non_null(f->inst[i]);
        assert_int_equal(f->inst[i]->npipes, f->cfg.pipes_per_instance);
        instance_up(f, f->inst[i]);
    }
    fx_clear(f);
}

static void start_equal(struct fx *f, size_t n)
{
    struct emx_instance_info set[MAX_INST];
    for (size_t i = 0; i < n; i++)
        set[i] = info(IDS[i], 1, 0);
    start(f, set, n);
}

static struct emx_edge *edge_open(struct fx *f)
{
    struct emx_edge *e = emx_router_edge_open(f->r, (void *)++f->next_conn, f->now);
    assert_non_null(e);
    return e;
}

static void edge_send_auth(struct fx *f, struct emx_edge *e, uint32_t rid)
{
    uint8_t buf[64];
    size_t n = emx_ao_build_auth(buf, sizeof(buf), rid, 0, "edge-key", 8);
    assert_true(n > 0);
    edge_msg(f, e, buf, n);
}

/* AUTH forwarded with endpointId := e->id, answered SUCCESS by the platform,
 * delivered with endpointId 0: the edge is AUTHED. */
static void edge_auth_ok(struct fx *f, struct emx_edge *e)
{
    uint32_t rid = f->next_rid++;
    size_t m = f->nev;
    edge_send_auth(f, e, rid);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 1);
    const struct ev *fw = find_pipe_send(f, m, EMX_AO_AUTH, rid, e->id);
    assert_non_null(fw);
    struct emx_pipe *p = fw->pipe;
    m = f->nev;
    pipe_answer(f, p, EMX_AO_SUCCESS, rid, e->id);
    const struct ev *a = find_edge_send(f, m, e->id, EMX_AO_SUCCESS, rid);
    assert_non_null(a);
    assert_int_equal(a->h.endpoint_id, 0);
    assert_int_equal(e->state, EMX_EDGE_AUTHED);
}

static struct emx_edge *edge_authed(struct fx *f)
{
    struct emx_edge *e = edge_open(f);
    edge_auth_ok(f, e);
    return e;
}

/* The pipe a request (eid, rid) was forwarded to since `from` (at most once), or NULL. */
static struct emx_pipe *forwarded_to(struct fx *f, size_t from, uint32_t eid, uint32_t rid)
{
    assert_true(count_pipe_sends(f, from, ANY, rid, eid) <= 1);
    const struct ev *v = find_pipe_send(f, from, ANY, rid, eid);
    return v ? v->pipe : NULL;
}

/* An edge GET; returns the pipe it was forwarded to, or NULL. */
static struct emx_pipe *get(struct fx *f, struct emx_edge *e, uint32_t *rid_out)
{
    uint32_t rid = f->next_rid++;
    size_t m = f->nev;
    edge_get(f, e, rid);
    if (rid_out)
        *rid_out = rid;
    return forwarded_to(f, m, e->id, rid);
}

/* An edge GET answered SUCCESS by whichever instance took it; returns that
 * instance's index in discovery order. */
static int get_answered(struct fx *f, struct emx_edge *e)
{
    uint32_t rid;
    struct emx_pipe *p = get(f, e, &rid);
    assert_non_null(p);
    size_t m = f->nev;
    pipe_answer(f, p, EMX_AO_SUCCESS, rid, e->id);
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_SUCCESS, rid));
    return inst_index(f, p->inst);
}

/* A BIND or UNBIND of `names`, answered `answer`; returns the pipe that took it. */
static struct emx_pipe *bind_answered(struct fx *f, struct emx_edge *e, uint8_t code,
                                      const char *const *names, size_t count, uint8_t answer)
{
    uint32_t rid = f->next_rid++;
    size_t m = f->nev;
    edge_bind(f, e, code, rid, names, count);
    const struct ev *v = find_pipe_send(f, m, code, rid, e->id);
    assert_non_null(v);
    assert_int_equal(v->h.session_id, SESSION);
    struct emx_pipe *p = v->pipe;
    m = f->nev;
    pipe_answer(f, p, answer, rid, e->id);
    assert_non_null(find_edge_send(f, m, e->id, answer, rid));
    return p;
}

static void tick_at(struct fx *f, uint64_t t)
{
    f->now = t;
    emx_router_tick(f->r, t);
}

/* ==== pipes ==== */

static void pipe_open_sends_auth_and_success_makes_it_up(void **state)
{
    struct fx *f = *state;
    struct emx_instance_info set[] = {info("p1", 1, 0)};
    f->r = emx_router_new(&f->cfg, &f->io, f->now);
    assert_non_null(f->r);
    emx_router_discovery_update(f->r, set, 1, f->now);
    assert_int_equal(count_kind(f, 0, EV_INST_ADDED), 1);
    struct emx_instance *in = emx_router_instance_find(f->r, "p1");
    assert_non_null(in);
    assert_int_equal(in->npipes, 2);
    assert_int_equal(emx_router_pipes_up(f->r), 0);

    struct emx_pipe *p = &in->pipes[0];
    size_t m = f->nev;
    emx_router_pipe_opened(f->r, p, f->now);
    assert_int_equal(p->state, EMX_PIPE_AUTHING);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 1);
    const struct ev *a = find_pipe_send(f, m, EMX_AO_AUTH, ANY, ANY);
    assert_non_null(a);
    assert_ptr_equal(a->pipe, p);
    assert_int_equal(a->h.session_id, EMX_AO_AUTH_SESSION);
    struct emx_ao_str key;
    assert_int_equal(
        emx_ao_auth_find_claim(a->buf + a->body_off, a->len - a->body_off, "appKey", &key),
        EMX_AO_OK);
    assert_true(emx_ao_str_eq(key, "pipe-key"));
    assert_int_equal(emx_router_pipes_up(f->r), 0); /* AUTHING does not count */

    uint32_t rid = a->h.request_id, eid = a->h.endpoint_id;
    uint8_t buf[64];
    pipe_msg(f, p, buf,
             emx_ao_build_response(buf, sizeof(buf), EMX_AO_SUCCESS, rid, eid, PIPE_SESSION, NULL));
    assert_int_equal(p->state, EMX_PIPE_UP);
    assert_int_equal(emx_router_pipes_up(f->r), 1);
    pipe_up(f, &in->pipes[1]);
    assert_int_equal(emx_router_pipes_up(f->r), 2);
    emx_router_pipe_closed(f->r, p, f->now);
    assert_int_equal(p->state, EMX_PIPE_DOWN);
    assert_int_equal(emx_router_pipes_up(f->r), 1);
}

static void pipe_auth_failure_closes_pipe(void **state)
{
    struct fx *f = *state;
    struct emx_instance_info set[] = {info("p1", 1, 0)};
    f->r = emx_router_new(&f->cfg, &f->io, f->now);
    emx_router_discovery_update(f->r, set, 1, f->now);
    struct emx_pipe *p = &emx_router_instance_find(f->r, "p1")->pipes[0];
    size_t m = f->nev;
    emx_router_pipe_opened(f->r, p, f->now);
    const struct ev *a = find_pipe_send(f, m, EMX_AO_AUTH, ANY, ANY);
    assert_non_null(a);
    uint32_t rid = a->h.request_id, eid = a->h.endpoint_id;
    m = f->nev;
    uint8_t buf[64];
    pipe_msg(f, p, buf,
             emx_ao_build_response(buf, sizeof(buf), EMX_AO_UNAUTHORIZED, rid, eid, 0, NULL));
    assert_int_equal(count_kind(f, m, EV_PIPE_CLOSE), 1);
    for (size_t i = m; i < f->nev; i++)
        if (f->ev[i].kind == EV_PIPE_CLOSE)
            assert_ptr_equal(f->ev[i].pipe, p);
    assert_int_not_equal(p->state, EMX_PIPE_UP);
    assert_int_equal(emx_router_pipes_up(f->r), 0);
    assert_int_equal(emx_router_stats(f->r)->pipe_auth_failures, 1);
}

/* ==== edge AUTH and stamping ==== */

static void edge_auth_forwarded_and_success_authenticates(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_open(f);
    assert_int_equal(e->state, EMX_EDGE_NEW);
    uint8_t buf[64];
    size_t n = emx_ao_build_auth(buf, sizeof(buf), 1, 0, "edge-key", 8);
    size_t m = f->nev;
    edge_msg(f, e, buf, n);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 1);
    const struct ev *v = find_pipe_send(f, m, EMX_AO_AUTH, 1, e->id);
    assert_non_null(v);
    assert_int_equal(v->h.session_id, EMX_AO_AUTH_SESSION);
    assert_int_equal(v->len, n);
    assert_memory_equal(v->buf + EMX_AO_HEADER_SIZE, buf + EMX_AO_HEADER_SIZE,
                        n - EMX_AO_HEADER_SIZE);
    assert_int_equal(e->state, EMX_EDGE_AUTHING);
    struct emx_pipe *p = v->pipe;
    m = f->nev;
    pipe_answer(f, p, EMX_AO_SUCCESS, 1, e->id);
    const struct ev *a = find_edge_send(f, m, e->id, EMX_AO_SUCCESS, 1);
    assert_non_null(a);
    assert_int_equal(a->h.endpoint_id, 0);
    assert_int_equal(a->h.session_id, SESSION);
    assert_int_equal(e->state, EMX_EDGE_AUTHED);
    assert_int_equal(emx_router_stats(f->r)->auth_ok, 1);
}

static void stamping_endpoint_id_out_and_restored_back(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint8_t buf[128];
    size_t n = build_get(buf, sizeof(buf), 5, 0);
    size_t m = f->nev;
    edge_msg(f, e, buf, n);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 1);
    const struct ev *v = find_pipe_send(f, m, EMX_AO_GET, 5, e->id);
    assert_non_null(v);
    assert_int_not_equal(v->h.endpoint_id, 0);
    assert_int_not_equal(v->h.endpoint_id & EMX_ENDPOINT_SEQ_MASK, 0);
    assert_int_equal(v->h.endpoint_id >> EMX_WORKER_SHIFT, f->cfg.worker);
    assert_int_equal(v->h.session_id, SESSION);
    assert_false(v->h.multipart);
    assert_int_equal(v->len, n);
    assert_memory_equal(v->buf + EMX_AO_HEADER_SIZE, buf + EMX_AO_HEADER_SIZE,
                        n - EMX_AO_HEADER_SIZE);
    struct emx_pipe *p = v->pipe;
    m = f->nev;
    pipe_answer(f, p, EMX_AO_SUCCESS, 5, e->id);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, ANY), 1);
    const struct ev *a = find_edge_send(f, m, e->id, EMX_AO_SUCCESS, 5);
    assert_non_null(a);
    assert_int_equal(a->h.endpoint_id, 0);
    assert_int_equal(a->h.session_id, SESSION);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
}

static void stamping_restores_nonzero_endpoint_id_the_edge_used(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    uint8_t buf[128];
    size_t m = f->nev;
    edge_msg(f, e, buf, build_get(buf, sizeof(buf), 6, 0x77));
    struct emx_pipe *p = forwarded_to(f, m, e->id, 6);
    assert_non_null(p);
    m = f->nev;
    pipe_answer(f, p, EMX_AO_SUCCESS, 6, e->id);
    const struct ev *a = find_edge_send(f, m, e->id, EMX_AO_SUCCESS, 6);
    assert_non_null(a);
    assert_int_equal(a->h.endpoint_id, 0x77);
}

/* ==== rule 1: round robin, fewest queued pipe ==== */

static void rr_follows_discovery_order(void **state)
{
    struct fx *f = *state;
    start_equal(f, 3);
    struct emx_edge *e = edge_authed(f);
    int seq[9];
    for (int i = 0; i < 9; i++)
        seq[i] = get_answered(f, e);
    for (int i = 0; i + 1 < 9; i++)
        assert_int_equal(seq[i + 1], (seq[i] + 1) % 3);
}

static void rr_pipe_with_fewest_queued_bytes(void **state)
{
    struct fx *f = *state;
    f->cfg.pipes_per_instance = 3;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    struct emx_instance *in = f->inst[0];
    emx_router_pipe_queued(f->r, &in->pipes[0], 5000, f->now);
    emx_router_pipe_queued(f->r, &in->pipes[1], 100, f->now);
    emx_router_pipe_queued(f->r, &in->pipes[2], 3000, f->now);
    assert_ptr_equal(get(f, e, NULL), &in->pipes[1]);
    emx_router_pipe_queued(f->r, &in->pipes[1], 9000, f->now);
    assert_ptr_equal(get(f, e, NULL), &in->pipes[2]);
    emx_router_pipe_queued(f->r, &in->pipes[0], 0, f->now);
    assert_ptr_equal(get(f, e, NULL), &in->pipes[0]);
}

static void rr_skips_unwritable_instance_without_credit(void **state)
{
    struct fx *f = *state;
    start_equal(f, 3);
    struct emx_edge *e = edge_authed(f);
    instance_queued(f, f->inst[1], HIGH(f) + 1);
    assert_false(emx_instance_is_eligible(f->r, f->inst[1], f->now));
    int prev = -1;
    for (int i = 0; i < 20; i++) {
        int k = get_answered(f, e);
        assert_int_not_equal(k, 1);
        assert_int_not_equal(k, prev); /* alternates between the other two */
        prev = k;
    }
    instance_queued(f, f->inst[1], 0);
    assert_true(emx_instance_is_eligible(f->r, f->inst[1], f->now));
    int n[3] = {0};
    for (int i = 0; i < 30; i++)
        n[get_answered(f, e)]++;
    for (int k = 0; k < 3; k++)
        assert_in_range(n[k], 9, 11); /* no burst for the instance that was skipped */
}

static void rr_even_over_30000_requests(void **state)
{
    struct fx *f = *state;
    start_equal(f, 3);
    struct emx_edge *e = edge_authed(f);
    int n[3] = {0};
    for (int i = 0; i < 30000; i++) {
        fx_clear(f);
        n[get_answered(f, e)]++;
    }
    for (int k = 0; k < 3; k++)
        assert_in_range(n[k], 9999, 10001);
}

/* ==== rule 2: watermarks and stall ==== */

static void wm_pipe_unwritable_until_it_falls_to_low(void **state)
{
    struct fx *f = *state;
    f->cfg.pipes_per_instance = 1;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *p1 = &f->inst[0]->pipes[0];
    emx_router_pipe_queued(f->r, p1, HIGH(f) + 1, f->now);
    assert_false(emx_pipe_is_writable(f->r, p1, f->now));
    for (int i = 0; i < 4; i++)
        assert_int_equal(get_answered(f, e), 1);
    emx_router_pipe_queued(f->r, p1, LOW(f) + 1, f->now);
    assert_false(emx_pipe_is_writable(f->r, p1, f->now));
    for (int i = 0; i < 4; i++)
        assert_int_equal(get_answered(f, e), 1);
    emx_router_pipe_queued(f->r, p1, LOW(f), f->now);
    assert_true(emx_pipe_is_writable(f->r, p1, f->now));
    int n[2] = {0};
    for (int i = 0; i < 4; i++)
        n[get_answered(f, e)]++;
    assert_true(n[0] >= 1 && n[1] >= 1);
}

static void stall_pipe_unwritable_until_it_receives(void **state)
{
    struct fx *f = *state;
    f->cfg.pipes_per_instance = 1;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *p1 = &f->inst[0]->pipes[0];
    int held = 0;
    for (int i = 0; i < 8 && held < 2; i++) {
        uint32_t rid;
        struct emx_pipe *p = get(f, e, &rid);
        assert_non_null(p);
        if (p == p1)
            held++; /* left unanswered */
        else
            pipe_answer(f, p, EMX_AO_SUCCESS, rid, e->id);
    }
    assert_int_equal(held, 2);
    f->now += f->cfg.stall_after - 1;
    assert_true(emx_pipe_is_writable(f->r, p1, f->now));
    f->now += 1;
    assert_false(emx_pipe_is_writable(f->r, p1, f->now));
    assert_false(emx_instance_is_eligible(f->r, f->inst[0], f->now));
    for (int i = 0; i < 4; i++)
        assert_int_equal(get_answered(f, e), 1);
    /* Any message from the pipe counts: here a platform request to the edge. */
    size_t m = f->nev;
    platform_get(f, p1, 0x500, e->id);
    assert_int_equal(count_edge_sends(f, m, e->id, EMX_AO_GET, ANY), 1);
    assert_true(emx_pipe_is_writable(f->r, p1, f->now));
    int n[2] = {0};
    for (int i = 0; i < 4; i++)
        n[get_answered(f, e)]++;
    assert_true(n[0] >= 1);
}

/* ==== rule 3: priority tiers and weights ==== */

static void tier_lowest_priority_number_is_used(void **state)
{
    struct fx *f = *state;
    struct emx_instance_info set[] = {info("a", 1, 2), info("b", 1, 1), info("c", 1, 1)};
    start(f, set, 3);
    struct emx_edge *e = edge_authed(f);
    int prev = -1;
    for (int i = 0; i < 6; i++) {
        int k = get_answered(f, e);
        assert_int_not_equal(k, 0);
        assert_int_not_equal(k, prev);
        prev = k;
    }
}

static void tier_backup_used_only_when_preferred_has_no_connected_instance(void **state)
{
    struct fx *f = *state;
    struct emx_instance_info set[] = {info("a", 1, 1), info("b", 1, 2)};
    start(f, set, 2);
    struct emx_edge *e = edge_authed(f);
    for (int i = 0; i < 3; i++)
        assert_int_equal(get_answered(f, e), 0);
    instance_down(f, f->inst[0]);
    for (int i = 0; i < 3; i++)
        assert_int_equal(get_answered(f, e), 1);
    instance_up(f, f->inst[0]);
    for (int i = 0; i < 3; i++)
        assert_int_equal(get_answered(f, e), 0);
}

static void tier_preferred_connected_but_unwritable_answers_a0(void **state)
{
    struct fx *f = *state;
    struct emx_instance_info set[] = {info("a", 1, 1), info("b", 1, 2)};
    start(f, set, 2);
    struct emx_edge *e = edge_authed(f);
    instance_queued(f, f->inst[0], HIGH(f) + 1);
    size_t m = f->nev;
    edge_get(f, e, 40);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, ANY), 1);
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_INTERNAL_ERROR, 40));
}

static void swrr_weights_1_2_3_over_60000(void **state)
{
    struct fx *f = *state;
    struct emx_instance_info set[] = {info("w1", 1, 0), info("w2", 2, 0), info("w3", 3, 0)};
    start(f, set, 3);
    struct emx_edge *e = edge_authed(f);
    int n[3] = {0};
    for (int i = 0; i < 60000; i++) {
        fx_clear(f);
        n[get_answered(f, e)]++;
    }
    assert_in_range(n[0], 10000 - 600, 10000 + 600);
    assert_in_range(n[1], 20000 - 600, 20000 + 600);
    assert_in_range(n[2], 30000 - 600, 30000 + 600);
}

static void weight_zero_used_only_when_no_positive_weight_is_eligible(void **state)
{
    struct fx *f = *state;
    struct emx_instance_info set[] = {info("z", 0, 0), info("w", 1, 0)};
    start(f, set, 2);
    struct emx_edge *e = edge_authed(f);
    for (int i = 0; i < 4; i++)
        assert_int_equal(get_answered(f, e), 1);
    instance_queued(f, f->inst[1], HIGH(f) + 1);
    for (int i = 0; i < 4; i++)
        assert_int_equal(get_answered(f, e), 0);
    instance_queued(f, f->inst[1], 0);
    for (int i = 0; i < 4; i++)
        assert_int_equal(get_answered(f, e), 1);
}

/* ==== rule 4: nothing eligible ==== */

static void no_connected_instance_answers_a0_not_forwarded(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    instance_down(f, f->inst[0]);
    size_t m = f->nev;
    edge_get(f, e, 77);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, ANY), 1);
    const struct ev *a = find_edge_send(f, m, e->id, EMX_AO_INTERNAL_ERROR, 77);
    assert_non_null(a);
    assert_int_equal(a->h.endpoint_id, 0);
    assert_int_equal(a->h.session_id, SESSION);
    assert_int_equal(count_edge_closes(f, m, e->id), 0);
    assert_true(emx_router_stats(f->r)->answers[EMX_ANS_NO_INSTANCE] >= 1);
}

static void all_instances_unwritable_answers_a0(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    instance_queued(f, f->inst[0], HIGH(f) + 1);
    instance_queued(f, f->inst[1], HIGH(f) + 1);
    size_t m = f->nev;
    edge_get(f, e, 78);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, ANY), 1);
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_INTERNAL_ERROR, 78));
}

/* ==== rule 5 and platform → edge requests ==== */

static void platform_request_delivered_and_answer_returns_on_its_pipe(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *p = &f->inst[1]->pipes[1];
    uint8_t buf[128];
    size_t n = build_get(buf, sizeof(buf), 0x309, e->id);
    size_t m = f->nev;
    pipe_msg(f, p, buf, n);
    struct emx_ao_header h = delivered(f, m, e);
    const struct ev *v = find_edge_send(f, m, e->id, EMX_AO_GET, ANY);
    assert_int_equal(h.session_id, SESSION);
    assert_int_equal(v->len, n);
    assert_memory_equal(v->buf + EMX_AO_HEADER_SIZE, buf + EMX_AO_HEADER_SIZE,
                        n - EMX_AO_HEADER_SIZE);
    m = f->nev;
    edge_answer(f, e, EMX_AO_SUCCESS, &h);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 1);
    const struct ev *a = find_pipe_send(f, m, EMX_AO_SUCCESS, 0x309, e->id);
    assert_non_null(a);
    assert_ptr_equal(a->pipe, p);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, ANY), 0);
}

static void edge_answer_dropped_when_its_pipe_is_gone(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *p = &f->inst[0]->pipes[0];
    size_t m = f->nev;
    platform_get(f, p, 0x309, e->id);
    struct emx_ao_header h = delivered(f, m, e);
    emx_router_pipe_closed(f->r, p, f->now);
    m = f->nev;
    edge_answer(f, e, EMX_AO_SUCCESS, &h);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    assert_int_equal(emx_router_stats(f->r)->edge_answers_pipe_gone, 1);
    assert_int_equal(count_edge_closes(f, m, e->id), 0);
}

static void platform_requests_same_id_from_two_pipes_are_kept_apart(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *pa = &f->inst[0]->pipes[0], *pb = &f->inst[1]->pipes[0];
    size_t m = f->nev;
    platform_get(f, pa, 0x309, e->id);
    struct emx_ao_header ha = delivered(f, m, e);
    m = f->nev;
    platform_get(f, pb, 0x309, e->id);
    struct emx_ao_header hb = delivered(f, m, e);
    assert_int_not_equal(ha.request_id, hb.request_id);

    m = f->nev;
    edge_answer(f, e, EMX_AO_NOT_FOUND, &hb);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 1);
    const struct ev *a = find_pipe_send(f, m, EMX_AO_NOT_FOUND, 0x309, e->id);
    assert_non_null(a);
    assert_ptr_equal(a->pipe, pb);
    m = f->nev;
    edge_answer(f, e, EMX_AO_SUCCESS, &ha);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 1);
    a = find_pipe_send(f, m, EMX_AO_SUCCESS, 0x309, e->id);
    assert_non_null(a);
    assert_ptr_equal(a->pipe, pa);
}

static void platform_request_for_unknown_endpoint_answers_a3(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *p = &f->inst[0]->pipes[1];
    uint32_t ghost = ((uint32_t)f->cfg.worker << EMX_WORKER_SHIFT) | 0x0FFFFFF0u;
    assert_int_not_equal(ghost, e->id);
    size_t m = f->nev;
    platform_get(f, p, 0x309, ghost);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 1);
    const struct ev *a = find_pipe_send(f, m, EMX_AO_SERVICE_UNAVAILABLE, 0x309, ghost);
    assert_non_null(a);
    assert_ptr_equal(a->pipe, p);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, ANY), 0);

    uint32_t id = e->id;
    emx_router_edge_closed(f->r, e, f->now);
    m = f->nev;
    platform_get(f, p, 0x30A, id);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 1);
    a = find_pipe_send(f, m, EMX_AO_SERVICE_UNAVAILABLE, 0x30A, id);
    assert_non_null(a);
    assert_ptr_equal(a->pipe, p);
    assert_int_equal(emx_router_stats(f->r)->answers[EMX_ANS_ENDPOINT_GONE], 2);
}

static void platform_request_unanswered_by_edge_gets_a4_late_answer_dropped(void **state)
{
    struct fx *f = *state;
    f->cfg.edge_request_timeout = 5000;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *p = &f->inst[1]->pipes[0];
    uint64_t t0 = f->now;
    size_t m = f->nev;
    platform_get(f, p, 0x309, e->id);
    struct emx_ao_header h = delivered(f, m, e);
    tick_at(f, t0 + 4999);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    tick_at(f, t0 + 5001);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 1);
    const struct ev *a = find_pipe_send(f, m, EMX_AO_GATEWAY_TIMEOUT, 0x309, e->id);
    assert_non_null(a);
    assert_ptr_equal(a->pipe, p);
    m = f->nev;
    edge_answer(f, e, EMX_AO_SUCCESS, &h);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    assert_int_equal(emx_router_stats(f->r)->late_edge_answers, 1);
    assert_int_equal(emx_router_stats(f->r)->answers[EMX_ANS_EDGE_TIMEOUT], 1);
}

static void edge_leaving_with_platform_requests_answers_a3_on_their_pipes(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *pa = &f->inst[0]->pipes[1], *pb = &f->inst[1]->pipes[0];
    platform_get(f, pa, 0x10, e->id);
    platform_get(f, pb, 0x20, e->id);
    uint32_t id = e->id;
    size_t m = f->nev;
    emx_router_edge_closed(f->r, e, f->now);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 2);
    const struct ev *a = find_pipe_send(f, m, EMX_AO_SERVICE_UNAVAILABLE, 0x10, id);
    assert_non_null(a);
    assert_ptr_equal(a->pipe, pa);
    a = find_pipe_send(f, m, EMX_AO_SERVICE_UNAVAILABLE, 0x20, id);
    assert_non_null(a);
    assert_ptr_equal(a->pipe, pb);
    assert_int_equal(emx_router_stats(f->r)->answers[EMX_ANS_EDGE_LEFT], 2);
}

/* A chunk of a multipart message from a platform, or an edge's chunked answer. */
static size_t build_raw_chunk(uint8_t *buf, uint8_t code, uint32_t rid, uint32_t eid, uint16_t id,
                              uint16_t count, bool prefix)
{
    struct emx_ao_header h = {.version = EMX_AO_VERSION,
                              .code = code,
                              .request_id = rid,
                              .endpoint_id = eid,
                              .session_id = SESSION,
                              .multipart = true,
                              .chunk_id = id,
                              .chunk_count = count,
                              .chunk_size = 64};
    size_t n = emx_ao_header_write(buf, 128, &h);
    if (prefix) {
        buf[n++] = THING;
        n += emx_ao_write_str(buf + n, 64, "SteamSensor", 11);
    }
    memset(buf + n, 'a' + id, 64);
    return n + 64;
}

static void platform_multipart_request_chunks_share_one_rewritten_id(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *pa = &f->inst[0]->pipes[0], *pb = &f->inst[1]->pipes[0];
    uint8_t buf[128];
    size_t m = f->nev;
    /* Two chunked PUTs with the same requestId from two pipes, interleaved. */
    for (uint16_t id = 1; id <= 3; id++) {
        pipe_msg(f, pa, buf, build_raw_chunk(buf, EMX_AO_PUT, 0x900, e->id, id, 3, true));
        pipe_msg(f, pb, buf, build_raw_chunk(buf, EMX_AO_PUT, 0x900, e->id, id, 3, true));
    }
    assert_int_equal(count_edge_sends(f, m, e->id, EMX_AO_PUT, ANY), 6);
    uint32_t ra = 0, rb = 0;
    int k = 0;
    for (size_t i = m; i < f->nev; i++) {
        const struct ev *v = &f->ev[i];
        if (v->kind != EV_EDGE_SEND)
            continue;
        assert_true(v->h.multipart);
        uint32_t *want = (k % 2 == 0) ? &ra : &rb;
        if (*want == 0)
            *want = v->h.request_id;
        assert_int_equal(v->h.request_id, *want);
        k++;
    }
    assert_int_not_equal(ra, rb);
    struct emx_ao_header ha = {.request_id = ra, .endpoint_id = e->id, .session_id = SESSION};
    struct emx_ao_header hb = {.request_id = rb, .endpoint_id = e->id, .session_id = SESSION};
    for (size_t i = m; i < f->nev; i++)
        if (f->ev[i].kind == EV_EDGE_SEND) {
            ha.endpoint_id = hb.endpoint_id = f->ev[i].h.endpoint_id;
            break;
        }
    m = f->nev;
    edge_answer(f, e, EMX_AO_SUCCESS, &ha);
    edge_answer(f, e, EMX_AO_NOT_FOUND, &hb);
    const struct ev *a = find_pipe_send(f, m, EMX_AO_SUCCESS, 0x900, e->id);
    assert_non_null(a);
    assert_ptr_equal(a->pipe, pa);
    a = find_pipe_send(f, m, EMX_AO_NOT_FOUND, 0x900, e->id);
    assert_non_null(a);
    assert_ptr_equal(a->pipe, pb);
}

static void edge_multipart_answer_goes_back_whole_on_its_pipe(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *p = &f->inst[1]->pipes[1];
    size_t m = f->nev;
    platform_get(f, p, 0x901, e->id);
    struct emx_ao_header h = delivered(f, m, e);
    uint8_t buf[128];
    m = f->nev;
    for (uint16_t id = 1; id <= 3; id++)
        edge_msg(f, e, buf,
                 build_raw_chunk(buf, EMX_AO_SUCCESS, h.request_id, h.endpoint_id, id, 3, false));
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 3);
    int n = 0;
    for (size_t i = m; i < f->nev; i++) {
        const struct ev *v = &f->ev[i];
        if (v->kind != EV_PIPE_SEND)
            continue;
        assert_ptr_equal(v->pipe, p);
        assert_true(hmatch(v, EMX_AO_SUCCESS, 0x901, e->id));
        assert_int_equal(v->h.chunk_id, ++n);
    }
    assert_int_equal(count_edge_closes(f, m, e->id), 0);
}

/* ==== pending edge requests ==== */

static void pending_request_whose_pipe_closes_gets_a3(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint32_t rid;
    struct emx_pipe *p = get(f, e, &rid);
    assert_non_null(p);
    size_t m = f->nev;
    emx_router_pipe_closed(f->r, p, f->now);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, rid), 1);
    const struct ev *a = find_edge_send(f, m, e->id, EMX_AO_SERVICE_UNAVAILABLE, rid);
    assert_non_null(a);
    assert_int_equal(a->h.endpoint_id, 0);
    tick_at(f, f->now + 3 * f->cfg.request_timeout);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, rid), 1); /* exactly one answer */
}

static void pending_request_times_out_a4_late_answer_dropped(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint64_t t0 = f->now;
    uint32_t rid;
    struct emx_pipe *p = get(f, e, &rid);
    assert_non_null(p);
    size_t m = f->nev;
    tick_at(f, t0 + f->cfg.request_timeout - 1);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, rid), 0);
    tick_at(f, t0 + f->cfg.request_timeout + 1);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, rid), 1);
    const struct ev *a = find_edge_send(f, m, e->id, EMX_AO_GATEWAY_TIMEOUT, rid);
    assert_non_null(a);
    assert_int_equal(a->h.endpoint_id, 0);
    m = f->nev;
    pipe_answer(f, p, EMX_AO_SUCCESS, rid, e->id);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, ANY), 0);
    assert_int_equal(emx_router_stats(f->r)->late_platform_answers, 1);
}

static void pending_cap_answers_a3_and_does_not_forward(void **state)
{
    struct fx *f = *state;
    f->cfg.max_pending = 3;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint32_t rids[3];
    struct emx_pipe *pipes[3];
    for (int i = 0; i < 3; i++) {
        pipes[i] = get(f, e, &rids[i]);
        assert_non_null(pipes[i]);
    }
    size_t m = f->nev;
    uint32_t rid;
    assert_null(get(f, e, &rid));
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, ANY), 1);
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_SERVICE_UNAVAILABLE, rid));
    assert_int_equal(emx_router_stats(f->r)->answers[EMX_ANS_TOO_MANY_PENDING], 1);
    /* One answered frees a slot. */
    pipe_answer(f, pipes[0], EMX_AO_SUCCESS, rids[0], e->id);
    assert_non_null(get(f, e, NULL));
}

static void platform_answer_after_edge_left_is_dropped(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint32_t rid;
    struct emx_pipe *p = get(f, e, &rid);
    assert_non_null(p);
    uint32_t id = e->id;
    emx_router_edge_closed(f->r, e, f->now);
    size_t m = f->nev;
    pipe_answer(f, p, EMX_AO_SUCCESS, rid, id);
    assert_int_equal(count_kind(f, m, EV_EDGE_SEND), 0);
    assert_int_equal(count_kind(f, m, EV_PIPE_SEND), 0);
    assert_int_equal(emx_router_stats(f->r)->late_platform_answers, 1);
}

/* ==== answers edgemux gives itself, and closes ==== */

static void keep_alive_answered_40_never_forwarded(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    uint8_t buf[EMX_AO_HEADER_SIZE];
    size_t m = f->nev;
    edge_msg(f, e, buf, header_only(buf, EMX_AO_KEEP_ALIVE, 9, 0, SESSION));
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, ANY), 1);
    const struct ev *a = find_edge_send(f, m, e->id, EMX_AO_SUCCESS, 9);
    assert_non_null(a);
    assert_int_equal(a->h.session_id, SESSION);
    assert_int_equal(a->h.endpoint_id, 0);
}

static void unknown_code_answers_80(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    uint8_t buf[32];
    size_t n = header_only(buf, 0x30, 11, 0, SESSION);
    buf[n++] = THING;
    buf[n++] = 0;
    buf[n++] = EMX_BT_NOTHING;
    size_t m = f->nev;
    edge_msg(f, e, buf, n);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, ANY), 1);
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_BAD_REQUEST, 11));
    assert_int_equal(count_edge_closes(f, m, e->id), 0);
}

static void unparseable_body_answers_80(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    uint8_t buf[32];
    size_t n = header_only(buf, EMX_AO_GET, 12, 0, SESSION);
    buf[n++] = THING;
    buf[n++] = 0x30; /* a 48-byte entity name ... */
    buf[n++] = 'a';  /* ... of which two bytes arrive */
    buf[n++] = 'b';
    size_t m = f->nev;
    edge_msg(f, e, buf, n);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, ANY), 1);
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_BAD_REQUEST, 12));
    assert_int_equal(count_edge_closes(f, m, e->id), 0);
}

static void short_header_closes_1007(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    uint8_t buf[10] = {EMX_AO_VERSION, EMX_AO_GET, 0, 0, 0, 13, 0, 0, 0, 0};
    size_t m = f->nev;
    edge_msg(f, e, buf, sizeof(buf));
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    assert_int_equal(count_edge_closes(f, m, e->id), 1);
    assert_int_equal(f->ev[find_edge_close(f, m, e->id)].close_code, 1007);
}

static void bad_multipart_header_closes_1007(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e1 = edge_authed(f);
    struct emx_edge *e2 = edge_authed(f);
    uint8_t buf[64];
    size_t n = header_only(buf, EMX_AO_POST, 14, 0, SESSION);
    buf[EMX_AO_OFF_MULTIPART] = 1; /* multipart, but no multipart header */
    size_t m = f->nev;
    edge_msg(f, e1, buf, n);
    assert_int_equal(count_edge_closes(f, m, e1->id), 1);
    assert_int_equal(f->ev[find_edge_close(f, m, e1->id)].close_code, 1007);
    /* chunkId 3 of 2 */
    uint8_t mp[EMX_AO_MULTIPART_SIZE] = {0, 3, 0, 2, 0, 16};
    memcpy(buf + n, mp, sizeof(mp));
    n += sizeof(mp);
    buf[n++] = THING;
    buf[n++] = 0;
    m = f->nev;
    edge_msg(f, e2, buf, n);
    assert_int_equal(count_edge_closes(f, m, e2->id), 1);
    assert_int_equal(f->ev[find_edge_close(f, m, e2->id)].close_code, 1007);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
}

static void message_over_max_message_size_closes_1009(void **state)
{
    struct fx *f = *state;
    f->cfg.max_message_size = 4096;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    static uint8_t buf[5000];
    memset(buf, 0, sizeof(buf));
    header_only(buf, EMX_AO_GET, 15, 0, SESSION);
    size_t m = f->nev;
    edge_msg(f, e, buf, sizeof(buf));
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    assert_int_equal(count_edge_closes(f, m, e->id), 1);
    assert_int_equal(f->ev[find_edge_close(f, m, e->id)].close_code, 1009);
    /* Exactly max_message_size is allowed (its body is garbage: 0x80, no close). */
    struct emx_edge *e2 = edge_authed(f);
    m = f->nev;
    edge_msg(f, e2, buf, 4096);
    assert_int_equal(count_edge_closes(f, m, e2->id), 0);
}

static void slow_consumer_closed_1008(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    f->enobufs = e;
    uint8_t buf[EMX_AO_HEADER_SIZE];
    size_t m = f->nev;
    edge_msg(f, e, buf, header_only(buf, EMX_AO_KEEP_ALIVE, 16, 0, SESSION));
    assert_int_equal(count_edge_closes(f, m, e->id), 1);
    assert_int_equal(f->ev[find_edge_close(f, m, e->id)].close_code, 1008);
    assert_int_equal(emx_router_stats(f->r)->slow_consumer_closes, 1);
}

/* ==== AUTH gating ==== */

static void request_before_auth_closes_1008(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_open(f);
    size_t m = f->nev;
    edge_get(f, e, 1);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    assert_int_equal(count_edge_closes(f, m, e->id), 1);
    assert_int_equal(f->ev[find_edge_close(f, m, e->id)].close_code, 1008);
}

static void request_while_auth_pending_closes_1008(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_open(f);
    edge_send_auth(f, e, 1);
    size_t m = f->nev;
    edge_get(f, e, 2);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    assert_int_equal(count_edge_closes(f, m, e->id), 1);
    assert_int_equal(f->ev[find_edge_close(f, m, e->id)].close_code, 1008);
}

static void auth_failure_delivered_then_closed_1008(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_open(f);
    size_t m = f->nev;
    edge_send_auth(f, e, 1);
    struct emx_pipe *p = forwarded_to(f, m, e->id, 1);
    assert_non_null(p);
    m = f->nev;
    pipe_answer(f, p, EMX_AO_UNAUTHORIZED, 1, e->id);
    const struct ev *a = find_edge_send(f, m, e->id, EMX_AO_UNAUTHORIZED, 1);
    assert_non_null(a);
    assert_int_equal(a->h.endpoint_id, 0);
    long sent_at = (long)(a - f->ev);
    long closed_at = find_edge_close(f, m, e->id);
    assert_true(closed_at > sent_at);
    assert_int_equal(f->ev[closed_at].close_code, 1008);
    assert_int_equal(count_edge_closes(f, m, e->id), 1);
    assert_int_not_equal(e->state, EMX_EDGE_AUTHED);
    assert_int_equal(emx_router_stats(f->r)->auth_failed, 1);
}

static void auth_answered_by_edgemux_keeps_edge_open(void **state)
{
    struct fx *f = *state;
    struct emx_instance_info set[] = {info("p1", 1, 0)};
    f->r = emx_router_new(&f->cfg, &f->io, f->now);
    emx_router_discovery_update(f->r, set, 1, f->now); /* no pipe up yet */
    f->inst[0] = emx_router_instance_find(f->r, "p1");
    f->ninst = 1;
    struct emx_edge *e = edge_open(f);
    size_t m = f->nev;
    edge_send_auth(f, e, 1);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, ANY), 1);
    const struct ev *a = find_edge_send(f, m, e->id, EMX_AO_INTERNAL_ERROR, 1);
    assert_non_null(a);
    assert_int_equal(a->h.endpoint_id, 0);
    assert_int_equal(a->h.session_id, EMX_AO_AUTH_SESSION);
    assert_int_equal(count_edge_closes(f, m, e->id), 0);
    assert_int_not_equal(e->state, EMX_EDGE_AUTHED);
    instance_up(f, f->inst[0]);
    edge_auth_ok(f, e);
    assert_int_equal(count_edge_closes(f, 0, e->id), 0);
}

static void no_auth_within_auth_timeout_closes_1008(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    uint64_t t0 = f->now;
    struct emx_edge *silent = edge_open(f);
    struct emx_edge *ok = edge_authed(f);
    size_t m = f->nev;
    tick_at(f, t0 + f->cfg.auth_timeout - 1);
    assert_int_equal(count_kind(f, m, EV_EDGE_CLOSE), 0);
    tick_at(f, t0 + f->cfg.auth_timeout + 1);
    assert_int_equal(count_edge_closes(f, m, silent->id), 1);
    assert_int_equal(f->ev[find_edge_close(f, m, silent->id)].close_code, 1008);
    assert_int_equal(count_edge_closes(f, m, ok->id), 0);
    assert_int_equal(emx_router_stats(f->r)->auth_timeouts, 1);
}

/* ==== rule 6: multipart ==== */

/* Every chunk of `rid` sent since `from` went to pipe `p`, chunk ids 1..n in
 * order, stamped with the edge's id; returns n. */
static int chunks_on(struct fx *f, size_t from, uint32_t eid, uint32_t rid, struct emx_pipe *p)
{
    int n = 0;
    for (size_t i = from; i < f->nev; i++) {
        const struct ev *v = &f->ev[i];
        if (v->kind != EV_PIPE_SEND || !hmatch(v, ANY, rid, ANY))
            continue;
        assert_ptr_equal(v->pipe, p);
        assert_int_equal(v->h.endpoint_id, eid);
        assert_true(v->h.multipart);
        assert_int_equal(v->h.chunk_id, n + 1);
        n++;
    }
    return n;
}

static void multipart_later_chunks_follow_the_first(void **state)
{
    struct fx *f = *state;
    start_equal(f, 3);
    struct emx_edge *e = edge_authed(f);
    uint32_t rid = f->next_rid++;
    size_t m0 = f->nev;
    edge_chunk(f, e, rid, 1, 3, 200);
    struct emx_pipe *p = forwarded_to(f, m0, e->id, rid);
    assert_non_null(p);
    int pinned = inst_index(f, p->inst), elsewhere = 0;
    for (uint16_t id = 2; id <= 3; id++) {
        if (get_answered(f, e) != pinned)
            elsewhere++;
        edge_chunk(f, e, rid, id, 3, 200);
    }
    assert_true(elsewhere >= 1); /* round robin moved on, the chunks did not */
    assert_int_equal(chunks_on(f, m0, e->id, rid, p), 3);
    size_t m = f->nev;
    pipe_answer(f, p, EMX_AO_SUCCESS, rid, e->id);
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_SUCCESS, rid));
}

static void multipart_pinned_pipe_over_high_holds_chunk_until_it_recovers(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint32_t rid = f->next_rid++;
    size_t m0 = f->nev;
    edge_chunk(f, e, rid, 1, 3, 300);
    struct emx_pipe *p = forwarded_to(f, m0, e->id, rid);
    assert_non_null(p);
    emx_router_pipe_queued(f->r, p, HIGH(f) + 1, f->now);
    size_t m = f->nev;
    edge_chunk(f, e, rid, 2, 3, 300);
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    assert_true(edge_paused(f, m, e->id, true));
    f->now += f->cfg.multipart_pin_wait / 4;
    m = f->nev;
    emx_router_pipe_queued(f->r, p, LOW(f), f->now);
    assert_int_equal(count_pipe_sends(f, m, ANY, rid, e->id), 1);
    assert_true(edge_paused(f, m, e->id, false));
    edge_chunk(f, e, rid, 3, 3, 300);
    assert_int_equal(chunks_on(f, m0, e->id, rid, p), 3);
    assert_int_equal(count_edge_sends(f, m0, e->id, ANY, rid), 0);
}

static void multipart_pin_wait_expired_one_a0_rest_dropped(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint32_t rid = f->next_rid++;
    size_t m0 = f->nev;
    edge_chunk(f, e, rid, 1, 4, 300);
    struct emx_pipe *p = forwarded_to(f, m0, e->id, rid);
    assert_non_null(p);
    emx_router_pipe_queued(f->r, p, HIGH(f) + 1, f->now);
    uint64_t t0 = f->now;
    size_t m = f->nev;
    edge_chunk(f, e, rid, 2, 4, 300);
    assert_true(edge_paused(f, m, e->id, true));
    tick_at(f, t0 + f->cfg.multipart_pin_wait - 1);
    assert_int_equal(count_edge_sends(f, m0, e->id, ANY, rid), 0);
    m = f->nev;
    tick_at(f, t0 + f->cfg.multipart_pin_wait + 1);
    assert_int_equal(count_edge_sends(f, m0, e->id, ANY, rid), 1);
    assert_non_null(find_edge_send(f, m0, e->id, EMX_AO_INTERNAL_ERROR, rid));
    assert_true(edge_paused(f, m, e->id, false));
    emx_router_pipe_queued(f->r, p, 0, f->now);
    edge_chunk(f, e, rid, 3, 4, 300);
    edge_chunk(f, e, rid, 4, 4, 300);
    assert_int_equal(count_pipe_sends(f, m0, ANY, rid, ANY), 1); /* chunk 1 only */
    pipe_answer(f, p, EMX_AO_BAD_REQUEST, rid, e->id); /* the platform gave up on it too */
    tick_at(f, f->now + 3 * f->cfg.request_timeout);
    assert_int_equal(count_edge_sends(f, m0, e->id, ANY, rid), 1);
    assert_true(emx_router_stats(f->r)->chunks_discarded >= 2);
}

static void multipart_pinned_pipe_closed_midway_one_a0(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint32_t rid = f->next_rid++;
    size_t m0 = f->nev;
    edge_chunk(f, e, rid, 1, 3, 300);
    struct emx_pipe *p = forwarded_to(f, m0, e->id, rid);
    assert_non_null(p);
    emx_router_pipe_closed(f->r, p, f->now);
    edge_chunk(f, e, rid, 2, 3, 300);
    edge_chunk(f, e, rid, 3, 3, 300);
    assert_int_equal(count_pipe_sends(f, m0, ANY, rid, ANY), 1);
    tick_at(f, f->now + 3 * f->cfg.request_timeout);
    assert_int_equal(count_edge_sends(f, m0, e->id, ANY, rid), 1);
    assert_non_null(find_edge_send(f, m0, e->id, EMX_AO_INTERNAL_ERROR, rid));
}

static void multipart_total_over_max_answers_8d_once(void **state)
{
    struct fx *f = *state;
    f->cfg.max_message_size = 4096;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint32_t rid = f->next_rid++;
    size_t m0 = f->nev;
    edge_chunk(f, e, rid, 1, 4, 1500);
    edge_chunk(f, e, rid, 2, 4, 1500);
    assert_int_equal(count_pipe_sends(f, m0, ANY, rid, ANY), 2);
    assert_int_equal(count_edge_sends(f, m0, e->id, ANY, rid), 0);
    edge_chunk(f, e, rid, 3, 4, 1500); /* total now over 4096 */
    assert_int_equal(count_edge_sends(f, m0, e->id, ANY, rid), 1);
    assert_non_null(find_edge_send(f, m0, e->id, EMX_AO_ENTITY_TOO_LARGE, rid));
    edge_chunk(f, e, rid, 4, 4, 1500);
    assert_int_equal(count_pipe_sends(f, m0, ANY, rid, ANY), 2);
    struct emx_pipe *p = NULL;
    for (size_t i = m0; i < f->nev; i++)
        if (f->ev[i].kind == EV_PIPE_SEND && hmatch(&f->ev[i], ANY, rid, e->id))
            p = f->ev[i].pipe;
    assert_non_null(p);
    pipe_answer(f, p, EMX_AO_BAD_REQUEST, rid, e->id); /* not a second answer */
    tick_at(f, f->now + 3 * f->cfg.request_timeout);
    assert_int_equal(count_edge_sends(f, m0, e->id, ANY, rid), 1);
    assert_int_equal(count_edge_closes(f, m0, e->id), 0);
    assert_int_equal(emx_router_stats(f->r)->answers[EMX_ANS_TOO_LARGE], 1);
}

static void multipart_size_counts_real_bytes_not_count_times_size(void **state)
{
    struct fx *f = *state;
    f->cfg.max_message_size = 4096;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint32_t rid = f->next_rid++;
    size_t m0 = f->nev;
    static uint8_t buf[2048];
    for (uint16_t id = 1; id <= 3; id++) /* chunkSize says 8192; each carries 1000 */
        edge_msg(f, e, buf, build_chunk(buf, sizeof(buf), rid, id, 3, 8192, 1000));
    assert_int_equal(count_pipe_sends(f, m0, ANY, rid, ANY), 3);
    assert_int_equal(count_edge_sends(f, m0, e->id, ANY, rid), 0);
}

static void multipart_request_timeout_starts_at_last_chunk(void **state)
{
    struct fx *f = *state;
    f->cfg.stall_after = 0;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint32_t rid = f->next_rid++;
    uint64_t t0 = f->now;
    size_t m0 = f->nev;
    edge_chunk(f, e, rid, 1, 3, 100);
    tick_at(f, t0 + 3000);
    edge_chunk(f, e, rid, 2, 3, 100);
    tick_at(f, t0 + 6000);
    edge_chunk(f, e, rid, 3, 3, 100);
    assert_int_equal(count_pipe_sends(f, m0, ANY, rid, ANY), 3);
    tick_at(f, t0 + f->cfg.request_timeout + 1); /* past the timeout counted from chunk 1 */
    assert_int_equal(count_edge_sends(f, m0, e->id, ANY, rid), 0);
    tick_at(f, t0 + 6000 + f->cfg.request_timeout - 1);
    assert_int_equal(count_edge_sends(f, m0, e->id, ANY, rid), 0);
    tick_at(f, t0 + 6000 + f->cfg.request_timeout + 1);
    assert_int_equal(count_edge_sends(f, m0, e->id, ANY, rid), 1);
    assert_non_null(find_edge_send(f, m0, e->id, EMX_AO_GATEWAY_TIMEOUT, rid));
}

/* ==== binds ==== */

static const char *const THINGS[] = {"SteamSensor", "Pump"};

static void bind_success_records_things(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint32_t rid = f->next_rid++;
    size_t m = f->nev;
    edge_bind(f, e, EMX_AO_BIND, rid, THINGS, 2);
    struct emx_pipe *p = forwarded_to(f, m, e->id, rid);
    assert_non_null(p);
    assert_false(emx_edge_has_thing(e, "SteamSensor"));
    pipe_answer(f, p, EMX_AO_SUCCESS, rid, e->id);
    assert_true(emx_edge_has_thing(e, "SteamSensor"));
    assert_true(emx_edge_has_thing(e, "Pump"));
    assert_false(emx_edge_has_thing(e, "Other"));
    assert_int_equal(e->nthings, 2);
}

static void bind_failure_records_nothing(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    size_t m = f->nev;
    bind_answered(f, e, EMX_AO_BIND, THINGS, 2, EMX_AO_FORBIDDEN);
    assert_false(emx_edge_has_thing(e, "SteamSensor"));
    assert_false(emx_edge_has_thing(e, "Pump"));
    assert_int_equal(count_edge_closes(f, m, e->id), 0);
}

static void edge_unbind_forgets_things(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    bind_answered(f, e, EMX_AO_BIND, THINGS, 2, EMX_AO_SUCCESS);
    bind_answered(f, e, EMX_AO_UNBIND, &THINGS[1], 1, EMX_AO_SUCCESS);
    assert_true(emx_edge_has_thing(e, "SteamSensor"));
    assert_false(emx_edge_has_thing(e, "Pump"));
}

/* The one UNBIND sent since `from` for endpoint `eid`: checks it and returns it. */
static const struct ev *unbind_sent(struct fx *f, size_t from, uint32_t eid)
{
    assert_int_equal(count_pipe_sends(f, from, ANY, ANY, ANY), 1);
    const struct ev *v = find_pipe_send(f, from, EMX_AO_UNBIND, ANY, eid);
    assert_non_null(v);
    assert_int_equal(v->h.session_id, SESSION);
    assert_true(v->h.request_id >= EMX_OWN_REQUEST_ID_BASE);
    assert_int_equal(v->pipe->state, EMX_PIPE_UP);
    struct emx_ao_bind b;
    assert_int_equal(emx_ao_bind_parse(v->buf + v->body_off, v->len - v->body_off, &b), EMX_AO_OK);
    assert_int_equal(b.count, 2);
    bool seen[2] = {false, false};
    size_t cur = 0;
    struct emx_ao_str s;
    while (emx_ao_bind_next_name(&b, &cur, &s) == EMX_AO_OK)
        for (int i = 0; i < 2; i++)
            if (emx_ao_str_eq(s, THINGS[i]))
                seen[i] = true;
    assert_true(seen[0] && seen[1]);
    return v;
}

static void edge_close_unbinds_on_the_instance_that_took_the_bind(void **state)
{
    struct fx *f = *state;
    start_equal(f, 3);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *bp = bind_answered(f, e, EMX_AO_BIND, THINGS, 2, EMX_AO_SUCCESS);
    int bi = inst_index(f, bp->inst);
    assert_int_not_equal(get_answered(f, e), bi); /* round robin moved on */
    uint32_t id = e->id;
    size_t m = f->nev;
    emx_router_edge_closed(f->r, e, f->now);
    const struct ev *v = unbind_sent(f, m, id);
    assert_int_equal(inst_index(f, v->pipe->inst), bi);
    struct emx_pipe *up = v->pipe;
    uint32_t urid = v->h.request_id;
    m = f->nev;
    pipe_answer(f, up, EMX_AO_SUCCESS, urid, id);
    assert_int_equal(f->nev, m); /* consumed: nothing sent, nothing closed */
    const struct emx_router_stats *st = emx_router_stats(f->r);
    assert_int_equal(st->unbinds_sent, 1);
    assert_int_equal(st->unbind_answers, 1);
    assert_int_equal(st->late_platform_answers, 0);
}

static void edge_close_unbind_falls_back_to_another_connected_instance(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *bp = bind_answered(f, e, EMX_AO_BIND, THINGS, 2, EMX_AO_SUCCESS);
    int bi = inst_index(f, bp->inst);
    instance_down(f, f->inst[bi]);
    uint32_t id = e->id;
    size_t m = f->nev;
    emx_router_edge_closed(f->r, e, f->now);
    const struct ev *v = unbind_sent(f, m, id);
    assert_int_equal(inst_index(f, v->pipe->inst), 1 - bi);
}

static void edge_close_unbind_none_when_nothing_connected(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    bind_answered(f, e, EMX_AO_BIND, THINGS, 2, EMX_AO_SUCCESS);
    instance_down(f, f->inst[0]);
    size_t m = f->nev;
    emx_router_edge_closed(f->r, e, f->now);
    assert_int_equal(count_kind(f, m, EV_PIPE_SEND), 0);
}

static void edge_close_unbind_unanswered_times_out_quietly(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    bind_answered(f, e, EMX_AO_BIND, THINGS, 2, EMX_AO_SUCCESS);
    uint32_t id = e->id;
    size_t m = f->nev;
    emx_router_edge_closed(f->r, e, f->now);
    const struct ev *v = unbind_sent(f, m, id);
    struct emx_pipe *up = v->pipe;
    uint32_t urid = v->h.request_id;
    m = f->nev;
    tick_at(f, f->now + 3 * f->cfg.request_timeout);
    assert_int_equal(f->nev, m);
    pipe_answer(f, up, EMX_AO_SUCCESS, urid, id); /* late */
    assert_int_equal(f->nev, m);
}

/* ==== rule 8: all instances lost ==== */

static void all_down_shorter_than_grace_closes_nothing(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    for (int i = 0; i < 3; i++)
        edge_authed(f);
    uint64_t t0 = f->now;
    size_t m = f->nev;
    instance_down(f, f->inst[0]);
    assert_int_equal(emx_router_pipes_up(f->r), 0);
    for (uint64_t t = t0; t < t0 + f->cfg.all_down_grace; t += 250)
        tick_at(f, t);
    tick_at(f, t0 + f->cfg.all_down_grace - 1);
    assert_int_equal(count_kind(f, m, EV_EDGE_CLOSE), 0);
}

static void all_down_past_grace_closes_every_edge_1013(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e[3];
    uint32_t ids[3];
    for (int i = 0; i < 3; i++) {
        e[i] = edge_authed(f);
        ids[i] = e[i]->id;
    }
    uint64_t t0 = f->now;
    size_t m = f->nev;
    instance_down(f, f->inst[0]);
    tick_at(f, t0 + f->cfg.all_down_grace - 1);
    assert_int_equal(count_kind(f, m, EV_EDGE_CLOSE), 0);
    tick_at(f, t0 + f->cfg.all_down_grace + 1);
    tick_at(f, t0 + f->cfg.all_down_grace + 1000);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(count_edge_closes(f, m, ids[i]), 1);
        assert_int_equal(f->ev[find_edge_close(f, m, ids[i])].close_code, 1013);
    }
    assert_int_equal(emx_router_stats(f->r)->all_down_closes, 3);
}

static void all_down_closes_spread_over_close_spread(void **state)
{
    struct fx *f = *state;
    f->cfg.close_spread = 10000;
    start_equal(f, 1);
    enum { N = 100 };
    uint32_t ids[N];
    for (int i = 0; i < N; i++)
        ids[i] = edge_authed(f)->id;
    uint64_t t0 = f->now, grace = f->cfg.all_down_grace, spread = f->cfg.close_spread;
    size_t m = f->nev;
    instance_down(f, f->inst[0]);
    size_t at_half = 0;
    for (uint64_t t = t0; t <= t0 + grace + spread + 100; t += 100) {
        tick_at(f, t);
        if (t < t0 + grace)
            assert_int_equal(count_kind(f, m, EV_EDGE_CLOSE), 0);
        if (t == t0 + grace + spread / 2)
            at_half = count_kind(f, m, EV_EDGE_CLOSE);
    }
    assert_in_range(at_half, N / 4, 3 * N / 4);
    for (int i = 0; i < N; i++) {
        assert_int_equal(count_edge_closes(f, m, ids[i]), 1);
        assert_int_equal(f->ev[find_edge_close(f, m, ids[i])].close_code, 1013);
    }
}

static void all_down_cancelled_when_a_pipe_comes_back(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    for (int i = 0; i < 3; i++)
        edge_authed(f);
    uint64_t t0 = f->now, grace = f->cfg.all_down_grace;
    size_t m = f->nev;
    instance_down(f, f->inst[0]);
    tick_at(f, t0 + grace / 2);
    pipe_up(f, &f->inst[0]->pipes[0]);
    assert_int_equal(emx_router_pipes_up(f->r), 1);
    for (uint64_t t = t0 + grace / 2; t <= t0 + 3 * grace; t += 250)
        tick_at(f, t);
    assert_int_equal(count_kind(f, m, EV_EDGE_CLOSE), 0);
}

/* ==== rule 9: discovery ==== */

static void discovery_update_applied_in_place(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_instance *p1 = f->inst[0], *p2 = f->inst[1];
    struct emx_instance_info set[] = {info("p1", 1, 0), info("p2", 1, 0), info("p3", 1, 0)};
    size_t m = f->nev;
    emx_router_discovery_update(f->r, set, 3, f->now);
    assert_int_equal(count_kind(f, m, EV_INST_ADDED), 1);
    for (size_t i = m; i < f->nev; i++)
        if (f->ev[i].kind == EV_INST_ADDED)
            assert_string_equal(f->ev[i].inst_id, "p3");
    assert_int_equal(count_kind(f, m, EV_INST_REMOVED), 0);
    assert_int_equal(count_kind(f, m, EV_PIPE_CLOSE), 0);
    assert_ptr_equal(emx_router_instance_find(f->r, "p1"), p1);
    assert_ptr_equal(emx_router_instance_find(f->r, "p2"), p2);
    assert_int_equal(p1->state, EMX_INSTANCE_ACTIVE);
    assert_int_equal(p1->pipes[0].state, EMX_PIPE_UP);
    assert_int_equal(emx_router_pipes_up(f->r), 4);
    struct emx_instance *p3 = emx_router_instance_find(f->r, "p3");
    assert_non_null(p3);
    assert_int_equal(p3->state, EMX_INSTANCE_ACTIVE);
}

/* Send GETs until one is left unanswered on instance `k`'s first pipe. */
static uint32_t hold_one_on(struct fx *f, struct emx_edge *e, int k)
{
    for (int i = 0; i < 8; i++) {
        uint32_t rid;
        struct emx_pipe *p = get(f, e, &rid);
        assert_non_null(p);
        if (p == &f->inst[k]->pipes[0])
            return rid;
        pipe_answer(f, p, EMX_AO_SUCCESS, rid, e->id);
    }
    fail_msg("no request reached instance %d", k);
    return 0;
}

static void discovery_vanished_instance_drains_until_answered(void **state)
{
    struct fx *f = *state;
    f->cfg.pipes_per_instance = 1;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint32_t held = hold_one_on(f, e, 1);
    struct emx_pipe *p2 = &f->inst[1]->pipes[0];
    struct emx_instance_info one[] = {info("p1", 1, 0)};
    size_t m = f->nev;
    emx_router_discovery_update(f->r, one, 1, f->now);
    assert_int_equal(count_kind(f, m, EV_INST_REMOVED), 0);
    assert_int_equal(f->inst[1]->state, EMX_INSTANCE_DRAINING);
    assert_false(emx_instance_is_eligible(f->r, f->inst[1], f->now));
    for (int i = 0; i < 4; i++)
        assert_int_equal(get_answered(f, e), 0);
    m = f->nev;
    pipe_answer(f, p2, EMX_AO_SUCCESS, held, e->id);
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_SUCCESS, held));
    emx_router_tick(f->r, f->now);
    assert_int_equal(count_removed(f, m, "p2"), 1);
    assert_int_equal(count_kind(f, m, EV_INST_REMOVED), 1);
    assert_null(emx_router_instance_find(f->r, "p2"));
    f->ninst = 1;
}

static void discovery_vanished_instance_removed_after_timeout(void **state)
{
    struct fx *f = *state;
    f->cfg.pipes_per_instance = 1;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint64_t t0 = f->now;
    uint32_t held = hold_one_on(f, e, 1);
    struct emx_instance_info one[] = {info("p1", 1, 0)};
    size_t m = f->nev;
    emx_router_discovery_update(f->r, one, 1, f->now);
    assert_int_equal(count_kind(f, m, EV_INST_REMOVED), 0);
    f->ninst = 1;
    tick_at(f, t0 + f->cfg.request_timeout + 1);
    tick_at(f, t0 + f->cfg.request_timeout + 2);
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_GATEWAY_TIMEOUT, held));
    assert_int_equal(count_removed(f, m, "p2"), 1);
    assert_null(emx_router_instance_find(f->r, "p2"));
}

static void discovery_failure_keeps_last_good_set(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    size_t m = f->nev;
    emx_router_discovery_failed(f->r, "connection refused", f->now);
    tick_at(f, f->now + 10 * f->cfg.empty_confirm);
    assert_int_equal(f->nev, m);
    assert_int_equal(emx_router_stats(f->r)->discovery_failures, 1);
    assert_int_equal(f->inst[0]->state, EMX_INSTANCE_ACTIVE);
    assert_int_equal(f->inst[1]->state, EMX_INSTANCE_ACTIVE);
    assert_int_equal(emx_router_pipes_up(f->r), 4);
    int n[2] = {0};
    for (int i = 0; i < 4; i++)
        n[get_answered(f, e)]++;
    assert_true(n[0] >= 1 && n[1] >= 1);
}

static void discovery_empty_set_applied_after_empty_confirm(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint64_t t0 = f->now;
    size_t m = f->nev;
    emx_router_discovery_update(f->r, NULL, 0, f->now);
    assert_int_equal(count_kind(f, m, EV_INST_REMOVED), 0);
    assert_int_equal(f->inst[0]->state, EMX_INSTANCE_ACTIVE);
    get_answered(f, e);
    tick_at(f, t0 + f->cfg.empty_confirm - 1);
    assert_int_equal(count_kind(f, m, EV_INST_REMOVED), 0);
    assert_int_equal(f->inst[0]->state, EMX_INSTANCE_ACTIVE);
    assert_int_equal(f->inst[1]->state, EMX_INSTANCE_ACTIVE);
    get_answered(f, e);
    tick_at(f, t0 + f->cfg.empty_confirm + 1);
    tick_at(f, t0 + f->cfg.empty_confirm + 2);
    for (int i = 0; i < 2; i++) {
        if (count_removed(f, m, IDS[i]) == 1)
            continue;
        struct emx_instance *in = emx_router_instance_find(f->r, IDS[i]);
        assert_non_null(in);
        assert_int_equal(in->state, EMX_INSTANCE_DRAINING);
    }
    f->ninst = 0;
    size_t m2 = f->nev;
    uint32_t rid;
    assert_null(get(f, e, &rid));
    assert_non_null(find_edge_send(f, m2, e->id, EMX_AO_INTERNAL_ERROR, rid));
}

static void discovery_empty_set_cancelled_by_nonempty_set(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    uint64_t t0 = f->now;
    size_t m = f->nev;
    emx_router_discovery_update(f->r, NULL, 0, f->now);
    tick_at(f, t0 + f->cfg.empty_confirm / 2);
    struct emx_instance_info set[] = {info("p1", 1, 0), info("p2", 1, 0)};
    emx_router_discovery_update(f->r, set, 2, f->now);
    tick_at(f, t0 + f->cfg.empty_confirm + 1);
    tick_at(f, t0 + 3 * f->cfg.empty_confirm);
    assert_int_equal(count_kind(f, m, EV_INST_REMOVED), 0);
    assert_int_equal(count_kind(f, m, EV_INST_ADDED), 0);
    assert_int_equal(count_kind(f, m, EV_PIPE_CLOSE), 0);
    assert_int_equal(f->inst[0]->state, EMX_INSTANCE_ACTIVE);
    assert_int_equal(f->inst[1]->state, EMX_INSTANCE_ACTIVE);
}

/* ==== endpointIds ==== */

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static void endpoint_ids_unique_nonzero_with_worker_bits(void **state)
{
    struct fx *f = *state;
    f->cfg.worker = 5;
    start_equal(f, 0);
    enum { N = 2000 };
    static uint32_t ids[N];
    for (int i = 0; i < N; i++) {
        struct emx_edge *e = edge_open(f);
        ids[i] = e->id;
        assert_int_equal(e->id >> EMX_WORKER_SHIFT, 5);
        assert_int_not_equal(e->id & EMX_ENDPOINT_SEQ_MASK, 0);
        assert_ptr_equal(emx_router_edge_find(f->r, e->id), e);
    }
    assert_int_equal(emx_router_edge_count(f->r), N);
    qsort(ids, N, sizeof(ids[0]), cmp_u32);
    for (int i = 1; i < N; i++)
        assert_int_not_equal(ids[i - 1], ids[i]);
}

static void endpoint_id_not_reused_while_in_flight(void **state)
{
    struct fx *f = *state;
    f->cfg.request_timeout = 8000;
    f->cfg.edge_request_timeout = 5000;
    start_equal(f, 0);
    const uint64_t window = 8000; /* max(request_timeout, edge_request_timeout) */
    enum { N = 4000, OPEN = 8 };
    static uint32_t closed_id[N];
    static uint64_t closed_at[N];
    size_t nclosed = 0;
    struct emx_edge *open[OPEN] = {NULL};
    for (int i = 0; i < N; i++) {
        tick_at(f, f->now + 5);
        struct emx_edge *e = edge_open(f);
        for (size_t k = 0; k < nclosed; k++)
            if (f->now - closed_at[k] < window && closed_id[k] == e->id)
                fail_msg("id %08x reused %llu ms after its edge left", e->id,
                         (unsigned long long)(f->now - closed_at[k]));
        struct emx_edge *old = open[i % OPEN];
        open[i % OPEN] = e;
        if (old) {
            closed_id[nclosed] = old->id;
            closed_at[nclosed++] = f->now;
            emx_router_edge_closed(f->r, old, f->now);
        }
    }
}

/* ==== more of rules 2, 6, 8, 9 ==== */

static void reload_moves_marks_at_once(void **state)
{
    struct fx *f = *state;
    f->cfg.pipes_per_instance = 1;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *p1 = &f->inst[0]->pipes[0];
    emx_router_pipe_queued(f->r, p1, 50 * 1024, f->now);
    assert_true(emx_pipe_is_writable(f->r, p1, f->now));
    struct emx_router_config cfg = f->cfg;
    cfg.high_watermark = 40 * 1024;
    cfg.low_watermark = 20 * 1024;
    assert_int_equal(emx_router_set_config(f->r, &cfg, f->now), 0);
    assert_false(emx_pipe_is_writable(f->r, p1, f->now));
    for (int i = 0; i < 3; i++)
        assert_int_equal(get_answered(f, e), 1);
    cfg.high_watermark = 128 * 1024;
    cfg.low_watermark = 64 * 1024;
    assert_int_equal(emx_router_set_config(f->r, &cfg, f->now), 0);
    assert_true(emx_pipe_is_writable(f->r, p1, f->now));
}

static void multipart_pinned_pipe_closed_while_chunk_held_one_a0(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint32_t rid = f->next_rid++;
    size_t m0 = f->nev;
    edge_chunk(f, e, rid, 1, 3, 300);
    struct emx_pipe *p = forwarded_to(f, m0, e->id, rid);
    assert_non_null(p);
    emx_router_pipe_queued(f->r, p, HIGH(f) + 1, f->now);
    size_t m = f->nev;
    edge_chunk(f, e, rid, 2, 3, 300);
    assert_true(edge_paused(f, m, e->id, true));
    m = f->nev;
    emx_router_pipe_closed(f->r, p, f->now);
    assert_true(edge_paused(f, m, e->id, false));
    edge_chunk(f, e, rid, 3, 3, 300);
    tick_at(f, f->now + 3 * f->cfg.request_timeout);
    assert_int_equal(count_pipe_sends(f, m0, ANY, rid, ANY), 1);
    assert_int_equal(count_edge_sends(f, m0, e->id, ANY, rid), 1);
    assert_non_null(find_edge_send(f, m0, e->id, EMX_AO_INTERNAL_ERROR, rid));
}

static void multipart_two_messages_pin_independently(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint32_t ra = f->next_rid++, rb = f->next_rid++;
    size_t m0 = f->nev;
    edge_chunk(f, e, ra, 1, 3, 100);
    edge_chunk(f, e, rb, 1, 3, 100);
    struct emx_pipe *pa = forwarded_to(f, m0, e->id, ra);
    struct emx_pipe *pb = forwarded_to(f, m0, e->id, rb);
    assert_non_null(pa);
    assert_non_null(pb);
    assert_ptr_not_equal(pa->inst, pb->inst);
    for (uint16_t id = 2; id <= 3; id++) {
        edge_chunk(f, e, rb, id, 3, 100);
        edge_chunk(f, e, ra, id, 3, 100);
    }
    assert_int_equal(chunks_on(f, m0, e->id, ra, pa), 3);
    assert_int_equal(chunks_on(f, m0, e->id, rb, pb), 3);
}

static void all_down_new_edges_get_a0_and_stay_open(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    edge_authed(f);
    uint64_t t0 = f->now;
    instance_down(f, f->inst[0]);
    tick_at(f, t0 + f->cfg.all_down_grace + 1);
    assert_int_equal(emx_router_stats(f->r)->all_down_closes, 1);
    struct emx_edge *late = edge_open(f);
    size_t m = f->nev;
    edge_send_auth(f, late, 1);
    assert_non_null(find_edge_send(f, m, late->id, EMX_AO_INTERNAL_ERROR, 1));
    uint64_t t1 = f->now;
    for (uint64_t t = t1; t < t1 + 5000; t += 500)
        tick_at(f, t);
    assert_int_equal(count_edge_closes(f, m, late->id), 0);
    instance_up(f, f->inst[0]);
    edge_auth_ok(f, late);
}

static void discovery_draining_waits_for_inbound_platform_requests(void **state)
{
    struct fx *f = *state;
    f->cfg.pipes_per_instance = 1;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *p2 = &f->inst[1]->pipes[0];
    size_t m = f->nev;
    platform_get(f, p2, 0x700, e->id);
    struct emx_ao_header h = delivered(f, m, e);
    struct emx_instance_info one[] = {info("p1", 1, 0)};
    m = f->nev;
    emx_router_discovery_update(f->r, one, 1, f->now);
    emx_router_tick(f->r, f->now);
    assert_int_equal(count_kind(f, m, EV_INST_REMOVED), 0);
    assert_int_equal(f->inst[1]->state, EMX_INSTANCE_DRAINING);
    edge_answer(f, e, EMX_AO_SUCCESS, &h);
    const struct ev *a = find_pipe_send(f, m, EMX_AO_SUCCESS, 0x700, e->id);
    assert_non_null(a);
    assert_ptr_equal(a->pipe, p2);
    emx_router_tick(f->r, f->now);
    assert_int_equal(count_removed(f, m, "p2"), 1);
    f->ninst = 1;
}

static void discovery_weight_change_applied_in_place(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    struct emx_instance *p2 = f->inst[1];
    struct emx_instance_info set[] = {info("p1", 1, 0), info("p2", 3, 0)};
    size_t m = f->nev;
    emx_router_discovery_update(f->r, set, 2, f->now);
    assert_int_equal(count_kind(f, m, EV_INST_ADDED), 0);
    assert_int_equal(count_kind(f, m, EV_INST_REMOVED), 0);
    assert_int_equal(count_kind(f, m, EV_PIPE_CLOSE), 0);
    assert_ptr_equal(emx_router_instance_find(f->r, "p2"), p2);
    assert_int_equal(p2->weight, 3);
    assert_int_equal(emx_router_pipes_up(f->r), 4);
    int n[2] = {0};
    for (int i = 0; i < 400; i++)
        n[get_answered(f, e)]++;
    assert_in_range(n[1], 290, 310);
}

static void discovery_instance_back_while_draining_is_active_again(void **state)
{
    struct fx *f = *state;
    f->cfg.pipes_per_instance = 1;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    hold_one_on(f, e, 1); /* keeps p2 draining rather than gone */
    struct emx_instance_info one[] = {info("p1", 1, 0)};
    emx_router_discovery_update(f->r, one, 1, f->now);
    assert_int_equal(f->inst[1]->state, EMX_INSTANCE_DRAINING);
    struct emx_instance_info both[] = {info("p1", 1, 0), info("p2", 1, 0)};
    emx_router_discovery_update(f->r, both, 2, f->now);
    struct emx_instance *p2 = emx_router_instance_find(f->r, "p2");
    assert_non_null(p2);
    assert_int_equal(p2->state, EMX_INSTANCE_ACTIVE);
    int active = 0;
    for (struct emx_instance *in = emx_router_instance_next(f->r, NULL); in;
         in = emx_router_instance_next(f->r, in))
        if (strcmp(in->id, "p2") == 0 && in->state == EMX_INSTANCE_ACTIVE)
            active++;
    assert_int_equal(active, 1);
    f->inst[1] = p2;
    for (unsigned i = 0; i < p2->npipes; i++)
        if (p2->pipes[i].state != EMX_PIPE_UP)
            pipe_up(f, &p2->pipes[i]);
    int n[2] = {0};
    for (int i = 0; i < 4; i++)
        n[get_answered(f, e)]++;
    assert_true(n[1] >= 1);
}

static void all_down_second_outage_closes_again(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    edge_authed(f);
    uint64_t grace = f->cfg.all_down_grace;
    instance_down(f, f->inst[0]);
    tick_at(f, f->now + grace + 1);
    assert_int_equal(emx_router_stats(f->r)->all_down_closes, 1);
    instance_up(f, f->inst[0]);
    tick_at(f, f->now + 1000);
    uint32_t id = edge_authed(f)->id;
    size_t m = f->nev;
    instance_down(f, f->inst[0]);
    uint64_t t1 = f->now;
    tick_at(f, t1 + grace - 1);
    assert_int_equal(count_edge_closes(f, m, id), 0);
    tick_at(f, t1 + grace + 1);
    assert_int_equal(count_edge_closes(f, m, id), 1);
    assert_int_equal(f->ev[find_edge_close(f, m, id)].close_code, 1013);
}

static void all_down_spread_survives_edges_leaving_midway(void **state)
{
    struct fx *f = *state;
    f->cfg.close_spread = 10000;
    start_equal(f, 1);
    enum { N = 10 };
    struct emx_edge *e[N];
    uint32_t ids[N];
    for (int i = 0; i < N; i++) {
        e[i] = edge_authed(f);
        ids[i] = e[i]->id;
    }
    uint64_t t0 = f->now;
    size_t m = f->nev;
    instance_down(f, f->inst[0]);
    tick_at(f, t0 + f->cfg.all_down_grace + f->cfg.close_spread / 2);
    /* The transport reports every edge gone: those asked to close and the others. */
    bool gone[N] = {false};
    for (int i = 0; i < N; i++)
        if (count_edge_closes(f, m, ids[i]) == 0 || i % 2 == 0) {
            emx_router_edge_closed(f->r, e[i], f->now);
            gone[i] = true;
        }
    size_t before = f->nev;
    for (uint64_t t = f->now; t <= t0 + f->cfg.all_down_grace + 2 * f->cfg.close_spread; t += 100)
        tick_at(f, t);
    for (int i = 0; i < N; i++)
        if (gone[i])
            assert_int_equal(count_edge_closes(f, before, ids[i]), 0);
    for (int i = 0; i < N; i++)
        assert_true(count_edge_closes(f, m, ids[i]) <= 1);
    size_t left = 0;
    for (int i = 0; i < N; i++)
        left += !gone[i];
    assert_int_equal(emx_router_edge_count(f->r), left);
}

static void multipart_edge_leaves_while_chunk_held(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint32_t rid = f->next_rid++;
    size_t m0 = f->nev;
    edge_chunk(f, e, rid, 1, 3, 300);
    struct emx_pipe *p = forwarded_to(f, m0, e->id, rid);
    assert_non_null(p);
    emx_router_pipe_queued(f->r, p, HIGH(f) + 1, f->now);
    edge_chunk(f, e, rid, 2, 3, 300);
    uint32_t id = e->id;
    emx_router_edge_closed(f->r, e, f->now);
    size_t m = f->nev;
    emx_router_pipe_queued(f->r, p, 0, f->now);
    tick_at(f, f->now + 3 * f->cfg.request_timeout);
    assert_int_equal(count_pipe_sends(f, m, ANY, rid, id), 0);
    assert_int_equal(count_kind(f, m, EV_EDGE_SEND), 0);
    assert_int_equal(count_kind(f, m, EV_EDGE_PAUSE), 0);
}

static void edge_close_unbind_after_bind_instance_was_removed(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *bp = bind_answered(f, e, EMX_AO_BIND, THINGS, 2, EMX_AO_SUCCESS);
    int bi = inst_index(f, bp->inst);
    struct emx_instance_info keep[] = {info(IDS[1 - bi], 1, 0)};
    size_t m = f->nev;
    emx_router_discovery_update(f->r, keep, 1, f->now);
    emx_router_tick(f->r, f->now);
    assert_int_equal(count_removed(f, m, IDS[bi]), 1);
    struct emx_instance *other = f->inst[1 - bi];
    f->inst[0] = other;
    f->ninst = 1;
    uint32_t id = e->id;
    m = f->nev;
    emx_router_edge_closed(f->r, e, f->now);
    const struct ev *v = unbind_sent(f, m, id);
    assert_ptr_equal(v->pipe->inst, other);
}

static void discovery_null_id_uses_host_port(void **state)
{
    struct fx *f = *state;
    f->r = emx_router_new(&f->cfg, &f->io, f->now);
    struct emx_instance_info set[] = {{.id = NULL, .host = "10.0.0.7", .port = 8443, .weight = 1}};
    emx_router_discovery_update(f->r, set, 1, f->now);
    struct emx_instance *in = emx_router_instance_find(f->r, "10.0.0.7:8443");
    assert_non_null(in);
    assert_string_equal(in->host, "10.0.0.7");
    assert_int_equal(in->port, 8443);
    size_t m = f->nev;
    emx_router_discovery_update(f->r, set, 1, f->now); /* same set: untouched */
    assert_int_equal(f->nev, m);
}

/* ==== timers driven by the deadline tick returns ==== */

/* Run timers the way the server does: tick, then wait for the deadline the
 * tick returned, up to `until`. */
static void drive(struct fx *f, uint64_t until)
{
    for (int i = 0; i < 100000; i++) {
        uint64_t d = emx_router_tick(f->r, f->now);
        assert_true(d > f->now);
        if (d > until) {
            f->now = until;
            return;
        }
        f->now = d;
    }
    fail_msg("timers never settle");
}

static void deadline_idle_router_has_none(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    edge_authed(f);
    assert_true(emx_router_tick(f->r, f->now) == UINT64_MAX);
}

static void deadline_request_timeout(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint64_t t0 = f->now;
    uint32_t rid;
    assert_non_null(get(f, e, &rid));
    size_t m = f->nev;
    drive(f, t0 + f->cfg.request_timeout + 1);
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_GATEWAY_TIMEOUT, rid));
}

static void deadline_edge_request_timeout(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint64_t t0 = f->now;
    platform_get(f, &f->inst[0]->pipes[0], 0x42, e->id);
    size_t m = f->nev;
    drive(f, t0 + f->cfg.edge_request_timeout + 1);
    assert_non_null(find_pipe_send(f, m, EMX_AO_GATEWAY_TIMEOUT, 0x42, e->id));
}

static void deadline_auth_timeout(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    uint64_t t0 = f->now;
    struct emx_edge *e = edge_open(f);
    size_t m = f->nev;
    drive(f, t0 + f->cfg.auth_timeout + 1);
    assert_int_equal(count_edge_closes(f, m, e->id), 1);
}

static void deadline_pin_wait(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint32_t rid = f->next_rid++;
    size_t m0 = f->nev;
    edge_chunk(f, e, rid, 1, 2, 100);
    struct emx_pipe *p = forwarded_to(f, m0, e->id, rid);
    assert_non_null(p);
    emx_router_pipe_queued(f->r, p, HIGH(f) + 1, f->now);
    uint64_t t0 = f->now;
    edge_chunk(f, e, rid, 2, 2, 100);
    drive(f, t0 + f->cfg.multipart_pin_wait + 1);
    assert_non_null(find_edge_send(f, m0, e->id, EMX_AO_INTERNAL_ERROR, rid));
}

static void deadline_all_down_grace_and_spread(void **state)
{
    struct fx *f = *state;
    f->cfg.close_spread = 4000;
    start_equal(f, 1);
    enum { N = 20 };
    for (int i = 0; i < N; i++)
        edge_authed(f);
    uint64_t t0 = f->now;
    size_t m = f->nev;
    instance_down(f, f->inst[0]);
    drive(f, t0 + f->cfg.all_down_grace + f->cfg.close_spread + 1);
    assert_int_equal(count_kind(f, m, EV_EDGE_CLOSE), N);
}

static void deadline_empty_confirm(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    uint64_t t0 = f->now;
    size_t m = f->nev;
    emx_router_discovery_update(f->r, NULL, 0, f->now);
    drive(f, t0 + f->cfg.empty_confirm + 1);
    assert_int_equal(count_kind(f, m, EV_INST_REMOVED), 2);
    f->ninst = 0;
}

/* ==== maintenance ==== */

static void maintenance_stops_and_resumes_new_requests(void **state)
{
    struct fx *f = *state;
    start_equal(f, 3);
    struct emx_edge *e = edge_authed(f);
    assert_int_equal(emx_router_instance_maintenance(f->r, "p2", true, f->now), 0);
    assert_false(emx_instance_is_eligible(f->r, f->inst[1], f->now));
    for (int i = 0; i < 6; i++)
        assert_int_not_equal(get_answered(f, e), 1);
    assert_int_equal(emx_router_instance_maintenance(f->r, "p2", false, f->now), 0);
    assert_true(emx_instance_is_eligible(f->r, f->inst[1], f->now));
    int n[3] = {0};
    for (int i = 0; i < 6; i++)
        n[get_answered(f, e)]++;
    assert_true(n[1] >= 1);
    assert_int_not_equal(emx_router_instance_maintenance(f->r, "nope", true, f->now), 0);
}

/* ---- per-edge limits and the latency histogram (operations) ---- */

static void rate_limit_answers_a3_and_refills(void **state)
{
    struct fx *f = *state;
    f->cfg.max_msgs_per_sec = 4;
    f->cfg.stall_after = 0; /* requests stay unanswered here */
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f); /* the AUTH took one of 4 tokens */
    for (int i = 0; i < 3; i++)
        assert_non_null(get(f, e, NULL));
    size_t m = f->nev;
    uint32_t rid;
    assert_null(get(f, e, &rid));
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_SERVICE_UNAVAILABLE, rid));
    assert_int_equal(emx_router_stats(f->r)->answers[EMX_ANS_RATE_LIMITED], 1);
    /* 250 ms buys one token at 4/s */
    f->now += 249;
    assert_null(get(f, e, NULL));
    f->now += 251; /* 500 ms in all: two tokens (a refused try does not waste time) */
    assert_non_null(get(f, e, NULL));
    assert_non_null(get(f, e, NULL));
    assert_null(get(f, e, NULL));
    /* answers from the edge and KEEP_ALIVE are never limited */
    m = f->nev;
    uint8_t buf[32];
    edge_msg(f, e, buf, header_only(buf, EMX_AO_KEEP_ALIVE, 77, 0, SESSION));
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_SUCCESS, 77));
    /* a long pause refills the whole bucket, not more */
    f->now += 5000;
    for (int i = 0; i < 4; i++)
        assert_non_null(get(f, e, NULL));
    assert_null(get(f, e, NULL));
}

static void rate_limit_reload_starts_full_and_zero_is_off(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    for (int i = 0; i < 50; i++)
        assert_non_null(get(f, e, NULL)); /* no limit by default */
    struct emx_router_config c = f->cfg;
    c.max_msgs_per_sec = 2;
    c.max_pending = 1000;
    assert_int_equal(emx_router_set_config(f->r, &c, f->now), 0);
    assert_non_null(get(f, e, NULL));
    assert_non_null(get(f, e, NULL));
    assert_null(get(f, e, NULL));
    c.max_msgs_per_sec = 0;
    assert_int_equal(emx_router_set_config(f->r, &c, f->now), 0);
    assert_non_null(get(f, e, NULL));
}

/* ---- shares: bytes in flight, unread answers, the memory budget ---- */

static size_t get_len(void)
{
    uint8_t buf[128];
    return build_get(buf, sizeof(buf), 1, 0);
}

/* A platform answer of about `len` bytes (its reason string carries them). */
static void pipe_answer_big(struct fx *f, struct emx_pipe *p, uint32_t rid, uint32_t eid,
                            size_t len)
{
    char *reason = malloc(len + 1);
    size_t cap = emx_ao_response_size(len);
    uint8_t *buf = malloc(cap);
    assert_non_null(reason);
    assert_non_null(buf);
    memset(reason, 'x', len);
    reason[len] = '\0';
    size_t n = emx_ao_build_response(buf, cap, EMX_AO_SUCCESS, rid, eid, SESSION, reason);
    assert_true(n > len);
    pipe_msg(f, p, buf, n);
    free(buf);
    free(reason);
}

static void bytes_in_flight_cap_refuses_a3_while_others_pass(void **state)
{
    struct fx *f = *state;
    size_t n = get_len();
    f->cfg.max_bytes_in_flight = 2 * n + 1; /* three GETs: the third starts under it */
    f->cfg.stall_after = 0;                 /* requests stay unanswered here */
    start_equal(f, 2);
    struct emx_edge *heavy = edge_authed(f), *light = edge_authed(f);
    struct emx_pipe *p[3];
    uint32_t rid[3];
    for (int i = 0; i < 3; i++)
        assert_non_null(p[i] = get(f, heavy, &rid[i]));
    assert_int_equal(heavy->bytes_in_flight, 3 * n);
    size_t m = f->nev;
    uint32_t refused;
    assert_null(get(f, heavy, &refused));
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    const struct ev *a = find_edge_send(f, m, heavy->id, EMX_AO_SERVICE_UNAVAILABLE, refused);
    assert_non_null(a);
    assert_int_equal(emx_router_stats(f->r)->answers[EMX_ANS_BYTES_IN_FLIGHT], 1);
    /* another device is not held back by it */
    for (int i = 0; i < 3; i++)
        assert_non_null(get(f, light, NULL));
    assert_int_equal(emx_router_stats(f->r)->mem_requests, 6 * n);
    /* an answer gives its bytes back */
    pipe_answer(f, p[0], EMX_AO_SUCCESS, rid[0], heavy->id);
    assert_int_equal(heavy->bytes_in_flight, 2 * n);
    assert_non_null(get(f, heavy, NULL));
    assert_null(get(f, heavy, NULL));
    /* so do edgemux's own answers: a timeout, a lost pipe */
    tick_at(f, f->now + f->cfg.request_timeout);
    assert_int_equal(heavy->bytes_in_flight, 0);
    assert_int_equal(light->bytes_in_flight, 0);
    assert_int_equal(emx_router_stats(f->r)->mem_requests, 0);
    assert_non_null(get(f, heavy, NULL));
    instance_down(f, f->inst[0]);
    instance_down(f, f->inst[1]);
    assert_int_equal(heavy->bytes_in_flight, 0);
    assert_int_equal(emx_router_stats(f->r)->mem_requests, 0);
}

static void bytes_in_flight_counts_multipart_chunks_and_zero_is_off(void **state)
{
    struct fx *f = *state;
    f->cfg.max_bytes_in_flight = 4000;
    f->cfg.stall_after = 0;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    /* one message may go over the cap on its own: it started under it */
    edge_chunk(f, e, 50, 1, 3, 2000);
    edge_chunk(f, e, 50, 2, 3, 2000);
    edge_chunk(f, e, 50, 3, 3, 2000);
    assert_int_equal(count_pipe_sends(f, 0, EMX_AO_POST, 50, e->id), 3);
    assert_true(e->bytes_in_flight > 6000);
    size_t m = f->nev;
    uint32_t rid;
    assert_null(get(f, e, &rid));
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_SERVICE_UNAVAILABLE, rid));
    /* answered early while chunks still come: a tombstone holds nothing */
    edge_chunk(f, e, 51, 1, 2, 100);
    assert_int_equal(count_edge_sends(f, m, e->id, EMX_AO_SERVICE_UNAVAILABLE, 51), 1);
    const struct ev *fw = find_pipe_send(f, 0, EMX_AO_POST, 50, e->id);
    assert_non_null(fw);
    pipe_answer(f, fw->pipe, EMX_AO_SUCCESS, 50, e->id);
    assert_int_equal(e->bytes_in_flight, 0);
    struct emx_router_config c = f->cfg;
    c.max_bytes_in_flight = 0;
    assert_int_equal(emx_router_set_config(f->r, &c, f->now), 0);
    for (int i = 0; i < 200; i++)
        assert_non_null(get(f, e, NULL));
}

static void answer_backlog_cap_refuses_a3_until_the_edge_reads(void **state)
{
    struct fx *f = *state;
    f->io.edge_buffered = io_edge_buffered;
    f->cfg.max_answer_backlog = 1000;
    start_equal(f, 1);
    struct emx_edge *heavy = edge_authed(f), *light = edge_authed(f);
    /* small answers never make the router ask the transport */
    for (int i = 0; i < 5; i++)
        get_answered(f, light);
    assert_int_equal(f->buffered_calls, 0);
    uint32_t rid;
    struct emx_pipe *p = get(f, heavy, &rid);
    assert_non_null(p);
    pipe_answer_big(f, p, rid, heavy->id, 3000);
    assert_true(heavy->answer_backlog > 3000);
    /* it read part of it: under the cap, its requests go */
    f->unread[heavy->id & 15] = 800;
    assert_non_null(p = get(f, heavy, &rid));
    assert_int_equal(f->buffered_calls, 1);
    assert_int_equal(heavy->answer_backlog, 800);
    pipe_answer_big(f, p, rid, heavy->id, 3000);
    f->unread[heavy->id & 15] = 3800;
    size_t m = f->nev;
    assert_null(get(f, heavy, &rid));
    assert_non_null(find_edge_send(f, m, heavy->id, EMX_AO_SERVICE_UNAVAILABLE, rid));
    assert_int_equal(emx_router_stats(f->r)->answers[EMX_ANS_ANSWER_BACKLOG], 1);
    /* the light device goes on */
    get_answered(f, light);
    /* it reads: its next request goes */
    f->unread[heavy->id & 15] = 0;
    assert_non_null(get(f, heavy, NULL));
    assert_int_equal(heavy->answer_backlog, 0);
}

static void memory_budget_sheds_newest_with_a0_and_recovers(void **state)
{
    struct fx *f = *state;
    size_t n = get_len();
    f->io.edge_buffered = io_edge_buffered;
    f->cfg.max_memory = 10000;
    f->cfg.stall_after = 0;
    start_equal(f, 1);
    struct emx_edge *heavy = edge_authed(f), *other = edge_authed(f);
    const struct emx_router_stats *st = emx_router_stats(f->r);
    /* the heavy device took big answers and does not read them */
    for (int i = 0; i < 3; i++) {
        uint32_t rid;
        struct emx_pipe *p = get(f, heavy, &rid);
        assert_non_null(p);
        pipe_answer_big(f, p, rid, heavy->id, 4000);
    }
    f->unread[heavy->id & 15] = 12000;
    assert_true(st->mem_answers >= 12000);
    /* the newest work is shed, whoever brings it; nothing is forwarded */
    size_t m = f->nev;
    uint32_t rid;
    assert_null(get(f, other, &rid));
    assert_non_null(find_edge_send(f, m, other->id, EMX_AO_INTERNAL_ERROR, rid));
    assert_int_equal(st->answers[EMX_ANS_MEMORY_BUDGET], 1);
    /* platform requests for a device too */
    m = f->nev;
    platform_get(f, &f->inst[0]->pipes[0], 0x900, other->id);
    assert_int_equal(count_edge_sends(f, m, other->id, EMX_AO_GET, ANY), 0);
    assert_non_null(find_pipe_send(f, m, EMX_AO_INTERNAL_ERROR, 0x900, other->id));
    assert_int_equal(st->answers[EMX_ANS_MEMORY_BUDGET], 2);
    /* it reads: once the router looks again (bounded: every 50 ms), work flows */
    f->unread[heavy->id & 15] = 0;
    f->now += 50;
    assert_non_null(get(f, other, NULL));
    assert_true(st->mem_answers < 1000);
    /* request bytes in flight count too; answering them makes room */
    struct emx_router_config c = f->cfg;
    c.max_memory = st->mem_answers + st->mem_requests + 2 * n;
    assert_int_equal(emx_router_set_config(f->r, &c, f->now), 0);
    struct emx_pipe *p1 = get(f, heavy, &rid);
    assert_non_null(p1);
    assert_non_null(get(f, heavy, NULL));
    assert_null(get(f, other, NULL));
    pipe_answer(f, p1, EMX_AO_SUCCESS, rid, heavy->id);
    f->unread[heavy->id & 15] = 0;
    f->unread[other->id & 15] = 0;
    f->now += 50;
    assert_non_null(get(f, other, NULL));
    /* an edge that leaves takes its unread bytes off the figure */
    f->unread[heavy->id & 15] = 5000;
    f->now += 50;
    c.max_memory = 1;
    assert_int_equal(emx_router_set_config(f->r, &c, f->now), 0);
    assert_null(get(f, other, NULL));
    emx_router_edge_closed(f->r, heavy, f->now);
    emx_router_edge_closed(f->r, other, f->now);
    assert_int_equal(st->mem_answers, 0);
    assert_int_equal(st->mem_requests, 0);
}

static void things_limit_answers_83_without_forwarding(void **state)
{
    struct fx *f = *state;
    f->cfg.max_things = 2;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    static const char *const ab[] = {"A", "B"};
    static const char *const ac[] = {"A", "C"};
    static const char *const b[] = {"B"};
    static const char *const abc[] = {"A", "B", "C"};
    size_t m = f->nev;
    uint32_t rid = f->next_rid++;
    edge_bind(f, e, EMX_AO_BIND, rid, abc, 3); /* three at once: over */
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_FORBIDDEN, rid));
    m = f->nev;
    rid = f->next_rid++;
    edge_bind(f, e, EMX_AO_BIND, rid, ab, 2);
    struct emx_pipe *p = forwarded_to(f, m, e->id, rid);
    assert_non_null(p);
    pipe_answer(f, p, EMX_AO_SUCCESS, rid, e->id);
    assert_int_equal(e->nthings, 2);
    m = f->nev;
    rid = f->next_rid++;
    edge_bind(f, e, EMX_AO_BIND, rid, ac, 2); /* C would be the third */
    assert_int_equal(count_pipe_sends(f, m, ANY, ANY, ANY), 0);
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_FORBIDDEN, rid));
    assert_int_equal(emx_router_stats(f->r)->answers[EMX_ANS_TOO_MANY_THINGS], 2);
    m = f->nev;
    rid = f->next_rid++;
    edge_bind(f, e, EMX_AO_BIND, rid, b, 1); /* bound already: free */
    assert_non_null(forwarded_to(f, m, e->id, rid));
    m = f->nev;
    rid = f->next_rid++;
    edge_bind(f, e, EMX_AO_UNBIND, rid, b, 1); /* UNBIND is never limited */
    assert_non_null(forwarded_to(f, m, e->id, rid));
}

static void latency_histogram_observes_answers(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f); /* answered at once: 0 ms */
    uint32_t rid;
    struct emx_pipe *p = get(f, e, &rid);
    f->now += 3;
    pipe_answer(f, p, EMX_AO_SUCCESS, rid, e->id);
    p = get(f, e, &rid);
    f->now += 20000; /* over the last bound: +Inf (the timeout is not due: no tick) */
    pipe_answer(f, p, EMX_AO_SUCCESS, rid, e->id);
    p = get(f, e, &rid); /* answered by edgemux (pipe lost): not observed */
    instance_down(f, f->inst[0]);
    const struct emx_router_stats *st = emx_router_stats(f->r);
    assert_int_equal(st->latency_count, 3);
    assert_int_equal(st->latency_sum_ms, 20003);
    assert_int_equal(st->latency[0], 1);                   /* 0 ms: le 1 */
    assert_int_equal(st->latency[2], 1);                   /* 3 ms: le 4 */
    assert_int_equal(st->latency[EMX_LATENCY_BUCKETS], 1); /* 20 s: +Inf */
    assert_int_equal(emx_latency_bounds_ms[EMX_LATENCY_BUCKETS - 1], 16384);
}

static void edge_close_and_thing_iteration(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    static const char *const ab[] = {"Alpha", "Beta"};
    uint32_t rid = f->next_rid++;
    size_t m = f->nev;
    edge_bind(f, e, EMX_AO_BIND, rid, ab, 2);
    pipe_answer(f, forwarded_to(f, m, e->id, rid), EMX_AO_SUCCESS, rid, e->id);
    const void *cur = NULL;
    const char *name;
    int seen = 0;
    while ((name = emx_edge_thing_next(e, &cur)) != NULL)
        seen += strcmp(name, "Alpha") == 0 ? 1 : strcmp(name, "Beta") == 0 ? 2 : 100;
    assert_int_equal(seen, 3);
    m = f->nev;
    emx_router_edge_close(f->r, e, 1008, "kicked");
    emx_router_edge_close(f->r, e, 1008, "kicked"); /* once only */
    assert_int_equal(count_edge_closes(f, m, e->id), 1);
}

/* ==== tunnels (TUNNELS.md §8.1): owner records ==== */

#define SERVICES 0x02

/* A request on a Thing's service with one row of STRING params. */
static size_t build_service(uint8_t *buf, size_t cap, uint32_t rid, uint32_t eid,
                            const char *service, const char *const *names,
                            const char *const *values, size_t n)
{
    uint8_t params[512];
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        params[k++] = 0x01;
        k += emx_ao_write_str(params + k, sizeof(params) - k, names[i], strlen(names[i]));
        params[k++] = 0x00; /* empty description */
        params[k++] = EMX_BT_STRING;
        params[k++] = 0;
        params[k++] = 0;
    }
    params[k++] = 0x00;
    params[k++] = 0x01;
    params[k++] = 0;
    params[k++] = (uint8_t)n;
    for (size_t i = 0; i < n; i++) {
        params[k++] = EMX_BT_STRING;
        k += emx_ao_write_str(params + k, sizeof(params) - k, values[i], strlen(values[i]));
    }
    params[k++] = 0x00;
    assert_true(k < sizeof(params));
    size_t len = emx_ao_build_request(buf, cap, EMX_AO_POST, rid, eid, SESSION, THING,
                                      "SteamSensor", SERVICES, service, params, k);
    assert_true(len > 0);
    return len;
}

/* The platform sends StartTunnel `tid` on pipe p for edge e; returns the
 * request as the edge got it (code 0 when it got nothing). */
static struct emx_ao_header start_tunnel(struct fx *f, struct emx_pipe *p, struct emx_edge *e,
                                         uint32_t rid, const char *tid)
{
    const char *names[] = {"tid", "type", "connection"};
    const char *values[] = {tid, "tcp", "{\"host\": \"127.0.0.1\", \"port\": 7777}"};
    uint8_t buf[1024];
    size_t m = f->nev;
    pipe_msg(f, p, buf, build_service(buf, sizeof(buf), rid, e->id, "StartTunnel", names, values, 3));
    const struct ev *v = find_edge_send(f, m, e->id, EMX_AO_POST, ANY);
    struct emx_ao_header none = {0};
    return v ? v->h : none;
}

static const struct emx_tunnel *tunnel(struct fx *f, const char *tid)
{
    return emx_router_tunnel_find(f->r, tid, strlen(tid));
}

static void tunnel_recorded_before_forward_success_keeps_complete_ends(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *p = &f->inst[1]->pipes[1];
    struct emx_ao_header req = start_tunnel(f, p, e, 0x700, "tun-1");
    assert_int_equal(req.code, EMX_AO_POST);
    const struct emx_tunnel *t = tunnel(f, "tun-1");
    assert_non_null(t);
    assert_string_equal(t->instance_id, "p2");
    assert_int_equal(t->pipe_index, 1);
    assert_string_equal(t->thing, "SteamSensor");
    assert_int_equal(t->edge_id, e->id);
    assert_int_equal(t->state, EMX_TUNNEL_STARTING);
    assert_string_equal(t->type, "tcp");
    assert_string_equal(t->target, "127.0.0.1:7777");
    assert_int_equal(t->chunksize, -1);
    assert_int_equal(t->started_at, f->now);
    assert_int_equal(emx_router_tunnel_count(f->r), 1);
    assert_int_equal(e->ntunnels, 1);
    assert_int_equal(emx_router_stats(f->r)->tunnels_started, 1);
    assert_ptr_equal(emx_router_tunnel_next(f->r, NULL), t);
    assert_null(emx_router_tunnel_next(f->r, t));
    assert_null(tunnel(f, "tun-2"));
    assert_null(emx_router_tunnel_find(f->r, "tun-", 4));

    /* SUCCESS goes back to the platform as always and keeps the record. */
    size_t m = f->nev;
    edge_answer(f, e, EMX_AO_SUCCESS, &req);
    assert_non_null(find_pipe_send(f, m, EMX_AO_SUCCESS, 0x700, e->id));
    assert_int_equal(t->state, EMX_TUNNEL_STARTED);

    /* A TunnelCommandToEdge is forwarded and noted. */
    const char *cn[] = {"tid", "command"};
    const char *cv[] = {"tun-1", "CONNECT"};
    uint8_t buf[512];
    m = f->nev;
    pipe_msg(f, &f->inst[0]->pipes[0], buf,
             build_service(buf, sizeof(buf), 0x701, e->id, "TunnelCommandToEdge", cn, cv, 2));
    assert_int_equal(count_edge_sends(f, m, e->id, EMX_AO_POST, ANY), 1);
    assert_string_equal(t->last_command, "CONNECT");

    /* CompleteTunnel (from any instance) ends an unclaimed record; it is
     * still delivered. */
    const char *kn[] = {"tid", "peer_name", "connection"};
    const char *kv[] = {"tun-1", "p1", "{\"reason\": \"done\"}"};
    m = f->nev;
    pipe_msg(f, &f->inst[0]->pipes[0], buf,
             build_service(buf, sizeof(buf), 0x702, e->id, "CompleteTunnel", kn, kv, 3));
    assert_int_equal(count_edge_sends(f, m, e->id, EMX_AO_POST, ANY), 1);
    assert_null(tunnel(f, "tun-1"));
    assert_int_equal(emx_router_tunnel_count(f->r), 0);
    assert_int_equal(e->ntunnels, 0);
    assert_int_equal(emx_router_stats(f->r)->tunnels_ended[EMX_TUN_END_COMPLETED], 1);
}

static void tunnel_non_success_answer_or_a4_ends_record(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *p = &f->inst[0]->pipes[0];
    struct emx_ao_header req = start_tunnel(f, p, e, 0x710, "bad-host");
    assert_non_null(tunnel(f, "bad-host"));
    size_t m = f->nev;
    edge_answer(f, e, EMX_AO_INTERNAL_ERROR, &req);
    assert_non_null(find_pipe_send(f, m, EMX_AO_INTERNAL_ERROR, 0x710, e->id));
    assert_null(tunnel(f, "bad-host"));
    assert_int_equal(emx_router_stats(f->r)->tunnels_ended[EMX_TUN_END_REFUSED], 1);

    /* No answer at all: the platform gets 0xA4 and the record goes. */
    start_tunnel(f, p, e, 0x711, "silent");
    assert_non_null(tunnel(f, "silent"));
    tick_at(f, f->now + f->cfg.edge_request_timeout);
    assert_null(tunnel(f, "silent"));
    assert_int_equal(emx_router_stats(f->r)->tunnels_ended[EMX_TUN_END_NO_ANSWER], 1);
    assert_int_equal(e->ntunnels, 0);
}

static void tunnel_limits_refuse_with_a3_and_do_not_forward(void **state)
{
    struct fx *f = *state;
    f->cfg.max_tunnels = 3;
    f->cfg.max_tunnels_per_device = 2;
    start_equal(f, 1);
    struct emx_edge *a = edge_authed(f);
    struct emx_edge *b = edge_authed(f);
    struct emx_pipe *p = &f->inst[0]->pipes[0];
    assert_int_equal(start_tunnel(f, p, a, 0x720, "a1").code, EMX_AO_POST);
    assert_int_equal(start_tunnel(f, p, a, 0x721, "a2").code, EMX_AO_POST);
    size_t m = f->nev;
    assert_int_equal(start_tunnel(f, p, a, 0x722, "a3").code, 0);
    const struct ev *v = find_pipe_send(f, m, EMX_AO_SERVICE_UNAVAILABLE, 0x722, a->id);
    assert_non_null(v);
    assert_null(tunnel(f, "a3"));
    const struct emx_router_stats *st = emx_router_stats(f->r);
    assert_int_equal(st->tunnels_refused[EMX_TUN_REFUSE_DEVICE_LIMIT], 1);
    assert_int_equal(st->answers[EMX_ANS_TUNNEL_REFUSED], 1);

    /* The same tid again, for another edge: refused. */
    m = f->nev;
    assert_int_equal(start_tunnel(f, p, b, 0x723, "a1").code, 0);
    assert_non_null(find_pipe_send(f, m, EMX_AO_SERVICE_UNAVAILABLE, 0x723, b->id));
    assert_int_equal(st->tunnels_refused[EMX_TUN_REFUSE_DUPLICATE], 1);
    assert_int_equal(tunnel(f, "a1")->edge_id, a->id);

    assert_int_equal(start_tunnel(f, p, b, 0x724, "b1").code, EMX_AO_POST);
    m = f->nev;
    assert_int_equal(start_tunnel(f, p, b, 0x725, "b2").code, 0);
    assert_non_null(find_pipe_send(f, m, EMX_AO_SERVICE_UNAVAILABLE, 0x725, b->id));
    assert_int_equal(st->tunnels_refused[EMX_TUN_REFUSE_PROCESS_LIMIT], 1);
    assert_int_equal(emx_router_tunnel_count(f->r), 3);
    assert_int_equal(st->tunnels_started, 3);

    /* Other services and a StartTunnel without a tid pass untouched. */
    m = f->nev;
    platform_get(f, p, 0x726, a->id);
    assert_int_equal(count_edge_sends(f, m, a->id, EMX_AO_GET, ANY), 1);
    const char *nn[] = {"type"};
    const char *nv[] = {"tcp"};
    uint8_t buf[512];
    m = f->nev;
    pipe_msg(f, p, buf, build_service(buf, sizeof(buf), 0x727, a->id, "StartTunnel", nn, nv, 1));
    assert_int_equal(count_edge_sends(f, m, a->id, EMX_AO_POST, ANY), 1);
    assert_int_equal(st->tunnels_untracked, 1);
}

/* The tid of a tunnel service as it was sent (parsed from the bytes). */
static void sent_tid(const struct ev *v, char *out, size_t cap)
{
    struct emx_ao_tunnel_msg m;
    assert_int_equal(emx_ao_tunnel_parse(v->buf + v->body_off, v->len - v->body_off, &m), EMX_AO_OK);
    assert_non_null(m.tid.ptr);
    assert_true(m.tid.len < cap);
    memcpy(out, m.tid.ptr, m.tid.len);
    out[m.tid.len] = '\0';
}

/* docs/protocol.md §9.3: the device sees tids with the owner's token in
 * front; the platform gets its own back from the device's
 * TunnelCommandFromEdge; the token maps back to its instance. */
static void tunnel_tids_carry_the_owner_token(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    char tok[EMX_TUNNEL_TOKEN_LEN + 1], want[64], got[64];
    emx_tunnel_token("p2", tok);
    assert_int_equal(strlen(tok), EMX_TUNNEL_TOKEN_LEN);
    assert_int_equal(tok[0], 'x');
    assert_int_equal(tok[EMX_TUNNEL_TOKEN_LEN - 1], '~');
    /* FNV-1a-32 of "p2": the same in every process and version */
    assert_string_equal(tok, "x9f4ed4e7~");

    size_t m = f->nev;
    struct emx_ao_header req = start_tunnel(f, &f->inst[1]->pipes[0], e, 0x780, "tun-9");
    assert_int_equal(req.code, EMX_AO_POST);
    const struct ev *v = find_edge_send(f, m, e->id, EMX_AO_POST, ANY);
    sent_tid(v, got, sizeof(got));
    snprintf(want, sizeof(want), "%stun-9", tok);
    assert_string_equal(got, want);
    /* the record keeps the platform's tid */
    assert_non_null(tunnel(f, "tun-9"));
    const char *rest;
    size_t rest_len;
    assert_true(emx_tunnel_token_split(got, strlen(got), &rest, &rest_len));
    assert_int_equal(rest_len, 5);
    assert_memory_equal(rest, "tun-9", 5);
    assert_ptr_equal(emx_router_instance_by_token(f->r, got, strlen(got)), f->inst[1]);
    assert_null(emx_router_instance_by_token(f->r, "x00000000~tun-9", 15));
    assert_null(emx_router_instance_by_token(f->r, "tun-9", 5));
    assert_false(emx_tunnel_token_split("x0c0b0f9f~", 10, &rest, &rest_len)); /* no tid after */
    assert_false(emx_tunnel_token_split("X0c0b0f9f~a", 11, &rest, &rest_len));
    assert_false(emx_tunnel_token_split("x0c0b0f9g~a", 11, &rest, &rest_len));

    /* CompleteTunnel from the other instance: the record's owner token */
    const char *kn[] = {"tid", "peer_name"};
    const char *kv[] = {"tun-9", "p1"};
    uint8_t buf[512];
    m = f->nev;
    pipe_msg(f, &f->inst[0]->pipes[0], buf,
             build_service(buf, sizeof(buf), 0x781, e->id, "TunnelCommandToEdge", kn, kv, 2));
    v = find_edge_send(f, m, e->id, EMX_AO_POST, ANY);
    sent_tid(v, got, sizeof(got));
    assert_string_equal(got, want);
    /* a tid with no record: the sender's token */
    const char *un[] = {"tid", "command"};
    const char *uv[] = {"other", "CONNECT"};
    m = f->nev;
    pipe_msg(f, &f->inst[0]->pipes[0], buf,
             build_service(buf, sizeof(buf), 0x782, e->id, "TunnelCommandToEdge", un, uv, 2));
    v = find_edge_send(f, m, e->id, EMX_AO_POST, ANY);
    sent_tid(v, got, sizeof(got));
    emx_tunnel_token("p1", tok);
    snprintf(want, sizeof(want), "%sother", tok);
    assert_string_equal(got, want);

    /* the device's CANCEL names the tid it saw: the platform gets its own */
    emx_tunnel_token("p2", tok);
    snprintf(want, sizeof(want), "%stun-9", tok);
    const char *fn[] = {"tid", "command"};
    const char *fv[] = {want, "CANCEL"};
    m = f->nev;
    edge_msg(f, e, buf, build_service(buf, sizeof(buf), 0x90, 0, "TunnelCommandFromEdge", fn, fv, 2));
    v = NULL;
    for (size_t i = m; i < f->nev; i++)
        if (f->ev[i].kind == EV_PIPE_SEND && f->ev[i].h.request_id == 0x90)
            v = &f->ev[i];
    assert_non_null(v);
    sent_tid(v, got, sizeof(got));
    assert_string_equal(got, "tun-9");
    assert_null(tunnel(f, "tun-9")); /* the CANCEL ended the unclaimed record */
}

static void tunnel_deadline_attach_detach_and_edge_leaving(void **state)
{
    struct fx *f = *state;
    f->cfg.tunnel_connect_timeout = 30000;
    f->cfg.edge_request_timeout = 60000;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *p = &f->inst[0]->pipes[0];
    struct emx_ao_header r1 = start_tunnel(f, p, e, 0x730, "t1");
    struct emx_ao_header r2 = start_tunnel(f, p, e, 0x731, "t2");
    edge_answer(f, e, EMX_AO_SUCCESS, &r1);
    edge_answer(f, e, EMX_AO_SUCCESS, &r2);
    assert_int_equal(emx_router_tunnel_attach(f->r, "t1", 2, f->now), 0);
    assert_int_equal(emx_router_tunnel_attach(f->r, "t1", 2, f->now), -EBUSY);
    assert_int_equal(emx_router_tunnel_attach(f->r, "nope", 4, f->now), -ENOENT);
    assert_int_equal(emx_router_tunnel_detach(f->r, "nope", 4, f->now), -ENOENT);
    uint64_t t0 = f->now;
    tick_at(f, t0 + 29999);
    assert_non_null(tunnel(f, "t2"));
    tick_at(f, t0 + 30000);
    assert_null(tunnel(f, "t2"));
    assert_int_equal(emx_router_stats(f->r)->tunnels_ended[EMX_TUN_END_NO_SOCKET], 1);
    assert_non_null(tunnel(f, "t1")); /* claimed: no deadline */
    assert_int_equal(e->ntunnels, 1);

    /* A third, unclaimed: the edge leaving ends it; the claimed one stays. */
    struct emx_ao_header r3 = start_tunnel(f, p, e, 0x732, "t3");
    edge_answer(f, e, EMX_AO_SUCCESS, &r3);
    uint32_t id = e->id;
    emx_router_edge_closed(f->r, e, f->now);
    assert_null(tunnel(f, "t3"));
    assert_int_equal(emx_router_stats(f->r)->tunnels_ended[EMX_TUN_END_EDGE_LEFT], 1);
    const struct emx_tunnel *t = tunnel(f, "t1");
    assert_non_null(t);
    assert_true(t->edge_gone);
    assert_int_equal(t->edge_id, id);
    assert_int_equal(emx_router_tunnel_detach(f->r, "t1", 2, f->now), 0);
    assert_null(tunnel(f, "t1"));
    assert_int_equal(emx_router_stats(f->r)->tunnels_ended[EMX_TUN_END_DETACHED], 1);
    assert_int_equal(emx_router_tunnel_count(f->r), 0);
}

/* server.workers > 1: a device socket on another worker claims and
 * releases the record by key, and edge.max_tunnels bounds the count every
 * worker's router adds to. */
static void tunnel_claim_from_another_worker_and_shared_limit(void **state)
{
    struct fx *f = *state;
    atomic_size_t shared;
    atomic_init(&shared, 1); /* another worker's record */
    f->cfg.max_tunnels = 2;
    f->cfg.tunnels_shared = &shared;
    f->cfg.tunnel_connect_timeout = 30000;
    f->cfg.edge_request_timeout = 60000;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *p = &f->inst[0]->pipes[0];
    struct emx_ao_header r1 = start_tunnel(f, p, e, 0x740, "w1");
    assert_int_equal(r1.code, EMX_AO_POST);
    edge_answer(f, e, EMX_AO_SUCCESS, &r1);
    assert_int_equal(atomic_load(&shared), 2);
    /* the process is full though this router holds one */
    size_t m = f->nev;
    assert_int_equal(start_tunnel(f, p, e, 0x741, "w2").code, 0);
    assert_non_null(find_pipe_send(f, m, EMX_AO_SERVICE_UNAVAILABLE, 0x741, e->id));
    assert_int_equal(emx_router_stats(f->r)->tunnels_refused[EMX_TUN_REFUSE_PROCESS_LIMIT], 1);
    assert_int_equal(atomic_load(&shared), 2);

    const char *owner = f->inst[0]->id;
    uint64_t key = (2ull << 48) | 7;
    assert_int_equal(emx_router_tunnel_claim(f->r, "w1", 2, "other:1", key), -ENOENT);
    assert_int_equal(emx_router_tunnel_claim(f->r, "w1", 2, owner, 0), -ENOENT);
    assert_int_equal(emx_router_tunnel_claim(f->r, "nope", 4, owner, key), -ENOENT);
    assert_int_equal(emx_router_tunnel_claim(f->r, "w1", 2, owner, key), 0);
    assert_int_equal(emx_router_tunnel_claim(f->r, "w1", 2, owner, key + 1), -EBUSY);
    assert_int_equal(emx_router_tunnel_attach(f->r, "w1", 2, f->now), -EBUSY);
    tick_at(f, f->now + 30000); /* claimed: no deadline */
    assert_non_null(tunnel(f, "w1"));
    /* only the claim's own key releases it */
    assert_int_equal(emx_router_tunnel_release(f->r, "w1", 2, key + 1), -ENOENT);
    assert_non_null(tunnel(f, "w1"));
    assert_int_equal(emx_router_tunnel_release(f->r, "w1", 2, key), 0);
    assert_null(tunnel(f, "w1"));
    assert_int_equal(emx_router_stats(f->r)->tunnels_ended[EMX_TUN_END_DETACHED], 1);
    assert_int_equal(atomic_load(&shared), 1);
    assert_int_equal(emx_router_tunnel_release(f->r, "w1", 2, key), -ENOENT);
}

static void tunnel_device_cancel_ends_record_and_is_forwarded(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *p = &f->inst[0]->pipes[0];
    struct emx_ao_header r1 = start_tunnel(f, p, e, 0x740, "c1");
    edge_answer(f, e, EMX_AO_SUCCESS, &r1);
    const char *n[] = {"tid", "command"};
    const char *v[] = {"c1", "DISCONNECT"};
    uint8_t buf[512];
    uint32_t rid = f->next_rid++;
    size_t m = f->nev;
    edge_msg(f, e, buf,
             build_service(buf, sizeof(buf), rid, 0, "TunnelCommandFromEdge", n, v, 2));
    assert_non_null(find_pipe_send(f, m, EMX_AO_POST, rid, e->id));
    assert_string_equal(tunnel(f, "c1")->last_command, "DISCONNECT");
    v[1] = "CANCEL";
    rid = f->next_rid++;
    m = f->nev;
    edge_msg(f, e, buf,
             build_service(buf, sizeof(buf), rid, 0, "TunnelCommandFromEdge", n, v, 2));
    assert_non_null(find_pipe_send(f, m, EMX_AO_POST, rid, e->id));
    assert_null(tunnel(f, "c1"));
    assert_int_equal(emx_router_stats(f->r)->tunnels_ended[EMX_TUN_END_CANCELLED], 1);

    /* A claimed record is only marked; detach ends it. */
    struct emx_ao_header r2 = start_tunnel(f, p, e, 0x741, "c2");
    edge_answer(f, e, EMX_AO_SUCCESS, &r2);
    assert_int_equal(emx_router_tunnel_attach(f->r, "c2", 2, f->now), 0);
    v[0] = "c2";
    edge_msg(f, e, buf,
             build_service(buf, sizeof(buf), f->next_rid++, 0, "TunnelCommandFromEdge", n, v, 2));
    assert_int_equal(tunnel(f, "c2")->state, EMX_TUNNEL_COMPLETING);

    /* Reload: a shorter connect timeout moves deadlines. */
    start_tunnel(f, p, e, 0x742, "c3");
    struct emx_router_config c = f->cfg;
    c.tunnel_connect_timeout = 5000;
    assert_int_equal(emx_router_set_config(f->r, &c, f->now), 0);
    tick_at(f, f->now + 5000);
    assert_null(tunnel(f, "c3"));
    assert_non_null(tunnel(f, "c2"));
}

#define T(name) cmocka_unit_test_setup_teardown(name, setup, teardown)


/* ==== fixes from review ==== */

/* A re-AUTH from an authenticated edge leaves it working while it is
 * answered: a KEEP_ALIVE meanwhile is answered, not a reason to close. */
static void reauth_keeps_edge_authenticated(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    uint32_t rid = f->next_rid++;
    size_t m = f->nev;
    edge_send_auth(f, e, rid);
    assert_int_equal(e->state, EMX_EDGE_AUTHED);
    uint8_t buf[32];
    edge_msg(f, e, buf, header_only(buf, EMX_AO_KEEP_ALIVE, 77, 0, SESSION));
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_SUCCESS, 77));
    assert_int_equal(count_edge_closes(f, m, e->id), 0);
    /* edgemux's own answer to it (pipe lost) leaves the edge authenticated */
    struct emx_pipe *p = forwarded_to(f, m, e->id, rid);
    assert_non_null(p);
    emx_router_pipe_closed(f->r, p, f->now);
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_SERVICE_UNAVAILABLE, rid));
    assert_int_equal(e->state, EMX_EDGE_AUTHED);
    assert_int_equal(count_edge_closes(f, m, e->id), 0);
}

/* A reload that shortens request_timeout applies to requests already
 * pending, and the timer order holds for new ones. */
static void reload_shorter_request_timeout_applies_at_once(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    uint32_t rid_old, rid_new;
    size_t m = f->nev;
    assert_non_null(get(f, e, &rid_old));
    f->now += 1000;
    struct emx_router_config c = f->cfg;
    c.request_timeout = 2000;
    assert_int_equal(emx_router_set_config(f->r, &c, f->now), 0);
    assert_non_null(get(f, e, &rid_new));
    tick_at(f, f->now + 1500); /* 2.5 s after the first: its 8 s became 2 s */
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_GATEWAY_TIMEOUT, rid_old));
    assert_null(find_edge_send(f, m, e->id, EMX_AO_GATEWAY_TIMEOUT, rid_new));
    tick_at(f, f->now + 600);
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_GATEWAY_TIMEOUT, rid_new));
}

/* A pipe's own AUTH answered on another pipe does not count for it: the
 * pipe stays AUTHING and its AUTH is still pending. */
static void pipe_auth_answer_on_another_pipe_ignored(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_instance *inst = emx_router_instance_next(f->r, NULL);
    struct emx_pipe *a = &inst->pipes[0], *b = &inst->pipes[1];
    emx_router_pipe_closed(f->r, b, f->now);
    size_t m = f->nev;
    emx_router_pipe_opened(f->r, b, f->now);
    const struct ev *auth = find_pipe_send(f, m, EMX_AO_AUTH, ANY, 0);
    assert_non_null(auth);
    assert_ptr_equal(auth->pipe, b);
    pipe_answer(f, a, EMX_AO_SUCCESS, auth->h.request_id, 0); /* wrong pipe */
    assert_int_equal(b->state, EMX_PIPE_AUTHING);
    pipe_answer(f, b, EMX_AO_SUCCESS, auth->h.request_id, 0);
    assert_int_equal(b->state, EMX_PIPE_UP);
}

/* ==== issue 12: hostile peers and rule interactions ==== */

/* Item 5: an answer counts only on the pipe its request went out on; an
 * answer for it from another instance, or another pipe of the same one, is
 * counted and dropped, and the request still takes its real answer. */
static void platform_answer_on_another_pipe_is_dropped(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint32_t rid;
    size_t m = f->nev;
    struct emx_pipe *p = get(f, e, &rid);
    assert_non_null(p);
    struct emx_instance *other = p->inst == f->inst[0] ? f->inst[1] : f->inst[0];
    struct emx_pipe *sibling = &p->inst->pipes[p->index ^ 1];
    pipe_answer(f, &other->pipes[0], EMX_AO_SUCCESS, rid, e->id);
    pipe_answer(f, sibling, EMX_AO_NOT_FOUND, rid, e->id);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, rid), 0);
    assert_int_equal(emx_router_stats(f->r)->platform_answers_wrong_pipe, 2);
    pipe_answer(f, p, EMX_AO_SUCCESS, rid, e->id);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, rid), 1);
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_SUCCESS, rid));
}

/* Item 2: a tombstone lives until the device's last chunk, or
 * request_timeout after its latest chunk: a slow device sending chunks 5 s
 * apart after its 0xA0 never gets a second answer (0x80). */
static void tombstone_lives_request_timeout_past_latest_chunk(void **state)
{
    struct fx *f = *state;
    start_equal(f, 2);
    struct emx_edge *e = edge_authed(f);
    uint32_t rid = f->next_rid++;
    size_t m0 = f->nev;
    edge_chunk(f, e, rid, 1, 6, 300);
    struct emx_pipe *p = forwarded_to(f, m0, e->id, rid);
    assert_non_null(p);
    emx_router_pipe_closed(f->r, p, f->now); /* one 0xA0, the rest discarded */
    for (uint16_t id = 2; id <= 6; id++) {
        tick_at(f, f->now + 5000);
        edge_chunk(f, e, rid, id, 6, 300);
    }
    assert_int_equal(count_edge_sends(f, m0, e->id, ANY, rid), 1);
    assert_non_null(find_edge_send(f, m0, e->id, EMX_AO_INTERNAL_ERROR, rid));
    assert_int_equal(emx_router_stats(f->r)->chunks_discarded, 5);
    /* and one that stays silent past request_timeout is forgotten */
    rid = f->next_rid++;
    m0 = f->nev;
    edge_chunk(f, e, rid, 1, 3, 300);
    p = forwarded_to(f, m0, e->id, rid);
    emx_router_pipe_closed(f->r, p, f->now);
    tick_at(f, f->now + f->cfg.request_timeout - 1);
    edge_chunk(f, e, rid, 2, 3, 300);
    tick_at(f, f->now + f->cfg.request_timeout - 1);
    assert_int_equal(count_edge_sends(f, m0, e->id, ANY, rid), 1);
    tick_at(f, f->now + 2);
    edge_chunk(f, e, rid, 3, 3, 300); /* its tombstone expired: an orphan now */
    assert_int_equal(count_edge_sends(f, m0, e->id, EMX_AO_BAD_REQUEST, rid), 1);
}

/* Item 1: a device uploading slowly cannot make its pipe look stalled: a
 * multipart request is not answerable until its last chunk went out. One
 * pipe only, chunks 1.5 s apart for 15 s, and a GET in the middle. */
static void stall_slow_multipart_upload_is_not_a_stall(void **state)
{
    struct fx *f = *state;
    f->cfg.pipes_per_instance = 1;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *p = &f->inst[0]->pipes[0];
    uint32_t rid = f->next_rid++;
    size_t m0 = f->nev;
    for (uint16_t id = 1; id <= 10; id++) {
        edge_chunk(f, e, rid, id, 10, 500);
        if (id == 5) {
            uint32_t g;
            size_t m = f->nev;
            assert_ptr_equal(get(f, e, &g), p);
            pipe_answer(f, p, EMX_AO_SUCCESS, g, e->id);
            assert_non_null(find_edge_send(f, m, e->id, EMX_AO_SUCCESS, g));
        }
        if (id < 10)
            tick_at(f, f->now + 1500);
    }
    assert_int_equal(count_pipe_sends(f, m0, EMX_AO_POST, rid, e->id), 10);
    assert_int_equal(count_edge_sends(f, m0, e->id, ANY, rid), 0);
    /* Complete now: the platform could answer, so silence counts from here. */
    assert_true(emx_pipe_is_writable(f->r, p, f->now));
    tick_at(f, f->now + f->cfg.stall_after - 1);
    assert_true(emx_pipe_is_writable(f->r, p, f->now));
    tick_at(f, f->now + 1);
    assert_false(emx_pipe_is_writable(f->r, p, f->now));
    pipe_answer(f, p, EMX_AO_SUCCESS, rid, e->id);
    assert_true(emx_pipe_is_writable(f->r, p, f->now));
}

/* Item 1: a platform that thinks 3 s on one request (request_timeout 8 s)
 * while it answers others does not stall its pipe; one that answers
 * nothing at all for stall_after after a request it could answer does. */
static void stall_counts_silence_since_the_oldest_answerable_request(void **state)
{
    struct fx *f = *state;
    f->cfg.pipes_per_instance = 1;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *p = &f->inst[0]->pipes[0];
    uint32_t slow, quick, next;
    assert_ptr_equal(get(f, e, &slow), p); /* the platform thinks 3 s on this one */
    tick_at(f, f->now + 1000);
    assert_ptr_equal(get(f, e, &quick), p);
    tick_at(f, f->now + 500);
    pipe_answer(f, p, EMX_AO_SUCCESS, quick, e->id); /* life, after `slow` went out */
    tick_at(f, f->now + 1000);                       /* `slow` is 2.5 s old */
    size_t m = f->nev;
    assert_ptr_equal(get(f, e, &next), p);
    assert_null(find_edge_send(f, m, e->id, EMX_AO_INTERNAL_ERROR, next));
    tick_at(f, f->now + 500);
    pipe_answer(f, p, EMX_AO_SUCCESS, slow, e->id);
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_SUCCESS, slow));
    /* That answer came after `next` went out: life for it too. A request
     * sent now that meets only silence stalls the pipe 2 s later. */
    uint32_t last;
    tick_at(f, f->now + 100);
    assert_ptr_equal(get(f, e, &last), p);
    tick_at(f, f->now + 1999);
    assert_true(emx_pipe_is_writable(f->r, p, f->now));
    tick_at(f, f->now + 1);
    assert_false(emx_pipe_is_writable(f->r, p, f->now));
    m = f->nev;
    assert_null(get(f, e, NULL));
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_INTERNAL_ERROR, f->next_rid - 1));
}

/* One chunk of a platform answer (header, multipart header, payload). */
static void pipe_answer_chunk(struct fx *f, struct emx_pipe *p, uint32_t rid, uint32_t eid,
                              uint16_t id, uint16_t count)
{
    uint8_t buf[128];
    struct emx_ao_header h = {.version = EMX_AO_VERSION,
                              .code = EMX_AO_SUCCESS,
                              .request_id = rid,
                              .endpoint_id = eid,
                              .session_id = SESSION,
                              .multipart = true,
                              .chunk_id = id,
                              .chunk_count = count,
                              .chunk_size = 64};
    size_t n = emx_ao_header_write(buf, sizeof(buf), &h);
    assert_int_equal(n, EMX_AO_HEADER_SIZE + EMX_AO_MULTIPART_SIZE);
    memset(buf + n, 'x', 64);
    pipe_msg(f, p, buf, n + 64);
}

/* Item 3: each chunk of a platform answer re-arms the request's timer, so a
 * slow answer is delivered whole; once part of an answer reached the device,
 * edgemux never answers that request itself: not on timeout (0xA4), not on
 * pipe loss (0xA3). */
static void platform_multipart_answer_keeps_request_alive_and_is_never_followed(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    uint32_t rid;
    size_t m = f->nev;
    struct emx_pipe *p = get(f, e, &rid);
    assert_non_null(p);
    tick_at(f, f->now + 1000);
    pipe_answer_chunk(f, p, rid, e->id, 1, 3);
    tick_at(f, f->now + f->cfg.request_timeout - 1); /* 9 s after the request */
    pipe_answer_chunk(f, p, rid, e->id, 2, 3);
    tick_at(f, f->now + f->cfg.request_timeout - 1);
    pipe_answer_chunk(f, p, rid, e->id, 3, 3);
    tick_at(f, f->now + 3 * f->cfg.request_timeout);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, rid), 3);
    assert_int_equal(count_edge_sends(f, m, e->id, EMX_AO_GATEWAY_TIMEOUT, rid), 0);

    /* An answer that stops after its first chunk: nothing more, counted. */
    m = f->nev;
    p = get(f, e, &rid);
    pipe_answer_chunk(f, p, rid, e->id, 1, 2);
    tick_at(f, f->now + f->cfg.request_timeout);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, rid), 1);
    assert_int_equal(emx_router_stats(f->r)->answers_abandoned, 1);
    pipe_answer_chunk(f, p, rid, e->id, 2, 2); /* too late: dropped */
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, rid), 1);

    /* One whose pipe closes midway: no 0xA3 after the part delivered. */
    m = f->nev;
    p = get(f, e, &rid);
    pipe_answer_chunk(f, p, rid, e->id, 1, 2);
    emx_router_pipe_closed(f->r, p, f->now);
    tick_at(f, f->now + 2 * f->cfg.request_timeout);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, rid), 1);
    assert_int_equal(emx_router_stats(f->r)->answers_abandoned, 2);
}

/* A BIND of `count` names "<prefix><n>" for n in [first, first + count),
 * answered SUCCESS by the pipe that took it. */
static void bind_many(struct fx *f, struct emx_edge *e, char prefix, uint32_t first, size_t count)
{
    struct emx_ao_str *s = calloc(count, sizeof(*s));
    char(*names)[12] = calloc(count, sizeof(*names));
    size_t cap = 64 + count * 12;
    uint8_t *buf = malloc(cap);
    assert_true(s && names && buf);
    for (size_t i = 0; i < count; i++) {
        int n = snprintf(names[i], sizeof(names[i]), "%c%07u", prefix, (unsigned)(first + i));
        s[i] = (struct emx_ao_str){(const uint8_t *)names[i], (uint32_t)n};
    }
    uint32_t rid = f->next_rid++;
    size_t len = emx_ao_build_bind(buf, cap, EMX_AO_BIND, rid, 0, SESSION, s, count);
    assert_true(len > 0);
    size_t m = f->nev;
    edge_msg(f, e, buf, len);
    struct emx_pipe *p = forwarded_to(f, m, e->id, rid);
    assert_non_null(p);
    pipe_answer(f, p, EMX_AO_SUCCESS, rid, e->id);
    free(buf);
    free(names);
    free(s);
}

/* Item 6: an edge with more Things than one UNBIND's 16-bit count leaves:
 * as many UNBINDs as needed name every one of them, each once. */
static void edge_close_unbinds_more_than_65535_things(void **state)
{
    struct fx *f = *state;
    f->cfg.max_things = 0; /* unlimited for this test */
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    bind_many(f, e, 'T', 0, 65535);
    bind_many(f, e, 'T', 65535, 10000);
    assert_int_equal(e->nthings, 75535);
    uint32_t eid = e->id;
    size_t m = f->nev;
    emx_router_edge_closed(f->r, e, f->now);
    uint8_t *seen = calloc(75535, 1);
    assert_non_null(seen);
    size_t msgs = 0, names = 0;
    for (size_t i = m; i < f->nev; i++) {
        const struct ev *v = &f->ev[i];
        if (v->kind != EV_PIPE_SEND || !hmatch(v, EMX_AO_UNBIND, ANY, eid))
            continue;
        msgs++;
        struct emx_ao_bind b;
        assert_int_equal(emx_ao_bind_parse(v->buf + v->body_off, v->len - v->body_off, &b), 0);
        size_t cursor = 0;
        struct emx_ao_str n;
        while (emx_ao_bind_next_name(&b, &cursor, &n) == EMX_AO_OK) {
            unsigned k;
            assert_int_equal(sscanf((const char *)n.ptr + 1, "%7u", &k), 1);
            assert_true(k < 75535);
            assert_int_equal(seen[k], 0);
            seen[k] = 1;
            names++;
        }
    }
    free(seen);
    assert_int_equal(names, 75535);
    assert_int_equal(msgs, 2);
    assert_int_equal(emx_router_stats(f->r)->unbinds_sent, 2);
}

/* Item 7: orphan continuation chunks cost a rate token each and at most
 * max_pending tombstones are kept per edge, so a flood of them cannot grow
 * memory; the tombstones expire. */
static void orphan_chunks_count_against_rate_and_pending(void **state)
{
    struct fx *f = *state;
    f->cfg.max_msgs_per_sec = 10;
    f->cfg.max_pending = 50;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f); /* its AUTH took a token */
    size_t m = f->nev;
    uint32_t first = f->next_rid;
    for (int i = 0; i < 1000; i++)
        edge_chunk(f, e, f->next_rid++, 2, 3, 10);
    assert_int_equal(count_edge_sends(f, m, e->id, EMX_AO_BAD_REQUEST, ANY), 9);
    assert_int_equal(count_edge_sends(f, m, e->id, EMX_AO_SERVICE_UNAVAILABLE, ANY), 991);
    assert_int_equal(e->ntombs, 9);

    /* Rate off: tombstones stop at max_pending; the rest get 0xA3. */
    struct emx_router_config c = f->cfg;
    c.max_msgs_per_sec = 0;
    assert_int_equal(emx_router_set_config(f->r, &c, f->now), 0);
    m = f->nev;
    for (int i = 0; i < 1000; i++)
        edge_chunk(f, e, f->next_rid++, 2, 3, 10);
    assert_int_equal(e->ntombs, 50);
    assert_int_equal(count_edge_sends(f, m, e->id, EMX_AO_BAD_REQUEST, ANY), 41);
    uint32_t g;
    struct emx_pipe *p = get(f, e, &g); /* tombstones hold no request slot */
    assert_non_null(p);
    pipe_answer(f, p, EMX_AO_SUCCESS, g, e->id);
    /* a tombstoned message's later chunk is discarded quietly */
    m = f->nev;
    edge_chunk(f, e, first, 3, 3, 10);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, first), 0);
    assert_int_equal(e->ntombs, 49);
    tick_at(f, f->now + f->cfg.request_timeout);
    assert_int_equal(e->ntombs, 0);
    assert_non_null(get(f, e, NULL));
}

/* Item 10: the tables keyed by peer-chosen values hash with SipHash under a
 * key drawn per router. The implementation matches the reference vector of
 * the SipHash paper (SipHash-2-4, key 00..0f, message 00..0e); random keys
 * differ, and so do the hashes of one value under them. */
static void keyed_hash_is_siphash_under_a_random_key(void **state)
{
    (void)state;
    uint8_t key[EMX_SIPHASH_KEY_SIZE], msg[15];
    for (unsigned i = 0; i < sizeof(key); i++)
        key[i] = (uint8_t)i;
    for (unsigned i = 0; i < sizeof(msg); i++)
        msg[i] = (uint8_t)i;
    assert_true(emx_siphash(key, 2, 4, msg, sizeof(msg)) == 0xa129ca6149be45e5ull);
    assert_true(emx_siphash(key, 1, 3, msg, sizeof(msg)) != 0xa129ca6149be45e5ull);
    uint8_t k1[EMX_SIPHASH_KEY_SIZE], k2[EMX_SIPHASH_KEY_SIZE];
    assert_int_equal(emx_siphash_random_key(k1), 0);
    assert_int_equal(emx_siphash_random_key(k2), 0);
    assert_memory_not_equal(k1, k2, sizeof(k1));
    const char *thing = "SteamSensor";
    assert_true(emx_siphash13(k1, thing, 11) != emx_siphash13(k2, thing, 11));
}

/* Item 11: the new names of BINDs still in flight count against
 * max_things, so a burst of BINDs sent before any answer cannot overshoot;
 * a refused or failed BIND gives its room back. */
static void things_limit_counts_binds_in_flight(void **state)
{
    struct fx *f = *state;
    f->cfg.max_things = 3;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    static const char *const ab[] = {"Alpha", "Beta"};
    static const char *const cd[] = {"Gamma", "Delta"};
    static const char *const c[] = {"Gamma"};
    uint32_t r1 = f->next_rid++, r2 = f->next_rid++, r3 = f->next_rid++;
    size_t m = f->nev;
    edge_bind(f, e, EMX_AO_BIND, r1, ab, 2);
    edge_bind(f, e, EMX_AO_BIND, r2, cd, 2); /* 2 in flight + 2 > 3 */
    assert_non_null(find_pipe_send(f, m, EMX_AO_BIND, r1, e->id));
    assert_null(find_pipe_send(f, m, EMX_AO_BIND, r2, e->id));
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_FORBIDDEN, r2));
    edge_bind(f, e, EMX_AO_BIND, r3, c, 1); /* 2 + 1 fits */
    struct emx_pipe *p3 = forwarded_to(f, m, e->id, r3);
    assert_non_null(p3);
    /* r3 refused by the platform: its room comes back */
    pipe_answer(f, p3, EMX_AO_FORBIDDEN, r3, e->id);
    uint32_t r4 = f->next_rid++;
    edge_bind(f, e, EMX_AO_BIND, r4, c, 1);
    assert_non_null(forwarded_to(f, m, e->id, r4));
    assert_int_equal(e->things_inflight, 3);
    pipe_answer(f, forwarded_to(f, m, e->id, r1), EMX_AO_SUCCESS, r1, e->id);
    assert_int_equal(e->nthings, 2);
    assert_int_equal(e->things_inflight, 1);
}

/* Item 4: an edge due to close in a drain takes no new work (its requests
 * get 0xA0, a refused multipart message is discarded without a second
 * answer, platform requests for it get 0xA3) and is closed 1001 once what
 * it had in flight, both ways, is answered. */
static void drain_refuses_new_work_and_closes_when_idle(void **state)
{
    struct fx *f = *state;
    start_equal(f, 1);
    struct emx_edge *idle = edge_authed(f);
    struct emx_edge *e = edge_authed(f);
    size_t m = f->nev;
    emx_router_edge_drain(f->r, idle, f->now);
    assert_int_equal(count_edge_closes(f, m, idle->id), 1);
    assert_int_equal(f->ev[find_edge_close(f, m, idle->id)].close_code, 1001);

    uint32_t r1, r2;
    struct emx_pipe *p1 = get(f, e, &r1), *p2 = get(f, e, &r2);
    assert_true(p1 && p2);
    struct emx_pipe *pp = &f->inst[0]->pipes[0];
    m = f->nev;
    platform_get(f, pp, 0x700, e->id);
    struct emx_ao_header in = delivered(f, m, e);
    m = f->nev;
    emx_router_edge_drain(f->r, e, f->now);
    assert_int_equal(count_edge_closes(f, m, e->id), 0);
    uint32_t r3;
    assert_null(get(f, e, &r3));
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_INTERNAL_ERROR, r3));
    uint32_t r4 = f->next_rid++;
    edge_chunk(f, e, r4, 1, 2, 100);
    edge_chunk(f, e, r4, 2, 2, 100);
    assert_int_equal(count_edge_sends(f, m, e->id, ANY, r4), 1);
    assert_int_equal(count_pipe_sends(f, m, ANY, r4, e->id), 0);
    size_t mp = f->nev;
    platform_get(f, pp, 0x701, e->id);
    assert_non_null(find_pipe_send(f, mp, EMX_AO_SERVICE_UNAVAILABLE, 0x701, e->id));

    pipe_answer(f, p1, EMX_AO_SUCCESS, r1, e->id);
    edge_answer(f, e, EMX_AO_SUCCESS, &in);
    assert_int_equal(count_edge_closes(f, m, e->id), 0);
    pipe_answer(f, p2, EMX_AO_SUCCESS, r2, e->id);
    assert_non_null(find_edge_send(f, m, e->id, EMX_AO_SUCCESS, r2));
    assert_int_equal(count_edge_closes(f, m, e->id), 1);
    assert_int_equal(f->ev[find_edge_close(f, m, e->id)].close_code, 1001);
    assert_int_equal(emx_router_stats(f->r)->answers[EMX_ANS_DRAINING], 2);
}

/* One chunk of an edge's answer to the platform request `req`. */
static void edge_answer_chunk(struct fx *f, struct emx_edge *e, const struct emx_ao_header *req,
                              uint16_t id, uint16_t count, size_t payload)
{
    static uint8_t buf[4096];
    struct emx_ao_header h = {.version = EMX_AO_VERSION,
                              .code = EMX_AO_SUCCESS,
                              .request_id = req->request_id,
                              .endpoint_id = req->endpoint_id,
                              .session_id = SESSION,
                              .multipart = true,
                              .chunk_id = id,
                              .chunk_count = count,
                              .chunk_size = (uint16_t)payload};
    size_t n = emx_ao_header_write(buf, sizeof(buf), &h);
    assert_true(n > 0 && n + payload <= sizeof(buf));
    memset(buf + n, 'y', payload);
    edge_msg(f, e, buf, n + payload);
}

/* Item 8: what an edge pushes into a pipe with its answers is bounded. An
 * answer that grows past max_message_size (endless non-final chunks) is cut
 * off; one that starts on a pipe that is not draining, or over the edge's
 * rate, is refused with 0xA3 to the platform; one whose pipe stops draining
 * midway is cut off; and one cut off is never followed by 0xA4. */
static void edge_answers_to_platform_are_bounded(void **state)
{
    struct fx *f = *state;
    f->cfg.max_message_size = 4096;
    start_equal(f, 1);
    struct emx_edge *e = edge_authed(f);
    struct emx_pipe *pp = &f->inst[0]->pipes[0];

    size_t m = f->nev;
    platform_get(f, pp, 0x800, e->id);
    struct emx_ao_header in = delivered(f, m, e);
    m = f->nev;
    for (uint16_t id = 1; id <= 10; id++)
        edge_answer_chunk(f, e, &in, id, 60000, 1500);
    assert_int_equal(count_pipe_sends(f, m, ANY, 0x800, e->id), 2);
    assert_int_equal(emx_router_stats(f->r)->edge_answers_abandoned, 1);
    assert_int_equal(e->ninbound, 0);
    tick_at(f, f->now + f->cfg.edge_request_timeout);
    assert_int_equal(count_pipe_sends(f, m, ANY, 0x800, e->id), 2);

    /* the pipe is over its high watermark when the answer comes: 0xA3 */
    m = f->nev;
    platform_get(f, pp, 0x801, e->id);
    in = delivered(f, m, e);
    emx_router_pipe_queued(f->r, pp, HIGH(f) + 1, f->now);
    m = f->nev;
    edge_answer(f, e, EMX_AO_SUCCESS, &in);
    assert_int_equal(count_pipe_sends(f, m, ANY, 0x801, e->id), 1);
    assert_non_null(find_pipe_send(f, m, EMX_AO_SERVICE_UNAVAILABLE, 0x801, e->id));

    /* it stops draining midway: the rest is cut off, no 0xA4 later */
    emx_router_pipe_queued(f->r, pp, 0, f->now);
    m = f->nev;
    platform_get(f, pp, 0x802, e->id);
    in = delivered(f, m, e);
    m = f->nev;
    edge_answer_chunk(f, e, &in, 1, 3, 100);
    emx_router_pipe_queued(f->r, pp, HIGH(f) + 1, f->now);
    edge_answer_chunk(f, e, &in, 2, 3, 100);
    edge_answer_chunk(f, e, &in, 3, 3, 100);
    tick_at(f, f->now + f->cfg.edge_request_timeout);
    assert_int_equal(count_pipe_sends(f, m, ANY, 0x802, e->id), 1);
    assert_int_equal(emx_router_stats(f->r)->edge_answers_abandoned, 2);
    emx_router_pipe_queued(f->r, pp, 0, f->now);

    /* an answer started but never finished: no 0xA4 after its part */
    m = f->nev;
    platform_get(f, pp, 0x803, e->id);
    in = delivered(f, m, e);
    m = f->nev;
    edge_answer_chunk(f, e, &in, 1, 2, 100);
    tick_at(f, f->now + f->cfg.edge_request_timeout);
    assert_int_equal(count_pipe_sends(f, m, ANY, 0x803, e->id), 1);
    assert_int_equal(emx_router_stats(f->r)->edge_answers_abandoned, 3);

    /* over the edge's rate: 0xA3 "rate limited" to the platform */
    struct emx_router_config c = f->cfg;
    c.max_msgs_per_sec = 1;
    assert_int_equal(emx_router_set_config(f->r, &c, f->now), 0);
    uint32_t g;
    struct emx_pipe *gp = get(f, e, &g); /* takes the one token */
    pipe_answer(f, gp, EMX_AO_SUCCESS, g, e->id);
    m = f->nev;
    platform_get(f, pp, 0x804, e->id);
    in = delivered(f, m, e);
    m = f->nev;
    edge_answer(f, e, EMX_AO_SUCCESS, &in);
    assert_int_equal(count_pipe_sends(f, m, ANY, 0x804, e->id), 1);
    assert_non_null(find_pipe_send(f, m, EMX_AO_SERVICE_UNAVAILABLE, 0x804, e->id));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(pipe_open_sends_auth_and_success_makes_it_up),
        T(pipe_auth_failure_closes_pipe),
        T(edge_auth_forwarded_and_success_authenticates),
        T(stamping_endpoint_id_out_and_restored_back),
        T(stamping_restores_nonzero_endpoint_id_the_edge_used),
        T(rr_follows_discovery_order),
        T(rr_pipe_with_fewest_queued_bytes),
        T(rr_skips_unwritable_instance_without_credit),
        T(rr_even_over_30000_requests),
        T(wm_pipe_unwritable_until_it_falls_to_low),
        T(stall_pipe_unwritable_until_it_receives),
        T(tier_lowest_priority_number_is_used),
        T(tier_backup_used_only_when_preferred_has_no_connected_instance),
        T(tier_preferred_connected_but_unwritable_answers_a0),
        T(swrr_weights_1_2_3_over_60000),
        T(weight_zero_used_only_when_no_positive_weight_is_eligible),
        T(no_connected_instance_answers_a0_not_forwarded),
        T(all_instances_unwritable_answers_a0),
        T(platform_request_delivered_and_answer_returns_on_its_pipe),
        T(edge_answer_dropped_when_its_pipe_is_gone),
        T(platform_requests_same_id_from_two_pipes_are_kept_apart),
        T(platform_request_for_unknown_endpoint_answers_a3),
        T(platform_request_unanswered_by_edge_gets_a4_late_answer_dropped),
        T(edge_leaving_with_platform_requests_answers_a3_on_their_pipes),
        T(platform_multipart_request_chunks_share_one_rewritten_id),
        T(edge_multipart_answer_goes_back_whole_on_its_pipe),
        T(pending_request_whose_pipe_closes_gets_a3),
        T(pending_request_times_out_a4_late_answer_dropped),
        T(pending_cap_answers_a3_and_does_not_forward),
        T(platform_answer_after_edge_left_is_dropped),
        T(keep_alive_answered_40_never_forwarded),
        T(unknown_code_answers_80),
        T(unparseable_body_answers_80),
        T(short_header_closes_1007),
        T(bad_multipart_header_closes_1007),
        T(message_over_max_message_size_closes_1009),
        T(slow_consumer_closed_1008),
        T(request_before_auth_closes_1008),
        T(request_while_auth_pending_closes_1008),
        T(auth_failure_delivered_then_closed_1008),
        T(auth_answered_by_edgemux_keeps_edge_open),
        T(no_auth_within_auth_timeout_closes_1008),
        T(multipart_later_chunks_follow_the_first),
        T(multipart_pinned_pipe_over_high_holds_chunk_until_it_recovers),
        T(multipart_pin_wait_expired_one_a0_rest_dropped),
        T(multipart_pinned_pipe_closed_midway_one_a0),
        T(multipart_total_over_max_answers_8d_once),
        T(multipart_size_counts_real_bytes_not_count_times_size),
        T(multipart_request_timeout_starts_at_last_chunk),
        T(bind_success_records_things),
        T(bind_failure_records_nothing),
        T(edge_unbind_forgets_things),
        T(edge_close_unbinds_on_the_instance_that_took_the_bind),
        T(edge_close_unbind_falls_back_to_another_connected_instance),
        T(edge_close_unbind_none_when_nothing_connected),
        T(edge_close_unbind_unanswered_times_out_quietly),
        T(all_down_shorter_than_grace_closes_nothing),
        T(all_down_past_grace_closes_every_edge_1013),
        T(all_down_closes_spread_over_close_spread),
        T(all_down_cancelled_when_a_pipe_comes_back),
        T(discovery_update_applied_in_place),
        T(discovery_vanished_instance_drains_until_answered),
        T(discovery_vanished_instance_removed_after_timeout),
        T(discovery_failure_keeps_last_good_set),
        T(discovery_empty_set_applied_after_empty_confirm),
        T(discovery_empty_set_cancelled_by_nonempty_set),
        T(endpoint_ids_unique_nonzero_with_worker_bits),
        T(endpoint_id_not_reused_while_in_flight),
        T(reload_moves_marks_at_once),
        T(multipart_pinned_pipe_closed_while_chunk_held_one_a0),
        T(multipart_two_messages_pin_independently),
        T(all_down_new_edges_get_a0_and_stay_open),
        T(discovery_draining_waits_for_inbound_platform_requests),
        T(discovery_weight_change_applied_in_place),
        T(discovery_instance_back_while_draining_is_active_again),
        T(all_down_second_outage_closes_again),
        T(all_down_spread_survives_edges_leaving_midway),
        T(multipart_edge_leaves_while_chunk_held),
        T(edge_close_unbind_after_bind_instance_was_removed),
        T(discovery_null_id_uses_host_port),
        T(deadline_idle_router_has_none),
        T(deadline_request_timeout),
        T(deadline_edge_request_timeout),
        T(deadline_auth_timeout),
        T(deadline_pin_wait),
        T(deadline_all_down_grace_and_spread),
        T(deadline_empty_confirm),
        T(maintenance_stops_and_resumes_new_requests),
        T(rate_limit_answers_a3_and_refills),
        T(rate_limit_reload_starts_full_and_zero_is_off),
        T(things_limit_answers_83_without_forwarding),
        T(latency_histogram_observes_answers),
        T(edge_close_and_thing_iteration),
        T(reauth_keeps_edge_authenticated),
        T(reload_shorter_request_timeout_applies_at_once),
        T(pipe_auth_answer_on_another_pipe_ignored),
        T(platform_answer_on_another_pipe_is_dropped),
        T(tombstone_lives_request_timeout_past_latest_chunk),
        T(stall_slow_multipart_upload_is_not_a_stall),
        T(stall_counts_silence_since_the_oldest_answerable_request),
        T(platform_multipart_answer_keeps_request_alive_and_is_never_followed),
        T(edge_close_unbinds_more_than_65535_things),
        T(orphan_chunks_count_against_rate_and_pending),
        T(keyed_hash_is_siphash_under_a_random_key),
        T(things_limit_counts_binds_in_flight),
        T(drain_refuses_new_work_and_closes_when_idle),
        T(edge_answers_to_platform_are_bounded),
        T(bytes_in_flight_cap_refuses_a3_while_others_pass),
        T(bytes_in_flight_counts_multipart_chunks_and_zero_is_off),
        T(answer_backlog_cap_refuses_a3_until_the_edge_reads),
        T(memory_budget_sheds_newest_with_a0_and_recovers),
        T(tunnel_recorded_before_forward_success_keeps_complete_ends),
        T(tunnel_non_success_answer_or_a4_ends_record),
        T(tunnel_limits_refuse_with_a3_and_do_not_forward),
        T(tunnel_deadline_attach_detach_and_edge_leaving),
        T(tunnel_claim_from_another_worker_and_shared_limit),
        T(tunnel_tids_carry_the_owner_token),
        T(tunnel_device_cancel_ends_record_and_is_forwarded),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
