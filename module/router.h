/* The router: every rule of DESIGN §4 and every row of the outcomes table of
 * §3 that needs no socket, as plain code over in-memory edges, instances and
 * pipes. It never touches a socket or a clock: the server feeds it events
 * with the loop's monotonic time in milliseconds, calls emx_router_tick()
 * from a timer, and carries out what the router asks through emx_router_io.
 *
 * One router per worker loop; nothing here is thread-safe.
 *
 * Lifetimes: edges are created by emx_router_edge_open() and freed by
 * emx_router_edge_closed() (after the transport reports the close, whoever
 * started it). Instances and their pipes are created from discovery sets and
 * freed after io->instance_removed() returns; the server must not use them
 * afterwards.
 */
#ifndef EMX_ROUTER_H
#define EMX_ROUTER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uthash.h>

#include "edgemux/host.h"
#include "list.h"
#include "log.h"
#include "watermark.h"

#define EMX_WORKER_BITS 4
#define EMX_WORKER_SHIFT (32 - EMX_WORKER_BITS)
#define EMX_ENDPOINT_SEQ_MASK ((1u << EMX_WORKER_SHIFT) - 1)
#define EMX_OWN_REQUEST_ID_BASE 0x80000000u /* edgemux's own requests on pipes */

struct emx_router;
struct emx_req;

enum emx_pipe_state {
    EMX_PIPE_DOWN = 0, /* no connection (connecting or waiting to retry) */
    EMX_PIPE_AUTHING,  /* WebSocket open, pipe AUTH sent */
    EMX_PIPE_UP,       /* AUTH succeeded: counts for routing, readiness, rule 8 */
};

enum emx_instance_state {
    EMX_INSTANCE_ACTIVE = 0,
    EMX_INSTANCE_DRAINING, /* gone from discovery: no new requests; freed when idle */
};

struct emx_pipe {
    struct emx_instance *inst;
    unsigned index;
    enum emx_pipe_state state;
    void *conn;                 /* the server's handle; the router never reads it */
    struct emx_watermark wm;
    struct emx_stall stall;
    uint32_t auth_request_id;
    struct emx_list reqs;       /* outbound requests sent on this pipe (emx_req.pipe_link) */
    struct emx_list inbound;    /* platform requests taken from this pipe (emx_inbound.pipe_link) */
    struct emx_list blocked;    /* multipart pins waiting for this pipe (emx_req.block_link) */
    struct emx_list answerable; /* requests sent whole, oldest first (emx_req.ans_link) */
    struct emx_req *silent_head; /* oldest of them sent since the last receive (stall clock) */
    uint64_t msgs_out, msgs_in, bytes_out, bytes_in;
};

struct emx_instance {
    char *id;
    char *host;
    uint16_t port;
    bool tls;
    uint32_t weight;
    uint32_t priority;
    char *metadata;
    uint64_t serial; /* unique for the router's life; binds refer to it */
    enum emx_instance_state state;
    bool maintenance;
    int64_t swrr_current;
    unsigned pipe_cursor;
    struct emx_pipe *pipes;
    unsigned npipes;
    unsigned up_pipes;
    uint32_t pending; /* requests in flight on its pipes, inbound included */
    void *user;       /* the server's per-instance data */
    bool seen;        /* scratch for applying a discovery set */
    bool rr_eligible; /* scratch for one routing decision */
    struct emx_list link;
    uint64_t requests; /* requests routed to it */
};

enum emx_edge_state {
    EMX_EDGE_NEW = 0,  /* must send AUTH first */
    EMX_EDGE_AUTHING,  /* AUTH forwarded, answer pending */
    EMX_EDGE_AUTHED,
    EMX_EDGE_CLOSING,  /* the router asked the transport to close it */
};

struct emx_thing;
struct emx_inbound;

struct emx_edge {
    uint32_t id;
    UT_hash_handle hh;
    struct emx_router *router; /* lets transport callbacks find their router */
    void *conn; /* the server's handle */
    enum emx_edge_state state;
    uint64_t opened_at;
    uint32_t session_id;      /* last seen from the edge */
    struct emx_list auth_link; /* in the router's auth-timeout FIFO until AUTHED */
    struct emx_list reqs;      /* its outbound requests and tombstones (emx_req.edge_link) */
    uint32_t npending;         /* outbound requests counted against max_pending */
    uint32_t ntombs;           /* tombstones (at most max_pending) */
    struct emx_inbound *inbound; /* platform requests in flight to it, by local requestId */
    uint32_t ninbound;
    uint32_t next_inbound_id;
    struct emx_thing *things; /* bound Things */
    uint32_t nthings;
    uint32_t things_inflight; /* new names of BINDs not yet answered (max_things) */
    unsigned paused;          /* multipart pins holding its reads */
    bool draining;            /* due to close: new requests refused, closed once idle */
    struct emx_list drain_link; /* in the router's list of drained edges to close */
    uint64_t msgs_in, msgs_out;
    uint64_t rate_tokens;     /* token bucket of max_msgs_per_sec, in 1/1000 messages */
    uint64_t rate_at;         /* loop time the bucket was last filled */
    uint64_t queued_bound;    /* server: ceiling of the transport's buffered() */
    uint64_t bytes_in_flight; /* of its requests forwarded and not yet answered */
    uint64_t answer_backlog;  /* ceiling of what it has not read: the transport's
                               * buffered() at the last reading + bytes sent since */
    /* Set by the server at accept, for logs, admin and per-source limits:
     * the device's address (X-Forwarded-For from a trusted proxy, else the
     * socket peer) and the socket peer itself. */
    char addr[48];
    char peer[64];
    uint32_t ntunnels; /* tunnel records started through it (max_tunnels_per_device) */
};

/* A Remote Access tunnel that a StartTunnel set up through this router
 * (TUNNELS.md §8.1): which platform instance owns it, so the device's
 * tunnel socket can be taken there. Made before the StartTunnel is
 * forwarded; ended by a non-SUCCESS answer, CompleteTunnel, the device's
 * CANCEL, its edge leaving, or tunnel_connect_timeout with no relay socket
 * (a record claimed with emx_router_tunnel_attach ends only at detach). */
enum emx_tunnel_state {
    EMX_TUNNEL_STARTING = 0, /* StartTunnel forwarded; no answer yet */
    EMX_TUNNEL_STARTED,      /* the device answered SUCCESS */
    EMX_TUNNEL_COMPLETING,   /* CompleteTunnel or CANCEL seen while attached */
};

struct emx_tunnel {
    UT_hash_handle hh;
    char *tid; /* NUL-terminated copy (the key, tid_len bytes) */
    size_t tid_len;
    char *thing;       /* the StartTunnel's entity name */
    char *instance_id; /* owner: the instance whose pipe sent the StartTunnel */
    uint64_t inst_serial;
    unsigned pipe_index;
    uint32_t edge_id; /* the edge it went to; kept after the edge left */
    bool edge_gone;
    bool attached; /* claimed by a relay socket */
    uint64_t claim_key; /* claimed from another worker: that claim's key; 0: here */
    enum emx_tunnel_state state;
    uint64_t started_at, deadline;
    char type[16];                   /* "tcp", "file", ... (truncated) */
    char target[80];                 /* host:port of the connection JSON, when found */
    int32_t chunksize, idle_timeout; /* -1 when absent */
    char last_command[16];
    struct emx_inbound *start_in; /* the StartTunnel while it is unanswered */
    struct emx_list timer_link;   /* in the router's connect-deadline FIFO until attached */
};

/* Why a StartTunnel was refused, or a record ended (metrics). */
enum emx_tunnel_refusal {
    EMX_TUN_REFUSE_PROCESS_LIMIT = 0, /* 0xA3: edge.max_tunnels */
    EMX_TUN_REFUSE_DEVICE_LIMIT,      /* 0xA3: edge.max_tunnels_per_device */
    EMX_TUN_REFUSE_DUPLICATE,         /* 0xA3: its tid is already recorded */
    EMX_TUN_REFUSE_NO_MEMORY,         /* 0xA0 */
    EMX_TUN_REFUSE__COUNT
};
const char *emx_tunnel_refusal_name(enum emx_tunnel_refusal r);

enum emx_tunnel_end {
    EMX_TUN_END_REFUSED = 0, /* the device answered other than SUCCESS */
    EMX_TUN_END_NO_ANSWER,   /* edgemux answered the platform itself (0xA3, 0xA4) */
    EMX_TUN_END_COMPLETED,   /* CompleteTunnel */
    EMX_TUN_END_CANCELLED,   /* the device's TunnelCommandFromEdge CANCEL */
    EMX_TUN_END_EDGE_LEFT,
    EMX_TUN_END_NO_SOCKET, /* tunnel_connect_timeout passed unattached */
    EMX_TUN_END_DETACHED,  /* the relay let it go */
    EMX_TUN_END__COUNT
};
const char *emx_tunnel_end_name(enum emx_tunnel_end e);
const char *emx_tunnel_state_name(enum emx_tunnel_state s);

struct emx_router_config {
    unsigned worker;             /* 0..15: the top 4 bits of every endpointId */
    unsigned pipes_per_instance;
    uint64_t high_watermark, low_watermark;
    uint64_t stall_after;        /* ms; 0: off */
    uint64_t request_timeout;    /* edge → platform, ms */
    uint64_t edge_request_timeout; /* platform → edge, ms */
    uint64_t auth_timeout;
    uint64_t multipart_pin_wait;
    uint64_t all_down_grace;
    uint64_t close_spread;
    uint64_t empty_confirm;
    uint64_t max_message_size;   /* AlwaysOn bytes of one message, all chunks */
    uint32_t max_pending;        /* requests in flight per edge, each direction */
    uint32_t max_msgs_per_sec;   /* requests per second per edge (token bucket); 0: off */
    uint32_t max_things;         /* Things bound per edge; 0: off */
    uint64_t max_bytes_in_flight; /* request bytes per edge forwarded, unanswered; 0: off */
    uint64_t max_answer_backlog;  /* bytes an edge has not read before its new requests
                                   * are refused (needs io->edge_buffered); 0: off */
    uint64_t max_memory;          /* all edges' in-flight + backlog bytes; 0: off */
    uint32_t max_tunnels;         /* tunnel records at once; 0: off */
    /* With several workers: the process's count of records, which
     * max_tunnels then bounds (every router adds its own); NULL: this
     * router's alone. */
    atomic_size_t *tunnels_shared;
    uint32_t max_tunnels_per_device; /* per edge connection; 0: off */
    uint64_t tunnel_connect_timeout; /* ms an unattached record lives */
    const char *app_key;         /* pipe AUTH; copied by the router; never logged */
};

/* What the router asks of the server. Buffers are borrowed for the call. */
struct emx_router_io {
    void *ctx;
    const struct emx_log *log;
    /* Queue one message to an edge. Return -ENOBUFS when the edge is over its
     * queue limit: the router then closes it 1008 "slow consumer". */
    int (*edge_send)(void *ctx, struct emx_edge *e, const uint8_t *buf, size_t len);
    /* Start closing an edge; emx_router_edge_closed() follows later. */
    void (*edge_close)(void *ctx, struct emx_edge *e, uint16_t code, const char *reason);
    void (*edge_pause)(void *ctx, struct emx_edge *e, bool pause);
    int (*pipe_send)(void *ctx, struct emx_pipe *p, const uint8_t *buf, size_t len);
    /* Close a pipe's connection and reconnect it later (AUTH failed or timed
     * out). emx_router_pipe_closed() follows when it is down. */
    void (*pipe_close)(void *ctx, struct emx_pipe *p, const char *reason);
    /* A new instance: open its pipes. */
    void (*instance_added)(void *ctx, struct emx_instance *inst);
    /* A drained instance is being freed: close its pipes' connections without
     * calling back into the router for them. */
    void (*instance_removed)(void *ctx, struct emx_instance *inst);
    /* An edge's AUTH succeeded: it may now send messages up to
     * max_message_size. May be NULL. */
    void (*edge_authenticated)(void *ctx, struct emx_edge *e);
    /* Bytes sent to an edge it has not read yet (the transport's queue and
     * the kernel's). Asked only when a request arrives (max_answer_backlog,
     * max_memory), never per byte. May be NULL: then what the router sent
     * counts as unread until the edge closes. */
    size_t (*edge_buffered)(void *ctx, struct emx_edge *e);
    /* What a pipe still holds, as emx_router_pipe_queued reports it. Asked
     * when a request finds no pipe writable (at most once per ms), since
     * the kernel drains without telling and the last report may be stale.
     * May be NULL. */
    size_t (*pipe_buffered)(void *ctx, struct emx_pipe *p);
};

/* Answers edgemux gave on its own, by reason (metrics). */
enum emx_answer_reason {
    EMX_ANS_NO_INSTANCE = 0,  /* 0xA0: nothing eligible */
    EMX_ANS_PIPE_LOST,        /* 0xA3: pipe closed before the answer */
    EMX_ANS_TIMEOUT,          /* 0xA4: request_timeout */
    EMX_ANS_TOO_LARGE,        /* 0x8D */
    EMX_ANS_TOO_MANY_PENDING, /* 0xA3 */
    EMX_ANS_BAD_REQUEST,      /* 0x80 */
    EMX_ANS_KEEP_ALIVE,       /* 0x40 */
    EMX_ANS_PIN_LOST,         /* 0xA0: multipart pin lost or waited too long */
    EMX_ANS_ENDPOINT_GONE,    /* 0xA3 to a platform: endpointId unknown */
    EMX_ANS_EDGE_TIMEOUT,     /* 0xA4 to a platform: edge did not answer */
    EMX_ANS_EDGE_LEFT,        /* 0xA3 to a platform: edge left with the request */
    EMX_ANS_RATE_LIMITED,     /* 0xA3: over max_msgs_per_sec */
    EMX_ANS_TOO_MANY_THINGS,  /* 0x83: a BIND over max_things */
    EMX_ANS_DRAINING,         /* 0xA0: the edge is due to close in a SIGTERM drain */
    EMX_ANS_PIPE_BUSY,        /* 0xA3 to a platform: its pipe is not draining */
    EMX_ANS_BYTES_IN_FLIGHT,  /* 0xA3: over max_bytes_in_flight */
    EMX_ANS_ANSWER_BACKLOG,   /* 0xA3: over max_answer_backlog */
    EMX_ANS_MEMORY_BUDGET,    /* 0xA0: over max_memory (to a platform as well) */
    EMX_ANS_TUNNEL_REFUSED,   /* 0xA3 to a platform: a StartTunnel over a tunnel limit */
    EMX_ANS__COUNT
};
const char *emx_answer_reason_name(enum emx_answer_reason r);

/* Request latency (edge → platform → edge, forwarded to answer delivered)
 * in fixed log-spaced buckets: upper bounds 1, 2, 4 … 16384 ms, then +Inf. */
#define EMX_LATENCY_BUCKETS 15
extern const uint64_t emx_latency_bounds_ms[EMX_LATENCY_BUCKETS];

struct emx_router_stats {
    uint64_t answers[EMX_ANS__COUNT];
    uint64_t latency[EMX_LATENCY_BUCKETS + 1]; /* per bucket (not cumulative); last: +Inf */
    uint64_t latency_sum_ms, latency_count;
    uint64_t edges_opened, edges_closed;
    uint64_t auth_ok, auth_failed, auth_timeouts;
    uint64_t edge_msgs_in, edge_bytes_in, edge_msgs_out, edge_bytes_out;
    uint64_t late_platform_answers;  /* platform answers matching nothing pending */
    uint64_t platform_answers_wrong_pipe; /* answers on a pipe their request did not take */
    uint64_t late_edge_answers;      /* edge answers matching nothing pending */
    uint64_t edge_answers_pipe_gone; /* edge answers whose pipe closed (rule 5) */
    uint64_t edge_answers_abandoned; /* edge answers cut off after part went to the pipe */
    uint64_t chunks_discarded;       /* chunks of tombstoned multipart messages */
    uint64_t answers_abandoned;      /* platform answers cut off after part reached the edge */
    uint64_t unbinds_sent, unbind_answers;
    uint64_t pipe_garbage;           /* unparseable messages from platforms */
    uint64_t pipe_auth_failures;
    uint64_t all_down_closes;        /* edges closed 1013 */
    uint64_t slow_consumer_closes;
    uint64_t discovery_updates, discovery_failures;
    uint64_t discovery_last_good_ms; /* loop time of the last good set */
    /* What the router holds for pending work (max_memory counts their sum):
     * request bytes forwarded and unanswered, and answer bytes sent to edges
     * and not read as far as it knows (a ceiling between readings). */
    uint64_t mem_requests, mem_answers;
    /* Tunnels: records made, StartTunnels refused, records ended, and
     * tunnel services forwarded without a record (no tid, multipart, or a
     * body that does not parse). */
    uint64_t tunnels_started;
    uint64_t tunnels_refused[EMX_TUN_REFUSE__COUNT];
    uint64_t tunnels_ended[EMX_TUN_END__COUNT];
    uint64_t tunnels_untracked;
};

struct emx_router *emx_router_new(const struct emx_router_config *cfg,
                                  const struct emx_router_io *io, uint64_t now);
void emx_router_free(struct emx_router *r);
/* Reload: new limits, timeouts and marks apply at once (marks re-evaluate
 * every pipe). pipes_per_instance and worker apply to new instances only. */
int emx_router_set_config(struct emx_router *r, const struct emx_router_config *cfg,
                          uint64_t now);
const struct emx_router_config *emx_router_config(const struct emx_router *r);
const struct emx_router_stats *emx_router_stats(const struct emx_router *r);
/* io.ctx as given to emx_router_new. */
void *emx_router_io_ctx(const struct emx_router *r);

/* ---- edges ---- */

/* A new edge connection. Returns NULL when no endpointId is free or memory
 * ran out (the server refuses the connection). */
struct emx_edge *emx_router_edge_open(struct emx_router *r, void *conn, uint64_t now);
/* One whole WebSocket message from an edge; `data` may be modified. */
void emx_router_edge_message(struct emx_router *r, struct emx_edge *e, uint8_t *data, size_t len,
                             uint64_t now);
/* The edge's connection is gone: UNBIND its Things, answer platform requests
 * it held with 0xA3, free it. `e` is invalid afterwards. */
void emx_router_edge_closed(struct emx_router *r, struct emx_edge *e, uint64_t now);
struct emx_edge *emx_router_edge_find(struct emx_router *r, uint32_t endpoint_id);
/* Close an edge on the server's behalf (admin kick, drain): io->edge_close
 * follows unless it is already closing. */
void emx_router_edge_close(struct emx_router *r, struct emx_edge *e, uint16_t code,
                           const char *reason);
/* SIGTERM drain: the edge is due to close. From now on its new requests are
 * answered 0xA0 and platform requests for it 0xA3; once nothing of it is in
 * flight (at once if nothing is) it is closed 1001. */
void emx_router_edge_drain(struct emx_router *r, struct emx_edge *e, uint64_t now);
size_t emx_router_edge_count(const struct emx_router *r);
/* Iterate edges: first with NULL; returns NULL at the end. */
struct emx_edge *emx_router_edge_next(struct emx_router *r, struct emx_edge *prev);
bool emx_edge_has_thing(const struct emx_edge *e, const char *name);
/* Iterate an edge's bound Things: *cursor NULL to start; returns NULL at the
 * end. Names are borrowed until the edge changes. */
const char *emx_edge_thing_next(const struct emx_edge *e, const void **cursor);

/* ---- pipes ---- */

/* The pipe's WebSocket is open: the router sends the pipe AUTH. */
void emx_router_pipe_opened(struct emx_router *r, struct emx_pipe *p, uint64_t now);
/* One whole message from a platform. */
void emx_router_pipe_message(struct emx_router *r, struct emx_pipe *p, uint8_t *data, size_t len,
                             uint64_t now);
/* Bytes queued to the pipe (own queue + kernel's unsent), absolute. */
void emx_router_pipe_queued(struct emx_router *r, struct emx_pipe *p, uint64_t queued,
                            uint64_t now);
/* The pipe's connection is gone (or a connect failed). */
void emx_router_pipe_closed(struct emx_router *r, struct emx_pipe *p, uint64_t now);
bool emx_pipe_is_writable(const struct emx_router *r, const struct emx_pipe *p, uint64_t now);
unsigned emx_router_pipes_up(const struct emx_router *r);

/* ---- instances and discovery ---- */

/* A whole set from discovery; copied. */
void emx_router_discovery_update(struct emx_router *r, const struct emx_instance_info *set,
                                 size_t count, uint64_t now);
/* The source failed: keep the last good set; count and log `reason`. */
void emx_router_discovery_failed(struct emx_router *r, const char *reason, uint64_t now);
struct emx_instance *emx_router_instance_find(struct emx_router *r, const char *id);
/* Iterate instances (draining ones included): first with NULL. */
struct emx_instance *emx_router_instance_next(struct emx_router *r, struct emx_instance *prev);
int emx_router_instance_maintenance(struct emx_router *r, const char *id, bool on, uint64_t now);
bool emx_instance_is_eligible(const struct emx_router *r, const struct emx_instance *inst,
                              uint64_t now);

/* ---- tunnels ---- */

/* Self-routing tids (docs/protocol.md §9.3): the tid a device sees is the
 * platform's prefixed with a token naming the owner instance, "x" + 8 hex
 * digits of FNV-1a-32 of the instance id + "~". Every edgemux computes the
 * same token from the same discovery set. */
#define EMX_TUNNEL_TOKEN_LEN 10
void emx_tunnel_token(const char *instance_id, char out[EMX_TUNNEL_TOKEN_LEN + 1]);
/* Does `tid` start with a well-formed token followed by at least one byte?
 * Then *rest / *rest_len are the platform's tid. */
bool emx_tunnel_token_split(const char *tid, size_t len, const char **rest, size_t *rest_len);
/* The instance (draining ones included) whose token `tid` starts with, or
 * NULL. */
struct emx_instance *emx_router_instance_by_token(struct emx_router *r, const char *tid,
                                                  size_t len);

/* A place in a count several workers share, under limit (0: none): taken
 * first and given back when over, so workers racing for the last place
 * never pass the limit together. */
static inline bool emx_shared_take(atomic_size_t *count, uint64_t limit)
{
    size_t n = atomic_fetch_add_explicit(count, 1, memory_order_relaxed) + 1;
    if (limit && n > limit) {
        atomic_fetch_sub_explicit(count, 1, memory_order_relaxed);
        return false;
    }
    return true;
}

static inline void emx_shared_give(atomic_size_t *count)
{
    atomic_fetch_sub_explicit(count, 1, memory_order_relaxed);
}

/* The record of a tid (not NUL-terminated; tid_len bytes), or NULL. */
const struct emx_tunnel *emx_router_tunnel_find(struct emx_router *r, const char *tid,
                                                size_t tid_len);
/* A relay socket claims the record: its deadline stops, and it ends only
 * at emx_router_tunnel_detach. Returns 0, -ENOENT, or -EBUSY (claimed). */
int emx_router_tunnel_attach(struct emx_router *r, const char *tid, size_t tid_len, uint64_t now);
/* The relay socket is gone: the record ends. Returns 0 or -ENOENT. */
int emx_router_tunnel_detach(struct emx_router *r, const char *tid, size_t tid_len, uint64_t now);
/* The same for a relay socket on another worker of this process (a nonzero
 * key names it): claim attaches a record of that owner; release ends the
 * record only while that claim holds it. Return 0, -ENOENT or -EBUSY. */
int emx_router_tunnel_claim(struct emx_router *r, const char *tid, size_t tid_len,
                            const char *instance_id, uint64_t key);
int emx_router_tunnel_release(struct emx_router *r, const char *tid, size_t tid_len, uint64_t key);
size_t emx_router_tunnel_count(const struct emx_router *r);
/* Iterate the records, oldest first: first with NULL. */
const struct emx_tunnel *emx_router_tunnel_next(struct emx_router *r,
                                                const struct emx_tunnel *prev);

/* ---- time ---- */

/* Run every timer due at `now`. Returns the loop time of the next deadline,
 * or UINT64_MAX when none is pending. */
uint64_t emx_router_tick(struct emx_router *r, uint64_t now);

#endif
