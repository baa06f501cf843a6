/* Fuzz target for the edge hop's receive path (plugins/ws/edge_rx.c: RFC 6455
 * frames and bounded RFC 7692 inflation) as edge.c drives it, and for the
 * upgrade check (edge_http.c) over the same bytes.
 *
 * Input layout:
 *   [0] flags: 1 deflate, 2 client_no_context_takeover, 4 large pre-AUTH
 *       limit (4 KiB, else 64..574 bytes from [2]), 8 large limit after AUTH
 *       (1 MiB, else 64 KiB), 0x70 pause pattern, 0x80 trim between pieces
 *   [1] window bits: 8 + ([1] & 7) (8 and 9 both inflate with 9)
 *   [2] pre-AUTH limit when flag 4 is clear
 *   [3] number of split pieces (low 4 bits); then that many 16-bit big-endian
 *       piece lengths; the stream (the rest) is fed in those pieces, then the
 *       remainder at once. Each piece is its own heap block, so a read past
 *       what was fed is caught by the sanitizer.
 *
 * The callback keeps the core's AUTH-first rule: the first message must be
 * an AlwaysOn AUTH (version 0x01, code 0x14), after which the limit is
 * raised; any other first message closes the edge (nothing more is fed). It
 * answers pings, takes a close as the end, and pauses now and then (returns
 * 1), after which the rest is fed again as edge.c does. Broken invariants
 * abort: a message over the limit in force, a callback after an error, a
 * consumed count out of bounds, a stop without a pause, a control payload
 * over 125 bytes, a close code a peer may not send, an error without a
 * close code of docs/protocol.md. Memory is released by edge_rx_free (the
 * leak checker sees the rest). */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "edge_http.h"
#include "edge_rx.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define HDR 4

struct state {
    struct edge_rx rx;
    size_t full_limit;   /* the limit after AUTH */
    size_t max_limit;    /* the largest limit ever in force */
    bool authed, closed; /* closed: the edge is gone, nothing more is fed */
    bool errored;
    bool paused; /* the last callback returned 1 */
    unsigned pause_pattern, calls;
    uint8_t pong[125];
};

static volatile unsigned sink;

static void touch(uint8_t *p, size_t n)
{
    unsigned s = 0;

    for (size_t i = 0; i < n; i++)
        s += p[i];
    sink += s;
    if (n) { /* borrowed and writable for the call */
        p[0] ^= 0x5A;
        p[n - 1] ^= 0xA5;
    }
}

static bool close_code_ok(unsigned code)
{
    return (code >= 1000 && code <= 1014 && code != 1004 && code != 1005 && code != 1006) ||
           (code >= 3000 && code <= 4999);
}

static int on_rx(void *user, enum edge_rx_kind kind, uint8_t *data, size_t len)
{
    struct state *s = user;

    if (s->errored || s->closed)
        abort(); /* no callback after an error, or after the edge closed */
    if (len && !data)
        abort();
    s->calls++;
    switch (kind) {
    case EDGE_RX_TEXT:
        /* tunnels only; relayed, never parsed as AlwaysOn */
        if (!s->rx.p.text || len > s->rx.limit)
            abort();
        touch(data, len);
        break;
    case EDGE_RX_MESSAGE:
        if (len > s->rx.limit)
            abort();
        if (!s->authed) {
            struct emx_ao_header h;

            /* AUTH first: anything else closes the edge (1008) */
            if (emx_ao_header_parse(data, len, &h, NULL) != EMX_AO_OK || h.code != EMX_AO_AUTH ||
                h.multipart) {
                touch(data, len);
                s->closed = true;
                return 1;
            }
            s->authed = true;
            edge_rx_set_limit(&s->rx, s->full_limit);
            if (s->full_limit > s->max_limit)
                s->max_limit = s->full_limit;
        }
        touch(data, len);
        break;
    case EDGE_RX_PING:
    case EDGE_RX_PONG:
        if (len > 125)
            abort();
        if (kind == EDGE_RX_PING && len) /* the pong carries the same payload */
            memcpy(s->pong, data, len);
        touch(data, len);
        break;
    case EDGE_RX_CLOSE:
        if (len > 125 || len == 1)
            abort();
        if (len >= 2 && !close_code_ok(((unsigned)data[0] << 8) | data[1]))
            abort();
        touch(data, len);
        s->closed = true; /* echoed, then the edge is done reading */
        return 1;
    default:
        abort();
    }
    s->paused = s->pause_pattern && (s->calls % (s->pause_pattern + 1)) == 0;
    return s->paused;
}

static void check_error(const struct edge_rx_error *err)
{
    switch (err->code) {
    case 1002:
    case 1003:
    case 1007:
    case 1009:
    case 1011:
        break;
    default:
        abort();
    }
    if (!err->reason || !err->reason[0])
        abort();
}

/* Feed one piece the way edge.c does; false once the edge is done. */
static bool feed_piece(struct state *s, const uint8_t *src, size_t n)
{
    uint8_t *buf = malloc(n ? n : 1);
    size_t off = 0;
    bool go_on = true;

    if (!buf)
        abort();
    if (n)
        memcpy(buf, src, n);
    while (go_on) {
        struct edge_rx_error err = {0, NULL};
        long got;

        s->paused = false;
        got = edge_rx_feed(&s->rx, buf + off, n - off, on_rx, s, &err);
        if (got < 0) {
            struct edge_rx_error again = {0, NULL};

            check_error(&err);
            s->errored = true;
            /* failed for good: consumes nothing, calls nothing */
            if (edge_rx_feed(&s->rx, buf, n, on_rx, s, &again) != -1)
                abort();
            go_on = false;
            break;
        }
        if ((size_t)got > n - off)
            abort();
        if ((size_t)got < n - off && !s->paused && !s->closed)
            abort(); /* stopped without being asked to */
        off += (size_t)got;
        if (s->closed)
            go_on = false;
        else if (off == n)
            break;
        /* a buffer never holds more than the largest limit allows */
        if (s->rx.msg_cap > s->max_limit + 1)
            abort();
    }
    if (s->rx.msg_cap > s->max_limit + 1 || s->rx.msg_len > s->max_limit + 1)
        abort();
    free(buf);
    return go_on;
}

static void fuzz_rx(const uint8_t *data, size_t size)
{
    struct state s;
    struct edge_rx_params p = {0};
    size_t preauth, pieces;
    uint8_t flags;

    if (size < HDR)
        return;
    memset(&s, 0, sizeof(s));
    flags = data[0];
    p.deflate = flags & 1;
    p.no_takeover = (flags & 2) != 0;
    p.window_bits = (uint8_t)(8 + (data[1] & 7));
    /* tunnel receive sides: text allowed; a back end reads unmasked frames */
    p.text = (data[1] & 0x40) != 0;
    p.from_server = (data[1] & 0x80) != 0;
    preauth = (flags & 4) ? 4096 : 64 + (size_t)data[2] * 2;
    s.full_limit = (flags & 8) ? (size_t)1 << 20 : (size_t)64 << 10;
    s.max_limit = preauth;
    s.pause_pattern = (flags >> 4) & 7;
    pieces = data[3] & 15;
    edge_rx_init(&s.rx, &p, preauth);
    {
        /* piece lengths sit right after the header; the stream follows */
        size_t lens_end = HDR + 2 * pieces;
        size_t at;
        bool go_on = true;

        if (lens_end > size)
            lens_end = size;
        at = lens_end;
        for (size_t i = 0; i < pieces && go_on && HDR + 2 * i + 1 < lens_end; i++) {
            size_t n = ((size_t)data[HDR + 2 * i] << 8) | data[HDR + 2 * i + 1];

            if (n > size - at)
                n = size - at;
            go_on = feed_piece(&s, data + at, n);
            at += n;
            if (go_on && (flags & 0x80))
                edge_rx_trim(&s.rx);
        }
        if (go_on && at < size)
            feed_piece(&s, data + at, size - at);
    }
    if (edge_rx_held(&s.rx) > s.max_limit + 1 + 125 + 7168 + (1u << 15))
        abort();
    edge_rx_free(&s.rx);
    if (edge_rx_held(&s.rx) != 0)
        abort();
}

static void fuzz_http(const uint8_t *data, size_t size)
{
    static const struct edge_pmd_conf confs[2] = {{true, 15, 15}, {true, 10, 9}};
    struct edge_http_req r;
    char out[1024];
    char *head;
    long hl;

    if (size > EDGE_HTTP_MAX_HEAD)
        size = EDGE_HTTP_MAX_HEAD;
    head = malloc(size ? size : 1);
    if (!head)
        abort();
    if (size)
        memcpy(head, data, size);
    hl = edge_http_head_len(head, size);
    if (hl < -1 || hl > (long)size)
        abort();
    /* the whole input as a head, whether or not it ends with a blank line */
    edge_http_parse(head, size, "/Thingworx/WS", (size & 2) != 0, &confs[size & 1], &r);
    if (r.status == 0) {
        size_t n = edge_http_101(&r, out, sizeof(out));

        if (!n || strlen(r.accept) != 28)
            abort();
        if (r.pmd.on && (r.pmd.server_window < 9 || r.pmd.server_window > 15 ||
                         r.pmd.client_window < 8 || r.pmd.client_window > 15))
            abort();
        if (strlen(r.app_key) >= sizeof(r.app_key) || strlen(r.xff) >= sizeof(r.xff))
            abort();
        if (r.tunnel && (r.pmd.on || !r.tid[0] || strlen(r.tid) > EDGE_TID_MAX ||
                         strpbrk(r.tid, "/?#% ")))
            abort();
    } else {
        if (!r.why || r.status < 400 || r.status > 599)
            abort();
        if (!edge_http_refusal(r.status, out, sizeof(out)))
            abort();
    }
    {
        /* the same bytes as a tunnel back end's answer */
        struct edge_http_resp resp;

        edge_http_parse_response(head, size, "dGhlIHNhbXBsZSBub25jZQ==", &resp);
        if (resp.upgraded ? (resp.status != 101 || resp.why) : !resp.why)
            abort();
    }
    free(head);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_rx(data, size);
    if (size > HDR)
        fuzz_http(data + HDR, size - HDR);
    return 0;
}
