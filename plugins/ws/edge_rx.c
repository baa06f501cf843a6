/* RFC 6455 server-side receive path with bounded RFC 7692 inflation. */
#include "edge_rx.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>

#define OP_CONT  0x0
#define OP_TEXT  0x1
#define OP_BIN   0x2
#define OP_CLOSE 0x8
#define OP_PING  0x9
#define OP_PONG  0xA

#define CTL_MAX      125
#define KEEP_MSG_CAP 8192 /* larger message buffers go back after the message */

/* Compressed bytes one message may take: deflate's own overhead is ~5 bytes
 * per 64 KiB stored block, so anything far above the output limit is a peer
 * spending our CPU on empty blocks. */
static uint64_t wire_limit(size_t limit)
{
    return (uint64_t)limit + (limit >> 3) + 4096;
}

static int fail(struct edge_rx *rx, struct edge_rx_error *err, uint16_t code, const char *reason)
{
    rx->failed = true;
    if (err) {
        err->code = code;
        err->reason = reason;
    }
    return -1;
}

void edge_rx_init(struct edge_rx *rx, const struct edge_rx_params *p, size_t limit)
{
    memset(rx, 0, sizeof(*rx));
    if (p)
        rx->p = *p;
    if (rx->p.window_bits == 8)
        rx->p.window_bits = 9; /* zlib's smallest; a larger window reads the same */
    else if (rx->p.window_bits < 9 || rx->p.window_bits > 15)
        rx->p.window_bits = 15;
    rx->limit = limit;
}

static void zs_free(struct edge_rx *rx)
{
    if (!rx->zs)
        return;
    inflateEnd(rx->zs);
    free(rx->zs);
    rx->zs = NULL;
    rx->zs_dirty = false;
}

void edge_rx_free(struct edge_rx *rx)
{
    zs_free(rx);
    free(rx->msg);
    free(rx->ctl);
    rx->msg = rx->ctl = NULL;
    rx->msg_len = rx->msg_cap = 0;
}

void edge_rx_set_limit(struct edge_rx *rx, size_t limit)
{
    rx->limit = limit;
}

void edge_rx_trim(struct edge_rx *rx)
{
    if (rx->in_msg)
        return;
    if (rx->msg && rx->msg_cap > KEEP_MSG_CAP) {
        free(rx->msg);
        rx->msg = NULL;
        rx->msg_cap = 0;
    }
    if (!rx->in_frame && rx->ctl) {
        free(rx->ctl);
        rx->ctl = NULL;
    }
}

size_t edge_rx_held(const struct edge_rx *rx)
{
    /* zlib's inflate state (~7 KiB) plus its window */
    return rx->msg_cap + (rx->ctl ? CTL_MAX : 0) +
           (rx->zs ? 7168 + ((size_t)1 << rx->p.window_bits) : 0);
}

/* ---- message buffer ------------------------------------------------------ */

/* Room for at least `more` bytes, never past limit + 1 (one byte over is how
 * inflation learns the message is too big). */
static int msg_reserve(struct edge_rx *rx, size_t more)
{
    size_t want, cap;
    uint8_t *p;

    if (rx->msg_len > rx->limit)
        more = 0;
    else if (more > rx->limit + 1 - rx->msg_len)
        more = rx->limit + 1 - rx->msg_len;
    want = rx->msg_len + more;
    if (want <= rx->msg_cap)
        return 0;
    cap = rx->msg_cap ? rx->msg_cap : 1024;
    while (cap < want)
        cap *= 2;
    if (cap > rx->limit + 1)
        cap = rx->limit + 1;
    p = realloc(rx->msg, cap);
    if (!p)
        return -1;
    rx->msg = p;
    rx->msg_cap = cap;
    return 0;
}

/* ---- inflation ----------------------------------------------------------- */

static int zs_ready(struct edge_rx *rx, struct edge_rx_error *err)
{
    if (rx->zs) {
        if (rx->p.no_takeover && rx->zs_dirty && inflateReset(rx->zs) != Z_OK)
            return fail(rx, err, 1011, "inflate reset failed");
        if (rx->p.no_takeover)
            rx->zs_dirty = false;
        return 0;
    }
    rx->zs = calloc(1, sizeof(*rx->zs));
    if (!rx->zs)
        return fail(rx, err, 1011, "out of memory");
    if (inflateInit2(rx->zs, -(int)rx->p.window_bits) != Z_OK) {
        free(rx->zs);
        rx->zs = NULL;
        return fail(rx, err, 1011, "out of memory");
    }
    return 0;
}

/* One inflate() call into the message buffer (grown as needed, never past
 * limit + 1). Sets *rc to inflate's answer; a final block resets the
 * stream (what follows starts a new one). Returns -1 when the stream
 * cannot go on. */
static int inflate_once(struct edge_rx *rx, int *rc, struct edge_rx_error *err)
{
    z_stream *zs = rx->zs;
    size_t room;
    uInt give;

    if (rx->msg_len == rx->msg_cap && msg_reserve(rx, rx->msg_cap ? rx->msg_cap : 1024))
        return fail(rx, err, 1011, "out of memory");
    room = rx->msg_cap - rx->msg_len;
    if (!room)
        return fail(rx, err, 1009, "message too big");
    zs->next_out = rx->msg + rx->msg_len;
    /* zlib counts in 32 bits: a larger buffer is filled in steps */
    give = room > UINT_MAX ? UINT_MAX : (uInt)room;
    zs->avail_out = give;
    *rc = inflate(zs, Z_SYNC_FLUSH);
    rx->msg_len += give - zs->avail_out;
    if (rx->msg_len > rx->limit)
        return fail(rx, err, 1009, "message too big");
    if (*rc == Z_STREAM_END && inflateReset(zs) != Z_OK)
        return fail(rx, err, 1011, "inflate reset failed");
    if (*rc != Z_OK && *rc != Z_BUF_ERROR && *rc != Z_STREAM_END)
        return fail(rx, err, *rc == Z_MEM_ERROR ? 1011 : 1007,
                    *rc == Z_MEM_ERROR ? "out of memory" : "invalid compressed data");
    return 0;
}

/* Inflate `n` compressed bytes into the message, which never passes limit. */
static int inflate_into(struct edge_rx *rx, const uint8_t *in, size_t n, struct edge_rx_error *err)
{
    z_stream *zs = rx->zs;
    int rc;

    rx->zs_dirty = true;
    zs->next_in = (Bytef *)in;
    zs->avail_in = (uInt)n;
    while (zs->avail_in > 0) {
        if (inflate_once(rx, &rc, err))
            return -1;
        /* Z_BUF_ERROR with room left: it needs input it will not get */
        if (rc == Z_BUF_ERROR && zs->avail_out)
            break;
    }
    /* inflate may hold output back while it has room to write: drain it */
    while (zs->avail_in == 0) {
        size_t before = rx->msg_len;

        if (inflate_once(rx, &rc, err))
            return -1;
        if (rc == Z_STREAM_END || rx->msg_len == before || zs->avail_out)
            break;
    }
    return 0;
}

/* ---- close frames -------------------------------------------------------- */

static bool utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;

    while (i < n) {
        uint8_t c = s[i];
        size_t k;
        uint32_t cp;

        if (c < 0x80) {
            uint64_t w;

            /* ASCII (a tunnel's base64) goes 8 bytes at a time */
            while (i + 8 <= n && (memcpy(&w, s + i, 8), !(w & 0x8080808080808080ull)))
                i += 8;
            if (i < n && s[i] < 0x80)
                i++;
            continue;
        }
        if (c >= 0xC2 && c <= 0xDF) {
            k = 1;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            k = 2;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            k = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (n - i <= k)
            return false;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        if ((k == 2 && cp < 0x800) || (k == 3 && (cp < 0x10000 || cp > 0x10FFFF)) ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += k + 1;
    }
    return true;
}

/* RFC 6455 §7.4: codes a peer may send. */
static bool close_code_valid(unsigned code)
{
    if (code >= 3000 && code <= 4999)
        return true;
    return code >= 1000 && code <= 1014 && code != 1004 && code != 1005 && code != 1006;
}

/* ---- frames -------------------------------------------------------------- */

static size_t hdr_need(const uint8_t *h)
{
    uint8_t l7 = h[1] & 0x7F;

    return 2 + (l7 == 126 ? 2 : l7 == 127 ? 8 : 0) + ((h[1] & 0x80) ? 4 : 0);
}

/* The first two header bytes: everything that needs no length. */
static int check_start(struct edge_rx *rx, struct edge_rx_error *err)
{
    uint8_t b0 = rx->hdr[0], b1 = rx->hdr[1];
    uint8_t op = b0 & 0x0F;
    bool fin = (b0 & 0x80) != 0, rsv1 = (b0 & 0x40) != 0;
    bool control = (op & 0x8) != 0;

    if (b0 & 0x30)
        return fail(rx, err, 1002, "reserved bits set");
    if (op != OP_CONT && op != OP_TEXT && op != OP_BIN && op != OP_CLOSE && op != OP_PING &&
        op != OP_PONG)
        return fail(rx, err, 1002, "reserved opcode");
    if (rx->p.from_server && (b1 & 0x80))
        return fail(rx, err, 1002, "masked frame from a server");
    if (!rx->p.from_server && !(b1 & 0x80))
        return fail(rx, err, 1002, "unmasked frame");
    if (control) {
        if (!fin)
            return fail(rx, err, 1002, "fragmented control frame");
        if ((b1 & 0x7F) > CTL_MAX)
            return fail(rx, err, 1002, "control frame too long");
        if (rsv1)
            return fail(rx, err, 1002, "reserved bits set");
        return 0;
    }
    /* RSV1 on a continuation of a compressed message is what the C SDK
     * sends: ignored there (RFC 7692 wants it clear) */
    if (rsv1 && !rx->p.deflate)
        return fail(rx, err, 1002, "reserved bits set");
    if (op == OP_CONT) {
        if (!rx->in_msg)
            return fail(rx, err, 1002, "continuation without a start");
        if (rsv1 && !rx->compressed)
            return fail(rx, err, 1002, "reserved bits set");
        return 0;
    }
    if (rx->in_msg)
        return fail(rx, err, 1002, "new message inside a fragmented one");
    if (op == OP_TEXT && !rx->p.text)
        return fail(rx, err, 1003, "text frames are not accepted");
    return 0;
}

/* The whole header is in: length, mask, limits. */
static int start_frame(struct edge_rx *rx, struct edge_rx_error *err)
{
    const uint8_t *h = rx->hdr;
    uint8_t l7 = h[1] & 0x7F;
    uint64_t n = l7;
    size_t at = 2;

    if (l7 == 126) {
        n = ((uint64_t)h[2] << 8) | h[3];
        at = 4;
    } else if (l7 == 127) {
        if (h[2] & 0x80)
            return fail(rx, err, 1002, "invalid frame length");
        n = 0;
        for (int i = 0; i < 8; i++)
            n = (n << 8) | h[2 + i];
        at = 10;
    }
    rx->masked = (h[1] & 0x80) != 0;
    if (rx->masked)
        memcpy(rx->mask, h + at, 4);
    else
        memset(rx->mask, 0, 4);
    rx->mask_pos = 0;
    rx->op = h[0] & 0x0F;
    rx->fin = (h[0] & 0x80) != 0;
    rx->left = n;
    rx->in_frame = true;
    rx->hdr_len = 0;
    if (rx->op & 0x8) {
        rx->ctl_len = 0;
        return 0;
    }
    if (rx->op != OP_CONT) {
        rx->in_msg = true;
        rx->msg_text = rx->op == OP_TEXT;
        rx->compressed = (h[0] & 0x40) != 0;
        rx->msg_len = 0;
        rx->wire = 0;
        if (rx->compressed && zs_ready(rx, err))
            return -1;
    }
    if (rx->compressed) {
        uint64_t wl = wire_limit(rx->limit);

        if (rx->wire > wl || n > wl - rx->wire)
            return fail(rx, err, 1009, "message too big");
        rx->wire += n;
    } else if (rx->msg_len > rx->limit || n > (uint64_t)rx->limit - rx->msg_len) {
        return fail(rx, err, 1009, "message too big");
    }
    return 0;
}

static void unmask(struct edge_rx *rx, uint8_t *p, size_t n)
{
    size_t i = 0;
    uint8_t k[8];
    uint64_t k8;

    if (!rx->masked)
        return;
    for (; i < n && rx->mask_pos; i++) {
        p[i] ^= rx->mask[rx->mask_pos];
        rx->mask_pos = (uint8_t)((rx->mask_pos + 1) & 3);
    }
    for (int j = 0; j < 8; j++)
        k[j] = rx->mask[j & 3];
    memcpy(&k8, k, 8);
    for (; i + 8 <= n; i += 8) {
        uint64_t v;

        memcpy(&v, p + i, 8);
        v ^= k8;
        memcpy(p + i, &v, 8);
    }
    for (; i < n; i++) {
        p[i] ^= rx->mask[rx->mask_pos];
        rx->mask_pos = (uint8_t)((rx->mask_pos + 1) & 3);
    }
}

/* A control frame is complete. Returns the callback's answer or -1. */
static int end_control(struct edge_rx *rx, uint8_t *p, size_t n, edge_rx_cb cb, void *user,
                       struct edge_rx_error *err)
{
    enum edge_rx_kind kind;

    if (rx->op == OP_CLOSE) {
        if (n == 1)
            return fail(rx, err, 1002, "invalid close payload");
        if (n >= 2 && !close_code_valid(((unsigned)p[0] << 8) | p[1]))
            return fail(rx, err, 1002, "invalid close code");
        if (n > 2 && !utf8_valid(p + 2, n - 2))
            return fail(rx, err, 1007, "close reason is not UTF-8");
        kind = EDGE_RX_CLOSE;
    } else {
        kind = rx->op == OP_PING ? EDGE_RX_PING : EDGE_RX_PONG;
    }
    return cb(user, kind, p, n);
}

/* A data frame ended; deliver the message when it was the last. */
static int end_data(struct edge_rx *rx, edge_rx_cb cb, void *user, struct edge_rx_error *err)
{
    static const uint8_t tail[4] = {0x00, 0x00, 0xFF, 0xFF};
    int rc;

    if (!rx->fin)
        return 0;
    /* no deflate data at all (a flush with nothing new gives none): an empty
     * message; the tail alone would leave the inflater inside a stored
     * block header and break the next message */
    if (rx->compressed && rx->wire && inflate_into(rx, tail, sizeof(tail), err))
        return -1;
    if (rx->msg_len > rx->limit) /* the limit was lowered since */
        return fail(rx, err, 1009, "message too big");
    rx->in_msg = false;
    if (rx->msg_text && rx->msg_len && !utf8_valid(rx->msg, rx->msg_len))
        return fail(rx, err, 1007, "text message is not UTF-8");
    rc = cb(user, rx->msg_text ? EDGE_RX_TEXT : EDGE_RX_MESSAGE, rx->msg ? rx->msg : (uint8_t *)tail,
            rx->msg_len);
    rx->msg_len = 0;
    if (rx->compressed && rx->p.no_takeover)
        zs_free(rx); /* nothing to keep between messages */
    rx->compressed = false;
    if (rx->msg_cap > KEEP_MSG_CAP)
        edge_rx_trim(rx);
    return rc;
}

long edge_rx_feed(struct edge_rx *rx, uint8_t *buf, size_t len, edge_rx_cb cb, void *user,
                  struct edge_rx_error *err)
{
    size_t off = 0;

    if (rx->failed)
        return fail(rx, err, 1002, "protocol error");
    while (off < len) {
        if (!rx->in_frame) {
            size_t need = rx->hdr_len < 2 ? 2 : hdr_need(rx->hdr);

            while (rx->hdr_len < need && off < len) {
                rx->hdr[rx->hdr_len++] = buf[off++];
                if (rx->hdr_len == 2) {
                    if (check_start(rx, err))
                        return -1;
                    need = hdr_need(rx->hdr);
                }
            }
            if (rx->hdr_len < need)
                break;
            /* header bytes may have been partly consumed: remember where the
             * payload of a frame fully inside this buffer starts */
            if (start_frame(rx, err))
                return -1;
            if (rx->left)
                continue;
            /* an empty frame ends here */
        } else {
            size_t n = len - off;
            bool whole = false;
            uint8_t *p = buf + off;

            if (n > rx->left)
                n = (size_t)rx->left;
            unmask(rx, p, n);
            if (rx->op & 0x8) {
                whole = rx->ctl_len == 0 && n == rx->left;
                if (!whole) {
                    if (!rx->ctl && !(rx->ctl = malloc(CTL_MAX)))
                        return fail(rx, err, 1011, "out of memory");
                    memcpy(rx->ctl + rx->ctl_len, p, n);
                    rx->ctl_len = (uint8_t)(rx->ctl_len + n);
                }
            } else if (rx->compressed) {
                if (inflate_into(rx, p, n, err))
                    return -1;
            } else if (rx->fin && (rx->op == OP_BIN || rx->op == OP_TEXT) && n == rx->left &&
                       rx->msg_len == 0 && n <= rx->limit) {
                /* the common case: a whole message in one frame in this
                 * buffer, delivered where it lies */
                int rc;

                if (rx->op == OP_TEXT && !utf8_valid(p, n))
                    return fail(rx, err, 1007, "text message is not UTF-8");
                off += n;
                rx->left = 0;
                rx->in_frame = false;
                rx->in_msg = false;
                rc = cb(user, rx->op == OP_TEXT ? EDGE_RX_TEXT : EDGE_RX_MESSAGE, p, n);
                if (rc)
                    return (long)off;
                continue;
            } else {
                /* the header was checked against the limit then in force;
                 * msg_reserve never grows past the one in force now */
                if (rx->msg_len > rx->limit || n > rx->limit - rx->msg_len)
                    return fail(rx, err, 1009, "message too big");
                if (msg_reserve(rx, n))
                    return fail(rx, err, 1011, "out of memory");
                memcpy(rx->msg + rx->msg_len, p, n);
                rx->msg_len += n;
            }
            off += n;
            rx->left -= n;
            if (rx->left)
                continue;
            if (rx->op & 0x8) {
                int rc;

                rx->in_frame = false;
                rc = end_control(rx, whole ? p : rx->ctl, whole ? n : rx->ctl_len, cb, user, err);
                rx->ctl_len = 0;
                if (rc < 0)
                    return -1;
                if (rc)
                    return (long)off;
                continue;
            }
        }
        /* a frame's payload is complete (or it had none) */
        rx->in_frame = false;
        if (rx->op & 0x8) {
            int rc = end_control(rx, rx->hdr, 0, cb, user, err);

            if (rc < 0)
                return -1;
            if (rc)
                return (long)off;
            continue;
        }
        {
            int rc = end_data(rx, cb, user, err);

            if (rc < 0)
                return -1;
            if (rc)
                return (long)off;
        }
    }
    return (long)off;
}
