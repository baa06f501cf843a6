/* The edge hop's receive path (plugins/ws/edge_rx.c): every RFC 6455 §5 rule
 * and RFC 7692 inflation, each stream fed whole, split in two at every byte
 * boundary and one byte at a time, with the same outcome each way. Every
 * piece is copied into an exactly-sized heap buffer, so the sanitizer build
 * catches a read past what was fed. inflate is wrapped (-Wl,--wrap=inflate)
 * to count what it produces: a bomb's cost is measured in bytes, not time. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <zlib.h>

#include "edge_rx.h"

/* ---- inflate, counted ------------------------------------------------------ */

int __real_inflate(z_streamp strm, int flush);
int __wrap_inflate(z_streamp strm, int flush);

static uint64_t inflate_out, inflate_calls;

int __wrap_inflate(z_streamp strm, int flush)
{
    uInt before = strm->avail_out;
    int rc = __real_inflate(strm, flush);

    inflate_out += before - strm->avail_out;
    inflate_calls++;
    return rc;
}

/* ---- a growing byte buffer and frames -------------------------------------- */

struct buf {
    uint8_t *p;
    size_t n, cap;
};

static void put(struct buf *b, const void *p, size_t n)
{
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;

        while (cap < b->n + n)
            cap *= 2;
        b->p = realloc(b->p, cap);
        assert_non_null(b->p);
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->n, p, n);
    b->n += n;
}

static void put8(struct buf *b, uint8_t v)
{
    put(b, &v, 1);
}

static void buf_free(struct buf *b)
{
    free(b->p);
    memset(b, 0, sizeof(*b));
}

static const uint8_t KEY[4] = {0x37, 0xfa, 0x21, 0x3d}; /* RFC 6455 §5.7 */
static const uint8_t ZERO_KEY[4] = {0, 0, 0, 0};        /* what the C SDK sends */

#define FIN  0x80
#define RSV1 0x40
#define RSV2 0x20
#define RSV3 0x10

enum { LEN_AUTO, LEN_16, LEN_64 };

/* A frame: first byte b0, payload of `len` bytes (NULL: zeros), masked with
 * `key` unless it is NULL, length in the given form. */
static void frame_ex(struct buf *b, uint8_t b0, const uint8_t *key, const void *payload,
                     uint64_t len, int form)
{
    uint8_t m = key ? 0x80 : 0;

    put8(b, b0);
    if (form == LEN_AUTO && len < 126) {
        put8(b, (uint8_t)(m | len));
    } else if (form != LEN_64 && len <= 0xFFFF) {
        put8(b, m | 126);
        put8(b, (uint8_t)(len >> 8));
        put8(b, (uint8_t)len);
    } else {
        put8(b, m | 127);
        for (int i = 7; i >= 0; i--)
            put8(b, (uint8_t)(len >> (8 * i)));
    }
    if (key)
        put(b, key, 4);
    for (uint64_t i = 0; payload && i < len; i++)
        put8(b, ((const uint8_t *)payload)[i] ^ (key ? key[i & 3] : 0));
    for (uint64_t i = 0; !payload && i < len; i++)
        put8(b, key ? key[i & 3] : 0);
}

static void frame(struct buf *b, uint8_t b0, const void *payload, size_t len)
{
    frame_ex(b, b0, KEY, payload, len, LEN_AUTO);
}

static void frame_s(struct buf *b, uint8_t b0, const char *s)
{
    frame(b, b0, s, strlen(s));
}

static void close_frame(struct buf *b, unsigned code, const void *reason, size_t rlen)
{
    uint8_t p[125];

    p[0] = (uint8_t)(code >> 8);
    p[1] = (uint8_t)code;
    if (rlen)
        memcpy(p + 2, reason, rlen);
    frame(b, FIN | 0x8, p, 2 + rlen);
}

/* ---- a client compressor (RFC 7692 §7.2.1) -------------------------------- */

struct client {
    z_stream z;
    bool no_takeover;
};

static void client_init(struct client *c, int wbits, bool no_takeover)
{
    memset(c, 0, sizeof(*c));
    c->no_takeover = no_takeover;
    assert_int_equal(deflateInit2(&c->z, 9, Z_DEFLATED, -wbits, 9, Z_DEFAULT_STRATEGY), Z_OK);
}

/* Compress one message; the trailing 00 00 ff ff is removed. */
static void client_compress(struct client *c, const void *in, size_t n, struct buf *out)
{
    uint8_t chunk[16384];

    if (c->no_takeover)
        assert_int_equal(deflateReset(&c->z), Z_OK);
    c->z.next_in = (Bytef *)in;
    c->z.avail_in = (uInt)n;
    do {
        c->z.next_out = chunk;
        c->z.avail_out = sizeof(chunk);
        assert_int_not_equal(deflate(&c->z, Z_SYNC_FLUSH), Z_STREAM_ERROR);
        put(out, chunk, sizeof(chunk) - c->z.avail_out);
    } while (c->z.avail_out == 0);
    /* a flush with nothing new gives nothing: an empty payload */
    if (out->n >= 4 && !memcmp(out->p + out->n - 4, "\x00\x00\xff\xff", 4))
        out->n -= 4;
}

static void client_end(struct client *c)
{
    deflateEnd(&c->z);
}

/* A compressed message as frames of at most `per` payload bytes, RSV1 on the
 * first (and on every frame if `rsv1_all`, as the C SDK does). */
static void frames_of(struct buf *b, const uint8_t *p, size_t n, size_t per, bool rsv1_all,
                      const uint8_t *key)
{
    size_t off = 0;
    bool first = true;

    do {
        size_t k = n - off < per ? n - off : per;
        uint8_t b0 = first ? 0x2 : 0x0;

        if (first || rsv1_all)
            b0 |= RSV1;
        if (off + k == n)
            b0 |= FIN;
        frame_ex(b, b0, key, p + off, k, LEN_AUTO);
        off += k;
        first = false;
    } while (off < n);
}

/* ---- running a stream ------------------------------------------------------- */

struct ev {
    enum edge_rx_kind kind;
    size_t len;
    uint8_t *data;
};

#define MAX_EV 64

struct run {
    struct edge_rx rx;
    struct ev ev[MAX_EV];
    size_t nev;
    bool errored;
    struct edge_rx_error err;
    size_t raise_to;    /* raise the limit after the first message (AUTH) */
    size_t pause_every; /* return 1 from every n-th callback */
    size_t calls;
};

static int on_rx(void *user, enum edge_rx_kind kind, uint8_t *data, size_t len)
{
    struct run *r = user;

    assert_false(r->errored);
    assert_true(r->nev < MAX_EV);
    if (kind == EDGE_RX_MESSAGE)
        assert_true(len <= r->rx.limit);
    else
        assert_true(len <= 125);
    r->ev[r->nev].kind = kind;
    r->ev[r->nev].len = len;
    r->ev[r->nev].data = malloc(len ? len : 1);
    assert_non_null(r->ev[r->nev].data);
    if (len)
        memcpy(r->ev[r->nev].data, data, len);
    r->nev++;
    if (kind == EDGE_RX_MESSAGE && r->raise_to && r->nev == 1)
        edge_rx_set_limit(&r->rx, r->raise_to);
    r->calls++;
    return r->pause_every && r->calls % r->pause_every == 0;
}

static void run_init(struct run *r, const struct edge_rx_params *p, size_t limit)
{
    memset(r, 0, sizeof(*r));
    edge_rx_init(&r->rx, p, limit);
}

static void run_free(struct run *r)
{
    for (size_t i = 0; i < r->nev; i++)
        free(r->ev[i].data);
    edge_rx_free(&r->rx);
    r->nev = 0;
}

/* Feed one piece as edge.c does: a paused receive side gets the rest again. */
static void feed(struct run *r, const uint8_t *s, size_t n)
{
    uint8_t *copy;
    size_t off = 0;

    if (r->errored)
        return;
    copy = malloc(n ? n : 1);
    assert_non_null(copy);
    memcpy(copy, s, n);
    do {
        size_t calls = r->calls;
        long got = edge_rx_feed(&r->rx, copy + off, n - off, on_rx, r, &r->err);

        if (got < 0) {
            struct edge_rx_error again = {0, NULL};

            r->errored = true;
            assert_non_null(r->err.reason);
            /* failed for good: nothing more is consumed or delivered */
            assert_int_equal(edge_rx_feed(&r->rx, copy, n, on_rx, r, &again), -1);
            break;
        }
        assert_true((size_t)got <= n - off);
        if ((size_t)got < n - off)
            assert_true(r->pause_every && r->calls > calls); /* only a pause stops it */
        off += (size_t)got;
    } while (off < n);
    free(copy);
}

struct want {
    enum edge_rx_kind kind;
    const void *data;
    size_t len;
};

struct cfg {
    struct edge_rx_params p;
    size_t limit;
    size_t raise_to;
};

static void check_run(struct run *r, const struct want *w, size_t nw, uint16_t code)
{
    assert_int_equal(r->nev, nw);
    for (size_t i = 0; i < nw; i++) {
        assert_int_equal(r->ev[i].kind, w[i].kind);
        assert_int_equal(r->ev[i].len, w[i].len);
        if (w[i].len)
            assert_memory_equal(r->ev[i].data, w[i].data, w[i].len);
    }
    if (code) {
        assert_true(r->errored);
        assert_int_equal(r->err.code, code);
    } else {
        assert_false(r->errored);
    }
}

/* The stream gives the same events and outcome fed whole, in two pieces split
 * at every byte boundary, one byte at a time, and with a pause after every
 * callback. */
static void expect(const struct cfg *c, const uint8_t *s, size_t n, const struct want *w, size_t nw,
                   uint16_t code)
{
    struct run r;

    for (size_t cut = 0; cut <= n; cut++) {
        run_init(&r, &c->p, c->limit);
        r.raise_to = c->raise_to;
        feed(&r, s, cut);
        feed(&r, s + cut, n - cut);
        check_run(&r, w, nw, code);
        run_free(&r);
    }
    run_init(&r, &c->p, c->limit);
    r.raise_to = c->raise_to;
    for (size_t i = 0; i < n; i++)
        feed(&r, s + i, 1);
    check_run(&r, w, nw, code);
    run_free(&r);

    run_init(&r, &c->p, c->limit);
    r.raise_to = c->raise_to;
    r.pause_every = 1;
    feed(&r, s, n);
    check_run(&r, w, nw, code);
    run_free(&r);
}

static const struct cfg PLAIN = {{false, false, 15}, 4096, 0};
static const struct cfg DEFL = {{true, false, 15}, 4096, 0};
static const struct cfg DEFL_NT = {{true, true, 15}, 4096, 0};

#define MSG(s)                                                                                     \
    {                                                                                              \
        EDGE_RX_MESSAGE, s, sizeof(s) - 1                                                          \
    }
#define PING(s)                                                                                    \
    {                                                                                              \
        EDGE_RX_PING, s, sizeof(s) - 1                                                             \
    }
#define PONG(s)                                                                                    \
    {                                                                                              \
        EDGE_RX_PONG, s, sizeof(s) - 1                                                             \
    }

/* ---- RFC 6455 §5: frames ------------------------------------------------------ */

static void test_binary_message(void **state)
{
    struct buf b = {0};
    const struct want w[] = {MSG("hello"), MSG("")};

    (void)state;
    frame_s(&b, FIN | 0x2, "hello");
    frame_s(&b, FIN | 0x2, "");
    expect(&PLAIN, b.p, b.n, w, 2, 0);
    buf_free(&b);
}

static void test_zero_mask_key(void **state)
{
    struct buf b = {0};
    const struct want w[] = {MSG("sdk")};

    (void)state;
    frame_ex(&b, FIN | 0x2, ZERO_KEY, "sdk", 3, LEN_AUTO);
    expect(&PLAIN, b.p, b.n, w, 1, 0);
    buf_free(&b);
}

static void test_length_forms(void **state)
{
    struct buf b = {0};
    uint8_t p[300];
    struct want w[2] = {{EDGE_RX_MESSAGE, p, 126}, {EDGE_RX_MESSAGE, p, 300}};

    (void)state;
    for (size_t i = 0; i < sizeof(p); i++)
        p[i] = (uint8_t)(i * 7);
    frame_ex(&b, FIN | 0x2, KEY, p, 126, LEN_AUTO);
    frame_ex(&b, FIN | 0x2, KEY, p, 300, LEN_64);
    expect(&PLAIN, b.p, b.n, w, 2, 0);
    buf_free(&b);
}

static void test_unmasked(void **state)
{
    struct buf b = {0};

    (void)state;
    frame_ex(&b, FIN | 0x2, NULL, "x", 1, LEN_AUTO);
    expect(&PLAIN, b.p, b.n, NULL, 0, 1002);
    buf_free(&b);
    /* control frames too */
    frame_ex(&b, FIN | 0x9, NULL, "", 0, LEN_AUTO);
    expect(&PLAIN, b.p, b.n, NULL, 0, 1002);
    buf_free(&b);
}

static void test_rsv_bits(void **state)
{
    struct buf b = {0};
    const struct want w[] = {MSG("ok")};

    (void)state;
    /* RSV1 without permessage-deflate */
    frame_s(&b, FIN | RSV1 | 0x2, "x");
    expect(&PLAIN, b.p, b.n, NULL, 0, 1002);
    buf_free(&b);
    /* RSV2 and RSV3 are never negotiated */
    for (int i = 0; i < 2; i++) {
        frame_s(&b, FIN | 0x2, "ok");
        frame_s(&b, (uint8_t)(FIN | (i ? RSV2 : RSV3) | 0x2), "x");
        expect(&PLAIN, b.p, b.n, w, 1, 1002);
        expect(&DEFL, b.p, b.n, w, 1, 1002);
        buf_free(&b);
    }
    /* RSV1 on a control frame, even with deflate */
    frame_s(&b, FIN | RSV1 | 0x9, "");
    expect(&DEFL, b.p, b.n, NULL, 0, 1002);
    buf_free(&b);
}

static void test_reserved_opcodes(void **state)
{
    static const uint8_t ops[] = {0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF};
    struct buf b = {0};

    (void)state;
    for (size_t i = 0; i < sizeof(ops); i++) {
        frame_s(&b, (uint8_t)(FIN | ops[i]), "x");
        expect(&PLAIN, b.p, b.n, NULL, 0, 1002);
        buf_free(&b);
    }
}

static void test_control_rules(void **state)
{
    struct buf b = {0};
    uint8_t big[126] = {0};
    const struct want w[] = {{EDGE_RX_PING, big, 125}};

    (void)state;
    frame(&b, FIN | 0x9, big, 125); /* the largest allowed */
    expect(&PLAIN, b.p, b.n, w, 1, 0);
    buf_free(&b);
    frame(&b, FIN | 0x9, big, 126);
    expect(&PLAIN, b.p, b.n, NULL, 0, 1002);
    buf_free(&b);
    /* a short payload in a long length form is still over 125 by its form */
    frame_ex(&b, FIN | 0xA, KEY, big, 5, LEN_16);
    expect(&PLAIN, b.p, b.n, NULL, 0, 1002);
    buf_free(&b);
    frame_s(&b, 0x9, "frag"); /* a ping without FIN */
    expect(&PLAIN, b.p, b.n, NULL, 0, 1002);
    buf_free(&b);
    frame_s(&b, 0x8, ""); /* a close without FIN */
    expect(&PLAIN, b.p, b.n, NULL, 0, 1002);
    buf_free(&b);
}

static void test_fragmentation_rules(void **state)
{
    struct buf b = {0};
    const struct want w[] = {MSG("ab")};

    (void)state;
    frame_s(&b, FIN | 0x0, "x"); /* continuation without a start */
    expect(&PLAIN, b.p, b.n, NULL, 0, 1002);
    buf_free(&b);
    frame_s(&b, 0x0, "x");
    expect(&PLAIN, b.p, b.n, NULL, 0, 1002);
    buf_free(&b);
    /* after a complete message, a continuation has no start either */
    frame_s(&b, 0x2, "a");
    frame_s(&b, FIN | 0x0, "b");
    frame_s(&b, FIN | 0x0, "c");
    expect(&PLAIN, b.p, b.n, w, 1, 1002);
    buf_free(&b);
    /* a new data frame inside a fragmented message */
    frame_s(&b, 0x2, "a");
    frame_s(&b, FIN | 0x2, "b");
    expect(&PLAIN, b.p, b.n, NULL, 0, 1002);
    buf_free(&b);
    frame_s(&b, 0x2, "a");
    frame_s(&b, FIN | 0x1, "b"); /* a text frame there is the same error */
    expect(&PLAIN, b.p, b.n, NULL, 0, 1002);
    buf_free(&b);
    /* RSV1 on a continuation of an uncompressed message, even with deflate */
    frame_s(&b, 0x2, "a");
    frame_s(&b, FIN | RSV1 | 0x0, "b");
    expect(&DEFL, b.p, b.n, NULL, 0, 1002);
    buf_free(&b);
}

static void test_interleaved_control(void **state)
{
    struct buf b = {0};
    const struct want w[] = {PING("p"), PONG(""), PING(""), MSG("abcdef"), MSG("z")};

    (void)state;
    frame_s(&b, 0x2, "ab");
    frame_s(&b, FIN | 0x9, "p");
    frame_s(&b, 0x0, "cd");
    frame_s(&b, FIN | 0xA, "");
    frame_s(&b, 0x0, "");
    frame_s(&b, FIN | 0x9, "");
    frame_s(&b, FIN | 0x0, "ef");
    frame_s(&b, FIN | 0x2, "z");
    expect(&PLAIN, b.p, b.n, w, 5, 0);
    buf_free(&b);
}

static void test_64bit_length(void **state)
{
    struct buf b = {0};

    (void)state;
    frame_ex(&b, FIN | 0x2, KEY, NULL, 0, LEN_64);
    b.p[2] = 0x80; /* top bit of the 64-bit length */
    expect(&PLAIN, b.p, b.n, NULL, 0, 1002);
    b.p[2] = 0xFF;
    expect(&PLAIN, b.p, b.n, NULL, 0, 1002);
    buf_free(&b);
    /* 2^62 bytes: top bit clear, refused for its size at the header */
    frame_ex(&b, FIN | 0x2, KEY, NULL, 0, LEN_64);
    b.p[2] = 0x40;
    expect(&PLAIN, b.p, b.n, NULL, 0, 1009);
    expect(&DEFL, b.p, b.n, NULL, 0, 1009);
    b.p[0] |= RSV1; /* compressed: over the bound on compressed bytes */
    expect(&DEFL, b.p, b.n, NULL, 0, 1009);
    buf_free(&b);
}

static void test_limit_at_header(void **state)
{
    struct buf b = {0};
    struct cfg c = PLAIN;
    uint8_t p[101] = {0};
    const struct want w[] = {{EDGE_RX_MESSAGE, p, 100}, {EDGE_RX_MESSAGE, p, 100}};

    (void)state;
    c.limit = 100;
    frame(&b, FIN | 0x2, p, 100);
    expect(&c, b.p, b.n, w, 1, 0);
    buf_free(&b);
    /* only the header of a frame one byte over: refused before its payload */
    frame_ex(&b, FIN | 0x2, KEY, NULL, 101, LEN_AUTO);
    b.n = 6;
    expect(&c, b.p, b.n, NULL, 0, 1009);
    buf_free(&b);
    frame_ex(&b, FIN | 0x2, KEY, NULL, 1u << 20, LEN_AUTO);
    b.n = 14;
    expect(&c, b.p, b.n, NULL, 0, 1009);
    buf_free(&b);
    /* fragments: the continuation that would pass the limit, at its header */
    frame(&b, 0x2, p, 60);
    frame(&b, 0x0, p, 40);
    frame(&b, FIN | 0x0, p, 0);
    frame(&b, FIN | 0x2, p, 100);
    frame_ex(&b, 0x2, KEY, p, 60, LEN_AUTO);
    frame_ex(&b, FIN | 0x0, KEY, NULL, 41, LEN_AUTO);
    b.n -= 41;
    expect(&c, b.p, b.n, w, 2, 1009);
    buf_free(&b);
}

static void test_close_codes(void **state)
{
    static const unsigned bad[] = {0,    999,  1004, 1005, 1006, 1015,
                                   1016, 1100, 2000, 2999, 5000, 65535};
    static const unsigned good[] = {1000, 1001, 1002, 1003, 1007, 1008, 1009,
                                    1010, 1011, 3000, 3999, 4000, 4999};
    struct buf b = {0};

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        close_frame(&b, bad[i], NULL, 0);
        expect(&PLAIN, b.p, b.n, NULL, 0, 1002);
        buf_free(&b);
    }
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        uint8_t p[2] = {(uint8_t)(good[i] >> 8), (uint8_t)good[i]};
        const struct want w[] = {{EDGE_RX_CLOSE, p, 2}};

        close_frame(&b, good[i], NULL, 0);
        expect(&PLAIN, b.p, b.n, w, 1, 0);
        buf_free(&b);
    }
    {
        const struct want w[] = {{EDGE_RX_CLOSE, "", 0}};

        frame_s(&b, FIN | 0x8, ""); /* no code at all */
        expect(&PLAIN, b.p, b.n, w, 1, 0);
        buf_free(&b);
    }
    frame_s(&b, FIN | 0x8, "\x03"); /* a 1-byte payload */
    expect(&PLAIN, b.p, b.n, NULL, 0, 1002);
    buf_free(&b);
}

static void test_close_reason_utf8(void **state)
{
    static const struct {
        const char *s;
        bool ok;
    } cases[] = {
        {"bye", true},
        {"caf\xc3\xa9", true},
        {"\xe2\x82\xac", true},         /* U+20AC */
        {"\xf0\x9f\x98\x80", true},     /* U+1F600 */
        {"\xf4\x8f\xbf\xbf", true},     /* U+10FFFF */
        {"\xff", false},                /* never in UTF-8 */
        {"\xc0\x80", false},            /* overlong NUL */
        {"\xe0\x80\xaf", false},        /* overlong '/' */
        {"\xed\xa0\x80", false},        /* a surrogate */
        {"\xf4\x90\x80\x80", false},    /* past U+10FFFF */
        {"\xe2\x82", false},            /* truncated */
        {"ok\x80", false},              /* a lone continuation byte */
        {"\xc3\x28", false},            /* a bad continuation byte */
        {"\xf8\x88\x80\x80\x80", false} /* five-byte form */
    };
    struct buf b = {0};

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        size_t rl = strlen(cases[i].s);
        uint8_t p[64] = {0x03, 0xE8};
        const struct want w[] = {{EDGE_RX_CLOSE, p, 2 + rl}};

        memcpy(p + 2, cases[i].s, rl);
        close_frame(&b, 1000, cases[i].s, rl);
        if (cases[i].ok)
            expect(&PLAIN, b.p, b.n, w, 1, 0);
        else
            expect(&PLAIN, b.p, b.n, NULL, 0, 1007);
        buf_free(&b);
    }
}

static void test_text_frame(void **state)
{
    struct buf b = {0};

    (void)state;
    frame_s(&b, FIN | 0x1, "text");
    expect(&PLAIN, b.p, b.n, NULL, 0, 1003);
    expect(&DEFL, b.p, b.n, NULL, 0, 1003);
    buf_free(&b);
    frame_s(&b, 0x1, "frag");
    expect(&PLAIN, b.p, b.n, NULL, 0, 1003);
    buf_free(&b);
}

/* Whatever the limit in force, nothing past it is delivered: lowering it
 * while a message is being assembled holds that message to the new limit. */
static void test_limit_lowered_mid_message(void **state)
{
    uint8_t p[3000];
    struct buf b = {0};
    struct run r;

    (void)state;
    memset(p, 0xAB, sizeof(p));
    frame(&b, FIN | 0x2, p, sizeof(p));
    for (size_t cut = 8; cut < 40; cut += 7) {
        run_init(&r, &PLAIN.p, 4096);
        feed(&r, b.p, cut);
        assert_false(r.errored);
        edge_rx_set_limit(&r.rx, 50);
        feed(&r, b.p + cut, b.n - cut);
        check_run(&r, NULL, 0, 1009);
        assert_true(r.rx.msg_cap <= 4097);
        run_free(&r);
    }
    buf_free(&b);
    /* fragments: the next frame's header is held to the new limit */
    frame(&b, 0x2, p, 40);
    frame(&b, FIN | 0x0, p, 40);
    run_init(&r, &PLAIN.p, 4096);
    feed(&r, b.p, 46);
    edge_rx_set_limit(&r.rx, 50);
    feed(&r, b.p + 46, b.n - 46);
    check_run(&r, NULL, 0, 1009);
    run_free(&r);
    buf_free(&b);
}

static void test_preauth_limit_raised(void **state)
{
    struct buf b = {0};
    struct cfg c = PLAIN;
    uint8_t auth[60], big[2000];
    const struct want w[] = {{EDGE_RX_MESSAGE, auth, 60}, {EDGE_RX_MESSAGE, big, 2000}};

    (void)state;
    memset(auth, 0x14, sizeof(auth));
    memset(big, 0x5A, sizeof(big));
    c.limit = 64;
    c.raise_to = 1u << 20;
    frame(&b, FIN | 0x2, auth, sizeof(auth));
    frame(&b, 0x2, big, 1000);
    frame(&b, FIN | 0x0, big + 1000, 1000);
    expect(&c, b.p, b.n, w, 2, 0);
    /* without the raise the second message is refused at its header */
    c.raise_to = 0;
    expect(&c, b.p, b.n, w, 1, 1009);
    buf_free(&b);
}

/* ---- RFC 7692: permessage-deflate -------------------------------------------- */

/* §7.2.3.1 and §7.2.3.2: "Hello", then "Hello" again with the window shared. */
static void test_rfc7692_hello(void **state)
{
    static const uint8_t hello[] = {0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00};
    static const uint8_t again[] = {0xf2, 0x00, 0x11, 0x00, 0x00};
    const struct want w1[] = {MSG("Hello")};
    const struct want w2[] = {MSG("Hello"), MSG("Hello")};
    struct buf b = {0};

    (void)state;
    frame(&b, FIN | RSV1 | 0x2, hello, sizeof(hello));
    expect(&DEFL, b.p, b.n, w1, 1, 0);
    frame(&b, FIN | RSV1 | 0x2, again, sizeof(again));
    expect(&DEFL, b.p, b.n, w2, 2, 0);
    /* the second needs the first's window: without takeover it cannot be read */
    expect(&DEFL_NT, b.p, b.n, w1, 1, 1007);
    buf_free(&b);
    /* the same message twice without takeover */
    frame(&b, FIN | RSV1 | 0x2, hello, sizeof(hello));
    frame(&b, FIN | RSV1 | 0x2, hello, sizeof(hello));
    expect(&DEFL_NT, b.p, b.n, w2, 2, 0);
    expect(&DEFL, b.p, b.n, w2, 2, 0);
    buf_free(&b);
    /* §7.2.3.1 fragmented: RSV1 on the first frame only */
    frame(&b, RSV1 | 0x2, hello, 3);
    frame(&b, FIN | 0x0, hello + 3, 4);
    expect(&DEFL, b.p, b.n, w1, 1, 0);
    buf_free(&b);
    /* the C SDK sets RSV1 on continuations too */
    frame(&b, RSV1 | 0x2, hello, 3);
    frame(&b, RSV1 | 0x0, hello + 3, 1);
    frame(&b, FIN | RSV1 | 0x0, hello + 4, 3);
    expect(&DEFL, b.p, b.n, w1, 1, 0);
    buf_free(&b);
    /* an uncompressed message between compressed ones leaves the window be */
    frame(&b, FIN | RSV1 | 0x2, hello, sizeof(hello));
    frame_s(&b, FIN | 0x2, "plain");
    frame(&b, FIN | RSV1 | 0x2, again, sizeof(again));
    {
        const struct want w[] = {MSG("Hello"), MSG("plain"), MSG("Hello")};

        expect(&DEFL, b.p, b.n, w, 3, 0);
    }
    buf_free(&b);
}

/* §7.2.3.3 stored block, §7.2.3.4 BFINAL set, §7.2.3.5 two blocks. */
static void test_rfc7692_block_kinds(void **state)
{
    static const uint8_t stored[] = {0x00, 0x05, 0x00, 0xfa, 0xff, 0x48,
                                     0x65, 0x6c, 0x6c, 0x6f, 0x00};
    static const uint8_t bfinal[] = {0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00};
    static const uint8_t two[] = {0xf2, 0x48, 0x05, 0x00, 0x00, 0x00, 0xff,
                                  0xff, 0xca, 0xc9, 0xc9, 0x07, 0x00};
    const struct want w[] = {MSG("Hello"), MSG("Hello"), MSG("Hello"), MSG("Hello")};
    struct buf b = {0};

    (void)state;
    frame(&b, FIN | RSV1 | 0x2, stored, sizeof(stored));
    frame(&b, FIN | RSV1 | 0x2, bfinal, sizeof(bfinal));
    frame(&b, FIN | RSV1 | 0x2, two, sizeof(two));
    frame(&b, FIN | RSV1 | 0x2, stored, sizeof(stored));
    expect(&DEFL, b.p, b.n, w, 4, 0);
    expect(&DEFL_NT, b.p, b.n, w, 4, 0);
    buf_free(&b);
}

static void test_empty_compressed(void **state)
{
    static const uint8_t hello[] = {0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00};
    static const uint8_t again[] = {0xf2, 0x00, 0x11, 0x00, 0x00};
    const struct want w[] = {MSG("Hello"), MSG(""), MSG(""), MSG("Hello")};
    struct buf b = {0};

    (void)state;
    frame(&b, FIN | RSV1 | 0x2, hello, sizeof(hello));
    frame(&b, FIN | RSV1 | 0x2, "\x00", 1); /* §7.2.3.6: an empty block */
    frame(&b, FIN | RSV1 | 0x2, "", 0);     /* no deflate data at all */
    frame(&b, FIN | RSV1 | 0x2, again, sizeof(again));
    expect(&DEFL, b.p, b.n, w, 4, 0);
    buf_free(&b);
    /* an empty compressed message split over empty frames */
    frame(&b, RSV1 | 0x2, "", 0);
    frame(&b, 0x0, "", 0);
    frame(&b, FIN | 0x0, "\x00", 1);
    {
        const struct want w1[] = {MSG("")};

        expect(&DEFL, b.p, b.n, w1, 1, 0);
    }
    buf_free(&b);
}

static void test_invalid_deflate(void **state)
{
    struct buf b = {0};

    (void)state;
    frame(&b, FIN | RSV1 | 0x2, "\xff\xff\xff", 3); /* reserved block type */
    expect(&DEFL, b.p, b.n, NULL, 0, 1007);
    buf_free(&b);
    /* a distance before the start of the stream */
    frame(&b, FIN | RSV1 | 0x2, "\xf2\x00\x11\x00\x00", 5);
    expect(&DEFL, b.p, b.n, NULL, 0, 1007);
    buf_free(&b);
}

/* Messages compressed by a real client with takeover, many per stream,
 * identical and repeated (issue 11 item 2's burst), at every window size. */
static void test_takeover_burst(void **state)
{
    uint8_t msg[2048];
    struct buf b = {0}, z = {0};
    struct want w[20];

    (void)state;
    for (size_t i = 0; i < sizeof(msg); i++)
        msg[i] = (uint8_t)((i * 31) ^ (i >> 3));
    for (int wbits = 8; wbits <= 15; wbits++) {
        for (int nt = 0; nt < 2; nt++) {
            struct client cl;
            /* a client told 8 compresses with zlib's smallest, 9 */
            struct cfg c = {{true, nt != 0, (uint8_t)wbits}, 4096, 0};
            struct run r;

            client_init(&cl, wbits < 9 ? 9 : wbits, nt != 0);
            for (int i = 0; i < 20; i++) {
                z.n = 0;
                client_compress(&cl, msg, sizeof(msg), &z);
                frames_of(&b, z.p, z.n, 100 + (size_t)i * 37, i & 1, ZERO_KEY);
                w[i].kind = EDGE_RX_MESSAGE;
                w[i].data = msg;
                w[i].len = sizeof(msg);
            }
            client_end(&cl);
            /* whole, in 13-byte pieces and with pauses */
            run_init(&r, &c.p, c.limit);
            feed(&r, b.p, b.n);
            check_run(&r, w, 20, 0);
            run_free(&r);
            run_init(&r, &c.p, c.limit);
            for (size_t off = 0; off < b.n; off += 13)
                feed(&r, b.p + off, b.n - off < 13 ? b.n - off : 13);
            check_run(&r, w, 20, 0);
            run_free(&r);
            run_init(&r, &c.p, c.limit);
            r.pause_every = 3;
            feed(&r, b.p, b.n);
            check_run(&r, w, 20, 0);
            run_free(&r);
            b.n = 0;
        }
    }
    buf_free(&b);
    buf_free(&z);
}

static uint32_t rng = 12345;

static uint32_t rnd(void)
{
    rng = rng * 1103515245u + 12345u;
    return rng >> 8;
}

/* 1 MiB compressed, in frames of random sizes, fed in random pieces. */
static void test_large_message_random_splits(void **state)
{
    const size_t n = 1u << 20;
    uint8_t *msg = malloc(n);
    struct buf b = {0}, z = {0};
    struct client cl;
    struct cfg c = {{true, false, 15}, 1u << 20, 0};

    (void)state;
    assert_non_null(msg);
    for (size_t i = 0; i < n; i++)
        msg[i] = (uint8_t)(i % 251 < 200 ? 'a' + (i % 7) : rnd());
    client_init(&cl, 15, false);
    /* two messages: the second is mostly back-references into the first */
    for (int m = 0; m < 2; m++) {
        z.n = 0;
        client_compress(&cl, msg, n, &z);
        for (size_t at = 0; at < z.n;) {
            size_t k = 1 + rnd() % 20000;
            uint8_t b0 = at == 0 ? (RSV1 | 0x2) : 0x0;

            if (k > z.n - at)
                k = z.n - at;
            if (at + k == z.n)
                b0 |= FIN;
            frame_ex(&b, b0, KEY, z.p + at, k, LEN_AUTO);
            if (rnd() % 4 == 0)
                frame_s(&b, FIN | 0x9, "keep");
            at += k;
        }
    }
    client_end(&cl);
    for (int round = 0; round < 3; round++) {
        struct run r;

        run_init(&r, &c.p, c.limit);
        r.pause_every = round == 2 ? 5 : 0;
        for (size_t off = 0; off < b.n;) {
            size_t k = round == 0 ? 1 + rnd() % 7 : 1 + rnd() % 70000;

            if (k > b.n - off)
                k = b.n - off;
            feed(&r, b.p + off, k);
            off += k;
        }
        assert_false(r.errored);
        for (size_t i = 0, m = 0; i < r.nev; i++) {
            if (r.ev[i].kind == EDGE_RX_PING) {
                assert_int_equal(r.ev[i].len, 4);
                continue;
            }
            assert_int_equal(r.ev[i].kind, EDGE_RX_MESSAGE);
            assert_int_equal(r.ev[i].len, n);
            assert_memory_equal(r.ev[i].data, msg, n);
            m++;
            if (i + 1 == r.nev)
                assert_int_equal(m, 2);
        }
        /* a message buffer that large is not kept between messages */
        assert_true(edge_rx_held(&r.rx) < 64 * 1024);
        run_free(&r);
    }
    buf_free(&b);
    buf_free(&z);
    free(msg);
}

/* 64 KiB of compressed zeros (about 64 MiB inflated), fragmented: refused with
 * 1009 once inflate has produced exactly limit + 1 bytes, no more. */
static void test_bomb(void **state)
{
    const size_t limits[] = {4096, 1u << 20};
    struct buf z = {0}, b = {0};
    z_stream d;
    static uint8_t zeros[1 << 16];
    uint8_t out[1 << 16];

    (void)state;
    memset(&d, 0, sizeof(d));
    assert_int_equal(deflateInit2(&d, 9, Z_DEFLATED, -15, 9, Z_DEFAULT_STRATEGY), Z_OK);
    while (z.n < 65536) {
        d.next_in = zeros;
        d.avail_in = sizeof(zeros);
        do {
            d.next_out = out;
            d.avail_out = sizeof(out);
            deflate(&d, Z_NO_FLUSH);
            put(&z, out, sizeof(out) - d.avail_out);
        } while (d.avail_out == 0);
    }
    deflateEnd(&d);
    frames_of(&b, z.p, z.n, 4096, true, KEY);
    for (size_t li = 0; li < 2; li++) {
        for (int nt = 0; nt < 2; nt++) {
            struct edge_rx_params p = {true, nt != 0, 15};
            struct run r;
            size_t fed = 0;

            run_init(&r, &p, limits[li]);
            inflate_out = inflate_calls = 0;
            while (fed < b.n && !r.errored) {
                size_t k = b.n - fed < 1000 ? b.n - fed : 1000;

                feed(&r, b.p + fed, k);
                fed += k;
            }
            check_run(&r, NULL, 0, 1009);
            assert_int_equal(inflate_out, limits[li] + 1);
            assert_true(inflate_calls < 64);
            /* it stopped near where the limit was passed, not at the end */
            assert_true(fed < 1000 + limits[li] / 256 + 4096);
            assert_true(r.rx.msg_cap <= limits[li] + 1);
            run_free(&r);
        }
    }
    buf_free(&z);
    buf_free(&b);
}

/* Before AUTH the limit is small; the compressed AUTH fits, the next message
 * may be large once it is raised, and one byte over the small limit is
 * refused after exactly limit + 1 bytes of output. */
static void test_compressed_preauth(void **state)
{
    uint8_t auth[60], big[100000];
    struct buf b = {0}, z = {0};
    struct client cl;
    struct cfg c = {{true, false, 15}, 64, 1u << 20};
    const struct want w[] = {{EDGE_RX_MESSAGE, auth, 60}, {EDGE_RX_MESSAGE, big, sizeof(big)}};
    struct run r;

    (void)state;
    memset(auth, 0, sizeof(auth));
    auth[0] = 0x01;
    auth[1] = 0x14;
    for (size_t i = 0; i < sizeof(big); i++)
        big[i] = (uint8_t)(i / 100);
    client_init(&cl, 15, false);
    client_compress(&cl, auth, sizeof(auth), &z);
    frames_of(&b, z.p, z.n, 1000, false, KEY);
    z.n = 0;
    client_compress(&cl, big, sizeof(big), &z);
    frames_of(&b, z.p, z.n, 777, true, KEY);
    client_end(&cl);
    run_init(&r, &c.p, c.limit);
    r.raise_to = c.raise_to;
    for (size_t off = 0; off < b.n; off += 5)
        feed(&r, b.p + off, b.n - off < 5 ? b.n - off : 5);
    check_run(&r, w, 2, 0);
    run_free(&r);
    buf_free(&b);
    buf_free(&z);

    /* 65 bytes before AUTH: one over */
    client_init(&cl, 15, false);
    client_compress(&cl, big, 65, &z);
    frames_of(&b, z.p, z.n, 3, true, KEY);
    client_end(&cl);
    c.raise_to = 0;
    run_init(&r, &c.p, c.limit);
    inflate_out = 0;
    feed(&r, b.p, b.n);
    check_run(&r, NULL, 0, 1009);
    assert_int_equal(inflate_out, 65);
    run_free(&r);
    expect(&c, b.p, b.n, NULL, 0, 1009);
    buf_free(&b);
    buf_free(&z);
}

/* Empty deflate blocks cost CPU without output: the compressed bytes of one
 * message are bounded as well, at the header that would pass the bound. */
static void test_wire_bound(void **state)
{
    struct buf b = {0};
    struct cfg c = DEFL;

    (void)state;
    c.limit = 1000;
    frame_ex(&b, FIN | RSV1 | 0x2, KEY, NULL, 1000 + 125 + 4096 + 1, LEN_AUTO);
    b.n = 8; /* the header only */
    expect(&c, b.p, b.n, NULL, 0, 1009);
    buf_free(&b);
}

static void test_trim_and_held(void **state)
{
    uint8_t p[20000];
    struct buf b = {0};
    struct run r;

    (void)state;
    memset(p, 1, sizeof(p));
    frame(&b, 0x2, p, 10000);
    frame(&b, FIN | 0x0, p, 10000);
    run_init(&r, &PLAIN.p, 1u << 20);
    feed(&r, b.p, b.n);
    check_run(&r, (const struct want[]){{EDGE_RX_MESSAGE, p, 20000}}, 1, 0);
    /* a large buffer goes back once its message is delivered */
    assert_true(edge_rx_held(&r.rx) <= 8192);
    edge_rx_trim(&r.rx);
    assert_int_equal(edge_rx_held(&r.rx), 0);
    run_free(&r);
    buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_binary_message),
        cmocka_unit_test(test_zero_mask_key),
        cmocka_unit_test(test_length_forms),
        cmocka_unit_test(test_unmasked),
        cmocka_unit_test(test_rsv_bits),
        cmocka_unit_test(test_reserved_opcodes),
        cmocka_unit_test(test_control_rules),
        cmocka_unit_test(test_fragmentation_rules),
        cmocka_unit_test(test_interleaved_control),
        cmocka_unit_test(test_64bit_length),
        cmocka_unit_test(test_limit_at_header),
        cmocka_unit_test(test_close_codes),
        cmocka_unit_test(test_close_reason_utf8),
        cmocka_unit_test(test_text_frame),
        cmocka_unit_test(test_limit_lowered_mid_message),
        cmocka_unit_test(test_preauth_limit_raised),
        cmocka_unit_test(test_rfc7692_hello),
        cmocka_unit_test(test_rfc7692_block_kinds),
        cmocka_unit_test(test_empty_compressed),
        cmocka_unit_test(test_invalid_deflate),
        cmocka_unit_test(test_takeover_burst),
        cmocka_unit_test(test_large_message_random_splits),
        cmocka_unit_test(test_bomb),
        cmocka_unit_test(test_compressed_preauth),
        cmocka_unit_test(test_wire_bound),
        cmocka_unit_test(test_trim_and_held),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
