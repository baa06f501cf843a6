/* The router (DESIGN §4, outcomes of §3). See router.h for the contract and
 * docs/protocol.md for the behaviour at every edge case. */
#include "router.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "codec.h"
#include "siphash.h"

/* uthash allocates 32 buckets (512 bytes) with a table's first item; each
 * bound edge has a Things table, usually of one name, so that was ~0.5 KiB
 * of every idle edge. Tables still double as they fill. */
#undef HASH_INITIAL_NUM_BUCKETS
#undef HASH_INITIAL_NUM_BUCKETS_LOG2
#define HASH_INITIAL_NUM_BUCKETS      4U
#define HASH_INITIAL_NUM_BUCKETS_LOG2 2U

#define TAG "router"

enum req_state {
    REQ_SENDING = 1, /* multipart: chunks still coming from the edge */
    REQ_WAITING,     /* sent whole; waiting for the platform's answer */
    REQ_TOMBSTONE,   /* answered by edgemux; later chunks are discarded */
};

enum req_flags {
    REQ_F_AUTH = 1u << 0, /* an edge's AUTH */
    REQ_F_BIND = 1u << 1,
    REQ_F_UNBIND = 1u << 2,
    REQ_F_PIPE_AUTH = 1u << 3, /* edgemux's own AUTH on a pipe */
    REQ_F_LEAVE = 1u << 4,     /* edgemux's UNBIND for an edge that left */
    REQ_F_ANSWERING = 1u << 5, /* part of the platform's answer reached the edge */
};
#define REQ_F_SYSTEM (REQ_F_PIPE_AUTH | REQ_F_LEAVE)

/* A chunk held back while its pinned pipe is not writable. */
struct held {
    struct held *next;
    size_t len;
    uint8_t data[];
};

/* One request in flight from an edge (or from edgemux itself) to a pipe. */
struct emx_req {
    uint64_t key; /* endpointId << 32 | requestId */
    UT_hash_handle hh;
    struct emx_edge *edge; /* NULL for edgemux's own requests */
    struct emx_pipe *pipe; /* NULL once tombstoned */
    uint32_t orig_endpoint_id;
    uint32_t session_id;
    uint8_t code;
    uint8_t state;
    uint8_t flags;
    uint8_t entity_type;
    uint16_t chunk_count;
    uint16_t next_chunk;
    uint64_t entity_hash;
    uint64_t total;    /* AlwaysOn bytes received so far (multipart) */
    uint64_t bytes;    /* counted in its edge's bytes_in_flight and mem_requests */
    uint64_t deadline; /* in r->t_requests */
    uint64_t wait_deadline;
    uint64_t sent_at;       /* when its first message went to a pipe (latency) */
    uint64_t answerable_at; /* when its last chunk went out (stall clock) */
    uint64_t recv_mark;     /* the pipe's receive count at that moment */
    struct emx_list edge_link;
    struct emx_list pipe_link;
    struct emx_list timer_link;
    struct emx_list block_link; /* in pipe->blocked while chunks are held */
    struct emx_list wait_link;  /* in r->t_pin while chunks are held */
    struct emx_list ans_link;   /* in pipe->answerable once sent whole */
    struct held *held, **held_tail;
    uint8_t *names; /* BIND/UNBIND: the names as on the wire */
    size_t names_len;
    uint16_t nnames;
    uint32_t things_fresh;     /* BIND: new names, in edge->things_inflight until answered */
    struct emx_req *pool_next; /* in r->req_pool once finished */
};

/* Finished requests are kept for the next ones, so routing a message
 * allocates nothing; the pool is bounded so a burst is given back. Under
 * AddressSanitizer nothing is kept, so a stale pointer still faults. */
#if defined(__SANITIZE_ADDRESS__)
#define REQ_POOL_MAX 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define REQ_POOL_MAX 0
#endif
#endif
#ifndef REQ_POOL_MAX
#define REQ_POOL_MAX 4096
#endif

/* One platform request in flight to an edge. */
struct emx_inbound {
    uint32_t local_id;
    UT_hash_handle hh;
    struct emx_edge *edge;
    struct emx_pipe *pipe; /* NULL once that pipe closed */
    uint32_t orig_request_id;
    uint32_t endpoint_id;  /* as the platform sent it */
    bool receiving;        /* more chunks of it to come from the platform */
    bool answering;        /* part of the edge's answer went to the pipe */
    uint64_t answer_bytes; /* of the edge's answer, so far */
    uint64_t deadline;
    struct emx_list pipe_link;
    struct emx_list timer_link;
    struct emx_tunnel *tunnel; /* a StartTunnel: its record, until answered */
};

struct emx_thing {
    UT_hash_handle hh;
    uint64_t inst_serial; /* the instance that took the BIND */
    char *name;           /* NUL-terminated, allocated with the struct */
};

struct quarantined {
    uint32_t id;
    UT_hash_handle hh;
    uint64_t until;
    struct emx_list link;
};

struct emx_router {
    struct emx_router_config cfg;
    /* Keys peers choose (requestIds, Thing names) are hashed under a key
     * drawn at start, so table collisions cannot be computed in advance. */
    uint8_t hash_key[EMX_SIPHASH_KEY_SIZE];
    struct emx_req *req_pool;
    unsigned req_pooled;
    char *app_key;
    size_t app_key_len;
    struct emx_router_io io;
    struct emx_router_stats stats;

    struct emx_edge *edges; /* by id */
    size_t nedges;
    struct emx_req *reqs; /* by key */
    struct emx_list instances;
    uint64_t next_serial;
    unsigned pipes_up;
    uint32_t next_seq;
    uint32_t next_own;

    /* FIFOs: every entry of one list was armed with the same duration, so
     * each list is in deadline order and timers cost O(1). */
    struct emx_list t_requests;
    struct emx_list t_pin;
    struct emx_list t_inbound;
    struct emx_list t_auth;
    struct emx_list t_quarantine;
    struct quarantined *quarantine;

    /* Rule 8 */
    bool down;
    bool down_handled;
    uint64_t down_since;
    uint32_t *closing;
    size_t nclosing;
    size_t closing_idx;
    uint64_t closing_start;

    struct emx_list drained; /* draining edges now idle, to close (emx_edge.drain_link) */

    struct emx_tunnel *tunnels; /* by tid, oldest first */
    size_t ntunnels;
    struct emx_list t_tunnels; /* unattached records, by deadline */

    /* max_memory: edges' answer backlogs are read again, a bounded number
     * at a time from this edge on, at most every MEM_REREAD_MS. */
    uint32_t mem_cursor;
    uint64_t mem_read_at;
    uint64_t queued_read_at; /* pipes' queues last read again (see requeue) */

    /* Rule 9 */
    bool empty_pending;
    uint64_t empty_since;
    bool reap_needed;

    /* Round robin state (rules 1 and 3) */
    uint64_t rr_sig;              /* which instances were eligible last time */
    struct emx_instance *rr_last; /* picked last; ties go to the one after it */
};

static inline uint64_t req_key(uint32_t endpoint_id, uint32_t request_id)
{
    return ((uint64_t)endpoint_id << 32) | request_id;
}

static unsigned keyed_hash(const struct emx_router *r, const void *key, size_t len)
{
    return (unsigned)emx_siphash13(r->hash_key, key, len);
}

/* uthash lookups and inserts with the router's keyed hash. */
#define KFIND(r, head, keyptr, keylen, out)                                                        \
    do {                                                                                           \
        unsigned hv_ = keyed_hash((r), (keyptr), (keylen));                                        \
        HASH_FIND_BYHASHVALUE(hh, head, keyptr, keylen, hv_, out);                                 \
    } while (0)
#define KADD_KEYPTR(r, head, keyptr, keylen, add)                                                  \
    do {                                                                                           \
        unsigned hv_ = keyed_hash((r), (keyptr), (keylen));                                        \
        HASH_ADD_KEYPTR_BYHASHVALUE(hh, head, keyptr, keylen, hv_, add);                           \
    } while (0)

static const char *const answer_names[EMX_ANS__COUNT] = {
    [EMX_ANS_NO_INSTANCE] = "no_instance",
    [EMX_ANS_PIPE_LOST] = "pipe_lost",
    [EMX_ANS_TIMEOUT] = "timeout",
    [EMX_ANS_TOO_LARGE] = "too_large",
    [EMX_ANS_TOO_MANY_PENDING] = "too_many_pending",
    [EMX_ANS_BAD_REQUEST] = "bad_request",
    [EMX_ANS_KEEP_ALIVE] = "keep_alive",
    [EMX_ANS_PIN_LOST] = "pin_lost",
    [EMX_ANS_ENDPOINT_GONE] = "endpoint_gone",
    [EMX_ANS_EDGE_TIMEOUT] = "edge_timeout",
    [EMX_ANS_EDGE_LEFT] = "edge_left",
    [EMX_ANS_RATE_LIMITED] = "rate_limited",
    [EMX_ANS_TOO_MANY_THINGS] = "too_many_things",
    [EMX_ANS_DRAINING] = "draining",
    [EMX_ANS_PIPE_BUSY] = "pipe_busy",
    [EMX_ANS_BYTES_IN_FLIGHT] = "bytes_in_flight",
    [EMX_ANS_ANSWER_BACKLOG] = "answer_backlog",
    [EMX_ANS_MEMORY_BUDGET] = "memory_budget",
    [EMX_ANS_TUNNEL_REFUSED] = "tunnel_refused",
};

const uint64_t emx_latency_bounds_ms[EMX_LATENCY_BUCKETS] = {
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
};

static void observe_latency(struct emx_router *r, uint64_t ms)
{
    unsigned i = 0;
    while (i < EMX_LATENCY_BUCKETS && ms > emx_latency_bounds_ms[i])
        i++;
    r->stats.latency[i]++;
    r->stats.latency_sum_ms += ms;
    r->stats.latency_count++;
}

/* One token per request; the bucket holds one second's worth. Counted in
 * thousandths so rates below 1000/s refill smoothly at ms resolution. */
static bool rate_take(struct emx_router *r, struct emx_edge *e, uint64_t now)
{
    uint64_t rate = r->cfg.max_msgs_per_sec;
    if (rate == 0)
        return true;
    uint64_t cap = rate * 1000;
    if (e->rate_tokens > cap) /* the limit was lowered by a reload */
        e->rate_tokens = cap;
    if (now > e->rate_at) {
        uint64_t add = (now - e->rate_at) * rate;
        e->rate_tokens = add >= cap - e->rate_tokens ? cap : e->rate_tokens + add;
    }
    e->rate_at = now;
    if (e->rate_tokens < 1000)
        return false;
    e->rate_tokens -= 1000;
    return true;
}

/* A BIND that would take the edge over max_things: names not bound yet
 * count (binding a Thing again is free), and so do the new names of BINDs
 * still in flight, so a burst of BINDs cannot overshoot before they are
 * answered. *fresh: this BIND's new names (held until it is answered). */
static bool bind_over_limit(const struct emx_router *r, const struct emx_edge *e,
                            const struct emx_ao_bind *b, uint32_t *fresh)
{
    size_t cursor = 0, n = 0;
    struct emx_ao_str s;
    while (emx_ao_bind_next_name(b, &cursor, &s) == EMX_AO_OK) {
        struct emx_thing *t;
        KFIND(r, e->things, s.ptr, s.len, t);
        n += !t;
    }
    *fresh = (uint32_t)n;
    if (r->cfg.max_things == 0)
        return false;
    uint64_t held = (uint64_t)e->nthings + e->things_inflight;
    return held + n > r->cfg.max_things;
}

const char *emx_answer_reason_name(enum emx_answer_reason r)
{
    return (unsigned)r < EMX_ANS__COUNT ? answer_names[r] : "unknown";
}

#define rlog(r, lvl, ...) emx_logf((r)->io.log, (lvl), TAG, __VA_ARGS__)

/* ------------------------------------------------------------------ */
/* sending */

static void close_edge(struct emx_router *r, struct emx_edge *e, uint16_t code, const char *reason)
{
    if (e->state == EMX_EDGE_CLOSING)
        return;
    e->state = EMX_EDGE_CLOSING;
    emx_list_unlink(&e->auth_link);
    r->io.edge_close(r->io.ctx, e, code, reason);
}

/* A draining edge with nothing in flight is closed, after the event being
 * handled (see close_drained), never in the middle of it. */
static void check_drained(struct emx_router *r, struct emx_edge *e)
{
    if (e && e->draining && e->state != EMX_EDGE_CLOSING && e->npending == 0 && e->ninbound == 0 &&
        !emx_list_linked(&e->drain_link))
        emx_list_push_back(&r->drained, &e->drain_link);
}

static void close_drained(struct emx_router *r)
{
    struct emx_list *it;
    while ((it = r->drained.next) != &r->drained) {
        struct emx_edge *e = emx_container_of(it, struct emx_edge, drain_link);
        emx_list_unlink(&e->drain_link);
        close_edge(r, e, 1001, "server shutting down");
    }
}

static void send_edge(struct emx_router *r, struct emx_edge *e, const uint8_t *buf, size_t len)
{
    if (e->state == EMX_EDGE_CLOSING)
        return;
    int rc = r->io.edge_send(r->io.ctx, e, buf, len);
    if (rc == -ENOBUFS) {
        r->stats.slow_consumer_closes++;
        rlog(r, EMX_LOG_INFO, "edge %08" PRIx32 ": slow consumer, closing", e->id);
        close_edge(r, e, 1008, "slow consumer");
        return;
    }
    if (rc == 0) {
        r->stats.edge_msgs_out++;
        r->stats.edge_bytes_out += len;
        e->msgs_out++;
        if (r->io.edge_buffered) { /* a ceiling until the next reading */
            e->answer_backlog += len;
            r->stats.mem_answers += len;
        }
    }
}

/* ------------------------------------------------------------------ */
/* shares: what one edge may hold, and what all of them may (max_memory) */

#define MEM_REREAD_MS    50
#define MEM_REREAD_EDGES 1024

/* Read what the edge has not taken yet; the ceiling becomes exact. */
static uint64_t edge_backlog_read(struct emx_router *r, struct emx_edge *e)
{
    uint64_t b = r->io.edge_buffered(r->io.ctx, e);
    r->stats.mem_answers -=
        e->answer_backlog < r->stats.mem_answers ? e->answer_backlog : r->stats.mem_answers;
    r->stats.mem_answers += b;
    e->answer_backlog = b;
    return b;
}

static bool over_bytes_in_flight(const struct emx_router *r, const struct emx_edge *e)
{
    return r->cfg.max_bytes_in_flight && e->bytes_in_flight >= r->cfg.max_bytes_in_flight;
}

/* The transport is asked only when the ceiling is over the cap. */
static bool over_answer_backlog(struct emx_router *r, struct emx_edge *e)
{
    uint64_t cap = r->cfg.max_answer_backlog;
    if (!cap || !r->io.edge_buffered || e->answer_backlog <= cap)
        return false;
    return edge_backlog_read(r, e) > cap;
}

static uint64_t mem_held(const struct emx_router *r)
{
    return r->stats.mem_requests + r->stats.mem_answers;
}

/* Over max_memory, new work is shed. The answers' figure is a ceiling
 * (edges read without telling the router), so before shedding the edges
 * are read again: at most MEM_REREAD_EDGES of them every MEM_REREAD_MS,
 * round the table, so the cost stays bounded however many edges there are. */
static bool over_memory(struct emx_router *r, uint64_t now)
{
    uint64_t cap = r->cfg.max_memory;
    if (!cap || mem_held(r) < cap)
        return false;
    if (!r->io.edge_buffered || (r->mem_read_at && now - r->mem_read_at < MEM_REREAD_MS))
        return true;
    r->mem_read_at = now ? now : 1;
    struct emx_edge *e = emx_router_edge_find(r, r->mem_cursor);
    if (!e)
        e = r->edges;
    for (unsigned n = 0; e && n < MEM_REREAD_EDGES && n < r->nedges; n++) {
        if (e->answer_backlog)
            edge_backlog_read(r, e);
        e = e->hh.next ? (struct emx_edge *)e->hh.next : r->edges;
    }
    r->mem_cursor = e ? e->id : 0;
    return mem_held(r) >= cap;
}

/* Request bytes forwarded for an edge count until the request leaves its
 * pipe (answered, answered by edgemux, or the pipe lost). */
static void req_add_bytes(struct emx_router *r, struct emx_req *q, size_t len)
{
    q->bytes += len;
    r->stats.mem_requests += len;
    if (q->edge)
        q->edge->bytes_in_flight += len;
}

static void req_release_bytes(struct emx_router *r, struct emx_req *q)
{
    if (!q->bytes)
        return;
    r->stats.mem_requests -= q->bytes < r->stats.mem_requests ? q->bytes : r->stats.mem_requests;
    if (q->edge)
        q->edge->bytes_in_flight -=
            q->bytes < q->edge->bytes_in_flight ? q->bytes : q->edge->bytes_in_flight;
    q->bytes = 0;
}

static int send_pipe(struct emx_router *r, struct emx_pipe *p, const uint8_t *buf, size_t len)
{
    int rc = r->io.pipe_send(r->io.ctx, p, buf, len);
    if (rc == 0) {
        p->msgs_out++;
        p->bytes_out += len;
    }
    return rc;
}

static void answer_edge(struct emx_router *r, struct emx_edge *e, uint8_t code, uint32_t request_id,
                        uint32_t endpoint_id, uint32_t session_id, const char *reason,
                        enum emx_answer_reason why)
{
    uint8_t buf[160];
    size_t n =
        emx_ao_build_response(buf, sizeof(buf), code, request_id, endpoint_id, session_id, reason);
    r->stats.answers[why]++;
    if (n)
        send_edge(r, e, buf, n);
}

static void answer_pipe(struct emx_router *r, struct emx_pipe *p, uint8_t code, uint32_t request_id,
                        uint32_t endpoint_id, uint32_t session_id, const char *reason,
                        enum emx_answer_reason why)
{
    uint8_t buf[160];
    size_t n =
        emx_ao_build_response(buf, sizeof(buf), code, request_id, endpoint_id, session_id, reason);
    r->stats.answers[why]++;
    if (n && p->state == EMX_PIPE_UP)
        send_pipe(r, p, buf, n);
}

static uint32_t next_own_request_id(struct emx_router *r)
{
    return EMX_OWN_REQUEST_ID_BASE | (r->next_own++ & ~EMX_OWN_REQUEST_ID_BASE);
}

/* ------------------------------------------------------------------ */
/* tunnels (TUNNELS.md §8.1): who owns each tid */

#define TUNNEL_TID_MAX                 255 /* longer tids are forwarded without a record */
#define TUNNEL_THING_MAX               255 /* a Thing name is kept (for logs) up to this */
#define TUNNEL_CONNECT_TIMEOUT_DEFAULT 30000

static const char *const tunnel_refusal_names[EMX_TUN_REFUSE__COUNT] = {
    [EMX_TUN_REFUSE_PROCESS_LIMIT] = "process_limit",
    [EMX_TUN_REFUSE_DEVICE_LIMIT] = "device_limit",
    [EMX_TUN_REFUSE_DUPLICATE] = "duplicate_tid",
    [EMX_TUN_REFUSE_NO_MEMORY] = "no_memory",
};

static const char *const tunnel_end_names[EMX_TUN_END__COUNT] = {
    [EMX_TUN_END_REFUSED] = "refused",     [EMX_TUN_END_NO_ANSWER] = "no_answer",
    [EMX_TUN_END_COMPLETED] = "completed", [EMX_TUN_END_CANCELLED] = "cancelled",
    [EMX_TUN_END_EDGE_LEFT] = "edge_left", [EMX_TUN_END_NO_SOCKET] = "no_socket",
    [EMX_TUN_END_DETACHED] = "detached",
};

const char *emx_tunnel_refusal_name(enum emx_tunnel_refusal x)
{
    return (unsigned)x < EMX_TUN_REFUSE__COUNT ? tunnel_refusal_names[x] : "unknown";
}

const char *emx_tunnel_end_name(enum emx_tunnel_end x)
{
    return (unsigned)x < EMX_TUN_END__COUNT ? tunnel_end_names[x] : "unknown";
}

const char *emx_tunnel_state_name(enum emx_tunnel_state st)
{
    switch (st) {
    case EMX_TUNNEL_STARTING:
        return "starting";
    case EMX_TUNNEL_STARTED:
        return "started";
    case EMX_TUNNEL_COMPLETING:
        return "completing";
    }
    return "unknown";
}

/* A peer's string made fit for one log line: printable ASCII only (others
 * become '?'), at most cap-1 bytes. */
static const char *log_safe(char *buf, size_t cap, const void *s, size_t len)
{
    const unsigned char *p = s;
    size_t n = 0;
    for (size_t i = 0; i < len && n + 1 < cap; i++)
        buf[n++] = (p[i] >= 0x20 && p[i] < 0x7F) ? (char)p[i] : '?';
    buf[n] = '\0';
    return buf;
}

/* Lines name tid, Thing and owner; never a key (none is ever kept). */
static void tunnel_log(struct emx_router *r, const struct emx_tunnel *t, const char *what)
{
    char tid[96], thing[96];
    rlog(r, EMX_LOG_INFO, "tunnel %s thing %s owner %s edge %08" PRIx32 ": %s",
         log_safe(tid, sizeof(tid), t->tid, t->tid_len),
         log_safe(thing, sizeof(thing), t->thing, strlen(t->thing)), t->instance_id, t->edge_id,
         what);
}

static struct emx_tunnel *tunnel_lookup(struct emx_router *r, const void *tid, size_t len)
{
    struct emx_tunnel *t = NULL;
    if (!tid || len == 0 || len > TUNNEL_TID_MAX || !r->tunnels)
        return NULL;
    KFIND(r, r->tunnels, tid, len, t);
    return t;
}

/* A place under edge.max_tunnels: the process's count when the workers
 * share one (taken first, given back when over), else this router's. */
static bool tunnel_take_place(struct emx_router *r)
{
    if (!r->cfg.tunnels_shared)
        return !r->cfg.max_tunnels || r->ntunnels < r->cfg.max_tunnels;
    return emx_shared_take(r->cfg.tunnels_shared, r->cfg.max_tunnels);
}

static void tunnel_give_place(struct emx_router *r)
{
    if (r->cfg.tunnels_shared)
        emx_shared_give(r->cfg.tunnels_shared);
}

static void tunnel_end(struct emx_router *r, struct emx_tunnel *t, enum emx_tunnel_end why)
{
    r->stats.tunnels_ended[why]++;
    char what[40];
    snprintf(what, sizeof(what), "ended (%s)", emx_tunnel_end_name(why));
    tunnel_log(r, t, what);
    emx_list_unlink(&t->timer_link);
    if (t->start_in)
        t->start_in->tunnel = NULL;
    if (!t->edge_gone) {
        struct emx_edge *e = emx_router_edge_find(r, t->edge_id);
        if (e && e->ntunnels)
            e->ntunnels--;
    }
    HASH_DELETE(hh, r->tunnels, t);
    r->ntunnels--;
    tunnel_give_place(r);
    emx_free(t); /* the strings live in the same block */
}

void emx_tunnel_token(const char *instance_id, char out[EMX_TUNNEL_TOKEN_LEN + 1])
{
    uint32_t h = 2166136261u; /* FNV-1a-32: stable across processes and versions */
    for (const unsigned char *p = (const unsigned char *)instance_id; *p; p++)
        h = (h ^ *p) * 16777619u;
    snprintf(out, EMX_TUNNEL_TOKEN_LEN + 1, "x%08" PRIx32 "~", h);
}

bool emx_tunnel_token_split(const char *tid, size_t len, const char **rest, size_t *rest_len)
{
    if (len <= EMX_TUNNEL_TOKEN_LEN || tid[0] != 'x' || tid[EMX_TUNNEL_TOKEN_LEN - 1] != '~')
        return false;
    for (size_t i = 1; i < EMX_TUNNEL_TOKEN_LEN - 1; i++)
        if (!((tid[i] >= '0' && tid[i] <= '9') || (tid[i] >= 'a' && tid[i] <= 'f')))
            return false;
    *rest = tid + EMX_TUNNEL_TOKEN_LEN;
    *rest_len = len - EMX_TUNNEL_TOKEN_LEN;
    return true;
}

struct emx_instance *emx_router_instance_by_token(struct emx_router *r, const char *tid,
                                                  size_t len)
{
    const char *rest;
    size_t rest_len;
    if (!emx_tunnel_token_split(tid, len, &rest, &rest_len))
        return NULL;
    for (struct emx_instance *inst = emx_router_instance_next(r, NULL); inst;
         inst = emx_router_instance_next(r, inst)) {
        char tok[EMX_TUNNEL_TOKEN_LEN + 1];
        emx_tunnel_token(inst->id, tok);
        if (memcmp(tok, tid, EMX_TUNNEL_TOKEN_LEN) == 0)
            return inst;
    }
    return NULL;
}

/* The message a tunnel service becomes on its way: `tid` in place of its
 * tid (single-part messages only). Returns a new buffer (*out_len) or NULL
 * (no memory, no tid): the message then goes unchanged. */
static uint8_t *tunnel_retid(const uint8_t *msg, size_t len, const struct emx_ao_tunnel_msg *m,
                             const char *prefix, size_t plen, const void *tid, size_t tid_len,
                             size_t *out_len)
{
    char joined[EMX_TUNNEL_TOKEN_LEN + TUNNEL_TID_MAX];
    if (!m->tid_value || plen > EMX_TUNNEL_TOKEN_LEN || tid_len > TUNNEL_TID_MAX)
        return NULL;
    memcpy(joined, prefix, plen);
    memcpy(joined + plen, tid, tid_len);
    size_t cap = len + 4 + EMX_TUNNEL_TOKEN_LEN;
    uint8_t *buf = emx_malloc(cap);
    if (!buf)
        return NULL;
    *out_len = emx_ao_tunnel_with_tid(msg, len, m, joined, plen + tid_len, buf, cap);
    if (!*out_len) {
        emx_free(buf);
        return NULL;
    }
    return buf;
}

/* Copy a string view into a fixed field, NUL-terminated, printable only. */
static void copy_field(char *dst, size_t cap, struct emx_ao_str s)
{
    log_safe(dst, cap, s.ptr ? (const void *)s.ptr : "", s.ptr ? s.len : 0);
}

/* A StartTunnel is about to go from pipe p to edge e. Returns 0 to forward
 * it (*out: its new record, or NULL when it has no usable tid), or 1 when
 * it was refused and answered on the pipe instead. */
static int tunnel_start(struct emx_router *r, struct emx_pipe *p, struct emx_edge *e,
                        const struct emx_ao_header *h, const struct emx_ao_tunnel_msg *m,
                        uint64_t now, struct emx_tunnel **out)
{
    *out = NULL;
    if (!m->tid.ptr || m->tid.len == 0 || m->tid.len > TUNNEL_TID_MAX) {
        r->stats.tunnels_untracked++; /* the device refuses a missing tid itself */
        return 0;
    }
    enum emx_tunnel_refusal why;
    uint8_t code = EMX_AO_SERVICE_UNAVAILABLE;
    enum emx_answer_reason ans = EMX_ANS_TUNNEL_REFUSED;
    const char *reason;
    if (tunnel_lookup(r, m->tid.ptr, m->tid.len)) {
        why = EMX_TUN_REFUSE_DUPLICATE;
        reason = "tunnel id in use";
    } else if (!tunnel_take_place(r)) {
        why = EMX_TUN_REFUSE_PROCESS_LIMIT;
        reason = "too many tunnels";
    } else if (r->cfg.max_tunnels_per_device && e->ntunnels >= r->cfg.max_tunnels_per_device) {
        tunnel_give_place(r);
        why = EMX_TUN_REFUSE_DEVICE_LIMIT;
        reason = "too many tunnels for this device";
    } else {
        size_t thing_len = m->thing.len < TUNNEL_THING_MAX ? m->thing.len : TUNNEL_THING_MAX;
        size_t inst_len = strlen(p->inst->id);
        struct emx_tunnel *t =
            emx_calloc(1, sizeof(*t) + m->tid.len + 1 + thing_len + 1 + inst_len + 1);
        if (t) {
            char *str = (char *)(t + 1);
            t->tid = str;
            t->tid_len = m->tid.len;
            memcpy(t->tid, m->tid.ptr, m->tid.len);
            t->thing = t->tid + m->tid.len + 1;
            if (thing_len)
                memcpy(t->thing, m->thing.ptr, thing_len);
            t->instance_id = t->thing + thing_len + 1;
            memcpy(t->instance_id, p->inst->id, inst_len);
            t->inst_serial = p->inst->serial;
            t->pipe_index = p->index;
            t->edge_id = e->id;
            t->state = EMX_TUNNEL_STARTING;
            t->started_at = now;
            t->deadline = now + r->cfg.tunnel_connect_timeout;
            copy_field(t->type, sizeof(t->type), m->type);
            struct emx_ao_str host;
            uint16_t port;
            if (emx_ao_tunnel_target(m->connection, &host, &port) == EMX_AO_OK) {
                char hbuf[64];
                snprintf(t->target, sizeof(t->target), "%s:%u",
                         log_safe(hbuf, sizeof(hbuf), host.ptr, host.len), (unsigned)port);
            }
            t->chunksize = m->has_chunksize ? m->chunksize : -1;
            t->idle_timeout = m->has_idle_timeout ? m->idle_timeout : -1;
            KADD_KEYPTR(r, r->tunnels, t->tid, t->tid_len, t);
            r->ntunnels++;
            e->ntunnels++;
            emx_list_push_back(&r->t_tunnels, &t->timer_link);
            r->stats.tunnels_started++;
            char what[160];
            snprintf(what, sizeof(what), "StartTunnel type %s target %s chunksize %" PRId32,
                     t->type, t->target[0] ? t->target : "?", t->chunksize);
            tunnel_log(r, t, what);
            *out = t;
            return 0;
        }
        tunnel_give_place(r);
        why = EMX_TUN_REFUSE_NO_MEMORY;
        code = EMX_AO_INTERNAL_ERROR;
        ans = EMX_ANS_NO_INSTANCE;
        reason = "out of memory";
    }
    r->stats.tunnels_refused[why]++;
    char tid[96], thing[96];
    rlog(r, EMX_LOG_INFO,
         "tunnel %s thing %s owner %s edge %08" PRIx32 ": StartTunnel refused (%s)",
         log_safe(tid, sizeof(tid), m->tid.ptr, m->tid.len),
         log_safe(thing, sizeof(thing), m->thing.ptr, m->thing.len), p->inst->id, e->id, reason);
    answer_pipe(r, p, code, h->request_id, h->endpoint_id, h->session_id, reason, ans);
    return 1;
}

/* CompleteTunnel, TunnelCommandToEdge (forwarded to the device) or
 * TunnelCommandFromEdge (from it): log, and end the record when the tunnel
 * is over and no relay socket holds it. */
static void tunnel_control(struct emx_router *r, const struct emx_ao_tunnel_msg *m)
{
    struct emx_tunnel *t = tunnel_lookup(r, m->tid.ptr, m->tid.len);
    if (!t) {
        char tid[96];
        rlog(r, EMX_LOG_DEBUG, "tunnel %s: %s for no record",
             log_safe(tid, sizeof(tid), m->tid.ptr, m->tid.len),
             emx_ao_tunnel_service_name(m->service));
        return;
    }
    char what[64];
    if (m->service == EMX_AO_TUNNEL_COMPLETE) {
        if (!t->attached) {
            tunnel_end(r, t, EMX_TUN_END_COMPLETED);
            return;
        }
        t->state = EMX_TUNNEL_COMPLETING;
        tunnel_log(r, t, "CompleteTunnel");
        return;
    }
    copy_field(t->last_command, sizeof(t->last_command), m->command);
    snprintf(what, sizeof(what), "%s %s", emx_ao_tunnel_service_name(m->service), t->last_command);
    if (m->service == EMX_AO_TUNNEL_COMMAND_FROM && emx_ao_str_eq(m->command, "CANCEL")) {
        if (!t->attached) {
            tunnel_log(r, t, what);
            tunnel_end(r, t, EMX_TUN_END_CANCELLED);
            return;
        }
        t->state = EMX_TUNNEL_COMPLETING;
    }
    tunnel_log(r, t, what);
}

/* The device's answer to a StartTunnel (its first message). */
static void tunnel_answered(struct emx_router *r, struct emx_inbound *in, uint8_t code)
{
    struct emx_tunnel *t = in->tunnel;
    if (!t)
        return;
    if (code == EMX_AO_SUCCESS) {
        t->state = EMX_TUNNEL_STARTED;
        return;
    }
    char what[48];
    snprintf(what, sizeof(what), "device answered 0x%02x", code);
    tunnel_log(r, t, what);
    tunnel_end(r, t, EMX_TUN_END_REFUSED);
}

/* A StartTunnel leaves flight: without the device's SUCCESS (edgemux
 * answered 0xA3 or 0xA4 in its place) the platform gave the tunnel up. */
static void inbound_drop_tunnel(struct emx_router *r, struct emx_inbound *in)
{
    struct emx_tunnel *t = in->tunnel;
    if (!t)
        return;
    in->tunnel = NULL;
    t->start_in = NULL;
    if (t->state == EMX_TUNNEL_STARTING)
        tunnel_end(r, t, EMX_TUN_END_NO_ANSWER);
}

const struct emx_tunnel *emx_router_tunnel_find(struct emx_router *r, const char *tid,
                                                size_t tid_len)
{
    return tunnel_lookup(r, tid, tid_len);
}

int emx_router_tunnel_attach(struct emx_router *r, const char *tid, size_t tid_len, uint64_t now)
{
    (void)now;
    struct emx_tunnel *t = tunnel_lookup(r, tid, tid_len);
    if (!t)
        return -ENOENT;
    if (t->attached)
        return -EBUSY;
    t->attached = true;
    emx_list_unlink(&t->timer_link);
    tunnel_log(r, t, "socket attached");
    return 0;
}

int emx_router_tunnel_detach(struct emx_router *r, const char *tid, size_t tid_len, uint64_t now)
{
    (void)now;
    struct emx_tunnel *t = tunnel_lookup(r, tid, tid_len);
    if (!t)
        return -ENOENT;
    tunnel_end(r, t, EMX_TUN_END_DETACHED);
    return 0;
}

int emx_router_tunnel_claim(struct emx_router *r, const char *tid, size_t tid_len,
                            const char *instance_id, uint64_t key)
{
    struct emx_tunnel *t = tunnel_lookup(r, tid, tid_len);
    if (!t || !key || strcmp(t->instance_id, instance_id) != 0)
        return -ENOENT;
    if (t->attached)
        return -EBUSY;
    t->attached = true;
    t->claim_key = key;
    emx_list_unlink(&t->timer_link);
    tunnel_log(r, t, "socket attached on another worker");
    return 0;
}

int emx_router_tunnel_release(struct emx_router *r, const char *tid, size_t tid_len, uint64_t key)
{
    struct emx_tunnel *t = tunnel_lookup(r, tid, tid_len);
    if (!t || !key || !t->attached || t->claim_key != key)
        return -ENOENT;
    tunnel_end(r, t, EMX_TUN_END_DETACHED);
    return 0;
}

size_t emx_router_tunnel_count(const struct emx_router *r)
{
    return r->ntunnels;
}

const struct emx_tunnel *emx_router_tunnel_next(struct emx_router *r, const struct emx_tunnel *prev)
{
    return prev ? prev->hh.next : r->tunnels;
}

/* ------------------------------------------------------------------ */
/* eligibility (rules 1-3) */

/* Silence counts from the oldest answerable request sent since the last
 * receive: a receive after a request went out is life for it (and for every
 * older one), so only requests newer than it can show a stall. */
static bool pipe_stalled(const struct emx_router *r, const struct emx_pipe *p, uint64_t now)
{
    const struct emx_req *q = p->silent_head;
    return q && emx_stall_is_stalled(&p->stall, true, q->answerable_at, q->recv_mark, now,
                                     r->cfg.stall_after);
}

static void pipe_received(struct emx_pipe *p)
{
    emx_stall_received(&p->stall);
    p->silent_head = NULL;
}

/* A request leaves the pipe's answerable list (answered, or answered by
 * edgemux, or its edge left): the next newer one, sent after the same last
 * receive, takes over the stall clock. */
static void unlink_answerable(struct emx_req *q)
{
    struct emx_pipe *p = q->pipe;
    if (p && p->silent_head == q) {
        struct emx_list *next = q->ans_link.next;
        p->silent_head =
            next != &p->answerable ? emx_container_of(next, struct emx_req, ans_link) : NULL;
    }
    emx_list_unlink(&q->ans_link);
}

static bool pipe_ok(const struct emx_router *r, const struct emx_pipe *p, uint64_t now)
{
    return p->state == EMX_PIPE_UP && p->wm.writable && !pipe_stalled(r, p, now);
}

bool emx_pipe_is_writable(const struct emx_router *r, const struct emx_pipe *p, uint64_t now)
{
    return pipe_ok(r, p, now);
}

static bool inst_routable(const struct emx_instance *inst)
{
    return inst->state == EMX_INSTANCE_ACTIVE && !inst->maintenance;
}

bool emx_instance_is_eligible(const struct emx_router *r, const struct emx_instance *inst,
                              uint64_t now)
{
    if (!inst_routable(inst) || inst->up_pipes == 0)
        return false;
    for (unsigned i = 0; i < inst->npipes; i++)
        if (pipe_ok(r, &inst->pipes[i], now))
            return true;
    return false;
}

/* The connected, writable pipe with the fewest queued bytes; ties rotate. */
static struct emx_pipe *pick_pipe(const struct emx_router *r, struct emx_instance *inst,
                                  uint64_t now)
{
    struct emx_pipe *best = NULL;
    for (unsigned k = 0; k < inst->npipes; k++) {
        struct emx_pipe *p = &inst->pipes[(inst->pipe_cursor + k) % inst->npipes];
        if (pipe_ok(r, p, now) && (!best || p->wm.queued < best->wm.queued))
            best = p;
    }
    if (best)
        inst->pipe_cursor = (best->index + 1) % inst->npipes;
    return best;
}

static struct emx_pipe *route(struct emx_router *r, uint64_t now)
{
    /* The tier is the best priority with a connected instance, writable or
     * not: a busy preferred tier answers 0xA0 rather than spill (rule 3). */
    bool have_tier = false;
    uint32_t tier = 0;
    struct emx_list *it, *tmp;
    emx_list_for_each_safe(it, tmp, &r->instances)
    {
        struct emx_instance *inst = emx_container_of(it, struct emx_instance, link);
        if (inst_routable(inst) && inst->up_pipes > 0 && (!have_tier || inst->priority < tier)) {
            tier = inst->priority;
            have_tier = true;
        }
    }
    if (!have_tier)
        return NULL;

    /* Smooth weighted round robin over the eligible instances of the tier;
     * only eligible ones earn credit. When the eligible set changes, the
     * credits start over, so a skipped instance leaves no burst behind, and
     * ties go to the next instance after the last one picked: with equal
     * weights this is the circular list of rule 1. Weight-0 instances take
     * part (as weight 1 among themselves) only when no weighted one is
     * eligible. */
    for (int zero_pass = 0; zero_pass < 2; zero_pass++) {
        uint64_t sig = 1469598103934665603ull;
        bool any = false;
        emx_list_for_each_safe(it, tmp, &r->instances)
        {
            struct emx_instance *inst = emx_container_of(it, struct emx_instance, link);
            inst->rr_eligible = inst->priority == tier && (inst->weight == 0) == (zero_pass == 1) &&
                                emx_instance_is_eligible(r, inst, now);
            if (inst->rr_eligible) {
                sig = (sig ^ inst->serial) * 1099511628211ull;
                any = true;
            }
        }
        if (!any)
            continue;
        sig ^= (uint64_t)zero_pass;
        if (sig != r->rr_sig) {
            r->rr_sig = sig;
            emx_list_for_each_safe(it, tmp, &r->instances)
                emx_container_of(it, struct emx_instance, link)
                    ->swrr_current = 0;
        }
        struct emx_instance *best = NULL;
        int64_t total = 0;
        struct emx_list *start = r->rr_last ? &r->rr_last->link : &r->instances;
        for (it = start->next;; it = it->next) {
            if (it != &r->instances) {
                struct emx_instance *inst = emx_container_of(it, struct emx_instance, link);
                if (inst->rr_eligible) {
                    int64_t w = zero_pass ? 1 : (int64_t)inst->weight;
                    inst->swrr_current += w;
                    total += w;
                    if (!best || inst->swrr_current > best->swrr_current)
                        best = inst;
                }
            }
            if (it == start)
                break;
        }
        best->swrr_current -= total;
        best->requests++;
        r->rr_last = best;
        return pick_pipe(r, best, now);
    }
    return NULL;
}

static void flush_blocked(struct emx_router *r, struct emx_pipe *p, uint64_t now);

/* No pipe is writable by the figures last reported: they may be stale (the
 * kernel sends what a pipe held without an event, and a large request
 * marks its pipe full until the next report), so read the unwritable
 * pipes again, at most once per ms. True when one became writable. */
static bool requeue(struct emx_router *r, uint64_t now)
{
    if (!r->io.pipe_buffered || r->queued_read_at == now + 1)
        return false;
    r->queued_read_at = now + 1; /* 0 stays "never" */
    bool any = false;
    struct emx_list *it, *tmp;
    emx_list_for_each_safe(it, tmp, &r->instances)
    {
        struct emx_instance *inst = emx_container_of(it, struct emx_instance, link);
        for (unsigned i = 0; i < inst->npipes; i++) {
            struct emx_pipe *p = &inst->pipes[i];
            if (p->state != EMX_PIPE_UP || p->wm.writable)
                continue;
            if (emx_wm_set_queued(&p->wm, r->io.pipe_buffered(r->io.ctx, p)) && p->wm.writable) {
                any = true;
                if (pipe_ok(r, p, now))
                    flush_blocked(r, p, now);
            }
        }
    }
    return any;
}

/* ------------------------------------------------------------------ */
/* requests */

static void inst_pending_dec(struct emx_router *r, struct emx_instance *inst)
{
    if (inst->pending > 0)
        inst->pending--;
    if (inst->pending == 0 && inst->state == EMX_INSTANCE_DRAINING)
        r->reap_needed = true;
}

static void edge_pause(struct emx_router *r, struct emx_edge *e)
{
    if (e->paused++ == 0 && e->state != EMX_EDGE_CLOSING)
        r->io.edge_pause(r->io.ctx, e, true);
}

static void edge_resume(struct emx_router *r, struct emx_edge *e)
{
    if (e->paused > 0 && --e->paused == 0 && e->state != EMX_EDGE_CLOSING)
        r->io.edge_pause(r->io.ctx, e, false);
}

static void free_held(struct emx_req *q)
{
    while (q->held) {
        struct held *h = q->held;
        q->held = h->next;
        emx_free(h);
    }
    q->held_tail = &q->held;
}

/* Stop waiting for the pinned pipe: drop held chunks, resume the edge. */
static void unblock(struct emx_router *r, struct emx_req *q)
{
    if (!emx_list_linked(&q->block_link))
        return;
    emx_list_unlink(&q->block_link);
    emx_list_unlink(&q->wait_link);
    free_held(q);
    if (q->edge)
        edge_resume(r, q->edge);
}

/* Take a request off its pipe (answer received, or edgemux answered). */
static void detach_from_pipe(struct emx_router *r, struct emx_req *q)
{
    req_release_bytes(r, q);
    if (!q->pipe)
        return;
    unblock(r, q);
    emx_list_unlink(&q->pipe_link);
    unlink_answerable(q);
    inst_pending_dec(r, q->pipe->inst);
    q->pipe = NULL;
}

static void req_release(struct emx_router *r, struct emx_req *q)
{
    emx_free(q->names);
    q->names = NULL;
    if (r->req_pooled >= REQ_POOL_MAX) {
        emx_free(q);
        return;
    }
    q->pool_next = r->req_pool;
    r->req_pool = q;
    r->req_pooled++;
}

/* A BIND leaves flight: its new names stop counting against max_things
 * (once answered SUCCESS they are in the edge's Things instead). */
static void release_things(struct emx_req *q)
{
    if (q->edge && q->things_fresh) {
        q->edge->things_inflight -=
            q->things_fresh < q->edge->things_inflight ? q->things_fresh : q->edge->things_inflight;
        q->things_fresh = 0;
    }
}

static void req_free(struct emx_router *r, struct emx_req *q)
{
    release_things(q);
    detach_from_pipe(r, q);
    unblock(r, q);
    HASH_DEL(r->reqs, q);
    emx_list_unlink(&q->edge_link);
    emx_list_unlink(&q->timer_link);
    if (q->edge && q->state == REQ_TOMBSTONE) {
        if (q->edge->ntombs > 0)
            q->edge->ntombs--;
    } else if (q->edge && q->edge->npending > 0) {
        q->edge->npending--;
        check_drained(r, q->edge);
    }
    req_release(r, q);
}

static void arm_request_timer(struct emx_router *r, struct emx_req *q, uint64_t now)
{
    emx_list_unlink(&q->timer_link);
    q->deadline = now + r->cfg.request_timeout;
    emx_list_push_back(&r->t_requests, &q->timer_link);
}

/* Edgemux answered a multipart message itself: remember its requestId so
 * later chunks are discarded, until its last chunk or request_timeout after
 * the latest one (each discarded chunk re-arms it), so a slow device never
 * gets a second answer for the same request. */
static void tombstone(struct emx_router *r, struct emx_req *q, uint64_t now)
{
    detach_from_pipe(r, q);
    if (q->edge && q->state != REQ_TOMBSTONE) {
        if (q->edge->npending > 0)
            q->edge->npending--;
        q->edge->ntombs++;
        check_drained(r, q->edge);
    }
    q->state = REQ_TOMBSTONE;
    release_things(q);
    emx_free_ptr(&q->names);
    arm_request_timer(r, q, now);
}

static void abandon_answer(struct emx_router *r, struct emx_req *q, uint64_t now);

static struct emx_req *req_new(struct emx_router *r, struct emx_edge *e, uint64_t key)
{
    struct emx_req *q = r->req_pool;
    if (q) {
        r->req_pool = q->pool_next;
        r->req_pooled--;
        memset(q, 0, sizeof(*q));
    } else if (!(q = emx_calloc(1, sizeof(*q)))) {
        return NULL;
    }
    q->key = key;
    q->edge = e;
    emx_list_init(&q->edge_link);
    emx_list_init(&q->pipe_link);
    emx_list_init(&q->timer_link);
    emx_list_init(&q->block_link);
    emx_list_init(&q->wait_link);
    emx_list_init(&q->ans_link);
    q->held_tail = &q->held;
    KADD_KEYPTR(r, r->reqs, &q->key, sizeof(q->key), q);
    if (e)
        emx_list_push_back(&e->reqs, &q->edge_link);
    return q;
}

static void attach_to_pipe(struct emx_router *r, struct emx_req *q, struct emx_pipe *p,
                           uint64_t now)
{
    (void)r;
    (void)now;
    q->pipe = p;
    emx_list_push_back(&p->reqs, &q->pipe_link);
    p->inst->pending++;
}

/* The platform has all of the request now and could answer it: the stall
 * clock may count it (a multipart upload still arriving cannot stall a pipe). */
static void mark_answerable(struct emx_req *q, uint64_t now)
{
    if (!q->pipe || emx_list_linked(&q->ans_link))
        return;
    q->answerable_at = now;
    q->recv_mark = q->pipe->stall.received;
    emx_list_push_back(&q->pipe->answerable, &q->ans_link);
    if (!q->pipe->silent_head)
        q->pipe->silent_head = q;
}

static uint64_t hash_bytes(const uint8_t *p, size_t n)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a: only compares chunks of one message */
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

/* Validate a request body (single message or first chunk). */
static int check_body(const struct emx_ao_header *h, const uint8_t *body, size_t len,
                      struct emx_ao_bind *bind, uint8_t *entity_type, uint64_t *entity_hash)
{
    if (h->multipart) {
        struct emx_ao_str name;
        size_t off;
        int rc = emx_ao_multipart_prefix_parse(body, len, entity_type, &name, &off);
        if (rc == 0)
            *entity_hash = hash_bytes(name.ptr, name.len);
        return rc;
    }
    switch (h->code) {
    case EMX_AO_AUTH: {
        uint8_t claims;
        return emx_ao_auth_parse(body, len, &claims);
    }
    case EMX_AO_BIND:
    case EMX_AO_UNBIND:
        return emx_ao_bind_parse(body, len, bind);
    default: {
        struct emx_ao_request req;
        return emx_ao_request_parse(body, len, &req);
    }
    }
}

/* Answer a request edgemux will not forward. A refused first chunk of a
 * multipart message leaves a tombstone (at most max_pending per edge), so
 * its later chunks are discarded rather than answered a second time. */
static void refuse(struct emx_router *r, struct emx_edge *e, const struct emx_ao_header *h,
                   uint8_t code, const char *reason, enum emx_answer_reason why, uint64_t now)
{
    answer_edge(r, e, code, h->request_id, h->endpoint_id, h->session_id, reason, why);
    if (!h->multipart || h->chunk_count <= 1 || e->ntombs >= r->cfg.max_pending)
        return;
    struct emx_req *q = req_new(r, e, req_key(e->id, h->request_id));
    if (!q)
        return;
    q->state = REQ_TOMBSTONE;
    q->orig_endpoint_id = h->endpoint_id;
    q->session_id = h->session_id;
    e->ntombs++;
    arm_request_timer(r, q, now);
}

/* A device's TunnelCommandFromEdge names the tid it saw: the platform
 * gets its own back, the token removed (§9.3). `tm` was parsed from
 * `data`'s body; its tid is made the platform's. Returns the rewritten
 * message, or NULL to route `data` unchanged (no token, no memory). */
static uint8_t *tunnel_untoken(const uint8_t *data, size_t len, struct emx_ao_tunnel_msg *tm,
                               size_t *out_len)
{
    const char *rest;
    size_t rest_len;
    if (tm->service != EMX_AO_TUNNEL_COMMAND_FROM || !tm->tid.ptr ||
        !emx_tunnel_token_split((const char *)tm->tid.ptr, tm->tid.len, &rest, &rest_len))
        return NULL;
    uint8_t *out = tunnel_retid(data, len, tm, "", 0, rest, rest_len, out_len);
    tm->tid.ptr = (const uint8_t *)rest; /* a view into `data`, which outlives the call */
    tm->tid.len = (uint32_t)rest_len;
    return out;
}

/* tm: the tunnel fields of a single-part GET..DELETE (parsed once by the
 * caller, trc its result), NULL for other requests. */
static void edge_request(struct emx_router *r, struct emx_edge *e, const struct emx_ao_header *h,
                         uint8_t *data, size_t len, size_t body_off,
                         const struct emx_ao_tunnel_msg *tm, int trc, uint64_t now)
{
    uint64_t key = req_key(e->id, h->request_id);
    struct emx_req *q;
    KFIND(r, r->reqs, &key, sizeof(key), q);
    if (q) {
        if (q->state != REQ_TOMBSTONE) {
            answer_edge(r, e, EMX_AO_BAD_REQUEST, h->request_id, h->endpoint_id, h->session_id,
                        "requestId already pending", EMX_ANS_BAD_REQUEST);
            return;
        }
        req_free(r, q); /* the edge moved on: forget the old message */
    }
    if (tm && tm->service == EMX_AO_TUNNEL_COMMAND_FROM) {
        /* The device's CANCEL ends its tunnel whatever becomes of the request. */
        if (trc == EMX_AO_OK)
            tunnel_control(r, tm);
        else
            r->stats.tunnels_untracked++;
    }
    if (e->draining) {
        /* due to close in a drain: finish what is in flight, take nothing new */
        refuse(r, e, h, EMX_AO_INTERNAL_ERROR, "server shutting down", EMX_ANS_DRAINING, now);
        return;
    }
    if (e->npending >= r->cfg.max_pending) {
        refuse(r, e, h, EMX_AO_SERVICE_UNAVAILABLE, "too many pending", EMX_ANS_TOO_MANY_PENDING,
               now);
        return;
    }
    /* Shares: one edge cannot take more of the pipes, or of what edgemux
     * holds, than its cap while others wait; over the whole budget the
     * newest work is shed. */
    if (over_bytes_in_flight(r, e)) {
        refuse(r, e, h, EMX_AO_SERVICE_UNAVAILABLE, "too many bytes in flight",
               EMX_ANS_BYTES_IN_FLIGHT, now);
        return;
    }
    if (over_answer_backlog(r, e)) {
        refuse(r, e, h, EMX_AO_SERVICE_UNAVAILABLE, "too many answer bytes unread",
               EMX_ANS_ANSWER_BACKLOG, now);
        return;
    }
    if (over_memory(r, now)) {
        refuse(r, e, h, EMX_AO_INTERNAL_ERROR, "server busy", EMX_ANS_MEMORY_BUDGET, now);
        return;
    }
    if (!rate_take(r, e, now)) {
        refuse(r, e, h, EMX_AO_SERVICE_UNAVAILABLE, "rate limited", EMX_ANS_RATE_LIMITED, now);
        return;
    }
    struct emx_ao_bind bind = {0};
    uint8_t entity_type = 0;
    uint64_t entity_hash = 0;
    if (check_body(h, data + body_off, len - body_off, &bind, &entity_type, &entity_hash) != 0) {
        refuse(r, e, h, EMX_AO_BAD_REQUEST, "Message Type not supported", EMX_ANS_BAD_REQUEST, now);
        return;
    }
    uint32_t fresh = 0;
    if (!h->multipart && h->code == EMX_AO_BIND && bind_over_limit(r, e, &bind, &fresh)) {
        refuse(r, e, h, EMX_AO_FORBIDDEN, "too many bound Things", EMX_ANS_TOO_MANY_THINGS, now);
        return;
    }
    struct emx_pipe *p = route(r, now);
    if (!p && requeue(r, now))
        p = route(r, now);
    if (!p) {
        refuse(r, e, h, EMX_AO_INTERNAL_ERROR, "no platform instance available",
               EMX_ANS_NO_INSTANCE, now);
        return;
    }
    uint8_t *names = NULL;
    if (!h->multipart && (h->code == EMX_AO_BIND || h->code == EMX_AO_UNBIND) && bind.count) {
        names = emx_malloc(bind.names_len);
        if (!names)
            goto no_memory;
        memcpy(names, bind.names, bind.names_len);
    }
    q = req_new(r, e, key);
    if (!q) {
        emx_free(names);
        goto no_memory;
    }
    q->orig_endpoint_id = h->endpoint_id;
    q->session_id = h->session_id;
    q->code = h->code;
    q->names = names;
    q->names_len = bind.names_len;
    q->nnames = names ? bind.count : 0;
    if (h->code == EMX_AO_BIND && names) {
        q->things_fresh = fresh;
        e->things_inflight += fresh;
    }
    if (h->code == EMX_AO_AUTH)
        q->flags |= REQ_F_AUTH;
    else if (h->code == EMX_AO_BIND)
        q->flags |= REQ_F_BIND;
    else if (h->code == EMX_AO_UNBIND)
        q->flags |= REQ_F_UNBIND;

    emx_ao_put_u32(data + EMX_AO_OFF_ENDPOINT_ID, e->id);
    if (send_pipe(r, p, data, len) != 0) {
        release_things(q);
        HASH_DEL(r->reqs, q);
        emx_list_unlink(&q->edge_link);
        req_release(r, q);
        refuse(r, e, h, EMX_AO_INTERNAL_ERROR, "no platform instance available",
               EMX_ANS_NO_INSTANCE, now);
        return;
    }
    e->npending++;
    attach_to_pipe(r, q, p, now);
    req_add_bytes(r, q, len);
    q->sent_at = now;
    if (h->multipart && h->chunk_count > 1) {
        q->state = REQ_SENDING;
        q->chunk_count = h->chunk_count;
        q->next_chunk = 2;
        q->total = len;
        q->entity_type = entity_type;
        q->entity_hash = entity_hash;
    } else {
        q->state = REQ_WAITING;
        mark_answerable(q, now);
    }
    arm_request_timer(r, q, now);
    /* A first AUTH gates the edge; a later one (re-AUTH) leaves an
     * authenticated edge working while it is answered. */
    if ((q->flags & REQ_F_AUTH) && e->state == EMX_EDGE_NEW)
        e->state = EMX_EDGE_AUTHING;
    return;

no_memory:
    rlog(r, EMX_LOG_WARN, "edge %08" PRIx32 ": out of memory routing a request", e->id);
    refuse(r, e, h, EMX_AO_INTERNAL_ERROR, "out of memory", EMX_ANS_NO_INSTANCE, now);
}

/* Forward one chunk on the request's pinned pipe, or hold it. */
static void flush_blocked(struct emx_router *r, struct emx_pipe *p, uint64_t now);

static void forward_chunk(struct emx_router *r, struct emx_req *q, const uint8_t *data, size_t len,
                          bool last, uint64_t now)
{
    struct emx_pipe *p = q->pipe;
    /* The pipe may have become writable without an event that flushed
     * (a stall cleared by answers or timeouts): send what was held first. */
    if (q->held && pipe_ok(r, p, now))
        flush_blocked(r, p, now);
    if (!q->held && pipe_ok(r, p, now)) {
        if (send_pipe(r, p, data, len) != 0) {
            answer_edge(r, q->edge, EMX_AO_INTERNAL_ERROR, (uint32_t)q->key, q->orig_endpoint_id,
                        q->session_id, "platform connection lost", EMX_ANS_PIN_LOST);
            tombstone(r, q, now);
            return;
        }
        if (last) {
            q->state = REQ_WAITING;
            mark_answerable(q, now);
        }
        arm_request_timer(r, q, now); /* the timeout starts at the last chunk */
        return;
    }
    if (r->cfg.multipart_pin_wait == 0) {
        /* The CX server's behaviour: no waiting for a busy pinned pipe. */
        answer_edge(r, q->edge, EMX_AO_INTERNAL_ERROR, (uint32_t)q->key, q->orig_endpoint_id,
                    q->session_id, "platform connection busy", EMX_ANS_PIN_LOST);
        tombstone(r, q, now);
        return;
    }
    struct held *hd = emx_malloc(sizeof(*hd) + len);
    if (!hd) {
        answer_edge(r, q->edge, EMX_AO_INTERNAL_ERROR, (uint32_t)q->key, q->orig_endpoint_id,
                    q->session_id, "out of memory", EMX_ANS_PIN_LOST);
        tombstone(r, q, now);
        return;
    }
    hd->next = NULL;
    hd->len = len;
    memcpy(hd->data, data, len);
    *q->held_tail = hd;
    q->held_tail = &hd->next;
    if (!emx_list_linked(&q->block_link)) {
        emx_list_push_back(&p->blocked, &q->block_link);
        q->wait_deadline = now + r->cfg.multipart_pin_wait;
        emx_list_push_back(&r->t_pin, &q->wait_link);
        edge_pause(r, q->edge);
    }
    if (last)
        q->state = REQ_WAITING; /* nothing more to come; the held chunks finish it */
}

/* The pinned pipe is writable again: send what was held. */
static void flush_blocked(struct emx_router *r, struct emx_pipe *p, uint64_t now)
{
    struct emx_list *it, *tmp;
    emx_list_for_each_safe(it, tmp, &p->blocked)
    {
        struct emx_req *q = emx_container_of(it, struct emx_req, block_link);
        while (q->held && pipe_ok(r, p, now)) {
            struct held *hd = q->held;
            if (send_pipe(r, p, hd->data, hd->len) != 0)
                break;
            q->held = hd->next;
            if (!q->held)
                q->held_tail = &q->held;
            emx_free(hd);
            arm_request_timer(r, q, now);
        }
        if (!q->held) {
            if (q->state == REQ_WAITING)
                mark_answerable(q, now); /* its last chunk just went out */
            unblock(r, q);
        }
        if (!pipe_ok(r, p, now))
            break;
    }
}

static void edge_chunk(struct emx_router *r, struct emx_edge *e, const struct emx_ao_header *h,
                       uint8_t *data, size_t len, size_t body_off, uint64_t now)
{
    uint64_t key = req_key(e->id, h->request_id);
    bool last = h->chunk_id == h->chunk_count;
    struct emx_req *q;
    KFIND(r, r->reqs, &key, sizeof(key), q);
    if (!q) {
        /* A continuation without its first chunk: one 0x80, then silence.
         * It costs what a request costs (a token, a pending slot for its
         * tombstone), so orphans cannot grow tombstones without bound. */
        r->stats.chunks_discarded++;
        if (!rate_take(r, e, now)) {
            answer_edge(r, e, EMX_AO_SERVICE_UNAVAILABLE, h->request_id, h->endpoint_id,
                        h->session_id, "rate limited", EMX_ANS_RATE_LIMITED);
            return;
        }
        if (!last && e->ntombs >= r->cfg.max_pending) {
            answer_edge(r, e, EMX_AO_SERVICE_UNAVAILABLE, h->request_id, h->endpoint_id,
                        h->session_id, "too many pending", EMX_ANS_TOO_MANY_PENDING);
            return;
        }
        answer_edge(r, e, EMX_AO_BAD_REQUEST, h->request_id, h->endpoint_id, h->session_id,
                    "Message Type not supported", EMX_ANS_BAD_REQUEST);
        if (!last && (q = req_new(r, e, key)) != NULL) {
            q->state = REQ_TOMBSTONE;
            q->orig_endpoint_id = h->endpoint_id;
            q->session_id = h->session_id;
            e->ntombs++;
            arm_request_timer(r, q, now);
        }
        return;
    }
    if (q->state == REQ_TOMBSTONE) {
        r->stats.chunks_discarded++;
        if (last)
            req_free(r, q);
        else
            arm_request_timer(r, q, now); /* lives request_timeout past the latest chunk */
        return;
    }
    if (q->state != REQ_SENDING) {
        /* The message it belongs to was complete: this chunk is stray. */
        r->stats.chunks_discarded++;
        return;
    }
    uint8_t et;
    struct emx_ao_str name;
    size_t off;
    if (h->chunk_id != q->next_chunk || h->chunk_count != q->chunk_count ||
        emx_ao_multipart_prefix_parse(data + body_off, len - body_off, &et, &name, &off) != 0 ||
        et != q->entity_type || hash_bytes(name.ptr, name.len) != q->entity_hash) {
        r->stats.chunks_discarded++;
        answer_edge(r, e, EMX_AO_BAD_REQUEST, h->request_id, q->orig_endpoint_id, h->session_id,
                    "bad multipart sequence", EMX_ANS_BAD_REQUEST);
        if (last)
            req_free(r, q);
        else
            tombstone(r, q, now);
        return;
    }
    if (q->total + len > r->cfg.max_message_size) {
        r->stats.chunks_discarded++;
        answer_edge(r, e, EMX_AO_ENTITY_TOO_LARGE, h->request_id, q->orig_endpoint_id,
                    h->session_id, "message too large", EMX_ANS_TOO_LARGE);
        if (last)
            req_free(r, q);
        else
            tombstone(r, q, now);
        return;
    }
    q->total += len;
    q->next_chunk++;
    req_add_bytes(r, q, len); /* sent or held, it is this edge's until answered */
    emx_ao_put_u32(data + EMX_AO_OFF_ENDPOINT_ID, e->id);
    forward_chunk(r, q, data, len, last, now);
}

/* A platform request to an edge is done (answered either way). */
static void inbound_finish(struct emx_router *r, struct emx_edge *e, struct emx_inbound *in)
{
    inbound_drop_tunnel(r, in);
    if (in->pipe) {
        emx_list_unlink(&in->pipe_link);
        inst_pending_dec(r, in->pipe->inst);
    }
    emx_list_unlink(&in->timer_link);
    HASH_DEL(e->inbound, in);
    e->ninbound--;
    emx_free(in);
    check_drained(r, e);
}

/* An edge answers a platform request (rule 5). What one edge pushes into a
 * pipe is bounded: an answer starts only on a pipe that is writable and
 * within the edge's rate (else the platform gets 0xA3 in its place); once
 * started, it stops (abandoned, counted; nothing more is sent for it, so
 * the platform never sees part of one answer and then another) when it
 * grows past max_message_size or its pipe stops draining. */
static void edge_response(struct emx_router *r, struct emx_edge *e, const struct emx_ao_header *h,
                          uint8_t *data, size_t len, uint64_t now)
{
    struct emx_inbound *in;
    uint32_t id = h->request_id;
    HASH_FIND(hh, e->inbound, &id, sizeof(id), in);
    if (!in) {
        r->stats.late_edge_answers++;
        return;
    }
    bool final = !h->multipart || h->chunk_id == h->chunk_count;
    struct emx_pipe *p = in->pipe;
    if (!p || p->state != EMX_PIPE_UP) {
        r->stats.edge_answers_pipe_gone++;
        if (!in->answering)
            tunnel_answered(r, in, h->code);
    } else if (!in->answering && (!rate_take(r, e, now) || !p->wm.writable)) {
        bool busy = !p->wm.writable;
        answer_pipe(r, p, EMX_AO_SERVICE_UNAVAILABLE, in->orig_request_id, in->endpoint_id,
                    e->session_id, busy ? "platform connection busy" : "rate limited",
                    busy ? EMX_ANS_PIPE_BUSY : EMX_ANS_RATE_LIMITED);
        inbound_finish(r, e, in);
        return;
    } else if (in->answering &&
               (in->answer_bytes + len > r->cfg.max_message_size || !p->wm.writable)) {
        r->stats.edge_answers_abandoned++;
        rlog(r, EMX_LOG_INFO,
             "edge %08" PRIx32 ": answer to platform request %" PRIu32
             " cut off (%s); nothing more sent",
             e->id, in->orig_request_id,
             p->wm.writable ? "over max_message_size" : "pipe not draining");
        inbound_finish(r, e, in);
        return;
    } else {
        if (!in->answering)
            tunnel_answered(r, in, h->code);
        in->answering = true;
        in->answer_bytes += len;
        emx_ao_put_u32(data + EMX_AO_OFF_REQUEST_ID, in->orig_request_id);
        emx_ao_put_u32(data + EMX_AO_OFF_ENDPOINT_ID, in->endpoint_id);
        send_pipe(r, p, data, len);
    }
    if (final)
        inbound_finish(r, e, in);
}

void emx_router_edge_message(struct emx_router *r, struct emx_edge *e, uint8_t *data, size_t len,
                             uint64_t now)
{
    if (e->state == EMX_EDGE_CLOSING)
        return;
    r->stats.edge_msgs_in++;
    r->stats.edge_bytes_in += len;
    e->msgs_in++;
    if (len > r->cfg.max_message_size) {
        close_edge(r, e, 1009, "message too big");
        goto out;
    }
    struct emx_ao_header h;
    size_t body_off;
    if (emx_ao_header_parse(data, len, &h, &body_off) != 0) {
        close_edge(r, e, 1007, "invalid AlwaysOn header");
        goto out;
    }
    if (e->state != EMX_EDGE_AUTHED) {
        if (h.code != EMX_AO_AUTH || e->state == EMX_EDGE_AUTHING || h.multipart) {
            close_edge(r, e, 1008, "AUTH must come first");
            goto out;
        }
    } else if (h.code != EMX_AO_AUTH) {
        e->session_id = h.session_id;
    }

    if (emx_ao_is_response(h.code)) {
        edge_response(r, e, &h, data, len, now);
    } else if (h.code == EMX_AO_KEEP_ALIVE) {
        answer_edge(r, e, EMX_AO_SUCCESS, h.request_id, h.endpoint_id, h.session_id, NULL,
                    EMX_ANS_KEEP_ALIVE);
    } else if (!emx_ao_is_known_request(h.code)) {
        answer_edge(r, e, EMX_AO_BAD_REQUEST, h.request_id, h.endpoint_id, h.session_id,
                    "Message Type not supported", EMX_ANS_BAD_REQUEST);
    } else if (h.multipart && h.chunk_id > 1) {
        edge_chunk(r, e, &h, data, len, body_off, now);
    } else {
        /* tunnel services are read once here (a CANCEL's tid loses its token) */
        struct emx_ao_tunnel_msg tm;
        bool svc = !h.multipart && h.code >= EMX_AO_GET && h.code <= EMX_AO_DELETE;
        int trc = svc ? emx_ao_tunnel_parse(data + body_off, len - body_off, &tm) : 0;
        uint8_t *plain = NULL;
        size_t plain_len = 0;
        if (svc && trc == EMX_AO_OK)
            plain = tunnel_untoken(data, len, &tm, &plain_len);
        if (plain)
            edge_request(r, e, &h, plain, plain_len, body_off, &tm, trc, now);
        else
            edge_request(r, e, &h, data, len, body_off, svc ? &tm : NULL, trc, now);
        emx_free(plain);
    }
out:
    close_drained(r);
    if (r->reap_needed)
        emx_router_tick(r, now);
}

/* ------------------------------------------------------------------ */
/* binds */

static void things_apply(struct emx_router *r, struct emx_edge *e, const struct emx_req *q,
                         uint64_t serial)
{
    struct emx_ao_bind b = {.count = q->nnames, .names = q->names, .names_len = q->names_len};
    size_t cursor = 0;
    struct emx_ao_str s;
    while (emx_ao_bind_next_name(&b, &cursor, &s) == EMX_AO_OK) {
        struct emx_thing *t;
        KFIND(r, e->things, s.ptr, s.len, t);
        if (q->flags & REQ_F_UNBIND) {
            if (t) {
                HASH_DEL(e->things, t);
                e->nthings--;
                emx_free(t);
            }
            continue;
        }
        if (t) {
            t->inst_serial = serial;
            continue;
        }
        t = emx_malloc(sizeof(*t) + s.len + 1);
        if (!t) {
            rlog(r, EMX_LOG_WARN, "edge %08" PRIx32 ": out of memory recording a bind", e->id);
            return;
        }
        t->inst_serial = serial;
        t->name = (char *)(t + 1);
        memcpy(t->name, s.ptr, s.len);
        t->name[s.len] = '\0';
        KADD_KEYPTR(r, e->things, t->name, s.len, t);
        e->nthings++;
    }
}

bool emx_edge_has_thing(const struct emx_edge *e, const char *name)
{
    struct emx_thing *t;
    KFIND(e->router, e->things, name, strlen(name), t);
    return t != NULL;
}

const char *emx_edge_thing_next(const struct emx_edge *e, const void **cursor)
{
    const struct emx_thing *t = *cursor ? ((const struct emx_thing *)*cursor)->hh.next : e->things;
    *cursor = t;
    return t ? t->name : NULL;
}

static struct emx_instance *instance_by_serial(struct emx_router *r, uint64_t serial)
{
    struct emx_list *it, *tmp;
    emx_list_for_each_safe(it, tmp, &r->instances)
    {
        struct emx_instance *inst = emx_container_of(it, struct emx_instance, link);
        if (inst->serial == serial)
            return inst;
    }
    return NULL;
}

static struct emx_pipe *any_up_pipe(const struct emx_router *r, struct emx_instance *inst,
                                    uint64_t now)
{
    struct emx_pipe *p = pick_pipe(r, inst, now);
    for (unsigned i = 0; !p && i < inst->npipes; i++)
        if (inst->pipes[i].state == EMX_PIPE_UP)
            p = &inst->pipes[i];
    return p;
}

/* Send one UNBIND of `count` names for an edge that left, to `p`. */
static void send_leave_unbind(struct emx_router *r, struct emx_edge *e, struct emx_pipe *p,
                              const struct emx_ao_str *names, size_t count, size_t bytes,
                              uint64_t now)
{
    uint32_t rid = next_own_request_id(r);
    size_t cap = EMX_AO_HEADER_SIZE + 3 + bytes;
    uint8_t *buf = emx_malloc(cap);
    size_t len =
        buf ? emx_ao_build_bind(buf, cap, EMX_AO_UNBIND, rid, e->id, e->session_id, names, count)
            : 0;
    if (len && send_pipe(r, p, buf, len) == 0) {
        struct emx_req *q = req_new(r, NULL, req_key(e->id, rid));
        if (q) {
            q->flags = REQ_F_LEAVE;
            q->state = REQ_WAITING;
            q->code = EMX_AO_UNBIND;
            attach_to_pipe(r, q, p, now);
            mark_answerable(q, now);
            arm_request_timer(r, q, now);
        }
        r->stats.unbinds_sent++;
    } else {
        rlog(r, EMX_LOG_WARN, "edge %08" PRIx32 ": could not send an UNBIND of %zu Thing(s)", e->id,
             count);
    }
    emx_free(buf);
}

/* The edge left: UNBIND its Things on the instance that took their BINDs,
 * if still connected, else on the next connected one. The count field is
 * 16 bits and one message must stay within max_message_size, so a large set
 * goes out as several UNBINDs. */
static void unbind_on_leave(struct emx_router *r, struct emx_edge *e, uint64_t now)
{
    size_t max_bytes = r->cfg.max_message_size > 1024 ? r->cfg.max_message_size - 64 : 1024;
    while (e->things) {
        uint64_t serial = e->things->inst_serial;
        size_t total = 0;
        struct emx_thing *t, *tmp;
        HASH_ITER(hh, e->things, t, tmp)
        total += t->inst_serial == serial;
        struct emx_instance *inst = instance_by_serial(r, serial);
        struct emx_pipe *p = NULL;
        if (inst && inst->state == EMX_INSTANCE_ACTIVE && inst->up_pipes > 0)
            p = any_up_pipe(r, inst, now);
        if (!p)
            p = route(r, now);
        size_t batch_cap = total < UINT16_MAX ? total : UINT16_MAX;
        struct emx_ao_str *names = p ? emx_calloc(batch_cap, sizeof(*names)) : NULL;
        if (!p)
            rlog(r, EMX_LOG_INFO,
                 "edge %08" PRIx32 ": no connected instance to UNBIND %zu Thing(s) on leave", e->id,
                 total);
        else if (!names)
            rlog(r, EMX_LOG_WARN, "edge %08" PRIx32 ": out of memory UNBINDing %zu Thing(s)", e->id,
                 total);
        size_t n = 0, bytes = 0;
        HASH_ITER(hh, e->things, t, tmp)
        {
            if (t->inst_serial != serial || !names)
                continue;
            size_t len = strlen(t->name);
            size_t sz = emx_ao_str_size(len);
            if (n > 0 && (n == batch_cap || bytes + sz > max_bytes)) {
                send_leave_unbind(r, e, p, names, n, bytes, now);
                n = bytes = 0;
            }
            names[n].ptr = (const uint8_t *)t->name;
            names[n].len = (uint32_t)len;
            n++;
            bytes += sz;
        }
        if (n > 0)
            send_leave_unbind(r, e, p, names, n, bytes, now);
        emx_free(names);
        /* Forget this group whatever happened: the platform cleans up the
         * rest with the (server, boot, endpointId) it keyed them on. */
        HASH_ITER(hh, e->things, t, tmp)
        {
            if (t->inst_serial == serial) {
                HASH_DEL(e->things, t);
                e->nthings--;
                emx_free(t);
            }
        }
    }
}

/* ------------------------------------------------------------------ */
/* platform side */

static void pipe_auth_answer(struct emx_router *r, struct emx_pipe *p,
                             const struct emx_ao_header *h)
{
    uint64_t key = req_key(h->endpoint_id, h->request_id);
    struct emx_req *q;
    KFIND(r, r->reqs, &key, sizeof(key), q);
    if (!q || !(q->flags & REQ_F_PIPE_AUTH) || q->pipe != p || !emx_ao_is_response(h->code)) {
        r->stats.pipe_garbage++;
        return;
    }
    req_free(r, q);
    if (h->code != EMX_AO_SUCCESS) {
        r->stats.pipe_auth_failures++;
        rlog(r, EMX_LOG_WARN, "instance %s pipe %u: AUTH refused (%s 0x%02x)", p->inst->id,
             p->index, emx_ao_code_name(h->code), h->code);
        r->io.pipe_close(r->io.ctx, p, "AUTH refused");
        return;
    }
    p->state = EMX_PIPE_UP;
    p->inst->up_pipes++;
    if (r->pipes_up++ == 0) {
        rlog(r, EMX_LOG_INFO, "a platform pipe is connected (instance %s)", p->inst->id);
        r->down = false;
        r->down_handled = false;
        emx_free_ptr(&r->closing);
        r->nclosing = r->closing_idx = 0;
    }
    emx_stall_init(&p->stall);
    rlog(r, EMX_LOG_DEBUG, "instance %s pipe %u connected", p->inst->id, p->index);
}

static void platform_response(struct emx_router *r, struct emx_pipe *p,
                              const struct emx_ao_header *h, uint8_t *data, size_t len,
                              uint64_t now)
{
    uint64_t key = req_key(h->endpoint_id, h->request_id);
    struct emx_req *q;
    KFIND(r, r->reqs, &key, sizeof(key), q);
    if (!q || q->state == REQ_TOMBSTONE) {
        r->stats.late_platform_answers++;
        return;
    }
    /* An answer counts only on the pipe its request went out on: another
     * instance (or pipe) must not answer for it, by guess or by probing. */
    if (q->pipe != p) {
        r->stats.platform_answers_wrong_pipe++;
        return;
    }
    bool final = !h->multipart || h->chunk_id == h->chunk_count;
    if (q->flags & REQ_F_SYSTEM) {
        if (final) {
            if (q->flags & REQ_F_LEAVE)
                r->stats.unbind_answers++;
            req_free(r, q);
        }
        return;
    }
    struct emx_edge *e = q->edge;
    emx_ao_put_u32(data + EMX_AO_OFF_ENDPOINT_ID, q->orig_endpoint_id);
    send_edge(r, e, data, len);
    if (!final) {
        /* The answer is alive while its chunks keep coming, and from now on
         * edgemux never answers this request itself (see abandon_answer). */
        q->flags |= REQ_F_ANSWERING;
        arm_request_timer(r, q, now);
        return;
    }
    observe_latency(r, now >= q->sent_at ? now - q->sent_at : 0);
    if (q->flags & REQ_F_AUTH) {
        if (h->code == EMX_AO_SUCCESS) {
            r->stats.auth_ok++;
            if (e->state == EMX_EDGE_AUTHING || e->state == EMX_EDGE_NEW) {
                e->state = EMX_EDGE_AUTHED;
                emx_list_unlink(&e->auth_link);
                /* the transport held it to the pre-AUTH message size */
                if (r->io.edge_authenticated)
                    r->io.edge_authenticated(r->io.ctx, e);
            }
        } else {
            r->stats.auth_failed++;
            rlog(r, EMX_LOG_INFO, "edge %08" PRIx32 ": AUTH refused by platform (0x%02x)", e->id,
                 h->code);
            close_edge(r, e, 1008, "authentication failed");
        }
    } else if ((q->flags & (REQ_F_BIND | REQ_F_UNBIND)) && h->code == EMX_AO_SUCCESS) {
        things_apply(r, e, q, p->inst->serial);
    }
    if (q->state == REQ_SENDING)
        tombstone(r, q, now); /* answered early: discard the chunks still coming */
    else
        req_free(r, q);
}

static void platform_request(struct emx_router *r, struct emx_pipe *p,
                             const struct emx_ao_header *h, uint8_t *data, size_t len, uint64_t now)
{
    struct emx_edge *e = emx_router_edge_find(r, h->endpoint_id);
    bool first = !h->multipart || h->chunk_id == 1;
    bool last = !h->multipart || h->chunk_id == h->chunk_count;
    if (!first) {
        struct emx_inbound *in, *tmp;
        if (e) {
            HASH_ITER(hh, e->inbound, in, tmp)
            {
                if (in->pipe == p && in->orig_request_id == h->request_id && in->receiving) {
                    emx_ao_put_u32(data + EMX_AO_OFF_REQUEST_ID, in->local_id);
                    if (last)
                        in->receiving = false;
                    send_edge(r, e, data, len);
                    return;
                }
            }
        }
        r->stats.pipe_garbage++; /* a continuation of nothing we delivered */
        return;
    }
    if (!e || e->state != EMX_EDGE_AUTHED || e->draining) {
        answer_pipe(r, p, EMX_AO_SERVICE_UNAVAILABLE, h->request_id, h->endpoint_id, h->session_id,
                    "endpoint not connected", EMX_ANS_ENDPOINT_GONE);
        return;
    }
    if (h->code == EMX_AO_KEEP_ALIVE) {
        answer_pipe(r, p, EMX_AO_SUCCESS, h->request_id, h->endpoint_id, h->session_id, NULL,
                    EMX_ANS_KEEP_ALIVE);
        return;
    }
    if (!emx_ao_is_known_request(h->code)) {
        answer_pipe(r, p, EMX_AO_BAD_REQUEST, h->request_id, h->endpoint_id, h->session_id,
                    "Message Type not supported", EMX_ANS_BAD_REQUEST);
        return;
    }
    if (e->ninbound >= r->cfg.max_pending) {
        answer_pipe(r, p, EMX_AO_SERVICE_UNAVAILABLE, h->request_id, h->endpoint_id, h->session_id,
                    "too many pending", EMX_ANS_TOO_MANY_PENDING);
        return;
    }
    if (over_memory(r, now)) {
        answer_pipe(r, p, EMX_AO_INTERNAL_ERROR, h->request_id, h->endpoint_id, h->session_id,
                    "server busy", EMX_ANS_MEMORY_BUDGET);
        return;
    }
    /* Tunnel control services: a StartTunnel is recorded (or refused over a
     * limit) before it goes, as the device may dial before it answers. */
    struct emx_ao_tunnel_msg tm = {0};
    struct emx_tunnel *tun = NULL;
    bool tunnel_ctl = false;
    if (h->code >= EMX_AO_GET && h->code <= EMX_AO_DELETE) {
        size_t off = EMX_AO_HEADER_SIZE + (h->multipart ? EMX_AO_MULTIPART_SIZE : 0);
        int trc = emx_ao_tunnel_parse(data + off, len - off, &tm);
        if (tm.service != EMX_AO_TUNNEL_NONE) {
            if (trc != EMX_AO_OK || (h->multipart && h->chunk_count > 1))
                r->stats.tunnels_untracked++;
            else if (tm.service == EMX_AO_TUNNEL_START) {
                if (tunnel_start(r, p, e, h, &tm, now, &tun))
                    return;
            } else
                tunnel_ctl = true;
        }
    }
    struct emx_inbound *in = emx_calloc(1, sizeof(*in));
    if (!in) {
        if (tun)
            tunnel_end(r, tun, EMX_TUN_END_NO_ANSWER);
        answer_pipe(r, p, EMX_AO_INTERNAL_ERROR, h->request_id, h->endpoint_id, h->session_id,
                    "out of memory", EMX_ANS_NO_INSTANCE);
        return;
    }
    /* A requestId unique among this edge's pending inbound requests. */
    struct emx_inbound *clash;
    do {
        in->local_id = ++e->next_inbound_id;
        if (in->local_id == 0 || in->local_id >= EMX_OWN_REQUEST_ID_BASE)
            in->local_id = e->next_inbound_id = 1;
        HASH_FIND(hh, e->inbound, &in->local_id, sizeof(in->local_id), clash);
    } while (clash);
    in->edge = e;
    in->pipe = p;
    in->orig_request_id = h->request_id;
    in->endpoint_id = h->endpoint_id;
    in->receiving = !last;
    in->deadline = now + r->cfg.edge_request_timeout;
    emx_list_init(&in->pipe_link);
    emx_list_push_back(&p->inbound, &in->pipe_link);
    emx_list_push_back(&r->t_inbound, &in->timer_link);
    HASH_ADD(hh, e->inbound, local_id, sizeof(in->local_id), in);
    e->ninbound++;
    p->inst->pending++;
    if (tun) {
        in->tunnel = tun;
        tun->start_in = in;
    }
    emx_ao_put_u32(data + EMX_AO_OFF_REQUEST_ID, in->local_id);
    /* The device sees the tid with its owner's token in front (§9.3): a
     * StartTunnel's owner is this pipe's instance; for the other services
     * it is the record's owner, else the sender. */
    uint8_t *retid = NULL;
    size_t retid_len = 0;
    if ((tun || tunnel_ctl) && tm.tid.ptr && tm.tid.len) {
        const struct emx_tunnel *rec = tun ? tun : tunnel_lookup(r, tm.tid.ptr, tm.tid.len);
        char tok[EMX_TUNNEL_TOKEN_LEN + 1];
        emx_tunnel_token(rec ? rec->instance_id : p->inst->id, tok);
        retid = tunnel_retid(data, len, &tm, tok, EMX_TUNNEL_TOKEN_LEN, tm.tid.ptr, tm.tid.len,
                             &retid_len);
        if (!retid)
            r->stats.tunnels_untracked++;
    }
    if (retid)
        send_edge(r, e, retid, retid_len);
    else
        send_edge(r, e, data, len);
    emx_free(retid);
    if (tunnel_ctl)
        tunnel_control(r, &tm);
}

void emx_router_pipe_message(struct emx_router *r, struct emx_pipe *p, uint8_t *data, size_t len,
                             uint64_t now)
{
    p->msgs_in++;
    p->bytes_in += len;
    bool was_ok = pipe_ok(r, p, now);
    pipe_received(p);
    struct emx_ao_header h;
    size_t body_off;
    if (emx_ao_header_parse(data, len, &h, &body_off) != 0) {
        r->stats.pipe_garbage++;
        rlog(r, EMX_LOG_DEBUG, "instance %s pipe %u: unparseable message (%zu bytes) dropped",
             p->inst->id, p->index, len);
        goto out;
    }
    if (p->state == EMX_PIPE_AUTHING) {
        pipe_auth_answer(r, p, &h);
        goto out;
    }
    if (p->state != EMX_PIPE_UP) {
        r->stats.pipe_garbage++;
        goto out;
    }
    if (emx_ao_is_response(h.code))
        platform_response(r, p, &h, data, len, now);
    else
        platform_request(r, p, &h, data, len, now);
    if (!was_ok && pipe_ok(r, p, now))
        flush_blocked(r, p, now); /* a stalled pipe came back */
out:
    close_drained(r);
    if (r->reap_needed)
        emx_router_tick(r, now);
}

void emx_router_pipe_opened(struct emx_router *r, struct emx_pipe *p, uint64_t now)
{
    if (p->state != EMX_PIPE_DOWN)
        return;
    uint32_t rid = next_own_request_id(r);
    size_t cap = EMX_AO_HEADER_SIZE + 16 + r->app_key_len;
    uint8_t *buf = emx_malloc(cap);
    size_t len = buf ? emx_ao_build_auth(buf, cap, rid, 0, r->app_key, r->app_key_len) : 0;
    struct emx_req *q = len ? req_new(r, NULL, req_key(0, rid)) : NULL;
    if (!q) {
        emx_free(buf);
        r->io.pipe_close(r->io.ctx, p, "cannot build AUTH");
        return;
    }
    p->state = EMX_PIPE_AUTHING;
    p->auth_request_id = rid;
    emx_wm_init(&p->wm, r->cfg.low_watermark, r->cfg.high_watermark);
    q->flags = REQ_F_PIPE_AUTH;
    q->state = REQ_WAITING;
    q->code = EMX_AO_AUTH;
    attach_to_pipe(r, q, p, now);
    arm_request_timer(r, q, now);
    int rc = send_pipe(r, p, buf, len);
    emx_free(buf);
    if (rc != 0) {
        req_free(r, q);
        r->io.pipe_close(r->io.ctx, p, "cannot send AUTH");
    }
}

void emx_router_pipe_queued(struct emx_router *r, struct emx_pipe *p, uint64_t queued, uint64_t now)
{
    if (emx_wm_set_queued(&p->wm, queued) && p->wm.writable && pipe_ok(r, p, now))
        flush_blocked(r, p, now);
}

/* Everything that was riding on a pipe learns it is gone. */
static void pipe_down(struct emx_router *r, struct emx_pipe *p, uint64_t now)
{
    if (p->state == EMX_PIPE_UP) {
        p->inst->up_pipes--;
        if (--r->pipes_up == 0) {
            r->down = true;
            r->down_handled = false;
            r->down_since = now;
            rlog(r, EMX_LOG_WARN, "no platform pipe connected");
        }
    }
    p->state = EMX_PIPE_DOWN;
    struct emx_list *it, *tmp;
    emx_list_for_each_safe(it, tmp, &p->reqs)
    {
        struct emx_req *q = emx_container_of(it, struct emx_req, pipe_link);
        if (q->flags & REQ_F_SYSTEM) {
            req_free(r, q);
        } else if (q->flags & REQ_F_ANSWERING) {
            abandon_answer(r, q, now);
        } else if (q->state == REQ_SENDING || (q->state == REQ_WAITING && q->held)) {
            /* The pin is lost midway: one 0xA0, the rest discarded. */
            answer_edge(r, q->edge, EMX_AO_INTERNAL_ERROR, (uint32_t)q->key, q->orig_endpoint_id,
                        q->session_id, "platform connection lost", EMX_ANS_PIN_LOST);
            if (q->state == REQ_SENDING)
                tombstone(r, q, now);
            else
                req_free(r, q);
        } else {
            struct emx_edge *e = q->edge;
            answer_edge(r, e, EMX_AO_SERVICE_UNAVAILABLE, (uint32_t)q->key, q->orig_endpoint_id,
                        q->session_id, "platform connection lost", EMX_ANS_PIPE_LOST);
            if ((q->flags & REQ_F_AUTH) && e->state == EMX_EDGE_AUTHING)
                e->state = EMX_EDGE_NEW;
            req_free(r, q);
        }
    }
    emx_list_for_each_safe(it, tmp, &p->inbound)
    {
        struct emx_inbound *in = emx_container_of(it, struct emx_inbound, pipe_link);
        emx_list_unlink(&in->pipe_link);
        in->pipe = NULL;
        inst_pending_dec(r, p->inst);
    }
    emx_wm_init(&p->wm, r->cfg.low_watermark, r->cfg.high_watermark);
    emx_stall_init(&p->stall);
    p->silent_head = NULL;
}

void emx_router_pipe_closed(struct emx_router *r, struct emx_pipe *p, uint64_t now)
{
    pipe_down(r, p, now);
    emx_router_tick(r, now); /* all_down_grace 0 acts at once; drained instances go */
}

unsigned emx_router_pipes_up(const struct emx_router *r)
{
    return r->pipes_up;
}

/* ------------------------------------------------------------------ */
/* edges */

static bool id_in_use(struct emx_router *r, uint32_t id)
{
    struct emx_edge *e;
    struct quarantined *qq;
    HASH_FIND(hh, r->edges, &id, sizeof(id), e);
    if (e)
        return true;
    HASH_FIND(hh, r->quarantine, &id, sizeof(id), qq);
    return qq != NULL;
}

static uint32_t alloc_endpoint_id(struct emx_router *r)
{
    for (uint32_t tries = 0; tries <= EMX_ENDPOINT_SEQ_MASK; tries++) {
        uint32_t seq = r->next_seq++ & EMX_ENDPOINT_SEQ_MASK;
        if (seq == 0)
            continue;
        uint32_t id = ((uint32_t)r->cfg.worker << EMX_WORKER_SHIFT) | seq;
        if (!id_in_use(r, id))
            return id;
    }
    return 0;
}

struct emx_edge *emx_router_edge_open(struct emx_router *r, void *conn, uint64_t now)
{
    uint32_t id = alloc_endpoint_id(r);
    if (id == 0)
        return NULL;
    struct emx_edge *e = emx_calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    e->id = id;
    e->router = r;
    e->conn = conn;
    e->state = EMX_EDGE_NEW;
    e->opened_at = now;
    e->rate_tokens = (uint64_t)r->cfg.max_msgs_per_sec * 1000; /* starts full */
    e->rate_at = now;
    emx_list_init(&e->reqs);
    emx_list_init(&e->auth_link);
    emx_list_init(&e->drain_link);
    emx_list_push_back(&r->t_auth, &e->auth_link);
    HASH_ADD(hh, r->edges, id, sizeof(e->id), e);
    r->nedges++;
    r->stats.edges_opened++;
    return e;
}

void emx_router_edge_closed(struct emx_router *r, struct emx_edge *e, uint64_t now)
{
    emx_list_unlink(&e->auth_link);
    emx_list_unlink(&e->drain_link);
    HASH_DEL(r->edges, e);
    r->nedges--;
    r->stats.edges_closed++;
    r->stats.mem_answers -=
        e->answer_backlog < r->stats.mem_answers ? e->answer_backlog : r->stats.mem_answers;
    e->answer_backlog = 0;

    struct emx_list *it, *tmp;
    emx_list_for_each_safe(it, tmp, &e->reqs)
    {
        struct emx_req *q = emx_container_of(it, struct emx_req, edge_link);
        q->edge = NULL; /* nothing left to answer; late answers are counted */
        if (q->state != REQ_TOMBSTONE && e->npending > 0)
            e->npending--;
        q->state = REQ_TOMBSTONE; /* keeps req_free from touching the edge */
        req_free(r, q);
    }
    struct emx_inbound *in, *itmp;
    HASH_ITER(hh, e->inbound, in, itmp)
    {
        if (in->pipe) {
            answer_pipe(r, in->pipe, EMX_AO_SERVICE_UNAVAILABLE, in->orig_request_id,
                        in->endpoint_id, e->session_id, "endpoint disconnected", EMX_ANS_EDGE_LEFT);
            emx_list_unlink(&in->pipe_link);
            inst_pending_dec(r, in->pipe->inst);
        }
        emx_list_unlink(&in->timer_link);
        HASH_DEL(e->inbound, in);
        inbound_drop_tunnel(r, in);
        emx_free(in);
    }
    if (e->ntunnels) {
        /* Unclaimed records go with the edge; a relay socket's tunnel runs
         * on its own connection and outlives it (TUNNELS.md §8.4). */
        struct emx_tunnel *t, *ttmp;
        HASH_ITER(hh, r->tunnels, t, ttmp)
        {
            if (t->edge_gone || t->edge_id != e->id)
                continue;
            if (t->attached) {
                t->edge_gone = true;
                tunnel_log(r, t, "edge left; the tunnel socket keeps it");
            } else {
                tunnel_end(r, t, EMX_TUN_END_EDGE_LEFT);
            }
        }
        e->ntunnels = 0;
    }
    if (e->things)
        unbind_on_leave(r, e, now);

    /* Keep the id out of use while anything for it can still arrive. */
    uint64_t hold = r->cfg.request_timeout > r->cfg.edge_request_timeout
                        ? r->cfg.request_timeout
                        : r->cfg.edge_request_timeout;
    struct quarantined *qq = hold ? emx_malloc(sizeof(*qq)) : NULL;
    if (qq) {
        qq->id = e->id;
        qq->until = now + 2 * hold;
        HASH_ADD(hh, r->quarantine, id, sizeof(qq->id), qq);
        emx_list_push_back(&r->t_quarantine, &qq->link);
    }
    emx_free(e);
    if (r->reap_needed)
        emx_router_tick(r, now);
}

struct emx_edge *emx_router_edge_find(struct emx_router *r, uint32_t endpoint_id)
{
    struct emx_edge *e;
    HASH_FIND(hh, r->edges, &endpoint_id, sizeof(endpoint_id), e);
    return e;
}

void emx_router_edge_close(struct emx_router *r, struct emx_edge *e, uint16_t code,
                           const char *reason)
{
    close_edge(r, e, code, reason);
}

void emx_router_edge_drain(struct emx_router *r, struct emx_edge *e, uint64_t now)
{
    (void)now;
    if (e->state == EMX_EDGE_CLOSING)
        return;
    e->draining = true;
    check_drained(r, e);
    close_drained(r);
}

size_t emx_router_edge_count(const struct emx_router *r)
{
    return r->nedges;
}

struct emx_edge *emx_router_edge_next(struct emx_router *r, struct emx_edge *prev)
{
    return prev ? (struct emx_edge *)prev->hh.next : r->edges;
}

/* ------------------------------------------------------------------ */
/* instances and discovery (rule 9) */

static void instance_free(struct emx_instance *inst)
{
    emx_free(inst->pipes);
    emx_free(inst->id);
    emx_free(inst->host);
    emx_free(inst->metadata);
    emx_free(inst);
}

static void instance_remove(struct emx_router *r, struct emx_instance *inst, uint64_t now)
{
    for (unsigned i = 0; i < inst->npipes; i++)
        pipe_down(r, &inst->pipes[i], now);
    rlog(r, EMX_LOG_INFO, "instance %s (%s:%u) drained and removed", inst->id, inst->host,
         inst->port);
    r->io.instance_removed(r->io.ctx, inst);
    if (r->rr_last == inst)
        r->rr_last = NULL;
    emx_list_unlink(&inst->link);
    instance_free(inst);
}

static void instance_drain(struct emx_router *r, struct emx_instance *inst)
{
    if (inst->state == EMX_INSTANCE_DRAINING)
        return;
    inst->state = EMX_INSTANCE_DRAINING;
    r->reap_needed = true;
    rlog(r, EMX_LOG_INFO, "instance %s (%s:%u) left discovery: draining %" PRIu32 " request(s)",
         inst->id, inst->host, inst->port, inst->pending);
}

static struct emx_instance *instance_new(struct emx_router *r, const char *id,
                                         const struct emx_instance_info *info)
{
    struct emx_instance *inst = emx_calloc(1, sizeof(*inst));
    if (!inst)
        return NULL;
    inst->id = emx_strdup(id);
    inst->host = emx_strdup(info->host);
    inst->metadata = info->metadata ? emx_strdup(info->metadata) : NULL;
    inst->npipes = r->cfg.pipes_per_instance ? r->cfg.pipes_per_instance : 1;
    inst->pipes = emx_calloc(inst->npipes, sizeof(*inst->pipes));
    if (!inst->id || !inst->host || !inst->pipes || (info->metadata && !inst->metadata)) {
        instance_free(inst);
        return NULL;
    }
    inst->port = info->port;
    inst->tls = info->tls;
    inst->weight = info->weight;
    inst->priority = info->priority;
    inst->serial = ++r->next_serial;
    for (unsigned i = 0; i < inst->npipes; i++) {
        struct emx_pipe *p = &inst->pipes[i];
        p->inst = inst;
        p->index = i;
        emx_wm_init(&p->wm, r->cfg.low_watermark, r->cfg.high_watermark);
        emx_stall_init(&p->stall);
        emx_list_init(&p->reqs);
        emx_list_init(&p->inbound);
        emx_list_init(&p->blocked);
        emx_list_init(&p->answerable);
    }
    emx_list_push_back(&r->instances, &inst->link);
    return inst;
}

static struct emx_instance *find_instance(struct emx_router *r, const char *id, bool draining)
{
    struct emx_list *it, *tmp;
    emx_list_for_each_safe(it, tmp, &r->instances)
    {
        struct emx_instance *inst = emx_container_of(it, struct emx_instance, link);
        if ((inst->state == EMX_INSTANCE_DRAINING) == draining && strcmp(inst->id, id) == 0)
            return inst;
    }
    return NULL;
}

static bool same_address(const struct emx_instance *inst, const struct emx_instance_info *info)
{
    return inst->port == info->port && inst->tls == info->tls &&
           strcmp(inst->host, info->host) == 0;
}

static void apply_set(struct emx_router *r, const struct emx_instance_info *set, size_t count)
{
    struct emx_list *it, *tmp;
    emx_list_for_each_safe(it, tmp, &r->instances) emx_container_of(it, struct emx_instance, link)
        ->seen = false;

    for (size_t i = 0; i < count; i++) {
        const struct emx_instance_info *info = &set[i];
        if (!info->host || !info->host[0] || info->port == 0) {
            rlog(r, EMX_LOG_WARN, "discovery: entry %zu ignored: no host or port", i);
            continue;
        }
        char idbuf[300];
        const char *id = info->id;
        if (!id || !id[0]) {
            snprintf(idbuf, sizeof(idbuf), "%s:%u", info->host, info->port);
            id = idbuf;
        }
        struct emx_instance *inst = find_instance(r, id, false);
        if (inst && inst->seen) {
            rlog(r, EMX_LOG_WARN, "discovery: duplicate instance %s ignored", id);
            continue;
        }
        if (inst && !same_address(inst, info)) {
            instance_drain(r, inst); /* same name, new place: a new instance */
            inst = NULL;
        }
        if (!inst) {
            inst = find_instance(r, id, true);
            if (inst && same_address(inst, info)) {
                inst->state = EMX_INSTANCE_ACTIVE;
                rlog(r, EMX_LOG_INFO, "instance %s is back in discovery", id);
            } else {
                inst = NULL;
            }
        }
        if (inst) {
            if (inst->weight != info->weight || inst->priority != info->priority)
                rlog(r, EMX_LOG_INFO, "instance %s: weight %u→%u, priority %u→%u", id, inst->weight,
                     info->weight, inst->priority, info->priority);
            inst->weight = info->weight;
            inst->priority = info->priority;
            if (info->metadata && (!inst->metadata || strcmp(inst->metadata, info->metadata))) {
                char *m = emx_strdup(info->metadata);
                if (m) {
                    emx_free(inst->metadata);
                    inst->metadata = m;
                }
            }
            inst->seen = true;
            continue;
        }
        inst = instance_new(r, id, info);
        if (!inst) {
            rlog(r, EMX_LOG_ERROR, "discovery: out of memory adding instance %s", id);
            continue;
        }
        inst->seen = true;
        rlog(r, EMX_LOG_INFO, "instance %s added (%s:%u%s, weight %u, priority %u)", id, info->host,
             info->port, info->tls ? " tls" : "", info->weight, info->priority);
        r->io.instance_added(r->io.ctx, inst);
    }
    emx_list_for_each_safe(it, tmp, &r->instances)
    {
        struct emx_instance *inst = emx_container_of(it, struct emx_instance, link);
        if (inst->state == EMX_INSTANCE_ACTIVE && !inst->seen)
            instance_drain(r, inst);
    }
}

static size_t active_instances(const struct emx_router *r)
{
    size_t n = 0;
    const struct emx_list *it;
    for (it = r->instances.next; it != &r->instances; it = it->next)
        n += emx_container_of(it, struct emx_instance, link)->state == EMX_INSTANCE_ACTIVE;
    return n;
}

void emx_router_discovery_update(struct emx_router *r, const struct emx_instance_info *set,
                                 size_t count, uint64_t now)
{
    r->stats.discovery_updates++;
    r->stats.discovery_last_good_ms = now;
    if (count == 0) {
        if (active_instances(r) == 0) {
            r->empty_pending = false;
        } else if (!r->empty_pending) {
            r->empty_pending = true;
            r->empty_since = now;
            rlog(r, EMX_LOG_WARN,
                 "discovery reports no instances; applied only if that holds for %" PRIu64 " ms",
                 r->cfg.empty_confirm);
        }
    } else {
        if (r->empty_pending)
            rlog(r, EMX_LOG_INFO, "discovery reports instances again; empty answer dropped");
        r->empty_pending = false;
        apply_set(r, set, count);
    }
    emx_router_tick(r, now);
}

void emx_router_discovery_failed(struct emx_router *r, const char *reason, uint64_t now)
{
    (void)now;
    r->stats.discovery_failures++;
    rlog(r, EMX_LOG_WARN, "discovery source failed (%s); keeping the last good set",
         reason ? reason : "unknown");
}

struct emx_instance *emx_router_instance_find(struct emx_router *r, const char *id)
{
    struct emx_instance *inst = find_instance(r, id, false);
    return inst ? inst : find_instance(r, id, true);
}

struct emx_instance *emx_router_instance_next(struct emx_router *r, struct emx_instance *prev)
{
    struct emx_list *next = prev ? prev->link.next : r->instances.next;
    return next == &r->instances ? NULL : emx_container_of(next, struct emx_instance, link);
}

int emx_router_instance_maintenance(struct emx_router *r, const char *id, bool on, uint64_t now)
{
    (void)now;
    struct emx_instance *inst = emx_router_instance_find(r, id);
    if (!inst)
        return -ENOENT;
    if (inst->maintenance != on)
        rlog(r, EMX_LOG_INFO, "instance %s: maintenance %s", id, on ? "on" : "off");
    inst->maintenance = on;
    return 0;
}

/* ------------------------------------------------------------------ */
/* timers */

/* Part of the platform's answer reached the edge and the rest will not
 * come (timeout, pipe lost): another answer after part of one would be two
 * answers, so the edge gets nothing more; its SDK times the request out
 * and drops the partial answer. Counted. */
static void abandon_answer(struct emx_router *r, struct emx_req *q, uint64_t now)
{
    r->stats.answers_abandoned++;
    if (q->edge)
        rlog(r, EMX_LOG_INFO,
             "edge %08" PRIx32 ": platform answer to request %" PRIu32
             " stopped after part of it was delivered; nothing more sent",
             q->edge->id, (uint32_t)q->key);
    if (q->state == REQ_SENDING)
        tombstone(r, q, now);
    else
        req_free(r, q);
}

static void expire_request(struct emx_router *r, struct emx_req *q, uint64_t now)
{
    if (q->flags & REQ_F_PIPE_AUTH) {
        struct emx_pipe *p = q->pipe;
        req_free(r, q);
        if (p) {
            rlog(r, EMX_LOG_WARN, "instance %s pipe %u: AUTH not answered", p->inst->id, p->index);
            r->io.pipe_close(r->io.ctx, p, "AUTH timeout");
        }
        return;
    }
    if ((q->flags & REQ_F_LEAVE) || q->state == REQ_TOMBSTONE || !q->edge) {
        req_free(r, q);
        return;
    }
    if (q->flags & REQ_F_ANSWERING) {
        abandon_answer(r, q, now);
        return;
    }
    struct emx_edge *e = q->edge;
    answer_edge(r, e, EMX_AO_GATEWAY_TIMEOUT, (uint32_t)q->key, q->orig_endpoint_id, q->session_id,
                "request timed out", EMX_ANS_TIMEOUT);
    if ((q->flags & REQ_F_AUTH) && e->state == EMX_EDGE_AUTHING)
        e->state = EMX_EDGE_NEW;
    if (q->state == REQ_SENDING && q->next_chunk <= q->chunk_count)
        tombstone(r, q, now);
    else
        req_free(r, q);
}

static uint64_t min_u64(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

static void run_all_down(struct emx_router *r, uint64_t now)
{
    if (!r->down || r->pipes_up > 0)
        return;
    if (!r->down_handled && !r->closing && now - r->down_since >= r->cfg.all_down_grace) {
        r->down_handled = true;
        size_t n = 0;
        for (struct emx_edge *e = r->edges; e; e = e->hh.next)
            n += e->state != EMX_EDGE_CLOSING;
        rlog(r, EMX_LOG_WARN,
             "no platform pipe for %" PRIu64 " ms: closing %zu edge(s) over %" PRIu64 " ms",
             now - r->down_since, n, r->cfg.close_spread);
        if (n == 0)
            return;
        r->closing = emx_calloc(n, sizeof(*r->closing));
        if (!r->closing)
            return;
        n = 0;
        for (struct emx_edge *e = r->edges; e; e = e->hh.next)
            if (e->state != EMX_EDGE_CLOSING)
                r->closing[n++] = e->id;
        r->nclosing = n;
        r->closing_idx = 0;
        r->closing_start = now;
    }
    if (!r->closing)
        return;
    size_t due = r->nclosing;
    if (r->cfg.close_spread > 0 && now - r->closing_start < r->cfg.close_spread)
        due = (size_t)((double)r->nclosing * (double)(now - r->closing_start) /
                       (double)r->cfg.close_spread);
    while (r->closing_idx < due) {
        struct emx_edge *e = emx_router_edge_find(r, r->closing[r->closing_idx++]);
        if (e && e->state != EMX_EDGE_CLOSING) {
            r->stats.all_down_closes++;
            close_edge(r, e, 1013, "no platform instance");
        }
    }
    if (r->closing_idx >= r->nclosing) {
        emx_free_ptr(&r->closing);
        r->nclosing = r->closing_idx = 0;
    }
}

uint64_t emx_router_tick(struct emx_router *r, uint64_t now)
{
    struct emx_list *it;
    while ((it = r->t_requests.next) != &r->t_requests) {
        struct emx_req *q = emx_container_of(it, struct emx_req, timer_link);
        if (q->deadline > now)
            break;
        expire_request(r, q, now);
    }
    while ((it = r->t_pin.next) != &r->t_pin) {
        struct emx_req *q = emx_container_of(it, struct emx_req, wait_link);
        if (q->wait_deadline > now)
            break;
        /* The pinned pipe stayed busy past multipart_pin_wait: one 0xA0. */
        answer_edge(r, q->edge, EMX_AO_INTERNAL_ERROR, (uint32_t)q->key, q->orig_endpoint_id,
                    q->session_id, "platform connection busy", EMX_ANS_PIN_LOST);
        if (q->state == REQ_SENDING)
            tombstone(r, q, now);
        else
            req_free(r, q);
    }
    while ((it = r->t_inbound.next) != &r->t_inbound) {
        struct emx_inbound *in = emx_container_of(it, struct emx_inbound, timer_link);
        if (in->deadline > now)
            break;
        struct emx_edge *e = in->edge;
        if (in->answering) /* part of an answer went out: never a 0xA4 after it */
            r->stats.edge_answers_abandoned++;
        else if (in->pipe)
            answer_pipe(r, in->pipe, EMX_AO_GATEWAY_TIMEOUT, in->orig_request_id, in->endpoint_id,
                        e->session_id, "endpoint did not answer", EMX_ANS_EDGE_TIMEOUT);
        inbound_finish(r, e, in);
    }
    while ((it = r->t_tunnels.next) != &r->t_tunnels) {
        struct emx_tunnel *t = emx_container_of(it, struct emx_tunnel, timer_link);
        if (t->deadline > now)
            break;
        tunnel_end(r, t, EMX_TUN_END_NO_SOCKET);
    }
    while ((it = r->t_auth.next) != &r->t_auth) {
        struct emx_edge *e = emx_container_of(it, struct emx_edge, auth_link);
        if (e->opened_at + r->cfg.auth_timeout > now)
            break;
        r->stats.auth_timeouts++;
        close_edge(r, e, 1008, "no AUTH in time"); /* unlinks it */
    }
    while ((it = r->t_quarantine.next) != &r->t_quarantine) {
        struct quarantined *qq = emx_container_of(it, struct quarantined, link);
        if (qq->until > now)
            break;
        emx_list_unlink(&qq->link);
        HASH_DEL(r->quarantine, qq);
        emx_free(qq);
    }
    /* Held multipart chunks whose pipe became writable without a watermark
     * or receive event (its stall ended as requests finished). */
    if (!emx_list_empty(&r->t_pin)) {
        struct emx_list *pit, *ptmp;
        emx_list_for_each_safe(pit, ptmp, &r->instances)
        {
            struct emx_instance *inst = emx_container_of(pit, struct emx_instance, link);
            for (unsigned i = 0; i < inst->npipes; i++)
                if (!emx_list_empty(&inst->pipes[i].blocked) && pipe_ok(r, &inst->pipes[i], now))
                    flush_blocked(r, &inst->pipes[i], now);
        }
    }
    run_all_down(r, now);
    if (r->empty_pending && now - r->empty_since >= r->cfg.empty_confirm) {
        r->empty_pending = false;
        rlog(r, EMX_LOG_WARN,
             "discovery has reported no instances for %" PRIu64 " ms: draining all",
             now - r->empty_since);
        apply_set(r, NULL, 0);
    }
    if (r->reap_needed) {
        r->reap_needed = false;
        struct emx_list *tmp;
        emx_list_for_each_safe(it, tmp, &r->instances)
        {
            struct emx_instance *inst = emx_container_of(it, struct emx_instance, link);
            if (inst->state == EMX_INSTANCE_DRAINING && inst->pending == 0)
                instance_remove(r, inst, now);
        }
    }

    close_drained(r);

    /* The next deadline. */
    uint64_t next = UINT64_MAX;
    if (!emx_list_empty(&r->t_requests))
        next = min_u64(next, emx_list_first(&r->t_requests, struct emx_req, timer_link)->deadline);
    if (!emx_list_empty(&r->t_pin))
        next = min_u64(next, emx_list_first(&r->t_pin, struct emx_req, wait_link)->wait_deadline);
    if (!emx_list_empty(&r->t_inbound))
        next =
            min_u64(next, emx_list_first(&r->t_inbound, struct emx_inbound, timer_link)->deadline);
    if (!emx_list_empty(&r->t_auth))
        next = min_u64(next, emx_list_first(&r->t_auth, struct emx_edge, auth_link)->opened_at +
                                 r->cfg.auth_timeout);
    if (!emx_list_empty(&r->t_quarantine))
        next = min_u64(next, emx_list_first(&r->t_quarantine, struct quarantined, link)->until);
    if (!emx_list_empty(&r->t_tunnels))
        next =
            min_u64(next, emx_list_first(&r->t_tunnels, struct emx_tunnel, timer_link)->deadline);
    if (r->down && !r->down_handled)
        next = min_u64(next, r->down_since + r->cfg.all_down_grace);
    if (r->closing && r->nclosing) {
        uint64_t step = r->cfg.close_spread / r->nclosing;
        next = min_u64(next, now + (step ? step : 1));
    }
    if (r->empty_pending)
        next = min_u64(next, r->empty_since + r->cfg.empty_confirm);
    return next;
}

/* ------------------------------------------------------------------ */
/* life */

static int copy_config(struct emx_router *r, const struct emx_router_config *cfg)
{
    char *key = NULL;
    size_t key_len = 0;
    if (cfg->app_key) {
        key_len = strlen(cfg->app_key);
        key = emx_strdup(cfg->app_key);
        if (!key)
            return -ENOMEM;
    }
    if (r->app_key) {
        explicit_bzero(r->app_key, r->app_key_len);
        emx_free(r->app_key);
    }
    r->cfg = *cfg;
    r->cfg.app_key = NULL; /* only r->app_key holds it */
    r->app_key = key;
    r->app_key_len = key_len;
    if (r->cfg.worker >= (1u << EMX_WORKER_BITS))
        r->cfg.worker = 0;
    if (r->cfg.max_pending == 0)
        r->cfg.max_pending = 1;
    if (r->cfg.tunnel_connect_timeout == 0)
        r->cfg.tunnel_connect_timeout = TUNNEL_CONNECT_TIMEOUT_DEFAULT;
    return 0;
}

struct emx_router *emx_router_new(const struct emx_router_config *cfg,
                                  const struct emx_router_io *io, uint64_t now)
{
    struct emx_router *r = emx_calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    if (emx_siphash_random_key(r->hash_key) != 0) {
        emx_logf(io->log, EMX_LOG_ERROR, TAG, "no random key for the router's hash tables");
        emx_free(r);
        return NULL;
    }
    if (copy_config(r, cfg) != 0) {
        emx_free(r);
        return NULL;
    }
    r->io = *io;
    emx_list_init(&r->instances);
    emx_list_init(&r->t_requests);
    emx_list_init(&r->t_pin);
    emx_list_init(&r->t_inbound);
    emx_list_init(&r->t_auth);
    emx_list_init(&r->t_quarantine);
    emx_list_init(&r->drained);
    emx_list_init(&r->t_tunnels);
    r->next_seq = 1;
    /* Until a pipe connects, edgemux is "down" (rule 8 applies from start). */
    r->down = true;
    r->down_since = now;
    return r;
}

/* Every entry of a timer FIFO was armed with the list's duration; when the
 * duration changes, move every deadline by the difference. The order stays,
 * new entries go behind, and the new timeout applies at once. */
static uint64_t shift_deadline(uint64_t d, uint64_t old_ms, uint64_t new_ms)
{
    if (new_ms >= old_ms)
        return d + (new_ms - old_ms);
    return d > old_ms - new_ms ? d - (old_ms - new_ms) : 0;
}

static void shift_timers(struct emx_router *r, const struct emx_router_config *old)
{
    struct emx_list *it;
    if (old->request_timeout != r->cfg.request_timeout)
        for (it = r->t_requests.next; it != &r->t_requests; it = it->next) {
            struct emx_req *q = emx_container_of(it, struct emx_req, timer_link);
            q->deadline = shift_deadline(q->deadline, old->request_timeout, r->cfg.request_timeout);
        }
    if (old->multipart_pin_wait != r->cfg.multipart_pin_wait)
        for (it = r->t_pin.next; it != &r->t_pin; it = it->next) {
            struct emx_req *q = emx_container_of(it, struct emx_req, wait_link);
            q->wait_deadline = shift_deadline(q->wait_deadline, old->multipart_pin_wait,
                                              r->cfg.multipart_pin_wait);
        }
    if (old->edge_request_timeout != r->cfg.edge_request_timeout)
        for (it = r->t_inbound.next; it != &r->t_inbound; it = it->next) {
            struct emx_inbound *in = emx_container_of(it, struct emx_inbound, timer_link);
            in->deadline = shift_deadline(in->deadline, old->edge_request_timeout,
                                          r->cfg.edge_request_timeout);
        }
    if (old->tunnel_connect_timeout != r->cfg.tunnel_connect_timeout)
        for (it = r->t_tunnels.next; it != &r->t_tunnels; it = it->next) {
            struct emx_tunnel *t = emx_container_of(it, struct emx_tunnel, timer_link);
            t->deadline = shift_deadline(t->deadline, old->tunnel_connect_timeout,
                                         r->cfg.tunnel_connect_timeout);
        }
}

int emx_router_set_config(struct emx_router *r, const struct emx_router_config *cfg, uint64_t now)
{
    unsigned worker = r->cfg.worker;
    uint32_t old_rate = r->cfg.max_msgs_per_sec;
    struct emx_router_config old = r->cfg;
    int rc = copy_config(r, cfg);
    if (rc)
        return rc;
    shift_timers(r, &old);
    r->cfg.worker = worker;                  /* endpointIds already handed out keep their bits */
    if (r->cfg.max_msgs_per_sec != old_rate) /* a new limit starts with full buckets */
        for (struct emx_edge *e = r->edges; e; e = e->hh.next) {
            e->rate_tokens = (uint64_t)r->cfg.max_msgs_per_sec * 1000;
            e->rate_at = now;
        }
    struct emx_list *it, *tmp;
    emx_list_for_each_safe(it, tmp, &r->instances)
    {
        struct emx_instance *inst = emx_container_of(it, struct emx_instance, link);
        for (unsigned i = 0; i < inst->npipes; i++) {
            struct emx_pipe *p = &inst->pipes[i];
            if (emx_wm_set_marks(&p->wm, cfg->low_watermark, cfg->high_watermark) &&
                pipe_ok(r, p, now))
                flush_blocked(r, p, now);
        }
    }
    return 0;
}

const struct emx_router_config *emx_router_config(const struct emx_router *r)
{
    return &r->cfg;
}

const struct emx_router_stats *emx_router_stats(const struct emx_router *r)
{
    return &r->stats;
}

void *emx_router_io_ctx(const struct emx_router *r)
{
    return r->io.ctx;
}

void emx_router_free(struct emx_router *r)
{
    if (!r)
        return;
    struct emx_edge *e, *etmp;
    HASH_ITER(hh, r->edges, e, etmp)
    {
        struct emx_inbound *in, *itmp;
        HASH_ITER(hh, e->inbound, in, itmp)
        {
            HASH_DEL(e->inbound, in);
            emx_free(in);
        }
        struct emx_thing *t, *ttmp;
        HASH_ITER(hh, e->things, t, ttmp)
        {
            HASH_DEL(e->things, t);
            emx_free(t);
        }
        HASH_DEL(r->edges, e);
        emx_free(e);
    }
    struct emx_req *q, *qtmp;
    HASH_ITER(hh, r->reqs, q, qtmp)
    {
        HASH_DEL(r->reqs, q);
        free_held(q);
        emx_free(q->names);
        emx_free(q);
    }
    while (r->req_pool) {
        q = r->req_pool;
        r->req_pool = q->pool_next;
        emx_free(q);
    }
    struct emx_tunnel *t, *ttmp;
    HASH_ITER(hh, r->tunnels, t, ttmp)
    {
        HASH_DELETE(hh, r->tunnels, t);
        emx_free(t);
    }
    struct quarantined *qq, *qqtmp;
    HASH_ITER(hh, r->quarantine, qq, qqtmp)
    {
        HASH_DEL(r->quarantine, qq);
        emx_free(qq);
    }
    struct emx_list *it, *tmp;
    emx_list_for_each_safe(it, tmp, &r->instances)
        instance_free(emx_container_of(it, struct emx_instance, link));
    emx_free(r->closing);
    if (r->app_key) {
        explicit_bzero(r->app_key, r->app_key_len);
        emx_free(r->app_key);
    }
    emx_free(r);
}
