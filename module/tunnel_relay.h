/* The core's side of Remote Access tunnel sockets (docs/protocol.md §9):
 * the transport asks where a tunnel socket goes (on_tunnel), relays it on
 * its own, and reports when it opened and ended. This file decides the
 * owner instance from the tid (its token, else this edgemux's record),
 * applies the limits and the drain, and keeps what the admin API shows.
 * Owned by the loop that runs the server. */
#ifndef EMX_TUNNEL_RELAY_H
#define EMX_TUNNEL_RELAY_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "list.h"
#include "log.h"
#include "netaddr.h"
#include "router.h"

#include "edgemux/transport.h"

#define EMX_TUNNEL_PATH_SERVER "/Thingworx/WSTunnelServer/"
#define EMX_TUNNEL_PATH_CLIENT "/Thingworx/WSTunnelClient/"

/* Why a tunnel socket got no 101. */
enum emx_relay_refusal {
    EMX_RELAY_REFUSE_DISABLED = 0, /* 404: edge.tunnels is false */
    EMX_RELAY_REFUSE_DRAINING,     /* 503: SIGTERM drain */
    EMX_RELAY_REFUSE_LIMIT,        /* 429: edge.max_tunnels sockets relayed */
    EMX_RELAY_REFUSE_UNKNOWN_TID,  /* 404: no token and no record here */
    EMX_RELAY_REFUSE_UNKNOWN_OWNER, /* 404: a token no known instance has */
    EMX_RELAY_REFUSE_OWNER_DOWN,   /* 503: the owner has no pipe up */
    EMX_RELAY_REFUSE_CLAIMED,      /* 404: the tunnel's device socket is relayed already */
    EMX_RELAY_REFUSE_NO_MEMORY,    /* 503 */
    EMX_RELAY_REFUSE_OWNER,        /* the owner refused the upgrade: its status passed on */
    EMX_RELAY_REFUSE_UNREACHABLE,  /* 502/504: the owner could not be reached in time */
    EMX_RELAY_REFUSE_PEER_LEFT,    /* the peer left before the owner answered */
    EMX_RELAY_REFUSE_SOURCE_LIMIT, /* 429: edge.max_tunnels_per_source from its address */
    EMX_RELAY_REFUSE__COUNT
};
const char *emx_relay_refusal_name(enum emx_relay_refusal r);

enum { EMX_RELAY_SIDE_SERVER = 0, EMX_RELAY_SIDE_CLIENT = 1, EMX_RELAY_SIDES = 2 };
const char *emx_relay_side_name(unsigned side);

struct emx_relay_stats {
    uint64_t opened[EMX_RELAY_SIDES];
    uint64_t refused[EMX_RELAY_REFUSE__COUNT];
    uint64_t closed_by_peer, closed_by_owner, closed_by_edgemux;
    uint64_t bytes_to_owner, bytes_to_peer, msgs_to_owner, msgs_to_peer;
};

/* One tunnel socket the transport relays (from on_tunnel to on_tunnel_end). */
struct emx_relay {
    struct emx_list link;
    struct emx_relays *rs;
    struct emx_conn *conn;
    uint64_t id;
    unsigned side;
    bool open;     /* the peer got its 101 */
    bool attached; /* claimed this edgemux's record of the tid */
    uint64_t claim_key; /* asked the other workers to claim their record: this key */
    bool closing;  /* edgemux closed it (drain, owner removed, admin) */
    bool source_counted; /* holds a place of its address (edge.max_tunnels_per_source) */
    struct emx_relay_device *device; /* its entry in env.devices, or NULL */
    uint64_t started_ms, opened_ms;
    char *tid;          /* as the peer sent it */
    char *platform_tid; /* as the owner knows it */
    char *owner;        /* instance id */
    char *thing;        /* from the record, when there is one */
    char addr[EMX_ADDR_MAX];
    /* what the route points at until on_tunnel_end */
    char *host, *path, *hdr_xff;
    const char *headers[2];
    const char *copy[2];
    struct emx_connect_spec *alts; /* WSTunnelClient with no known owner: asked in turn */
    size_t nalts;
};

/* A WSTunnelClient socket whose owner is not known here asks at most this
 * many instances (each one that does not own it answers 404). */
#define EMX_RELAY_PROBE_MAX 16

/* The device sockets (WSTunnelServer) the process relays, by owner and
 * platform tid, for every worker: a second device socket for a tunnel
 * already relayed is refused 404 "already_connected", whichever worker
 * each lands on. */
struct emx_relay_device_set {
    pthread_mutex_t mu;
    struct emx_relay_device *all; /* uthash by "owner\ntid" */
};
void emx_relay_device_set_init(struct emx_relay_device_set *set);
/* Only once no relay is left. */
void emx_relay_device_set_free(struct emx_relay_device_set *set);

/* What the relays read of the server. The pointers stay valid for the
 * server's life; *cfg changes with reloads. */
struct emx_relay_env {
    struct emx_router *router;
    const struct emx_log *log;
    const struct emx_transport_plugin *tp;
    struct emx_config *const *cfg;
    const struct emx_cidr_list *trusted;
    const char *const *server_header; /* "X-Edgemux-Server: name" */
    const bool *stopping;
    uint64_t (*now)(void *ctx); /* loop time, ms */
    void *now_ctx;
    /* With several workers: the process's count of relayed sockets, which
     * edge.max_tunnels bounds (every worker adds its own); NULL: rs->n. */
    atomic_size_t *relays_shared;
    /* With several workers: a device socket whose record is not on this
     * worker asks the others to claim it (claim true) and, when it ends,
     * to release it, so the record there lives and ends with the socket.
     * NULL with one worker. */
    void (*elsewhere)(void *ctx, const char *owner, const char *tid, uint64_t key, bool claim);
    void *elsewhere_ctx;
    /* A tunnel socket from a device address, counted for the process
     * (edge.max_tunnels_per_source): take returns 0, -EBUSY at `limit`, or
     * -ENOMEM; give hands a taken place back. */
    int (*source_take)(void *ctx, const char *addr, uint64_t limit);
    void (*source_give)(void *ctx, const char *addr);
    void *source_ctx;
    struct emx_relay_device_set *devices; /* the process's (one set for every worker) */
    unsigned worker;
};

struct emx_relays {
    struct emx_relay_env env;
    struct emx_list all; /* oldest first */
    size_t n, nopen[EMX_RELAY_SIDES];
    uint64_t next_id;
    struct emx_relay_stats st;
};

void emx_relays_init(struct emx_relays *rs, const struct emx_relay_env *env);
/* rs->st plus what the open relays have carried so far (when the transport
 * can tell, ABI 1.5): byte and message counters that grow while a long
 * tunnel runs, and do not jump back when it ends. */
void emx_relays_stats_now(const struct emx_relays *rs, struct emx_relay_stats *out);
/* One relay's byte and message counts so far; -ENOTSUP: the transport
 * cannot tell (before ABI 1.5). */
int emx_relay_counts(const struct emx_relay *rl, struct emx_tunnel_result *sofar);
/* Only once every relay has ended (the transport stopped). */
void emx_relays_free(struct emx_relays *rs);

/* The transport's callbacks (struct emx_conn_callbacks, ABI 1.3); the
 * listener user pointer is the struct emx_relays. */
void *emx_relays_on_tunnel(void *relays, struct emx_conn *conn,
                           const struct emx_tunnel_request *req, struct emx_tunnel_route *route,
                           int *status);
void emx_relays_on_open(void *relay, size_t target);
void emx_relays_on_end(void *relay, const struct emx_tunnel_result *res);

/* Close every relay to this instance (it was removed), or every relay
 * (drain bound, shutdown). Returns how many were asked to close. */
size_t emx_relays_close_owner(struct emx_relays *rs, const char *instance_id, uint16_t code,
                              const char *reason);
size_t emx_relays_close_all(struct emx_relays *rs, uint16_t code, const char *reason);

#endif
