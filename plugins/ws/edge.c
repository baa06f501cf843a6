/* Edges on the host's libuv loop: accept, TLS, upgrade, RFC 6455 framing,
 * close handshake, timers.
 *
 * Lifetime: an edge is a struct edge_conn with an embedded uv_poll_t. It
 * lives in exactly one of the hub's lists (shaking, open, closing) until it
 * is gone; then its poll handle is closed and on_close reaches the core from
 * the handle's close callback, so never inside a call the core made, and
 * exactly once. Its memory goes with that callback.
 *
 * Bounds: a handshake holds at most EDGE_HTTP_MAX_HEAD bytes and
 * handshake_timeout; a full handshake pool drops its oldest member once it
 * is handshake_evict old, so silent or held sockets cannot lock devices out;
 * a message is bounded by the listener's limit (before AUTH by the smaller
 * pre-AUTH limit, edge_rx.c); a closing edge is read and discarded for at
 * most close_timeout; pongs stop being queued past max_queued_control.
 */
#include "edge_int.h"

/* ---- lists ---------------------------------------------------------------- */

static struct edge_list *list_of(struct edge_hub *hub, int which)
{
    return which == L_SHAKING ? &hub->shaking : which == L_OPEN ? &hub->open : &hub->closing;
}

static void list_del(struct edge_conn *c)
{
    struct edge_hub *hub = c->hub;
    struct edge_list *l;

    if (c->list == L_NONE)
        return;
    l = list_of(hub, c->list);
    if (hub->sweep_cursor == c)
        hub->sweep_cursor = c->next;
    if (c->prev)
        c->prev->next = c->next;
    else
        l->head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        l->tail = c->prev;
    c->prev = c->next = NULL;
    l->n--;
    c->list = L_NONE;
}

void edge_list_add(struct edge_conn *c, int which)
{
    struct edge_list *l;

    list_del(c);
    l = list_of(c->hub, which);
    c->prev = l->tail;
    c->next = NULL;
    if (l->tail)
        l->tail->next = c;
    else
        l->head = c;
    l->tail = c;
    l->n++;
    c->list = (uint8_t)which;
}

/* ---- helpers -------------------------------------------------------------- */

void edge_tune_socket(const struct edge_settings *s, int fd)
{
    ws_set_int_opt(fd, IPPROTO_TCP, TCP_NODELAY, 1);
    if (s->keepalive_idle_ms) {
        ws_set_int_opt(fd, SOL_SOCKET, SO_KEEPALIVE, 1);
        ws_set_int_opt(fd, IPPROTO_TCP, TCP_KEEPIDLE, (int)secs_of(s->keepalive_idle_ms));
        ws_set_int_opt(fd, IPPROTO_TCP, TCP_KEEPINTVL, (int)secs_of(s->keepalive_interval_ms));
        ws_set_int_opt(fd, IPPROTO_TCP, TCP_KEEPCNT,
                       s->keepalive_count > 0 ? s->keepalive_count : 1);
    }
    if (s->user_timeout_ms)
        ws_set_int_opt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT,
                       s->user_timeout_ms > INT_MAX ? INT_MAX : (int)s->user_timeout_ms);
}

/* At most `max` bytes of `s`, not cutting a UTF-8 character: a close
 * reason must stay valid UTF-8 (RFC 6455 §5.5.1). */
static size_t utf8_cut(const char *s, size_t max)
{
    size_t n = strnlen(s, max);

    if (n == max)
        while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
            n--;
    return n;
}

static void set_reason(struct edge_conn *c, uint16_t code, const char *reason)
{
    size_t n;

    if (c->close_code)
        return;
    c->close_code = code;
    if (!reason || !*reason)
        return;
    n = utf8_cut(reason, REASON_MAX);
    c->close_reason = malloc(n + 1);
    if (!c->close_reason)
        return;
    memcpy(c->close_reason, reason, n);
    c->close_reason[n] = '\0';
    /* the reason may be a peer's text: no control characters reach logs */
    for (char *r = c->close_reason; *r; r++)
        if ((unsigned char)*r < 0x20 || *r == 0x7f)
            *r = '?';
}

/* ---- teardown of one edge ------------------------------------------------- */

static void queue_drop(struct edge_conn *c)
{
    while (c->qh) {
        struct oq *m = c->qh;

        c->qh = m->next;
        free(m);
    }
    c->qt = NULL;
    c->qbytes = 0;
}

void edge_conn_free(struct edge_conn *c)
{
    queue_drop(c);
    edge_rx_free(&c->rx);
    if (c->tx_z) {
        deflateEnd(c->tx_z);
        free(c->tx_z);
    }
    if (c->ssl)
        SSL_free(c->ssl);
    free(c->hs);
    free(c->held);
    free(c->close_reason);
    free(c);
}

static void poll_closed(uv_handle_t *h)
{
    struct edge_conn *c = h->data;
    struct edge_hub *hub = c->hub;

    hub->handles_open--;
    if (c->ready) {
        struct edge_conn **pp = &hub->ready_head;

        while (*pp && *pp != c)
            pp = &(*pp)->ready_next;
        if (*pp)
            *pp = c->ready_next;
    }
    if (c->tunnel) {
        tunnel_conn_freed(c); /* the tunnel frees it */
        return;
    }
    if (c->reported && c->lst->cb.on_close)
        c->lst->cb.on_close(c->user, c->close_code ? c->close_code : 1006,
                            c->close_reason ? c->close_reason : "");
    edge_conn_free(c);
}

/* The socket is done: stop, close, and let the close callback report. */
void edge_conn_gone(struct edge_conn *c, uint16_t code, const char *reason)
{
    struct edge_hub *hub = c->hub;

    if (c->state == ES_GONE)
        return;
    set_reason(c, code, reason);
    c->state = ES_GONE;
    list_del(c);
    uv_poll_stop(&c->poll);
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    hub->socks--;
    if (hub->balance && !c->client)
        hub->host->edge_count(hub->host, -1);
    uv_close((uv_handle_t *)&c->poll, poll_closed);
    edge_accept_modulate(hub);
}

/* ---- writing -------------------------------------------------------------- */

/* Bytes written (0 when the socket takes none now), or -1. */
static long sock_write(struct edge_conn *c, const uint8_t *buf, size_t len)
{
    if (!len)
        return 0;
    if (c->ssl) {
        int n, e;

        ERR_clear_error();
        n = SSL_write(c->ssl, buf, len > INT_MAX ? INT_MAX : (int)len);
        if (n > 0)
            return n;
        e = SSL_get_error(c->ssl, n);
        if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
            c->ssl_want_write = e == SSL_ERROR_WANT_WRITE;
            return 0;
        }
        return -1;
    }
    for (;;) {
        ssize_t n = send(c->fd, buf, len, MSG_NOSIGNAL);

        if (n >= 0)
            return (long)n;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        return -1;
    }
}

static int queue_copy(struct edge_conn *c, const uint8_t *buf, size_t len)
{
    struct oq *m = malloc(sizeof(*m) + len);

    if (!m)
        return -ENOMEM;
    m->next = NULL;
    m->len = len;
    m->off = 0;
    memcpy(m->data, buf, len);
    if (c->qt)
        c->qt->next = m;
    else
        c->qh = m;
    c->qt = m;
    c->qbytes += len;
    return 0;
}

/* Write bytes in order after whatever is queued; keep what the socket does
 * not take. Returns 0, -EIO (the connection is gone) or -ENOMEM. */
int edge_write(struct edge_conn *c, const uint8_t *buf, size_t len)
{
    size_t off = 0;

    c->wrote = 1;
    if (!c->qh) {
        long w = sock_write(c, buf, len);

        if (w < 0) {
            edge_conn_gone(c, 1006, "write failed");
            return -EIO;
        }
        off = (size_t)w;
    }
    if (off < len) {
        if (queue_copy(c, buf + off, len - off)) {
            /* part of a frame may be on the wire: the stream cannot go on */
            edge_conn_gone(c, 1011, "out of memory");
            return -ENOMEM;
        }
        edge_watch(c);
    }
    return 0;
}

static void after_flush(struct edge_conn *c);

/* Write what is queued; once it is all out after a close, shut the write
 * side. Returns -1 when the connection is gone. */
int edge_drain(struct edge_conn *c)
{
    while (c->qh) {
        struct oq *m = c->qh;
        long w = sock_write(c, m->data + m->off, m->len - m->off);

        if (w < 0) {
            edge_conn_gone(c, 1006, "write failed");
            return -1;
        }
        if (w == 0)
            break;
        m->off += (size_t)w;
        c->qbytes -= (size_t)w;
        if (m->off < m->len)
            break;
        c->qh = m->next;
        if (!c->qh)
            c->qt = NULL;
        free(m);
    }
    if (!c->qh)
        after_flush(c);
    return c->state == ES_GONE ? -1 : 0;
}

/* drain_queue, then tell the core when the queue emptied. */
static int flush_queue(struct edge_conn *c)
{
    if (edge_drain(c))
        return -1;
    /* the core may send more (pipes' answers waited for this edge) */
    if (!c->qh && c->state == ES_OPEN && c->reported && c->lst->cb.on_writable)
        c->lst->cb.on_writable(c->user);
    if (c->tunnel && c->state != ES_GONE)
        tunnel_drained(c); /* the other side may read again */
    return c->state == ES_GONE ? -1 : 0;
}

int edge_send_op(struct edge_conn *c, uint8_t op, const uint8_t *data, size_t len)
{
    size_t n = edge_frame(c, op, false, data, len);

    if (!n)
        return -ENOMEM;
    return edge_write(c, c->hub->tbuf, n);
}

/* ---- closing -------------------------------------------------------------- */

/* Queue a close frame with `code` (none for 1005/1006), then read and
 * discard until the peer closes, for at most close_timeout. */
static void begin_close(struct edge_conn *c, uint16_t code, const char *reason)
{
    uint8_t p[2 + REASON_MAX];
    size_t n = 0;

    if (c->state != ES_OPEN)
        return;
    c->state = ES_CLOSING;
    c->t0 = uv_now(c->hub->loop);
    edge_list_add(c, L_CLOSING);
    c->paused = 0; /* read on: the peer's close or EOF ends it */
    /* The core is done with it now: the close handshake that follows is
     * the transport's, bounded by close_timeout. */
    if (c->reported) {
        c->report_due = 1;
        edge_ready_add(c);
    }
    if (code != 1005 && code != 1006) {
        size_t rl = reason ? utf8_cut(reason, REASON_MAX) : 0;

        p[0] = (uint8_t)(code >> 8);
        p[1] = (uint8_t)code;
        if (rl)
            memcpy(p + 2, reason, rl);
        n = 2 + rl;
    }
    c->close_sent = 1;
    if (edge_send_op(c, 0x8, p, n)) {
        /* no memory for it: nothing more can be said on this stream */
        edge_conn_gone(c, 1011, "out of memory");
        return;
    }
    if (!c->qh)
        after_flush(c);
    edge_watch(c);
}

/* edgemux closes: the core hears this code. */
void edge_start_close(struct edge_conn *c, uint16_t code, const char *reason)
{
    if (c->state != ES_OPEN)
        return;
    set_reason(c, code, reason);
    begin_close(c, code, reason);
}

/* Everything queued is on the wire: after a close frame or a refusal, shut
 * the write side; the peer's EOF (or close_timeout) ends the connection. */
static void after_flush(struct edge_conn *c)
{
    if (!c->close_sent || c->shut || c->state == ES_GONE)
        return;
    c->shut = 1;
    if (c->ssl)
        (void)SSL_shutdown(c->ssl);
    shutdown(c->fd, SHUT_WR);
    if (c->close_rcvd && c->state == ES_CLOSING)
        edge_conn_gone(c, c->close_code, NULL); /* both close frames went: done */
}

/* An HTTP answer to a request that does not upgrade. */
void edge_refuse_http(struct edge_conn *c, int status, const char *why)
{
    char buf[256];
    size_t n = edge_http_refusal(status, buf, sizeof(buf));

    LOG(c->hub, EMX_LOG_DEBUG, "ws: upgrade refused %d: %s", status, why ? why : "");
    c->state = ES_CLOSING;
    c->t0 = uv_now(c->hub->loop);
    edge_list_add(c, L_CLOSING);
    c->close_sent = 1;
    free(c->hs);
    c->hs = NULL;
    if (edge_write(c, (const uint8_t *)buf, n))
        return;
    if (!c->qh)
        after_flush(c);
    edge_watch(c);
}

/* ---- poll interest -------------------------------------------------------- */

static void on_poll(uv_poll_t *h, int status, int events);

void edge_watch(struct edge_conn *c)
{
    int ev = 0;

    if (c->state == ES_GONE)
        return;
    /* a tunnel's device side waits unread for its back end (paused) */
    if (c->state == ES_CLOSING || !c->paused)
        ev |= UV_READABLE;
    if (c->qh || c->ssl_want_write || c->connecting)
        ev |= UV_WRITABLE;
    if (ev == c->events)
        return;
    c->events = ev;
    if (!ev)
        uv_poll_stop(&c->poll);
    else if (uv_poll_start(&c->poll, ev, on_poll) != 0)
        edge_conn_gone(c, 1011, "poll failed");
}

/* ---- receiving ------------------------------------------------------------ */

static int on_rx(void *user, enum edge_rx_kind kind, uint8_t *data, size_t len)
{
    struct edge_conn *c = user;

    switch (kind) {
    case EDGE_RX_MESSAGE:
    case EDGE_RX_TEXT: /* tunnels only */
        if (c->tunnel)
            return tunnel_rx(c, kind == EDGE_RX_TEXT, data, len);
        if (len >= 4096)
            c->big_rx = 1;
        c->lst->cb.on_message(c->user, data, len);
        return c->state != ES_OPEN || c->paused;
    case EDGE_RX_PING:
        /* RFC 6455 §5.5.3 allows answering only the latest of many pings:
         * a peer that does not read its pongs stops getting them */
        if (c->qbytes <= c->hub->s.max_queued_control)
            (void)edge_send_op(c, 0xA, data, len); /* without memory: no pong */
        return c->state != ES_OPEN;
    case EDGE_RX_PONG:
        return 0;
    case EDGE_RX_CLOSE: {
        uint16_t code = len >= 2 ? (uint16_t)((data[0] << 8) | data[1]) : 1005;
        char reason[REASON_MAX + 1];
        size_t rl = len > 2 ? len - 2 : 0;

        if (rl > REASON_MAX)
            rl = REASON_MAX;
        memcpy(reason, data + (len > 2 ? 2 : 0), rl);
        reason[rl] = '\0';
        c->close_rcvd = 1;
        /* the core hears the peer's code; the peer gets it echoed
         * (RFC 6455 §5.5.1), an empty close for an empty one */
        set_reason(c, code, reason);
        begin_close(c, code, NULL);
        if (c->tunnel)
            tunnel_close_rcvd(c, code, reason); /* the other side closes the same way */
        return 1;
    }
    }
    return 0;
}

static void handshake_done(struct edge_conn *c, const char *head, size_t hlen);

/* Bytes of an open edge: frames. Returns the bytes used (all unless the
 * core paused or the edge closed). */
static size_t feed_frames(struct edge_conn *c, uint8_t *buf, size_t len)
{
    struct edge_rx_error err = {0, NULL};
    long n = edge_rx_feed(&c->rx, buf, len, on_rx, c, &err);

    if (n < 0) {
        if (c->state == ES_OPEN) {
            LOG(c->hub, EMX_LOG_DEBUG, "ws: edge closed %u: %s", err.code, err.reason);
            edge_start_close(c, err.code, err.reason);
            if (c->tunnel)
                tunnel_side_failed(c); /* the other side does not wait for this close */
        }
        return len;
    }
    return (size_t)n;
}

/* Keep what a paused edge did not take. */
void edge_hold(struct edge_conn *c, const uint8_t *buf, size_t len)
{
    uint8_t *p;

    if (!len)
        return;
    if (c->held && c->held_off) {
        memmove(c->held, c->held + c->held_off, c->held_len - c->held_off);
        c->held_len -= c->held_off;
        c->held_off = 0;
    }
    p = realloc(c->held, c->held_len + len);
    if (!p) {
        edge_start_close(c, 1011, "out of memory");
        return;
    }
    memcpy(p + c->held_len, buf, len);
    c->held = p;
    c->held_len += len;
}

/* Frames of an open edge: parsed, or kept when the core has paused it (it
 * may do so from on_accept) or earlier input is still held. */
static void feed_or_hold(struct edge_conn *c, uint8_t *buf, size_t len)
{
    size_t used = 0;

    if (!c->paused && c->held_len <= c->held_off)
        used = feed_frames(c, buf, len);
    if (c->state == ES_OPEN && used < len)
        edge_hold(c, buf + used, len - used);
}

static void process(struct edge_conn *c, uint8_t *buf, size_t len)
{
    if (c->state == ES_SHAKING) {
        size_t room = EDGE_HTTP_MAX_HEAD - c->hs_len, take = len < room ? len : room;
        long hl;

        if (!c->hs && !(c->hs = malloc(EDGE_HTTP_MAX_HEAD))) {
            edge_conn_gone(c, 1011, "out of memory");
            return;
        }
        {
            /* only the new bytes (and the 3 before them) can end the head:
             * a sender dripping one byte at a time costs no rescans */
            size_t from = c->hs_len > 3 ? c->hs_len - 3u : 0;

            memcpy(c->hs + c->hs_len, buf, take);
            c->hs_len = (uint16_t)(c->hs_len + take);
            hl = edge_http_head_len(c->hs + from, c->hs_len - from);
            if (hl > 0)
                hl += (long)from;
            else if (c->hs_len >= EDGE_HTTP_MAX_HEAD)
                hl = -1;
        }
        if (hl < 0) {
            edge_refuse_http(c, 431, "request head over 8 KiB");
            return;
        }
        if (hl == 0)
            return;
        {
            /* bytes after the head are the first frames */
            size_t extra_hs = c->hs_len - (size_t)hl, rest = len - take;

            handshake_done(c, c->hs, (size_t)hl);
            if (c->state != ES_OPEN)
                return;
            if (extra_hs) {
                uint8_t *tmp = malloc(extra_hs);

                if (!tmp) {
                    edge_start_close(c, 1011, "out of memory");
                    return;
                }
                memcpy(tmp, c->hs + hl, extra_hs);
                free(c->hs);
                c->hs = NULL;
                c->hs_len = 0;
                feed_or_hold(c, tmp, extra_hs);
                free(tmp);
            } else {
                free(c->hs);
                c->hs = NULL;
                c->hs_len = 0;
            }
            if (rest && c->state == ES_OPEN)
                feed_or_hold(c, buf + take, rest);
        }
        return;
    }
    if (c->state == ES_OPEN) {
        feed_or_hold(c, buf, len);
        return;
    }
    /* closing: input is read and dropped until the peer's EOF */
}

/* Bytes read (0: EOF), -EAGAIN, or another negative error. */
long edge_sock_read(struct edge_conn *c, uint8_t *buf, size_t cap)
{
    if (c->ssl) {
        int n, e;

        ERR_clear_error();
        n = SSL_read(c->ssl, buf, (int)cap);
        if (n > 0)
            return n;
        e = SSL_get_error(c->ssl, n);
        if (e == SSL_ERROR_WANT_READ)
            return -EAGAIN;
        if (e == SSL_ERROR_WANT_WRITE) {
            c->ssl_want_write = 1;
            return -EAGAIN;
        }
        if (e == SSL_ERROR_ZERO_RETURN)
            return 0;
        return -EIO;
    }
    for (;;) {
        ssize_t n = recv(c->fd, buf, cap, 0);

        if (n >= 0)
            return (long)n;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return -EAGAIN;
        return -errno;
    }
}

static void on_eof(struct edge_conn *c)
{
    if (c->state == ES_CLOSING)
        edge_conn_gone(c, c->close_code ? c->close_code : 1006, NULL);
    else
        edge_conn_gone(c, 1006, "connection lost");
}

void edge_conn_read(struct edge_conn *c)
{
    struct edge_hub *hub = c->hub;

    /* input held from a pause goes first: the ready list parses it, then
     * reads on (a poll event can come before the idle callback does) */
    if (c->state == ES_OPEN && c->held && c->held_off < c->held_len) {
        edge_ready_add(c);
        return;
    }
    c->wrote = c->big_rx = 0;
    for (int i = 0; i < READS_PER_EVENT; i++) {
        long n;

        /* paused: an open edge the core paused, or a tunnel's peer waiting
         * for its owner (nothing of it is read before its 101) */
        if (c->state == ES_GONE || (c->state != ES_CLOSING && c->paused))
            return;
        n = edge_sock_read(c, hub->rbuf, RBUF_SIZE);
        if (n == -EAGAIN)
            break;
        if (n == 0) {
            on_eof(c);
            return;
        }
        if (n < 0) {
            edge_conn_gone(c, 1006,
                           c->state == ES_SHAKING && c->ssl ? "TLS handshake failed"
                                                            : "connection lost");
            return;
        }
        process(c, hub->rbuf, (size_t)n);
        if ((size_t)n < RBUF_SIZE && !c->ssl)
            break; /* the socket is empty */
    }
    /* ACK now when the peer is likely waiting for it: a frame was cut
     * short (the C SDK writes a frame's header and payload in two sends
     * without TCP_NODELAY, so its payload waits for our ACK), or a large
     * message (a multipart chunk) got nothing back to carry the ACK, so a
     * Nagle sender's next chunk would wait for our delayed ACK (40 ms). */
    if (c->state == ES_OPEN && (c->rx.in_frame || c->rx.hdr_len || (c->big_rx && !c->wrote)))
        ws_set_int_opt(c->fd, IPPROTO_TCP, TCP_QUICKACK, 1);
    if (c->state != ES_GONE)
        edge_watch(c);
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    struct edge_conn *c = h->data;

    if (c->state == ES_GONE)
        return;
    if (c->client && c->state == ES_SHAKING) {
        tunnel_be_poll(c, status, events); /* connect, TLS, upgrade */
        return;
    }
    if (status < 0) {
        edge_conn_gone(c, 1006, "connection lost");
        return;
    }
    if (events & UV_WRITABLE) {
        c->ssl_want_write = 0;
        if (flush_queue(c))
            return;
        if (c->ssl && c->state != ES_GONE)
            edge_conn_read(c); /* TLS may have waited to write for a read */
    }
    if ((events & UV_READABLE) && c->state != ES_GONE)
        edge_conn_read(c);
    if (c->state != ES_GONE)
        edge_watch(c);
}

/* ---- upgrade -------------------------------------------------------------- */

static void handshake_done(struct edge_conn *c, const char *head, size_t hlen)
{
    struct edge_listener *l = c->lst;
    struct edge_http_req *r = malloc(sizeof(*r));
    struct emx_conn_info info = {0};
    struct edge_rx_params rp = {0};
    char peer[64], resp[512];
    size_t rn;
    void *user;

    if (!r) {
        edge_conn_gone(c, 1011, "out of memory");
        return;
    }
    edge_http_parse(head, hlen, l->path, c->hub->tunnels_on && l->cb.on_tunnel && !l->closed,
                    &l->pmd, r);
    if (r->status) {
        int st = r->status;
        const char *why = r->why;

        memset(r, 0, sizeof(*r));
        free(r);
        edge_refuse_http(c, st, why);
        return;
    }
    c->pmd = r->pmd;
    c->max_frame = r->max_frame ? r->max_frame : c->hub->s.default_max_frame;
    if (c->max_frame > MAX_FRAME_CAP)
        c->max_frame = MAX_FRAME_CAP;
    if (c->max_frame < MIN_FRAME)
        c->max_frame = MIN_FRAME;
    if (r->tunnel) {
        tunnel_begin(c, r); /* answered once the owner has */
        memset(r, 0, sizeof(*r)); /* the app key, cookies */
        free(r);
        return;
    }
    ws_peer_string(c->fd, peer, sizeof(peer));
    info.peer = peer;
    info.forwarded_for = r->has_xff ? r->xff : NULL;
    info.app_key = r->has_app_key ? r->app_key : NULL;
    info.max_frame_size = r->max_frame;
    info.deflate = r->pmd.on;
    info.tls = c->ssl != NULL;
    rn = edge_http_101(r, resp, sizeof(resp));
    /* The 101 is queued (not yet written) before the core hears of the
     * edge: whatever the core sends or closes from on_accept goes out after
     * it, and a refusal can still answer 503 instead. */
    c->wrote = 1;
    if (!rn || queue_copy(c, (const uint8_t *)resp, rn)) {
        memset(r, 0, sizeof(*r));
        free(r);
        edge_conn_gone(c, 1011, rn ? "out of memory" : "response too long");
        return;
    }

    /* open before the core hears of it: it may send at once */
    c->state = ES_OPEN;
    edge_list_add(c, L_OPEN);
    rp.deflate = r->pmd.on;
    rp.no_takeover = r->pmd.client_no_takeover;
    rp.window_bits = r->pmd.client_window;
    c->full_limit = l->max_msg;
    edge_rx_init(&c->rx, &rp, l->preauth < l->max_msg ? l->preauth : l->max_msg);
    user = l->closed || !l->cb.on_accept ? NULL : l->cb.on_accept(l->user, C(c), &info);
    memset(r, 0, sizeof(*r)); /* the app key */
    free(r);
    if (!user) {
        /* refused by the core (limits, draining): no upgrade. Nothing was
         * written yet: the queue (the 101, anything sent behind it) goes. */
        if (c->state == ES_GONE)
            return;
        queue_drop(c);
        c->state = ES_SHAKING;
        edge_refuse_http(c, 503, "refused");
        return;
    }
    c->user = user;
    c->reported = 1;
    if (c->state == ES_GONE)
        return; /* dropped from on_accept (unlisten, stop): on_close follows */
    if (c->state == ES_CLOSING) {
        /* closed from on_accept: the core hears on_close from the loop */
        c->report_due = 1;
        edge_ready_add(c);
    }
    if (edge_drain(c) == 0)
        edge_watch(c);
    edge_accept_modulate(c->hub);
}

/* ---- ready list: paused edges resumed ------------------------------------ */

static void ready_cb(uv_idle_t *h)
{
    struct edge_hub *hub = h->data;

    uv_idle_stop(h);
    while (hub->ready_head) {
        struct edge_conn *c = hub->ready_head;

        hub->ready_head = c->ready_next;
        c->ready_next = NULL;
        c->ready = 0;
        if (c->report_due) {
            c->report_due = 0;
            if (c->reported) {
                c->reported = 0;
                c->lst->cb.on_close(c->user, c->close_code ? c->close_code : 1006,
                                    c->close_reason ? c->close_reason : "");
            }
        }
        if (c->state != ES_OPEN || c->paused)
            continue;
        while (c->held && c->held_off < c->held_len && c->state == ES_OPEN && !c->paused) {
            size_t used = feed_frames(c, c->held + c->held_off, c->held_len - c->held_off);

            c->held_off += used;
        }
        if (c->held && c->held_off >= c->held_len) {
            free(c->held);
            c->held = NULL;
            c->held_len = c->held_off = 0;
        }
        if (c->state == ES_OPEN && !c->paused)
            edge_conn_read(c); /* TLS may hold decrypted bytes no poll event announces */
    }
}

void edge_ready_add(struct edge_conn *c)
{
    if (c->ready || c->state == ES_GONE)
        return;
    c->ready = 1;
    c->ready_next = c->hub->ready_head;
    c->hub->ready_head = c;
    uv_idle_start(&c->hub->ready_idle, ready_cb);
}

/* ---- timers --------------------------------------------------------------- */

static void sweep_idle(struct edge_hub *hub, uint64_t now)
{
    uint64_t period = hub->s.idle_sweep_period_ms ? hub->s.idle_sweep_period_ms : 10000;
    uint64_t since = now - hub->last_sweep;
    size_t slice;

    if (!hub->s.idle_timeout_ms || !hub->open.n)
        return;
    if (since > period)
        since = period;
    slice = (size_t)(hub->open.n * since / period) + 1;
    hub->last_sweep = now;
    while (slice-- && hub->open.n) {
        struct edge_conn *c = hub->sweep_cursor ? hub->sweep_cursor : hub->open.head;
        struct tcp_info ti;
        socklen_t tl = sizeof(ti);

        hub->sweep_cursor = c->next;
        if (c->tunnel)
            continue; /* tunnels have their own idle timeout */
        if (getsockopt(c->fd, IPPROTO_TCP, TCP_INFO, &ti, &tl) != 0)
            continue;
        if ((uint64_t)ti.tcpi_last_data_recv >= hub->s.idle_timeout_ms)
            edge_start_close(c, 1001, "idle timeout");
    }
}

static void tick_cb(uv_timer_t *t)
{
    struct edge_hub *hub = t->data;
    uint64_t now = uv_now(hub->loop);

    while (hub->shaking.head && now - hub->shaking.head->t0 >= hub->s.handshake_timeout_ms)
        edge_conn_gone(hub->shaking.head, 1006, "handshake timeout");
    while (hub->closing.head && now - hub->closing.head->t0 >= hub->s.close_timeout_ms)
        edge_conn_gone(hub->closing.head, 0, NULL);
    sweep_idle(hub, now);
    edge_tbuf_trim(hub);
    edge_accept_modulate(hub); /* a full handshake pool's oldest may now go */
}

/* ---- the transport calls --------------------------------------------------- */

int edge_send(struct emx_conn *conn, const uint8_t *data, size_t len)
{
    struct edge_conn *c = E(conn);
    const uint8_t *p = data;
    size_t plen = len, n;
    int rc;

    if (!c || c->state != ES_OPEN || c->tunnel)
        return -EPIPE;
    if (!data && len)
        return -EINVAL;
    if (!p)
        p = (const uint8_t *)"";
    if (c->pmd.on) {
        rc = edge_compress(c, p, len, &p, &plen);
        if (rc) {
            edge_start_close(c, 1011, "compression failed");
            return rc;
        }
    }
    n = edge_frame(c, 0x2, c->pmd.on, p, plen);
    if (!n) {
        edge_start_close(c, 1011, "out of memory");
        return -ENOMEM;
    }
    return edge_write(c, c->hub->tbuf, n);
}

size_t edge_buffered(struct emx_conn *conn)
{
    struct edge_conn *c = E(conn);
    size_t n;
    int q = 0;

    if (!c || c->state == ES_GONE)
        return 0;
    n = c->qbytes;
    if (c->fd >= 0 && ioctl(c->fd, SIOCOUTQ, &q) == 0 && q > 0)
        n += (size_t)q;
    return n;
}

int edge_pause_read(struct emx_conn *conn, bool pause)
{
    struct edge_conn *c = E(conn);

    if (!c || c->state == ES_GONE)
        return -ENOTCONN;
    if (c->tunnel)
        return -EPERM; /* a tunnel paces itself */
    if (c->state != ES_OPEN)
        return 0;
    if ((bool)c->paused == pause)
        return 0;
    c->paused = pause;
    edge_watch(c);
    /* held input is parsed, and TLS's buffered input read, from the loop:
     * never inside the core's call */
    if (!pause)
        edge_ready_add(c);
    return 0;
}

void edge_close(struct emx_conn *conn, uint16_t code, const char *reason)
{
    struct edge_conn *c = E(conn);

    if (c && c->tunnel) {
        tunnel_close(c, code, reason); /* both sides */
        return;
    }
    if (!c || c->state == ES_GONE || c->state == ES_CLOSING)
        return;
    if (c->state == ES_SHAKING) {
        edge_conn_gone(c, code, reason);
        return;
    }
    edge_start_close(c, code ? code : 1000, reason);
}

int edge_set_message_limit(struct emx_conn *conn, size_t limit)
{
    struct edge_conn *c = E(conn);

    if (!c || c->state == ES_GONE)
        return -ENOTCONN;
    if (!limit || limit > c->full_limit)
        limit = c->full_limit;
    edge_rx_set_limit(&c->rx, limit);
    return 0;
}

int edge_tunnel_counts(struct emx_conn *conn, struct emx_tunnel_result *sofar)
{
    struct edge_conn *c = E(conn);

    if (!c || !c->tunnel)
        return -ENOENT;
    return tunnel_counts(c, sofar);
}

/* ---- the hub -------------------------------------------------------------- */

struct edge_hub *edge_hub_new(uv_loop_t *loop, const struct emx_host *host,
                              const struct edge_settings *s)
{
    struct edge_hub *hub = calloc(1, sizeof(*hub));

    if (!hub)
        return NULL;
    hub->rbuf = malloc(RBUF_SIZE);
    if (!hub->rbuf) {
        free(hub);
        return NULL;
    }
    hub->loop = loop;
    hub->host = host;
    hub->s = *s;
    hub->balance = EMX_HOST_HAS(host, edge_hand_off) && host->edge_count && host->edge_balance &&
                   host->edge_hand_off;
    /* mask keys only need to be unpredictable to scripts in a browser */
    if (getentropy(&hub->rng, sizeof(hub->rng)) != 0 || !hub->rng)
        hub->rng = uv_hrtime() | 1;
    return hub;
}

struct edge_settings *edge_hub_settings(struct edge_hub *hub)
{
    return &hub->s;
}

void edge_hub_enable_tunnels(struct edge_hub *hub, bool on)
{
    hub->tunnels_on = on;
}

static void hub_handle_closed(uv_handle_t *h)
{
    struct edge_hub *hub = h->data;

    hub->handles_open--;
}

int edge_hub_start(struct edge_hub *hub)
{
    hub->tick.data = hub->accept_retry.data = hub->ready_idle.data = hub;
    uv_timer_init(hub->loop, &hub->tick);
    uv_timer_init(hub->loop, &hub->accept_retry);
    uv_idle_init(hub->loop, &hub->ready_idle);
    hub->handles_open += 3;
    hub->sock_cap = edge_socket_cap(hub);
    hub->last_sweep = uv_now(hub->loop);
    if (uv_timer_start(&hub->tick, tick_cb, TICK_MS, TICK_MS) != 0)
        return -EIO;
    uv_unref((uv_handle_t *)&hub->tick);
    hub->running = true;
    return 0;
}

void edge_hub_stop(struct edge_hub *hub)
{
    struct edge_list *lists[3] = {&hub->shaking, &hub->open, &hub->closing};

    if (!hub || hub->stopped)
        return;
    hub->running = false;
    hub->stopped = true;
    for (struct edge_listener *l = hub->listeners; l; l = l->next) {
        l->closed = true;
        edge_listener_stop(l);
    }
    for (int i = 0; i < 3; i++)
        while (lists[i]->head)
            edge_conn_gone(lists[i]->head, 1001, "shutdown");
    if (hub->handles_open >= 3 && !uv_is_closing((uv_handle_t *)&hub->tick)) {
        uv_close((uv_handle_t *)&hub->tick, hub_handle_closed);
        uv_close((uv_handle_t *)&hub->accept_retry, hub_handle_closed);
        uv_close((uv_handle_t *)&hub->ready_idle, hub_handle_closed);
    }
}

bool edge_hub_closed(const struct edge_hub *hub)
{
    return !hub || hub->handles_open == 0;
}

void edge_hub_free(struct edge_hub *hub)
{
    if (!hub)
        return;
    while (hub->listeners) {
        struct edge_listener *l = hub->listeners;

        hub->listeners = l->next;
        edge_listener_free(l);
    }
    tunnel_hub_free(hub);
    free(hub->rbuf);
    free(hub->tbuf);
    free(hub->zbuf);
    free(hub);
}
