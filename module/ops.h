/* What the admin API shows: Prometheus metrics, instances and edges as
 * JSON, from the router's state plus counters only the server knows. Pure
 * formatting over a router: no sockets, so unit tests drive it directly.
 * Nothing here ever writes an app key or a token. */
#ifndef EMX_OPS_H
#define EMX_OPS_H

#include <stdbool.h>
#include <stdint.h>

#include "router.h"
#include "textbuf.h"

/* Why an edge connection was refused at accept. */
enum emx_refuse_reason {
    EMX_REFUSE_MAX_CONNECTIONS = 0,
    EMX_REFUSE_PER_SOURCE,
    EMX_REFUSE_DRAINING,
    EMX_REFUSE_NO_MEMORY,
    EMX_REFUSE__COUNT
};

/* The server's own counters; owned by the loop that runs the server. */
struct emx_server_counters {
    uint64_t refused[EMX_REFUSE__COUNT];
    uint64_t forwarded_for; /* edges whose address came from X-Forwarded-For */
    uint64_t reloads_ok, reloads_failed;
    uint64_t edges_kicked; /* closed through the admin API */
    uint64_t handed_in;    /* sockets another worker accepted and handed here */
    uint64_t sockets;      /* edge sockets the worker's transport holds now (workers > 1) */
};

struct emx_ops_view {
    const struct emx_server_counters *counters;
    const char *discovery_plugin; /* plugin name, for labels */
    bool ready;
    bool draining;
    unsigned agent_weight; /* percent the agent reports; 0 when draining */
    uint64_t start_ms;     /* loop time the server started */
    const struct emx_relays *relays; /* tunnel sockets; NULL: none */
    /* Each worker's own counters (the emx_worker_* series), as many as
     * routers are passed; NULL: none shown. */
    const struct emx_server_counters *const *worker_counters;
};

const char *emx_refuse_reason_name(enum emx_refuse_reason r);
const char *emx_pipe_state_name(enum emx_pipe_state s);
const char *emx_edge_state_name(enum emx_edge_state s);

/* GET /metrics: Prometheus text exposition format 0.0.4. */
void emx_ops_metrics(struct emx_textbuf *b, struct emx_router *r, const struct emx_ops_view *v,
                     uint64_t now);
/* GET /instances */
void emx_ops_instances_json(struct emx_textbuf *b, struct emx_router *r, uint64_t now);
/* One edge as a JSON object. */
void emx_ops_edge_json(struct emx_textbuf *b, const struct emx_edge *e, uint64_t now);
/* GET /edges: those bound to `thing` (NULL: any), or the one `endpoint`
 * (0: any); at most `limit` of them. */
void emx_ops_edges_json(struct emx_textbuf *b, struct emx_router *r, const char *thing,
                        uint32_t endpoint, size_t limit, uint64_t now);

/* GET /tunnels: the open tunnel records, oldest first, at most `limit`. */
struct emx_relays;
void emx_ops_tunnels_json(struct emx_textbuf *b, struct emx_router *r,
                          const struct emx_relays *relays, size_t limit, uint64_t now);

/* The same over the routers of every worker loop (server.workers): totals
 * add the workers up, /metrics adds emx_worker_* series labelled by
 * worker index, instances are listed as worker 0 has them with the other
 * workers' figures and pipes added by id, edges and tunnels concatenated.
 * The caller makes sure no router changes meanwhile (isolation). */
void emx_ops_metrics_n(struct emx_textbuf *b, struct emx_router *const *rs, size_t nr,
                       const struct emx_ops_view *v, uint64_t now);
void emx_ops_instances_json_n(struct emx_textbuf *b, struct emx_router *const *rs, size_t nr,
                              uint64_t now);
void emx_ops_edges_json_n(struct emx_textbuf *b, struct emx_router *const *rs, size_t nr,
                          const char *thing, uint32_t endpoint, size_t limit, uint64_t now);
void emx_ops_tunnels_json_n(struct emx_textbuf *b, struct emx_router *const *rs,
                            const struct emx_relays *const *rels, size_t nr, size_t limit,
                            uint64_t now);

/* The routers' statistics as the process has them: counts added up over
 * the workers, except discovery's (updates, failures, the last good set),
 * which every worker records for the one set discovery reported: those
 * are worker 0's (rs[0]). */
void emx_ops_stats_sum(struct emx_router *const *rs, size_t nr, struct emx_router_stats *out);
/* The instance of worker router rk that stands for `inst` of worker 0's
 * router: the one with its id, in the same state; NULL when none. */
struct emx_instance *emx_ops_instance_in(struct emx_router *rk, const struct emx_instance *inst);

#endif
