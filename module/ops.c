#include "ops.h"

#include "tunnel_relay.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

static const char *const refuse_names[EMX_REFUSE__COUNT] = {
    [EMX_REFUSE_MAX_CONNECTIONS] = "max_connections",
    [EMX_REFUSE_PER_SOURCE] = "max_connections_per_source",
    [EMX_REFUSE_DRAINING] = "draining",
    [EMX_REFUSE_NO_MEMORY] = "no_memory",
};

const char *emx_refuse_reason_name(enum emx_refuse_reason r)
{
    return (unsigned)r < EMX_REFUSE__COUNT ? refuse_names[r] : "unknown";
}

const char *emx_pipe_state_name(enum emx_pipe_state s)
{
    switch (s) {
    case EMX_PIPE_DOWN:
        return "down";
    case EMX_PIPE_AUTHING:
        return "authing";
    case EMX_PIPE_UP:
        return "up";
    }
    return "unknown";
}

const char *emx_edge_state_name(enum emx_edge_state s)
{
    switch (s) {
    case EMX_EDGE_NEW:
        return "new";
    case EMX_EDGE_AUTHING:
        return "authing";
    case EMX_EDGE_AUTHED:
        return "authed";
    case EMX_EDGE_CLOSING:
        return "closing";
    }
    return "unknown";
}

/* ---- Prometheus ---- */

static void family(struct emx_textbuf *b, const char *name, const char *type, const char *help)
{
    emx_textbuf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void sample(struct emx_textbuf *b, const char *name, uint64_t v)
{
    emx_textbuf_printf(b, "%s %" PRIu64 "\n", name, v);
}

/* name{k="v"} value, the label value escaped. */
static void sample1(struct emx_textbuf *b, const char *name, const char *k, const char *lv,
                    uint64_t v)
{
    emx_textbuf_printf(b, "%s{%s=\"", name, k);
    emx_textbuf_prom_label(b, lv);
    emx_textbuf_printf(b, "\"} %" PRIu64 "\n", v);
}

static void sample2(struct emx_textbuf *b, const char *name, const char *k1, const char *v1,
                    const char *k2, const char *v2, uint64_t v)
{
    emx_textbuf_printf(b, "%s{%s=\"", name, k1);
    emx_textbuf_prom_label(b, v1);
    emx_textbuf_printf(b, "\",%s=\"", k2);
    emx_textbuf_prom_label(b, v2);
    emx_textbuf_printf(b, "\"} %" PRIu64 "\n", v);
}

/* A pipe's label: its index; "worker.index" with several workers. */
static void pipe_label(char *buf, size_t cap, size_t nr, size_t worker, unsigned i)
{
    if (nr > 1)
        snprintf(buf, cap, "%zu.%u", worker, i);
    else
        snprintf(buf, cap, "%u", i);
}

static void instance_sums(const struct emx_instance *inst, uint64_t out[4])
{
    out[0] = out[1] = out[2] = out[3] = 0;
    for (unsigned i = 0; i < inst->npipes; i++) {
        out[0] += inst->pipes[i].msgs_out;
        out[1] += inst->pipes[i].msgs_in;
        out[2] += inst->pipes[i].bytes_out;
        out[3] += inst->pipes[i].bytes_in;
    }
}

/* The same instance in router k (by id; its active one when inst is
 * active), or NULL. Worker 0's router lists the instances; the others'
 * figures are added by id. */
struct emx_instance *emx_ops_instance_in(struct emx_router *rk, const struct emx_instance *inst)
{
    struct emx_instance *o = emx_router_instance_find(rk, inst->id);
    if (!o || o->state != inst->state)
        return NULL;
    return o;
}

#define EACH_OTHER(rs_, n_, inst_, o_)                                                             \
    for (size_t k_ = 0; k_ < (n_); k_++)                                                           \
        for (struct emx_instance *o_ = k_ == 0 ? (inst_)                                           \
                                               : emx_ops_instance_in((rs_)[k_], (inst_));          \
             o_; o_ = NULL)

static void instance_metrics(struct emx_textbuf *b, struct emx_router *const *rs, size_t nr,
                             uint64_t now)
{
    struct emx_router *r = rs[0];
    struct emx_instance *inst;
/* A draining instance whose id an active one took over (it moved) is left
 * out: two series with one label set would spoil the whole scrape. */
#define EACH_INSTANCE                                                                              \
    for (inst = emx_router_instance_next(r, NULL); inst; inst = emx_router_instance_next(r, inst)) \
        if (inst->state != EMX_INSTANCE_DRAINING || emx_router_instance_find(r, inst->id) == inst)
    family(b, "emx_instance_messages_total", "counter",
           "AlwaysOn messages on an instance's pipes, by direction");
    EACH_INSTANCE
    {
        uint64_t s[4] = {0, 0, 0, 0};
        EACH_OTHER(rs, nr, inst, o)
        {
            uint64_t t[4];
            instance_sums(o, t);
            for (unsigned j = 0; j < 4; j++)
                s[j] += t[j];
        }
        sample2(b, "emx_instance_messages_total", "instance", inst->id, "direction", "to_platform",
                s[0]);
        sample2(b, "emx_instance_messages_total", "instance", inst->id, "direction",
                "from_platform", s[1]);
    }
    family(b, "emx_instance_bytes_total", "counter",
           "AlwaysOn bytes on an instance's pipes, by direction");
    EACH_INSTANCE
    {
        uint64_t s[4] = {0, 0, 0, 0};
        EACH_OTHER(rs, nr, inst, o)
        {
            uint64_t t[4];
            instance_sums(o, t);
            for (unsigned j = 0; j < 4; j++)
                s[j] += t[j];
        }
        sample2(b, "emx_instance_bytes_total", "instance", inst->id, "direction", "to_platform",
                s[2]);
        sample2(b, "emx_instance_bytes_total", "instance", inst->id, "direction", "from_platform",
                s[3]);
    }
    family(b, "emx_instance_requests_total", "counter", "device requests routed to an instance");
    EACH_INSTANCE
    {
        uint64_t n = 0;
        EACH_OTHER(rs, nr, inst, o)
        n += o->requests;
        sample1(b, "emx_instance_requests_total", "instance", inst->id, n);
    }
    family(b, "emx_instance_pending", "gauge",
           "requests in flight on an instance, both directions");
    EACH_INSTANCE
    {
        uint64_t n = 0;
        EACH_OTHER(rs, nr, inst, o)
        n += o->pending;
        sample1(b, "emx_instance_pending", "instance", inst->id, n);
    }
    family(b, "emx_instance_maintenance", "gauge",
           "1 while an instance is in maintenance (no new requests)");
    EACH_INSTANCE
    sample1(b, "emx_instance_maintenance", "instance", inst->id, inst->maintenance);
    family(b, "emx_instance_draining", "gauge", "1 while an instance that left discovery drains");
    EACH_INSTANCE
    sample1(b, "emx_instance_draining", "instance", inst->id, inst->state == EMX_INSTANCE_DRAINING);
    family(b, "emx_pipes", "gauge", "pipes of an instance by state");
    EACH_INSTANCE
    {
        unsigned n[3] = {0, 0, 0};
        EACH_OTHER(rs, nr, inst, o)
        for (unsigned i = 0; i < o->npipes; i++)
            if ((unsigned)o->pipes[i].state < 3)
                n[o->pipes[i].state]++;
        for (unsigned st = 0; st < 3; st++)
            sample2(b, "emx_pipes", "instance", inst->id, "state",
                    emx_pipe_state_name((enum emx_pipe_state)st), n[st]);
    }
    family(b, "emx_pipe_queued_bytes", "gauge",
           "bytes queued to a pipe (edgemux's queue and the kernel's unsent bytes)");
    EACH_INSTANCE
    EACH_OTHER(rs, nr, inst, o)
    for (unsigned i = 0; i < o->npipes; i++) {
        char idx[48];
        pipe_label(idx, sizeof(idx), nr, k_, i);
        sample2(b, "emx_pipe_queued_bytes", "instance", inst->id, "pipe", idx, o->pipes[i].wm.queued);
    }
    family(b, "emx_pipe_writable", "gauge", "1 while a pipe is connected and takes requests");
    EACH_INSTANCE
    EACH_OTHER(rs, nr, inst, o)
    for (unsigned i = 0; i < o->npipes; i++) {
        char idx[48];
        pipe_label(idx, sizeof(idx), nr, k_, i);
        sample2(b, "emx_pipe_writable", "instance", inst->id, "pipe", idx,
                emx_pipe_is_writable(rs[k_], &o->pipes[i], now));
    }
#undef EACH_INSTANCE
}

static void relay_metrics(struct emx_textbuf *b, const struct emx_relays *rs)
{
    const struct emx_relay_stats *st = &rs->st;
    family(b, "emx_tunnel_sockets_open", "gauge",
           "tunnel sockets relayed to their owner instance now, by side (server: devices, "
           "client: remote access clients)");
    for (unsigned i = 0; i < EMX_RELAY_SIDES; i++)
        sample1(b, "emx_tunnel_sockets_open", "side", emx_relay_side_name(i), rs->nopen[i]);
    family(b, "emx_tunnel_sockets_opened_total", "counter",
           "tunnel sockets whose peer got its 101, by side");
    for (unsigned i = 0; i < EMX_RELAY_SIDES; i++)
        sample1(b, "emx_tunnel_sockets_opened_total", "side", emx_relay_side_name(i),
                st->opened[i]);
    family(b, "emx_tunnel_sockets_refused_total", "counter",
           "tunnel socket upgrades refused, by reason");
    for (unsigned i = 0; i < EMX_RELAY_REFUSE__COUNT; i++)
        sample1(b, "emx_tunnel_sockets_refused_total", "reason",
                emx_relay_refusal_name((enum emx_relay_refusal)i), st->refused[i]);
    family(b, "emx_tunnel_sockets_closed_total", "counter",
           "relayed tunnel sockets that ended, by the side that closed first");
    sample1(b, "emx_tunnel_sockets_closed_total", "by", "peer", st->closed_by_peer);
    sample1(b, "emx_tunnel_sockets_closed_total", "by", "owner", st->closed_by_owner);
    sample1(b, "emx_tunnel_sockets_closed_total", "by", "edgemux", st->closed_by_edgemux);
    family(b, "emx_tunnel_bytes_total", "counter",
           "tunnel message bytes relayed (open tunnels so far, and ended ones), by direction");
    sample1(b, "emx_tunnel_bytes_total", "direction", "to_owner", st->bytes_to_owner);
    sample1(b, "emx_tunnel_bytes_total", "direction", "to_peer", st->bytes_to_peer);
    family(b, "emx_tunnel_messages_total", "counter",
           "tunnel messages relayed (open tunnels so far, and ended ones), by direction");
    sample1(b, "emx_tunnel_messages_total", "direction", "to_owner", st->msgs_to_owner);
    sample1(b, "emx_tunnel_messages_total", "direction", "to_peer", st->msgs_to_peer);
}

/* Every field is a uint64_t count or an array of them, added up; the
 * discovery fields are worker 0's (each worker records every set worker 0
 * hands it: a sum would count each set once per worker). */
void emx_ops_stats_sum(struct emx_router *const *rs, size_t nr, struct emx_router_stats *out)
{
    _Static_assert(sizeof(struct emx_router_stats) % sizeof(uint64_t) == 0,
                   "emx_router_stats holds uint64_t fields only");
    memset(out, 0, sizeof(*out));
    uint64_t *dst = (uint64_t *)out;
    size_t words = sizeof(*out) / sizeof(uint64_t);
    for (size_t k = 0; k < nr; k++) {
        uint64_t src[sizeof(*out) / sizeof(uint64_t)];
        memcpy(src, emx_router_stats(rs[k]), sizeof(src));
        for (size_t i = 0; i < words; i++)
            dst[i] += src[i];
    }
    if (nr) {
        const struct emx_router_stats *st0 = emx_router_stats(rs[0]);
        out->discovery_updates = st0->discovery_updates;
        out->discovery_failures = st0->discovery_failures;
        out->discovery_last_good_ms = st0->discovery_last_good_ms;
    }
}

static void worker_sample(struct emx_textbuf *b, const char *name, size_t k, const char *k2,
                          const char *v2, uint64_t v)
{
    if (k2)
        emx_textbuf_printf(b, "%s{worker=\"%zu\",%s=\"%s\"} %" PRIu64 "\n", name, k, k2, v2, v);
    else
        emx_textbuf_printf(b, "%s{worker=\"%zu\"} %" PRIu64 "\n", name, k, v);
}

/* Per-worker series: each family's samples add up to its process total. */
static void worker_metrics(struct emx_textbuf *b, struct emx_router *const *rs, size_t nr,
                           const struct emx_server_counters *const *wc)
{
    family(b, "emx_worker_edges_connected", "gauge", "device connections open, by worker loop");
    for (size_t k = 0; k < nr; k++)
        worker_sample(b, "emx_worker_edges_connected", k, NULL, NULL, emx_router_edge_count(rs[k]));
    family(b, "emx_worker_edges_accepted_total", "counter",
           "device connections accepted, by worker loop");
    for (size_t k = 0; k < nr; k++)
        worker_sample(b, "emx_worker_edges_accepted_total", k, NULL, NULL,
                      emx_router_stats(rs[k])->edges_opened);
    family(b, "emx_worker_pipes_connected", "gauge", "pipes connected, by worker loop");
    for (size_t k = 0; k < nr; k++)
        worker_sample(b, "emx_worker_pipes_connected", k, NULL, NULL, emx_router_pipes_up(rs[k]));
    family(b, "emx_worker_edge_messages_total", "counter",
           "AlwaysOn messages from and to devices, by worker loop");
    for (size_t k = 0; k < nr; k++) {
        const struct emx_router_stats *st = emx_router_stats(rs[k]);
        worker_sample(b, "emx_worker_edge_messages_total", k, "direction", "from_edge",
                      st->edge_msgs_in);
        worker_sample(b, "emx_worker_edge_messages_total", k, "direction", "to_edge",
                      st->edge_msgs_out);
    }
    family(b, "emx_worker_answers_total", "counter",
           "requests answered by edgemux itself (all reasons), by worker loop");
    for (size_t k = 0; k < nr; k++) {
        uint64_t n = 0;
        for (unsigned i = 0; i < EMX_ANS__COUNT; i++)
            n += emx_router_stats(rs[k])->answers[i];
        worker_sample(b, "emx_worker_answers_total", k, NULL, NULL, n);
    }
    if (wc) {
        family(b, "emx_worker_edges_refused_total", "counter",
               "device connections refused at accept (all reasons), by worker loop");
        for (size_t k = 0; k < nr; k++) {
            uint64_t n = 0;
            for (unsigned i = 0; i < EMX_REFUSE__COUNT; i++)
                n += wc[k] ? wc[k]->refused[i] : 0;
            worker_sample(b, "emx_worker_edges_refused_total", k, NULL, NULL, n);
        }
        family(b, "emx_worker_sockets", "gauge",
               "device sockets open (handshake, edge, tunnel), by worker loop");
        for (size_t k = 0; k < nr; k++)
            worker_sample(b, "emx_worker_sockets", k, NULL, NULL, wc[k] ? wc[k]->sockets : 0);
        family(b, "emx_worker_sockets_handed_in_total", "counter",
               "device sockets another worker accepted and handed to this one to even out "
               "the load, by worker loop");
        for (size_t k = 0; k < nr; k++)
            worker_sample(b, "emx_worker_sockets_handed_in_total", k, NULL, NULL,
                          wc[k] ? wc[k]->handed_in : 0);
    }
}

void emx_ops_metrics(struct emx_textbuf *b, struct emx_router *r, const struct emx_ops_view *v,
                     uint64_t now)
{
    emx_ops_metrics_n(b, &r, 1, v, now);
}

void emx_ops_metrics_n(struct emx_textbuf *b, struct emx_router *const *rs, size_t nr,
                       const struct emx_ops_view *v, uint64_t now)
{
    struct emx_router *r = rs[0];
    struct emx_router_stats sum;
    emx_ops_stats_sum(rs, nr, &sum);
    const struct emx_router_stats *st = &sum;
    const struct emx_server_counters *c = v->counters;
    unsigned pipes_up = 0;
    size_t edges = 0, tunnels = 0;
    uint64_t budget = 0;
    for (size_t k = 0; k < nr; k++) {
        pipes_up += emx_router_pipes_up(rs[k]);
        edges += emx_router_edge_count(rs[k]);
        tunnels += emx_router_tunnel_count(rs[k]);
        budget += emx_router_config(rs[k])->max_memory;
    }

    family(b, "emx_ready", "gauge", "1 while at least one pipe is connected and not draining");
    sample(b, "emx_ready", v->ready);
    family(b, "emx_draining", "gauge", "1 during a SIGTERM drain");
    sample(b, "emx_draining", v->draining);
    family(b, "emx_agent_weight_percent", "gauge", "weight the HAProxy agent reports");
    sample(b, "emx_agent_weight_percent", v->agent_weight);
    family(b, "emx_uptime_seconds", "gauge", "seconds since the server started");
    sample(b, "emx_uptime_seconds", now >= v->start_ms ? (now - v->start_ms) / 1000 : 0);
    family(b, "emx_pipes_connected", "gauge", "pipes connected (AUTH done), all instances");
    sample(b, "emx_pipes_connected", pipes_up);

    family(b, "emx_edges_connected", "gauge", "device connections open");
    sample(b, "emx_edges_connected", edges);
    family(b, "emx_edges_accepted_total", "counter",
           "device connections accepted (WebSocket handshake done)");
    sample(b, "emx_edges_accepted_total", st->edges_opened);
    family(b, "emx_edges_closed_total", "counter", "device connections closed");
    sample(b, "emx_edges_closed_total", st->edges_closed);
    family(b, "emx_edges_refused_total", "counter", "device connections refused at accept");
    for (unsigned i = 0; i < EMX_REFUSE__COUNT; i++)
        sample1(b, "emx_edges_refused_total", "reason",
                emx_refuse_reason_name((enum emx_refuse_reason)i), c ? c->refused[i] : 0);
    family(b, "emx_edges_forwarded_for_total", "counter",
           "devices whose address came from X-Forwarded-For of a trusted proxy");
    sample(b, "emx_edges_forwarded_for_total", c ? c->forwarded_for : 0);
    family(b, "emx_edges_kicked_total", "counter", "devices closed through the admin API");
    sample(b, "emx_edges_kicked_total", c ? c->edges_kicked : 0);
    family(b, "emx_edge_auth_total", "counter", "device AUTH outcomes");
    sample1(b, "emx_edge_auth_total", "result", "ok", st->auth_ok);
    sample1(b, "emx_edge_auth_total", "result", "failed", st->auth_failed);
    sample1(b, "emx_edge_auth_total", "result", "timeout", st->auth_timeouts);
    family(b, "emx_edge_messages_total", "counter", "AlwaysOn messages from and to devices");
    sample1(b, "emx_edge_messages_total", "direction", "from_edge", st->edge_msgs_in);
    sample1(b, "emx_edge_messages_total", "direction", "to_edge", st->edge_msgs_out);
    family(b, "emx_edge_bytes_total", "counter", "AlwaysOn bytes from and to devices");
    sample1(b, "emx_edge_bytes_total", "direction", "from_edge", st->edge_bytes_in);
    sample1(b, "emx_edge_bytes_total", "direction", "to_edge", st->edge_bytes_out);
    family(b, "emx_slow_consumer_closes_total", "counter", "devices closed 1008 slow consumer");
    sample(b, "emx_slow_consumer_closes_total", st->slow_consumer_closes);
    family(b, "emx_all_down_closes_total", "counter", "devices closed 1013 (no instance)");
    sample(b, "emx_all_down_closes_total", st->all_down_closes);

    family(b, "emx_answers_total", "counter", "requests answered by edgemux itself, by reason");
    for (unsigned i = 0; i < EMX_ANS__COUNT; i++)
        sample1(b, "emx_answers_total", "reason", emx_answer_reason_name((enum emx_answer_reason)i),
                st->answers[i]);
    family(b, "emx_memory_held_bytes", "gauge",
           "bytes held for pending work: request bytes forwarded and unanswered, answer bytes "
           "sent to devices and not read (a ceiling between readings); edge.max_memory bounds "
           "their sum");
    sample1(b, "emx_memory_held_bytes", "kind", "requests_in_flight", st->mem_requests);
    sample1(b, "emx_memory_held_bytes", "kind", "answers_unread", st->mem_answers);
    family(b, "emx_memory_budget_bytes", "gauge", "edge.max_memory (0: unlimited)");
    sample(b, "emx_memory_budget_bytes", budget);
    family(b, "emx_late_answers_total", "counter",
           "answers that matched nothing pending (late or unknown), by sender");
    sample1(b, "emx_late_answers_total", "from", "platform", st->late_platform_answers);
    sample1(b, "emx_late_answers_total", "from", "edge", st->late_edge_answers);
    family(b, "emx_platform_answers_wrong_pipe_total", "counter",
           "platform answers dropped because their request went out on another pipe");
    sample(b, "emx_platform_answers_wrong_pipe_total", st->platform_answers_wrong_pipe);
    family(b, "emx_edge_answers_pipe_gone_total", "counter",
           "device answers dropped because their pipe closed");
    sample(b, "emx_edge_answers_pipe_gone_total", st->edge_answers_pipe_gone);
    family(b, "emx_answers_abandoned_total", "counter",
           "platform answers cut off after part of them reached the device (nothing more sent)");
    sample(b, "emx_answers_abandoned_total", st->answers_abandoned);
    family(b, "emx_edge_answers_abandoned_total", "counter",
           "device answers cut off after part reached the platform (too large, pipe not "
           "draining, or edge.request_timeout)");
    sample(b, "emx_edge_answers_abandoned_total", st->edge_answers_abandoned);
    family(b, "emx_tunnels_open", "gauge",
           "Remote Access tunnel records (StartTunnel seen, tunnel not ended)");
    sample(b, "emx_tunnels_open", tunnels);
    family(b, "emx_tunnels_started_total", "counter", "StartTunnels recorded and forwarded");
    sample(b, "emx_tunnels_started_total", st->tunnels_started);
    family(b, "emx_tunnels_refused_total", "counter",
           "StartTunnels answered by edgemux instead of forwarded, by reason");
    for (unsigned i = 0; i < EMX_TUN_REFUSE__COUNT; i++)
        sample1(b, "emx_tunnels_refused_total", "reason",
                emx_tunnel_refusal_name((enum emx_tunnel_refusal)i), st->tunnels_refused[i]);
    family(b, "emx_tunnels_ended_total", "counter", "tunnel records ended, by reason");
    for (unsigned i = 0; i < EMX_TUN_END__COUNT; i++)
        sample1(b, "emx_tunnels_ended_total", "reason", emx_tunnel_end_name((enum emx_tunnel_end)i),
                st->tunnels_ended[i]);
    family(b, "emx_tunnels_untracked_total", "counter",
           "tunnel services forwarded without a record (no tid, multipart, or malformed)");
    sample(b, "emx_tunnels_untracked_total", st->tunnels_untracked);
    if (v->relays)
        relay_metrics(b, v->relays);
    family(b, "emx_chunks_discarded_total", "counter", "multipart chunks discarded");
    sample(b, "emx_chunks_discarded_total", st->chunks_discarded);
    family(b, "emx_unbinds_on_leave_total", "counter", "UNBINDs sent for devices that left");
    sample(b, "emx_unbinds_on_leave_total", st->unbinds_sent);
    family(b, "emx_pipe_auth_failures_total", "counter", "pipe AUTHs refused by platforms");
    sample(b, "emx_pipe_auth_failures_total", st->pipe_auth_failures);
    family(b, "emx_pipe_garbage_total", "counter", "unexpected messages from platforms");
    sample(b, "emx_pipe_garbage_total", st->pipe_garbage);

    const char *dp = v->discovery_plugin ? v->discovery_plugin : "unknown";
    family(b, "emx_discovery_updates_total", "counter", "instance sets reported by discovery");
    sample1(b, "emx_discovery_updates_total", "plugin", dp, st->discovery_updates);
    family(b, "emx_discovery_failures_total", "counter",
           "discovery source failures (the last good set is kept)");
    sample1(b, "emx_discovery_failures_total", "plugin", dp, st->discovery_failures);
    if (st->discovery_updates) {
        family(b, "emx_discovery_last_good_age_seconds", "gauge",
               "seconds since discovery last reported a set");
        uint64_t age = now >= st->discovery_last_good_ms ? now - st->discovery_last_good_ms : 0;
        emx_textbuf_printf(b, "emx_discovery_last_good_age_seconds{plugin=\"");
        emx_textbuf_prom_label(b, dp);
        emx_textbuf_printf(b, "\"} %" PRIu64 ".%03" PRIu64 "\n", age / 1000, age % 1000);
    }

    family(b, "emx_reloads_total", "counter", "SIGHUP configuration reloads");
    sample1(b, "emx_reloads_total", "result", "ok", c ? c->reloads_ok : 0);
    sample1(b, "emx_reloads_total", "result", "failed", c ? c->reloads_failed : 0);

    /* In seconds, Prometheus's base unit (measured in ms: bounds and sum
     * are exact with three decimals). */
    family(b, "emx_request_latency_seconds", "histogram",
           "device request to platform answer delivered, in seconds");
    uint64_t cum = 0;
    for (unsigned i = 0; i < EMX_LATENCY_BUCKETS; i++) {
        cum += st->latency[i];
        emx_textbuf_printf(
            b, "emx_request_latency_seconds_bucket{le=\"%" PRIu64 ".%03" PRIu64 "\"} %" PRIu64 "\n",
            emx_latency_bounds_ms[i] / 1000, emx_latency_bounds_ms[i] % 1000, cum);
    }
    cum += st->latency[EMX_LATENCY_BUCKETS];
    emx_textbuf_printf(b, "emx_request_latency_seconds_bucket{le=\"+Inf\"} %" PRIu64 "\n", cum);
    emx_textbuf_printf(b, "emx_request_latency_seconds_sum %" PRIu64 ".%03" PRIu64 "\n",
                       st->latency_sum_ms / 1000, st->latency_sum_ms % 1000);
    sample(b, "emx_request_latency_seconds_count", st->latency_count);

    (void)r;
    instance_metrics(b, rs, nr, now);
    worker_metrics(b, rs, nr, v->worker_counters);
}

/* ---- JSON ---- */

static void json_key(struct emx_textbuf *b, const char *k, bool first)
{
    emx_textbuf_printf(b, "%s\"%s\":", first ? "" : ",", k);
}

void emx_ops_instances_json(struct emx_textbuf *b, struct emx_router *r, uint64_t now)
{
    emx_ops_instances_json_n(b, &r, 1, now);
}

void emx_ops_instances_json_n(struct emx_textbuf *b, struct emx_router *const *rs, size_t nr,
                              uint64_t now)
{
    struct emx_router *r = rs[0];
    emx_textbuf_puts(b, "{\"instances\":[");
    bool first = true;
    for (struct emx_instance *inst = emx_router_instance_next(r, NULL); inst;
         inst = emx_router_instance_next(r, inst)) {
        emx_textbuf_puts(b, first ? "{" : ",{");
        first = false;
        json_key(b, "id", true);
        emx_textbuf_json_str(b, inst->id);
        json_key(b, "host", false);
        emx_textbuf_json_str(b, inst->host);
        uint64_t pending = 0, requests = 0;
        unsigned up = 0;
        bool eligible = false;
        EACH_OTHER(rs, nr, inst, o)
        {
            pending += o->pending;
            requests += o->requests;
            up += o->up_pipes;
            eligible = eligible || emx_instance_is_eligible(rs[k_], o, now);
        }
        emx_textbuf_printf(
            b,
            ",\"port\":%u,\"tls\":%s,\"weight\":%" PRIu32 ",\"priority\":%" PRIu32
            ",\"state\":\"%s\",\"maintenance\":%s,\"eligible\":%s,\"pending\":%" PRIu64
            ",\"requests\":%" PRIu64 ",\"pipes_up\":%u,\"pipes\":[",
            inst->port, inst->tls ? "true" : "false", inst->weight, inst->priority,
            inst->state == EMX_INSTANCE_DRAINING ? "draining" : "active",
            inst->maintenance ? "true" : "false", eligible ? "true" : "false", pending, requests,
            up);
        bool pfirst = true;
        EACH_OTHER(rs, nr, inst, o)
        for (unsigned i = 0; i < o->npipes; i++) {
            const struct emx_pipe *p = &o->pipes[i];
            char wk[48] = "";
            if (nr > 1)
                snprintf(wk, sizeof(wk), ",\"worker\":%zu", k_);
            emx_textbuf_printf(b,
                               "%s{\"index\":%u%s,\"state\":\"%s\",\"queued\":%" PRIu64
                               ",\"writable\":%s,\"msgs_out\":%" PRIu64 ",\"msgs_in\":%" PRIu64
                               ",\"bytes_out\":%" PRIu64 ",\"bytes_in\":%" PRIu64 "}",
                               pfirst ? "" : ",", i, wk, emx_pipe_state_name(p->state),
                               p->wm.queued, emx_pipe_is_writable(rs[k_], p, now) ? "true" : "false",
                               p->msgs_out, p->msgs_in, p->bytes_out, p->bytes_in);
            pfirst = false;
        }
        emx_textbuf_puts(b, "]}");
    }
    emx_textbuf_puts(b, "]}\n");
}

void emx_ops_edge_json(struct emx_textbuf *b, const struct emx_edge *e, uint64_t now)
{
    emx_textbuf_printf(b,
                       "{\"endpointId\":%" PRIu32 ",\"endpointIdHex\":\"%08" PRIx32
                       "\",\"state\":\"%s\",\"address\":",
                       e->id, e->id, emx_edge_state_name(e->state));
    emx_textbuf_json_str(b, e->addr);
    json_key(b, "peer", false);
    emx_textbuf_json_str(b, e->peer);
    emx_textbuf_printf(b,
                       ",\"connected_s\":%" PRIu64 ",\"pending\":%" PRIu32 ",\"inbound\":%" PRIu32
                       ",\"msgs_in\":%" PRIu64 ",\"msgs_out\":%" PRIu64 ",\"things_count\":%" PRIu32
                       ",\"things\":[",
                       now >= e->opened_at ? (now - e->opened_at) / 1000 : 0, e->npending,
                       e->ninbound, e->msgs_in, e->msgs_out, e->nthings);
    const void *cur = NULL;
    const char *name;
    bool first = true;
    unsigned shown = 0;
    while ((name = emx_edge_thing_next(e, &cur)) != NULL && shown < 1000) {
        if (!first)
            emx_textbuf_puts(b, ",");
        first = false;
        emx_textbuf_json_str(b, name);
        shown++;
    }
    emx_textbuf_puts(b, "]}");
}

void emx_ops_edges_json(struct emx_textbuf *b, struct emx_router *r, const char *thing,
                        uint32_t endpoint, size_t limit, uint64_t now)
{
    emx_ops_edges_json_n(b, &r, 1, thing, endpoint, limit, now);
}

void emx_ops_edges_json_n(struct emx_textbuf *b, struct emx_router *const *rs, size_t nr,
                          const char *thing, uint32_t endpoint, size_t limit, uint64_t now)
{
    emx_textbuf_puts(b, "{\"edges\":[");
    size_t n = 0;
    bool truncated = false;
    if (endpoint) {
        /* the top bits of an endpointId name its worker */
        size_t k = nr > 1 ? endpoint >> EMX_WORKER_SHIFT : 0;
        struct emx_edge *e = k < nr ? emx_router_edge_find(rs[k], endpoint) : NULL;
        if (e && (!thing || emx_edge_has_thing(e, thing)) && limit) {
            emx_ops_edge_json(b, e, now);
            n++;
        }
    } else {
        for (size_t k = 0; k < nr && !truncated; k++)
        for (struct emx_edge *e = emx_router_edge_next(rs[k], NULL); e;
             e = emx_router_edge_next(rs[k], e)) {
            if (thing && !emx_edge_has_thing(e, thing))
                continue;
            if (n == limit) {
                truncated = true;
                break;
            }
            if (n)
                emx_textbuf_puts(b, ",");
            emx_ops_edge_json(b, e, now);
            n++;
        }
    }
    emx_textbuf_printf(b, "],\"count\":%zu,\"truncated\":%s}\n", n, truncated ? "true" : "false");
}

void emx_ops_tunnels_json(struct emx_textbuf *b, struct emx_router *r,
                          const struct emx_relays *relays, size_t limit, uint64_t now)
{
    emx_ops_tunnels_json_n(b, &r, &relays, 1, limit, now);
}

void emx_ops_tunnels_json_n(struct emx_textbuf *b, struct emx_router *const *rs,
                            const struct emx_relays *const *rels, size_t nr, size_t limit,
                            uint64_t now)
{
    emx_textbuf_puts(b, "{\"tunnels\":[");
    size_t n = 0, open = 0;
    bool truncated = false;
    for (size_t k = 0; k < nr; k++)
        open += emx_router_tunnel_count(rs[k]);
    for (size_t k = 0; k < nr && !truncated; k++)
    for (const struct emx_tunnel *t = emx_router_tunnel_next(rs[k], NULL); t;
         t = emx_router_tunnel_next(rs[k], t)) {
        if (n == limit) {
            truncated = true;
            break;
        }
        emx_textbuf_puts(b, n ? ",{" : "{");
        n++;
        json_key(b, "tid", true);
        emx_textbuf_json_str(b, t->tid);
        json_key(b, "thing", false);
        emx_textbuf_json_str(b, t->thing);
        json_key(b, "owner", false);
        emx_textbuf_json_str(b, t->instance_id);
        uint64_t age = now >= t->started_at ? now - t->started_at : 0;
        emx_textbuf_printf(
            b,
            ",\"pipe\":%u,\"endpointId\":%" PRIu32 ",\"endpointIdHex\":\"%08" PRIx32
            "\",\"edge_gone\":%s,\"state\":\"%s\",\"attached\":%s,\"age_ms\":%" PRIu64 ",\"type\":",
            t->pipe_index, t->edge_id, t->edge_id, t->edge_gone ? "true" : "false",
            emx_tunnel_state_name(t->state), t->attached ? "true" : "false", age);
        emx_textbuf_json_str(b, t->type);
        json_key(b, "target", false);
        emx_textbuf_json_str(b, t->target);
        emx_textbuf_printf(
            b, ",\"chunksize\":%" PRId32 ",\"idle_timeout\":%" PRId32 ",\"last_command\":",
            t->chunksize, t->idle_timeout);
        emx_textbuf_json_str(b, t->last_command);
        emx_textbuf_puts(b, "}");
    }
    emx_textbuf_printf(b, "],\"count\":%zu,\"open\":%zu,\"truncated\":%s", n, open,
                       truncated ? "true" : "false");
    /* the tunnel sockets relayed now, whichever edgemux saw the StartTunnel */
    emx_textbuf_puts(b, ",\"sockets\":[");
    size_t k = 0, nsockets = 0;
    for (size_t w = 0; w < nr; w++) {
    const struct emx_relays *relays = rels ? rels[w] : NULL;
    nsockets += relays ? relays->n : 0;
    const struct emx_list *pos;
    for (pos = relays ? relays->all.next : NULL; relays && pos != &relays->all && k < limit;
         pos = pos->next, k++) {
        const struct emx_relay *rl = emx_container_of(pos, const struct emx_relay, link);
        emx_textbuf_puts(b, k ? ",{" : "{");
        json_key(b, "tid", true);
        emx_textbuf_json_str(b, rl->platform_tid);
        json_key(b, "side", false);
        emx_textbuf_json_str(b, emx_relay_side_name(rl->side));
        json_key(b, "owner", false);
        emx_textbuf_json_str(b, rl->owner);
        json_key(b, "thing", false);
        emx_textbuf_json_str(b, rl->thing ? rl->thing : "");
        json_key(b, "from", false);
        emx_textbuf_json_str(b, rl->addr);
        emx_textbuf_printf(b, ",\"state\":\"%s\",\"record_here\":%s,\"age_ms\":%" PRIu64,
                           rl->open ? "open" : "connecting", rl->attached ? "true" : "false",
                           now >= rl->started_ms ? now - rl->started_ms : 0);
        struct emx_tunnel_result sofar;
        if (emx_relay_counts(rl, &sofar) == 0)
            emx_textbuf_printf(b,
                               ",\"bytes_to_owner\":%" PRIu64 ",\"bytes_to_peer\":%" PRIu64
                               ",\"messages_to_owner\":%" PRIu64 ",\"messages_to_peer\":%" PRIu64,
                               sofar.bytes_to_owner, sofar.bytes_to_peer, sofar.msgs_to_owner,
                               sofar.msgs_to_peer);
        emx_textbuf_puts(b, "}");
    }
    }
    emx_textbuf_printf(b, "],\"sockets_count\":%zu}\n", nsockets);
}
