/* Remote Access tunnel sockets (TUNNELS.md §8.3, docs/protocol.md §9): a
 * peer's upgrade on /Thingworx/WSTunnelServer/<tid> or WSTunnelClient/<tid>
 * is relayed to the platform instance the core names, over a WebSocket of
 * its own (never the AlwaysOn pipes).
 *
 * A tunnel is two edge_conns: `dev`, the accepted peer socket, and `be`,
 * the back end edgemux opens to the owner as a client (frames masked, the
 * owner's unmasked). The order is fixed by what the C SDK accepts:
 *   1. the peer's upgrade waits, unread, while the back end connects,
 *      runs TLS and upgrades; a refusal there is passed on with its status
 *      (502 unreachable, 504 not in time);
 *   2. the peer gets its 101 alone; owner → peer data waits until the 101
 *      has left and tunnel_data_delay has passed (the SDK drops bytes that
 *      arrive in the read that holds the response);
 *   3. messages pass unchanged: text stays text, one message one message,
 *      cut into frames no larger than the peer's Max-Frame-Size (never a
 *      64-bit length); pings are answered by each hop, never forwarded;
 *   4. a side with more than tunnel_max_queued bytes queued stops the other
 *      side's reading until it has drained half of it;
 *   5. a close on one side closes the other with the same code and reason
 *      (never "Tunnel stopped by edge" toward the device, which would make
 *      it think it closed the socket itself); a side lost without a close
 *      closes the other 1011; no message either way for idle_timeout
 *      closes both 1001.
 * Both edge_conns are freed here, once both are gone, after which the core
 * hears on_tunnel_end. */
#include "edge_int.h"

#include <openssl/rand.h>
#include <openssl/x509v3.h>

#define TUN_REQ_MAX   (3 * EDGE_HTTP_MAX_HEAD)
#define GATE_RECHECK_MS 5

struct tunnel {
    struct edge_hub *hub;
    struct edge_conn *dev, *be; /* NULL until created / after freed */
    bool dev_freed, be_freed;
    const struct emx_conn_callbacks *cb;
    void *user;
    int side;
    unsigned refs; /* dev, be (and abandoned probes), timer, resolver */
    struct tun_target {
        char *host;
        uint16_t port;
        bool tls;
    } * targets; /* the owner, or the instances to try in turn (404: next) */
    size_t ntargets, cur;
    char *host; /* targets[cur] */
    uint16_t port;
    bool tls;
    char *path;
    char *hdrs; /* the back end's upgrade headers after Host: holds the app key, wiped */
    size_t hdrs_len;
    char key[32];    /* the back end's Sec-WebSocket-Key */
    char accept[32]; /* the peer's Sec-WebSocket-Accept */
    uv_getaddrinfo_t gai;
    bool resolving;
    uv_timer_t timer;
    bool timer_closing;
    uint64_t started, gate_at, last_msg, idle_ms;
    bool opened;    /* the peer got its 101 */
    bool gate_open; /* owner → peer data may flow */
    bool dev_held, be_held; /* paused for the other side's queue */
    bool ending;    /* closes started by the tunnel */
    int status;     /* refusal status passed to the peer */
    const char *why;
    bool end_set, owner_closed;
    uint16_t end_code;
    char end_reason[REASON_MAX + 1];
    uint64_t bytes_to_owner, bytes_to_peer, msgs_to_owner, msgs_to_peer;
};

static struct tunnel *T(struct edge_conn *c)
{
    return c->user;
}

static void tunnel_unref(struct tunnel *t);
static void arm_timer(struct tunnel *t);

/* ---- ending ------------------------------------------------------------------ */

static void note_end(struct tunnel *t, bool owner, uint16_t code, const char *reason)
{
    if (t->end_set)
        return;
    t->end_set = true;
    t->owner_closed = owner;
    t->end_code = code;
    snprintf(t->end_reason, sizeof(t->end_reason), "%s", reason ? reason : "");
}

static void timer_closed(uv_handle_t *h)
{
    tunnel_unref(h->data);
}

static void tunnel_free(struct tunnel *t)
{
    struct emx_tunnel_result res = {
        .status = t->opened ? 0 : (t->status ? t->status : 502),
        .code = t->end_code ? t->end_code : 1006,
        .reason = t->opened ? t->end_reason : (t->why ? t->why : "refused"),
        .owner_closed = t->owner_closed,
        .bytes_to_owner = t->bytes_to_owner,
        .bytes_to_peer = t->bytes_to_peer,
        .msgs_to_owner = t->msgs_to_owner,
        .msgs_to_peer = t->msgs_to_peer,
    };

    t->hub->ntunnels--;
    if (t->cb->on_tunnel_end)
        t->cb->on_tunnel_end(t->user, &res);
    if (t->dev)
        edge_conn_free(t->dev);
    if (t->be)
        edge_conn_free(t->be);
    if (t->hdrs) {
        OPENSSL_cleanse(t->hdrs, t->hdrs_len);
        free(t->hdrs);
    }
    for (size_t i = 0; i < t->ntargets; i++)
        free(t->targets[i].host);
    free(t->targets);
    free(t->path);
    free(t);
}

static void tunnel_unref(struct tunnel *t)
{
    if (--t->refs == 0)
        tunnel_free(t);
}

/* Both sockets are gone (or never were): stop the timer; the last
 * reference frees. */
static void maybe_finish(struct tunnel *t)
{
    if ((t->dev && !t->dev_freed) || (t->be && !t->be_freed) || t->timer_closing)
        return;
    t->timer_closing = true;
    uv_close((uv_handle_t *)&t->timer, timer_closed);
}

/* The upgrade could not be relayed: the peer gets `status` (it cancels
 * at once), the back end goes. */
static void fail(struct tunnel *t, int status, const char *why)
{
    if (t->opened)
        return;
    if (!t->status) {
        t->status = status;
        t->why = why;
        LOG(t->hub, EMX_LOG_INFO, "ws: tunnel upgrade to %s:%u refused %d: %s",
            t->host ? t->host : "?", (unsigned)t->port, status, why);
    }
    if (t->resolving)
        uv_cancel((uv_req_t *)&t->gai);
    if (t->be && t->be->state != ES_GONE)
        edge_conn_gone(t->be, 1006, why);
    if (t->dev && t->dev->state == ES_SHAKING)
        edge_refuse_http(t->dev, status, why);
}

/* Close the side that is still open, as the other side ended. */
static void close_side(struct edge_conn *c, uint16_t code, const char *reason)
{
    if (!c || c->state == ES_GONE)
        return;
    if (c->state == ES_OPEN)
        edge_start_close(c, code, reason);
    else if (c->state == ES_SHAKING)
        edge_conn_gone(c, 1006, reason);
}

/* "Tunnel stopped by edge" in a server's close reason makes the SDK think
 * it closed the socket itself, and the tunnel lingers (TUNNELS.md §6). */
static const char *to_device_reason(const struct tunnel *t, const char *reason)
{
    if (t->side == EDGE_TUNNEL_SERVER && reason && strstr(reason, "Tunnel stopped by edge"))
        return "Tunnel closed";
    return reason;
}

void tunnel_close(struct edge_conn *dev, uint16_t code, const char *reason)
{
    struct tunnel *t = T(dev);

    if (!t || t->ending)
        return;
    t->ending = true;
    if (!t->opened) {
        fail(t, 503, reason && *reason ? reason : "tunnel closed");
        return;
    }
    note_end(t, false, code ? code : 1001, reason);
    close_side(t->dev, code ? code : 1001, to_device_reason(t, reason));
    close_side(t->be, code ? code : 1001, reason);
}

int tunnel_counts(struct edge_conn *dev, struct emx_tunnel_result *sofar)
{
    struct tunnel *t = T(dev);

    if (!t)
        return -ENOENT;
    sofar->bytes_to_owner = t->bytes_to_owner;
    sofar->bytes_to_peer = t->bytes_to_peer;
    sofar->msgs_to_owner = t->msgs_to_owner;
    sofar->msgs_to_peer = t->msgs_to_peer;
    return 0;
}

void tunnel_conn_freed(struct edge_conn *c)
{
    struct tunnel *t = T(c);
    bool is_be = c == t->be;
    struct edge_conn *other = is_be ? t->dev : t->be;

    if (c->client && !is_be) {
        /* a probe that answered 404: the next target took its place */
        edge_conn_free(c);
        tunnel_unref(t);
        return;
    }
    if (is_be)
        t->be_freed = true;
    else
        t->dev_freed = true;
    if (!t->opened) {
        /* before the 101: the device is refused, or the back end dropped */
        if (is_be)
            fail(t, t->status ? t->status : 502, c->close_reason ? c->close_reason : "owner unreachable");
        else
            fail(t, 499, "peer left");
    } else {
        /* a side lost without a close frame: the other closes 1011 (the
         * owner) or 1001 (the peer) */
        note_end(t, is_be, c->close_code ? c->close_code : 1006, c->close_reason);
        if (other && other->state == ES_OPEN)
            edge_start_close(other, is_be ? 1011 : 1001,
                             is_be ? "tunnel owner connection lost" : "tunnel peer gone");
    }
    maybe_finish(t);
    tunnel_unref(t);
}

void tunnel_close_rcvd(struct edge_conn *c, uint16_t code, const char *reason)
{
    struct tunnel *t = T(c);
    bool is_be = c == t->be;
    struct edge_conn *other = is_be ? t->dev : t->be;
    uint16_t fwd = code == 1005 || code == 1006 ? 1000 : code;

    note_end(t, is_be, code, reason);
    if (other && other->state == ES_OPEN)
        edge_start_close(other, fwd, is_be ? to_device_reason(t, reason) : reason);
}

/* edgemux closed side `c` itself for what it sent (edge_rx: a protocol
 * error, a message too big): the other side is closed now, as when `c` is
 * lost, not once `c`'s close handshake ends. A peer that neither answers
 * that close nor drops TCP would otherwise hold the other side open for
 * close_timeout, its messages dropped meanwhile. */
void tunnel_side_failed(struct edge_conn *c)
{
    struct tunnel *t = T(c);
    bool is_be;
    struct edge_conn *other;

    if (!t || !t->opened || t->ending)
        return;
    is_be = c == t->be;
    other = is_be ? t->dev : t->be;
    note_end(t, is_be, c->close_code ? c->close_code : 1002, c->close_reason);
    if (other && other->state == ES_OPEN)
        edge_start_close(other, is_be ? 1011 : 1001,
                         is_be ? "tunnel owner connection lost" : "tunnel peer gone");
}

/* ---- relaying ---------------------------------------------------------------- */

int tunnel_rx(struct edge_conn *c, bool text, uint8_t *data, size_t len)
{
    struct tunnel *t = T(c);
    bool is_be = c == t->be;
    struct edge_conn *other = is_be ? t->dev : t->be;

    if (!other || other->state != ES_OPEN)
        return 0; /* the other side is closing: dropped, as a proxy would */
    if (edge_send_op(other, text ? 0x1 : 0x2, data, len) != 0) {
        if (c->state == ES_OPEN)
            edge_start_close(c, 1011, "tunnel relay failed");
        return 1;
    }
    t->last_msg = uv_now(t->hub->loop);
    if (is_be) {
        t->bytes_to_peer += len;
        t->msgs_to_peer++;
    } else {
        t->bytes_to_owner += len;
        t->msgs_to_owner++;
    }
    if (other->state == ES_OPEN && other->qbytes > t->hub->s.tunnel_max_queued) {
        /* back-pressure: this side waits for the other to drain */
        c->paused = 1;
        if (is_be)
            t->be_held = true;
        else
            t->dev_held = true;
        edge_watch(c);
        return 1;
    }
    return c->state != ES_OPEN || c->paused;
}

static void resume(struct edge_conn *c)
{
    if (!c || c->state != ES_OPEN || !c->paused)
        return;
    c->paused = 0;
    edge_watch(c);
    edge_ready_add(c); /* what was held is parsed from the loop */
}

void tunnel_drained(struct edge_conn *c)
{
    struct tunnel *t = T(c);
    bool is_be = c == t->be;

    if (c->qbytes > t->hub->s.tunnel_max_queued / 2)
        return;
    if (is_be && t->dev_held) {
        t->dev_held = false;
        resume(t->dev);
    } else if (!is_be && t->be_held && t->gate_open) {
        t->be_held = false;
        resume(t->be);
    }
}

/* ---- timer: connect deadline, the data gate, idleness ----------------------- */

/* The owner must answer within tunnel_connect_timeout, and before the
 * peer's own handshake_timeout drops it without a status. */
static uint64_t connect_limit(const struct edge_hub *hub)
{
    uint64_t lim = hub->s.tunnel_connect_timeout_ms, hs = hub->s.handshake_timeout_ms;

    if (hs > 100 && lim > hs - 100)
        lim = hs - 100;
    return lim;
}

static void timer_cb(uv_timer_t *h)
{
    struct tunnel *t = h->data;
    uint64_t now = uv_now(t->hub->loop);

    if (!t->opened) {
        if (now - t->started >= connect_limit(t->hub))
            fail(t, 504, "owner did not answer in time");
        else
            arm_timer(t);
        return;
    }
    if (!t->gate_open && t->dev && t->dev->state == ES_OPEN) {
        int q = 0;

        /* the 101 has left edgemux and the peer acknowledged it */
        if (!t->dev->qh && (ioctl(t->dev->fd, SIOCOUTQ, &q) != 0 || q == 0) &&
            now >= t->gate_at) {
            t->gate_open = true;
            if (!t->be_held)
                resume(t->be);
        }
    }
    if (t->idle_ms && now - t->last_msg >= t->idle_ms && !t->ending) {
        t->ending = true;
        note_end(t, false, 1001, "tunnel idle");
        close_side(t->dev, 1001, "tunnel idle");
        close_side(t->be, 1001, "tunnel idle");
        return;
    }
    arm_timer(t);
}

static void arm_timer(struct tunnel *t)
{
    uint64_t now = uv_now(t->hub->loop), next = UINT64_MAX;

    if (t->timer_closing)
        return;
    if (!t->opened) {
        uint64_t end = t->started + connect_limit(t->hub);

        next = end > now ? end - now : 0;
    } else {
        if (!t->gate_open)
            next = t->gate_at > now ? t->gate_at - now : GATE_RECHECK_MS;
        if (t->idle_ms) {
            uint64_t end = t->last_msg + t->idle_ms, in = end > now ? end - now : 0;

            /* woken at most every second: last_msg moves without re-arming */
            if (in < 1000 && in < next)
                next = in;
            else if (next > 1000)
                next = 1000;
        }
    }
    if (next != UINT64_MAX)
        uv_timer_start(&t->timer, timer_cb, next, 0);
}

/* ---- the back end: connect, TLS, upgrade ------------------------------------ */

static SSL_CTX *client_ctx(struct edge_hub *hub, const struct emx_connect_spec *sp)
{
    SSL_CTX *ctx;

#define SAME(a_, b_) (((a_) == NULL && (b_) == NULL) || ((a_) && (b_) && !strcmp((a_), (b_))))
    if (hub->tun_ctx && SAME(hub->tun_ca, sp->tls_ca) && SAME(hub->tun_cert, sp->tls_cert) &&
        SAME(hub->tun_key, sp->tls_key) && hub->tun_verify == sp->tls_verify)
        return hub->tun_ctx;
#undef SAME
    ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx)
        return NULL;
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if (sp->tls_verify) {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
        if (sp->tls_ca ? SSL_CTX_load_verify_locations(ctx, sp->tls_ca, NULL) != 1
                       : SSL_CTX_set_default_verify_paths(ctx) != 1)
            goto bad;
    }
    if (sp->tls_cert && sp->tls_key &&
        (SSL_CTX_use_certificate_chain_file(ctx, sp->tls_cert) != 1 ||
         SSL_CTX_use_PrivateKey_file(ctx, sp->tls_key, SSL_FILETYPE_PEM) != 1))
        goto bad;
    tunnel_hub_free(hub);
    hub->tun_ctx = ctx;
    hub->tun_ca = sp->tls_ca ? strdup(sp->tls_ca) : NULL;
    hub->tun_cert = sp->tls_cert ? strdup(sp->tls_cert) : NULL;
    hub->tun_key = sp->tls_key ? strdup(sp->tls_key) : NULL;
    hub->tun_verify = sp->tls_verify;
    return ctx;
bad:
    ERR_clear_error();
    SSL_CTX_free(ctx);
    return NULL;
}

void tunnel_hub_free(struct edge_hub *hub)
{
    if (hub->tun_ctx)
        SSL_CTX_free(hub->tun_ctx);
    free(hub->tun_ca);
    free(hub->tun_cert);
    free(hub->tun_key);
    hub->tun_ctx = NULL;
    hub->tun_ca = hub->tun_cert = hub->tun_key = NULL;
}

/* The owner answered 101: both sides open; the peer's 101 goes alone. */
static void be_upgraded(struct tunnel *t, const uint8_t *extra, size_t extra_len)
{
    struct edge_conn *be = t->be, *dev = t->dev;
    struct edge_rx_params bp = {.text = true, .from_server = true};
    struct edge_rx_params dp = {.text = true};
    char resp[256];
    int n;

    free(be->hs);
    be->hs = NULL;
    be->hs_len = 0;
    if (t->hdrs) {
        /* no other instance is asked now: the request buffer (TUN_REQ_MAX,
         * with the app key) is not kept for the tunnel's life */
        OPENSSL_cleanse(t->hdrs, t->hdrs_len);
        free(t->hdrs);
        t->hdrs = NULL;
    }
    be->state = ES_OPEN;
    edge_list_add(be, L_OPEN);
    edge_rx_init(&be->rx, &bp, t->hub->s.tunnel_max_message);
    be->paused = 1; /* until the gate opens */
    t->be_held = false;
    if (extra_len)
        edge_hold(be, extra, extra_len);
    if (!dev || dev->state != ES_SHAKING) {
        edge_start_close(be, 1001, "tunnel peer gone");
        return;
    }
    n = snprintf(resp, sizeof(resp),
                 "HTTP/1.1 101 Switching Protocols\r\n"
                 "Upgrade: websocket\r\n"
                 "Connection: Upgrade\r\n"
                 "Sec-WebSocket-Accept: %s\r\n\r\n",
                 t->accept);
    dev->state = ES_OPEN;
    dev->t0 = uv_now(t->hub->loop);
    edge_list_add(dev, L_OPEN);
    edge_rx_init(&dev->rx, &dp, t->hub->s.tunnel_max_message);
    dev->paused = 0;
    t->opened = true;
    t->last_msg = t->gate_at = uv_now(t->hub->loop);
    t->gate_at += t->hub->s.tunnel_data_delay_ms;
    if (edge_write(dev, (const uint8_t *)resp, (size_t)n) != 0)
        return; /* gone: tunnel_conn_freed closes the back end */
    if (dev->held)
        edge_ready_add(dev); /* frames that came with the upgrade go first */
    edge_watch(dev);
    edge_watch(be);
    if (t->cb->on_tunnel_open)
        t->cb->on_tunnel_open(t->user, t->cur);
    arm_timer(t);
}

static void next_target(struct tunnel *t);

/* Bytes of the owner's answer to the upgrade. */
static void be_head(struct tunnel *t, const uint8_t *buf, size_t len)
{
    struct edge_conn *be = t->be;
    size_t room = EDGE_HTTP_MAX_HEAD - be->hs_len, take = len < room ? len : room;
    struct edge_http_resp r;
    long hl;

    if (!be->hs && !(be->hs = malloc(EDGE_HTTP_MAX_HEAD))) {
        fail(t, 503, "out of memory");
        return;
    }
    memcpy(be->hs + be->hs_len, buf, take);
    be->hs_len = (uint16_t)(be->hs_len + take);
    hl = edge_http_head_len(be->hs, be->hs_len);
    if (hl < 0) {
        fail(t, 502, "owner's answer too long");
        return;
    }
    if (hl == 0)
        return;
    edge_http_parse_response(be->hs, (size_t)hl, t->key, &r);
    if (!r.upgraded) {
        /* a refusal is passed on (the device cancels at once); anything
         * else the owner said is a bad gateway */
        int st = r.status >= 400 && r.status <= 599 ? r.status : 502;

        if (r.status == 404 && t->cur + 1 < t->ntargets) {
            /* not this instance's tunnel: try the next */
            struct edge_conn *old = t->be;

            t->be = NULL;
            edge_conn_gone(old, 1006, "not the owner");
            next_target(t);
            return;
        }
        fail(t, st, r.status >= 400 ? "refused by the owner" : r.why);
        return;
    }
    {
        size_t extra = be->hs_len - (size_t)hl;
        uint8_t tmp[EDGE_HTTP_MAX_HEAD];

        memcpy(tmp, be->hs + hl, extra);
        /* bytes past the buffered head (rare: a read larger than the head) */
        be_upgraded(t, tmp, extra);
        if (take < len && be->state == ES_OPEN)
            edge_hold(be, buf + take, len - take);
    }
}

static void be_send_request(struct tunnel *t)
{
    struct edge_conn *be = t->be;
    bool v6 = strchr(t->host, ':') != NULL;
    size_t cap = t->hdrs_len + strlen(t->path) + strlen(t->host) + 64;
    char *req = malloc(cap);
    int n;

    be->connecting = 0;
    if (!req) {
        fail(t, 503, "out of memory");
        return;
    }
    n = snprintf(req, cap, "GET %s HTTP/1.1\r\nHost: %s%s%s:%u\r\n%s", t->path, v6 ? "[" : "",
                 t->host, v6 ? "]" : "", (unsigned)t->port, t->hdrs);
    if (n > 0 && (size_t)n < cap && edge_write(be, (const uint8_t *)req, (size_t)n) == 0)
        edge_watch(be);
    OPENSSL_cleanse(req, cap);
    free(req);
}

/* TLS handshake step: 1 done, 0 wait, -1 failed. */
static int be_tls_step(struct edge_conn *be)
{
    int rc, e;

    ERR_clear_error();
    rc = SSL_do_handshake(be->ssl);
    if (rc == 1)
        return 1;
    e = SSL_get_error(be->ssl, rc);
    if (e == SSL_ERROR_WANT_READ) {
        be->ssl_want_write = 0;
        return 0;
    }
    if (e == SSL_ERROR_WANT_WRITE) {
        be->ssl_want_write = 1;
        return 0;
    }
    return -1;
}

void tunnel_be_poll(struct edge_conn *be, int status, int events)
{
    struct tunnel *t = T(be);

    if (status < 0) {
        fail(t, 502, "owner unreachable");
        return;
    }
    if (be->connecting) {
        if (!be->ssl) {
            int err = 0;
            socklen_t el = sizeof(err);

            if (!(events & UV_WRITABLE))
                return;
            if (getsockopt(be->fd, SOL_SOCKET, SO_ERROR, &err, &el) != 0 || err) {
                fail(t, 502, "owner unreachable");
                return;
            }
            if (t->tls) {
                be->ssl = t->hub->tun_ctx ? SSL_new(t->hub->tun_ctx) : NULL;
                if (!be->ssl || SSL_set_fd(be->ssl, be->fd) != 1) {
                    fail(t, 502, "TLS setup failed");
                    return;
                }
                SSL_set_connect_state(be->ssl);
                if (inet_pton(AF_INET, t->host, &(struct in_addr){0}) != 1 &&
                    inet_pton(AF_INET6, t->host, &(struct in6_addr){0}) != 1)
                    SSL_set_tlsext_host_name(be->ssl, t->host);
                if (t->hub->tun_verify) {
                    X509_VERIFY_PARAM *vp = SSL_get0_param(be->ssl);

                    if (X509_VERIFY_PARAM_set1_ip_asc(vp, t->host) != 1)
                        SSL_set1_host(be->ssl, t->host);
                }
            }
        }
        if (be->ssl) {
            int st = be_tls_step(be);

            if (st < 0) {
                fail(t, 502, "TLS handshake with the owner failed");
                return;
            }
            if (st == 0) {
                edge_watch(be);
                return;
            }
        }
        be_send_request(t);
        return;
    }
    if (events & UV_WRITABLE) {
        be->ssl_want_write = 0;
        if (edge_drain(be))
            return; /* gone */
    }
    if (events & UV_READABLE) {
        uint8_t *buf = t->hub->rbuf;
        long n = edge_sock_read(be, buf, RBUF_SIZE);

        if (n == -EAGAIN) {
            edge_watch(be);
            return;
        }
        if (n <= 0) {
            fail(t, 502, "owner closed the connection");
            return;
        }
        be_head(t, buf, (size_t)n);
        return;
    }
    edge_watch(be);
}

static int be_connect(struct tunnel *t, const struct sockaddr *sa, socklen_t salen)
{
    struct edge_hub *hub = t->hub;
    struct edge_conn *be;
    int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

    if (fd < 0)
        return -errno;
    if (connect(fd, sa, salen) != 0 && errno != EINPROGRESS) {
        int e = errno;

        close(fd);
        return -e;
    }
    be = calloc(1, sizeof(*be));
    if (!be) {
        close(fd);
        return -ENOMEM;
    }
    be->kind = WS_KIND_EDGE;
    be->hub = hub;
    be->fd = fd;
    be->tunnel = 1;
    be->client = 1;
    be->connecting = 1;
    be->user = t;
    be->max_frame = MAX_FRAME_CAP;
    be->state = ES_SHAKING;
    be->t0 = uv_now(hub->loop);
    be->events = 0;
    edge_tune_socket(&hub->s, fd);
    if (uv_poll_init(hub->loop, &be->poll, fd) != 0) {
        close(fd);
        free(be);
        return -EIO;
    }
    be->poll.data = be;
    hub->handles_open++;
    hub->socks++;
    t->be = be;
    t->refs++;
    edge_list_add(be, L_SHAKING);
    edge_watch(be);
    return 0;
}

static void resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    struct tunnel *t = req->data;

    t->resolving = false;
    if (status == 0 && res && !t->status) {
        int rc = be_connect(t, res->ai_addr, res->ai_addrlen);

        if (rc)
            fail(t, 502, "cannot connect to the owner");
    } else if (!t->status) {
        fail(t, 502, "owner's name does not resolve");
    }
    if (res)
        uv_freeaddrinfo(res);
    maybe_finish(t);
    tunnel_unref(t);
}

/* Resolve and connect to targets[cur]. */
static void start_target(struct tunnel *t)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    char port[8];

    t->host = t->targets[t->cur].host;
    t->port = t->targets[t->cur].port;
    t->tls = t->targets[t->cur].tls;
    LOG(t->hub, EMX_LOG_DEBUG, "ws: tunnel back end: connecting to %s:%u", t->host,
        (unsigned)t->port);
    snprintf(port, sizeof(port), "%u", (unsigned)t->port);
    t->gai.data = t;
    t->refs++;
    t->resolving = true;
    if (uv_getaddrinfo(t->hub->loop, &t->gai, resolved, t->host, port, &hints) != 0) {
        t->resolving = false;
        t->refs--;
        fail(t, 502, "owner's name does not resolve");
    }
}

static void next_target(struct tunnel *t)
{
    t->cur++;
    start_target(t);
}

/* ---- the peer's upgrade ------------------------------------------------------- */

static bool listed(const struct emx_tunnel_route *rt, const char *name)
{
    for (size_t i = 0; i < rt->copy_header_count; i++)
        if (rt->copy_headers[i] && !strcasecmp(rt->copy_headers[i], name))
            return true;
    return false;
}

/* The back end's upgrade request. Returns its length, or 0. */
static size_t build_request(struct tunnel *t, const struct emx_tunnel_route *rt,
                            const struct edge_http_req *r, char *out, size_t cap)
{
    uint8_t raw[16];
    size_t n = 0;
    int w;

#define PUT(...)                                                                                   \
    do {                                                                                           \
        w = snprintf(out + n, cap - n, __VA_ARGS__);                                               \
        if (w < 0 || (size_t)w >= cap - n)                                                         \
            return 0;                                                                              \
        n += (size_t)w;                                                                            \
    } while (0)

    if (RAND_bytes(raw, sizeof(raw)) != 1)
        return 0;
    EVP_EncodeBlock((unsigned char *)t->key, raw, sizeof(raw));
    PUT("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
        "Sec-WebSocket-Version: 13\r\n",
        t->key);
    if (r->has_app_key && listed(rt, "appKey"))
        PUT("appKey: %s\r\n", r->app_key);
    if (r->has_cookie && listed(rt, "Cookie"))
        PUT("Cookie: %s\r\n", r->cookie);
    if (r->max_frame)
        PUT("Max-Frame-Size: %" PRIu32 "\r\n", r->max_frame);
    if (r->has_user_agent)
        PUT("User-Agent: %s\r\n", r->user_agent);
    for (size_t i = 0; i < rt->target.header_count; i++)
        if (rt->target.headers[i] && !strpbrk(rt->target.headers[i], "\r\n"))
            PUT("%s\r\n", rt->target.headers[i]);
    PUT("\r\n");
#undef PUT
    return n;
}

void tunnel_begin(struct edge_conn *dev, const struct edge_http_req *r)
{
    struct edge_listener *l = dev->lst;
    struct edge_hub *hub = dev->hub;
    struct emx_tunnel_request req = {0};
    struct emx_tunnel_route rt = {0};
    struct tunnel *t;
    char peer[64];
    int status = 404;
    void *user;
    long hl = dev->hs ? edge_http_head_len(dev->hs, dev->hs_len) : 0;

    /* Frames sent with the upgrade (RFC 6455 §4.1 has a client wait for
     * the 101, but one that does not must not lose them: the stream would
     * go out of step) are kept until the owner has answered. Only what the
     * head buffer took is at hand; a full one may have left more unseen,
     * so that peer is refused. */
    if (hl > 0 && (size_t)hl < dev->hs_len) {
        if (dev->hs_len >= EDGE_HTTP_MAX_HEAD) {
            edge_refuse_http(dev, 400, "data with the upgrade over 8 KiB");
            return;
        }
        edge_hold(dev, (const uint8_t *)dev->hs + hl, dev->hs_len - (size_t)hl);
    }
    free(dev->hs);
    dev->hs = NULL;
    dev->hs_len = 0;
    ws_peer_string(dev->fd, peer, sizeof(peer));
    req.side = r->tunnel == EDGE_TUNNEL_CLIENT ? EMX_TUNNEL_SIDE_CLIENT : EMX_TUNNEL_SIDE_SERVER;
    req.tid = r->tid;
    req.peer = peer;
    req.forwarded_for = r->has_xff ? r->xff : NULL;
    req.max_frame_size = r->max_frame;
    req.tls = dev->ssl != NULL;
    t = calloc(1, sizeof(*t));
    if (!t) {
        edge_refuse_http(dev, 503, "out of memory");
        return;
    }
    user = l->cb.on_tunnel(l->user, C(dev), &req, &rt, &status);
    if (!user) {
        free(t);
        edge_refuse_http(dev, status >= 400 && status <= 599 ? status : 404, "tunnel refused");
        return;
    }
    t->hub = hub;
    t->cb = &l->cb;
    t->user = user;
    t->side = r->tunnel;
    t->dev = dev;
    t->refs = 2; /* dev, timer */
    t->started = uv_now(hub->loop);
    t->idle_ms = rt.idle_timeout_ms;
    memcpy(t->accept, r->accept, sizeof(t->accept));
    hub->ntunnels++;
    dev->tunnel = 1;
    dev->user = t;
    dev->paused = 1; /* nothing is read until the owner has answered */
    /* handshake_timeout counts again from the upgrade: the owner's answer
     * gets the whole of it (at the list's tail: it stays ordered by t0) */
    dev->t0 = t->started;
    edge_list_add(dev, L_SHAKING);
    uv_timer_init(hub->loop, &t->timer);
    t->timer.data = t;
    edge_watch(dev);
    arm_timer(t);
    t->ntargets = 1 + (rt.alternates ? rt.alternate_count : 0);
    t->targets = calloc(t->ntargets, sizeof(*t->targets));
    t->path = rt.target.path ? strdup(rt.target.path) : NULL;
    t->hdrs = malloc(TUN_REQ_MAX);
    if (!t->targets || !t->path || !t->hdrs) {
        t->ntargets = 0;
        fail(t, 503, "out of memory");
        return;
    }
    for (size_t i = 0; i < t->ntargets; i++) {
        const struct emx_connect_spec *sp = i ? &rt.alternates[i - 1] : &rt.target;

        t->targets[i].host = sp->host ? strdup(sp->host) : NULL;
        t->targets[i].port = sp->port;
        t->targets[i].tls = sp->tls;
        if (!t->targets[i].host) {
            fail(t, 503, "out of memory");
            return;
        }
        if (sp->tls && !client_ctx(hub, &rt.target)) {
            fail(t, 502, "TLS context for the owner failed");
            return;
        }
    }
    t->hdrs_len = build_request(t, &rt, r, t->hdrs, TUN_REQ_MAX);
    if (!t->hdrs_len) {
        fail(t, 431, "tunnel request too long");
        return;
    }
    t->cur = 0;
    start_target(t);
    LOG(hub, EMX_LOG_DEBUG, "ws: tunnel %s from %s: %zu instance(s) to ask", r->tid, peer,
        t->ntargets);
}
