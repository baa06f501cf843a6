/* Pipes on libwebsockets: the connection list and reaping, closing,
 * the send queue, the lws protocol callback, permessage-deflate for pipes
 * and the transport calls for pipes. */
#include "ws_int.h"

#include <openssl/x509.h>

/* ---- connection list and reaping ---------------------------------------- */

void conn_link(struct ws_instance *inst, struct emx_conn *c)
{
    c->linked = true;
    c->prev = NULL;
    c->next = inst->conns;
    if (inst->conns)
        inst->conns->prev = c;
    inst->conns = c;
    inst->conn_count++;
}

static void conn_unlink(struct ws_instance *inst, struct emx_conn *c)
{
    if (!c->linked)
        return;
    c->linked = false;
    if (inst->sweep_cursor == c)
        inst->sweep_cursor = c->next;
    if (c->prev)
        c->prev->next = c->next;
    else if (inst->conns == c)
        inst->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
    inst->conn_count--;
}

static void queue_free(struct emx_conn *c)
{
    while (c->qh) {
        struct ws_qmsg *m = c->qh;

        c->qh = m->next;
        free(m);
    }
    c->qt = NULL;
    c->qbytes = 0;
}

static void pipe_unlink(struct ws_instance *inst, struct emx_conn *c)
{
    if (!c->pp)
        return;
    if (c->pp->pprev)
        c->pp->pprev->pp->pnext = c->pp->pnext;
    else if (inst->pipes == c)
        inst->pipes = c->pp->pnext;
    if (c->pp->pnext)
        c->pp->pnext->pp->pprev = c->pp->pprev;
    c->pp->pprev = c->pp->pnext = NULL;
}

void conn_free(struct emx_conn *c)
{
    queue_free(c);
    free(c->rx);
    if (c->pp) {
        free(c->pp->hdrs);
        free(c->pp->req);
        free(c->pp->batch);
        free(c->pp->path);
        free(c->pp->hosthdr);
        free(c->pp);
    }
    free(c);
}

void reap_flush(struct ws_instance *inst)
{
    while (inst->reap_head) {
        struct emx_conn *c = inst->reap_head;

        inst->reap_head = c->reap_next;
        if (!inst->reap_head)
            inst->reap_tail = NULL;
        /* The reason may be a peer's text (close frame, refused upgrade):
         * no control characters reach the core's logs. */
        for (char *r = c->close_reason; *r; r++)
            if ((unsigned char)*r < 0x20 || *r == 0x7f)
                *r = '?';
        if (c->cb->on_close)
            c->cb->on_close(c->user, c->close_code ? c->close_code : 1006,
                            c->close_reason[0] ? c->close_reason : "");
        conn_free(c);
    }
}

static void reap_cb(uv_idle_t *h)
{
    struct ws_instance *inst = h->data;

    uv_idle_stop(h);
    reap_flush(inst);
}

void reap_arm(struct ws_instance *inst)
{
    if (inst->reap_head && inst->state < INST_STOPPED && inst->handles_open)
        uv_idle_start(&inst->reap, reap_cb);
}

/* lws is done with the wsi: detach and hand on_close to the reap idle. */
void conn_gone(struct emx_conn *c, uint16_t code, const char *reason)
{
    struct ws_instance *inst = c->inst;

    if (c->state == CONN_GONE)
        return;
    if (c->pp && c->pp->res)
        resolve_detach(c);
    if (c->wsi)
        lws_set_wsi_user(c->wsi, NULL);
    conn_unlink(inst, c);
    pipe_unlink(inst, c);
    if (c->pp)
        c->pp->batch_len = 0; /* the socket is gone with what was gathered */
    if (c->deflate && c->state == CONN_OPEN && inst->pmd_conns)
        inst->pmd_conns--;
    c->wsi = NULL;
    c->state = CONN_GONE;
    if (!c->close_code)
        c->close_code = code;
    if (reason && !c->close_reason[0])
        snprintf(c->close_reason, sizeof(c->close_reason), "%s", reason);
    queue_free(c);
    free(c->rx);
    c->rx = NULL;
    c->rx_len = c->rx_cap = 0;
    if (!c->reported) {
        /* connect() failed before returning: it frees it */
        c->reap_next = NULL;
        return;
    }
    c->reap_next = NULL;
    if (inst->reap_tail)
        inst->reap_tail->reap_next = c;
    else
        inst->reap_head = c;
    inst->reap_tail = c;
    reap_arm(inst);
}

/* ---- socket helpers ------------------------------------------------------- */

/* ---- closing -------------------------------------------------------------- */

/* lws re-arms its libuv timer only after servicing an event, so a timeout
 * set from outside lws service (a uv timer, a core call) would wait for the
 * next network event: wake lws through its event pipe. */
void lws_kick(struct ws_instance *inst)
{
    if (inst->ctx && inst->state == INST_RUNNING)
        lws_cancel_service(inst->ctx);
}

/* Close from outside an lws callback: lws closes the wsi on its next
 * service, and on_close follows through the reap list. */
void conn_kill(struct emx_conn *c, uint16_t code, const char *reason)
{
    if (c->state == CONN_GONE || !c->wsi)
        return;
    if (!c->close_code)
        c->close_code = code;
    if (reason && !c->close_reason[0])
        snprintf(c->close_reason, sizeof(c->close_reason), "%s", reason);
    lws_set_timeout(c->wsi, PENDING_TIMEOUT_KILLED_BY_PARENT, LWS_TO_KILL_ASYNC);
    lws_kick(c->inst);
}

/* Inside an lws callback for this wsi: set the close frame, caller returns -1. */
static int conn_close_now(struct emx_conn *c, uint16_t code, const char *reason)
{
    if (!c->close_code)
        c->close_code = code;
    if (reason && !c->close_reason[0]) {
        /* memmove: callers may pass c->close_reason itself */
        size_t n = strnlen(reason, sizeof(c->close_reason) - 1);
        memmove(c->close_reason, reason, n);
        c->close_reason[n] = '\0';
    }
    if (c->wsi)
        lws_close_reason(c->wsi, (enum lws_close_status)c->close_code,
                         (unsigned char *)c->close_reason, strlen(c->close_reason));
    return -1;
}

/* ---- sending -------------------------------------------------------------- */

static int queue_push(struct emx_conn *c, const uint8_t *data, size_t len, size_t off)
{
    struct ws_qmsg *m;

    if (len > SIZE_MAX - sizeof(*m) - LWS_PRE)
        return -EMSGSIZE;
    m = malloc(sizeof(*m) + LWS_PRE + (len < 8 ? 8 : len));
    if (!m)
        return -ENOMEM;
    m->next = NULL;
    m->len = len;
    m->off = off;
    m->inflight = false;
    memcpy(m->buf + LWS_PRE, data, len);
    if (c->qt)
        c->qt->next = m;
    else
        c->qh = m;
    c->qt = m;
    c->qbytes += len - off;
    c->was_queued = true;
    return 0;
}

static void queue_pop(struct emx_conn *c)
{
    struct ws_qmsg *m = c->qh;

    c->qh = m->next;
    if (!c->qh)
        c->qt = NULL;
    c->qbytes -= m->len - m->off;
    free(m);
}

/* Write the next fragment of `m`; the bytes before m's payload position are
 * headroom lws may overwrite (already sent, or the LWS_PRE reserve). */
static int write_fragment(struct emx_conn *c, uint8_t *payload, size_t len, size_t *off)
{
    size_t frag = len - *off;
    int flags;

    if (frag > c->max_frame)
        frag = c->max_frame;
    flags = lws_write_ws_flags(LWS_WRITE_BINARY, *off == 0, *off + frag == len);
    if (lws_write(c->wsi, payload + *off, frag, (enum lws_write_protocol)flags) < 0)
        return -EIO;
    *off += frag;
    return 0;
}

/* Drain the queue while lws holds nothing back. Returns 0 or -EIO. */
int queue_drain(struct emx_conn *c)
{
    if (c->raw && raw_flush(c))
        return -EIO;
    while (c->raw && c->qh && !lws_partial_buffered(c->wsi)) {
        struct ws_qmsg *m = c->qh;

        /* framed already; lws keeps whatever the socket does not take */
        if (lws_write(c->wsi, m->buf + LWS_PRE + m->off, m->len - m->off, LWS_WRITE_RAW) < 0)
            return -EIO;
        c->qbytes -= m->len - m->off;
        m->off = m->len;
        queue_pop(c);
    }
    while (!c->raw && c->qh) {
        struct ws_qmsg *m = c->qh;

        if (c->deflate) {
            if (m->inflight) {
                /* lws calls us back only once its deflate drain is over */
                queue_pop(c);
                continue;
            }
            if (!m->len) {
                /* lws asserts on deflating nothing: send an empty binary
                 * frame ourselves (a client masks it with a zero key) */
                static const uint8_t empty[] = {0x82, 0x80, 0, 0, 0, 0};
                uint8_t *f = m->buf + LWS_PRE;

                memcpy(f, empty, sizeof(empty));
                if (lws_write(c->wsi, f, 6, LWS_WRITE_RAW) < 0)
                    return -EIO;
                queue_pop(c);
                continue;
            }
            if (lws_write(c->wsi, m->buf + LWS_PRE, m->len, LWS_WRITE_BINARY) < 0)
                return -EIO;
            m->inflight = true;
            if (lws_send_pipe_choked(c->wsi))
                return 0;
            queue_pop(c);
            continue;
        }
        {
            size_t before = m->off;
            int rc;

            do {
                rc = write_fragment(c, m->buf + LWS_PRE, m->len, &m->off);
                if (rc)
                    return rc;
            } while (m->off < m->len && !lws_partial_buffered(c->wsi));
            c->qbytes -= m->off - before;
            if (m->off < m->len)
                return 0;
            c->qbytes += m->len - m->off; /* queue_pop subtracts the rest (0) */
            queue_pop(c);
            if (lws_partial_buffered(c->wsi))
                return 0;
        }
    }
    return 0;
}

/* ---- receiving ------------------------------------------------------------ */

int rx_append(struct emx_conn *c, const uint8_t *in, size_t len)
{
    if (len > c->max_msg - c->rx_len)
        return -EMSGSIZE;
    if (c->rx_len + len > c->rx_cap) {
        size_t cap = c->rx_cap ? c->rx_cap : 4096;
        uint8_t *p;

        while (cap < c->rx_len + len)
            cap = cap > SIZE_MAX / 2 ? SIZE_MAX : cap * 2;
        if (cap > c->max_msg)
            cap = c->max_msg;
        p = realloc(c->rx, cap);
        if (!p)
            return -ENOMEM;
        c->rx = p;
        c->rx_cap = cap;
    }
    memcpy(c->rx + c->rx_len, in, len);
    c->rx_len += len;
    return 0;
}

static int handle_rx(struct emx_conn *c, struct lws *wsi, uint8_t *in, size_t len)
{
    bool final = lws_is_final_fragment(wsi) != 0;
    int rc;

    if (c->state != CONN_OPEN || c->rx_drop)
        return 0;
    if (!c->rx_in_msg && !lws_frame_is_binary(wsi)) {
        c->rx_drop = true;
        return conn_close_now(c, 1003, "text frames are not accepted");
    }
    if (!c->rx_in_msg && final) {
        /* the common case: one frame, one buffer, no copy */
        if (len > c->max_msg) {
            c->rx_drop = true;
            return conn_close_now(c, 1009, "message too big");
        }
        c->cb->on_message(c->user, in, len);
        return 0;
    }
    c->rx_in_msg = true;
    rc = rx_append(c, in, len);
    if (rc) {
        c->rx_drop = true;
        return conn_close_now(c, rc == -EMSGSIZE ? 1009 : 1011,
                              rc == -EMSGSIZE ? "message too big" : "out of memory");
    }
    if (!final)
        return 0;
    c->rx_in_msg = false;
    c->cb->on_message(c->user, c->rx, c->rx_len);
    c->rx_len = 0;
    /* keep small buffers, give big ones back (idle edges must stay cheap) */
    if (c->rx_cap > 16384) {
        free(c->rx);
        c->rx = NULL;
        c->rx_cap = 0;
    }
    return 0;
}

/* ---- writeable ------------------------------------------------------------ */

/* Returning -1 from a writeable callback after lws_close_reason() does not
 * send the close frame with Debian's lws 4.1.6 on libuv (its debug build
 * closes the wsi a second time at once), so write the frame ourselves. */
int send_close_frame(struct emx_conn *c)
{
    uint8_t buf[LWS_PRE + 6 + 2 + WS_REASON_MAX];
    uint8_t *p = buf + LWS_PRE;
    size_t rl = strlen(c->close_reason), h = 0;

    if (rl > WS_REASON_MAX)
        rl = WS_REASON_MAX;
    p[h++] = 0x88; /* FIN + close */
    p[h++] = (uint8_t)(0x80 | (2 + rl));
    { /* a client masks; a zero key leaves the payload as is */
        memset(p + h, 0, 4);
        h += 4;
    }
    p[h++] = (uint8_t)(c->close_code >> 8);
    p[h++] = (uint8_t)c->close_code;
    memcpy(p + h, c->close_reason, rl);
    (void)lws_write(c->wsi, p, h + rl, LWS_WRITE_RAW);
    return -1;
}

static int handle_writeable(struct emx_conn *c)
{
    if (c->state != CONN_OPEN)
        return 0;
    if (queue_drain(c))
        return conn_close_now(c, 1006, "write failed");
    if (c->pp) {
        /* the socket took data: the peer reads */
        c->pp->tx_ok = uv_now(c->inst->loop);
        if (c->raw && raw_pong(c))
            return conn_close_now(c, 1006, "write failed");
        pipe_rx_update(c);
    }
    if (c->qh) {
        lws_callback_on_writable(c->wsi);
        return 0;
    }
    if (c->closing) {
        if (lws_partial_buffered(c->wsi)) {
            lws_callback_on_writable(c->wsi);
            return 0;
        }
        return send_close_frame(c);
    }
    if (c->was_queued) {
        c->was_queued = false;
        if (c->cb->on_writable)
            c->cb->on_writable(c->user);
    }
    return 0;
}

/* ---- permessage-deflate with bounded memory ------------------------------ */

static void pmd_set(struct lws_context *ctx, const struct lws_extension *ext, struct lws *wsi,
                    void *priv, const char *name, const char *value)
{
    struct lws_ext_option_arg oa = {.option_name = name, .start = value, .len = (int)strlen(value)};

    lws_extension_callback_pm_deflate(ctx, ext, wsi, LWS_EXT_CB_NAMED_OPTION_SET, priv, &oa, 0);
}

/* lws inflates with server_max_window_bits too, so shrinking it for memory
 * breaks clients that compress with a 15-bit window. Keep it at 15 for
 * inflate and lower it only around deflate calls (the deflate stream is
 * created on the first TX call and keeps its window). */
int pmd_wrapper(struct lws_context *ctx, const struct lws_extension *ext, struct lws *wsi,
                enum lws_extension_callback_reasons reason, void *user, void *in, size_t len)
{
    struct ws_instance *inst = lws_context_user(ctx);
    char bits[8];
    int rc;

    if (reason == LWS_EXT_CB_PAYLOAD_TX) {
        snprintf(bits, sizeof(bits), "%d", (int)inst->cfg.deflate_window_bits);
        pmd_set(ctx, ext, wsi, user, "server_max_window_bits", bits);
        pmd_set(ctx, ext, wsi, user, "client_max_window_bits", bits);
        rc = lws_extension_callback_pm_deflate(ctx, ext, wsi, reason, user, in, len);
        pmd_set(ctx, ext, wsi, user, "server_max_window_bits", "15");
        return rc;
    }
    rc = lws_extension_callback_pm_deflate(ctx, ext, wsi, reason, user, in, len);
    if (rc)
        return rc;
    switch (reason) {
    case LWS_EXT_CB_CONSTRUCT:
    case LWS_EXT_CB_CLIENT_CONSTRUCT: {
        void *priv = *(void **)user;

        snprintf(bits, sizeof(bits), "%d", (int)inst->cfg.deflate_mem_level);
        pmd_set(ctx, ext, wsi, priv, "mem_level", bits);
        inst->pmd_wsi = wsi;
        break;
    }
    case LWS_EXT_CB_OPTION_CONFIRM:
        pmd_set(ctx, ext, wsi, user, "server_max_window_bits", "15");
        break;
    default:
        break;
    }
    return 0;
}

/* Compressed frames are at most 1 << tx_buf_size: pick the largest power of
 * two that fits the peer's limit. Called before the first send. */
static void pmd_fit_frames(struct emx_conn *c)
{
    char v[8];
    int p = 6;

    while (p < 15 && (1u << (p + 1)) <= c->max_frame)
        p++;
    snprintf(v, sizeof(v), "%d", p);
    lws_set_extension_option(c->wsi, "permessage-deflate", "tx_buf_size", v);
}

/* ---- lws protocol callback ------------------------------------------------ */

struct emx_conn *conn_new(struct ws_instance *inst)
{
    struct emx_conn *c = ws_zalloc(sizeof(*c));

    if (c)
        c->inst = inst;
    return c;
}

void on_client_established(struct ws_instance *inst, struct emx_conn *c, struct lws *wsi)
{
    struct emx_conn_info info = {0};
    char peer[64];
    int fd = (int)lws_get_socket_fd(wsi);

    c->deflate = inst->pmd_wsi == wsi;
    inst->pmd_wsi = NULL;
    c->state = CONN_OPEN;
    c->max_frame = WS_MAX_FRAME; /* platforms take any frame; stay under 64-bit lengths */
    if (c->pp->sndbuf && fd >= 0)
        ws_set_int_opt(fd, SOL_SOCKET, SO_SNDBUF, (int)c->pp->sndbuf);
    ws_peer_string(fd, peer, sizeof(peer));
    info.peer = peer;
    info.deflate = c->deflate;
    info.tls = lws_is_ssl(wsi) != 0;
    if (c->deflate) {
        inst->pmd_conns++;
        pmd_fit_frames(c);
    }
    if (c->cb->on_open)
        c->cb->on_open(c->user, c, &info);
}

int ws_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in, size_t len)
{
    struct lws_context *ctx = wsi ? lws_get_context(wsi) : NULL;
    struct ws_instance *inst = ctx ? lws_context_user(ctx) : NULL;
    struct emx_conn *c;

    (void)user;
    if (!inst)
        return 0;
    switch (reason) {
    case LWS_CALLBACK_CLIENT_ESTABLISHED:
        c = lws_wsi_user(wsi);
        if (!c)
            return -1;
        c->wsi = wsi;
        if (c->closing)
            return conn_close_now(c, c->close_code, c->close_reason);
        on_client_established(inst, c, wsi);
        return 0;
    case LWS_CALLBACK_CLIENT_APPEND_HANDSHAKE_HEADER: {
        char **p = in;

        c = lws_wsi_user(wsi);
        if (!c || !c->pp || !p)
            return 0;
        c->wsi = wsi;
        if (c->pp->hdrs_len + 1 > len)
            return -1;
        memcpy(*p, c->pp->hdrs, c->pp->hdrs_len);
        *p += c->pp->hdrs_len;
        return 0;
    }
    case LWS_CALLBACK_RAW_ADOPT:
    case LWS_CALLBACK_RAW_CONNECTED:
        c = lws_wsi_user(wsi);
        if (!c || !c->raw || c->pp->raw_req_sent)
            return 0;
        c->wsi = wsi;
        if (c->closing)
            return -1;
        /* one timeout for the whole upgrade, cleared when it is answered */
        lws_set_timeout(wsi, PENDING_TIMEOUT_AWAITING_SERVER_RESPONSE,
                        (int)secs_of(inst->cfg.handshake_timeout));
        lws_callback_on_writable(wsi);
        return 0;
    case LWS_CALLBACK_RAW_RX:
        c = lws_wsi_user(wsi);
        if (!c || !c->raw)
            return 0;
        return raw_on_rx(inst, c, wsi, in, len);
    case LWS_CALLBACK_RAW_WRITEABLE:
        c = lws_wsi_user(wsi);
        if (!c || !c->raw)
            return 0;
        if (!c->pp->raw_req_sent && c->pp->req) {
            c->pp->raw_req_sent = true;
            memcpy(inst->scratch + LWS_PRE, c->pp->req, c->pp->req_len);
            return lws_write(wsi, inst->scratch + LWS_PRE, c->pp->req_len, LWS_WRITE_RAW) < 0 ? -1
                                                                                              : 0;
        }
        return handle_writeable(c);
    case LWS_CALLBACK_RECEIVE:
    case LWS_CALLBACK_CLIENT_RECEIVE:
        c = lws_wsi_user(wsi);
        if (!c)
            return 0;
        return handle_rx(c, wsi, in, len);
    case LWS_CALLBACK_SERVER_WRITEABLE:
    case LWS_CALLBACK_CLIENT_WRITEABLE:
        c = lws_wsi_user(wsi);
        if (!c)
            return 0;
        return handle_writeable(c);
    case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
        c = lws_wsi_user(wsi);
        if (c && !c->close_code) {
            const uint8_t *b = in;

            c->close_code = (b && len >= 2) ? (uint16_t)((b[0] << 8) | b[1]) : 1005;
            if (b && len > 2)
                snprintf(c->close_reason, sizeof(c->close_reason), "%.*s", (int)(len - 2),
                         (const char *)b + 2);
        }
        return 0;
    case LWS_CALLBACK_OPENSSL_PERFORM_SERVER_CERT_VERIFICATION:
        /* user: the X509_STORE_CTX, len: OpenSSL's verdict; lws decides */
        c = lws_wsi_user(wsi);
        if (c && c->pp && !len && user)
            c->pp->tls_verify_error =
                X509_verify_cert_error_string(X509_STORE_CTX_get_error((X509_STORE_CTX *)user));
        return 0;
    case LWS_CALLBACK_CLIENT_CONNECTION_ERROR:
        c = lws_wsi_user(wsi);
        if (c) {
            char why[WS_REASON_MAX + 1];

            c->wsi = c->wsi ? c->wsi : wsi;
            if (c->pp && c->pp->tls_verify_error) {
                snprintf(why, sizeof(why), "certificate check failed: %s", c->pp->tls_verify_error);
                conn_gone(c, 1006, why);
            } else {
                conn_gone(c, 1006, in ? (const char *)in : "connect failed");
            }
        }
        return 0;
    case LWS_CALLBACK_CLOSED:
    case LWS_CALLBACK_CLIENT_CLOSED:
    case LWS_CALLBACK_RAW_CLOSE:
    case LWS_CALLBACK_WSI_DESTROY:
        c = lws_wsi_user(wsi);
        if (c) {
            c->wsi = c->wsi ? c->wsi : wsi;
            conn_gone(c, inst->state >= INST_STOPPING ? 1001 : 1006,
                      inst->state >= INST_STOPPING ? "shutdown" : "connection lost");
        }
        return 0;
    default:
        return 0;
    }
}

/* ---- after each loop iteration: pipe writes, pmd stall fix ---------------- */

void check_cb(uv_check_t *h)
{
    struct ws_instance *inst = h->data;

    /* what this iteration's callbacks sent to pipes, in one write each */
    flush_pipes(inst);

    /* A compressed message that inflates past the pmd rx buffer waits for
     * the next network event unless lws is woken while it has work left. */
    if (inst->pmd_conns && inst->ctx && inst->state == INST_RUNNING &&
        !lws_service_adjust_timeout(inst->ctx, 1, 0))
        lws_cancel_service(inst->ctx);
}

/* ---- the transport calls for pipes ---------------------------------------- */

int pipe_send(struct emx_conn *c, const uint8_t *data, size_t len)
{
    size_t off = 0;
    int rc;

    if (!c || c->state != CONN_OPEN || c->closing || !c->wsi)
        return -EPIPE;
    if (!data && len)
        return -EINVAL;
    /* A platform that stops reading must not grow memory: past the cap
     * the core answers for itself (0xA0 to a device's request). */
    if (c->pp && c->qbytes >= pipe_cap(c->inst))
        return -ENOBUFS;
    if (c->raw) {
        rc = raw_send(c, 0x2, data, len);
        if (rc == -EIO)
            conn_kill(c, 1006, "write failed");
        else if (rc)
            conn_kill(c, 1011, "out of memory");
        else
            pipe_rx_update(c);
        return rc;
    }
    if (c->deflate || c->qh || lws_partial_buffered(c->wsi)) {
        bool idle = !c->qh && !lws_partial_buffered(c->wsi);

        rc = queue_push(c, data ? data : (const uint8_t *)"", len, 0);
        if (rc)
            return rc;
        if (idle && c->deflate) {
            if (queue_drain(c)) {
                conn_kill(c, 1006, "write failed");
                return -EIO;
            }
        }
        if (c->qh)
            lws_callback_on_writable(c->wsi);
        pipe_rx_update(c);
        return 0;
    }
    /* Nothing queued: write from the caller's bytes now (one copy into the
     * scratch frame; asking for a writeable callback per message halves
     * throughput on libuv). */
    do {
        size_t frag = len - off;
        int flags;

        if (frag > c->max_frame)
            frag = c->max_frame;
        if (frag)
            memcpy(c->inst->scratch + LWS_PRE, data + off, frag);
        flags = lws_write_ws_flags(LWS_WRITE_BINARY, off == 0, off + frag == len);
        if (lws_write(c->wsi, c->inst->scratch + LWS_PRE, frag, (enum lws_write_protocol)flags) <
            0) {
            conn_kill(c, 1006, "write failed");
            return -EIO;
        }
        off += frag;
    } while (off < len && !lws_partial_buffered(c->wsi));
    if (off < len) {
        rc = queue_push(c, data, len, off);
        if (rc) {
            /* half a message is on the wire: the stream cannot continue */
            conn_kill(c, 1011, "out of memory");
            return rc;
        }
        lws_callback_on_writable(c->wsi);
    }
    pipe_rx_update(c); /* a partial write: not read until it drains */
    return 0;
}

size_t pipe_buffered(struct emx_conn *c)
{
    size_t n;
    int q = 0;
    int fd;

    if (!c || c->state == CONN_GONE || !c->wsi)
        return 0;
    /* The core asks at the end of a loop iteration: what a pipe gathered
     * goes to the socket now, so a full gathering buffer (as large as the
     * default high watermark) never reads as a pipe that cannot keep up. */
    if (c->raw && c->pp->batch_len && raw_flush(c))
        conn_kill(c, 1006, "write failed");
    n = c->qbytes + (c->pp ? c->pp->batch_len : 0);
    fd = (int)lws_get_socket_fd(c->wsi);
    if (fd >= 0 && ioctl(fd, SIOCOUTQ, &q) == 0 && q > 0)
        n += (size_t)q;
    return n;
}

int pipe_pause_read(struct emx_conn *c, bool pause)
{
    if (!c || c->state == CONN_GONE || !c->wsi)
        return -ENOTCONN;
    if (c->pp) { /* pipes pause for reasons of their own too */
        c->pp->core_paused = pause;
        pipe_rx_update(c);
        return 0;
    }
    if (lws_rx_flow_control(c->wsi, pause ? 0 : 1) < 0)
        return -EIO;
    /* input lws buffered while paused is replayed from its idle handler */
    if (!pause)
        lws_kick(c->inst);
    return 0;
}

void pipe_close(struct emx_conn *c, uint16_t code, const char *reason)
{
    if (ws_is_edge(c)) {
        edge_close(c, code, reason);
        return;
    }
    if (c && c->state == CONN_CONNECTING && c->pp && c->pp->res) {
        /* still looking its host up: no socket yet, on_close follows */
        conn_gone(c, code ? code : 1000, reason);
        return;
    }
    if (!c || c->state == CONN_GONE || c->closing || !c->wsi)
        return;
    c->closing = true;
    c->close_code = code ? code : 1000;
    snprintf(c->close_reason, sizeof(c->close_reason), "%s", reason ? reason : "");
    if (c->state == CONN_CONNECTING) {
        lws_set_timeout(c->wsi, PENDING_TIMEOUT_KILLED_BY_PARENT, LWS_TO_KILL_ASYNC);
        lws_kick(c->inst);
        return;
    }
    /* Flush what is queued, then send the close frame from the writeable
     * callback; the timeout bounds a peer that stopped reading. */
    lws_set_timeout(c->wsi, PENDING_TIMEOUT_CLOSE_SEND, (int)secs_of(c->inst->cfg.close_timeout));
    lws_callback_on_writable(c->wsi);
    lws_kick(c->inst);
}
