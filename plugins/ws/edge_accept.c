/* Edge listeners: listening sockets, accepting within the open-file and
 * handshake-pool budgets (the oldest silent socket of a full pool goes
 * first), TLS contexts and their reload. */
#include "edge_int.h"

/* ---- accepting ------------------------------------------------------------ */

/* How many worker loops share the process's open files (the host says so
 * from edgemux 0.x with server.workers; older cores run one). */
unsigned edge_workers(const struct edge_hub *hub)
{
    const struct emx_host *h = hub->host;

    return h && EMX_HOST_HAS(h, workers) && h->workers > 1 ? h->workers : 1;
}

/* The open-file limit minus fd_reserve is the process's budget for edge
 * sockets; with several worker loops each hub takes an even share of it
 * (the kernel spreads connections evenly over SO_REUSEPORT listeners), so
 * the process as a whole never passes it. */
unsigned edge_socket_cap(struct edge_hub *hub)
{
    struct rlimit rl;
    uint64_t reserve = hub->s.fd_reserve, cur, cap;
    unsigned n = edge_workers(hub);

    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY)
        return UINT_MAX;
    cur = (uint64_t)rl.rlim_cur;
    if (cur <= reserve) {
        LOG(hub, EMX_LOG_WARN,
            "ws: open-file limit %" PRIu64 " is not above fd_reserve %" PRIu64
            ": edges capped at %" PRIu64,
            cur, reserve, cur / 2);
        cap = cur / 2;
    } else {
        cap = cur - reserve;
    }
    cap /= n;
    if (cap == 0)
        cap = 1;
    return cap > UINT_MAX ? UINT_MAX : (unsigned)cap;
}

/* Room for one more socket in handshake: a full pool drops its oldest once
 * it has had handshake_evict to speak (a device sends its request at once;
 * a socket that has not is the cheapest to lose). */
static bool pool_room(struct edge_hub *hub)
{
    const struct edge_conn *old = hub->shaking.head;

    return hub->shaking.n < hub->s.handshake_pool ||
           (old && uv_now(hub->loop) - old->t0 >= hub->s.handshake_evict_ms);
}

static bool shake_room(struct edge_hub *hub)
{
    if (hub->shaking.n < hub->s.handshake_pool)
        return true;
    if (!pool_room(hub))
        return false;
    edge_conn_gone(hub->shaking.head, 1006, "handshake pool full");
    return true;
}

/* A worker at its share of the file budget still accepts while another
 * worker has room: each socket it takes then goes there (hand_off). */
static bool accept_allowed(struct edge_hub *hub)
{
    const struct emx_host *h = hub->host;

    if (!hub->running || hub->accept_paused)
        return false;
    return hub->socks < hub->sock_cap ||
           (hub->balance && h->edge_balance(h, hub->sock_cap) != h->worker);
}

static void accept_cb(uv_poll_t *h, int status, int events);

void edge_accept_modulate(struct edge_hub *hub)
{
    for (struct edge_listener *l = hub->listeners; l; l = l->next) {
        bool want;

        if (l->closed || !l->poll)
            continue;
        /* a full pool is polled again as soon as a handshake ends or its
         * oldest member may be dropped (the hub's tick looks) */
        want = accept_allowed(hub) && pool_room(hub);
        if (want == l->polling)
            continue;
        if (!want)
            uv_poll_stop(l->poll);
        else if (uv_poll_start(l->poll, UV_READABLE, accept_cb) != 0)
            continue;
        l->polling = want;
    }
}

static void accept_retry_cb(uv_timer_t *t)
{
    struct edge_hub *hub = t->data;

    hub->accept_paused = false;
    edge_accept_modulate(hub);
}

static void accept_pause(struct edge_hub *hub, int err, uint64_t ms)
{
    uint64_t now = uv_now(hub->loop);

    if (err && (!hub->accept_err_logged || now - hub->accept_err_logged >= 10000)) {
        hub->accept_err_logged = now;
        LOG(hub, EMX_LOG_WARN, "ws: accept failed (%s) with %u edge sockets open: pausing %d ms",
            strerror(err), hub->socks, (int)ms);
    }
    hub->accept_paused = true;
    uv_timer_start(&hub->accept_retry, accept_retry_cb, ms, 0);
    edge_accept_modulate(hub);
}

static void accept_one(struct edge_listener *l, int fd)
{
    struct edge_hub *hub = l->hub;
    struct edge_conn *c = calloc(1, sizeof(*c));

    if (!c) {
        close(fd);
        return;
    }
    c->kind = WS_KIND_EDGE;
    c->state = ES_SHAKING;
    c->fd = fd;
    c->hub = hub;
    c->lst = l;
    c->t0 = uv_now(hub->loop);
    if (uv_poll_init(hub->loop, &c->poll, fd) != 0) {
        close(fd);
        free(c);
        return;
    }
    c->poll.data = c;
    hub->handles_open++;
    hub->socks++;
    if (hub->balance)
        hub->host->edge_count(hub->host, 1);
    edge_list_add(c, L_SHAKING);
    if (l->ssl) {
        c->ssl = SSL_new(l->ssl);
        if (!c->ssl || !SSL_set_fd(c->ssl, fd)) {
            edge_conn_gone(c, 1011, "TLS setup failed");
            return;
        }
        SSL_set_accept_state(c->ssl);
    }
    /* a device sends its request right after connecting: often it is here */
    edge_conn_read(c);
    if (c->state != ES_GONE)
        edge_watch(c);
}

/* With several workers: a socket this worker should not serve (it holds
 * clearly more than another, host.h) goes to that worker before a byte of
 * it is read. Returns true when it went. */
static bool hand_off(struct edge_hub *hub, int fd)
{
    const struct emx_host *h = hub->host;
    uint32_t to;

    if (!hub->balance)
        return false;
    to = h->edge_balance(h, hub->sock_cap);
    return to != h->worker && h->edge_hand_off(h, to, fd) == 0;
}

/* A socket another worker accepted and handed here: served as if this
 * listener had accepted it, within this worker's own limits. */
int edge_adopt(struct emx_listener *listener, int fd)
{
    struct edge_listener *l = (struct edge_listener *)(void *)listener;
    struct edge_hub *hub;

    if (!l || fd < 0) {
        if (fd >= 0)
            close(fd);
        return -EINVAL;
    }
    hub = l->hub;
    if (l->closed || !hub->running || hub->socks >= hub->sock_cap || !shake_room(hub)) {
        LOG(hub, EMX_LOG_DEBUG, "ws: no room for a socket handed over by another worker (%u open)",
            hub->socks);
        close(fd);
        return -EBUSY;
    }
    accept_one(l, fd);
    edge_accept_modulate(hub);
    return 0;
}

static void accept_cb(uv_poll_t *h, int status, int events)
{
    struct edge_listener *l = h->data;
    struct edge_hub *hub = l->hub;

    (void)events;
    if (status < 0) {
        accept_pause(hub, -status, ACCEPT_PAUSE_MS);
        return;
    }
    for (int n = 0; n < ACCEPT_BATCH && !l->closed && accept_allowed(hub); n++) {
        int fd;

        if (!shake_room(hub))
            break;
        fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            /* the peer gave up while it waited in the backlog */
            if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO || errno == EPERM)
                continue;
            accept_pause(hub, errno, ACCEPT_PAUSE_MS);
            break;
        }
        edge_tune_socket(&hub->s, fd);
        if (hand_off(hub, fd))
            continue;
        if (hub->socks >= hub->sock_cap) {
            /* accepted for a worker with room, which filled up meanwhile */
            close(fd);
            continue;
        }
        accept_one(l, fd);
    }
    edge_accept_modulate(hub);
}

/* ---- listeners ------------------------------------------------------------ */

static void listener_poll_closed(uv_handle_t *h)
{
    struct edge_listener *l = h->data;

    if (l->fd >= 0)
        close(l->fd);
    l->fd = -1;
    l->hub->handles_open--;
    free(h);
}

void edge_listener_stop(struct edge_listener *l)
{
    l->polling = false;
    if (l->poll) {
        uv_close((uv_handle_t *)l->poll, listener_poll_closed);
        l->poll = NULL;
    } else if (l->fd >= 0) {
        close(l->fd);
        l->fd = -1;
    }
}

static int parse_address(const char *addr, char *host, size_t hostlen, int *port)
{
    const char *colon, *h = addr;
    size_t hl;
    char *end;
    long p;

    if (!addr)
        return -EINVAL;
    if (addr[0] == '[') {
        const char *rb = strchr(addr, ']');

        if (!rb || rb[1] != ':')
            return -EINVAL;
        h = addr + 1;
        hl = (size_t)(rb - h);
        colon = rb + 1;
    } else {
        colon = strrchr(addr, ':');
        if (!colon)
            return -EINVAL;
        hl = (size_t)(colon - addr);
    }
    if (hl >= hostlen)
        return -EINVAL;
    memcpy(host, h, hl);
    host[hl] = '\0';
    p = strtol(colon + 1, &end, 10);
    if (*end || end == colon + 1 || p < 1 || p > 65535)
        return -EINVAL;
    *port = (int)p;
    return 0;
}

/* Host "" "*" or "::" is every address, IPv6 and IPv4 (IPv4 alone where
 * there is no IPv6); anything else as getaddrinfo reads it. */
static int listen_socket(struct edge_hub *hub, const char *host, int port, int *out)
{
    struct addrinfo hints, *res = NULL, *ai;
    bool any6 = !host[0] || !strcmp(host, "*") || !strcmp(host, "::");
    char service[8];
    int rc, err = EADDRNOTAVAIL;

    memset(&hints, 0, sizeof(hints));
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    hints.ai_family = any6 ? AF_INET6 : AF_UNSPEC;
    snprintf(service, sizeof(service), "%d", port);
    rc = getaddrinfo(any6 ? NULL : host, service, &hints, &res);
    if (rc != 0 && any6) {
        hints.ai_family = AF_INET;
        rc = getaddrinfo(NULL, service, &hints, &res);
    }
    if (rc != 0) {
        LOG(hub, EMX_LOG_ERROR, "ws: cannot resolve listen address \"%s\": %s", host,
            gai_strerror(rc));
        return -EINVAL;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

        if (fd < 0) {
            err = errno;
            continue;
        }
        ws_set_int_opt(fd, SOL_SOCKET, SO_REUSEADDR, 1);
        /* one listener per worker loop on the same port: the kernel
         * spreads connections over them (only then, so a second process
         * on a taken port still fails) */
        if (edge_workers(hub) > 1)
            ws_set_int_opt(fd, SOL_SOCKET, SO_REUSEPORT, 1);
        if (ai->ai_family == AF_INET6 && any6)
            ws_set_int_opt(fd, IPPROTO_IPV6, IPV6_V6ONLY, 0);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, hub->s.listen_backlog) == 0) {
            freeaddrinfo(res);
            *out = fd;
            return 0;
        }
        err = errno;
        close(fd);
    }
    freeaddrinfo(res);
    return -err;
}

static SSL_CTX *tls_context(struct edge_hub *hub, const char *cert, const char *key, const char *ca,
                            bool require)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());

    if (!ctx)
        return NULL;
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION |
                                 SSL_OP_CIPHER_SERVER_PREFERENCE);
    /* partial writes from a queue that may move; idle edges give their
     * record buffers back */
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                              SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_sess_set_cache_size(ctx, 4096);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        LOG(hub, EMX_LOG_ERROR, "ws: cannot load the certificate %s or its key", cert);
        SSL_CTX_free(ctx);
        return NULL;
    }
    if (ca) {
        if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) {
            LOG(hub, EMX_LOG_ERROR, "ws: cannot load the client CA %s", ca);
            SSL_CTX_free(ctx);
            return NULL;
        }
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | (require ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0),
                           NULL);
    }
    ERR_clear_error();
    return ctx;
}

void edge_listener_free(struct edge_listener *l)
{
    if (l->ssl)
        SSL_CTX_free(l->ssl);
    free(l->path);
    free(l->cert);
    free(l->key);
    free(l->ca);
    free(l);
}

int edge_listen(struct edge_hub *hub, const struct emx_listen_spec *spec,
                const struct emx_conn_callbacks *cb, void *user, struct emx_listener **out)
{
    struct edge_listener *l;
    char host[64];
    int port, rc;

    if (!hub || !spec || !cb || !out || !spec->path || !cb->on_message || !cb->on_close)
        return -EINVAL;
    if (!hub->running)
        return -ESHUTDOWN;
    rc = parse_address(spec->address, host, sizeof(host), &port);
    if (rc) {
        LOG(hub, EMX_LOG_ERROR, "ws: bad listen address \"%s\" (want host:port)",
            spec->address ? spec->address : "");
        return rc;
    }
    /* One listener per port: a second would only fail to bind, or with a
     * different address share the port in a way nobody asked for. */
    for (l = hub->listeners; l; l = l->next)
        if (!l->closed && l->port == port) {
            LOG(hub, EMX_LOG_ERROR, "ws: %s: port already has a listener", spec->address);
            return -EADDRINUSE;
        }
    l = calloc(1, sizeof(*l));
    if (!l)
        return -ENOMEM;
    l->hub = hub;
    l->port = port;
    l->fd = -1;
    l->cb = *cb;
    l->user = user;
    l->max_msg = spec->max_message_size ? spec->max_message_size : SIZE_MAX / 4;
    l->preauth = l->max_msg;
    if (hub->host->abi_minor >= 2 && spec->max_preauth_message)
        l->preauth = spec->max_preauth_message;
    l->pmd.enabled = hub->s.deflate;
    l->pmd.server_window = hub->s.deflate_window_bits;
    l->pmd.client_window = hub->s.inflate_window_bits;
    l->path = ws_strdup(spec->path);
    if (!l->path) {
        edge_listener_free(l);
        return -ENOMEM;
    }
    if (spec->tls_cert) {
        l->cert = ws_strdup(spec->tls_cert);
        l->key = ws_strdup(spec->tls_key);
        l->ca = ws_strdup(spec->tls_ca);
        l->require_client_cert = spec->tls_require_client_cert;
        if (!l->cert || !l->key || (spec->tls_ca && !l->ca)) {
            edge_listener_free(l);
            return -ENOMEM;
        }
        l->ssl = tls_context(hub, l->cert, l->key, l->ca, l->require_client_cert);
        if (!l->ssl) {
            edge_listener_free(l);
            return -EINVAL;
        }
    }
    rc = listen_socket(hub, host, port, &l->fd);
    if (rc) {
        if (rc != -EINVAL)
            LOG(hub, EMX_LOG_ERROR, "ws: cannot listen on %s: %s", spec->address, strerror(-rc));
        edge_listener_free(l);
        return rc;
    }
    l->poll = calloc(1, sizeof(*l->poll));
    if (!l->poll || uv_poll_init(hub->loop, l->poll, l->fd) != 0) {
        free(l->poll);
        close(l->fd);
        edge_listener_free(l);
        return -ENOMEM;
    }
    l->poll->data = l;
    hub->handles_open++;
    l->next = hub->listeners;
    hub->listeners = l;
    *out = (struct emx_listener *)(void *)l;
    edge_accept_modulate(hub);
    return 0;
}

/* Stop accepting and drop the listener's edges (on_close follows for each):
 * the core drains by refusing new edges through on_accept before this. */
void edge_unlisten(struct emx_listener *listener)
{
    struct edge_listener *l = (struct edge_listener *)(void *)listener;
    struct edge_hub *hub;
    struct edge_list *lists[3];

    if (!l || l->closed)
        return;
    hub = l->hub;
    l->closed = true;
    edge_listener_stop(l);
    lists[0] = &hub->shaking;
    lists[1] = &hub->open;
    lists[2] = &hub->closing;
    for (int i = 0; i < 3; i++) {
        struct edge_conn *c = lists[i]->head, *n;

        for (; c; c = n) {
            n = c->next;
            if (c->lst == l)
                edge_conn_gone(c, 1001, "listener closed");
        }
    }
}

/* Read a rotated certificate and key again; connections keep the context
 * they were accepted with (SSL objects hold a reference). */
int edge_reload_tls(struct emx_listener *listener, const char *cert, const char *key)
{
    struct edge_listener *l = (struct edge_listener *)(void *)listener;
    SSL_CTX *ctx;

    if (!l || !cert || !key || !l->ssl || l->closed)
        return -EINVAL;
    if (access(cert, R_OK) != 0 || access(key, R_OK) != 0)
        return -ENOENT;
    ctx = tls_context(l->hub, cert, key, l->ca, l->require_client_cert);
    if (!ctx)
        return -EIO;
    if (strcmp(cert, l->cert) || strcmp(key, l->key)) {
        char *nc = ws_strdup(cert), *nk = ws_strdup(key);

        if (!nc || !nk) {
            free(nc);
            free(nk);
            SSL_CTX_free(ctx);
            return -ENOMEM;
        }
        free(l->cert);
        free(l->key);
        l->cert = nc;
        l->key = nk;
    }
    SSL_CTX_free(l->ssl);
    l->ssl = ctx;
    return 0;
}
