/* Raw pipes: plain ws:// pipes without deflate run on an lws raw socket
 * with this file's own RFC 6455 client framing (lws 4.1's client parser
 * costs ~60 instructions per received byte and masks one byte at a time):
 * upgrade, masking, gathered writes, receive, pings and silence. */
#include "ws_int.h"

/* ---- raw pipes: RFC 6455 client framing ---------------------------------- */

static size_t raw_wire_len(const struct emx_conn *c, size_t len)
{
    size_t frames = len ? (len + c->max_frame - 1) / c->max_frame : 1;
    size_t last = len - (frames - 1) * c->max_frame;

    /* every frame but the last is max_frame (> 125) long */
    return len + (frames - 1) * RAW_HDR_MAX + (last > 125 ? 8 : 6);
}

static uint32_t raw_rand(struct emx_conn *c)
{
    /* xorshift32 seeded from lws's random source: mask keys only need to be
     * unpredictable to scripts in a browser, which pipes never carry */
    uint32_t x = c->pp->rng;

    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return c->pp->rng = x;
}

/* Frame a whole message (fragmented at max_frame) into dst, which holds
 * raw_wire_len() bytes. Returns the bytes written. */
static size_t raw_frame(struct emx_conn *c, uint8_t *dst, uint8_t op, const uint8_t *data,
                        size_t len)
{
    size_t off = 0, w = 0;

    do {
        size_t frag = len - off;
        uint32_t r = raw_rand(c);
        uint8_t key[4];

        if (frag > c->max_frame)
            frag = c->max_frame;
        dst[w++] = (uint8_t)((off + frag == len ? 0x80 : 0) | (off == 0 ? op : 0));
        if (frag > 125) {
            dst[w++] = 0x80 | 126;
            dst[w++] = (uint8_t)(frag >> 8);
            dst[w++] = (uint8_t)frag;
        } else {
            dst[w++] = (uint8_t)(0x80 | frag);
        }
        memcpy(key, &r, 4);
        memcpy(dst + w, key, 4);
        w += 4;
        if (frag)
            ws_mask_copy(dst + w, data + off, frag, key);
        w += frag;
        off += frag;
    } while (off < len);
    return w;
}

size_t pipe_cap(const struct ws_instance *inst)
{
    uint64_t cap = inst->cfg.pipe_max_queued;

    if (cap < PIPE_QUEUED_MIN)
        cap = PIPE_QUEUED_MIN;
    return cap > SIZE_MAX / 2 ? SIZE_MAX / 2 : (size_t)cap;
}

/* Read a pipe only while what it sends can be answered: paused while the
 * core asks, while its control frames are over budget, while its queue is
 * over pipe_max_queued (until half of it drained) and while lws holds a
 * partial write. lws 4.1.6 reads nothing from a raw socket with a partial
 * write, and the level-triggered POLLIN it leaves armed spins the loop. */
void pipe_rx_update(struct emx_conn *c)
{
    struct ws_pipe *pp = c->pp;
    size_t cap = pipe_cap(c->inst);
    bool want;

    if (!pp || c->state != CONN_OPEN || !c->wsi)
        return;
    if (c->qbytes >= cap)
        pp->over_cap = true;
    else if (c->qbytes <= cap / 2)
        pp->over_cap = false;
    want = pp->core_paused || pp->ctl_paused || pp->over_cap || lws_partial_buffered(c->wsi);
    if (want == pp->rx_paused)
        return;
    pp->rx_paused = want;
    (void)lws_rx_flow_control(c->wsi, want ? 0 : 1);
    if (!want)
        lws_kick(c->inst); /* replays what lws buffered meanwhile */
}

/* Write what a pipe gathered: one system call for every frame the loop
 * iteration produced. lws keeps what the socket does not take. */
int raw_flush(struct emx_conn *c)
{
    size_t n = c->pp->batch_len;

    if (!n || !c->wsi)
        return 0;
    c->pp->batch_len = 0;
    if (lws_write(c->wsi, c->pp->batch + LWS_PRE, n, LWS_WRITE_RAW) < 0)
        return -EIO;
    if (lws_partial_buffered(c->wsi)) {
        c->was_queued = true; /* on_writable once lws has written the rest */
        pipe_rx_update(c);
    }
    return 0;
}

/* RFC 6455 5.5.3: only the latest ping needs its pong. It goes out when
 * nothing is queued, so a peer flooding pings and not reading costs one
 * pending pong, not a queue of them. */
int raw_pong(struct emx_conn *c)
{
    if (!c->pp->pong_owed || c->state != CONN_OPEN || c->closing || !c->wsi || c->qh ||
        lws_partial_buffered(c->wsi))
        return 0;
    c->pp->pong_owed = false;
    return raw_send(c, 0xA, c->pp->pong, c->pp->pong_len);
}

void flush_pipes(struct ws_instance *inst)
{
    struct emx_conn *c, *n;

    for (c = inst->pipes; c; c = n) {
        n = c->pp->pnext;
        if ((c->pp->pong_owed && raw_pong(c)) || (c->pp->batch_len && raw_flush(c)))
            conn_kill(c, 1006, "write failed");
    }
}

void flush_prep_cb(uv_prepare_t *h)
{
    flush_pipes(h->data);
}

/* Send one message or control frame on a raw pipe. When nothing waits,
 * small frames are gathered for one write per loop iteration and larger
 * ones framed into the scratch buffer and written at once; otherwise the
 * frame goes to the queue. */
int raw_send(struct emx_conn *c, uint8_t op, const uint8_t *data, size_t len)
{
    size_t wire = raw_wire_len(c, len);
    struct ws_qmsg *m;
    bool idle = !c->qh && !lws_partial_buffered(c->wsi);

    if (idle && wire <= BATCH_FRAME_MAX && c->inst->state == INST_RUNNING) {
        if (c->pp->batch_len + wire > BATCH_CAP && raw_flush(c))
            return -EIO;
        if (!c->pp->batch)
            c->pp->batch = malloc(LWS_PRE + BATCH_CAP);
        if (c->pp->batch && !lws_partial_buffered(c->wsi)) {
            c->pp->batch_len +=
                raw_frame(c, c->pp->batch + LWS_PRE + c->pp->batch_len, op, data, len);
            return 0;
        }
    }
    /* what was gathered goes first */
    if (raw_flush(c))
        return -EIO;
    idle = !c->qh && !lws_partial_buffered(c->wsi);
    if (idle && wire <= RAW_HDR_MAX + WS_MAX_FRAME) {
        uint8_t *f = c->inst->scratch + LWS_PRE;

        raw_frame(c, f, op, data, len);
        /* lws keeps what the socket does not take and reports it partial */
        return lws_write(c->wsi, f, wire, LWS_WRITE_RAW) < 0 ? -EIO : 0;
    }
    if (len > SIZE_MAX / 2)
        return -EMSGSIZE;
    m = malloc(sizeof(*m) + LWS_PRE + wire);
    if (!m)
        return -ENOMEM;
    m->next = NULL;
    m->len = raw_frame(c, m->buf + LWS_PRE, op, data, len);
    m->off = 0;
    m->inflight = false;
    if (c->qt)
        c->qt->next = m;
    else
        c->qh = m;
    c->qt = m;
    c->qbytes += m->len;
    c->was_queued = true;
    if (idle && queue_drain(c))
        return -EIO;
    if (c->qh)
        lws_callback_on_writable(c->wsi);
    return 0;
}

/* ---- raw pipes: upgrade and receive --------------------------------------- */

static const char ws_guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/* The upgrade request and the Sec-WebSocket-Accept it must be answered with. */
int raw_build_request(struct emx_conn *c, const char *path, const char *hosthdr)
{
    struct lws_context *ctx = c->inst->ctx;
    uint8_t nonce[16], sha[20];
    char key[32], cat[32 + sizeof(ws_guid)];
    size_t n;
    int w;

    if (lws_get_random(ctx, nonce, sizeof(nonce)) != sizeof(nonce) ||
        lws_get_random(ctx, &c->pp->rng, sizeof(c->pp->rng)) != sizeof(c->pp->rng))
        return -EIO;
    if (!c->pp->rng)
        c->pp->rng = 0x9e3779b9u; /* xorshift must not start at 0 */
    if (lws_b64_encode_string((const char *)nonce, sizeof(nonce), key, sizeof(key)) <= 0)
        return -EIO;
    snprintf(cat, sizeof(cat), "%s%s", key, ws_guid);
    lws_SHA1((const unsigned char *)cat, strlen(cat), sha);
    if (lws_b64_encode_string((const char *)sha, sizeof(sha), c->pp->accept,
                              sizeof(c->pp->accept)) <= 0)
        return -EIO;
    n = strlen(path) + 2 * strlen(hosthdr) + c->pp->hdrs_len + 200;
    c->pp->req = malloc(n);
    if (!c->pp->req)
        return -ENOMEM;
    w = snprintf(c->pp->req, n,
                 "GET %s HTTP/1.1\r\nHost: %s\r\nOrigin: %s\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
                 "%.*s\r\n",
                 path, hosthdr, hosthdr, key, (int)c->pp->hdrs_len, c->pp->hdrs ? c->pp->hdrs : "");
    if (w < 0 || (size_t)w >= n || (size_t)w > WS_MAX_FRAME)
        return -EINVAL;
    c->pp->req_len = (size_t)w;
    return 0;
}

/* A client masks; a zero key leaves the payload as is. No close frame while
 * lws holds a partial write (it must not be interleaved). Returns -1. */
static int raw_close_now(struct emx_conn *c, uint16_t code, const char *reason)
{
    if (!c->close_code)
        c->close_code = code;
    if (reason && !c->close_reason[0])
        snprintf(c->close_reason, sizeof(c->close_reason), "%s", reason);
    if (!c->wsi || raw_flush(c) || lws_partial_buffered(c->wsi))
        return -1;
    if (c->close_code == 1005 || c->close_code == 1006) {
        static const uint8_t empty[] = {0x88, 0x80, 0, 0, 0, 0};
        uint8_t buf[LWS_PRE + sizeof(empty)];

        memcpy(buf + LWS_PRE, empty, sizeof(empty));
        (void)lws_write(c->wsi, buf + LWS_PRE, sizeof(empty), LWS_WRITE_RAW);
        return -1;
    }
    return send_close_frame(c);
}

static int raw_frame_end(struct emx_conn *c)
{
    switch (c->pp->raw_op) {
    case 0x9: /* ping: its pong goes out from flush_pipes (raw_pong) */
        memcpy(c->pp->pong, c->pp->ctl, c->pp->ctl_len);
        c->pp->pong_len = c->pp->ctl_len;
        c->pp->pong_owed = true;
        return 0;
    case 0xA:
        return 0;
    case 0x8: { /* the peer closes: keep its code, echo it, hang up */
        uint16_t code =
            c->pp->ctl_len >= 2 ? (uint16_t)((c->pp->ctl[0] << 8) | c->pp->ctl[1]) : 1005;

        if (!c->close_code) {
            c->close_code = code;
            if (c->pp->ctl_len > 2)
                snprintf(c->close_reason, sizeof(c->close_reason), "%.*s",
                         (int)(c->pp->ctl_len - 2), (const char *)c->pp->ctl + 2);
        }
        return raw_close_now(c, code, NULL);
    }
    default:
        if (!c->pp->raw_fin)
            return 0;
        c->rx_in_msg = false;
        c->cb->on_message(c->user, c->rx ? c->rx : c->pp->ctl, c->rx_len);
        c->rx_len = 0;
        if (c->rx_cap > 16384) {
            free(c->rx);
            c->rx = NULL;
            c->rx_cap = 0;
        }
        return 0;
    }
}

static size_t raw_hdr_need(const uint8_t *fh)
{
    uint8_t l7 = fh[1] & 0x7f;

    return 2 + (l7 == 126 ? 2 : l7 == 127 ? 8 : 0) + ((fh[1] & 0x80) ? 4 : 0);
}

static int raw_header(struct emx_conn *c)
{
    uint8_t b0 = c->pp->fh[0], b1 = c->pp->fh[1], op = b0 & 0x0f, l7 = b1 & 0x7f;
    bool fin = (b0 & 0x80) != 0;
    uint64_t plen = l7;
    int i;

    c->pp->fh_len = 0;
    /* no extension is negotiated and servers never mask */
    if ((b0 & 0x70) || (b1 & 0x80))
        return raw_close_now(c, 1002, "protocol error");
    if (l7 == 126) {
        plen = (uint64_t)c->pp->fh[2] << 8 | c->pp->fh[3];
    } else if (l7 == 127) {
        plen = 0;
        for (i = 0; i < 8; i++)
            plen = plen << 8 | c->pp->fh[2 + i];
        if (plen >> 63)
            return raw_close_now(c, 1002, "protocol error");
    }
    if (op >= 0x8) {
        if (!fin || plen > 125 || op > 0xA)
            return raw_close_now(c, 1002, "protocol error");
        c->pp->ctl_len = 0;
        /* a ping flood is read at a bounded rate (the rest of this read is
         * parsed, then lws reads no more until the next tick) */
        if (op != 0x8 && ++c->pp->ctl_count >= RAW_CTL_BUDGET && !c->pp->ctl_paused) {
            c->pp->ctl_paused = true;
            pipe_rx_update(c);
        }
    } else if (op == 0x1) {
        return raw_close_now(c, 1003, "text frames are not accepted");
    } else if ((op == 0x0) != c->rx_in_msg || op > 0x2) {
        return raw_close_now(c, 1002, "protocol error");
    } else if (plen > c->max_msg - c->rx_len) {
        return raw_close_now(c, 1009, "message too big");
    }
    c->pp->raw_op = op;
    c->pp->raw_fin = fin;
    if (op < 0x8)
        c->rx_in_msg = !fin || c->rx_in_msg;
    c->pp->f_left = plen;
    c->pp->raw_hdr = true;
    if (plen)
        return 0;
    c->pp->raw_hdr = false;
    return raw_frame_end(c);
}

/* Frames from the platform: headers byte by byte (at most 14), payloads in
 * bulk; a message that is one frame inside this read is passed without a copy. */
static int raw_rx(struct emx_conn *c, uint8_t *in, size_t len)
{
    int rc;

    while (len && c->state == CONN_OPEN) {
        size_t take;

        if (!c->pp->raw_hdr) {
            c->pp->fh[c->pp->fh_len++] = *in++;
            len--;
            if (c->pp->fh_len < 2 || c->pp->fh_len < raw_hdr_need(c->pp->fh))
                continue;
            rc = raw_header(c);
            if (rc)
                return rc;
            continue;
        }
        take = c->pp->f_left < len ? (size_t)c->pp->f_left : len;
        if (c->pp->raw_op >= 0x8) {
            memcpy(c->pp->ctl + c->pp->ctl_len, in, take);
            c->pp->ctl_len = (uint8_t)(c->pp->ctl_len + take);
        } else if (!c->rx_len && c->pp->raw_fin && c->pp->raw_op == 0x2 && take == c->pp->f_left) {
            c->pp->f_left = 0;
            c->pp->raw_hdr = false;
            c->rx_in_msg = false;
            c->cb->on_message(c->user, in, take);
            in += take;
            len -= take;
            continue;
        } else if ((rc = rx_append(c, in, take)) != 0) {
            return raw_close_now(c, rc == -EMSGSIZE ? 1009 : 1011,
                                 rc == -EMSGSIZE ? "message too big" : "out of memory");
        }
        in += take;
        len -= take;
        c->pp->f_left -= take;
        if (!c->pp->f_left) {
            c->pp->raw_hdr = false;
            rc = raw_frame_end(c);
            if (rc)
                return rc;
        }
    }
    return 0;
}

/* The upgrade answer: gathered in c->rx up to the blank line, checked, then
 * the bytes after it are frames. */
static int raw_upgrade_rx(struct ws_instance *inst, struct emx_conn *c, struct lws *wsi,
                          uint8_t *in, size_t len)
{
    size_t start = c->rx_len > 3 ? c->rx_len - 3 : 0, i, hl = 0, rest;
    const char *line;
    bool ok = false;

    if (c->rx_len + len + 1 > 16384)
        return raw_close_now(c, 1006, "upgrade answer too long");
    if (rx_append(c, in, len) || rx_append(c, (const uint8_t *)"", 1))
        return raw_close_now(c, 1006, "out of memory");
    c->rx_len--; /* the NUL stays after the data */
    for (i = start; i + 4 <= c->rx_len; i++)
        if (!memcmp(c->rx + i, "\r\n\r\n", 4)) {
            hl = i + 4;
            break;
        }
    if (!hl)
        return 0;
    if (strncmp((char *)c->rx, "HTTP/1.1 101", 12) != 0) {
        char why[64];

        snprintf(why, sizeof(why), "upgrade refused: %.*s", (int)strcspn((char *)c->rx, "\r\n"),
                 (char *)c->rx);
        return raw_close_now(c, 1006, why);
    }
    for (line = (char *)c->rx; line && line < (char *)c->rx + hl;) {
        if (!strncasecmp(line, "sec-websocket-accept:", 21)) {
            const char *v = line + 21;
            size_t vl;

            v += strspn(v, " \t");
            vl = strcspn(v, " \t\r\n");
            ok = vl == strlen(c->pp->accept) && !memcmp(v, c->pp->accept, vl);
        }
        line = strstr(line, "\r\n");
        if (line)
            line += 2;
    }
    if (!ok)
        return raw_close_now(c, 1006, "bad Sec-WebSocket-Accept");
    rest = c->rx_len - hl;
    c->rx_len = 0;
    free(c->pp->req);
    c->pp->req = NULL;
    lws_set_timeout(wsi, NO_PENDING_TIMEOUT, 0);
    c->pp->last_rx = c->pp->last_ping = c->pp->tx_ok = uv_now(inst->loop);
    c->pp->pnext = inst->pipes;
    if (inst->pipes)
        inst->pipes->pp->pprev = c;
    inst->pipes = c;
    on_client_established(inst, c, wsi);
    /* frames that came with the answer (input after it is at the end of `in`) */
    free(c->rx);
    c->rx = NULL;
    c->rx_cap = 0;
    return rest ? raw_rx(c, in + len - rest, rest) : 0;
}

int raw_on_rx(struct ws_instance *inst, struct emx_conn *c, struct lws *wsi, uint8_t *in,
              size_t len)
{
    if (c->state == CONN_GONE)
        return 0;
    if (c->state == CONN_CONNECTING) {
        if (c->closing)
            return -1;
        return raw_upgrade_rx(inst, c, wsi, in, len);
    }
    c->pp->last_rx = uv_now(inst->loop);
    return raw_rx(c, in, len);
}

/* ---- raw pipes: pings and silence ----------------------------------------- */

void pipe_timer_cb(uv_timer_t *t)
{
    struct ws_instance *inst = t->data;
    uint64_t now = uv_now(inst->loop);
    uint64_t ping = inst->cfg.ping_interval, hangup = inst->cfg.idle_read_timeout;
    struct emx_conn *c, *n;

    resolve_expire(inst, now);
    for (c = inst->pipes; c; c = n) {
        n = c->pp->pnext;
        if (c->state != CONN_OPEN || c->closing || !c->wsi)
            continue;
        /* A platform that keeps the control budget used up tick after tick
         * (pings queued by the megabyte while it stopped reading) would
         * keep this pipe "up" and never let a data message through: close
         * it after idle_read_timeout of that, so it is connected anew. */
        if (c->pp->ctl_count >= RAW_CTL_BUDGET) {
            if (!c->pp->ctl_flood_since)
                c->pp->ctl_flood_since = now;
        } else {
            c->pp->ctl_flood_since = 0;
        }
        c->pp->ctl_count = 0;
        c->pp->ctl_paused = false;
        if (hangup && c->pp->ctl_flood_since && now - c->pp->ctl_flood_since >= hangup) {
            conn_kill(c, 1008, "control frame flood from the platform");
            continue;
        }
        pipe_rx_update(c);
        if (!c->qh && !lws_partial_buffered(c->wsi))
            c->pp->tx_ok = now;
        if (c->pp->rx_paused)
            c->pp->last_rx = now; /* silence while we do not read is ours */
        if (hangup && now - c->pp->tx_ok >= hangup) {
            conn_kill(c, 1006, "stalled: the platform stopped reading");
        } else if (hangup && now - c->pp->last_rx >= hangup) {
            conn_kill(c, 1006, "no data or pong from the peer");
        } else if (ping && now - c->pp->last_rx >= ping && now - c->pp->last_ping >= ping) {
            c->pp->last_ping = now;
            if (raw_send(c, 0x9, NULL, 0))
                conn_kill(c, 1006, "write failed");
        }
    }
}
