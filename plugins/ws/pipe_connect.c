/* Connecting pipes: client vhosts per TLS setting, upgrade headers, host
 * names resolved off the loop (uv_getaddrinfo) and dialled by address. */
#include "ws_int.h"

/* ---- connect -------------------------------------------------------------- */

static bool str_eq(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static struct lws_vhost *client_vhost(struct ws_instance *inst, const struct emx_connect_spec *s)
{
    struct lws_context_creation_info info;
    struct ws_client_vhost *v;
    const char *ca = s->tls ? s->tls_ca : NULL;
    const char *cert = s->tls ? s->tls_cert : NULL;
    const char *key = s->tls ? s->tls_key : NULL;
    char name[32];

    for (v = inst->cvhosts; v; v = v->next)
        if (str_eq(v->ca, ca) && str_eq(v->cert, cert) && str_eq(v->key, key))
            return v->vh;
    v = ws_zalloc(sizeof(*v));
    if (!v)
        return NULL;
    v->ca = ws_strdup(ca);
    v->cert = ws_strdup(cert);
    v->key = ws_strdup(key);
    if ((ca && !v->ca) || (cert && !v->cert) || (key && !v->key))
        goto fail;
    snprintf(name, sizeof(name), "pipe-%u", ++inst->vhost_seq);
    memset(&info, 0, sizeof(info));
    info.vhost_name = name;
    info.port = CONTEXT_PORT_NO_LISTEN;
    info.protocols = inst->pipe_protocols;
    info.extensions = inst->cfg.pipe_deflate ? inst->pipe_exts : NULL;
    info.retry_and_idle_policy = &inst->pipe_retry;
    info.timeout_secs = secs_of(inst->cfg.handshake_timeout);
    info.connect_timeout_secs = secs_of(inst->cfg.handshake_timeout);
    info.options = LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
    info.client_ssl_ca_filepath = v->ca;
    info.client_ssl_cert_filepath = v->cert;
    info.client_ssl_private_key_filepath = v->key;
    v->vh = lws_create_vhost(inst->ctx, &info);
    if (!v->vh)
        goto fail;
    v->next = inst->cvhosts;
    inst->cvhosts = v;
    return v->vh;
fail:
    free(v->ca);
    free(v->cert);
    free(v->key);
    free(v);
    return NULL;
}

static int build_headers(struct emx_conn *c, const struct emx_connect_spec *s)
{
    size_t total = 0, i;
    char *p;

    for (i = 0; i < s->header_count; i++) {
        const char *h = s->headers[i];

        if (!h || strpbrk(h, "\r\n") || !strchr(h, ':'))
            return -EINVAL;
        total += strlen(h) + 2;
    }
    if (!total)
        return 0;
    c->pp->hdrs = malloc(total + 1);
    if (!c->pp->hdrs)
        return -ENOMEM;
    p = c->pp->hdrs;
    for (i = 0; i < s->header_count; i++) {
        size_t n = strlen(s->headers[i]);

        memcpy(p, s->headers[i], n);
        p[n] = '\r';
        p[n + 1] = '\n';
        p += n + 2;
    }
    *p = '\0';
    c->pp->hdrs_len = total;
    return 0;
}

/* ABI 1.1: platform.ping_interval, idle_read_timeout and connect_timeout
 * from the core, for options left at their defaults. The pipe timer ticks
 * at least as often as the shortest of them. */
static void pipe_settings_from_core(struct ws_instance *inst, const struct emx_connect_spec *spec)
{
    if (inst->core_ping && spec->ping_interval_ms)
        inst->cfg.ping_interval = spec->ping_interval_ms;
    if (inst->core_idle_read && spec->idle_read_timeout_ms)
        inst->cfg.idle_read_timeout = spec->idle_read_timeout_ms;
    if (inst->core_handshake && spec->connect_timeout_ms)
        inst->cfg.handshake_timeout = spec->connect_timeout_ms;
    inst->pipe_retry.secs_since_valid_ping = (uint16_t)secs_of(inst->cfg.ping_interval);
    inst->pipe_retry.secs_since_valid_hangup = (uint16_t)secs_of(inst->cfg.idle_read_timeout);
    uint64_t tick = 1000;
    if (inst->cfg.ping_interval && inst->cfg.ping_interval < tick)
        tick = inst->cfg.ping_interval;
    if (inst->cfg.idle_read_timeout && inst->cfg.idle_read_timeout < tick)
        tick = inst->cfg.idle_read_timeout;
    if (inst->pipe_tick && tick < inst->pipe_tick &&
        uv_timer_start(&inst->pipe_timer, pipe_timer_cb, tick, tick) == 0)
        inst->pipe_tick = tick;
}

/* Hand a connect to lws by numeric address. The host name stays in ci.host:
 * lws 4.1 sends it as Host and takes SNI and the certificate's name check
 * from it (port cut off), never from ci.address. */
static struct lws *pipe_dial(struct emx_conn *c, const char *addr)
{
    struct ws_instance *inst = c->inst;
    struct lws_client_connect_info ci;

    memset(&ci, 0, sizeof(ci));
    ci.context = inst->ctx;
    ci.vhost = c->pp->vh;
    ci.address = addr;
    ci.port = c->pp->port;
    ci.path = c->pp->path;
    ci.host = c->pp->hosthdr;
    ci.origin = c->pp->hosthdr;
    ci.userdata = c;
    ci.local_protocol_name = "emx-pipe";
    ci.retry_and_idle_policy = &inst->pipe_retry;
    if (c->raw) {
        ci.method = "RAW";
        ci.retry_and_idle_policy = &inst->raw_retry;
    }
    ci.ssl_connection = c->pp->ssl_flags;
    return lws_client_connect_via_info(&ci);
}

void resolve_detach(struct emx_conn *c)
{
    struct ws_resolve *r = c->pp->res;
    struct emx_conn **w;

    for (w = &r->waiters; *w; w = &(*w)->pp->rnext)
        if (*w == c) {
            *w = c->pp->rnext;
            break;
        }
    c->pp->res = NULL;
    c->pp->rnext = NULL;
}

/* First IPv4 address, else first IPv6 one, as a numeric string. */
static bool resolve_pick(const struct addrinfo *ai, char *out, size_t outlen)
{
    for (int fam = 0; fam < 2; fam++)
        for (const struct addrinfo *a = ai; a; a = a->ai_next) {
            const void *src;

            if (fam == 0 && a->ai_family == AF_INET)
                src = &((const struct sockaddr_in *)(const void *)a->ai_addr)->sin_addr;
            else if (fam == 1 && a->ai_family == AF_INET6)
                src = &((const struct sockaddr_in6 *)(const void *)a->ai_addr)->sin6_addr;
            else
                continue;
            if (inet_ntop(a->ai_family, src, out, (socklen_t)outlen))
                return true;
        }
    return false;
}

/* A failed lookup is logged once a minute per name, not on every retry. */
static void resolve_log(struct ws_instance *inst, const char *host, const char *err)
{
    uint64_t now = uv_now(inst->loop);

    if (!strncmp(inst->res_failed, host, sizeof(inst->res_failed) - 1) &&
        now - inst->res_failed_logged < 60000)
        return;
    snprintf(inst->res_failed, sizeof(inst->res_failed), "%s", host);
    inst->res_failed_logged = now;
    LOG(inst, EMX_LOG_WARN, "ws: cannot resolve %s: %s", host, err);
}

static void resolve_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *ai)
{
    struct ws_resolve *r = req->data;
    struct ws_instance *inst = r->inst;
    char addr[INET6_ADDRSTRLEN], why[WS_REASON_MAX + 1];
    struct ws_resolve **p;

    for (p = &inst->resolves; *p; p = &(*p)->next)
        if (*p == r) {
            *p = r->next;
            break;
        }
    addr[0] = '\0';
    if (status == 0 && !resolve_pick(ai, addr, sizeof(addr)))
        status = UV_EAI_NODATA;
    if (status && status != UV_ECANCELED) {
        resolve_log(inst, r->host, uv_strerror(status));
        snprintf(why, sizeof(why), "cannot resolve %s: %s", r->host, uv_strerror(status));
    }
    while (r->waiters) {
        struct emx_conn *c = r->waiters;
        struct lws *wsi;

        resolve_detach(c);
        if (inst->state != INST_RUNNING) {
            conn_gone(c, 1001, "shutdown");
            continue;
        }
        if (status) {
            conn_gone(c, 1006, why);
            continue;
        }
        wsi = pipe_dial(c, addr);
        if (c->state == CONN_GONE)
            continue; /* failed inside the call; on_close is on its way */
        if (!wsi)
            conn_gone(c, 1006, "connect failed");
        else
            c->wsi = wsi;
    }
    if (ai)
        uv_freeaddrinfo(ai);
    free(r);
}

/* Look the host up in libuv's thread pool; one lookup per name at a time,
 * so a resolver that does not answer holds at most one pool thread per
 * name. The connect gives up after handshake_timeout (pipe_timer_cb). */
static int resolve_start(struct emx_conn *c, const char *host)
{
    struct ws_instance *inst = c->inst;
    struct ws_resolve *r;
    uint64_t limit = inst->cfg.handshake_timeout ? inst->cfg.handshake_timeout : DEF_HANDSHAKE_MS;

    for (r = inst->resolves; r; r = r->next)
        if (!strcmp(r->host, host))
            break;
    if (!r) {
        struct addrinfo hints;
        size_t n = strlen(host) + 1;
        int rc;

        r = calloc(1, sizeof(*r) + n);
        if (!r)
            return -ENOMEM;
        memcpy(r->host, host, n);
        r->inst = inst;
        r->req.data = r;
        memset(&hints, 0, sizeof(hints));
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        rc = uv_getaddrinfo(inst->loop, &r->req, resolve_cb, host, NULL, &hints);
        if (rc) {
            free(r);
            return rc;
        }
        r->next = inst->resolves;
        inst->resolves = r;
    }
    c->pp->res = r;
    c->pp->rnext = r->waiters;
    r->waiters = c;
    c->pp->res_deadline = uv_now(inst->loop) + limit;
    return 0;
}

/* Connects still waiting for their lookup past their deadline. */
void resolve_expire(struct ws_instance *inst, uint64_t now)
{
    for (struct ws_resolve *r = inst->resolves; r; r = r->next) {
        struct emx_conn *c = r->waiters, *n;

        for (; c; c = n) {
            n = c->pp->rnext;
            if (now >= c->pp->res_deadline) {
                char why[WS_REASON_MAX + 1];

                snprintf(why, sizeof(why), "cannot resolve %s: no answer within %us", r->host,
                         secs_of(inst->cfg.handshake_timeout));
                conn_gone(c, 1006, why);
            }
        }
    }
}

static bool is_numeric_host(const char *host)
{
    struct in6_addr a6;
    struct in_addr a4;

    return inet_pton(AF_INET, host, &a4) == 1 || inet_pton(AF_INET6, host, &a6) == 1;
}

int ws_connect(void *instance, const struct emx_connect_spec *spec,
               const struct emx_conn_callbacks *cb, void *user, struct emx_conn **out)
{
    struct ws_instance *inst = instance;
    struct lws_vhost *vh;
    struct emx_conn *c;
    struct lws *wsi;
    char hosthdr[300];
    int rc;

    if (!inst || !spec || !cb || !out || !spec->host || !spec->port || !cb->on_message ||
        !cb->on_close || (spec->header_count && !spec->headers))
        return -EINVAL;
    if (inst->state != INST_RUNNING)
        return -ESHUTDOWN;
    pipe_settings_from_core(inst, spec);
    vh = client_vhost(inst, spec);
    if (!vh) {
        LOG(inst, EMX_LOG_ERROR, "ws: cannot set up a client context (TLS files?) for %s:%u",
            spec->host, (unsigned)spec->port);
        return -EINVAL;
    }
    c = conn_new(inst);
    if (c)
        c->pp = ws_zalloc(sizeof(*c->pp));
    if (!c || !c->pp) {
        if (c)
            conn_free(c);
        return -ENOMEM;
    }
    rc = build_headers(c, spec);
    if (rc) {
        conn_free(c);
        return rc;
    }
    c->cb = cb;
    c->user = user;
    c->max_msg = spec->max_message_size ? spec->max_message_size : SIZE_MAX;
    c->pp->sndbuf = spec->sndbuf;
    c->state = CONN_CONNECTING;
    snprintf(hosthdr, sizeof(hosthdr), "%s:%u", spec->host, (unsigned)spec->port);
    /* Without deflate a plain pipe speaks WebSocket itself over a raw
     * socket. lws 4.1.6 drops a raw client with TLS without a callback, so
     * wss pipes stay on lws's WebSocket client. */
    c->raw = !inst->cfg.pipe_deflate && !spec->tls;
    if (c->raw) {
        rc = raw_build_request(c, spec->path ? spec->path : "/", hosthdr);
        if (rc) {
            conn_free(c);
            return rc;
        }
    }

    c->pp->vh = vh;
    c->pp->port = spec->port;
    c->pp->path = ws_strdup(spec->path ? spec->path : "/");
    c->pp->hosthdr = ws_strdup(hosthdr);
    if (!c->pp->path || !c->pp->hosthdr) {
        conn_free(c);
        return -ENOMEM;
    }
    if (spec->tls) {
        c->pp->ssl_flags = LCCSCF_USE_SSL;
        if (!spec->tls_verify)
            c->pp->ssl_flags |= LCCSCF_ALLOW_SELFSIGNED | LCCSCF_SKIP_SERVER_CERT_HOSTNAME_CHECK |
                                LCCSCF_ALLOW_EXPIRED | LCCSCF_ALLOW_INSECURE;
    }
    if (!is_numeric_host(spec->host)) {
        /* lws 4.1.6 (no LWS_WITH_SYS_ASYNC_DNS) would block the loop on the
         * resolver: look the name up first, dial the address after */
        rc = resolve_start(c, spec->host);
        if (rc) {
            conn_free(c);
            return rc;
        }
        conn_link(inst, c);
        c->reported = true;
        *out = c;
        return 0;
    }
    wsi = pipe_dial(c, spec->host);
    if (c->state == CONN_GONE) {
        /* failed inside the call: report through on_close like any failure */
        c->reported = true;
        c->reap_next = NULL;
        if (inst->reap_tail)
            inst->reap_tail->reap_next = c;
        else
            inst->reap_head = c;
        inst->reap_tail = c;
        reap_arm(inst);
        *out = c;
        return 0;
    }
    if (!wsi) {
        conn_free(c);
        return -ECONNREFUSED;
    }
    c->wsi = wsi;
    conn_link(inst, c);
    c->reported = true;
    *out = c;
    return 0;
}
