/* Tunnel sockets: where each goes, the limits, and what the admin API
 * shows (tunnel_relay.h). The bytes never pass through here: the
 * transport relays them. */
#include "tunnel_relay.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "uthash.h"

static const char *const refusal_names[EMX_RELAY_REFUSE__COUNT] = {
    [EMX_RELAY_REFUSE_DISABLED] = "disabled",
    [EMX_RELAY_REFUSE_DRAINING] = "draining",
    [EMX_RELAY_REFUSE_LIMIT] = "process_limit",
    [EMX_RELAY_REFUSE_UNKNOWN_TID] = "unknown_tid",
    [EMX_RELAY_REFUSE_UNKNOWN_OWNER] = "unknown_owner",
    [EMX_RELAY_REFUSE_OWNER_DOWN] = "owner_down",
    [EMX_RELAY_REFUSE_CLAIMED] = "already_connected",
    [EMX_RELAY_REFUSE_NO_MEMORY] = "no_memory",
    [EMX_RELAY_REFUSE_OWNER] = "owner_refused",
    [EMX_RELAY_REFUSE_UNREACHABLE] = "owner_unreachable",
    [EMX_RELAY_REFUSE_PEER_LEFT] = "peer_left",
    [EMX_RELAY_REFUSE_SOURCE_LIMIT] = "source_limit",
};

struct emx_relay_device {
    UT_hash_handle hh;
    char key[]; /* "owner\ntid" */
};

void emx_relay_device_set_init(struct emx_relay_device_set *set)
{
    set->all = NULL;
    pthread_mutex_init(&set->mu, NULL); /* default attributes: cannot fail on Linux */
}

void emx_relay_device_set_free(struct emx_relay_device_set *set)
{
    struct emx_relay_device *d, *tmp;
    HASH_ITER(hh, set->all, d, tmp)
    {
        HASH_DEL(set->all, d);
        free(d);
    }
    pthread_mutex_destroy(&set->mu);
}

/* 0 and *out: listed now; -EEXIST: that tunnel's device socket is relayed
 * already. */
static int device_set_add(struct emx_relay_device_set *set, const char *owner, const char *tid,
                          struct emx_relay_device **out)
{
    size_t lo = strlen(owner), lt = strlen(tid);
    struct emx_relay_device *d = malloc(sizeof(*d) + lo + lt + 2), *old;
    if (!d)
        return -ENOMEM;
    memcpy(d->key, owner, lo);
    d->key[lo] = '\n';
    memcpy(d->key + lo + 1, tid, lt + 1);
    pthread_mutex_lock(&set->mu);
    HASH_FIND_STR(set->all, d->key, old);
    if (!old)
        HASH_ADD_STR(set->all, key, d);
    pthread_mutex_unlock(&set->mu);
    if (old) {
        free(d);
        return -EEXIST;
    }
    *out = d;
    return 0;
}

/* Only the relay that listed d takes it out. */
static void device_set_del(struct emx_relay_device_set *set, struct emx_relay_device *d)
{
    pthread_mutex_lock(&set->mu);
    HASH_DEL(set->all, d);
    pthread_mutex_unlock(&set->mu);
    free(d);
}

const char *emx_relay_refusal_name(enum emx_relay_refusal r)
{
    return (unsigned)r < EMX_RELAY_REFUSE__COUNT ? refusal_names[r] : "unknown";
}

const char *emx_relay_side_name(unsigned side)
{
    return side == EMX_RELAY_SIDE_CLIENT ? "client" : "server";
}

void emx_relays_init(struct emx_relays *rs, const struct emx_relay_env *env)
{
    memset(rs, 0, sizeof(*rs));
    rs->env = *env;
    emx_list_init(&rs->all);
}

static void relay_free(struct emx_relay *rl)
{
    if (rl->device)
        device_set_del(rl->rs->env.devices, rl->device);
    for (size_t i = 0; i < rl->nalts; i++)
        emx_free((char *)rl->alts[i].host);
    emx_free(rl->alts);
    emx_free(rl->tid);
    emx_free(rl->platform_tid);
    emx_free(rl->owner);
    emx_free(rl->thing);
    emx_free(rl->host);
    emx_free(rl->path);
    emx_free(rl->hdr_xff);
    emx_free(rl);
}

int emx_relay_counts(const struct emx_relay *rl, struct emx_tunnel_result *sofar)
{
    const struct emx_transport_plugin *tp = rl->rs->env.tp;

    memset(sofar, 0, sizeof(*sofar));
    if (!tp ||
        tp->hdr.struct_size <
            offsetof(struct emx_transport_plugin, tunnel_counts) + sizeof(tp->tunnel_counts) ||
        !tp->tunnel_counts)
        return -ENOTSUP;
    return tp->tunnel_counts(rl->conn, sofar);
}

void emx_relays_stats_now(const struct emx_relays *rs, struct emx_relay_stats *out)
{
    *out = rs->st;
    for (struct emx_list *l = rs->all.next; l != &rs->all; l = l->next) {
        const struct emx_relay *rl = emx_container_of(l, struct emx_relay, link);
        struct emx_tunnel_result sofar;
        if (emx_relay_counts(rl, &sofar) != 0)
            continue;
        out->bytes_to_owner += sofar.bytes_to_owner;
        out->bytes_to_peer += sofar.bytes_to_peer;
        out->msgs_to_owner += sofar.msgs_to_owner;
        out->msgs_to_peer += sofar.msgs_to_peer;
    }
}

void emx_relays_free(struct emx_relays *rs)
{
    struct emx_list *pos, *tmp;
    emx_list_for_each_safe(pos, tmp, &rs->all)
    {
        struct emx_relay *rl = emx_container_of(pos, struct emx_relay, link);
        emx_list_unlink(&rl->link);
        relay_free(rl);
    }
    rs->n = 0;
}

/* Peer strings reach logs as printable ASCII only. */
static const char *printable(char *buf, size_t cap, const char *s)
{
    size_t n = 0;
    for (; s && *s && n + 1 < cap; s++)
        buf[n++] = (*s >= 0x20 && *s < 0x7F) ? *s : '?';
    buf[n] = '\0';
    return buf;
}

static void *refuse(struct emx_relays *rs, const struct emx_tunnel_request *req,
                    enum emx_relay_refusal why, int status, int *out)
{
    char tid[96];
    rs->st.refused[why]++;
    *out = status;
    emx_logf(rs->env.log, why == EMX_RELAY_REFUSE_DISABLED ? EMX_LOG_DEBUG : EMX_LOG_INFO,
             "tunnel", "tunnel %s (%s side) from %s refused %d: %s",
             printable(tid, sizeof(tid), req->tid),
             req->side == EMX_TUNNEL_SIDE_CLIENT ? "client" : "server",
             req->peer ? req->peer : "?", status, emx_relay_refusal_name(why));
    return NULL;
}

/* The socket peer's address without its port ("[v6]:p" → "v6"). */
static void peer_ip_text(const char *peer, char *out, size_t cap)
{
    const char *colon = peer ? strrchr(peer, ':') : NULL;
    size_t n;
    if (!peer) {
        snprintf(out, cap, "unknown");
        return;
    }
    if (peer[0] == '[') {
        const char *end = strchr(peer, ']');
        n = end ? (size_t)(end - peer - 1) : strlen(peer + 1);
        peer++;
    } else {
        n = colon ? (size_t)(colon - peer) : strlen(peer);
    }
    snprintf(out, cap, "%.*s", (int)n, peer);
}

/* A place under edge.max_tunnels: the process's count when the workers
 * share one (taken first, given back when over), else this worker's. */
static bool relay_take_place(struct emx_relays *rs, const struct emx_config *cfg)
{
    uint64_t limit = cfg->edge.max_tunnels > 0 ? (uint64_t)cfg->edge.max_tunnels : 0;

    if (!rs->env.relays_shared)
        return !limit || rs->n < limit;
    return emx_shared_take(rs->env.relays_shared, limit);
}

/* The places a socket holds while it is relayed: one under edge.max_tunnels
 * and, when that limit is on, one of its address's under
 * edge.max_tunnels_per_source. */
struct relay_place {
    const char *addr;
    bool source_counted;
};

static void relay_give_place(struct emx_relays *rs, const struct relay_place *pl)
{
    if (rs->env.relays_shared)
        emx_shared_give(rs->env.relays_shared);
    if (pl->source_counted)
        rs->env.source_give(rs->env.source_ctx, pl->addr);
}

static void *refuse_placed(struct emx_relays *rs, const struct emx_tunnel_request *req,
                           const struct relay_place *pl, enum emx_relay_refusal why, int http,
                           int *status)
{
    relay_give_place(rs, pl);
    return refuse(rs, req, why, http, status);
}

void *emx_relays_on_tunnel(void *relays, struct emx_conn *conn,
                           const struct emx_tunnel_request *req, struct emx_tunnel_route *route,
                           int *status)
{
    struct emx_relays *rs = relays;
    const struct emx_config *cfg = *rs->env.cfg;
    struct emx_router *r = rs->env.router;
    unsigned side = req->side == EMX_TUNNEL_SIDE_CLIENT ? EMX_RELAY_SIDE_CLIENT
                                                         : EMX_RELAY_SIDE_SERVER;
    size_t tid_len = strlen(req->tid);
    const char *ptid = req->tid;
    size_t ptid_len = tid_len;
    uint64_t now = rs->env.now(rs->env.now_ctx);

    if (!cfg->edge.tunnels)
        return refuse(rs, req, EMX_RELAY_REFUSE_DISABLED, 404, status);
    if (*rs->env.stopping)
        return refuse(rs, req, EMX_RELAY_REFUSE_DRAINING, 503, status);
    if (!relay_take_place(rs, cfg))
        return refuse(rs, req, EMX_RELAY_REFUSE_LIMIT, 429, status);
    /* the device's address: X-Forwarded-For only from a trusted proxy */
    char addr[EMX_ADDR_MAX];
    emx_real_address(rs->env.trusted, req->peer, req->forwarded_for, addr, sizeof(addr));
    struct relay_place place = {.addr = addr};
    if (cfg->edge.max_tunnels_per_source > 0 && rs->env.source_take) {
        int rc = rs->env.source_take(rs->env.source_ctx, addr,
                                     (uint64_t)cfg->edge.max_tunnels_per_source);
        if (rc != 0)
            return refuse_placed(rs, req, &place,
                                 rc == -EBUSY ? EMX_RELAY_REFUSE_SOURCE_LIMIT
                                              : EMX_RELAY_REFUSE_NO_MEMORY,
                                 rc == -EBUSY ? 429 : 503, status);
        place.source_counted = true;
    }
    /* The owner: named by the tid's token (any edgemux can tell), else
     * this edgemux's record of a StartTunnel it forwarded. */
    struct emx_instance *inst = NULL;
    if (emx_tunnel_token_split(req->tid, tid_len, &ptid, &ptid_len)) {
        inst = emx_router_instance_by_token(r, req->tid, tid_len);
        if (!inst)
            return refuse_placed(rs, req, &place, EMX_RELAY_REFUSE_UNKNOWN_OWNER, 404, status);
    }
    const struct emx_tunnel *rec = emx_router_tunnel_find(r, ptid, ptid_len);
    struct emx_instance *probe[EMX_RELAY_PROBE_MAX];
    size_t nprobe = 0;
    if (!inst && !rec && side == EMX_RELAY_SIDE_CLIENT) {
        /* A remote access client knows the platform's tid only, and the
         * StartTunnel may have passed another edgemux: ask the instances
         * in turn; one that does not own the tid answers 404. */
        for (struct emx_instance *i = emx_router_instance_next(r, NULL);
             i && nprobe < EMX_RELAY_PROBE_MAX; i = emx_router_instance_next(r, i))
            if (i->up_pipes > 0)
                probe[nprobe++] = i;
        if (!nprobe)
            return refuse_placed(rs, req, &place, EMX_RELAY_REFUSE_OWNER_DOWN, 503, status);
        inst = probe[0];
    }
    if (!inst) {
        if (!rec)
            return refuse_placed(rs, req, &place, EMX_RELAY_REFUSE_UNKNOWN_TID, 404, status);
        inst = emx_router_instance_find(r, rec->instance_id);
        if (!inst)
            return refuse_placed(rs, req, &place, EMX_RELAY_REFUSE_UNKNOWN_OWNER, 404, status);
    }
    if (rec && strcmp(rec->instance_id, inst->id) != 0)
        rec = NULL; /* a record of another owner's tunnel with the same tid */
    if (inst->up_pipes == 0)
        return refuse_placed(rs, req, &place, EMX_RELAY_REFUSE_OWNER_DOWN, 503, status);
    /* one device socket per tunnel, whichever worker (or no record) has it:
     * a record here that a socket claimed has that socket in this list */
    struct emx_relay_device *listed = NULL;
    if (side == EMX_RELAY_SIDE_SERVER) {
        int rc = device_set_add(rs->env.devices, inst->id, ptid, &listed);
        if (rc != 0)
            return refuse_placed(rs, req, &place,
                                 rc == -EEXIST ? EMX_RELAY_REFUSE_CLAIMED
                                               : EMX_RELAY_REFUSE_NO_MEMORY,
                                 rc == -EEXIST ? 404 : 503, status);
    }

    struct emx_relay *rl = emx_calloc(1, sizeof(*rl));
    char ip[64], xff_head[1200];
    if (!rl) {
        if (listed)
            device_set_del(rs->env.devices, listed);
        return refuse_placed(rs, req, &place, EMX_RELAY_REFUSE_NO_MEMORY, 503, status);
    }
    rl->device = listed;
    rl->rs = rs;
    rl->conn = conn;
    rl->id = ++rs->next_id;
    rl->side = side;
    rl->started_ms = now;
    memcpy(rl->addr, addr, sizeof(rl->addr));
    rl->source_counted = place.source_counted;
    /* X-Forwarded-For: the chain a trusted proxy gave, plus the peer */
    peer_ip_text(req->peer, ip, sizeof(ip));
    {
        struct emx_ip pip;
        bool trusted_peer = req->peer && emx_peer_ip(req->peer, &pip) == 0 &&
                            emx_cidr_list_has(rs->env.trusted, &pip);
        if (trusted_peer && req->forwarded_for && *req->forwarded_for &&
            strlen(req->forwarded_for) < 1024)
            snprintf(xff_head, sizeof(xff_head), "X-Forwarded-For: %s, %s", req->forwarded_for,
                     ip);
        else
            snprintf(xff_head, sizeof(xff_head), "X-Forwarded-For: %s", ip);
    }
    size_t plen = strlen(EMX_TUNNEL_PATH_CLIENT) + ptid_len + 1;
    rl->tid = emx_strdup(req->tid);
    rl->platform_tid = emx_calloc(1, ptid_len + 1);
    rl->owner = emx_strdup(inst->id);
    rl->thing = rec ? emx_strdup(rec->thing) : NULL;
    rl->host = emx_strdup(inst->host);
    rl->path = emx_calloc(1, plen);
    rl->hdr_xff = emx_strdup(xff_head);
    if (!rl->tid || !rl->platform_tid || !rl->owner || (rec && !rl->thing) || !rl->host ||
        !rl->path || !rl->hdr_xff) {
        relay_free(rl);
        return refuse_placed(rs, req, &place, EMX_RELAY_REFUSE_NO_MEMORY, 503, status);
    }
    memcpy(rl->platform_tid, ptid, ptid_len);
    snprintf(rl->path, plen, "%s%s",
             side == EMX_RELAY_SIDE_CLIENT ? EMX_TUNNEL_PATH_CLIENT : EMX_TUNNEL_PATH_SERVER,
             rl->platform_tid);
    if (rec && side == EMX_RELAY_SIDE_SERVER &&
        emx_router_tunnel_attach(r, ptid, ptid_len, now) == 0)
        rl->attached = true;
    if (!rec && side == EMX_RELAY_SIDE_SERVER && rs->env.elsewhere) {
        /* the StartTunnel may have reached the device through another
         * worker of this process: its record lives and ends with this socket */
        rl->claim_key = ((uint64_t)(rs->env.worker + 1) << 48) | rl->id;
        rs->env.elsewhere(rs->env.elsewhere_ctx, rl->owner, rl->platform_tid, rl->claim_key, true);
    }
    rl->headers[0] = rl->hdr_xff;
    rl->headers[1] = *rs->env.server_header;
    if (cfg->edge.tunnel_headers_to_copy.count) {
        route->copy_headers = cfg->edge.tunnel_headers_to_copy.items;
        route->copy_header_count = cfg->edge.tunnel_headers_to_copy.count;
    } else {
        rl->copy[0] = "appKey"; /* the Connection Server's default */
        rl->copy[1] = "Cookie";
        route->copy_headers = rl->copy;
        route->copy_header_count = 2;
    }
    route->target = (struct emx_connect_spec){
        .host = rl->host,
        .port = inst->port,
        .path = rl->path,
        .tls = inst->tls,
        .tls_ca = cfg->platform.tls_ca,
        .tls_cert = cfg->platform.tls_cert,
        .tls_key = cfg->platform.tls_key,
        .tls_verify = cfg->platform.tls_verify,
        .headers = rl->headers,
        .header_count = rl->headers[1] ? 2 : 1,
        .max_message_size = cfg->edge.max_message_size,
        .connect_timeout_ms = cfg->platform.connect_timeout,
    };
    route->idle_timeout_ms = cfg->edge.tunnel_idle_timeout;
    if (nprobe > 1) {
        rl->alts = emx_calloc(nprobe - 1, sizeof(*rl->alts));
        for (size_t i = 1; rl->alts && i < nprobe; i++) {
            rl->alts[i - 1] = route->target;
            rl->alts[i - 1].host = emx_strdup(probe[i]->host);
            rl->alts[i - 1].port = probe[i]->port;
            rl->alts[i - 1].tls = probe[i]->tls;
            rl->nalts = i;
            if (!rl->alts[i - 1].host)
                break;
        }
        if (!rl->alts || rl->nalts != nprobe - 1 || !rl->alts[nprobe - 2].host) {
            if (rl->attached)
                emx_router_tunnel_detach(r, ptid, ptid_len, now);
            relay_free(rl);
            return refuse_placed(rs, req, &place, EMX_RELAY_REFUSE_NO_MEMORY, 503, status);
        }
        /* rl->owner names the first one asked until another answers 101 */
        route->alternates = rl->alts;
        route->alternate_count = rl->nalts;
    }
    emx_list_push_back(&rs->all, &rl->link);
    rs->n++;
    char tid[96], thing[96];
    emx_logf(rs->env.log, EMX_LOG_INFO, "tunnel",
             "tunnel %s (%s side%s%s) from %s: relaying to owner %s",
             printable(tid, sizeof(tid), rl->platform_tid), emx_relay_side_name(side),
             rl->thing ? ", thing " : "", rl->thing ? printable(thing, sizeof(thing), rl->thing) : "",
             rl->addr, rl->owner);
    return rl;
}

void emx_relays_on_open(void *relay, size_t target)
{
    struct emx_relay *rl = relay;
    struct emx_relays *rs = rl->rs;
    if (target > 0 && target <= rl->nalts) {
        /* a probe found the owner: name it (logs, /tunnels, removal) */
        struct emx_instance *inst = NULL;
        for (struct emx_instance *i = emx_router_instance_next(rs->env.router, NULL); i;
             i = emx_router_instance_next(rs->env.router, i))
            if (i->port == rl->alts[target - 1].port && !strcmp(i->host, rl->alts[target - 1].host))
                inst = i;
        char *id = inst ? emx_strdup(inst->id) : NULL;
        if (id) {
            emx_free(rl->owner);
            rl->owner = id;
        }
    }
    rl->open = true;
    rl->opened_ms = rs->env.now(rs->env.now_ctx);
    rs->nopen[rl->side]++;
    rs->st.opened[rl->side]++;
}

void emx_relays_on_end(void *relay, const struct emx_tunnel_result *res)
{
    struct emx_relay *rl = relay;
    struct emx_relays *rs = rl->rs;
    uint64_t now = rs->env.now(rs->env.now_ctx);
    char tid[96];
    printable(tid, sizeof(tid), rl->platform_tid);
    if (rl->open) {
        rs->nopen[rl->side]--;
        if (rl->closing)
            rs->st.closed_by_edgemux++;
        else if (res->owner_closed)
            rs->st.closed_by_owner++;
        else
            rs->st.closed_by_peer++;
        emx_logf(rs->env.log, EMX_LOG_INFO, "tunnel",
                 "tunnel %s (%s side) owner %s ended after %" PRIu64 " ms: %s %u %s; %" PRIu64
                 " bytes to the owner, %" PRIu64 " to the peer",
                 tid, emx_relay_side_name(rl->side), rl->owner, now - rl->opened_ms,
                 rl->closing ? "closed by edgemux" : res->owner_closed ? "owner closed" : "peer closed",
                 res->code, res->reason ? res->reason : "", res->bytes_to_owner,
                 res->bytes_to_peer);
    } else {
        enum emx_relay_refusal why = res->status == 499   ? EMX_RELAY_REFUSE_PEER_LEFT
                                     : res->status == 502 || res->status == 504
                                         ? EMX_RELAY_REFUSE_UNREACHABLE
                                     : res->status == 503 && rl->closing ? EMX_RELAY_REFUSE_DRAINING
                                                                         : EMX_RELAY_REFUSE_OWNER;
        rs->st.refused[why]++;
        emx_logf(rs->env.log, EMX_LOG_INFO, "tunnel",
                 "tunnel %s (%s side) owner %s: upgrade refused %d (%s: %s)", tid,
                 emx_relay_side_name(rl->side), rl->owner, res->status,
                 emx_relay_refusal_name(why), res->reason ? res->reason : "");
    }
    rs->st.bytes_to_owner += res->bytes_to_owner;
    rs->st.bytes_to_peer += res->bytes_to_peer;
    rs->st.msgs_to_owner += res->msgs_to_owner;
    rs->st.msgs_to_peer += res->msgs_to_peer;
    if (rl->attached)
        emx_router_tunnel_detach(rs->env.router, rl->platform_tid, strlen(rl->platform_tid), now);
    if (rl->claim_key)
        rs->env.elsewhere(rs->env.elsewhere_ctx, rl->owner, rl->platform_tid, rl->claim_key, false);
    emx_list_unlink(&rl->link);
    rs->n--;
    relay_give_place(rs, &(struct relay_place){rl->addr, rl->source_counted});
    relay_free(rl);
}

static size_t close_where(struct emx_relays *rs, const char *owner, uint16_t code,
                          const char *reason)
{
    struct emx_list *pos, *tmp;
    size_t n = 0;
    /* close() reports on_tunnel_end from the loop, never inside it: the
     * list stays intact while walked */
    emx_list_for_each_safe(pos, tmp, &rs->all)
    {
        struct emx_relay *rl = emx_container_of(pos, struct emx_relay, link);
        if (rl->closing || (owner && strcmp(rl->owner, owner) != 0))
            continue;
        rl->closing = true;
        rs->env.tp->close(rl->conn, code, reason);
        n++;
    }
    return n;
}

size_t emx_relays_close_owner(struct emx_relays *rs, const char *instance_id, uint16_t code,
                              const char *reason)
{
    return close_where(rs, instance_id, code, reason);
}

size_t emx_relays_close_all(struct emx_relays *rs, uint16_t code, const char *reason)
{
    return close_where(rs, NULL, code, reason);
}
