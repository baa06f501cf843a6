/* What edgemux sends to an edge: server frames (never masked, cut at the
 * peer's Max-Frame-Size) and RFC 7692 compression with a sync flush. One
 * scratch buffer per hub holds the framed and the compressed bytes. */
#include "edge_int.h"

static uint8_t *tbuf_reserve(struct edge_hub *hub, size_t n)
{
    if (n > hub->tcap) {
        uint8_t *p = realloc(hub->tbuf, n);

        if (!p)
            return NULL;
        hub->tbuf = p;
        hub->tcap = n;
    }
    return hub->tbuf;
}

void edge_tbuf_trim(struct edge_hub *hub)
{
    if (hub->tcap > KEEP_TBUF) {
        free(hub->tbuf);
        hub->tbuf = NULL;
        hub->tcap = 0;
    }
    if (hub->zcap > KEEP_TBUF) {
        free(hub->zbuf);
        hub->zbuf = NULL;
        hub->zcap = 0;
    }
}

/* Server frames are not masked; a tunnel's back end (edgemux is the
 * client) masks every frame. Data frames are cut at the peer's
 * Max-Frame-Size. Returns the framed length in hub->tbuf, or 0. */
size_t edge_frame(struct edge_conn *c, uint8_t op, bool rsv1, const uint8_t *data, size_t len)
{
    size_t fmax = (op & 0x8) ? 125 : c->max_frame;
    size_t frames = len ? (len + fmax - 1) / fmax : 1;
    size_t total = len + frames * (c->client ? 8 : 4), off = 0, w = 0;
    uint8_t *dst;

    if (len > SIZE_MAX / 2 || !(dst = tbuf_reserve(c->hub, total)))
        return 0;
    do {
        size_t frag = len - off;
        uint8_t mbit = c->client ? 0x80 : 0;

        if (frag > fmax)
            frag = fmax;
        dst[w++] = (uint8_t)((off + frag == len ? 0x80 : 0) | (off == 0 ? op : 0) |
                             (off == 0 && rsv1 ? 0x40 : 0));
        if (frag > 125) {
            dst[w++] = mbit | 126;
            dst[w++] = (uint8_t)(frag >> 8);
            dst[w++] = (uint8_t)frag;
        } else {
            dst[w++] = (uint8_t)(mbit | frag);
        }
        if (c->client) {
            uint64_t x = c->hub->rng; /* xorshift64 */
            uint8_t key[4];

            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c->hub->rng = x;
            memcpy(key, &x, 4);
            memcpy(dst + w, key, 4);
            w += 4;
            if (frag)
                ws_mask_copy(dst + w, data + off, frag, key);
        } else if (frag) {
            memcpy(dst + w, data + off, frag);
        }
        w += frag;
        off += frag;
    } while (off < len);
    return w;
}

/* RFC 7692 §7.2.1: deflate with a sync flush, minus its 00 00 ff ff tail. */
int edge_compress(struct edge_conn *c, const uint8_t *data, size_t len, const uint8_t **out,
                  size_t *outlen)
{
    struct edge_hub *hub = c->hub;
    size_t cap, n;
    z_stream *z = c->tx_z;
    static const uint8_t empty[1] = {0x00};

    if (!len) {
        /* an empty stored block once the receiver adds 00 00 ff ff (RFC 7692
         * §7.2.3.6); zlib has nothing to flush for it */
        *out = empty;
        *outlen = 1;
        return 0;
    }
    if (!z) {
        z = calloc(1, sizeof(*z));
        if (!z)
            return -ENOMEM;
        if (deflateInit2(z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -(int)c->pmd.server_window,
                         hub->s.deflate_mem_level, Z_DEFAULT_STRATEGY) != Z_OK) {
            free(z);
            return -ENOMEM;
        }
        c->tx_z = z;
    }
    if (len > UINT_MAX / 2)
        return -EMSGSIZE;
    cap = deflateBound(z, (uLong)len) + 64;
    if (cap > hub->zcap) {
        uint8_t *p = realloc(hub->zbuf, cap);

        if (!p)
            return -ENOMEM;
        hub->zbuf = p;
        hub->zcap = cap;
    }
    z->next_in = (Bytef *)data;
    z->avail_in = (uInt)len;
    z->next_out = hub->zbuf;
    z->avail_out = (uInt)hub->zcap;
    if (deflate(z, Z_SYNC_FLUSH) != Z_OK || z->avail_in || !z->avail_out)
        return -EIO;
    n = hub->zcap - z->avail_out;
    if (n >= 4)
        n -= 4;
    if (c->pmd.server_no_takeover)
        deflateReset(z);
    *out = hub->zbuf;
    *outlen = n;
    return 0;
}
