/* WebSocket framing, handshakes and socket I/O for the test tools (ws.h). */
#include "ws.h"

#include <ctype.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#define SCRATCH_SIZE        (64 * 1024)
#define DEFAULT_MAX_MESSAGE (64u * 1024 * 1024)

static const char ws_guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/* Per-thread buffers: reads land in `rd`, frames are built in `enc`, and
 * messages inflate into `inf`. Only one callback runs at a time per thread. */
struct growbuf {
    uint8_t *p;
    size_t cap;
};
static _Thread_local uint8_t *rd_scratch;
static _Thread_local struct growbuf enc_buf, inf_buf, def_buf;
/* Messages sent to the connection whose input is being processed gather in
 * `cork_buf` and go out in one write once that input is done (on_read): a
 * pipe bringing many requests in one read is answered with one system call,
 * as a server that flushes once per read does. */
static _Thread_local struct growbuf cork_buf;
static _Thread_local size_t cork_len;
static _Thread_local struct ws_conn *cork_conn;

static int grow(struct growbuf *b, size_t need)
{
    if (b->cap >= need)
        return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < need)
        cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

void ws_thread_cleanup(void)
{
    free(rd_scratch);
    rd_scratch = NULL;
    free(enc_buf.p);
    free(inf_buf.p);
    free(def_buf.p);
    free(cork_buf.p);
    enc_buf = inf_buf = def_buf = cork_buf = (struct growbuf){0};
    cork_len = 0;
}

/* ---- HTTP ---- */

bool ws_str_ieq(struct ws_str s, const char *c)
{
    size_t n = strlen(c);
    return s.n == n && strncasecmp(s.p, c, n) == 0;
}

static struct ws_str trim(const char *p, size_t n)
{
    while (n && (*p == ' ' || *p == '\t')) {
        p++;
        n--;
    }
    while (n && (p[n - 1] == ' ' || p[n - 1] == '\t'))
        n--;
    return (struct ws_str){p, n};
}

bool ws_str_has_token(struct ws_str s, const char *token)
{
    size_t i = 0;
    while (i <= s.n) {
        size_t j = i;
        while (j < s.n && s.p[j] != ',')
            j++;
        struct ws_str t = trim(s.p + i, j - i);
        /* A token may carry ";params" (extensions). */
        size_t k = 0;
        while (k < t.n && t.p[k] != ';')
            k++;
        if (ws_str_ieq(trim(t.p, k), token))
            return true;
        i = j + 1;
    }
    return false;
}

static bool is_tchar(char c)
{
    return isalnum((unsigned char)c) || strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

long ws_http_parse(const char *buf, size_t len, bool response, struct ws_http *out)
{
    size_t lim = len < WS_MAX_HTTP ? len : WS_MAX_HTTP;
    const char *end = NULL;
    for (size_t i = 0; i + 3 < lim; i++) {
        if (buf[i] == '\r' && buf[i + 1] == '\n' && buf[i + 2] == '\r' && buf[i + 3] == '\n') {
            end = buf + i + 2; /* points at the blank line's CRLF */
            break;
        }
    }
    if (!end)
        return len >= WS_MAX_HTTP ? -1 : 0;
    memset(out, 0, sizeof(*out));
    const char *p = buf;
    const char *eol = memchr(p, '\r', (size_t)(end - p));
    if (!eol || eol[1] != '\n')
        return -1;
    /* First line. */
    const char *sp1 = memchr(p, ' ', (size_t)(eol - p));
    if (!sp1)
        return -1;
    if (response) {
        if ((size_t)(sp1 - p) != 8 || strncmp(p, "HTTP/1.", 7) != 0)
            return -1;
        if (eol - sp1 < 4 || !isdigit((unsigned char)sp1[1]) || !isdigit((unsigned char)sp1[2]) ||
            !isdigit((unsigned char)sp1[3]) || (eol - sp1 > 4 && sp1[4] != ' '))
            return -1;
        out->status = (sp1[1] - '0') * 100 + (sp1[2] - '0') * 10 + (sp1[3] - '0');
    } else {
        const char *sp2 = memchr(sp1 + 1, ' ', (size_t)(eol - sp1 - 1));
        if (!sp2 || sp2 == sp1 + 1)
            return -1;
        out->method = (struct ws_str){p, (size_t)(sp1 - p)};
        out->path = (struct ws_str){sp1 + 1, (size_t)(sp2 - sp1 - 1)};
        out->version = (struct ws_str){sp2 + 1, (size_t)(eol - sp2 - 1)};
        if (out->method.n == 0 || !ws_str_ieq(out->version, "HTTP/1.1"))
            return -1;
    }
    p = eol + 2;
    while (p < end) {
        eol = memchr(p, '\r', (size_t)(end - p) + 1);
        if (!eol || eol[1] != '\n')
            return -1;
        const char *colon = memchr(p, ':', (size_t)(eol - p));
        if (!colon || colon == p)
            return -1; /* also refuses obsolete line folding */
        for (const char *q = p; q < colon; q++)
            if (!is_tchar(*q))
                return -1;
        for (const char *q = colon + 1; q < eol; q++)
            if ((unsigned char)*q < 0x20 && *q != '\t')
                return -1;
        if (out->count == WS_MAX_HEADERS)
            return -1;
        out->names[out->count] = (struct ws_str){p, (size_t)(colon - p)};
        out->values[out->count] = trim(colon + 1, (size_t)(eol - colon - 1));
        out->count++;
        p = eol + 2;
    }
    return (long)(end - buf) + 2;
}

const struct ws_str *ws_http_header(const struct ws_http *h, const char *name)
{
    for (unsigned i = 0; i < h->count; i++)
        if (ws_str_ieq(h->names[i], name))
            return &h->values[i];
    return NULL;
}

int ws_accept_key(const char *key, size_t key_len, char out[29])
{
    if (key_len > 64)
        return -1;
    char tmp[64 + sizeof(ws_guid)];
    memcpy(tmp, key, key_len);
    memcpy(tmp + key_len, ws_guid, sizeof(ws_guid) - 1);
    unsigned char md[SHA_DIGEST_LENGTH];
    SHA1((const unsigned char *)tmp, key_len + sizeof(ws_guid) - 1, md);
    if (EVP_EncodeBlock((unsigned char *)out, md, SHA_DIGEST_LENGTH) != 28)
        return -1;
    out[28] = '\0';
    return 0;
}

/* ---- framing ---- */

size_t ws_encode(bool client, int opcode, bool rsv1, const uint8_t *data, size_t len,
                 uint32_t max_frame, uint8_t **out)
{
    size_t per = (max_frame == 0 || len <= max_frame) ? (len ? len : 1) : max_frame;
    size_t frames = len ? (len + per - 1) / per : 1;
    if (grow(&enc_buf, len + frames * 14) != 0)
        return 0;
    uint8_t *o = enc_buf.p;
    size_t off = 0, pos = 0;
    for (size_t f = 0; f < frames; f++) {
        size_t n = len - off < per ? len - off : per;
        bool fin = f == frames - 1;
        o[pos++] = (uint8_t)((fin ? 0x80 : 0) | (f == 0 && rsv1 ? 0x40 : 0) |
                             (f == 0 ? opcode : WS_OP_CONT));
        uint8_t m = client ? 0x80 : 0;
        if (n < 126) {
            o[pos++] = (uint8_t)(m | n);
        } else if (n <= 0xFFFF) {
            o[pos++] = m | 126;
            o[pos++] = (uint8_t)(n >> 8);
            o[pos++] = (uint8_t)n;
        } else {
            o[pos++] = m | 127;
            for (int i = 7; i >= 0; i--)
                o[pos++] = (uint8_t)((uint64_t)n >> (8 * i));
        }
        if (client) {
            /* The SDK masks with an all-zero key: the payload is unchanged. */
            memset(o + pos, 0, 4);
            pos += 4;
        }
        if (n)
            memcpy(o + pos, data + off, n);
        pos += n;
        off += n;
    }
    *out = o;
    return pos;
}

/* ---- socket I/O ---- */

struct wreq {
    uv_write_t req;
    size_t len;
    uint8_t data[];
};

static void on_closed(uv_handle_t *h)
{
    struct ws_conn *c = h->data;
    if (!c->closed_notified) {
        c->closed_notified = true;
        if (c->h->on_close)
            c->h->on_close(c);
    }
    if (c->inflater) {
        inflateEnd(c->inflater);
        free(c->inflater);
    }
    if (c->deflater) {
        deflateEnd(c->deflater);
        free(c->deflater);
    }
    free(c->rbuf);
    free(c->mbuf);
    free(c->accept);
    free(c);
}

void ws_abort(struct ws_conn *c, const char *reason, bool reset)
{
    if (c->state == WS_CLOSED)
        return;
    c->state = WS_CLOSED;
    if (!c->reason)
        c->reason = reason;
    uv_read_stop((uv_stream_t *)&c->tcp);
    if (!reset || uv_tcp_close_reset(&c->tcp, on_closed) != 0)
        uv_close((uv_handle_t *)&c->tcp, on_closed);
}

static void on_written(uv_write_t *req, int status)
{
    struct wreq *w = (struct wreq *)req;
    struct ws_conn *c = req->handle->data;
    c->queued -= w->len;
    free(w);
    if (status < 0) {
        ws_abort(c, "write failed", false);
        return;
    }
    if (c->queued == 0) {
        if (c->close_after_write)
            ws_abort(c, NULL, false);
        else if (c->h->on_drain && c->state == WS_OPEN)
            c->h->on_drain(c);
    }
}

static int write_now(struct ws_conn *c, const void *data, size_t len)
{
    size_t off = 0;
    if (c->queued == 0) {
        uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
        int r = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
        if (r > 0)
            off = (size_t)r;
        else if (r != UV_EAGAIN && r != UV_ENOSYS) {
            ws_abort(c, "write failed", false);
            return -1;
        }
    }
    if (off == len)
        return 0;
    size_t n = len - off;
    struct wreq *w = malloc(sizeof(*w) + n);
    if (!w) {
        ws_abort(c, "out of memory", false);
        return -1;
    }
    memcpy(w->data, (const uint8_t *)data + off, n);
    w->len = n;
    uv_buf_t b = uv_buf_init((char *)w->data, (unsigned)n);
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_written) != 0) {
        free(w);
        ws_abort(c, "write failed", false);
        return -1;
    }
    c->queued += n;
    return 0;
}

/* Write what was gathered for `c` now (before anything else goes to it). */
static int uncork(struct ws_conn *c)
{
    if (c != cork_conn || cork_len == 0)
        return 0;
    size_t n = cork_len;
    cork_len = 0;
    return write_now(c, cork_buf.p, n);
}

int ws_write_raw(struct ws_conn *c, const void *data, size_t len)
{
    if (c->state == WS_CLOSED || c->state == WS_CONNECTING)
        return -1;
    if (uncork(c))
        return -1;
    c->stats.bytes_out += len;
    return write_now(c, data, len);
}

static z_stream *get_deflater(struct ws_conn *c)
{
    if (c->deflater)
        return c->deflater;
    z_stream *z = calloc(1, sizeof(*z));
    if (!z)
        return NULL;
    int bits = c->tx_window_bits ? c->tx_window_bits : 15;
    if (bits < 9)
        bits = 9; /* zlib's raw deflate cannot do 8 */
    if (deflateInit2(z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -bits, 8, Z_DEFAULT_STRATEGY) != Z_OK) {
        free(z);
        return NULL;
    }
    c->deflater = z;
    return z;
}

/* Compress one message into def_buf without the trailing 00 00 FF FF. */
static long compress_msg(struct ws_conn *c, const uint8_t *data, size_t len)
{
    z_stream *z = get_deflater(c);
    if (!z || grow(&def_buf, len + len / 8 + 64) != 0)
        return -1;
    z->next_in = (Bytef *)data;
    z->avail_in = (uInt)len;
    size_t out = 0;
    for (;;) {
        if (def_buf.cap - out < 64 && grow(&def_buf, def_buf.cap * 2) != 0)
            return -1;
        z->next_out = def_buf.p + out;
        z->avail_out = (uInt)(def_buf.cap - out);
        int rc = deflate(z, Z_SYNC_FLUSH);
        out = def_buf.cap - z->avail_out;
        if (rc != Z_OK && rc != Z_BUF_ERROR)
            return -1;
        if (z->avail_in == 0 && z->avail_out > 0)
            break;
    }
    if (out < 4 || memcmp(def_buf.p + out - 4, "\x00\x00\xff\xff", 4) != 0)
        return -1;
    if (c->tx_no_ctx)
        deflateReset(z);
    return (long)(out - 4);
}

int ws_send(struct ws_conn *c, int opcode, const void *data, size_t len)
{
    if (c->state != WS_OPEN)
        return -1;
    const uint8_t *payload = data;
    bool rsv1 = false;
    if (c->deflate) {
        long n = compress_msg(c, data, len);
        if (n < 0) {
            ws_abort(c, "deflate failed", false);
            return -1;
        }
        payload = def_buf.p;
        len = (size_t)n;
        rsv1 = true;
    }
    uint8_t *out;
    /* Fragment after compression: every frame stays within the peer's size. */
    size_t n = ws_encode(c->role == WS_CLIENT, opcode, rsv1, payload, len, c->tx_max_frame, &out);
    if (n == 0) {
        ws_abort(c, "out of memory", false);
        return -1;
    }
    c->stats.msgs_out++;
    if (c == cork_conn && c->queued == 0 && grow(&cork_buf, cork_len + n) == 0) {
        memcpy(cork_buf.p + cork_len, out, n);
        cork_len += n;
        c->stats.bytes_out += n;
        return 0;
    }
    return ws_write_raw(c, out, n);
}

int ws_send_control(struct ws_conn *c, int opcode, const void *data, size_t len)
{
    if (c->state != WS_OPEN || len > 125)
        return -1;
    uint8_t *out;
    size_t n = ws_encode(c->role == WS_CLIENT, opcode, false, data, len, 0, &out);
    return n ? ws_write_raw(c, out, n) : -1;
}

void ws_close(struct ws_conn *c, uint16_t code, const char *reason)
{
    if (c->state != WS_OPEN) {
        ws_abort(c, "closed locally", false);
        return;
    }
    uint8_t buf[125];
    size_t rl = reason ? strlen(reason) : 0;
    if (rl > sizeof(buf) - 2)
        rl = sizeof(buf) - 2;
    buf[0] = (uint8_t)(code >> 8);
    buf[1] = (uint8_t)code;
    if (rl)
        memcpy(buf + 2, reason, rl);
    ws_send_control(c, WS_OP_CLOSE, buf, rl + 2);
    if (c->state == WS_CLOSED)
        return;
    c->state = WS_CLOSING;
    if (!c->reason)
        c->reason = "closed locally";
    if (c->queued == 0)
        ws_abort(c, NULL, false);
    else
        c->close_after_write = true;
}

void ws_pause_read(struct ws_conn *c, bool pause);

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

void ws_pause_read(struct ws_conn *c, bool pause)
{
    if (c->state == WS_CLOSED || c->state == WS_CONNECTING || c->reading_paused == pause)
        return;
    c->reading_paused = pause;
    if (pause)
        uv_read_stop((uv_stream_t *)&c->tcp);
    else
        uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

/* ---- receive ---- */

static void fail(struct ws_conn *c, const char *reason, uint16_t code)
{
    /* Tell the peer why when we can; the SDK just drops, and so does a
     * client here, so the reason is visible on both ends. */
    c->reason = reason;
    if (code && c->state == WS_OPEN && c->role == WS_SERVER)
        ws_close(c, code, reason);
    else
        ws_abort(c, reason, false);
}

static int mbuf_append(struct ws_conn *c, const uint8_t *p, size_t n)
{
    if (c->mcap - c->mlen < n) {
        size_t cap = c->mcap ? c->mcap : 4096;
        while (cap - c->mlen < n)
            cap *= 2;
        uint8_t *q = realloc(c->mbuf, cap);
        if (!q)
            return -1;
        c->mbuf = q;
        c->mcap = cap;
    }
    memcpy(c->mbuf + c->mlen, p, n);
    c->mlen += n;
    return 0;
}

static int inflate_part(struct ws_conn *c, z_stream *z, const uint8_t *in, size_t n, size_t *out)
{
    z->next_in = (Bytef *)in;
    z->avail_in = (uInt)n;
    for (;;) {
        if (inf_buf.cap - *out < 1024) {
            if (*out > c->rx_max_message)
                return -2;
            if (grow(&inf_buf, inf_buf.cap ? inf_buf.cap * 2 : 16384) != 0)
                return -1;
        }
        z->next_out = inf_buf.p + *out;
        z->avail_out = (uInt)(inf_buf.cap - *out);
        int rc = inflate(z, Z_SYNC_FLUSH);
        *out = inf_buf.cap - z->avail_out;
        if (rc == Z_STREAM_END) {
            /* A final block: the next message starts a new stream. */
            inflateReset(z);
            if (z->avail_in == 0)
                return 0;
            continue;
        }
        if (rc != Z_OK && rc != Z_BUF_ERROR)
            return -1;
        if (z->avail_in == 0 && z->avail_out > 0)
            return 0;
        if (rc == Z_BUF_ERROR && z->avail_out > 0)
            return -1;
    }
}

static void deliver(struct ws_conn *c, int op, bool compressed, const uint8_t *p, size_t n)
{
    c->rx_op = 0;
    c->stats.msgs_in++;
    if (compressed) {
        z_stream *z = c->inflater;
        if (!z) {
            z = calloc(1, sizeof(*z));
            if (!z || inflateInit2(z, -15) != Z_OK) {
                free(z);
                fail(c, "inflate init failed", 1011);
                return;
            }
            c->inflater = z;
        }
        size_t out = 0;
        static const uint8_t tail[4] = {0, 0, 0xff, 0xff};
        int rc = inflate_part(c, z, p, n, &out);
        if (rc == 0)
            rc = inflate_part(c, z, tail, 4, &out);
        if (rc == -2 || (rc == 0 && out > c->rx_max_message)) {
            fail(c, "inflated message too big", 1009);
            return;
        }
        if (rc != 0) {
            fail(c, "bad deflate data", 1007);
            return;
        }
        if (c->rx_no_ctx)
            inflateReset(z);
        p = inf_buf.p;
        n = out;
    }
    if (c->h->on_message)
        c->h->on_message(c, op, p, n);
}

/* Parse and act on complete frames in p[0..n); returns bytes consumed, or
 * -1 when the connection ended (the rest is discarded). Payloads are
 * unmasked in place: the buffer is ours. */
static long parse_frames(struct ws_conn *c, uint8_t *p, size_t n)
{
    size_t pos = 0;
    while (c->state == WS_OPEN || c->state == WS_CLOSING) {
        if (n - pos < 2)
            break;
        uint8_t b0 = p[pos], b1 = p[pos + 1];
        bool fin = b0 & 0x80, rsv1 = b0 & 0x40, masked = b1 & 0x80;
        int op = b0 & 0x0F;
        size_t hl = 2;
        uint64_t len = b1 & 0x7F;
        if (b0 & 0x30)
            return fail(c, "reserved bits set", 1002), -1;
        if (op != WS_OP_CONT && op != WS_OP_TEXT && op != WS_OP_BINARY && op != WS_OP_CLOSE &&
            op != WS_OP_PING && op != WS_OP_PONG)
            return fail(c, "bad opcode", 1002), -1;
        if (len == 127 && c->reject_64bit)
            return fail(c, "frame with a 64-bit length", 1009), -1;
        if (masked != (c->role == WS_SERVER))
            return fail(c, masked ? "masked frame from server" : "unmasked frame from client",
                        1002),
                   -1;
        if (len == 126)
            hl += 2;
        else if (len == 127)
            hl += 8;
        if (masked)
            hl += 4;
        if (n - pos < hl)
            break;
        if (len == 126) {
            len = ((uint64_t)p[pos + 2] << 8) | p[pos + 3];
        } else if (len == 127) {
            len = 0;
            for (int i = 0; i < 8; i++)
                len = (len << 8) | p[pos + 2 + i];
            if (len >> 63)
                return fail(c, "bad 64-bit length", 1002), -1;
        }
        bool control = op >= 0x8;
        if (control && (!fin || len > 125))
            return fail(c, "bad control frame", 1002), -1;
        if (rsv1 && (control || op == WS_OP_CONT || !c->deflate))
            return fail(c, "RSV1 without permessage-deflate", 1002), -1;
        if (c->rx_max_frame && len > c->rx_max_frame)
            return fail(c, "frame larger than Max-Frame-Size", 1009), -1;
        if (!control && c->mlen + len > c->rx_max_message)
            return fail(c, "message too big", 1009), -1;
        if (n - pos - hl < len)
            break;
        uint8_t *pl = p + pos + hl;
        if (masked) {
            const uint8_t *k = p + pos + hl - 4;
            for (uint64_t i = 0; i < len; i++)
                pl[i] ^= k[i & 3];
        }
        pos += hl + (size_t)len;
        c->stats.frames_in++;
        if (len > c->stats.max_frame_in)
            c->stats.max_frame_in = (uint32_t)len;
        if (control) {
            if (op == WS_OP_CLOSE) {
                if (len == 1)
                    return fail(c, "bad close frame", 1002), -1;
                c->close_code = len >= 2 ? (uint16_t)((pl[0] << 8) | pl[1]) : 1005;
                if (len > 2) {
                    size_t tl = (size_t)len - 2 < sizeof(c->close_text) - 1
                                    ? (size_t)len - 2
                                    : sizeof(c->close_text) - 1;
                    memcpy(c->close_text, pl + 2, tl);
                    c->close_text[tl] = '\0';
                }
                if (!c->reason)
                    c->reason = "peer sent close";
                /* The SDK drops a tunnel socket without answering the
                 * server's close frame (TUNNELS.md §6). */
                if (c->state == WS_OPEN && !(c->sdk_tunnel && c->role == WS_CLIENT)) {
                    uint8_t echo[2] = {(uint8_t)(c->close_code >> 8), (uint8_t)c->close_code};
                    ws_send_control(c, WS_OP_CLOSE, echo, len >= 2 ? 2 : 0);
                    if (c->state == WS_CLOSED)
                        return -1;
                    c->state = WS_CLOSING;
                }
                if (c->queued == 0)
                    ws_abort(c, NULL, false);
                else
                    c->close_after_write = true;
                return -1;
            }
            if (c->state != WS_OPEN)
                continue;
            if (op == WS_OP_PING && c->h->on_ping)
                c->h->on_ping(c, pl, (size_t)len);
            else if (op == WS_OP_PONG && c->h->on_pong)
                c->h->on_pong(c, pl, (size_t)len);
            continue;
        }
        if (op == WS_OP_CONT) {
            if (!c->rx_op)
                return fail(c, "continuation without a message", 1002), -1;
        } else {
            if (c->rx_op)
                return fail(c, "new message inside a fragmented one", 1002), -1;
            c->rx_op = (uint8_t)op;
            c->rx_compressed = rsv1;
        }
        if (c->state != WS_OPEN)
            continue; /* closing: discard data */
        if (fin && c->mlen == 0) {
            deliver(c, c->rx_op, c->rx_compressed, pl, (size_t)len);
        } else {
            if (mbuf_append(c, pl, (size_t)len) != 0)
                return fail(c, "out of memory", 1011), -1;
            if (fin) {
                size_t ml = c->mlen;
                c->mlen = 0;
                deliver(c, c->rx_op, c->rx_compressed, c->mbuf, ml);
                /* Give back a large assembly buffer once done. */
                if (c->mcap > 256 * 1024) {
                    free(c->mbuf);
                    c->mbuf = NULL;
                    c->mcap = 0;
                }
            }
        }
    }
    return c->state == WS_CLOSED ? -1 : (long)pos;
}

static int parse_extension(struct ws_conn *c, struct ws_str v)
{
    /* Exactly one permessage-deflate with known parameters. */
    size_t i = 0;
    bool first = true;
    while (i <= v.n) {
        size_t j = i;
        while (j < v.n && v.p[j] != ';')
            j++;
        struct ws_str t = trim(v.p + i, j - i);
        if (first) {
            if (!ws_str_ieq(t, "permessage-deflate"))
                return -1;
            first = false;
        } else if (ws_str_ieq(t, "server_no_context_takeover")) {
            c->rx_no_ctx = true;
        } else if (ws_str_ieq(t, "client_no_context_takeover")) {
            c->tx_no_ctx = true;
        } else if (t.n > 22 && strncasecmp(t.p, "server_max_window_bits=", 23) == 0) {
            /* Fine: our inflate window is 15, the largest. */
        } else if (t.n > 22 && strncasecmp(t.p, "client_max_window_bits=", 23) == 0) {
            int bits = 0;
            for (size_t k = 23; k < t.n; k++) {
                if (!isdigit((unsigned char)t.p[k]) || bits > 15)
                    return -1;
                bits = bits * 10 + (t.p[k] - '0');
            }
            if (bits < 8 || bits > 15)
                return -1;
            c->tx_window_bits = (uint8_t)bits;
        } else {
            return -1;
        }
        i = j + 1;
    }
    c->deflate = true;
    return 0;
}

static const char *status_text(int s)
{
    switch (s) {
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 503:
        return "Service Unavailable";
    default:
        return "Error";
    }
}

/* Returns bytes of the head consumed, 0 if more are needed, -1 if closed. */
static long handshake(struct ws_conn *c, uint8_t *p, size_t n)
{
    struct ws_http h;
    long hl = ws_http_parse((const char *)p, n, c->role == WS_CLIENT, &h);
    if (hl == 0)
        return 0;
    if (hl < 0) {
        if (c->role == WS_SERVER)
            ws_write_raw(c, "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", 47);
        c->close_after_write = c->queued > 0;
        if (!c->close_after_write)
            ws_abort(c, "malformed HTTP head", false);
        else
            c->reason = "malformed HTTP head";
        return -1;
    }
    const struct ws_str *up = ws_http_header(&h, "Upgrade");
    const struct ws_str *conn = ws_http_header(&h, "Connection");
    const struct ws_str *ext = ws_http_header(&h, "Sec-WebSocket-Extensions");
    if (c->role == WS_CLIENT) {
        const struct ws_str *acc = ws_http_header(&h, "Sec-WebSocket-Accept");
        if (h.status != 101) {
            c->http_status = (uint16_t)h.status;
            ws_abort(c, "upgrade refused", false);
            return -1;
        }
        if (c->sdk_tunnel && c->rx_max_frame && (size_t)hl > c->rx_max_frame) {
            ws_abort(c, "upgrade response larger than Max-Frame-Size", false);
            return -1;
        }
        /* The SDK compares each header as one value: "Upgrade, keep-alive"
         * fails its check. */
        bool conn_ok = conn && (c->sdk_tunnel ? ws_str_ieq(*conn, "upgrade")
                                              : ws_str_has_token(*conn, "upgrade"));
        if (!up || !ws_str_ieq(*up, "websocket") || !conn_ok) {
            ws_abort(c, "bad upgrade response headers", false);
            return -1;
        }
        if (!acc || !c->accept || !ws_str_ieq(*acc, c->accept)) {
            ws_abort(c, "bad Sec-WebSocket-Accept", false);
            return -1;
        }
        bool offered = c->deflate;
        c->deflate = false;
        if (ext && (!offered || parse_extension(c, *ext) != 0)) {
            ws_abort(c, "extension not offered or unknown", false);
            return -1;
        }
        free(c->accept);
        c->accept = NULL;
        c->state = WS_OPEN;
        if (c->h->on_open)
            c->h->on_open(c);
        return c->state == WS_OPEN ? hl : -1;
    }
    /* Server side. */
    const struct ws_str *key = ws_http_header(&h, "Sec-WebSocket-Key");
    const struct ws_str *ver = ws_http_header(&h, "Sec-WebSocket-Version");
    int status = 101;
    char accept[29];
    if (!ws_str_ieq(h.method, "GET") || !up || !ws_str_ieq(*up, "websocket") || !conn ||
        !ws_str_has_token(*conn, "upgrade") || !key || key->n != 24 || !ver ||
        !ws_str_ieq(*ver, "13") || ws_accept_key(key->p, key->n, accept) != 0)
        status = 400;
    c->deflate = ext && ws_str_has_token(*ext, "permessage-deflate");
    if (status == 101 && c->h->on_upgrade)
        status = c->h->on_upgrade(c, &h);
    if (c->state == WS_CLOSED)
        return -1;
    char resp[512];
    int rn;
    if (status != 101) {
        c->http_status = (uint16_t)status;
        rn = snprintf(resp, sizeof(resp),
                      "HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", status,
                      status_text(status));
        c->state = WS_CLOSING;
        c->reason = "upgrade refused";
        ws_write_raw(c, resp, (size_t)rn);
        if (c->state != WS_CLOSED) {
            if (c->queued == 0)
                ws_abort(c, NULL, false);
            else
                c->close_after_write = true;
        }
        return -1;
    }
    rn = snprintf(resp, sizeof(resp),
                  "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n%s\r\n",
                  accept, c->deflate ? "Sec-WebSocket-Extensions: permessage-deflate\r\n" : "");
    if (c->glue_len && (size_t)rn + c->glue_len <= sizeof(resp)) {
        memcpy(resp + rn, c->glue, c->glue_len);
        rn += c->glue_len;
    }
    if (ws_write_raw(c, resp, (size_t)rn) != 0)
        return -1;
    c->state = WS_OPEN;
    if (c->h->on_open)
        c->h->on_open(c);
    return c->state == WS_OPEN ? hl : -1;
}

/* Consume what we can of p[0..n); returns bytes consumed or -1. */
static long process(struct ws_conn *c, uint8_t *p, size_t n)
{
    size_t pos = 0;
    if (c->state == WS_HANDSHAKE) {
        long r = handshake(c, p, n);
        if (r <= 0)
            return r;
        pos = (size_t)r;
        if (c->role == WS_CLIENT && c->sdk_tunnel) {
            /* The SDK reads the response into one buffer and drops whatever
             * came with it. */
            c->glued_bytes += n - pos;
            return (long)n;
        }
    }
    long r = parse_frames(c, p + pos, n - pos);
    return r < 0 ? -1 : (long)pos + r;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    struct ws_conn *c = h->data;
    if (c->rlen == 0) {
        if (!rd_scratch)
            rd_scratch = malloc(SCRATCH_SIZE);
        *buf = uv_buf_init((char *)rd_scratch, rd_scratch ? SCRATCH_SIZE : 0);
        return;
    }
    if (c->rcap - c->rlen < 16384) {
        size_t cap = c->rcap * 2 < c->rlen + 65536 ? c->rlen + 65536 : c->rcap * 2;
        uint8_t *p = realloc(c->rbuf, cap);
        if (!p) {
            *buf = uv_buf_init(NULL, 0);
            return;
        }
        c->rbuf = p;
        c->rcap = cap;
    }
    *buf = uv_buf_init((char *)c->rbuf + c->rlen, (unsigned)(c->rcap - c->rlen));
}

static void keep_rest(struct ws_conn *c, const uint8_t *p, size_t n)
{
    if (n > c->rcap) {
        uint8_t *q = realloc(c->rbuf, n + 65536);
        if (!q) {
            ws_abort(c, "out of memory", false);
            return;
        }
        c->rbuf = q;
        c->rcap = n + 65536;
    }
    memmove(c->rbuf, p, n);
    c->rlen = n;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct ws_conn *c = s->data;
    if (nread == 0)
        return;
    if (nread < 0) {
        if (nread == UV_ENOBUFS)
            ws_abort(c, "out of memory", false);
        else
            ws_abort(c, nread == UV_EOF ? "peer closed the socket" : "socket error", false);
        return;
    }
    c->stats.bytes_in += (uint64_t)nread;
    uint8_t *p;
    size_t n;
    if ((uint8_t *)buf->base == rd_scratch && c->rlen == 0) {
        p = rd_scratch;
        n = (size_t)nread;
    } else {
        c->rlen += (size_t)nread;
        p = c->rbuf;
        n = c->rlen;
    }
    cork_conn = c;
    cork_len = 0;
    long used = process(c, p, n);
    if (cork_len && c->state != WS_CLOSED)
        uncork(c);
    cork_conn = NULL;
    cork_len = 0;
    if (used < 0 || c->state == WS_CLOSED)
        return;
    size_t rest = n - (size_t)used;
    if (c->state == WS_HANDSHAKE && rest >= WS_MAX_HTTP) {
        ws_abort(c, "HTTP head too large", false);
        return;
    }
    if (rest == 0) {
        c->rlen = 0;
        if (c->rcap > 256 * 1024) {
            free(c->rbuf);
            c->rbuf = NULL;
            c->rcap = 0;
        }
    } else {
        keep_rest(c, p + used, rest);
    }
}

static struct ws_conn *conn_new(uv_loop_t *loop, int role, const struct ws_handlers *h, void *user)
{
    struct ws_conn *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    if (uv_tcp_init(loop, &c->tcp) != 0) {
        free(c);
        return NULL;
    }
    c->tcp.data = c;
    c->h = h;
    c->user = user;
    c->role = (uint8_t)role;
    c->rx_max_message = DEFAULT_MAX_MESSAGE;
    return c;
}

struct ws_conn *ws_server_accept(uv_stream_t *server, const struct ws_handlers *h, void *user)
{
    struct ws_conn *c = conn_new(server->loop, WS_SERVER, h, user);
    if (!c)
        return NULL;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        c->closed_notified = true; /* never announced */
        ws_abort(c, "accept failed", false);
        return NULL;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    c->state = WS_HANDSHAKE;
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    return c;
}

struct connect_req {
    uv_connect_t req;
    struct ws_conn *c;
    size_t len;
    char text[];
};

static void on_connected(uv_connect_t *req, int status)
{
    struct connect_req *cr = (struct connect_req *)req;
    struct ws_conn *c = cr->c;
    if (status == UV_ECANCELED || c->state == WS_CLOSED) {
        free(cr);
        return;
    }
    if (status < 0) {
        free(cr);
        ws_abort(c, "connect failed", false);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    c->state = WS_HANDSHAKE;
    int rc = ws_write_raw(c, cr->text, cr->len);
    free(cr);
    if (rc == 0)
        uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

struct ws_conn *ws_client_connect(uv_loop_t *loop, const struct sockaddr *dest,
                                  const struct sockaddr *source, const struct ws_client_opts *o,
                                  const struct ws_handlers *h, void *user)
{
    unsigned char raw[16];
    char key[25], accept[29];
    if (RAND_bytes(raw, sizeof(raw)) != 1 ||
        EVP_EncodeBlock((unsigned char *)key, raw, sizeof(raw)) != 24)
        return NULL;
    if (ws_accept_key(key, 24, accept) != 0)
        return NULL;
    size_t cap = 1024 + (o->extra_headers ? strlen(o->extra_headers) : 0) +
                 (o->app_key ? strlen(o->app_key) : 0) + strlen(o->host) + strlen(o->path);
    struct connect_req *cr = malloc(sizeof(*cr) + cap);
    if (!cr)
        return NULL;
    char mfs[48] = "";
    if (o->max_frame_size)
        snprintf(mfs, sizeof(mfs), "Max-Frame-Size: %u\r\n", (unsigned)o->max_frame_size);
    int n;
    if (o->sdk_tunnel)
        n = snprintf(cr->text, cap,
                     "GET %s HTTP/1.1\r\nUser-Agent: ThingWorx C SDK\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nHost: %s\r\nSec-WebSocket-Version: 13\r\n"
                     "Sec-WebSocket-Key: %s\r\n%s%s%s%s\r\n",
                     o->path, o->host, key, mfs, o->app_key ? "appKey: " : "",
                     o->app_key ? o->app_key : "", o->app_key ? "\r\n" : "");
    else
        n = snprintf(
        cr->text, cap,
        "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: ThingWorx C SDK\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s%s%s%s%s\r\n",
        o->path, o->host, key, o->deflate ? "Sec-WebSocket-Extensions: permessage-deflate\r\n" : "",
        mfs, o->app_key ? "appKey: " : "", o->app_key ? o->app_key : "", o->app_key ? "\r\n" : "");
    if (n < 0 || (size_t)n >= cap) {
        free(cr);
        return NULL;
    }
    /* Extra headers go last, before the blank line. */
    if (o->extra_headers) {
        size_t el = strlen(o->extra_headers);
        if ((size_t)n + el >= cap) {
            free(cr);
            return NULL;
        }
        memmove(cr->text + n - 2 + el, cr->text + n - 2, 3);
        memcpy(cr->text + n - 2, o->extra_headers, el);
        n += (int)el;
    }
    cr->len = (size_t)n;
    struct ws_conn *c = conn_new(loop, WS_CLIENT, h, user);
    if (!c) {
        free(cr);
        return NULL;
    }
    c->accept = strdup(accept);
    c->deflate = o->deflate && !o->sdk_tunnel; /* offered; confirmed by the response */
    c->sdk_tunnel = o->sdk_tunnel;
    c->rx_max_frame = o->max_frame_size;
    c->reject_64bit = true;
    cr->c = c;
    int rc = source ? uv_tcp_bind(&c->tcp, source, 0) : 0;
    if (rc == 0)
        rc = uv_tcp_connect(&cr->req, &c->tcp, dest, on_connected);
    if (rc != 0 || !c->accept) {
        free(cr);
        c->closed_notified = true; /* the caller sees NULL instead */
        ws_abort(c, "connect failed", false);
        return NULL;
    }
    return c;
}
